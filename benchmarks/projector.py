"""The Mamba projector's cost in a training step: forward + backward beside the MLP projector and the LLM.

    python -m benchmarks.projector            # CUDA: the paper config (1458 visual tokens, Mamba-2.8B)
    python -m benchmarks.projector --quick    # CPU: the tiny config (CI)

Rows, measured in this one run: the config's Mamba projector and an MLP projector (mlp2x_gelu) on
the same random patch grids (float32 weights under bf16 autocast on CUDA, plain float32 on the
CPU), and the LLM (its config dtype)
on the whole sequence, visual tokens + ``--text-tokens`` text tokens, with a cross-entropy loss.
Each is forward + backward, median of ``--repeats``. The projector's share of the step is
projector / (projector + LLM); the frozen encoders' forward is left out of both.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The command line, built before the imports below: --help and a usage error answer without
    loading torch, transformers and mambavlm (seconds)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config on the CPU (CI)")
    parser.add_argument("--out", type=Path, help="results file (default benchmarks/results/projector[-quick].md)")
    parser.add_argument("--batch", type=int, default=1, help="images per step (default 1)")
    parser.add_argument("--text-tokens", type=int, default=100, help="text tokens beside the visual ones")
    parser.add_argument("--repeats", type=int, help="timed runs per row (default 10; 2 with --quick)")
    return parser


if __name__ == "__main__":  # --help and usage errors exit here, before the heavy imports
    build_parser().parse_args()

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from benchmarks import PAPER_CONFIG, TINY_CONFIG  # noqa: E402
from benchmarks.report import default_out, markdown_table, write_report  # noqa: E402
from benchmarks.timing import benchmark_device, median_seconds  # noqa: E402
from mambavlm.config import ModelConfig, ProjectorConfig, load_config  # noqa: E402
from mambavlm.llm.factory import build_llm  # noqa: E402
from mambavlm.projector import build_projector  # noqa: E402
from mambavlm.vision.long_sequence import VisualLongSequence  # noqa: E402

TARGET_SHARE = 0.03
"""The issue's target: the projector at most 3 % of the projector + LLM step."""


def fwd_bwd(module: nn.Module, loss_fn: Callable[[], Tensor]) -> Callable[[], None]:
    """A closure running forward + backward of ``loss_fn`` and dropping the gradients."""

    def step() -> None:
        loss_fn().backward()
        module.zero_grad(set_to_none=True)

    return step


def run(args: argparse.Namespace) -> str:
    device = benchmark_device(args.quick)
    config_path = TINY_CONFIG if args.quick else PAPER_CONFIG
    cfg = load_config(ModelConfig, config_path)
    repeats = args.repeats or (2 if args.quick else 10)
    batch = args.batch
    for encoder in cfg.vision.encoders:  # widths and grid only: no weights are read or made
        encoder.weights = None
    with torch.device("meta"):
        vision = VisualLongSequence(cfg.vision)
    h, w = vision.grid_size
    mamba_name = f"Mamba projector ({cfg.projector.scan_mode}, d_state {cfg.projector.d_state})"
    mlp_name = "MLP projector (mlp2x_gelu)"
    torch.manual_seed(0)
    with torch.device(device):
        llm = build_llm(cfg.llm, load_weights=False).train()
        hidden = llm.config.hidden_size
        projectors = {
            mamba_name: build_projector(cfg.projector, vision.out_dims, hidden, vision.grid_size, vision.num_maps),
            mlp_name: build_projector(
                ProjectorConfig(type="mlp"), vision.out_dims, hidden, vision.grid_size, vision.num_maps
            ),
        }
        grids = [torch.randn(batch, h, w, c) for c in vision.out_dims]
        seq_len = vision.num_visual_tokens + args.text_tokens
        embeds = torch.randn(batch, seq_len, hidden, dtype=llm.dtype, requires_grad=True)
        labels = torch.randint(0, llm.config.vocab_size, (batch, seq_len))
    use_autocast = device.type == "cuda"
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast)

    def projector_loss(projector: nn.Module) -> Callable[[], Tensor]:
        def loss() -> Tensor:
            with autocast:
                return projector(grids).float().square().mean()

        return loss

    times = {
        name: median_seconds(fwd_bwd(p.train(), projector_loss(p)), device, repeats, warmup=2)
        for name, p in projectors.items()
    }
    llm_s = median_seconds(
        fwd_bwd(llm, lambda: llm(inputs_embeds=embeds, labels=labels).loss), device, repeats, warmup=2
    )
    llm_dtype = str(llm.dtype).removeprefix("torch.")
    llm_name = f"LLM {type(llm).__name__} ({llm.config.num_hidden_layers} layers, {llm_dtype})"

    def share(seconds: float) -> float:
        return seconds / (seconds + llm_s)

    rows = [
        [name, str(vision.num_visual_tokens), f"{1e3 * seconds:.2f}", f"{100 * share(seconds):.2f} %"]
        for name, seconds in times.items()
    ]
    rows.append([llm_name, str(seq_len), f"{1e3 * llm_s:.2f}", "-"])
    mamba_share = share(times[mamba_name])
    verdict = ("the target is for the paper config; --quick checks the code path"
               if args.quick else f"{'meets' if mamba_share <= TARGET_SHARE else 'misses'} the "
               f"{100 * TARGET_SHARE:.0f} % target")
    summary = (
        f"- Mamba projector share of projector + LLM step: {100 * mamba_share:.2f} % ({verdict})\n"
        f"- Mamba projector vs MLP projector: {times[mamba_name] / times[mlp_name]:.2f}x the time"
    )
    precision = "fp32 under bf16 autocast" if use_autocast else "fp32"
    setup = (
        f"{config_path.name}, batch {batch}, {vision.num_maps} maps of {h}x{w} = {vision.num_visual_tokens} visual "
        f"tokens, widths {vision.out_dims} -> {hidden}; projectors {precision}; forward + backward, "
        f"median of {repeats}"
    )
    headers = ["module", "tokens", "fwd+bwd ms", "share of projector + LLM step"]
    return write_report(
        args.out or default_out("projector", args.quick),
        "Projector cost: Mamba vs MLP projector vs LLM, forward + backward",
        device,
        [setup, markdown_table(headers, rows), summary],
    )


def main() -> None:
    run(build_parser().parse_args())


if __name__ == "__main__":
    main()
