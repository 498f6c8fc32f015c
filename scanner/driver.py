"""Work items in shards, stage outputs to table rows, and shard-complete writing.

Both runners (in-process and Ray Data) feed the same `ShardCollector`: stage output
batches arrive, their rows are converted to table rows and grouped by shard, and a shard is
written, with its done marker last, as soon as all of its items have arrived. Only shards
in flight are held in memory.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scanner.store import ShardedTables

Rows = dict[str, list[dict]]


def split_shards(
    items: pd.DataFrame, shard_size: int, prefix: str = "shard"
) -> list[tuple[str, pd.DataFrame]]:
    """Deterministic consecutive shards of the work items (same items, same shards)."""
    if shard_size < 1:
        raise ValueError(f"shard size must be >= 1, got {shard_size}")
    return [
        (f"{prefix}-{i // shard_size:06d}", items.iloc[i : i + shard_size])
        for i in range(0, len(items), shard_size)
    ]


def to_batch(items: pd.DataFrame, shard: str) -> dict[str, np.ndarray]:
    batch = {c: items[c].to_numpy() for c in items.columns}
    batch["shard"] = np.full(len(items), shard, dtype=object)
    batch.setdefault("error", np.full(len(items), "", dtype=object))
    return batch


def error_row(batch: dict, i: int) -> dict:
    err = json.loads(batch["error"][i])
    return {
        "stage": err["stage"],
        "item_id": str(batch["item_id"][i]),
        "error_type": err["error_type"],
        "message": err["message"],
    }


@dataclass
class ShardCollector:
    """Accumulates converted rows per shard; writes a shard once all its items arrived."""

    tables: ShardedTables
    expected: dict[str, int]  # shard -> number of items
    to_rows: Callable[[dict], Iterator[tuple[str, Rows]]]  # batch -> (shard, rows of one item)
    on_items: Callable[[int], None] = lambda n: None  # progress: items received
    _pending: dict[str, Rows] = field(default_factory=dict)
    _seen: dict[str, int] = field(default_factory=dict)

    def add(self, batch: dict) -> None:
        received = 0
        for shard, rows in self.to_rows(batch):
            received += 1
            acc = self._pending.setdefault(shard, {})
            for table, table_rows in rows.items():
                acc.setdefault(table, []).extend(table_rows)
            self._seen[shard] = self._seen.get(shard, 0) + 1
            if self._seen[shard] == self.expected[shard]:
                self.tables.write_shard(shard, self._pending.pop(shard))
        self.on_items(received)

    def finish(self) -> None:
        missing = {
            s: self.expected[s] - self._seen.get(s, 0)
            for s in self.expected
            if not self.tables.is_done(s)
        }
        if missing:
            raise RuntimeError(
                f"stages returned fewer rows than sent for shards {missing}; nothing of them was written"
            )


class Progress:
    """Items done, rate and ETA. On a terminal a tqdm bar redrawn in place; in a log (a pipe, a
    file, a Ray job's output) a plain line at most every `LOG_EVERY_S` seconds and one at the
    end, since a bar's carriage-return redraws pile up there, the last one twice."""

    LOG_EVERY_S = 30.0

    def __init__(self, total: int, done: int, unit: str, desc: str):
        self.total, self.done, self.unit, self.desc = total, done, unit, desc
        self.start = self.last_line = time.perf_counter()
        self.fresh = 0
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=done, unit=unit, desc=desc, dynamic_ncols=True, mininterval=1.0
            )

    def __call__(self, n: int) -> None:
        self.fresh += n
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last_line >= self.LOG_EVERY_S and self.done < self.total:
            self.last_line = now
            rate = self.fresh / (now - self.start)
            left = (self.total - self.done) / rate if rate > 0 else float("nan")
            self._line(f"{self._count()}, {rate:.3g} {self.unit}/s, about {left:.0f} s left")

    def close(self) -> float:
        seconds = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.close()
        else:
            rate = (
                f", {self.fresh / seconds:.3g} {self.unit}/s" if seconds > 0 and self.fresh else ""
            )
            self._line(f"{self._count()} in {seconds:.1f} s{rate}")
        return seconds

    def _count(self) -> str:
        share = f" ({100 * self.done // self.total}%)" if self.total else ""  # 100% only at the end
        return f"{self.done:,}/{self.total:,} {self.unit}{share}"

    def _line(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=sys.stderr, flush=True)


def run_local(
    shards: Iterable[tuple[str, pd.DataFrame]],
    stages: list[Callable[[dict], dict]],
    batch_size: int,
    collector: ShardCollector,
) -> None:
    """The in-process runner: each pending shard through every stage, batch by batch."""
    for shard, items in shards:
        for start in range(0, len(items), batch_size):
            batch = to_batch(items.iloc[start : start + batch_size], shard)
            for stage in stages:
                batch = stage(batch)
            collector.add(batch)
    collector.finish()
