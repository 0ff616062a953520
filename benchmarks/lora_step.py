"""LoRA and QLoRA training steps of MambaVLM-2.8B: time and peak memory beside full fine-tuning.

    python -m benchmarks.lora_step            # CUDA: the paper config, bf16, 1458 visual + 64 text tokens
    python -m benchmarks.lora_step --quick    # CPU: the tiny config (CI); QLoRA skipped (needs CUDA)

Rows, one after another in this run on one set of random weights: full fine-tuning of projector +
LLM (``train.freeze: finetune``), LoRA (``lora: {r: 16}``, projector fully trained) and QLoRA (the
same with the LLM in 4-bit NF4, bitsandbytes; skipped with a note without CUDA or bitsandbytes).
A step is forward + backward + AdamW over the trainable parameters on ``--micro-batch`` samples of
``make_batch`` (``benchmarks.training_throughput``); reported: the trainable parameters, the median
step time of ``--steps`` after a warm-up step, the peak memory, and the loss before and after the
steps (it must fall; the first is the same in every row: LoRA's B starts at zero).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The command line, built before the imports below: --help and a usage error answer without
    loading torch, transformers and mambavlm (seconds)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config on the CPU (CI)")
    parser.add_argument("--out", type=Path, help="results file (default benchmarks/results/lora_step[-quick].md)")
    parser.add_argument("--micro-batch", type=int, help="samples per step (default 4; 2 with --quick)")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, help="timed steps (default 5; 3 with --quick)")
    parser.add_argument("--rank", type=int, default=16)
    return parser


if __name__ == "__main__":  # --help and usage errors exit here, before the heavy imports
    build_parser().parse_args()

import torch  # noqa: E402

from benchmarks.report import default_out, markdown_table, write_report  # noqa: E402
from benchmarks.timing import benchmark_device, free_memory, median_seconds, peak_memory_gib, reset_peak_memory  # noqa: E402
from benchmarks.training_throughput import PAPER_CONFIG, TINY_CONFIG, make_batch  # noqa: E402
from mambavlm.model import build_model  # noqa: E402
from mambavlm.training.config import LoraSettings  # noqa: E402
from mambavlm.training.lora import LoraTrainable, apply_lora  # noqa: E402
from mambavlm.training.optim import FreezePreset  # noqa: E402

HEADERS = ["path", "trainable parameters", "ms / step", "peak GiB", "loss first -> last"]


def row(name: str, args: argparse.Namespace, device: torch.device, lora: LoraSettings | None) -> list[str]:
    """Build the model, set what trains, time ``--steps`` AdamW steps; one table row."""
    dtype = torch.float32 if args.quick else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(TINY_CONFIG if args.quick else PAPER_CONFIG, load_weights=False, load_tokenizer=False)
    model = model.to(device=device, dtype=dtype).train()
    batch = make_batch(model, args.micro_batch, args.text_tokens, device)  # before the adapters draw theirs
    if lora is not None:
        apply_lora(model, lora)
        names = LoraTrainable(lora)(model)
    else:
        names = FreezePreset("finetune")(model)
    params = [p for n, p in model.named_parameters() if n in names]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")
    losses: list[float] = []

    def step() -> None:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())

    reset_peak_memory(device)
    seconds = median_seconds(step, device, args.steps, warmup=1)
    peak = peak_memory_gib(device)
    cells = [
        name, f"{sum(p.numel() for p in params):,}", f"{1e3 * seconds:.0f}",
        "n/a" if peak is None else f"{peak:.2f}", f"{losses[0]:.3f} -> {losses[-1]:.3f}",
    ]
    print(markdown_table(HEADERS, [cells]).splitlines()[-1], flush=True)
    model = optimizer = batch = None  # freed before free_memory (a del would unbind what step() closes over)
    free_memory(device)
    return cells


def run(args: argparse.Namespace) -> str:
    device = benchmark_device(args.quick)
    args.micro_batch = args.micro_batch or (2 if args.quick else 4)
    args.steps = args.steps or (3 if args.quick else 5)
    rows = [row("full fine-tuning (projector + LLM)", args, device, None)]
    settings = LoraSettings(r=args.rank, alpha=2.0 * args.rank, dropout=0.0)
    rows.append(row(f"LoRA r={args.rank} (LLM adapters + projector)", args, device, settings))
    notes = []
    try:
        import bitsandbytes  # noqa: F401

        qlora_available = device.type == "cuda"
    except ImportError:
        qlora_available = False
    if qlora_available:
        rows.append(row(f"QLoRA r={args.rank} (4-bit NF4 LLM)", args, device, settings.model_copy(update={"qlora": True})))
    else:
        notes.append("- QLoRA: skipped (needs CUDA and bitsandbytes)")
    setup = (
        f"{'tiny' if args.quick else 'mambavlm-2.8b'}, {'float32' if args.quick else 'bfloat16'} parameters, "
        f"micro-batch {args.micro_batch} x (visual tokens + {args.text_tokens} text tokens), AdamW, "
        f"median of {args.steps} steps after a warm-up step, random weights"
    )
    return write_report(args.out or default_out("lora_step", args.quick), "LoRA / QLoRA training step",
                        device, [setup, markdown_table(HEADERS, rows), "\n".join(notes)])


def main() -> None:
    run(build_parser().parse_args())


if __name__ == "__main__":
    main()
