"""Chat with a saved MambaVLM about an image: ``python -m mambavlm.chat --model DIR --image FILE``.

Each line typed is a user turn; the answer streams as it is generated (transformers'
``TextIteratorStreamer``); the conversation is kept, with the image in its first turn, and formatted
by the model's chat template (``MambaVLMProcessor.apply_chat_template``). Commands: ``/reset`` starts
a new conversation, ``/image FILE`` one about another image, ``/quit`` (or end of input) leaves.
``--model`` takes what ``eval/evaluate.py`` takes: a saved MambaVLM, a Hub id, or a training run's output
directory (its ``final/``, a distillation's ``student/``). A model or image that cannot be opened ends the
command with one ``error:`` line and exit status 2.
``ChatSession`` is the same conversation for programs (the web demo, ``mambavlm.demo``, uses it).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from threading import Thread
from typing import Any

import torch
from PIL import Image
from transformers import TextIteratorStreamer

from mambavlm.eval.model_dir import resolve_model_dir
from mambavlm.model import MambaVLM
from mambavlm.processing import MambaVLMProcessor
from mambavlm.vision.image import open_image

__all__ = ["ChatSession", "main"]


class ChatSession:
    """A multi-turn conversation with a MambaVLM about one image (or none).

    Args:
        model: the model (its tokenizer attached).
        image: the picture the conversation is about, or None for text only.
        max_new_tokens, do_sample, temperature, top_p: passed to ``generate`` for every answer; an
            answer is also cut where the conversation reaches the model's ``max_length``.
    """

    def __init__(
        self,
        model: MambaVLM,
        image: Image.Image | None = None,
        max_new_tokens: int = 256,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
    ) -> None:
        self.model = model
        self.processor: MambaVLMProcessor = model.processor()
        self.generate_kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        if do_sample:
            self.generate_kwargs.update(temperature=temperature, top_p=top_p)
        self.image = image
        self.messages: list[dict[str, Any]] = []

    def reset(self, image: Image.Image | None = None) -> None:
        """Start a new conversation, about ``image``."""
        self.image = image
        self.messages = []

    def prompt(self, text: str) -> str:
        """The model's input text if ``text`` were asked next (the whole conversation so far)."""
        return self.processor.apply_chat_template(self._with_turn(text), add_generation_prompt=True)

    def _with_turn(self, text: str) -> list[dict[str, Any]]:
        first = not self.messages and self.image is not None
        content = ([{"type": "image"}] if first else []) + [{"type": "text", "text": text}]
        return [*self.messages, {"role": "user", "content": content}]

    def ask(self, text: str) -> Iterator[str]:
        """Ask ``text``: yields the answer's text as it is generated; the turn and the whole answer
        join the conversation when the answer ends. Raises ValueError for an empty question, and for
        a question that with the conversation so far leaves no room below the model's ``max_length``
        (the conversation is kept as it was); re-raises any error of the generation."""
        if not text.strip():
            raise ValueError("the question is empty")
        messages = self._with_turn(text)
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        images = [self.image] if self.image is not None else None
        inputs = self.processor(images=images, text=prompt).to(self.model.device)
        prompt_tokens = inputs["input_ids"].shape[1]  # visual tokens included
        room = self.model.config.max_sequence_length - prompt_tokens
        if room < 1:
            raise ValueError(
                f"the conversation with this question is {prompt_tokens} tokens, the model takes "
                f"{self.model.config.max_sequence_length}: not asked (ask a shorter one, or /reset for a new "
                "conversation)"
            )
        generate_kwargs = {**self.generate_kwargs, "max_new_tokens": min(self.generate_kwargs["max_new_tokens"], room)}
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.no_grad():
                    self.model.generate(**inputs, streamer=streamer, **generate_kwargs)
            except BaseException as error:  # reported in the caller's thread below
                failure.append(error)
                streamer.end()

        thread = Thread(target=run, daemon=True)
        thread.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            yield piece
        thread.join()
        if failure:
            raise failure[0]
        self.messages = [*messages, {"role": "assistant", "content": "".join(pieces).strip()}]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mambavlm.chat", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path,
                        help="a saved MambaVLM (save_pretrained directory), or a training run's output_dir (its final/)")
    parser.add_argument("--image", type=Path, help="the picture to talk about (none: text only)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    args = parser.parse_args(argv)
    try:
        model_dir = resolve_model_dir(args.model)  # a run's output_dir -> its final/ (as eval/evaluate.py)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        image = open_image(args.image) if args.image else None
    except (OSError, ValueError) as error:  # as /image reports it
        print(f"error: cannot open {args.image}: {error}", file=sys.stderr)
        return 2
    try:
        model = MambaVLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype))
    except OSError as error:  # not a MambaVLM directory, a Hub id not found, ...
        print(f"error: {error}", file=sys.stderr)
        return 2
    model = model.to(args.device).eval()
    if model.tokenizer is None:
        print(f"error: {args.model} holds no tokenizer", file=sys.stderr)
        return 2
    session = ChatSession(
        model, image, args.max_new_tokens,
        do_sample=args.temperature > 0, temperature=args.temperature or 1.0, top_p=args.top_p,
    )
    interactive = sys.stdin.isatty()
    print(f"{model.config.name}: ask about {args.image or 'anything'} (/reset, /image FILE, /quit)", flush=True)
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return 0
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            session.reset(session.image)
            print("(new conversation)", flush=True)
            continue
        if text.startswith("/"):  # a command, never a question: a mistyped one is named, not asked
            command, _, rest = text.partition(" ")
            if command != "/image":
                print(f"unknown command {command}: /reset, /image FILE, /quit", flush=True)
            elif not rest.strip():
                print("usage: /image FILE", flush=True)
            else:
                path = Path(rest.strip())
                try:
                    session.reset(open_image(path))
                except (OSError, ValueError) as error:
                    print(f"error: cannot open {path}: {error}", flush=True)
                    continue
                print(f"(new conversation about {path})", flush=True)
            continue
        answer = session.ask(text)
        try:
            first = next(answer, "")  # a question that cannot be asked fails here, before "model> "
        except ValueError as error:
            print(f"error: {error}", flush=True)
            continue
        print(f"model> {first}", end="", flush=True)
        for piece in answer:
            print(piece, end="", flush=True)
        print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
