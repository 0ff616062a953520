"""The chat: a conversation's turns give what the model answers to the same text built another way
(the Python conversation template + ``generate_ids``), streamed; the command line drives it."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mambavlm.chat import ChatSession
from mambavlm.llm.tokenizer import tokenize_prompt
from tests.conftest import ROOT, subprocess_env, tiny_vlm

pytestmark = pytest.mark.usefixtures("on_cpu")


def greedy(model, text: str, image: Image.Image | None, new: int) -> str:
    """What the model answers to prompt text ``text``: tokenised by hand, decoded greedily."""
    ids = torch.tensor([tokenize_prompt(text, model.tokenizer, model.num_visual_tokens, model.add_bos)])
    pixels = None if image is None else model.preprocess_images([image])
    out = model.generate_ids(ids, torch.ones_like(ids), pixels, fast=False, max_new_tokens=new, do_sample=False)
    return model.tokenizer.decode(out[0], skip_special_tokens=True).strip()


def test_turns_follow_the_conversation_template_and_stream_the_greedy_answer() -> None:
    model = tiny_vlm()
    image = Image.new("RGB", (40, 30), (230, 30, 30))
    session = ChatSession(model, image, max_new_tokens=5)
    first = list(session.ask("what colour is it ?"))
    assert len(first) >= 1
    answer1 = "".join(first).strip()
    assert [answer1] == model.answer([image], ["what colour is it ?"], max_new_tokens=5, fast=False)
    eos = model.tokenizer.eos_token
    expected_prompt = model.template.prompt("and now ?", eos, history=[("<image>\nwhat colour is it ?", answer1)])
    assert session.prompt("and now ?") == expected_prompt
    answer2 = "".join(session.ask("and now ?")).strip()
    assert answer2 == greedy(model, expected_prompt, image, 5)
    assert [m["role"] for m in session.messages] == ["user", "assistant", "user", "assistant"]
    session.reset(None)
    assert session.prompt("hello") == model.template.prompt("hello", eos)
    with pytest.raises(ValueError, match="empty"):
        list(session.ask("  "))


def test_command_line_chat_answers_each_line_and_resets(tmp_path: Path) -> None:
    model = tiny_vlm()
    model.save_pretrained(tmp_path / "model")
    image = Image.new("RGB", (40, 30), (30, 30, 230))
    image.save(tmp_path / "blue.png")
    lines = ("what colour is it ?\nand now ?\n/reset\nwhat colour is it ?\n/image missing.png\n/image\n/imag x.png\n"
             "/quit\n")
    result = subprocess.run(
        [sys.executable, "-m", "mambavlm.chat", "--model", str(tmp_path / "model"), "--image",
         str(tmp_path / "blue.png"), "--max-new-tokens", "5", "--device", "cpu"],
        input=lines, capture_output=True, text=True, cwd=ROOT, env=subprocess_env(), timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    answers = [line.removeprefix("model> ").strip() for line in result.stdout.splitlines() if line.startswith("model> ")]
    expected = model.answer([image], ["what colour is it ?"], max_new_tokens=5, fast=False)[0]
    assert len(answers) == 3 and answers[0] == expected and answers[2] == expected  # /reset forgot turn 1
    assert "(new conversation)" in result.stdout and "error: cannot open missing.png" in result.stdout
    # a mistyped command is named, never asked as a question (a fresh user got three answers to them)
    assert "usage: /image FILE" in result.stdout and "unknown command /imag: /reset" in result.stdout


def test_answers_are_cut_at_the_models_max_length_and_a_full_conversation_is_refused() -> None:
    """The default max_new_tokens (256) is the tiny model's whole max_length: every turn failed with
    "sequence too long". An answer now takes the room left: prompt + answer <= max_length."""
    model = tiny_vlm("max_length=64", "llm.config.vocab_size=1024")
    image = Image.new("RGB", (40, 30), (230, 30, 30))
    session = ChatSession(model, image)  # max_new_tokens 256 > max_length
    prompt = session.prompt("what colour is it ?")
    prompt_tokens = len(tokenize_prompt(prompt, model.tokenizer, model.num_visual_tokens, model.add_bos))
    session.generate_kwargs["eos_token_id"] = None  # nothing ends the answer early: it stops at the room left
    answer = "".join(session.ask("what colour is it ?")).strip()
    ids = torch.tensor([tokenize_prompt(prompt, model.tokenizer, model.num_visual_tokens, model.add_bos)])
    out = model.generate_ids(ids, torch.ones_like(ids), model.preprocess_images([image]), fast=False,
                             max_new_tokens=64 - prompt_tokens, do_sample=False, eos_token_id=None)
    assert out.shape[1] == 64 - prompt_tokens > 0
    assert answer == model.tokenizer.decode(out[0], skip_special_tokens=True).strip()
    history = list(session.messages)
    with pytest.raises(ValueError, match=r"not asked \(ask a shorter one, or /reset"):
        list(session.ask("and now ?"))
    assert session.messages == history  # the conversation as it was


def chat(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str, lines: str = "/quit\n"):
    """``python -m mambavlm.chat ARGS`` in this process, ``lines`` typed: (exit status, stdout, stderr)."""
    from mambavlm.chat import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    capsys.readouterr()  # what came before (save_pretrained's progress bar)
    status = main([*args, "--max-new-tokens", "3", "--device", "cpu"])
    out, err = capsys.readouterr()
    return status, out, err


def test_a_training_runs_output_directory_chats_with_its_final_model(tmp_path, monkeypatch, capsys) -> None:
    """A fresh user's ``--model outputs/tiny`` (a run's output_dir) ended in "is not a MambaVLM directory";
    eval/evaluate.py takes it, and so does the chat now: its final/ is the model."""
    model = tiny_vlm()
    model.save_pretrained(tmp_path / "run" / "final")
    status, out, err = chat(monkeypatch, capsys, "--model", str(tmp_path / "run"), lines="hello\n/quit\n")
    assert status == 0, err
    answer = next(line for line in out.splitlines() if line.startswith("model> ")).removeprefix("model> ").strip()
    assert answer == greedy(model, ChatSession(model).prompt("hello"), None, 3)


def test_a_directory_that_is_no_model_and_no_run_is_one_error_line(tmp_path, monkeypatch, capsys) -> None:
    """It ended in a traceback; now one ``error:`` line and exit status 2 (as mambavlm.describe)."""
    (tmp_path / "empty").mkdir()
    status, out, err = chat(monkeypatch, capsys, "--model", str(tmp_path / "empty"))
    assert status == 2 and out == ""
    assert err == (f"error: --model {tmp_path / 'empty'} is not a MambaVLM directory: it holds neither a model of its "
                   "own nor a run's final/ (fine-tuning) or student/ (distillation)\n")
    status, _, err = chat(monkeypatch, capsys, "--model", str(tmp_path / "missing"))
    assert (status, err) == (2, f"error: --model {tmp_path / 'missing'}: no such directory\n")


def test_a_missing_image_at_start_is_the_error_line_that_slash_image_prints(tmp_path, monkeypatch, capsys) -> None:
    """``--image nope.png`` ended in a traceback; ``/image nope.png`` in the session printed an
    ``error: cannot open`` line: now the start does too (on stderr), with exit status 2."""
    tiny_vlm().save_pretrained(tmp_path / "model")
    missing = tmp_path / "nope.png"
    status, out, err = chat(monkeypatch, capsys, "--model", str(tmp_path / "model"), "--image", str(missing))
    assert status == 2 and out == ""
    assert err == f"error: cannot open {missing}: image file not found: {missing}\n"
