"""Write the file VQAv2's or VizWiz's evaluation server takes, as LLaVA-1.5's submission scripts do.

    python eval/submission.py vqav2 --answers answers.jsonl --questions llava_vqav2_mscoco_test2015.jsonl --out vqav2.json
    python eval/submission.py vizwiz --answers answers.jsonl --questions llava_test.jsonl --out vizwiz.json

The test splits' answers are not published, so these two benchmarks are scored by uploading this file
(EvalAI); every answer is normalised by the EvalAI answer processor first, as LLaVA does. Answers whose
question id is not in --questions (another benchmark's or split's) are refused, naming how many and the
first ids, and nothing is written.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark", choices=("vqav2", "vizwiz"))
    parser.add_argument("--answers", required=True, type=Path, help="answers JSONL (question_id, text)")
    parser.add_argument("--questions", required=True, type=Path, help="the question JSONL of the test split")
    parser.add_argument("--out", required=True, type=Path, help="the JSON file to upload")
    args = parser.parse_args(argv)
    # imported after parsing: importing mambavlm loads torch, transformers and the model (it registers
    # with transformers' Auto classes), seconds that --help and a usage error need not wait for
    from mambavlm.atomic import atomic_file
    from mambavlm.eval.benchmarks import read_answers
    from mambavlm.eval.scorers.vqa import vqa_submission

    try:
        predictions = {row["question_id"]: row["text"] for row in read_answers(args.answers)}
        if not args.questions.is_file():
            raise FileNotFoundError(f"question file not found: {args.questions}")
        lines = []
        for number, line in enumerate(args.questions.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{args.questions}: line {number}: not JSON ({err.msg})") from None
        rows = vqa_submission(args.benchmark, predictions, lines, str(args.questions),
                              f"{args.benchmark}: {args.answers} has answers")
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    with atomic_file(args.out) as f:
        json.dump(rows, f)
    print(f"wrote {len(rows)} answers to {args.out}")
    return args.out


if __name__ == "__main__":
    main()
