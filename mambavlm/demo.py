"""A web demo of a saved MambaVLM: ``python -m mambavlm.demo --model DIR [--host 127.0.0.1] [--port 7860]``.

A gradio page (``pip install -e ".[demo]"``): upload an image, ask questions about it, read the answers
as they stream; the conversation goes on until the image changes or "New conversation" is pressed.
Each browser tab keeps its own conversation (``ChatSession``'s messages in a ``gr.State``); the model
is shared. Nothing is sent anywhere: gradio's analytics are off and the page is served on ``--host``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mambavlm.chat import ChatSession
from mambavlm.model import MambaVLM

__all__ = ["build_demo", "main"]

ELEMENT_IDS = {"image": "image", "question": "question", "ask": "ask", "chatbot": "chatbot", "reset": "reset"}
"""The page's element ids (what the browser test drives)."""


def build_demo(model: MambaVLM, max_new_tokens: int = 256) -> Any:
    """The gradio ``Blocks`` app around ``model``. Raises ImportError without gradio."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio as gr
    except ImportError as error:
        raise ImportError('the demo needs gradio: pip install -e ".[demo]"') from error

    def ask(image: Image.Image | None, question: str, messages: list[dict[str, Any]] | None,
            shown: list[dict[str, Any]] | None) -> Iterator[tuple[list[dict[str, Any]], str, list[dict[str, Any]]]]:
        shown = list(shown or [])
        if not question or not question.strip():
            yield shown, question, messages or []
            return
        session = ChatSession(model, image.convert("RGB") if image is not None else None, max_new_tokens)
        session.messages = list(messages or [])
        shown = [*shown, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        answer = ""
        for piece in session.ask(question):
            answer += piece
            shown[-1] = {"role": "assistant", "content": answer}
            yield shown, "", session.messages
        shown[-1] = {"role": "assistant", "content": answer.strip()}
        yield shown, "", session.messages

    def reset() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return [], []

    with gr.Blocks(title=f"{model.config.name} demo", analytics_enabled=False) as demo:
        gr.Markdown(f"## {model.config.name}\nUpload an image and ask about it.")
        messages = gr.State([])
        with gr.Row():
            image = gr.Image(type="pil", label="Image", elem_id=ELEMENT_IDS["image"])
            with gr.Column():
                chatbot = gr.Chatbot(label="Conversation", elem_id=ELEMENT_IDS["chatbot"])
                question = gr.Textbox(label="Question", placeholder="What is in the picture?",
                                      elem_id=ELEMENT_IDS["question"])
                with gr.Row():
                    ask_button = gr.Button("Ask", variant="primary", elem_id=ELEMENT_IDS["ask"])
                    reset_button = gr.Button("New conversation", elem_id=ELEMENT_IDS["reset"])
        inputs = [image, question, messages, chatbot]
        outputs = [chatbot, question, messages]
        ask_button.click(ask, inputs, outputs)
        question.submit(ask, inputs, outputs)
        reset_button.click(reset, None, [chatbot, messages])
        image.change(reset, None, [chatbot, messages])
    return demo


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mambavlm.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="a saved MambaVLM (save_pretrained directory)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    args = parser.parse_args(argv)
    if importlib.util.find_spec("gradio") is None:  # before the model loads: one line, not a traceback
        print('error: the demo needs gradio: pip install -e ".[demo]"', file=sys.stderr)
        return 2
    model = MambaVLM.from_pretrained(args.model).to(args.device).eval()
    if model.tokenizer is None:
        print(f"error: {args.model} holds no tokenizer", file=sys.stderr)
        return 2
    build_demo(model, args.max_new_tokens).queue().launch(server_name=args.host, server_port=args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
