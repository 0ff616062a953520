"""LLM prefill speed: our static-state prefill beside mamba_ssm's and transformers' forward, same weights.

    python -m benchmarks.prefill              # CUDA: the paper's Mamba-2.8B, bf16, 1478 tokens, batch 1 / 8 / 32
    python -m benchmarks.prefill --quick      # CPU: the tiny config (CI)
    python -m benchmarks.prefill --profile    # + the top CUDA kernels of our left-padded prefill, largest batch

The prefill is most of the evaluation loop's time (``benchmarks.eval_throughput``): one image's 1458
visual tokens + a question, through all 64 layers, before the first answer token. Rows, per batch size,
all in this one run on one set of random weights (nothing downloaded), every sequence ``--length``
tokens (no padding but in the one row that says so; mamba_ssm takes no mask):

- ours: ``StaticStateDecoder.prefill`` (what ``MambaVLM.generate`` runs): the states for decoding
  + the last position's logits; and the same with row i left-padded by i mod 16 tokens, as the
  prompts of an evaluation batch are (padded positions are masked in every layer);
- mamba_ssm: ``MambaLMHeadModel(ids, num_last_tokens=1)`` with the same weights, fused add + norm:
  the reference layout of a Mamba LM forward;
- transformers: ``MambaForCausalLM(inputs_embeds, logits_to_keep=1)`` (its CUDA-kernel path).

Columns: ms per batch (median of ``--repeats`` after a warm-up), ms per sample, prompt tokens/s, peak
memory. That the three compute the same logits is tested in float32 (tests/generation/); in bf16 a
random-weight 64-layer model amplifies rounding differences (transformers' casts around its norms
against mamba_ssm's fused ones) until the last logits differ by as much as they measure, so no
agreement column is shown here.
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
    parser.add_argument("--out", type=Path, help="results file (default benchmarks/results/prefill[-quick].md)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default 1 8 32 (1 4 with --quick)")
    parser.add_argument("--length", type=int, help="prompt tokens per sample (default 1478; 48 with --quick)")
    parser.add_argument("--repeats", type=int, help="timed runs per row (default 5; 2 with --quick)")
    parser.add_argument("--profile", action="store_true", help="print our prefill's top CUDA kernels (CUDA only)")
    return parser


if __name__ == "__main__":  # --help and usage errors exit here, before the heavy imports
    build_parser().parse_args()

import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from transformers import PreTrainedModel  # noqa: E402

from benchmarks import PAPER_CONFIG, TINY_CONFIG  # noqa: E402
from benchmarks.profiling import kernel_profile  # noqa: E402
from benchmarks.report import default_out, markdown_table, write_report  # noqa: E402
from benchmarks.timing import (  # noqa: E402
    benchmark_device,
    free_memory,
    median_seconds,
    peak_memory_gib,
    reset_peak_memory,
)
from mambavlm.config import ModelConfig, load_config  # noqa: E402
from mambavlm.generation import StaticStateDecoder  # noqa: E402
from mambavlm.llm.factory import build_llm  # noqa: E402

HEADERS = ["path", "batch", "ms / batch", "ms / sample", "prompt tok/s", "peak GiB"]


def mamba_ssm_copy(llm: PreTrainedModel) -> torch.nn.Module | str:
    """mamba_ssm's ``MambaLMHeadModel`` holding ``llm``'s weights, or why it cannot be built here."""
    if not next(llm.parameters()).is_cuda:
        return "mamba_ssm: skipped (needs CUDA)"
    try:
        from mamba_ssm.models.config_mamba import MambaConfig as SSMConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except ImportError as error:
        return f"mamba_ssm: skipped (not importable: {error})"
    cfg = llm.config
    weight = llm.get_input_embeddings().weight
    model = MambaLMHeadModel(
        SSMConfig(
            d_model=cfg.hidden_size,
            n_layer=cfg.num_hidden_layers,
            vocab_size=cfg.vocab_size,
            ssm_cfg={"d_state": cfg.state_size, "d_conv": cfg.conv_kernel, "expand": cfg.expand,
                     "dt_rank": cfg.time_step_rank},
            rms_norm=True,
            residual_in_fp32=cfg.residual_in_fp32,
            fused_add_norm=True,
            pad_vocab_size_multiple=1,
            tie_embeddings=cfg.tie_word_embeddings,
        ),
        device=weight.device,
        dtype=weight.dtype,
    ).eval()
    state = {key.replace("backbone.embeddings.", "backbone.embedding."): value for key, value in llm.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model


def time_row(name: str, batch: int, length: int, fn: Callable[[], object], device: torch.device,
             repeats: int) -> list[str]:
    """One row: ``fn`` (one prefill of ``batch`` x ``length`` tokens) timed, and its peak memory."""
    reset_peak_memory(device)
    seconds = median_seconds(fn, device, repeats, warmup=1)
    peak = peak_memory_gib(device)
    cells = [
        name, str(batch), f"{1e3 * seconds:.1f}", f"{1e3 * seconds / batch:.2f}",
        f"{batch * length / seconds:,.0f}", "n/a" if peak is None else f"{peak:.2f}",
    ]
    print(markdown_table(HEADERS, [cells]).splitlines()[-1], flush=True)
    return cells


def left_padding_mask(ids: Tensor) -> Tensor:
    """(B, L) mask of a batch of prompts of different lengths, as an evaluation batch has: row i
    left-padded by i mod 16 tokens."""
    pads = torch.arange(ids.shape[0], device=ids.device)[:, None] % 16
    return (torch.arange(ids.shape[1], device=ids.device)[None] >= pads).long()


def run(args: argparse.Namespace) -> str:
    device = benchmark_device(args.quick)
    dtype = torch.float32 if args.quick else torch.bfloat16
    config = load_config(ModelConfig, TINY_CONFIG if args.quick else PAPER_CONFIG)
    batch_sizes = args.batch_sizes or ([1, 4] if args.quick else [1, 8, 32])
    length = args.length or (48 if args.quick else 1478)
    repeats = args.repeats or (2 if args.quick else 5)
    torch.manual_seed(0)
    with torch.device(device):
        llm = build_llm(config.llm, load_weights=False)
    llm = llm.to(device=device, dtype=dtype).eval()
    ssm = mamba_ssm_copy(llm)
    decoder = StaticStateDecoder(llm)
    embed = llm.get_input_embeddings()
    rows: list[list[str]] = []
    notes = [ssm] if isinstance(ssm, str) else []
    ratios = []
    profile_text = ""
    for batch in batch_sizes:
        ids = torch.randint(1, llm.config.vocab_size, (batch, length), device=device)
        calls = {
            "mamba_ssm MambaLMHeadModel forward": None if isinstance(ssm, str) else (
                lambda ids=ids: ssm(ids, num_last_tokens=1).logits[:, -1]
            ),
            "ours: StaticStateDecoder.prefill": lambda ids=ids: decoder.prefill(embed(ids), torch.ones_like(ids)),
            "ours, left-padded batch": lambda ids=ids: decoder.prefill(embed(ids), left_padding_mask(ids)),
            "transformers MambaForCausalLM forward": lambda ids=ids: llm(
                inputs_embeds=embed(ids), logits_to_keep=1, use_cache=False
            ).logits[:, -1],
        }
        ms = {}
        with torch.no_grad():
            for name, fn in calls.items():
                if fn is None:
                    continue
                cells = time_row(name, batch, length, fn, device, repeats)
                rows.append(cells)
                ms[name.split()[0].rstrip(":")] = float(cells[2])
            if args.profile and batch == batch_sizes[-1] and device.type == "cuda":
                profile_text = kernel_profile(calls["ours, left-padded batch"], top=20)
        for other in ("mamba_ssm", "transformers"):
            if other in ms:
                ratios.append(f"- batch {batch}: {other} ms / ours ms = {ms[other] / ms['ours']:.2f}x")
        del ids, calls
        free_memory(device)
    setup = (
        f"{config.llm.family} LLM of {config.name} ({sum(p.numel() for p in llm.parameters()) / 1e9:.2f} B "
        f"parameters), {str(dtype).removeprefix('torch.')}, {length} prompt tokens per sample, "
        f"median of {repeats} after a warm-up"
    )
    sections = [setup, markdown_table(HEADERS, rows), "\n".join(notes + ratios)]
    if profile_text:
        sections += [f"Our left-padded prefill's CUDA kernels at batch {batch_sizes[-1]} (benchmarks.profiling):",
                     profile_text]
    return write_report(args.out or default_out("prefill", args.quick), "LLM prefill: ours vs mamba_ssm vs transformers",
                        device, sections)


def main() -> None:
    run(build_parser().parse_args())


if __name__ == "__main__":
    main()
