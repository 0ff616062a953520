"""eval/evaluate.py as a new user meets it: a distillation run's output_dir as --model, a local path
that does not exist, malformed and unanswerable records named, skipped and listed, and where the
answers go by default."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
from pathlib import Path

import pytest

from mambavlm.data.synthetic import make_shapes_vqa
from mambavlm.model import MambaVLM, missing_local_path
from tests.conftest import ROOT, tiny_vlm

GOOD = 3
BAD = {
    "no_answer": "expected a human turn then an assistant turn",
    "missing_image": "image file not found",
    "too_long": "exceeds max_length",
    "2": "a str, not a record",  # all_bad's third entry, named by its index
}


def load_script():
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "eval" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def evaluate():
    return load_script()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """(a distillation run's output_dir: config.yaml + student/; the val JSON of 3 good records; the
    same with a missing image and an over-long prompt among them; and with a record without an answer
    and an entry that is not a record too)."""
    root = tmp_path_factory.mktemp("evaluate_cli")
    run = root / "distill-tiny"
    tiny_vlm().save_pretrained(run / "student")
    (run / "config.yaml").write_text("output_dir: distill-tiny\n")  # what train/distill.py copies there
    _, val = make_shapes_vqa(root / "data", 0, GOOD, image_size=32)
    records = json.loads(val.read_text())
    unanswerable = [
        {"id": "missing_image", "image": "images/nope.png",
         "conversations": [{"from": "human", "value": "<image>\nwhat ?"}, {"from": "gpt", "value": "red"}]},
        {"id": "too_long",
         "conversations": [{"from": "human", "value": " ".join(["red"] * 300)}, {"from": "gpt", "value": "red"}]},
    ]
    malformed = {"id": "no_answer", "image": records[0]["image"],
                 "conversations": [{"from": "human", "value": "<image>\nwhat color is it ?"}]}
    some_bad = root / "data" / "some_bad.json"
    some_bad.write_text(json.dumps(records[:1] + unanswerable + records[1:]))
    all_bad = root / "data" / "all_bad.json"
    all_bad.write_text(json.dumps(records[:1] + [malformed, "oops"] + unanswerable + records[1:]))
    return run, val, some_bad, all_bad


def run_args(model: Path | str, data: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--batch-size", "4", "--max-new-tokens", "2",
            "--device", "cpu", *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- 1: a distillation run's output_dir ---------------------------------------------------------------


def test_a_distillation_output_dir_resolves_to_its_student(evaluate, setup, tmp_path):
    run, val, _, _ = setup
    assert evaluate.resolve_model_dir(run) == run / "student"
    assert evaluate.resolve_model_dir(str(run / "student")) == run / "student"
    finetune = tmp_path / "finetune"  # a fine-tuning run: its model under final/, as before
    finetune.mkdir()
    (finetune / "final").symlink_to(run / "student", target_is_directory=True)
    assert evaluate.resolve_model_dir(finetune) == finetune / "final"
    lora = tmp_path / "tiny-lora"  # a LoRA run: its adapter named with the merge to run, then merged/
    (lora / "final_adapter").mkdir(parents=True)
    (lora / "final_adapter" / "adapter_config.json").write_text("{}")
    (lora / "train_config.yaml").write_text("output_dir: x\n")
    merge = f"python train/merge_lora.py {lora / 'final_adapter'} --out {lora / 'merged'}"
    for given in (lora, lora / "final_adapter"):
        with pytest.raises(FileNotFoundError, match="merge it first with " + re.escape(merge)):
            evaluate.resolve_model_dir(given)
    (lora / "merged").symlink_to(run / "student", target_is_directory=True)
    assert evaluate.resolve_model_dir(lora) == lora / "merged"

    out = tmp_path / "answers.jsonl"
    accuracy = evaluate.main(run_args(run, val, "--out", str(out)))
    assert accuracy is not None and len(read_jsonl(out)) == GOOD


def test_a_run_dir_without_a_model_is_a_clear_error(evaluate, setup, tmp_path, capsys):
    _, val, _, _ = setup
    unfinished = tmp_path / "distill-unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("output_dir: x\n")
    with pytest.raises(FileNotFoundError, match=r"distill-unfinished .*final/.*student/"):
        evaluate.resolve_model_dir(unfinished)
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(run_args(unfinished, val))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "distill-unfinished" in error and "student/" in error and "vision_projector" not in error
    # from_pretrained itself, given the run dir, points at the model inside it
    with pytest.raises(FileNotFoundError, match=r"its model is .*student"):
        MambaVLM.from_pretrained(setup[0])


def test_a_data_file_that_is_not_a_json_list_of_records_is_one_usage_error(evaluate, setup, tmp_path, capsys):
    """A metrics JSON (a dict), a truncated JSON and a question JSONL each gave a traceback: now one
    ``error:`` line naming the file and what it is, exit status 2, before the model loads."""
    run, _, _, _ = setup
    as_dict = tmp_path / "metrics.json"
    as_dict.write_text('{"val_accuracy": 0.5}')
    truncated = tmp_path / "truncated.json"
    truncated.write_text('[{"id": "a", "conversations": [')
    jsonl = tmp_path / "questions.jsonl"
    jsonl.write_text('{"question_id": 1, "text": "what?"}\n{"question_id": 2, "text": "and?"}\n')
    for data, message in [
        (as_dict, f"error: --data: {as_dict}: expected a list of record dicts, got a JSON dict\n"),
        (truncated, f"error: --data: {truncated}: not a JSON file of LLaVA records (Expecting value: line 1 "
                    "column 32 (char 31))\n"),
        (jsonl, f"error: --data: {jsonl}: a JSON Lines file (one object per line), not the JSON list of LLaVA "
                "records this takes\n"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(run_args(run, data, "--output-dir", str(tmp_path / "out")))
        assert exit_info.value.code == 2
        assert capsys.readouterr().err.endswith(message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("wrong", ["--data", "--output-dir", "--out"])
def test_a_folder_for_a_file_or_a_file_for_a_folder_is_one_usage_error(evaluate, setup, tmp_path, capsys, wrong):
    """--data the data folder was said not to exist; --output-dir an existing file, or --out an existing
    folder, answered every record and then ended in a FileExistsError / IsADirectoryError traceback."""
    run, val, _, _ = setup
    a_file = tmp_path / "notes.txt"
    a_file.write_text("kept")
    extra = {"--data": ["--output-dir", str(tmp_path / "out")], "--output-dir": ["--output-dir", str(a_file)],
             "--out": ["--out", str(tmp_path)]}[wrong]
    expected = {"--data": f"--data {val.parent} is a folder, not a LLaVA-format JSON",
                "--output-dir": f"--output-dir {a_file} is a file, not a folder",
                "--out": f"--out {tmp_path} is a folder, not a file"}[wrong]
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(run_args(run, val.parent if wrong == "--data" else val, *extra))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: {expected}\n")
    assert a_file.read_text() == "kept" and not (tmp_path / "out").exists()


# --- 2: a local path that does not exist ----------------------------------------------------------------


def test_a_missing_local_path_is_file_not_found_not_a_hub_lookup(evaluate, setup, tmp_path, monkeypatch, capsys):
    _, val, _, _ = setup
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for name in ("outputs/nope", "./nope", "../nope", str(tmp_path / "nope"), "~/surely-not-here-xyz", "a/b/c"):
        assert missing_local_path(name), name
        with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
            evaluate.resolve_model_dir(name)
        with pytest.raises(FileNotFoundError, match=name.replace(".", r"\.")):
            MambaVLM.from_pretrained(name)
    with pytest.raises(SystemExit):
        evaluate.main(run_args("outputs/nope", val))
    assert "outputs/nope" in capsys.readouterr().err
    # Hub ids are left to the Hub (nothing fetched here: resolution only)
    for hub_id in ("org/name", "name"):
        assert not missing_local_path(hub_id)
        assert evaluate.resolve_model_dir(hub_id) == Path(hub_id)


# --- 3, 4: records that cannot be answered ------------------------------------------------------------


def test_a_malformed_record_is_named_and_skipped_and_the_rest_answered(evaluate, setup, tmp_path, caplog):
    run, _, _, all_bad = setup
    out = tmp_path / "answers.jsonl"
    with caplog.at_level(logging.WARNING):
        accuracy = evaluate.main(run_args(run / "student", all_bad, "--out", str(out)))
    assert accuracy is not None
    assert [row["id"] for row in read_jsonl(out)] == [f"val_{i:06d}" for i in range(GOOD)]
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    for record_id, reason in BAD.items():
        assert any(record_id in message and reason in message for message in warnings), (record_id, warnings)
    skipped = read_jsonl(tmp_path / "answers.skipped.jsonl")
    assert [row["id"] for row in skipped] == ["no_answer", "2", "missing_image", "too_long"]


def test_skipped_records_are_listed_with_their_reasons(evaluate, setup, tmp_path, capsys):
    run, _, some_bad, _ = setup
    out = tmp_path / "preds.jsonl"
    evaluate.main(run_args(run / "student", some_bad, "--out", str(out)))
    assert len(read_jsonl(out)) == GOOD
    skipped_file = tmp_path / "preds.skipped.jsonl"
    skipped = read_jsonl(skipped_file)
    assert [row["id"] for row in skipped] == ["missing_image", "too_long"]
    for row in skipped:
        assert set(row) == {"id", "reason"} and BAD[row["id"]] in row["reason"]
    assert f"skipped records listed in {skipped_file}" in capsys.readouterr().out
    # --output-dir: answers.jsonl and skipped.jsonl in it, as eval/run.py writes them
    evaluate.main(run_args(run / "student", some_bad, "--output-dir", str(tmp_path / "eval")))
    assert read_jsonl(tmp_path / "eval" / "answers.jsonl") == read_jsonl(out)
    assert read_jsonl(tmp_path / "eval" / "skipped.jsonl") == skipped


# --- 5: where the answers go by default ---------------------------------------------------------------


def test_default_output_goes_under_outputs_eval_and_is_printed(evaluate, setup, tmp_path, monkeypatch, capsys):
    run, val, _, _ = setup
    monkeypatch.chdir(tmp_path)
    evaluate.main(run_args(run, val))
    expected = Path("outputs") / "eval" / run.name / val.stem / "answers.jsonl"
    assert len(read_jsonl(tmp_path / expected)) == GOOD
    assert (tmp_path / expected).with_name("skipped.jsonl").read_text() == ""
    assert not (tmp_path / "answers.jsonl").exists()
    assert f"answers written to {expected}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        evaluate.main(run_args(run, val, "--out", "a.jsonl", "--output-dir", "b"))
    assert sorted(os.listdir(tmp_path)) == ["outputs"]


def test_two_runs_answers_to_one_data_file_go_to_their_own_default_folders(evaluate, setup, tmp_path, monkeypatch):
    """The default output folder names the model (its run's directory for final/ or student/): a
    fine-tuning run's answers to its val.json no longer overwrite a distillation run's (a fresh user's
    trial)."""
    run, val, _, _ = setup
    finetune = tmp_path / "finetune-run"
    finetune.mkdir()
    (finetune / "final").symlink_to(run / "student", target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    for model in (run, finetune / "final", run / "student"):
        evaluate.main(run_args(model, val))
    written = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "outputs" / "eval").rglob("answers.jsonl"))
    assert written == [f"outputs/eval/{run.name}/{val.stem}/answers.jsonl",
                       f"outputs/eval/finetune-run/{val.stem}/answers.jsonl"]


# --- 6: answers made with other settings are not overwritten --------------------------------------------


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "error:" in line]


def test_other_settings_into_an_output_dir_with_answers_are_refused_naming_them(evaluate, setup, tmp_path, capsys):
    """A --blind evaluation into the folder of a normal one (a user's report: it overwrote the answers
    without a word) stops, as eval/run.py does, with one line naming each setting that differs, the
    folder and how to go on; the earlier answers and their settings stay as they were."""
    run, val, _, _ = setup
    out = tmp_path / "eval"
    evaluate.main(run_args(run, val, "--output-dir", str(out)))
    settings_file = out / "run_settings.json"
    recorded = json.loads(settings_file.read_text())
    assert recorded == {
        "model": str((run / "student").resolve()),
        "data": str(val.resolve()),
        "data_sha256": hashlib.sha256(val.read_bytes()).hexdigest(),
        "image_root": str(val.parent.resolve()),
        "blind": False,
        "max_new_tokens": 2,
    }
    before = {name: (out / name).read_bytes() for name in ("answers.jsonl", "skipped.jsonl", "run_settings.json")}
    capsys.readouterr()

    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(run_args(run, val, "--output-dir", str(out), "--blind", "--max-new-tokens", "3"))
    assert exit_info.value.code == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line.endswith(
        f"error: {out} holds answers made with other settings ({settings_file}): "
        f"blind: False before, True now; max_new_tokens: 2 before, 3 now; "
        f"pass another --output-dir, or delete {out} to evaluate again with these settings"
    )
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(os.listdir(out)) == sorted(before)  # no temporary file left either

    # another image root or another model: named the same way
    for extra, named in ((("--image-root", str(tmp_path)), "image_root: "), (("--model", str(tmp_path / "m")), "model: ")):
        if extra[0] == "--model":
            tiny_vlm().save_pretrained(tmp_path / "m")
            argv = run_args(tmp_path / "m", val, "--output-dir", str(out))
        else:
            argv = run_args(run, val, "--output-dir", str(out), *extra)
        with pytest.raises(SystemExit):
            evaluate.main(argv)
        [line] = error_lines(capsys.readouterr().err)
        assert named in line and "blind" not in line and f"delete {out}" in line
    assert {name: (out / name).read_bytes() for name in before} == before

    # another output folder takes the new settings
    evaluate.main(run_args(run, val, "--output-dir", str(tmp_path / "blind"), "--blind"))
    assert json.loads((tmp_path / "blind" / "run_settings.json").read_text())["blind"] is True


def test_other_settings_into_an_out_file_with_answers_are_refused(evaluate, setup, tmp_path, capsys):
    run, val, _, _ = setup
    out = tmp_path / "preds.jsonl"
    evaluate.main(run_args(run, val, "--out", str(out)))
    settings_file = tmp_path / "preds.settings.json"
    assert json.loads(settings_file.read_text())["blind"] is False
    answers = out.read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(run_args(run, val, "--out", str(out), "--blind"))
    assert exit_info.value.code == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line.endswith(
        f"error: {out} holds answers made with other settings ({settings_file}): blind: False before, True now; "
        f"pass another --out, or delete {out} to evaluate again with these settings"
    )
    assert out.read_bytes() == answers
    # as the message says: without the old answers, the new settings are taken
    out.unlink()
    evaluate.main(run_args(run, val, "--out", str(out), "--blind"))
    assert json.loads(settings_file.read_text())["blind"] is True and len(read_jsonl(out)) == GOOD


def test_the_same_settings_evaluate_again_and_unreadable_settings_are_refused(evaluate, setup, tmp_path, capsys,
                                                                              caplog):
    run, val, _, _ = setup
    out = tmp_path / "eval"
    first = evaluate.main(run_args(run, val, "--output-dir", str(out)))
    rows = read_jsonl(out / "answers.jsonl")
    # the same settings (the batch size and the model named by its run's folder do not count): answered again
    again = evaluate.main(run_args(run / "student", val, "--output-dir", str(out), "--batch-size", "2"))
    assert again == first and read_jsonl(out / "answers.jsonl") == rows
    # answers written before settings were recorded: replaced, with a warning
    (out / "run_settings.json").unlink()
    with caplog.at_level(logging.WARNING):
        evaluate.main(run_args(run, val, "--output-dir", str(out), "--blind"))
    assert any(f"{out} holds answers but no run_settings.json" in r.getMessage() for r in caplog.records)
    assert json.loads((out / "run_settings.json").read_text())["blind"] is True
    # a settings file that cannot be read: named with what is wrong (the reader eval/run.py shares)
    for content, problem in [
        (b"{not json", "not valid JSON (Expecting property name enclosed in double quotes: line 1 column 2)"),
        (b"\xff\xfe", "not UTF-8 text (invalid start byte at byte 0)"),
        (b"[1, 2]", "JSON list, not an object"),
    ]:
        (out / "run_settings.json").write_bytes(content)
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(run_args(run, val, "--output-dir", str(out), "--blind"))
        assert exit_info.value.code == 2
        [line] = error_lines(capsys.readouterr().err)
        assert f"{out / 'run_settings.json'} is not a JSON object of settings: {problem}: cannot tell" in line
        assert f"delete {out}" in line


class Killed(BaseException):
    """The process killed, simulated: nothing in the script catches it."""


def test_a_run_killed_between_its_output_files_leaves_no_mixed_set_and_the_next_run_answers_again(
    evaluate, setup, tmp_path, monkeypatch, caplog
):
    """The answers, skipped records and settings were written one after another: a run killed after the
    first left its answers beside the earlier run's skipped records, under a settings file vouching for
    both. Now it leaves the earlier set whole, or no settings file, which the next run takes as unfinished:
    it answers again and writes a whole set."""
    run, _, some_bad, _ = setup
    out = tmp_path / "eval"
    argv = run_args(run, some_bad, "--output-dir", str(out))
    args = evaluate.build_parser().parse_args(argv)
    settings = evaluate.answer_settings(args, evaluate.resolve_model_dir(args.model))
    out.mkdir()  # an earlier set with these settings (an earlier model saved to the same folder, say)
    (out / "answers.jsonl").write_text(json.dumps({"id": "earlier", "question": "q", "answer": "a",
                                                   "reference": "a", "correct": True}) + "\n")
    (out / "skipped.jsonl").write_text(json.dumps({"id": "earlier", "reason": "earlier"}) + "\n")
    (out / "run_settings.json").write_text(json.dumps(settings, indent=1))
    earlier = {name: (out / name).read_bytes() for name in os.listdir(out)}
    model = MambaVLM.from_pretrained(run / "student")  # loaded once for the two runs: most of a run's time
    monkeypatch.setattr(MambaVLM, "from_pretrained", lambda *args, **kwargs: model)

    real_atomic_file = evaluate.atomic_file
    written: list[str] = []

    @contextlib.contextmanager
    def killed_after_the_first_file(path: Path, mode: str = "w"):
        with real_atomic_file(path, mode) as f:
            yield f
        written.append(Path(path).name)
        if len(written) == 1:
            raise Killed

    monkeypatch.setattr(evaluate, "atomic_file", killed_after_the_first_file)
    with pytest.raises(Killed):
        evaluate.main(argv)
    left = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert written and (left == earlier or "run_settings.json" not in left), (written, sorted(left))

    monkeypatch.setattr(evaluate, "atomic_file", real_atomic_file)
    with caplog.at_level(logging.WARNING):
        evaluate.main(argv)
    if left != earlier:
        assert any(f"{out} holds answers but no run_settings.json (an evaluation killed before it finished "
                   "writing them" in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(out)) == ["answers.jsonl", "run_settings.json", "skipped.jsonl"]
    assert [row["id"] for row in read_jsonl(out / "answers.jsonl")] == [f"val_{i:06d}" for i in range(GOOD)]
    assert [row["id"] for row in read_jsonl(out / "skipped.jsonl")] == ["missing_image", "too_long"]
    assert json.loads((out / "run_settings.json").read_text()) == settings


# --- 7: nothing answered ----------------------------------------------------------------------------------


def test_nothing_answered_exits_nonzero_naming_the_skips_and_writes_nothing(
    evaluate, setup, tmp_path, capsys, caplog
):
    """A wrong --image-root: every record skipped. The script exits 1 with one line naming how many and
    the first reasons (the missing image path), and writes no (empty) answers file. The images are named
    in one warning before the model loads, not one a record (for a benchmark, thousands of lines)."""
    run, _, _, all_bad = setup
    out = tmp_path / "eval"
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as exit_info:
        evaluate.main(run_args(run, all_bad, "--output-dir", str(out), "--image-root", str(tmp_path)))
    assert exit_info.value.code == 1
    [line] = error_lines(capsys.readouterr().err)
    assert ("error: no record answered: all 7 skipped (no_answer: expected a human turn then an assistant turn; "
            "2: a str, not a record (a mapping with 'conversations'); ") in line
    assert f"val_000000: image file not found: {tmp_path / 'images' / 'val_000000.png'}; " in line
    assert "; and 4 more) (is --image-root right? " in line
    assert line.endswith(f"nothing written ({out / 'answers.jsonl'} left as it was)")
    assert not out.exists()
    images = [r.getMessage() for r in caplog.records if "image" in r.getMessage()]
    assert len(images) == 1 and images[0].startswith("none of the 4 records' images can be opened (val_000000: "
                                                     "image file not found: "), images
    # the text-only one is too_long, then skipped as too long
    assert images[0].endswith("they are skipped, the text-only ones (1) answered")


def test_no_image_found_is_said_before_the_model_loads(evaluate, setup, tmp_path, capsys, caplog, monkeypatch):
    """Every record has an image and none exists under --image-root: one error line at once, no warning, and
    the model is not loaded (it had been loaded, then every record warned about before the error)."""
    run, val, _, _ = setup

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(evaluate.MambaVLM, "from_pretrained", no_loading)
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit) as exit_info:
        evaluate.main(run_args(run, val, "--output-dir", str(tmp_path / "eval"), "--image-root", str(tmp_path)))
    assert exit_info.value.code == 1
    [line] = error_lines(capsys.readouterr().err)
    assert f"error: no record answered: all {GOOD} skipped (val_000000: image file not found: " in line
    assert "(is --image-root right? default: the data file's directory)" in line and "warning" not in line
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_nothing_answered_keeps_the_earlier_answers(evaluate, setup, tmp_path, capsys):
    """The same settings as an earlier evaluation, its images gone: the earlier answers are kept, not
    replaced by an empty file."""
    run = setup[0]
    _, val = make_shapes_vqa(tmp_path / "data", 0, GOOD, image_size=32)
    out = tmp_path / "eval"
    evaluate.main(run_args(run, val, "--output-dir", str(out)))
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    for image in (tmp_path / "data" / "images").iterdir():
        image.unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(run_args(run, val, "--output-dir", str(out)))
    assert exit_info.value.code == 1
    [line] = error_lines(capsys.readouterr().err)
    assert f"all {GOOD} skipped (val_000000: image file not found: " in line and "more" not in line
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert len(read_jsonl(out / "answers.jsonl")) == GOOD

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(run_args(run, empty, "--output-dir", str(tmp_path / "none")))
    assert exit_info.value.code == 1
    [line] = error_lines(capsys.readouterr().err)
    assert line.endswith(f"error: {empty} holds no records: nothing to evaluate; "
                         f"nothing written ({tmp_path / 'none' / 'answers.jsonl'} left as it was)")


def test_some_skipped_still_exits_zero_with_the_count(evaluate, setup, tmp_path, capsys):
    run, _, some_bad, _ = setup
    accuracy = evaluate.main(run_args(run, some_bad, "--output-dir", str(tmp_path / "eval")))
    assert accuracy is not None
    assert f"/{GOOD}; 2 skipped)" in capsys.readouterr().out
