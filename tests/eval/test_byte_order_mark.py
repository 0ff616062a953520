"""Question, answers and LLaVA data files saved with a UTF-8 byte-order mark (Notepad, Excel's CSV-to-JSON
round trips, PowerShell's Out-File) read as without one: the mark had made the first question "not JSON"
(skipped), the answers file an error at line 1 and the LLaVA JSON "not a JSON file"."""

from __future__ import annotations

import json
from pathlib import Path

from mambavlm.data.llava import load_records
from mambavlm.eval.benchmarks import read_answers
from mambavlm.eval.questions import read_questions

BOM = "\ufeff"


def test_files_with_a_byte_order_mark_read_as_without_one(tmp_path: Path) -> None:
    questions = [{"question_id": 1, "image": "a.png", "text": "Is it red?"},
                 {"question_id": 2, "image": "b.png", "text": "Is it blue?"}]
    answers = [{"question_id": 1, "text": "yes"}, {"question_id": 2, "text": "no"}]
    records = [{"id": "r", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "é"}]}]
    for name, rows in (("questions.jsonl", questions), ("answers.jsonl", answers)):
        text = "\n".join(json.dumps(row) for row in rows) + "\n"
        (tmp_path / "plain").mkdir(exist_ok=True)
        (tmp_path / "marked").mkdir(exist_ok=True)
        (tmp_path / "plain" / name).write_text(text, encoding="utf-8")
        (tmp_path / "marked" / name).write_text(BOM + text, encoding="utf-8")
    for folder in ("plain", "marked"):
        (tmp_path / folder / "data.json").write_text((BOM if folder == "marked" else "") + json.dumps(records),
                                                      encoding="utf-8")
    read = {}
    for folder in ("plain", "marked"):
        found, problems = read_questions(tmp_path / folder / "questions.jsonl")
        read[folder] = ([(q.question_id, q.text) for q in found], problems,
                        read_answers(tmp_path / folder / "answers.jsonl"), load_records(tmp_path / folder / "data.json"))
    assert read["marked"] == read["plain"]
    assert [qid for qid, _ in read["plain"][0]] == ["1", "2"] and read["plain"][1] == []
    assert [row["text"] for row in read["plain"][2]] == ["yes", "no"] and read["plain"][3] == records
