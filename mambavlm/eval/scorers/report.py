"""What every scorer returns: the overall score and its breakdowns, in percent as the reference prints."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "ScoreReport",
    "format_report",
    "reject_unknown_ids",
]


def reject_unknown_ids(predictions: Iterable[str], known: Iterable[str], where: str) -> None:
    """Raise ValueError naming (up to 20 of) the prediction ids that ``known`` lacks (``where``: what the
    known ids are, for the message)."""
    unknown = sorted(set(predictions) - set(known))
    if unknown:
        named = ", ".join(unknown[:20]) + (f" and {len(unknown) - 20} more" if len(unknown) > 20 else "")
        raise ValueError(f"predictions for {len(unknown)} questions not in {where}: {named}")


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
