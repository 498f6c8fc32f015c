"""The driver's progress output: a bar on a terminal, plain lines in a log."""

from __future__ import annotations

import re
import sys

from scanner.driver import Progress


def test_progress_in_a_log_is_plain_lines_and_one_final_line(capsys, monkeypatch):
    # A bar redrawn with carriage returns piles up in a log (its last state twice).
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.setattr(Progress, "LOG_EVERY_S", 0.0)  # a line at every update
    progress = Progress(total=10, done=2, unit="img", desc="scan")
    progress(3)
    progress(5)  # the last update: the final line says it, once
    progress.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("scan: 5/10 img (50%), ") and lines[0].endswith(" s left")
    assert len(lines) == 2
    assert re.fullmatch(r"scan: 10/10 img \(100%\) in \d+\.\d s, [\d.e+]+ img/s", lines[1])
    assert progress.fresh == 8


def test_progress_lines_are_spaced_in_time(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    progress = Progress(total=1000, done=0, unit="img", desc="scan")  # LOG_EVERY_S = 30
    for _ in range(999):
        progress(1)
    progress.close()  # interrupted before the end: the line says how far it came
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("scan: 999/1,000 img (99%) in ")


def test_progress_on_a_terminal_is_a_bar(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    progress = Progress(total=4, done=0, unit="img", desc="scan")
    progress(4)
    assert progress.bar is not None and progress.bar.n == 4
    progress.close()
