"""eval/run.py: answers written as batches finish, bad records named and counted, a killed run resumed
without repeats, two processes giving the one-process answers."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mambavlm.data.synthetic import make_shapes_vqa
from mambavlm.eval import runner
from tests.conftest import ROOT, subprocess_env, tiny_vlm

GOOD = 7


def run_script():
    spec = importlib.util.spec_from_file_location("eval_run", ROOT / "eval" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny model directory and a question file: 7 good questions and one of each kind of bad line."""
    root = tmp_path_factory.mktemp("bench")
    tiny_vlm().save_pretrained(root / "model")
    _, val = make_shapes_vqa(root / "data", 0, GOOD, image_size=32)
    lines = [
        json.dumps({"question_id": f"q{i}", "image": r["image"], "text": r["conversations"][0]["value"]})
        for i, r in enumerate(json.loads(val.read_text()))
    ]
    lines[3:3] = [
        "{not json",
        json.dumps({"question_id": "q0", "text": "again"}),
        json.dumps({"question_id": "q0#1", "text": "clash"}),
        json.dumps({"question_id": "long", "image": "missing.png", "text": "what ?"}),
        json.dumps({"question_id": "huge", "text": " ".join(["red"] * 300)}),
        json.dumps({"question_id": "num", "text": 5}),
        json.dumps({"question_id": "bad_image", "image": 3, "text": "what ?"}),
    ]
    (root / "data" / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return root / "model", root / "data" / "questions.jsonl"


def args(setup: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    model, questions = setup
    return ["--model", str(model), "--benchmark", "shapes", "--data", str(questions), "--output-dir", str(out),
            "--batch-size", "3", "--max-new-tokens", "4", *extra]


def answers(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]


def test_answers_in_order_with_every_bad_record_named(setup, tmp_path: Path) -> None:
    results = run_script()(args(setup, tmp_path / "one"))
    rows = answers(tmp_path / "one")
    # q0 occurs twice (as TextVQA's and MME's image ids do): both answered, as q0#0 and q0#1; a literal
    # q0#1 further down is then a repeat
    assert [r["question_id"] for r in rows] == ["q0#0", "q1", "q2", "q0#1"] + [f"q{i}" for i in range(3, GOOD)]
    assert {r["model_id"] for r in rows} == {"model"} and all(isinstance(r["text"], str) for r in rows)
    skipped = {r["question_id"]: r["reason"] for r in map(json.loads, (tmp_path / "one" / "skipped.jsonl").read_text().splitlines())}
    assert skipped.keys() == {"line 4", "q0#1", "long", "huge", "num", "bad_image"}
    assert "not JSON" in skipped["line 4"] and "repeated on line 6" in skipped["q0#1"]
    assert "image file not found" in skipped["long"] and "exceeds max_length" in skipped["huge"]
    assert "not a string" in skipped["num"] and "non-empty path string" in skipped["bad_image"]
    assert (results["num_questions"], results["num_answered"], results["num_skipped"]) == (GOOD + 7, GOOD + 1, 6)
    assert json.loads((tmp_path / "one" / "results.json").read_text()) == results


def test_a_killed_run_goes_on_from_the_answers_written(setup, tmp_path: Path, monkeypatch) -> None:
    whole = tmp_path / "whole"
    run_script()(args(setup, whole))
    out = tmp_path / "killed"
    real = runner.iter_answers

    def die_after_two_batches(*a, **k):
        for count, batch in enumerate(real(*a, **k)):
            if count == 2:
                raise KeyboardInterrupt("killed")
            yield batch

    monkeypatch.setattr(runner, "iter_answers", die_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        run_script()(args(setup, out))
    shard = out / "answers.0-of-1.jsonl"
    written = shard.read_text()
    shard.write_text(written + '{"question_id": "q6", "te')  # the kill also cut a line in half
    assert not (out / "answers.jsonl").exists()
    monkeypatch.setattr(runner, "iter_answers", real)
    run_script()(args(setup, out))
    assert answers(out) == answers(whole)
    assert len(written.splitlines()) >= 3  # two batches were kept, not answered again


@pytest.mark.slow
def test_two_processes_give_the_one_process_answers(setup, tmp_path: Path) -> None:
    run_script()(args(setup, tmp_path / "one"))
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(ROOT / "eval" / "run.py"), *args(setup, tmp_path / "two")]
    env = subprocess_env(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two").glob("answers.*-of-2.jsonl")) == [
        "answers.0-of-2.jsonl", "answers.1-of-2.jsonl"]
    assert answers(tmp_path / "two") == answers(tmp_path / "one")
