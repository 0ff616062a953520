"""Training throughput: MambaVLM-2.8B beside a Transformer VLM of the same size, same token count.

    python -m benchmarks.training_throughput            # CUDA: paper config vs a 2.8B LLaMA (SDPA), bf16
    python -m benchmarks.training_throughput --quick    # CPU: the tiny config vs a tiny LLaMA (CI)

Both VLMs share the vision encoders (frozen) and the Mamba projector; only the LLM differs. A step is
forward + backward + AdamW (fused on CUDA) over the trainable parameters (projector + LLM), on
samples of one image (the visual tokens) + ``--text-tokens`` text tokens with labels on the text.
Parameters are bf16 (float32 with --quick). The micro-batch starts at ``--micro-batch`` and is
halved until a step fits in memory.

Model FLOPs per step = 6 * N * tokens, N = trainable parameters (projector + LLM); the frozen
encoders' forward and attention's sequence-length term are left out, so the MFU is conservative.
MFU = model FLOPs/s over the GPU's dense bf16 peak (H100 and H200 SXM: 989 TFLOP/s); n/a elsewhere.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.report import default_out, device_name, markdown_table, write_report
from benchmarks.timing import benchmark_device, free_memory, median_seconds, peak_memory_gib, reset_peak_memory
from mambavlm.config import LLMConfig, ModelConfig, load_config
from mambavlm.llm.tokenizer import IMAGE_TOKEN_INDEX
from mambavlm.model import MambaVLM, build_model

ROOT = Path(__file__).resolve().parents[1]
PAPER_CONFIG = ROOT / "configs" / "model" / "mambavlm-2.8b.yaml"
TINY_CONFIG = ROOT / "configs" / "model" / "tiny.yaml"

TRANSFORMER_2_8B = {
    "hidden_size": 2560,
    "intermediate_size": 6912,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
}
"""A LLaMA of about Mamba-2.8B's size (2.8B parameters with its vocabulary)."""

TRANSFORMER_TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}

PEAK_BF16_DENSE_FLOPS = {"H100": 989e12, "H200": 989e12}
"""Dense bf16 tensor-core peak by GPU name (SXM parts)."""


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, looked up by name; None when unknown (or the CPU)."""
    if device.type != "cuda":
        return None
    name = device_name(device)
    return next((flops for key, flops in PEAK_BF16_DENSE_FLOPS.items() if key in name), None)


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

    def cells(self, peak: float | None) -> list[str]:
        tokens_per_s = self.micro_batch * self.tokens_per_sample / self.step_s
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


def measure(
    cfg: ModelConfig, args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> Result:
    """Build the VLM, find a micro-batch that fits, and time training steps."""
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(cfg, load_weights=False, load_tokenizer=False)
    model = model.to(dtype=dtype).train()
    if args.gradient_checkpointing:
        model.llm.gradient_checkpointing_enable()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
    micro_batch = args.micro_batch

    def step(batch: dict[str, Any]) -> Tensor:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    while True:
        batch = make_batch(model, micro_batch, args.text_tokens, device)
        try:
            reset_peak_memory(device)
            seconds = median_seconds(lambda: step(batch), device, args.steps, warmup=2)
            break
        except torch.cuda.OutOfMemoryError:
            if micro_batch == 1:
                raise
            optimizer.zero_grad(set_to_none=True)
            micro_batch //= 2
        free_memory(device)  # out of the except block, the failed step's tensors are unreferenced
    result = Result(
        name=f"{cfg.name} ({type(model.llm).__name__}{attention_note(model)})",
        trainable_params=sum(p.numel() for p in trainable),
        micro_batch=micro_batch,
        step_s=seconds,
        tokens_per_sample=batch["input_ids"].shape[1],
        peak_gib=peak_memory_gib(device),
    )
    return result


def run(args: argparse.Namespace) -> str:
    device = benchmark_device(args.quick)
    args.micro_batch = args.micro_batch or (2 if args.quick else 8)
    args.steps = args.steps or (2 if args.quick else 5)
    dtype = torch.float32 if args.quick else torch.bfloat16
    config_path = TINY_CONFIG if args.quick else PAPER_CONFIG
    mamba_cfg = load_config(ModelConfig, config_path)
    transformer_cfg = transformer_variant(mamba_cfg, TRANSFORMER_TINY if args.quick else TRANSFORMER_2_8B)
    results = []
    for cfg in (mamba_cfg, transformer_cfg):
        results.append(measure(cfg, args, device, dtype))
        free_memory(device)
    peak = peak_flops(device)
    mamba, transformer = results
    mamba_tps = mamba.micro_batch * mamba.tokens_per_sample / mamba.step_s
    transformer_tps = transformer.micro_batch * transformer.tokens_per_sample / transformer.step_s
    visual = mamba.tokens_per_sample - args.text_tokens
    peak_text = "n/a" if peak is None else f"{peak / 1e12:.0f} TFLOP/s"
    setup = (
        f"{config_path.name}: {mamba.tokens_per_sample} tokens per sample ({visual} visual + {args.text_tokens} "
        f"text), {str(dtype).removeprefix('torch.')} parameters, AdamW, gradient checkpointing "
        f"{'on' if args.gradient_checkpointing else 'off'}; median step time over {args.steps} steps; "
        f"dense bf16 peak {peak_text}"
    )
    summary = f"- Mamba VLM vs Transformer VLM, tokens/s: {mamba_tps / transformer_tps:.2f}x"
    return write_report(
        args.out or default_out("training_throughput", args.quick),
        "Training throughput: Mamba VLM vs Transformer VLM",
        device,
        [setup, markdown_table(HEADERS, [r.cells(peak) for r in results]), summary],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny configs on the CPU (CI)")
    parser.add_argument(
        "--out", type=Path, help="results file (default benchmarks/results/training_throughput[-quick].md)"
    )
    parser.add_argument("--micro-batch", type=int, help="first micro-batch tried (default 8; 2 with --quick)")
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens per sample (default 64)")
    parser.add_argument("--steps", type=int, help="timed steps (default 5; 2 with --quick)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute LLM activations")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
