"""Training data loading: samples/s of the real loader at the paper's geometry, beside what the GPU consumes.

    python -m benchmarks.data_loader                      # 512 records, workers 0 / 1 / 2 / 4 / 8 (as the CPUs allow)
    python -m benchmarks.data_loader --quick              # 48 records, workers 0 / 1 (CI)
    python -m benchmarks.data_loader --gpu-samples-per-s 7.7

What ``train/finetune.py`` runs to feed a step, timed alone on this machine's CPUs: LLaVA-format
records (one 640 x 480 JPEG, COCO's usual size, and a 64-token answer), ``LlavaDataset`` (tokenising
with the image's 1458 placeholders, opening the image once, each encoder's preprocessing at 384 px)
and ``VLMCollator`` in torch's ``DataLoader`` with ``num_workers`` processes and pinned memory, batches of
``--micro-batch``. The model is MambaVLM-2.8B's config built on the meta device (its transforms,
template and tokenizer; no weights). Reported: samples/s over a pass (worker start-up included), and the
headroom over ``--gpu-samples-per-s``, the samples/s one GPU trains (default: MambaVLM-2.8B on an H200,
``benchmarks/results/training_throughput.md``); a loader at 1x or less would starve the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


GPU_SAMPLES_PER_S = 5.79
"""MambaVLM-2.8B training on one H200 before issue 15 (8,812 tokens/s at 1522 tokens per sample)."""


def build_parser() -> argparse.ArgumentParser:
    """The command line, built before the imports below: --help and a usage error answer without
    loading torch, transformers and mambavlm (seconds)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="48 records, workers 0 and 1 (CI)")
    parser.add_argument("--records", type=int, help="records in the pass (default 512; 48 with --quick)")
    parser.add_argument("--workers", type=int, nargs="+", help="DataLoader num_workers values (default: up to the CPUs)")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--answer-words", type=int, default=64)
    parser.add_argument("--gpu-samples-per-s", type=float, default=GPU_SAMPLES_PER_S,
                        help=f"samples/s one GPU trains (default {GPU_SAMPLES_PER_S}: MambaVLM-2.8B, H200)")
    parser.add_argument("--out", type=Path, help="results file (default benchmarks/results/data_loader[-quick].md)")
    return parser


if __name__ == "__main__":  # --help and usage errors exit here, before the heavy imports
    build_parser().parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from benchmarks import PAPER_CONFIG  # noqa: E402
from benchmarks.report import default_out, markdown_table, write_report  # noqa: E402
from mambavlm.data.collate import VLMCollator  # noqa: E402
from mambavlm.llm.tokenizer import TINY_TOKENIZER  # noqa: E402
from mambavlm.model import build_model  # noqa: E402
from mambavlm.training.finetune import training_dataset  # noqa: E402

IMAGE_SIZE = (640, 480)
WORDS = "the red blue green circle square triangle is left right of above below a an and".split()


def write_records(directory: Path, count: int, answer_words: int, seed: int) -> Path:
    """``count`` records, each a 640 x 480 JPEG, a question and an answer of ``answer_words`` words."""
    rng = np.random.default_rng(seed)
    records = []
    for index in range(count):
        name = f"{index:05d}.jpg"
        pixels = rng.integers(0, 256, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / name, quality=90)
        answer = " ".join(rng.choice(WORDS, answer_words))
        records.append({"id": str(index), "image": name, "conversations": [
            {"from": "human", "value": "<image>\nwhat is in the picture ?"},
            {"from": "gpt", "value": answer},
        ]})
    path = directory / "train.json"
    path.write_text(json.dumps(records))
    return path


def samples_per_s(dataset: torch.utils.data.Dataset, collate: VLMCollator, workers: int, micro_batch: int) -> float:
    """One pass of the loader: its samples over its seconds, the workers' start-up included (a bound
    below the steady rate; timing from the first batch instead would count the batches the workers
    prefetched meanwhile as free)."""
    loader = DataLoader(dataset, batch_size=micro_batch, shuffle=True, num_workers=workers, collate_fn=collate,
                        pin_memory=torch.cuda.is_available(), drop_last=True)
    start, samples = time.perf_counter(), 0
    for batch in loader:
        samples += batch["input_ids"].shape[0]
    return samples / (time.perf_counter() - start)


def run(args: argparse.Namespace) -> str:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    counts = args.workers or [w for w in ([0, 1] if args.quick else [0, 1, 2, 4, 8, 16]) if w <= cpus]
    records = args.records or (48 if args.quick else 512)
    with torch.device("meta"):
        model = build_model(PAPER_CONFIG, [f"llm.tokenizer={TINY_TOKENIZER}"], load_weights=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        train = write_records(Path(tmp), records, args.answer_words, seed=0)
        dataset = training_dataset(model, train, None, None)
        tokens = len(dataset[0]["input_ids"])
        collate = VLMCollator(model.tokenizer.pad_token_id)
        for workers in counts:
            rate = samples_per_s(dataset, collate, workers, args.micro_batch)
            rows.append([str(workers), f"{rate:.1f}", f"{rate / args.gpu_samples_per_s:.1f}x"])
            print(markdown_table(["workers", "samples/s", "vs GPU"], [rows[-1]]).splitlines()[-1], flush=True)
    setup = (
        f"{PAPER_CONFIG.name} (meta weights): {records} records of a {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} JPEG + "
        f"{args.answer_words}-word answer ({tokens} tokens, {model.num_visual_tokens} visual), micro-batch "
        f"{args.micro_batch}, {cpus} CPUs; GPU consumption compared against: {args.gpu_samples_per_s:g} samples/s"
    )
    return write_report(
        args.out or default_out("data_loader", args.quick),
        "Training data loading vs the GPU's consumption",
        torch.device("cpu"),
        [setup, markdown_table(["DataLoader workers", "samples/s", "headroom over one GPU"], rows)],
    )


def main() -> None:
    run(build_parser().parse_args())


if __name__ == "__main__":
    main()
