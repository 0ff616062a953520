"""Benchmark reports: the run's environment, markdown tables, and the results file."""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Sequence
from pathlib import Path

import torch
import transformers

__all__ = [
    "HBM_BYTES_PER_S",
    "PEAK_BF16_DENSE_FLOPS",
    "default_out",
    "environment_lines",
    "hbm_bytes_per_s",
    "markdown_table",
    "peak_flops",
    "write_report",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def default_out(name: str, quick: bool) -> Path:
    """benchmarks/results/<name>.md, or <name>-quick.md for a --quick run."""
    return RESULTS_DIR / f"{name}{'-quick' if quick else ''}.md"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's description."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


HBM_BYTES_PER_S = {"H200": 4.8e12, "H100": 3.35e12}
"""HBM bandwidth by GPU name (SXM parts), for the decode benchmarks' bandwidth floors."""
PEAK_BF16_DENSE_FLOPS = {"H100": 989e12, "H200": 989e12}
"""Dense bf16 tensor-core peak by GPU name (SXM parts), for MFU."""


def _by_gpu_name(device: torch.device, table: dict[str, float]) -> float | None:
    """``table``'s value for the device's GPU, matched by name; None on the CPU or an unknown GPU."""
    if device.type != "cuda":
        return None
    name = device_name(device)
    return next((value for key, value in table.items() if key in name), None)


def hbm_bytes_per_s(device: torch.device) -> float | None:
    """The device's HBM bandwidth in bytes/s (None on the CPU or an unknown GPU)."""
    return _by_gpu_name(device, HBM_BYTES_PER_S)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s (None on the CPU or an unknown GPU)."""
    return _by_gpu_name(device, PEAK_BF16_DENSE_FLOPS)


def environment_lines(device: torch.device) -> list[str]:
    """Device, library versions and the kernel packages, as markdown bullet lines."""
    return [
        f"- device: {device_name(device)}",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}",
        f"- mamba_ssm {_version('mamba-ssm')}, causal_conv1d {_version('causal-conv1d')}",
    ]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table; floats keep the formatting the caller gave them (pass strings)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(path: Path, title: str, device: torch.device, sections: Sequence[str]) -> str:
    """Print the report (title, environment, sections) and write it to ``path``; returns the text."""
    text = "\n\n".join([f"## {title}", "\n".join(environment_lines(device)), *sections]) + "\n"
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"written to {path}")
    return text
