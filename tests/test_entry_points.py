"""The command-line entry points answer --help and usage errors before the heavy imports.

``import mambavlm`` registers the model with transformers' Auto classes, so it loads torch, transformers
and the model (seconds); a script that imported it before parsing its arguments made ``--help`` and
every usage error wait for that. Which modules a run imported is read from the interpreter itself
(``python -X importtime`` lists each one on stderr), not from the scripts.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, subprocess_env

ENTRY_POINTS = [
    ("train/finetune.py",),
    ("train/distill.py",),
    ("train/merge_lora.py",),
    ("eval/evaluate.py",),
    ("eval/run.py",),
    ("eval/score.py",),
    ("eval/submission.py",),
    *(("-m", f"benchmarks.{name}") for name in (
        "data_loader", "eval_throughput", "generation", "long_context", "lora_step", "multi_gpu", "prefill",
        "projector", "selective_scan", "training_throughput",
    )),
]
"""Each as it is run: a script path, or ``-m`` and a module. Not here: benchmarks.decode_projections, whose
help names the kernel's pipeline stages (``mambavlm.ops.mamba_step``): its parser needs mambavlm."""

HEAVY = ("torch", "transformers", "mambavlm")
"""Top-level packages that --help and a usage error must not import."""


def run(entry: tuple[str, ...], *args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """The finished process (COLUMNS wide enough that argparse wraps no help line), and the names of
    the modules it imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *entry, *args], cwd=ROOT, env=subprocess_env(COLUMNS="2000"),
        capture_output=True, text=True, timeout=300,
    )
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "argparse" in imported, result.stderr[-2000:]  # the listing works: argparse is always imported
    return result, imported


def heavy(imported: set[str]) -> list[str]:
    return sorted(name for name in imported if name.split(".")[0] in HEAVY)


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=lambda entry: entry[-1])
def test_help_and_usage_errors_answer_before_the_heavy_imports(entry: tuple[str, ...]) -> None:
    result, imported = run(entry, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: ") and "show this help message and exit" in result.stdout
    assert not heavy(imported), f"--help imported {heavy(imported)[:10]}"

    result, imported = run(entry, "--no-such-option")
    assert result.returncode == 2
    assert "error: " in result.stderr and "usage: " in result.stderr
    assert not heavy(imported), f"a usage error imported {heavy(imported)[:10]}"


def test_a_run_past_the_arguments_still_imports_the_package() -> None:
    """The check above sees imports at all: a run that gets past its arguments (here to a missing config
    file) imports mambavlm and torch, and stops with the usual one-line error."""
    result, imported = run(("train/finetune.py",), "--config", "no/such/config.yaml")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: " in result.stderr and "no/such/config.yaml" in result.stderr
    assert {"mambavlm", "torch", "transformers"} <= imported


def test_evaluate_names_the_run_directories_and_settings_file_the_package_uses() -> None:
    """eval/evaluate.py's help names them literally (it is built before mambavlm is imported): they are
    the package's."""
    from mambavlm.distill.run import STUDENT_DIR
    from mambavlm.eval.runner import SETTINGS_FILE
    from mambavlm.training.finetune import FINAL_MODEL_DIR

    result, _ = run(("eval/evaluate.py",), "--help")
    text = " ".join(result.stdout.split())
    assert f"(its {FINAL_MODEL_DIR}/ after fine-tuning, its {STUDENT_DIR}/ after distillation)" in text
    assert f"answers.jsonl, skipped.jsonl and {SETTINGS_FILE} go there" in text


def test_run_and_score_list_the_benchmarks_the_package_knows() -> None:
    """eval/run.py's and eval/score.py's help name the benchmarks, and score.py the files each is scored
    against, literally (their parsers are built before mambavlm is imported): they are ``BENCHMARKS``'."""
    from mambavlm.eval.benchmarks import BENCHMARKS

    result, _ = run(("eval/run.py",), "--help")
    assert f"one of {', '.join(BENCHMARKS)} (or your own with --custom-benchmark)" in " ".join(result.stdout.split())

    result, _ = run(("eval/score.py",), "--help")
    listed = result.stdout.split("the published files each benchmark is scored against:\n", 1)[1].splitlines()
    assert listed == [f"  {name:<10} --annotations {spec.annotations}" for name, spec in BENCHMARKS.items()]
    assert f"{{{','.join(sorted(BENCHMARKS))}}}" in result.stdout  # the choices of the benchmark argument


def test_the_demo_without_gradio_says_how_to_install_it_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    """Without gradio the demo ended in an ImportError traceback after loading the model; now it exits 2 with
    the install command, before reading --model (here a folder that does not exist)."""
    import importlib.util

    from mambavlm import demo

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else find_spec(name, *a))
    assert demo.main(["--model", str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err == 'error: the demo needs gradio: pip install -e ".[demo]"\n'
