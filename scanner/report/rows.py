"""Reading a few chosen rows of a sharded table without loading the rest.

Image tables hold PNG bytes: a million generations are hundreds of GB. The report needs a
few thousand of them, so each shard's id column is read first, then only the Parquet row
groups (64 rows each, `scanner.store`) that hold a chosen id.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from scanner.store import ShardedTables


def reference_dir(manifest: dict, override: str | Path | None) -> Path:
    """The reference store holding the matched training images."""
    path = override if override is not None else manifest.get("config", {}).get("reference")
    if path is None:
        raise ValueError("the scan's manifest names no reference store; pass reference=PATH")
    path = Path(path)
    if not (path / "manifest.json").exists():
        raise ValueError(
            f"reference store {path} not found (no manifest.json); the gallery needs the "
            "training images: pass reference=PATH to where the store is now"
        )
    return path


def read_rows(
    root: str | Path, table: str, key: str, wanted: set, columns: list[str]
) -> Iterator[dict]:
    """Rows of `table` whose `key` is in `wanted`, reading only the row groups that hold them."""
    if not wanted:
        return
    keys = pa.array(sorted(wanted))
    for file in ShardedTables(root, [table]).parts(table):
        parquet = pq.ParquetFile(file)
        ids = parquet.read(columns=[key]).column(key)
        hits = np.flatnonzero(pc.is_in(ids, value_set=keys).to_numpy(zero_copy_only=False))
        if not len(hits):
            continue
        starts = np.cumsum(
            [0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
        )
        groups = np.searchsorted(starts, hits, side="right") - 1
        for group in np.unique(groups):
            part = parquet.read_row_group(int(group), columns=[key, *columns]).to_pylist()
            for row in part:
                if row[key] in wanted:
                    yield row
