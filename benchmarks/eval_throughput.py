"""Evaluation throughput: samples/s of the evaluation loop, batched, fast path vs HF generate.

    python -m benchmarks.eval_throughput            # CUDA: MambaVLM-2.8B, bf16, batch 1 / 8 / 32 / 64
    python -m benchmarks.eval_throughput --quick    # CPU: the tiny config (CI)
    python -m benchmarks.eval_throughput --profile  # + where the GPU idles in the loop (largest batch)

What ``eval/run.py`` does per batch, timed end to end through the same function
(``mambavlm.training.evaluation.iter_answers``), with random weights and nothing downloaded: each
sample is a 640 x 480 JPEG on disk (COCO's usual size), opened, decoded and preprocessed by every
encoder (the next batch's in background threads while this one generates), and a question of 8-24
words with the image's placeholders, left-padded to the batch; at most ``--new-tokens`` (16) greedy
tokens. The paper model is given the project's word-level tokenizer (its own is a download; the words
are ids below its vocabulary). Rows: our static-state decoder (CUDA-graph steps on CUDA) and
transformers' ``generate`` on the same model, at each batch size, over ``--samples`` questions (the
first ``--hf-samples`` of them for the slow HF rows); samples/s = samples / wall seconds, and peak
memory. A second table times the fast path's
stages one after another, synchronised (no overlap), to show where the time goes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The command line, built before the imports below: --help and a usage error answer without
    loading torch, transformers and mambavlm (seconds)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny config on the CPU (CI)")
    parser.add_argument("--out", type=Path, help="results file (default benchmarks/results/eval_throughput[-quick].md)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="default 1 8 32 64 (1 4 with --quick)")
    parser.add_argument("--samples", type=int, help="questions per row of ours (default 256; 8 with --quick)")
    parser.add_argument("--hf-samples", type=int, help="questions per HF generate row (default 64; 8 with --quick)")
    parser.add_argument("--profile", action="store_true", help="+ where the GPU idles in the loop (CUDA only)")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per answer (default 16)")
    return parser


if __name__ == "__main__":  # --help and usage errors exit here, before the heavy imports
    build_parser().parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchmarks import PAPER_CONFIG, TINY_CONFIG  # noqa: E402
from benchmarks.profiling import gpu_idle_profile  # noqa: E402
from benchmarks.report import default_out, markdown_table, write_report  # noqa: E402
from benchmarks.timing import benchmark_device, free_memory, peak_memory_gib, reset_peak_memory, synchronize  # noqa: E402
from mambavlm.generation.settings import GenerationSettings  # noqa: E402
from mambavlm.llm.tokenizer import IMAGE_TOKEN, TINY_TOKENIZER  # noqa: E402
from mambavlm.model import MambaVLM, build_model  # noqa: E402
from mambavlm.processing import left_pad  # noqa: E402
from mambavlm.training.evaluation import iter_answers  # noqa: E402
from mambavlm.vision.image import open_image  # noqa: E402

IMAGE_SIZE = (640, 480)
TARGET_SAMPLES_PER_S = 25.0
"""Issue 11's target for MambaVLM-2.8B on one H200."""


@dataclass
class Row:
    path: str
    batch_size: int
    samples: int
    seconds: float
    peak_gib: float | None
    agree: str

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds

    def cells(self) -> list[str]:
        peak = "n/a" if self.peak_gib is None else f"{self.peak_gib:.2f}"
        return [self.path, str(self.batch_size), str(self.samples), f"{self.seconds:.2f}",
                f"{self.samples_per_s:.2f}", peak, self.agree]


HEADERS = ["path", "batch", "samples", "seconds", "samples/s", "peak GiB", "first words equal to batch 1"]


WORDS = "what color shape is the object left right above below how many are there".split()


def make_items(model: MambaVLM, count: int, directory: Path, seed: int) -> list[tuple[str, Path, str]]:
    """``count`` random 640 x 480 JPEGs written to ``directory`` and questions of 8-24 words:
    (id, image path, prompt) as the evaluation loop takes them."""
    rng = np.random.default_rng(seed)
    items = []
    for index in range(count):
        path = directory / f"{index:04d}.jpg"
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8)).save(path, quality=90)
        words = rng.choice(WORDS, int(rng.integers(8, 25))).tolist()
        items.append((str(index), path, f"{IMAGE_TOKEN}\n{' '.join(words)} ?"))
    return items


def answer_all(model: MambaVLM, items: list[tuple[str, Path, str]], batch_size: int, new_tokens: int,
               fast: bool) -> dict[str, str]:
    """The evaluation loop over ``items``: question id -> answer."""
    answers: dict[str, str] = {}
    for batch, skipped in iter_answers(model, items, batch_size, new_tokens, show_progress=False, fast=fast):
        if skipped:
            raise RuntimeError(f"benchmark questions skipped: {skipped}")
        answers.update(batch)
    return answers


STAGES = ("open + preprocess (CPU)", "vision + projector", "LLM prefill", "decode")


def stage_seconds(model: MambaVLM, items: list[tuple[str, Path, str]], batch_size: int,
                  new_tokens: int) -> dict[str, float]:
    """The fast path's batches split into stages run one after another, each synchronised: seconds,
    after an untimed first batch (it allocates the decoder's state and captures its CUDA graph)."""
    device = model.device
    decoder = model.static_decoder()
    settings = GenerationSettings.from_generate_kwargs(
        {"max_new_tokens": new_tokens, "do_sample": False, "eos_token_id": None, "pad_token_id": 0},
        model.llm.generation_config,
    )
    totals = dict.fromkeys(STAGES, 0.0)
    starts = list(range(0, len(items), batch_size))
    for warm_up, start in zip([True] + [False] * len(starts), [0] + starts):  # the first batch captures the graph
        batch = items[start:start + batch_size]
        marks = [time.perf_counter()]
        ids = [model.build_prompt_ids(prompt, True) for _, _, prompt in batch]
        input_ids, attention_mask = left_pad(ids, model.tokenizer.pad_token_id)
        pixels = [p.to(device) for p in model.preprocess_images([open_image(path) for _, path, _ in batch])]
        synchronize(device)
        marks.append(time.perf_counter())
        embeds = model.embed(input_ids.to(device), pixels)
        synchronize(device)
        marks.append(time.perf_counter())
        logits = decoder.prefill(embeds, attention_mask.to(device), new_tokens)
        synchronize(device)
        marks.append(time.perf_counter())
        decoder.decode(logits, settings).cpu()
        marks.append(time.perf_counter())
        for stage, begin, end in zip(STAGES, marks, marks[1:]):
            totals[stage] += 0.0 if warm_up else end - begin
    return totals


def run(args: argparse.Namespace) -> str:
    device = benchmark_device(args.quick)
    dtype = torch.float32 if args.quick else torch.bfloat16
    config = TINY_CONFIG if args.quick else PAPER_CONFIG
    batch_sizes = args.batch_sizes or ([1, 4] if args.quick else [1, 8, 32, 64])
    num_samples = args.samples or (8 if args.quick else 256)
    hf_samples = min(num_samples, args.hf_samples or (8 if args.quick else 64))
    torch.manual_seed(0)
    with torch.device(device):
        model = build_model(config, [f"llm.tokenizer={TINY_TOKENIZER}"], load_weights=False)
    model = model.to(device=device, dtype=dtype).eval()

    rows: list[Row] = []
    reference: dict[bool, dict[str, str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        items = make_items(model, num_samples, Path(tmp), seed=0)
        for fast in (True, False):
            name = ("ours: static state" + (" + CUDA graph" if device.type == "cuda" else "")) if fast else "HF generate"
            row_items = items if fast else items[:hf_samples]
            for batch_size in batch_sizes:
                answer_all(model, items[:batch_size], batch_size, args.new_tokens, fast)  # warm-up
                reset_peak_memory(device)
                synchronize(device)
                start = time.perf_counter()
                answers = answer_all(model, row_items, batch_size, args.new_tokens, fast)
                synchronize(device)
                seconds = time.perf_counter() - start
                reference.setdefault(fast, answers)
                same = sum(_first_word(answers[k]) == _first_word(reference[fast][k]) for k in answers)
                rows.append(Row(name, batch_size, len(row_items), seconds, peak_memory_gib(device),
                                f"{same}/{len(row_items)} (vs batch {batch_sizes[0]})"))
                print(markdown_table(HEADERS, [rows[-1].cells()]).splitlines()[-1], flush=True)
                free_memory(device)
        stage_rows = []
        for batch_size in batch_sizes:
            totals = stage_seconds(model, items[:hf_samples], batch_size, args.new_tokens)
            whole = sum(totals.values())
            stage_rows.append([str(batch_size)]
                              + [f"{1e3 * totals[s] / hf_samples:.1f} ({100 * totals[s] / whole:.0f} %)" for s in STAGES]
                              + [f"{hf_samples / whole:.2f}"])
            free_memory(device)
        profile_text = ""
        if args.profile and device.type == "cuda":
            batch_size = batch_sizes[-1]
            profile_text = gpu_idle_profile(
                lambda: answer_all(model, items, batch_size, args.new_tokens, fast=True), gaps=12
            )
    fast_vs_hf = sum(_first_word(reference[True][k]) == _first_word(reference[False][k]) for k in reference[False])
    best = max((r for r in rows if r.path.startswith("ours")), key=lambda r: r.samples_per_s)
    lines = [
        f"- fast path vs HF generate at batch {batch_sizes[0]}: {fast_vs_hf}/{hf_samples} first words identical "
        "(random weights give near-uniform logits, so in bf16 a near-tie decides a token and the rest of the "
        "answer follows it; whole answers, batched and alone, fast and HF, are tested equal in float32: "
        "tests/test_model.py, tests/generation/)",
        f"- best: {best.samples_per_s:.1f} samples/s at batch {best.batch_size}"
        + ("" if args.quick else f" (target >= {TARGET_SAMPLES_PER_S:.0f}: "
           f"{'met' if best.samples_per_s >= TARGET_SAMPLES_PER_S else 'NOT met'})"),
    ]
    for batch_size in batch_sizes:
        ours = next(r for r in rows if r.batch_size == batch_size and r.path.startswith("ours"))
        hf = next(r for r in rows if r.batch_size == batch_size and r.path == "HF generate")
        lines.append(f"- batch {batch_size}: ours / HF generate = {ours.samples_per_s / hf.samples_per_s:.2f}x")
    setup = (
        f"{config.name}, {str(dtype).removeprefix('torch.')}, {model.num_visual_tokens} visual tokens + a question "
        f"of 8-24 words, {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEGs opened and preprocessed in the loop, at most "
        f"{args.new_tokens} new tokens, {num_samples} samples per row of ours and {hf_samples} of HF generate "
        "(the slow path) after a warm-up batch; a row's time includes opening its first batch's images, which "
        "nothing hides (the later batches' are prefetched)"
    )
    stage_table = markdown_table(["batch"] + [f"{s}: ms / sample" for s in STAGES] + ["samples/s"], stage_rows)
    sections = [setup, markdown_table(HEADERS, [r.cells() for r in rows]), "\n".join(lines),
                f"The fast path's stages one after another (synchronised, no overlap, one thread preprocessing; "
                f"{hf_samples} samples):", stage_table]
    if profile_text:
        sections += [f"Where the GPU idles in the loop (fast path, batch {batch_sizes[-1]}, {num_samples} samples, "
                     "torch.profiler):", profile_text]
    return write_report(
        args.out or default_out("eval_throughput", args.quick),
        "Evaluation throughput: the evaluation loop, fast path vs HF generate",
        device,
        sections,
    )


def _first_word(answer: str) -> str:
    return answer.split(" ", 1)[0]


def main() -> None:
    run(build_parser().parse_args())


if __name__ == "__main__":
    main()
