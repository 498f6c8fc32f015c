"""The scan directory and the reference store: Parquet tables written in resumable shards.

A scan or reference build is cut into deterministic shards (same input and config, same
shard ids). Each shard's rows are written to `<table>/<shard>.parquet` through a temporary
file and a rename, and only then is `_done/<shard>` written. On restart a shard with a
done marker is skipped, and one without is redone from scratch, overwriting whatever a
killed run left behind. Readers only see shards with a done marker, so a table never
holds half a shard. Column names are the public interface (DESIGN section 3).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMAS: dict[str, pa.Schema] = {
    "prompts": pa.schema(
        [
            ("prompt_id", pa.int64()),
            ("prompt", pa.string()),
            ("cluster_id", pa.int64()),
            # Optional ground truth of the prompt source (null when it has none): the expected
            # label (VM/FM/BM/NM; the bundled LAION set's VM/TM type), its concept and group.
            ("designed", pa.string()),
            ("concept", pa.string()),
            ("group", pa.string()),
        ]
    ),
    "generations": pa.schema(
        [
            ("gen_id", pa.string()),
            ("prompt_id", pa.int64()),
            ("gen_idx", pa.int64()),
            ("seed", pa.int64()),
            ("method", pa.string()),
            ("source", pa.string()),
            ("image", pa.binary()),
            ("fg_mask", pa.binary()),
            ("fg_fraction", pa.float64()),
        ]
    ),
    "matches": pa.schema(
        [
            ("gen_id", pa.string()),
            ("ref_id", pa.string()),
            ("prefilter_rank", pa.int32()),
            ("prefilter_score", pa.float32()),
            ("m_full", pa.float32()),
            ("m_fg", pa.float32()),
            ("m_bg", pa.float32()),
            ("branch", pa.string()),
            ("label", pa.string()),
        ]
    ),
    "labels": pa.schema(
        [
            ("gen_id", pa.string()),
            ("prompt_id", pa.int64()),
            ("gen_idx", pa.int64()),
            ("method", pa.string()),
            ("label", pa.string()),
            ("ref_id", pa.string()),
            ("m_full", pa.float32()),
            ("m_fg", pa.float32()),
            ("m_bg", pa.float32()),
        ]
    ),
    "errors": pa.schema(
        [
            ("stage", pa.string()),
            ("item_id", pa.string()),
            ("error_type", pa.string()),
            ("message", pa.string()),
        ]
    ),
    "localizations": pa.schema(
        [
            ("prompt_id", pa.int64()),
            ("memorized", pa.bool_()),
            ("success", pa.bool_()),
            ("unet_calls", pa.int64()),
            ("initial_score", pa.float64()),
            ("refined_score", pa.float64()),
            ("neurons", pa.int64()),
        ]
    ),
    "neuron_sets": pa.schema(
        [("prompt_id", pa.int64()), ("layer", pa.int32()), ("channel", pa.int32())]
    ),
    "published_sets": pa.schema(
        [
            ("prompt_id", pa.int64()),
            ("method", pa.string()),
            ("authors_cluster", pa.int64()),
            ("status", pa.string()),
            ("neurons", pa.int64()),
        ]
    ),
    "references": pa.schema(
        [
            ("ref_id", pa.string()),
            ("caption", pa.string()),
            ("source", pa.string()),
            ("image", pa.binary()),
            ("fg_mask", pa.binary()),
            ("fg_fraction", pa.float64()),
            ("embedding", pa.list_(pa.float32())),
        ]
    ),
}


def gen_id(prompt_id: int, gen_idx: int, method: str = "none") -> str:
    """Generation id: "{prompt_id}:{gen_idx}", with "@{method}" for mitigated generations so
    one scan can hold the same (prompt, seed) under several methods."""
    base = f"{prompt_id}:{gen_idx}"
    return base if method == "none" else f"{base}@{method}"


def config_digest(config: dict) -> str:
    """Stable hash of the parts of a config that change results (what resume must match)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ShardedTables:
    """A directory of Parquet tables written shard by shard, with done markers."""

    def __init__(self, root: str | Path, tables: Iterable[str]):
        self.root = Path(root)
        self.tables = tuple(tables)
        unknown = set(self.tables) - set(SCHEMAS)
        if unknown:
            raise ValueError(f"unknown tables {sorted(unknown)}; known: {sorted(SCHEMAS)}")

    @property
    def done_dir(self) -> Path:
        return self.root / "_done"

    def prepare(self, digest: str, overwrite: bool) -> None:
        """Create the directory, or check that an existing one was made with the same config."""
        marker = self.root / "_config_digest"
        if overwrite and self.root.exists():
            shutil.rmtree(self.root)
        if marker.exists():
            found = marker.read_text().strip()
            if found != digest:
                raise ValueError(
                    f"{self.root} holds a run with another configuration (digest {found}, now {digest}); "
                    "use --overwrite to start fresh or choose another output directory"
                )
        self.root.mkdir(parents=True, exist_ok=True)
        self.done_dir.mkdir(exist_ok=True)
        marker.write_text(digest)

    def is_done(self, shard: str) -> bool:
        return (self.done_dir / shard).exists()

    def done_shards(self) -> list[str]:
        return sorted(p.name for p in self.done_dir.iterdir()) if self.done_dir.exists() else []

    def write_shard(self, shard: str, rows: dict[str, list[dict]]) -> None:
        """Write one shard's rows (tables without rows get no file), then its done marker."""
        for table in self.tables:
            target = self.root / table / f"{shard}.parquet"
            if not rows.get(table):
                target.unlink(missing_ok=True)  # a killed earlier attempt's leftovers
                continue
            target.parent.mkdir(exist_ok=True)
            tmp = target.parent / f".{shard}.parquet.tmp"
            pq.write_table(
                pa.Table.from_pylist(rows[table], schema=SCHEMAS[table]), tmp, row_group_size=64
            )
            os.replace(tmp, target)
        (self.done_dir / shard).write_text(str(time.time()))

    def parts(self, table: str) -> list[Path]:
        """Parquet files of the done shards of `table`, in shard order."""
        files = [self.root / table / f"{s}.parquet" for s in self.done_shards()]
        return [f for f in files if f.exists()]

    def read(self, table: str, columns: list[str] | None = None) -> pa.Table:
        """All rows of done shards, in shard order."""
        parts = self.parts(table)
        if not parts:
            return (
                SCHEMAS[table].empty_table()
                if columns is None
                else SCHEMAS[table].empty_table().select(columns)
            )
        return pa.concat_tables(pq.read_table(p, columns=columns) for p in parts)

    def present(self, table: str, columns: list[str]) -> list[str]:
        """The ones of `columns` this directory's `table` has (scans written before a column
        existed lack it)."""
        parts = self.parts(table)
        names = set(pq.read_schema(parts[0]).names if parts else SCHEMAS[table].names)
        return [c for c in columns if c in names]

    def count(self, table: str) -> int:
        return sum(pq.ParquetFile(p).metadata.num_rows for p in self.parts(table))


def write_manifest(root: Path, manifest: dict) -> None:
    tmp = root / ".manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str))
    os.replace(tmp, root / "manifest.json")


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in (
        "fbmem-scanner",
        "torch",
        "diffusers",
        "transformers",
        "ray",
        "faiss-cpu",
        "pytorch-msssim",
        "pyarrow",
        "numpy",
    ):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out
