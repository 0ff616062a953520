"""What every scorer returns: the overall score and its breakdowns, in percent as the reference prints."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ScoreReport",
    "format_report",
    "reject_unknown_ids",
    "unknown_ids_message",
]


def unknown_ids_message(unknown: Sequence[str], where: str, subject: str = "predictions", first: int = 5) -> str:
    """The one-line message "<subject> for <n> questions not in <where>: <the first ``first`` ids> and <k> more"."""
    named = ", ".join(unknown[:first]) + (f" and {len(unknown) - first} more" if len(unknown) > first else "")
    return f"{subject} for {len(unknown)} questions not in {where}: {named}"


def reject_unknown_ids(
    predictions: Iterable[str], known: Iterable[str], where: str, subject: str = "predictions", first: int = 5
) -> None:
    """Raise ValueError naming how many of the prediction ids ``known`` lacks and the first ``first`` of them,
    in the predictions' order (``where``: what the known ids are, e.g. the files, for the message;
    ``subject``: what holds the ids)."""
    held = known if isinstance(known, (set, frozenset, Mapping)) else set(known)
    unknown = list(dict.fromkeys(qid for qid in predictions if qid not in held))
    if unknown:
        raise ValueError(unknown_ids_message(unknown, where, subject, first))


@dataclass
class ScoreReport:
    """A benchmark's result.

    overall: the headline number, in percent unless ``unit`` says otherwise (MME reports points),
    rounded as the reference scorer prints it. breakdowns: named groups -> {group value: score}, e.g.
    {"answer_type": {"yes/no": 91.2, "number": 60.1, "other": 70.3}}. counts: how many items went in
    (and, where a scorer skips some, how many it skipped and why). unit: "percent" or "points".
    """

    benchmark: str
    overall: float
    breakdowns: dict[str, dict[str, float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    unit: str = "percent"

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "overall": self.overall,
            "unit": self.unit,
            "breakdowns": self.breakdowns,
            "counts": self.counts,
        }


def format_report(report: ScoreReport) -> str:
    """A ScoreReport as a markdown table a person reads: overall, then each breakdown's groups."""
    unit = "" if report.unit == "points" else " %"
    lines = ["| score | value |", "|---|---|", f"| {report.benchmark} overall | {report.overall}{unit} |"]
    for name, groups in report.breakdowns.items():
        lines += [f"| {name}: {group} | {value}{unit} |" for group, value in groups.items()]
    lines += [f"| count: {name} | {value} |" for name, value in report.counts.items()]
    return "\n".join(lines)
