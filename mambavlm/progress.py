"""Progress a person can follow: a bar on a terminal, log lines in a log file or a pipe.

A tqdm bar redraws itself with carriage returns: on a terminal that is one line moving, in a file or a
pipe (``python eval/run.py ... > log 2>&1``, a scheduler's output file) hundreds of redraws run into
one line between the log lines. ``Progress`` shows the bar on a terminal only and, elsewhere, writes
a log line at every tenth of the work.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType

from tqdm.auto import tqdm

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float) -> str:
    """Seconds as a log line shows them: ``42s``, ``4m31s``, ``2h05m``."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """``total`` units of work (``unit``, e.g. ``"batches"``) called ``desc``: a tqdm bar while stderr is a
    terminal; otherwise a line on ``logger`` (INFO) as each tenth of the work is done, e.g.
    ``generate: 12/120 batches (10%), 42s elapsed, eta 6m18s``. Nothing when not ``enabled`` (another
    process's share of the work, a caller that shows its own). A context manager; ``update(n)`` counts
    n units done."""

    def __init__(self, total: int, desc: str, unit: str, enabled: bool, logger: logging.Logger) -> None:
        self.total, self.desc, self.unit, self.logger = total, desc, unit, logger
        terminal = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=f" {unit}", disable=not enabled or not terminal)
        self.log_lines = enabled and not terminal
        self.marks = {-(-total * tenth // 10) for tenth in range(1, 11)}  # the counts at 10 %, 20 %, ... 100 %
        self.done = 0
        self.start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        self.bar.update(n)
        if self.log_lines and any(before < mark <= self.done for mark in self.marks):
            elapsed = time.perf_counter() - self.start
            remaining = elapsed / self.done * (self.total - self.done)
            self.logger.info(
                f"{self.desc}: {self.done}/{self.total} {self.unit} ({self.done / self.total:.0%}), "
                f"{format_duration(elapsed)} elapsed, eta {format_duration(remaining)}"
            )

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()
