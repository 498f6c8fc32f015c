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


def reference_dir(manifest: dict, override: str | Path | None, scan_dir: str | Path) -> Path:
    """The reference store holding a scan's training images: `override` (the `--reference`
    option) when given, else the manifest's path, else its path relative to the scan directory
    (`reference_from_scan`: the two were moved together)."""
    if override is not None:
        candidates = [Path(override)]
    else:
        recorded = manifest.get("config", {}).get("reference")
        if not recorded:
            raise ValueError(
                "the scan's manifest names no reference store; give it with --reference PATH"
            )
        candidates = [Path(recorded)]
        if manifest.get("reference_from_scan"):
            candidates.append(Path(scan_dir) / manifest["reference_from_scan"])
    for path in candidates:
        if (path / "manifest.json").exists():
            return path
    raise ValueError(
        f"reference store {candidates[0]} not found (no manifest.json); the scan's training "
        "images are read from it: give its current folder with --reference PATH"
    )


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
