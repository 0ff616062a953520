"""eval/run.py: answers written as batches finish, bad records named and counted, a killed run resumed
without repeats, two processes giving the one-process answers."""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import logging
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
    return ["--model", str(model), "--benchmark", "shapes", "--custom-benchmark", "--data", str(questions),
            "--output-dir", str(out), "--batch-size", "3", "--max-new-tokens", "4", *extra]


def answers(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "answers.jsonl").read_text().splitlines()]


def test_answers_in_order_with_every_bad_record_named(setup, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.WARNING)
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
    # each is named in the log too, the file's own problems (a fresh user saw only the questions') with them
    for question_id, reason in skipped.items():
        assert f"skipping {question_id}: {reason}" in caplog.text
    assert (results["num_questions"], results["num_answered"], results["num_skipped"]) == (GOOD + 7, GOOD + 1, 6)
    assert json.loads((tmp_path / "one" / "results.json").read_text()) == results


def test_a_killed_run_goes_on_from_the_answers_written(setup, tmp_path: Path, monkeypatch, capsys) -> None:
    """Ctrl-C after two batches: exit 130 with one line saying where the answers are kept (it was a
    KeyboardInterrupt traceback through generate), then the same command goes on from them."""
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
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_script()(args(setup, out))
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        f": interrupted: the answers written so far are kept in {out}; the same command run again goes on from them")
    shard = out / "answers.0-of-1.jsonl"
    written = shard.read_text()
    shard.write_text(written + '{"question_id": "q6", "te')  # the kill also cut a line in half
    assert not (out / "answers.jsonl").exists()
    monkeypatch.setattr(runner, "iter_answers", real)
    run_script()(args(setup, out))
    assert answers(out) == answers(whole)
    assert len(written.splitlines()) >= 3  # two batches were kept, not answered again


def test_a_run_killed_before_its_results_leaves_no_earlier_results_beside_its_answers(
    setup, tmp_path: Path, monkeypatch
) -> None:
    """A complete run of 3 questions, then the whole file, killed as results.json is about to be written:
    the earlier results.json (3 answered) must not stay beside the new answers.jsonl (8); the same command
    run again writes the whole set."""
    out = tmp_path / "out"
    run_script()(args(setup, out, "--limit", "3"))
    assert json.loads((out / "results.json").read_text())["num_answered"] == 3
    real = runner.atomic_file

    def killed_at_results(path, *a, **k):
        if Path(path).name == "results.json":
            raise KeyboardInterrupt("killed")
        return real(path, *a, **k)

    monkeypatch.setattr(runner, "atomic_file", killed_at_results)
    with pytest.raises(SystemExit):
        run_script()(args(setup, out))
    assert len(answers(out)) == GOOD + 1 and not (out / "results.json").exists()
    monkeypatch.setattr(runner, "atomic_file", real)
    results = run_script()(args(setup, out))
    assert results["num_answered"] == GOOD + 1 == len(answers(out))
    assert json.loads((out / "results.json").read_text()) == results


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


def _settings_args(model: Path, questions: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--benchmark", "shapes", "--custom-benchmark", "--data", str(questions),
            "--output-dir", str(out), *extra]


def test_the_settings_of_a_run_are_recorded_next_to_its_answers(setup, tmp_path: Path) -> None:
    model, questions = setup
    run_script()(args(setup, tmp_path / "out"))
    recorded = json.loads((tmp_path / "out" / "run_settings.json").read_text())
    assert recorded == {
        "model": str(model.resolve()),
        "benchmark": "shapes",
        "questions": str(questions.resolve()),
        "questions_sha256": hashlib.sha256(questions.read_bytes()).hexdigest(),
        "image_folder": str(questions.parent.resolve()),  # no --image-folder: the JSONL's folder
        "mode": "generate",
        "max_new_tokens": 4,
        "options": None,
    }
    assert not list((tmp_path / "out").glob(".tmp-*"))  # written atomically: no temporary file left


def test_a_resume_with_other_settings_is_refused_naming_each_difference(setup, tmp_path: Path, capsys) -> None:
    model, questions = setup
    other = tmp_path / "other-model"
    tiny_vlm().save_pretrained(other)
    out = tmp_path / "out"
    first = run_script()(_settings_args(model, questions, out, "--max-new-tokens", "4"))
    answered = (out / "answers.jsonl").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_script()(_settings_args(other, questions, out, "--max-new-tokens", "8"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    # 8 answered (the skipped ones bind nothing: a resume retries them); the two settings that
    # differ, old value then new, in the order of run_settings.json, and nothing else
    assert f"{out} holds 8 questions answered with other settings ({out / 'run_settings.json'}):" in err
    differences = [line for line in err.splitlines() if line.startswith("  ") and line.endswith(" now")]
    assert differences == [
        f"  model: '{model.resolve()}' before, '{other.resolve()}' now",
        "  max_new_tokens: 4 before, 8 now",
    ]
    assert f"Pass another --output-dir, or delete {out} to answer again with these settings." in err
    # nothing was answered or written in the old run's name
    assert (out / "answers.jsonl").read_text() == answered
    assert json.loads((out / "results.json").read_text()) == first
    assert json.loads((out / "run_settings.json").read_text())["max_new_tokens"] == 4


def test_a_resume_with_an_edited_question_file_is_refused(setup, tmp_path: Path, capsys) -> None:
    model, questions = setup
    edited = tmp_path / "questions.jsonl"
    edited.write_text(questions.read_text())
    out = tmp_path / "out"
    run_script()(_settings_args(model, edited, out, "--image-folder", str(questions.parent), "--limit", "2"))
    before = hashlib.sha256(edited.read_bytes()).hexdigest()
    edited.write_text(questions.read_text().replace("?", " ?", 1))  # one prompt changed in place
    after = hashlib.sha256(edited.read_bytes()).hexdigest()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_script()(_settings_args(model, edited, out, "--image-folder", str(questions.parent)))
    err = capsys.readouterr().err
    assert f"  questions_sha256: '{before}' before, '{after}' now\n" in err and "model:" not in err


def test_a_resume_with_the_same_settings_may_change_batch_size_and_limit(setup, tmp_path: Path, caplog) -> None:
    model, questions = setup
    out = tmp_path / "out"
    run_script()(_settings_args(model, questions, out, "--max-new-tokens", "4", "--batch-size", "3", "--limit", "2"))
    whole = tmp_path / "whole"
    run_script()(_settings_args(model, questions, whole, "--max-new-tokens", "4", "--batch-size", "3"))
    with caplog.at_level("INFO"):
        run_script()(_settings_args(model, questions, out, "--max-new-tokens", "4", "--batch-size", "2"))
    # 11 questions are read (8 answerable + long, huge, num, skipped when answered; the other 3 bad lines
    # are reported when read); --limit 2 answered q0#0 and q1, so 11 - 2 = 9 are left for this run
    assert "9 of 11 questions to answer (2 answered before, kept; 0 of these skipped before, retried)" in caplog.text
    assert answers(out) == answers(whole)


def test_an_output_folder_without_recorded_settings_is_checked_by_model_name(setup, tmp_path: Path, capsys) -> None:
    # A folder written before the settings were recorded: the same model goes on (with a warning),
    # another model (its folder's name is the rows' model_id) is refused.
    model, questions = setup
    other = tmp_path / "other-model"
    tiny_vlm().save_pretrained(other)
    out = tmp_path / "out"
    run_script()(_settings_args(model, questions, out, "--limit", "2"))
    (out / "run_settings.json").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_script()(_settings_args(other, questions, out))
    assert f"{out} holds answers of another model (model, not other-model)" in capsys.readouterr().err
    results = run_script()(_settings_args(model, questions, out))
    assert results["num_answered"] == GOOD + 1
    assert json.loads((out / "run_settings.json").read_text())["model"] == str(model.resolve())


@pytest.mark.parametrize(
    ("benchmark", "extra", "message"),
    [
        ("popee", [], "unknown benchmark 'popee' (did you mean 'pope'?); expected one of vqav2, textvqa, vizwiz, "
                     "gqa, pope, scienceqa, mme, mmbench, seedbench, mmmu, tallyqa, vsr (or pass --custom-benchmark"),
        ("shapes", [], "unknown benchmark 'shapes'; expected one of vqav2, "),
        ("popee", ["--mode", "likelihood"], "unknown benchmark 'popee' (did you mean 'pope'?)"),
        ("pope", ["--custom-benchmark"], "'pope' is a known benchmark; drop --custom-benchmark"),
    ],
)
def test_an_unknown_benchmark_is_an_error_listing_the_known_names(
    setup, tmp_path: Path, capsys, benchmark: str, extra: list[str], message: str
) -> None:
    model, questions = setup
    argv = ["--model", str(model), "--benchmark", benchmark, "--data", str(questions),
            "--output-dir", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit) as exit_info:
        run_script()(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was answered or written


def test_a_custom_benchmark_is_answered_unscored(setup, tmp_path: Path) -> None:
    results = run_script()(args(setup, tmp_path / "out"))
    assert results["benchmark"] == "shapes" and results["baseline_prompt"] is None and "scores" not in results
    assert results["num_answered"] == GOOD + 1


def test_help_shows_the_whole_description() -> None:
    helps = {}
    for script in ("eval/run.py", "train/distill.py"):
        result = subprocess.run([sys.executable, str(ROOT / script), "--help"], cwd=ROOT, env=subprocess_env(),
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        # the module docstring, line for line (RawDescriptionHelpFormatter): its last sentence included
        module_doc = ast.get_docstring(ast.parse((ROOT / script).read_text()), clean=False)
        assert module_doc.strip() in result.stdout
        helps[script] = result.stdout
    run_help = helps["eval/run.py"]
    assert "[--annotations FILE [--annotation-questions FILE] [--split-file FILE]]``.\n" in run_help
    assert "pass another --output-dir, or delete the old one.\n" in run_help


def test_a_runs_output_dir_is_its_model(setup, tmp_path: Path, capsys) -> None:
    """--model takes a training run's output_dir as eval/evaluate.py does (its final/, a distillation's
    student/; a fresh user found only evaluate.py did); a LoRA run's dir is refused naming the merge."""
    model, questions = setup
    run = tmp_path / "run"
    run.mkdir()
    (run / "final").symlink_to(model, target_is_directory=True)
    run_script()(["--model", str(run), *args(setup, tmp_path / "out")[2:]])
    recorded = json.loads((tmp_path / "out" / "run_settings.json").read_text())
    assert recorded["model"] == str((run / "final").resolve())
    lora = tmp_path / "lora-run"
    (lora / "final_adapter").mkdir(parents=True)
    (lora / "train_config.yaml").write_text("output_dir: x\n")
    with pytest.raises(SystemExit) as exit_info:
        run_script()(["--model", str(lora), *args(setup, tmp_path / "out2")[2:]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "LoRA adapter (final_adapter/): merge it first" in err and "Traceback" not in err


def test_the_default_output_folder_is_per_model_and_benchmark(setup, tmp_path: Path, monkeypatch) -> None:
    """Without --output-dir: outputs/eval/<model>/<benchmark>/, the model named as eval/evaluate.py names it
    (a run's directory for its final/), so a second model's answers to a benchmark do not meet the first's
    settings (outputs/eval/<benchmark>/ refused the second model: a fresh user's report)."""
    model, _ = setup
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "my-run"
    run.mkdir()
    (run / "final").symlink_to(model, target_is_directory=True)
    for given in (run, model):
        run_script()(["--model", str(given), "--benchmark", "shapes", "--custom-benchmark", "--data",
                      str(setup[1]), "--limit", "1", "--max-new-tokens", "2"])
    written = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "outputs").rglob("answers.jsonl"))
    assert written == ["outputs/eval/model/shapes/answers.jsonl", "outputs/eval/my-run/shapes/answers.jsonl"]


def test_answers_give_each_question_id_as_the_question_file_does(setup, tmp_path: Path) -> None:
    """Integer ids come back as integers and string ids as strings (LLaVA's ``model_vqa_loader`` copies
    the id, and its VQAv2 submission script matches answers to the test split's integer ids); a repeated
    id's answers keep their ``ID#n`` keys; skipped questions give their ids the same way."""
    model, questions = setup
    rows = [json.loads(line) for line in questions.read_text().splitlines() if line.startswith("{\"")]
    good = [r for r in rows if str(r["question_id"]).startswith("q") and r["question_id"] != "q0#1"][:4]
    lines = [{**good[0], "question_id": 262148000}, {**good[1], "question_id": "262148001"},
             {**good[2], "question_id": 7}, {**good[3], "question_id": 7},
             {"question_id": 9, "image": "missing.png", "text": "what ?"}]
    path = tmp_path / "ints.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    run_script()(["--model", str(model), "--benchmark", "shapes", "--custom-benchmark", "--data", str(path),
                  "--image-folder", str(questions.parent), "--output-dir", str(tmp_path / "out"),
                  "--batch-size", "2", "--max-new-tokens", "2"])
    assert [r["question_id"] for r in answers(tmp_path / "out")] == [262148000, "262148001", "7#0", "7#1"]
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in skipped] == [9]


def _image_rows(setup: tuple[Path, Path]) -> list[dict]:
    """The setup's questions whose image is on disk (q0 ... q6), as question-file rows."""
    _, questions = setup
    rows = [json.loads(line) for line in questions.read_text().splitlines() if line.startswith('{"')]
    return [r for r in rows if isinstance(r.get("image"), str) and (questions.parent / r["image"]).is_file()]


def _copy_image(setup: tuple[Path, Path], row: dict, folder: Path) -> None:
    target = folder / row["image"]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes((setup[1].parent / row["image"]).read_bytes())


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


def test_a_resume_retries_the_questions_skipped_before(setup, tmp_path: Path, caplog) -> None:
    """Questions skipped for a missing image are answered once the image is there (a new user copied the
    images in and ran the same command: it answered nothing); answered ones are kept, and one still
    failing is skipped again and counted once."""
    model, _ = setup
    rows = _image_rows(setup)[:3] + [{"question_id": "never", "image": "never.png", "text": "what ?"}]
    images = tmp_path / "images"
    for row in rows[:2]:
        _copy_image(setup, row, images)
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    argv = ["--model", str(model), "--benchmark", "shapes", "--custom-benchmark", "--data", str(path),
            "--image-folder", str(images), "--output-dir", str(out), "--max-new-tokens", "2"]
    first = run_script()(argv)
    assert (first["num_answered"], first["num_skipped"]) == (2, 2)
    assert first["skipped_by_reason"] == {"image file not found": 2}
    kept = answers(out)
    _copy_image(setup, rows[2], images)
    caplog.clear()
    with caplog.at_level("INFO"):
        second = run_script()(argv)
    assert "2 of 4 questions to answer (2 answered before, kept; 2 of these skipped before, retried)" in caplog.text
    assert (second["num_answered"], second["num_skipped"], second["num_missing"]) == (3, 1, 0)
    assert answers(out)[:2] == kept and answers(out)[2]["question_id"] == rows[2]["question_id"]
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in skipped] == ["never"] and "image file not found" in skipped[0]["reason"]
    third = run_script()(argv)  # retried again, still skipped: listed and counted once
    assert (third["num_answered"], third["num_skipped"], third["skipped_by_reason"]) == (3, 1, {"image file not found": 1})
    assert len((out / "skipped.jsonl").read_text().splitlines()) == 1


def test_a_run_that_answers_nothing_exits_1_naming_the_first_reasons(
    setup, tmp_path: Path, capsys, caplog, monkeypatch
) -> None:
    """A wrong --image-folder: status 1, the count and the first reasons, a hint at --image-folder, and no
    results.json with a score over zero answers; run again with the right folder, it is not refused. No
    question's image exists, so that is said in one warning and the model is not loaded (it had been, then a
    warning for every question)."""
    import mambavlm.eval.runner as runner

    model, questions = setup
    rows = _image_rows(setup)[:4]
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    argv = ["--model", str(model), "--benchmark", "shapes", "--custom-benchmark", "--data", str(path),
            "--output-dir", str(out), "--max-new-tokens", "2"]
    capsys.readouterr()

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    with monkeypatch.context() as patch, caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as exit_info:
        patch.setattr(runner.MambaVLM, "from_pretrained", no_loading)
        run_script()([*argv, "--image-folder", str(tmp_path / "wrong")])
    assert exit_info.value.code == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "none of the 4 questions' images can be opened (q0: image file not found: " in warned[0]
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1, errors
    assert "no question answered: all 4 skipped (q0: image file not found: " in errors[0]
    assert "; and 1 more; each listed in " in errors[0] and "is --image-folder right?" in errors[0]
    assert not (out / "results.json").exists() and not (out / "answers.jsonl").exists()
    assert len((out / "skipped.jsonl").read_text().splitlines()) == 4
    results = run_script()([*argv, "--image-folder", str(questions.parent)])
    assert (results["num_answered"], results["num_skipped"]) == (4, 0)


@pytest.mark.parametrize("wrong", ["data", "output-dir"])
def test_a_folder_as_data_or_a_file_as_output_dir_is_a_one_line_error(setup, tmp_path: Path, capsys, wrong: str) -> None:
    """--data the benchmark's folder rather than its JSONL, or --output-dir an existing file: a
    FileNotFoundError / FileExistsError traceback (after the model was resolved)."""
    model, questions = setup
    out = tmp_path / "out.json"
    out.write_text("{}")
    data = questions.parent if wrong == "data" else questions
    argv = ["--model", str(model), "--benchmark", "shapes", "--custom-benchmark", "--data", str(data),
            "--output-dir", str(out if wrong == "output-dir" else tmp_path / "out")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_script()(argv)
    assert exit_info.value.code == 2
    errors = _error_lines(capsys.readouterr().err)
    expected = (f"--data {data} is a folder, not a question JSONL" if wrong == "data"
                else f"--output-dir {out} is a file, not a folder")
    assert len(errors) == 1 and errors[0].endswith(f"error: {expected}"), errors
    assert out.read_text() == "{}" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("pretty", ["array", "object"])
def test_a_json_file_given_as_the_question_jsonl_is_refused(setup, tmp_path: Path, capsys, pretty: str) -> None:
    """A LLaVA training JSON (one pretty-printed array) is not counted line by line as skipped questions."""
    model, questions = setup
    records = json.loads((questions.parent / "val.json").read_text())
    path = tmp_path / "val.json"
    path.write_text(json.dumps(records if pretty == "array" else {"questions": records}, indent=2))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_script()(["--model", str(model), "--benchmark", "shapes", "--custom-benchmark", "--data", str(path),
                      "--image-folder", str(questions.parent), "--output-dir", str(out)])
    assert exit_info.value.code == 2
    errors = _error_lines(capsys.readouterr().err)
    assert len(errors) == 1, errors
    expected = (f"{path} is a JSON array of {GOOD} records (a LLaVA training JSON?), not JSONL" if pretty == "array"
                else f"{path} is one JSON object over ")
    assert expected in errors[0] and "one question object per line" in errors[0]
    assert not out.exists()  # refused before anything was answered or written


@pytest.mark.parametrize(
    ("content", "problem"),
    [(b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not UTF-8 text (invalid start byte at byte 0)"),
     (b"[1, 2]", "JSON list, not an object"),
     (b'{"model": ', "not valid JSON (Expecting value: line 1 column 11)")],
)
def test_an_unreadable_settings_file_is_a_one_line_error(setup, tmp_path: Path, capsys, content: bytes, problem: str) -> None:
    model, questions = setup
    out = tmp_path / "out"
    run_script()(_settings_args(model, questions, out, "--limit", "1"))
    (out / "run_settings.json").write_bytes(content)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_script()(_settings_args(model, questions, out))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = _error_lines(err)
    assert len(errors) == 1, errors
    assert f"{out / 'run_settings.json'} is not a JSON object of settings: {problem}; cannot tell" in errors[0]
    assert (out / "run_settings.json").read_bytes() == content  # left for the user to look at


def test_read_json_object(tmp_path: Path) -> None:
    path = tmp_path / "settings.json"
    with pytest.raises(FileNotFoundError):
        runner.read_json_object(path)
    path.write_text('{"a": 1}')
    assert runner.read_json_object(path) == {"a": 1}
    path.write_text("null")
    with pytest.raises(runner.RecordFileError, match=r"settings.json is not a JSON object of results: JSON null"):
        runner.read_json_object(path, "results")


def test_a_question_without_text_is_skipped_naming_the_field(tmp_path: Path) -> None:
    """A line with no ``text`` is reported as such when the file is read (it was answered as "the question
    is a NoneType, not a string"); the others are read."""
    from mambavlm.eval.questions import read_questions

    questions_file = tmp_path / "q.jsonl"
    questions_file.write_text(json.dumps({"question_id": 1, "text": "a?"}) + "\n" + json.dumps({"question_id": 2}) + "\n")
    questions, problems = read_questions(questions_file)
    assert [q.question_id for q in questions] == ["1"]
    assert problems == [("2", "no 'text' (the question to ask) on line 2")]


def test_a_runs_model_is_answered_under_the_runs_name(setup, tmp_path: Path) -> None:
    """--model RUN (a fine-tuning run's output_dir): the answers' model_id is RUN's name, as the default
    output path names it, not ``final`` (the folder the model sits in)."""
    _, questions = setup
    run = tmp_path / "tiny-run"
    tiny_vlm().save_pretrained(run / "final")
    (run / "train_config.yaml").write_text("{}\n")
    out = tmp_path / "out"
    run_script()(["--model", str(run), "--benchmark", "shapes", "--custom-benchmark", "--data", str(questions),
                  "--output-dir", str(out), "--limit", "2", "--max-new-tokens", "2"])
    assert {r["model_id"] for r in answers(out)} == {"tiny-run"}
