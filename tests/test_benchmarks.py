"""The benchmark scripts (benchmarks/) run in --quick mode and write their tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, subprocess_env


@pytest.mark.parametrize("script", ["generation", "projector", "training_throughput", "long_context", "eval_throughput", "prefill", "lora_step"])
def test_benchmark_quick_mode_runs_and_writes_its_table(script: str, tmp_path: Path) -> None:
    out = tmp_path / f"{script}.md"
    env = subprocess_env()
    result = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{script}", "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    assert text in result.stdout
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) >= 4 and table[1].startswith("|---")
    assert "- device: CPU" in text
