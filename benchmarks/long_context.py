"""Decode latency and memory against context length: a LLaMA-style teacher, its 25 %-attention
hybrid and its linear (all Mamba-2) student, the same decoder code for all three.

    python -m benchmarks.long_context            # CUDA: HoVLE-2.6B's decoder shape, bf16, 1K..128K
    python -m benchmarks.long_context --quick    # CPU: a tiny LLaMA, short contexts (CI)

The teacher is a transformers ``LlamaForCausalLM`` with random weights of the shape of mmMamba's
teacher HoVLE (32 layers, hidden 2048, 16 query / 8 K/V heads of 128, MLP 8192, vocabulary 92553);
the students are ``convert_llama`` of it: ``head-interleaved:4`` (attention in layers 0, 4, ..., 28:
mmMamba-hybrid's 8 of 32) and ``linear``. All three decode with ``HybridStaticDecoder``: static K/V
buffers, static Mamba-2 state, the step replayed as a CUDA graph; the models with attention three times,
attending with SDPA, with split-KV FlexAttention (flash-decoding) and with the cuBLAS products
(``mambavlm.ops.decode_attention``).
Each model is alone on the GPU while it is measured (the others wait in host memory).

Per model and context T: the prefill of T random tokens (timed once), then the greedy steps:
ms per decoded token (median over ``--repeats`` blocks of ``--steps`` steps, after a warm-up) beside its
bandwidth floor (the bytes a step must read, weights + K/V of the context + Mamba-2 state, over the GPU's
HBM bandwidth); peak memory of the prefill, and during decoding (weights + caches + one step's temporaries).
A context that does not fit is reported as OOM. Writes a markdown table and a PNG plot.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path


TEACHER_SHAPES: dict[str, dict[str, int]] = {
    "hovle-2.6b": {
        "num_hidden_layers": 32,
        "hidden_size": 2048,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "intermediate_size": 8192,
        "vocab_size": 92553,
    },
    "tiny": {
        "num_hidden_layers": 4,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": 256,
    },
}
"""Teacher decoder shapes: HoVLE's (mmMamba's teacher) for the GPU run, a tiny one for --quick."""


def build_parser() -> argparse.ArgumentParser:
    """The command line, built before the imports below: --help and a usage error answer without
    loading torch, transformers and mambavlm (seconds)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny teacher on the CPU, short contexts (CI)")
    parser.add_argument("--out", type=Path, help="results file (default benchmarks/results/long_context[-quick].md)")
    parser.add_argument("--shape", choices=sorted(TEACHER_SHAPES), default="hovle-2.6b", help="teacher shape")
    parser.add_argument("--contexts", type=int, nargs="+", help="context lengths in tokens")
    parser.add_argument("--steps", type=int, help="decode steps per timed block (default 32; 4 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed blocks (default 3; 2 with --quick)")
    return parser


if __name__ == "__main__":  # --help and usage errors exit here, before the heavy imports
    build_parser().parse_args()

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from benchmarks.report import RESULTS_DIR, default_out, hbm_bytes_per_s, markdown_table, write_report  # noqa: E402
from benchmarks.timing import (  # noqa: E402
    benchmark_device,
    free_memory,
    peak_memory_gib,
    reset_peak_memory,
    synchronize,
)
from mambavlm.distill.convert import convert_llama  # noqa: E402
from mambavlm.generation import HybridStaticDecoder  # noqa: E402


MODELS = {"teacher": None, "hybrid (25 % attention)": "head-interleaved:4", "linear (0 % attention)": "linear"}
"""Row name -> the layout converting the teacher (None: the teacher itself)."""

K = 1024
FULL_CONTEXTS = [1 * K, 2 * K, 4 * K, 8 * K, 16 * K, 32 * K, 64 * K, 100 * K, 128 * K]
QUICK_CONTEXTS = [32, 128]
TARGET_CONTEXT = 100 * K
TARGETS = {"hybrid (25 % attention)": 3.0, "linear (0 % attention)": 15.0}
"""Speed-up over the teacher at TARGET_CONTEXT that the issue asks for (each attending the same way)."""
HYBRID_TARGET_MS = 6.0
"""Issue 14: the 25 %-attention hybrid decodes at <= this many ms per token at TARGET_CONTEXT (split over the
cache: split-KV or the cuBLAS products)."""
ATTENTION_LABELS = {"sdpa": "SDPA", "split_kv": "split-KV", "gemm": "cuBLAS products"}
@dataclass
class Point:
    """One model, attending one way, at one context length; the numbers are None when it ran out of memory."""

    model: str
    attention: str | None
    context: int
    floor_ms: float | None = None
    prefill_s: float | None = None
    ms_per_token: float | None = None
    prefill_peak_gib: float | None = None
    decode_peak_gib: float | None = None

    @property
    def ran(self) -> bool:
        return self.ms_per_token is not None

    @property
    def series(self) -> str:
        return self.model if self.attention is None else f"{self.model}, {ATTENTION_LABELS[self.attention]}"


def step_bytes(model: LlamaForCausalLM, context: int) -> int:
    """Bytes a batch-1 decoding step reads at least: every weight, the K/V of ``context`` tokens in each
    attention layer, each Mamba-2 layer's state (in the model's dtype)."""
    decoder = HybridStaticDecoder(model)
    size = next(model.parameters()).element_size()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = len(decoder.attention_layers) * 2 * decoder.num_kv_heads * context * model.config.head_dim * size
    states = 0
    for adapter in decoder.adapters.values():
        state = adapter.mixer.allocate_state(1, torch.device("meta"), next(model.parameters()).dtype)
        states += state.conv.nbytes + state.ssm.nbytes
    return weights + kv + states


def build_models(shape: str, device: torch.device, dtype: torch.dtype, max_context: int) -> dict[str, LlamaForCausalLM]:
    """The teacher and its conversions, on the CPU except the teacher (moved in turn by ``measure``)."""
    torch.manual_seed(0)
    config = LlamaConfig(**TEACHER_SHAPES[shape], max_position_embeddings=2 * max_context)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        teacher = LlamaForCausalLM(config).to(dtype).eval()
    models = {"teacher": teacher}
    for name, layout in MODELS.items():
        if layout is not None:
            models[name] = convert_llama(teacher, layout, "mmmamba").eval().to("cpu")
    teacher.to("cpu")
    return models


def measure(
    name: str, model: LlamaForCausalLM, device: torch.device, context: int, steps: int, repeats: int,
    attention: str | None,
) -> Point:
    """Prefill ``context`` random tokens, then time ``repeats`` blocks of ``steps`` greedy steps."""
    point = Point(name, attention, context)
    decoder = HybridStaticDecoder(model, attention=attention or "sdpa")
    generator = torch.Generator().manual_seed(context)
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=generator).to(device)
    try:
        free_memory(device)
        reset_peak_memory(device)
        with torch.no_grad():
            synchronize(device)
            start = time.perf_counter()
            logits = decoder.prefill(model.get_input_embeddings()(ids), max_new_tokens=(repeats + 1) * steps)
            synchronize(device)
            point.prefill_s = time.perf_counter() - start
            point.prefill_peak_gib = peak_memory_gib(device)
            reset_peak_memory(device)
            times = []
            for block in range(repeats + 1):  # block 0 warms up
                synchronize(device)
                start = time.perf_counter()
                for _ in range(steps):
                    logits = decoder.step(logits.argmax(-1))
                synchronize(device)
                if block:
                    times.append((time.perf_counter() - start) / steps)
            point.ms_per_token = 1e3 * statistics.median(times)
            point.decode_peak_gib = peak_memory_gib(device)
    except torch.OutOfMemoryError:
        point = Point(name, attention, context)
    del decoder
    free_memory(device)
    return point


def fmt(value: float | None, spec: str) -> str:
    return "OOM" if value is None else format(value, spec)


def speed_change(speed: float) -> str:
    """A teacher / student time-per-token ratio in words: ``**3.4x** faster per token``, or for a ratio
    under 1 ``**2.0x** slower per token`` (not "0.5x faster")."""
    return f"**{speed:.1f}x** faster per token" if speed >= 1 else f"**{1 / speed:.1f}x** slower per token"


def memory_change(saved: float) -> str:
    """The fraction of the teacher's decode memory a student saves, in words (negative: it needs more)."""
    return f"decode memory {100 * saved:.1f} % less" if saved >= 0 else f"decode memory {-100 * saved:.1f} % more"

def context_label(tokens: int) -> str:
    return f"{tokens // K}K" if tokens % K == 0 else str(tokens)


def plot(points: list[Point], path: Path) -> None:
    """Latency and decode memory against context length, one line per model, log-log axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(figure)
    latency, memory = figure.subplots(1, 2)
    for name in dict.fromkeys(p.series for p in points):
        ran = [p for p in points if p.series == name and p.ran]
        contexts = [p.context for p in ran]
        latency.plot(contexts, [p.ms_per_token for p in ran], marker="o", label=name)
        if all(p.decode_peak_gib is not None for p in ran):
            memory.plot(contexts, [p.decode_peak_gib for p in ran], marker="o", label=name)
    axes = [(latency, "ms per decoded token")]
    if memory.lines:
        axes.append((memory, "decode memory (GiB)"))
    else:
        memory.text(0.5, 0.5, "memory is measured on CUDA only", ha="center", va="center")
    for axis, label in axes:
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("context length (tokens)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    latency.set_title("decode latency vs context")
    memory.set_title("memory while decoding vs context")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def speedups(points: list[Point], context: int) -> list[str]:
    """At ``context``: each student against the teacher attending the same way (and split-KV against
    SDPA), as bullet lines."""
    at = {(p.model, p.attention): p for p in points if p.context == context}
    lines = []
    for attention in ATTENTION_LABELS:
        teacher = at.get(("teacher", attention))
        if teacher is None:
            continue
        how = ATTENTION_LABELS[attention]
        for name in list(MODELS)[1:]:
            student = at.get((name, attention)) or at.get((name, None))
            if student is None or not student.ran:
                lines.append(f"- {name} at {context_label(context)}: did not run")
                continue
            if not teacher.ran:
                lines.append(f"- {student.series} at {context_label(context)}: runs, the teacher ({how}) ran out of memory")
                continue
            speed = teacher.ms_per_token / student.ms_per_token
            saved = 1 - student.decode_peak_gib / teacher.decode_peak_gib if teacher.decode_peak_gib else None
            target = TARGETS.get(name)
            verdict = ""
            if target is not None and context == TARGET_CONTEXT:
                verdict = f" (target >= {target:g}x: {'met' if speed >= target else 'NOT met'})"
            memory = "" if saved is None else f", {memory_change(saved)}"
            lines.append(f"- {student.series} vs teacher, {how}, at {context_label(context)}: {speed_change(speed)}"
                         f"{verdict}{memory}")
    for name in ("teacher", "hybrid (25 % attention)"):
        sdpa = at.get((name, "sdpa"))
        for attention in ("split_kv", "gemm"):
            split = at.get((name, attention))
            if sdpa is None or split is None or not (sdpa.ran and split.ran):
                continue
            how = ATTENTION_LABELS[attention]
            line = f"- {name}, {how} vs SDPA at {context_label(context)}: {sdpa.ms_per_token / split.ms_per_token:.2g}x"
            if name.startswith("hybrid") and context == TARGET_CONTEXT:
                met = "met" if split.ms_per_token <= HYBRID_TARGET_MS else "NOT met"
                line += f"; {split.ms_per_token:.2f} ms per token (target <= {HYBRID_TARGET_MS:g}: {met})"
            lines.append(line)
    return lines


def run(args: argparse.Namespace) -> str:
    device = benchmark_device(args.quick)
    dtype = torch.float32 if args.quick else torch.bfloat16
    shape = "tiny" if args.quick else args.shape
    contexts = args.contexts or (QUICK_CONTEXTS if args.quick else FULL_CONTEXTS)
    steps = args.steps or (4 if args.quick else 32)
    repeats = args.repeats or (2 if args.quick else 3)
    models = build_models(shape, device, dtype, max(contexts))
    points: list[Point] = []
    bandwidth = hbm_bytes_per_s(device)
    for name, model in models.items():
        model.to(device)
        attentions = [None] if MODELS[name] == "linear" else list(ATTENTION_LABELS)
        for attention in attentions:
            measure(name, model, device, min(contexts), 2, 1, attention)  # warm-up: compilation, allocator
            for context in contexts:
                point = measure(name, model, device, context, steps, repeats, attention)
                if bandwidth is not None:
                    point.floor_ms = 1e3 * step_bytes(model, context) / bandwidth
                print(f"{point.series:>34} {context_label(context):>6}: {fmt(point.ms_per_token, '.2f')} ms/token",
                      flush=True)
                points.append(point)
        model.to("cpu")
        free_memory(device)

    headers = ["model", "context", "prefill s", "ms / token", "floor ms", "tok/s", "prefill peak GiB", "decode GiB"]
    rows = [
        [
            p.series,
            context_label(p.context),
            fmt(p.prefill_s, ".2f"),
            fmt(p.ms_per_token, ".2f"),
            "n/a" if p.floor_ms is None else f"{p.floor_ms:.2f}",
            fmt(None if p.ms_per_token is None else 1e3 / p.ms_per_token, ".1f"),
            fmt(p.prefill_peak_gib, ".2f") if device.type == "cuda" else "n/a",
            fmt(p.decode_peak_gib, ".2f") if device.type == "cuda" else "n/a",
        ]
        for p in points
    ]
    out = args.out or default_out("long_context", args.quick)
    png = out.with_suffix(".png")
    plot(points, png)
    compared = [c for c in (TARGET_CONTEXT, max(contexts)) if c in contexts] or [max(contexts)]
    ratios = [line for c in dict.fromkeys(compared) for line in speedups(points, c)]
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    setup = (
        f"Teacher shape `{shape}` ({', '.join(f'{k}={v}' for k, v in TEACHER_SHAPES[shape].items())}); "
        f"parameters: {', '.join(f'{n} {v / 1e9:.2f} B' if v >= 1e8 else f'{n} {v:,}' for n, v in params.items())}. "
        f"{str(dtype).removeprefix('torch.')}, batch 1, greedy, median of {repeats} blocks of {steps} steps; floor: "
        f"weights + K/V + state bytes over {'n/a' if bandwidth is None else f'{bandwidth / 1e12:.2f} TB/s'}; "
        f"plot: `{png.relative_to(RESULTS_DIR.parent.parent) if png.is_relative_to(RESULTS_DIR.parent.parent) else png}`"
    )
    return write_report(
        out,
        "Decode latency and memory vs context length: teacher / 25 % hybrid / linear, SDPA / split-KV",
        device,
        [setup, markdown_table(headers, rows), "\n".join(ratios)],
    )


def main() -> None:
    run(build_parser().parse_args())


if __name__ == "__main__":
    main()
