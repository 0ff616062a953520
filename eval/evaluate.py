"""Score a trained MambaVLM by greedy exact match on a LLaVA-format JSON.

    python eval/evaluate.py --model OUTPUT_DIR/final --data VAL.json [--image-root DIR]
                            [--out answers.jsonl] [--batch-size N]

Each record's first question is answered greedily; the answers are written as JSONL rows
``{id, question, answer, reference, correct}`` and the exact-match accuracy is printed.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from mambavlm.atomic import atomic_file
from mambavlm.model import MambaVLM, is_mambavlm_directory
from mambavlm.training.evaluation import generate_answers, load_vqa_items
from mambavlm.training.finetune import FINAL_MODEL_DIR


def resolve_model_dir(path: Path) -> Path:
    """A saved model directory, or a training output directory holding one under ``final/``."""
    if not is_mambavlm_directory(path) and is_mambavlm_directory(path / FINAL_MODEL_DIR):
        return path / FINAL_MODEL_DIR
    return path


def main(argv: Sequence[str] | None = None) -> float | None:
    """Run the evaluation; returns the accuracy (None when nothing could be scored)."""
    parser = argparse.ArgumentParser(description="Greedy exact-match evaluation of a trained MambaVLM.")
    parser.add_argument("--model", type=Path, required=True, help="save_pretrained directory (or a run's output_dir)")
    parser.add_argument("--data", type=Path, required=True, help="LLaVA-format JSON")
    parser.add_argument("--image-root", type=Path, default=None, help="default: the JSON's directory")
    parser.add_argument("--out", type=Path, default=Path("answers.jsonl"), help="JSONL of answers")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--blind", action="store_true", help="replace every image by a blank grey one")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)

    model = MambaVLM.from_pretrained(resolve_model_dir(args.model)).to(args.device).eval()
    items = load_vqa_items(args.data, args.image_root)
    rows, skipped = generate_answers(model, items, args.batch_size, args.max_new_tokens, blind=args.blind)
    with atomic_file(args.out) as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    accuracy = sum(r["correct"] for r in rows) / len(rows) if rows else None
    shown = f"{accuracy:.4f}" if accuracy is not None else "n/a"
    print(f"exact match: {shown} ({sum(r['correct'] for r in rows)}/{len(rows)}; {len(skipped)} skipped)")
    print(f"answers written to {args.out}")
    return accuracy


if __name__ == "__main__":
    main()
