"""Training throughput: MambaVLM-2.8B beside mamba_ssm's bare Mamba-2.8B and a Transformer VLM.

    python -m benchmarks.training_throughput            # CUDA: paper config, bf16, 1522 and ~4x tokens
    python -m benchmarks.training_throughput --quick    # CPU: the tiny configs (CI)

Rows, measured one after another in one run, at each length (``--text-tokens``: 64, then enough for
about 4x the tokens, the visual tokens staying 1458):

- ours: MambaVLM's training forward (``MambaVLM.forward`` in train mode: mamba_ssm's block layout
  with the fused residual add + RMSNorm, each mixer computing in (B, L, D) around our Triton selective
  scan, the default training scan on CUDA, the LM head at the scored positions only);
- ours with mamba_ssm's fused mixer (CUDA with mamba_ssm, first length only): ours, each mixer
  ``mamba_inner_fn`` on ``in_proj`` in mamba_ssm's layout (``use_training_scan(lm, "mamba_ssm")``, the
  default before 2026-11-30): what the Triton scan pays, in time and in memory (``mamba_inner_fn``
  recomputes the conv output and delta in its backward; keeping them, ``checkpoint_lvl=0``, measured
  1.006x for +19.8 GiB on the H200 on 2026-11-30 and is not a row any more);
- ours with transformers' mixer call (first length only): ours, but each ``MambaMixer`` called as
  transformers calls it (``in_proj(h).transpose(1, 2)`` into ``mamba_inner_fn`` on CUDA) instead of in
  mamba_ssm's layout: what that layout pays against the row above (without gradient checkpointing:
  the recomputation would not see the switch);
- ours, transformers' layout: the same model through transformers' ``MambaForCausalLM`` forward
  (separate norm / add ops, float32 logits at every position): the path before issue 15;
- mamba_ssm: its own ``MambaLMHeadModel`` on the same LLM weights over the same number of tokens of
  text, loss on every position (the anchor, CUDA only);
- the Transformer VLM: the same vision encoders (frozen) and projector with a 2.8B LLaMA (SDPA).

A step is forward + backward + AdamW (fused on CUDA) over the trainable parameters (projector + LLM),
on samples of one image (the visual tokens) + text tokens with labels on the text. Parameters are
bf16 (float32 with --quick). The micro-batch starts at ``--micro-batch`` and is halved until a step
fits in memory. ``--loss-steps`` optimiser steps from one initialisation on the same batches through
both of our layouts give the loss curves compared at the end (largest relative difference), in
float32 (``--loss-dtype``), where the two layouts differ only in summation order. With SGD
(``--loss-optimizer``, the default) an update is proportional to its gradient, so the curves differ
as little as the gradients do; AdamW's first update is lr times the sign of each gradient, and on the
H200 (random weights, loss ~22) that moved near-zero-gradient weights apart until the curves differed
by 5 % after 20 steps although their first losses agreed to 2e-4.

At the first length, ``--larger-micro-batch`` (default 16 on CUDA) adds ours and mamba_ssm at that
micro-batch: what the memory ours saves (no vocabulary logits) buys. ``--profile`` (CUDA) adds the
kernels of one step of ours and of mamba_ssm at the first length (``benchmarks.profiling``).

Model FLOPs per step = 6 * N * tokens, N = trainable parameters (projector + LLM); the frozen
encoders' forward and attention's sequence-length term are left out, so the MFU is conservative.
MFU = model FLOPs/s over the GPU's dense bf16 peak (H100 and H200 SXM: 989 TFLOP/s); n/a elsewhere.
"""

from __future__ import annotations

import argparse
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock


OPTIMIZER_NAMES = {"sgd": "SGD", "adamw": "AdamW"}


def build_parser() -> argparse.ArgumentParser:
    """The command line, built before the imports below: --help and a usage error answer without
    loading torch, transformers and mambavlm (seconds)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny configs on the CPU (CI)")
    parser.add_argument(
        "--out", type=Path, help="results file (default benchmarks/results/training_throughput[-quick].md)"
    )
    parser.add_argument("--micro-batch", type=int, help="first micro-batch tried (default 8; 2 with --quick)")
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens per sample of the loss curves (default 64)")
    parser.add_argument("--text-tokens-list", type=int, nargs="+",
                        help="text tokens per sample of each timed length (default: 64 and 4630, 4x the tokens; 64 with --quick)")
    parser.add_argument("--loss-steps", type=int, help="steps of the loss curves (default 20; 4 with --quick)")
    parser.add_argument("--loss-lr", type=float, default=1e-4, help="learning rate of the loss curves")
    parser.add_argument("--loss-optimizer", choices=sorted(OPTIMIZER_NAMES), default="sgd",
                        help="optimiser of the loss curves (sgd: updates proportional to the gradients)")
    parser.add_argument("--steps", type=int, help="timed steps (default 5; 2 with --quick)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute LLM activations")
    parser.add_argument("--loss-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="parameter dtype of the loss curves (default float32)")
    parser.add_argument("--larger-micro-batch", type=int, default=16,
                        help="ours and mamba_ssm again at this micro-batch, first length (CUDA; default 16)")
    parser.add_argument("--profile", action="store_true", help="+ the kernels of one step of ours and mamba_ssm (CUDA)")
    return parser


if __name__ == "__main__":  # --help and usage errors exit here, before the heavy imports
    build_parser().parse_args()

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from benchmarks import PAPER_CONFIG, TINY_CONFIG  # noqa: E402
from benchmarks.prefill import mamba_ssm_copy  # noqa: E402
from benchmarks.profiling import kernel_profile  # noqa: E402
from benchmarks.report import default_out, markdown_table, peak_flops, write_report  # noqa: E402
from benchmarks.timing import (  # noqa: E402
    benchmark_device,
    free_memory,
    median_seconds,
    peak_memory_gib,
    reset_peak_memory,
)
from mambavlm.config import LLMConfig, ModelConfig, load_config  # noqa: E402
from mambavlm.llm import mamba_training  # noqa: E402
from mambavlm.llm.factory import enable_activation_checkpointing  # noqa: E402
from mambavlm.llm.tokenizer import IMAGE_TOKEN_INDEX  # noqa: E402
from mambavlm.model import MambaVLM, build_model  # noqa: E402

TRANSFORMER_2_8B = {
    "hidden_size": 2560,
    "intermediate_size": 6912,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 8192,
}
"""A LLaMA of about Mamba-2.8B's size (2.8B parameters with its vocabulary)."""

TRANSFORMER_TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}

def transformer_variant(cfg: ModelConfig, llama_fields: dict[str, Any]) -> ModelConfig:
    """The same VLM config with a LLaMA (SDPA attention) of the given shape as its LLM."""
    llm = LLMConfig(
        family="llama",
        config={**llama_fields, "vocab_size": cfg.llm.config["vocab_size"]},
        template="plain",
        dtype=cfg.llm.dtype,
    )
    return cfg.model_copy(update={"name": f"{cfg.name}-transformer", "llm": llm})


@dataclass
class Result:
    name: str
    trainable_params: int
    micro_batch: int
    step_s: float
    tokens_per_sample: int
    peak_gib: float | None
    profile: str = ""
    """The kernels of one step (``--profile``), markdown."""

    @property
    def tokens_per_s(self) -> float:
        return self.micro_batch * self.tokens_per_sample / self.step_s

    def cells(self, peak: float | None) -> list[str]:
        tokens_per_s = self.tokens_per_s
        flops = 6 * self.trainable_params * tokens_per_s
        mfu = "n/a" if peak is None else f"{100 * flops / peak:.1f} %"
        memory = "n/a" if self.peak_gib is None else f"{self.peak_gib:.1f}"
        return [
            self.name,
            f"{self.trainable_params / 1e6:,.1f} M",
            str(self.micro_batch),
            f"{1e3 * self.step_s:.1f}",
            f"{self.micro_batch / self.step_s:.2f}",
            f"{tokens_per_s:,.0f}",
            f"{flops / 1e12:.2f}",
            mfu,
            memory,
        ]


HEADERS = [
    "model", "trainable params", "micro-batch", "step ms", "samples/s", "tokens/s", "model TFLOP/s", "MFU",
    "peak GiB",
]


def attention_note(model: MambaVLM) -> str:
    """", <attention implementation>" for attention LLMs, "" for Mamba."""
    implementation = getattr(model.llm.config, "_attn_implementation", None)
    return f", {implementation}" if model.config.llm.family == "llama" else ""


def make_batch(model: MambaVLM, micro_batch: int, text_tokens: int, device: torch.device) -> dict[str, Any]:
    """Random samples: text, then the image's placeholders, then text; labels on the text only."""
    vocab = model.llm.config.vocab_size
    visual = model.num_visual_tokens
    text = torch.randint(1, vocab, (micro_batch, text_tokens), device=device)
    half = text_tokens // 2
    image = torch.full((micro_batch, visual), IMAGE_TOKEN_INDEX, device=device)
    input_ids = torch.cat([text[:, :half], image, text[:, half:]], dim=1)
    labels = input_ids.masked_fill(input_ids == IMAGE_TOKEN_INDEX, -100)
    dtype = next(model.projector.parameters()).dtype
    pixels = [
        torch.randn(micro_batch, 3, enc.image_size, enc.image_size, device=device, dtype=dtype)
        for enc in model.config.vision.encoders
    ]
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": pixels,
        "labels": labels,
    }


LAYOUTS = ("ours", "transformers")
LONG_TEXT_TOKENS = 4630
"""Text tokens that take a paper sample (1458 visual + 64 text = 1522) to 4x its length (6088)."""


def vlm_loss(model: MambaVLM, batch: dict[str, Any], layout: str) -> Tensor:
    """The step loss through our training forward (``"ours"``; ``"ours-mamba-inner"`` after
    ``use_training_scan(lm, "mamba_ssm")``; ``"ours-hf-mixer"``: with transformers' mixer call), or
    through transformers' LLM forward (``"transformers"``)."""
    if layout in ("ours", "ours-mamba-inner"):
        return model(**batch).loss
    if layout == "ours-hf-mixer":  # every mixer falls back to transformers' own forward
        with mock.patch.object(mamba_training, "resolve_training_scan", lambda *args: None):
            return model(**batch).loss
    embeds = model.embed(batch["input_ids"], batch["pixel_values"])
    return model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def build(cfg: ModelConfig, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> MambaVLM:
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg, load_weights=False, load_tokenizer=False)
    model = model.to(dtype=dtype).train()
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model.llm)
    return model


def timed(name: str, module: torch.nn.Module, loss_fn: Callable[[int], tuple[Tensor, int]],
          args: argparse.Namespace, device: torch.device, micro_batch: int, profile: bool = False) -> Result:
    """Time AdamW steps of ``module`` on ``loss_fn(micro_batch)`` -> (loss, tokens per sample), the
    micro-batch halved until a step fits; ``profile``: + the kernels of one more step (CUDA)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
    tokens = 0

    def step() -> None:
        nonlocal tokens
        loss, tokens = loss_fn(micro_batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    while True:
        try:
            reset_peak_memory(device)
            seconds = median_seconds(step, device, args.steps, warmup=2)
            break
        except torch.cuda.OutOfMemoryError:
            if micro_batch == 1:
                raise
            optimizer.zero_grad(set_to_none=True)
            micro_batch //= 2
        free_memory(device)  # out of the except block, the failed step's tensors are unreferenced
    result = Result(name, sum(p.numel() for p in trainable), micro_batch, seconds, tokens, peak_memory_gib(device))
    if profile and device.type == "cuda":
        result.profile = kernel_profile(step, top=25, unit="step")
    print(f"{name}: micro-batch {micro_batch} x {tokens} tokens, {result.tokens_per_s:,.0f} tokens/s, "
          f"peak {result.peak_gib} GiB", flush=True)
    return result


def measure(cfg: ModelConfig, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
            text_tokens: int, layout: str, micro_batch: int | None = None, profile: bool = False) -> Result:
    """Build the VLM and time its training steps through ``layout``."""
    model = build(cfg, args, device, dtype)
    if layout == "ours-mamba-inner":
        mamba_training.use_training_scan(model.llm, "mamba_ssm")
    batches: dict[int, dict[str, Any]] = {}

    def loss_fn(micro_batch: int) -> tuple[Tensor, int]:
        batch = batches.setdefault(micro_batch, make_batch(model, micro_batch, text_tokens, device))
        return vlm_loss(model, batch, layout), batch["input_ids"].shape[1]

    if cfg.llm.family == "mamba":
        name = f"ours: {cfg.name}" + {"ours": "", "ours-mamba-inner": ", mamba_ssm's mamba_inner_fn",
                                      "ours-hf-mixer": ", transformers' mixer call",
                                      "transformers": ", transformers' layout (before)"}[layout]
    else:
        name = f"Transformer VLM: {cfg.name} ({type(model.llm).__name__}{attention_note(model)})"
    return timed(name, model, loss_fn, args, device, micro_batch or args.micro_batch, profile)


def measure_mamba_ssm(cfg: ModelConfig, args: argparse.Namespace, device: torch.device, dtype: torch.dtype,
                      tokens: int, micro_batch: int | None = None, profile: bool = False) -> Result | str:
    """mamba_ssm's ``MambaLMHeadModel`` on the VLM's LLM weights, ``tokens`` of text per sample, the
    loss on every position; or why it cannot run here."""
    llm = build(cfg, args, device, dtype).llm
    model = mamba_ssm_copy(llm)
    del llm
    if isinstance(model, str):
        return model
    model.train()
    if args.gradient_checkpointing:
        return "mamba_ssm: skipped (its MambaLMHeadModel has no gradient checkpointing)"
    vocab = cfg.llm.config["vocab_size"]
    batches: dict[int, Tensor] = {}

    def loss_fn(micro_batch: int) -> tuple[Tensor, int]:
        ids = batches.setdefault(micro_batch, torch.randint(1, vocab, (micro_batch, tokens), device=device))
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        return loss, tokens

    return timed(f"mamba_ssm MambaLMHeadModel ({cfg.llm.config['num_hidden_layers']} layers, text only)", model,
                 loss_fn, args, device, micro_batch or args.micro_batch, profile)


def crossover_tokens(short: tuple[Result, Result], long: tuple[Result, Result]) -> float | None:
    """Where ours would overtake the Transformer VLM: each model's seconds per token fitted as
    ``a + b L`` through its two measured lengths (attention's cost per token grows with L, Mamba's
    does not), the L at which the two lines meet; None when the Transformer's line does not climb
    faster than ours (no crossover ahead)."""
    lines = []
    for ours_or_transformer in (0, 1):
        first, second = short[ours_or_transformer], long[ours_or_transformer]
        x1, x2 = first.tokens_per_sample, second.tokens_per_sample
        y1, y2 = 1 / first.tokens_per_s, 1 / second.tokens_per_s
        slope = (y2 - y1) / (x2 - x1)
        lines.append((y1 - slope * x1, slope))
    (a_ours, b_ours), (a_t, b_t) = lines
    if b_t <= b_ours:
        return None
    return (a_ours - a_t) / (b_t - b_ours)


def crossover_note(short: tuple[Result, Result], long: tuple[Result, Result]) -> str:
    tokens = crossover_tokens(short, long)
    if tokens is None:
        return "- Crossover: none ahead (the Transformer VLM's time per token does not grow faster than ours)"
    return (f"- Crossover (extrapolated): ours would reach the Transformer VLM's tokens/s at about {tokens:,.0f} "
            f"tokens per sample (time per token fitted as a + b x length through {short[0].tokens_per_sample} and "
            f"{long[0].tokens_per_sample} tokens, per model)")




def loss_curves(cfg: ModelConfig, args: argparse.Namespace, device: torch.device) -> dict[str, list[float]]:
    """``--loss-steps`` steps of ``--loss-optimizer`` from one initialisation on the same batches, per layout."""
    curves = {}
    dtype = getattr(torch, args.loss_dtype)
    optimizers = {"sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}
    for layout in LAYOUTS:
        model = build(cfg, args, device, dtype)
        optimizer = optimizers[args.loss_optimizer]([p for p in model.parameters() if p.requires_grad], lr=args.loss_lr)
        generator = torch.Generator(device="cpu").manual_seed(1)
        losses = []
        for _ in range(args.loss_steps):
            torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
            batch = make_batch(model, 2, args.text_tokens, device)
            loss = vlm_loss(model, batch, layout)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves[layout] = losses
        del model, optimizer
        free_memory(device)
    return curves


def run(args: argparse.Namespace) -> str:
    device = benchmark_device(args.quick)
    args.micro_batch = args.micro_batch or (2 if args.quick else 8)
    args.steps = args.steps or (2 if args.quick else 5)
    args.loss_steps = args.loss_steps or (4 if args.quick else 20)
    dtype = torch.float32 if args.quick else torch.bfloat16
    config_path = TINY_CONFIG if args.quick else PAPER_CONFIG
    mamba_cfg = load_config(ModelConfig, config_path)
    transformer_cfg = transformer_variant(mamba_cfg, TRANSFORMER_TINY if args.quick else TRANSFORMER_2_8B)
    peak = peak_flops(device)
    sections, notes = [], []
    lengths = args.text_tokens_list or ([args.text_tokens] if args.quick else [args.text_tokens, LONG_TEXT_TOKENS])
    larger = None if args.quick or device.type != "cuda" else args.larger_micro_batch
    pairs: list[tuple[Result, Result]] = []
    profiles = []
    for index, text_tokens in enumerate(lengths):
        # room for the longer samples: max_length is the visual tokens' bound + the text
        ours_cfg, other_cfg = (c.model_copy(update={"max_length": c.max_length + text_tokens})
                               for c in (mamba_cfg, transformer_cfg))
        profile = args.profile and index == 0
        layouts = ["ours", "transformers"]
        if index == 0 and not args.gradient_checkpointing:
            layouts.insert(1, "ours-hf-mixer")
        if index == 0 and device.type == "cuda" and importlib.util.find_spec("mamba_ssm") is not None:
            layouts.insert(1, "ours-mamba-inner")
        rows = [measure(ours_cfg, args, device, dtype, text_tokens, layout, profile=profile and layout == "ours")
                for layout in layouts]
        anchor = measure_mamba_ssm(ours_cfg, args, device, dtype, rows[0].tokens_per_sample, profile=profile)
        free_memory(device)
        rows.append(measure(other_cfg, args, device, dtype, text_tokens, "ours"))
        free_memory(device)
        ours, before, transformer = rows[0], rows[len(layouts) - 1], rows[-1]
        if isinstance(anchor, Result):
            rows.insert(len(layouts), anchor)
        lines = [f"- ours / transformers' layout: {ours.tokens_per_s / before.tokens_per_s:.2f}x tokens/s"]
        if "ours-mamba-inner" in layouts:
            inner = rows[layouts.index("ours-mamba-inner")]
            lines.append(f"- the Triton selective scan (ours) against mamba_ssm's mamba_inner_fn: "
                         f"{ours.tokens_per_s / inner.tokens_per_s:.3f}x tokens/s, "
                         f"{ours.peak_gib - inner.peak_gib:+.1f} GiB peak")
        if "ours-hf-mixer" in layouts:
            hf_mixer = rows[layouts.index("ours-hf-mixer")]
            in_layout = rows[layouts.index("ours-mamba-inner")] if "ours-mamba-inner" in layouts else ours
            lines.append(f"- the mixer in mamba_ssm's layout: {in_layout.tokens_per_s / hf_mixer.tokens_per_s:.3f}x "
                         "tokens/s against transformers' mixer call")
        if isinstance(anchor, Result):
            lines.append(f"- ours / mamba_ssm LM: {ours.tokens_per_s / anchor.tokens_per_s:.2f}x tokens/s (target >= 1.0x)")
        else:
            lines.append(f"- {anchor}")
        if index == 0 and larger:
            ours_larger = measure(ours_cfg, args, device, dtype, text_tokens, "ours", micro_batch=larger)
            free_memory(device)
            rows.append(ours_larger)
            anchor_larger = measure_mamba_ssm(ours_cfg, args, device, dtype, rows[0].tokens_per_sample, larger)
            free_memory(device)
            if isinstance(anchor_larger, Result):
                rows.append(anchor_larger)
                lines.append(f"- at micro-batch {larger} (halved where it did not fit): ours / mamba_ssm LM "
                             f"{ours_larger.tokens_per_s / anchor_larger.tokens_per_s:.2f}x tokens/s; ours at "
                             f"{ours_larger.micro_batch} / mamba_ssm at {anchor.micro_batch}: "
                             f"{ours_larger.tokens_per_s / anchor.tokens_per_s:.2f}x")
        profiles += [f"Kernels of one training step at {r.tokens_per_sample} tokens, {r.name} (micro-batch "
                     f"{r.micro_batch}):\n\n{r.profile}" for r in rows if r.profile]
        table = markdown_table(HEADERS, [r.cells(peak) for r in rows])
        visual = ours.tokens_per_sample - text_tokens
        lines.append(f"- ours / Transformer VLM: {ours.tokens_per_s / transformer.tokens_per_s:.2f}x tokens/s")
        sections += [f"{ours.tokens_per_sample} tokens per sample ({visual} visual + {text_tokens} text):", table,
                     "\n".join(lines)]
        pairs.append((ours, transformer))
    if len(pairs) >= 2:
        notes.append(crossover_note(pairs[0], pairs[-1]))
    curves = loss_curves(mamba_cfg, args, device)
    difference = max(abs(a - b) / abs(b) for a, b in zip(curves["ours"], curves["transformers"], strict=True))
    notes.append(
        f"Loss curves, {args.loss_dtype}, {args.loss_steps} {OPTIMIZER_NAMES[args.loss_optimizer]} steps (lr "
        f"{args.loss_lr:g}, micro-batch 2, one "
        "initialisation, the "
        f"same batches): largest relative difference ours vs transformers' layout {difference:.1e}\n\n"
        + markdown_table(["layout", "losses"], [[k, " ".join(f"{x:.4f}" for x in v)] for k, v in curves.items()])
    )
    peak_text = "n/a" if peak is None else f"{peak / 1e12:.0f} TFLOP/s"
    setup = (
        f"{config_path.name}, {str(dtype).removeprefix('torch.')} parameters, AdamW, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}; median step time over {args.steps} steps after 2 warm-up "
        f"steps; dense bf16 peak {peak_text}"
    )
    return write_report(
        args.out or default_out("training_throughput", args.quick),
        "Training throughput: MambaVLM vs mamba_ssm's LM vs a Transformer VLM",
        device,
        [setup, *sections, *notes, *profiles],
    )


def main() -> None:
    run(build_parser().parse_args())


if __name__ == "__main__":
    main()
