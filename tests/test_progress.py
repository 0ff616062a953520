"""mambavlm.progress: a bar on a terminal, a log line at each tenth of the work elsewhere."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from mambavlm.progress import Progress

LOGGER = logging.getLogger("tests.progress")


class Stream(io.StringIO):
    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


def run(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, total: int, steps: list[int],
        terminal: bool, enabled: bool = True) -> tuple[list[str], str]:
    stream = Stream(terminal)
    monkeypatch.setattr(sys, "stderr", stream)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOGGER.name), Progress(total, "generate", "batches", enabled, LOGGER) as p:
        for n in steps:
            p.update(n)
    return [r.getMessage() for r in caplog.records if r.name == LOGGER.name], stream.getvalue()


def test_in_a_log_file_a_line_marks_each_tenth_and_no_bar_is_drawn(monkeypatch, caplog) -> None:
    lines, drawn = run(monkeypatch, caplog, 20, [1] * 20, terminal=False)
    counts = [line.split(": ")[1].split(" ")[0] for line in lines]
    assert counts == [f"{n}/20" for n in range(2, 21, 2)]
    assert lines[0].startswith("generate: 2/20 batches (10%), ") and " elapsed, eta " in lines[0]
    assert lines[-1].startswith("generate: 20/20 batches (100%), ") and lines[-1].endswith("eta 0s")
    assert drawn == ""


def test_steps_that_jump_several_tenths_log_once_and_few_units_log_each(monkeypatch, caplog) -> None:
    lines, _ = run(monkeypatch, caplog, 100, [35, 5, 60], terminal=False)
    assert [line.split(" (")[0] for line in lines] == ["generate: 35/100 batches", "generate: 40/100 batches",
                                                       "generate: 100/100 batches"]
    lines, _ = run(monkeypatch, caplog, 3, [1, 1, 1], terminal=False)
    assert [line.split(" (")[0] for line in lines] == [f"generate: {n}/3 batches" for n in (1, 2, 3)]


def test_on_a_terminal_the_bar_is_drawn_and_nothing_logged(monkeypatch, caplog) -> None:
    lines, drawn = run(monkeypatch, caplog, 20, [1] * 20, terminal=True)
    assert lines == [] and "generate" in drawn and "20/20" in drawn


def test_disabled_it_shows_nothing_anywhere(monkeypatch, caplog) -> None:
    for terminal in (False, True):
        assert run(monkeypatch, caplog, 20, [1] * 20, terminal=terminal, enabled=False) == ([], "")

