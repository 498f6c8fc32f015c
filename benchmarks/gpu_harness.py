"""The GPU suite's harness: figures as JSON lines, time caps, sections that fail alone, timing.

Nothing here knows what is measured (benchmarks/gpu_suite.py does): a section is a function
of a context whose `rec` is a `Recorder`; `run_sections` runs each under a time cap inside a
budget and turns whatever it raises into a line.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch

MIN_SECTION_S = 5.0  # a section is not started with less of the budget left


# ---------------------------------------------------------------- recording


class Recorder:
    """One JSON line per figure, printed and appended to a file (fsync'd) when measured."""

    def __init__(self, out: Path | None, common: dict) -> None:
        self.out = out
        self.common = common
        self.lines: list[dict] = []
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)

    def emit(
        self,
        section: str,
        figure: str,
        label: str,
        value: float | None,
        unit: str | None,
        status: str = "ok",
        **details,
    ) -> dict:
        line = {
            "section": section,
            "figure": figure,
            "label": label,
            "value": value,
            "unit": unit,
            "status": status,
            **details,
            **self.common,
        }
        text = json.dumps(line, default=str)
        print(text, flush=True)
        if self.out is not None:
            with self.out.open("a", encoding="utf-8") as sink:
                sink.write(text + "\n")
                sink.flush()
                os.fsync(sink.fileno())
        self.lines.append(line)
        return line

    def error(self, section: str, exc: BaseException) -> dict:
        tail = traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:]
        return self.emit(
            section,
            "error",
            f"{type(exc).__name__}: {exc}"[:200],
            None,
            None,
            status="error",
            error_type=type(exc).__name__,
            message=str(exc),
            traceback="".join(tail),
        )

    def summary(self) -> str:
        """A Markdown table of every line: ready to paste into docs/performance.md."""
        rows = ["| section | figure | setting | value | unit | status |", "| --- " * 6 + "|"]
        for line in self.lines:
            value = line["value"]
            shown = "" if value is None else f"{value:,.4g}" if isinstance(value, float) else value
            cells = (line["section"], line["figure"], line["label"], shown, line["unit"] or "")
            cells = [" ".join(str(c).split()).replace("|", "/") for c in (*cells, line["status"])]
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows)


# ---------------------------------------------------------------- time caps


class TimeCap(BaseException):
    """A section ran past its cap. A BaseException, so that library code catching Exception
    (compilers falling back, loaders retrying) cannot swallow it."""


@contextmanager
def time_cap(seconds: float) -> Iterator[None]:
    """Raise TimeCap in the main thread after `seconds` (SIGALRM; POSIX only)."""

    def alarm(signum, frame):
        raise TimeCap(f"time cap of {seconds:.0f} s reached")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_sections(
    sections: dict[str, Callable],
    caps: dict[str, float],
    budget_s: float,
    ctx,
) -> None:
    """Each section under min(its cap, the budget left); a failure is a line, not the end.

    `ctx` is what every section receives; the harness uses its `rec` (a Recorder) and its
    `free_memory()` (called after each section).
    """
    start = time.monotonic()
    for name, section in sections.items():
        left = budget_s - (time.monotonic() - start)
        if left < MIN_SECTION_S:
            ctx.rec.emit(name, "skipped", "the suite's time budget is spent", None, None, "skipped")
            continue
        began = time.perf_counter()
        try:
            with time_cap(min(caps[name], left)):
                section(ctx)
        except (Exception, TimeCap) as exc:
            ctx.rec.error(name, exc)
        seconds = time.perf_counter() - began
        ctx.free_memory()
        ctx.rec.emit(name, "section time", f"cap {caps[name]:.0f} s", round(seconds, 2), "s")


# ---------------------------------------------------------------- timing


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def best_of(
    fn: Callable[[], object],
    device: str,
    repeats: int,
    max_s: float = 6.0,
    warm_up: Callable[[], object] | None = None,
):
    """(seconds of the fastest timed run, its result) after one warm-up call (kernels chosen,
    caches full; `warm_up`, if given, is a cheaper call of the same code); at most `repeats`
    timed runs, fewer once they have taken `max_s` together."""
    (warm_up or fn)()
    best, result, spent = float("inf"), None, 0.0
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        seconds = time.perf_counter() - start
        if seconds < best:
            best, result = seconds, out
        spent += seconds
        if spent >= max_s:
            break
    return best, result
