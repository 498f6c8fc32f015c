"""The reference store: training images at the canonical size, their masks, embeddings and
the prefilter index, built once and opened by path (memory-mapped) by every scan.

Layout: `references/` and `errors/` (sharded Parquet, see `scanner.store`), `index/` (the
`CandidateIndex`), `manifest.json`. A row's position in shard order is its index row, so
the index returns positions and the store maps them to `ref_id`s and pixels.
"""

from __future__ import annotations

import bisect
import json
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from scanner.driver import Progress, ShardCollector, error_row, run_local, split_shards
from scanner.embed import EmbedConfig
from scanner.images import (
    DEFAULT_SIZE,
    MIN_SIDE,
    check_size,
    decode_mask_png,
    encode_png,
    load_image,
)
from scanner.segment import SegmenterConfig
from scanner.sources import list_images
from scanner.stages import Embed, LoadImages, Segment, error_json
from scanner.store import ShardedTables, config_digest, package_versions, write_manifest

TABLES = ("references", "errors")


@dataclass(frozen=True)
class ReferenceConfig:
    size: int = DEFAULT_SIZE  # canonical size of stored images (the paper's 512)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    shard_size: int = 256  # references per resumable shard
    batch_size: int = 32  # images per stage call
    exact_limit: int = (
        1_000_000  # exact inner-product index up to this many references, IVF-PQ above
    )
    # Shorter side a training image needs. Only a store whose generations are upsampled the same
    # way may lower it: the memorization organism's, built from its 128 px images as trained.
    min_side: int = MIN_SIDE

    def __post_init__(self) -> None:
        check_size(self.size)


def reference_items(src: str | Path):
    """Work items of a reference build: ref_id (relative path unless given), caption, source,
    and the known foreground mask when a table gives one (column `mask`, else segmented)."""
    table = list_images(src, "caption")
    ref_ids = table["ref_id"].astype(str) if "ref_id" in table.columns else table["rel"]
    masks = table["mask"].fillna("").astype(str) if "mask" in table.columns else ""
    items = table.assign(item_id=ref_ids.to_numpy(), source=table["path"], mask=masks)[
        ["item_id", "caption", "source", "mask"]
    ]
    if "mask" in table.columns:
        base = Path(src).parent
        items["mask"] = [
            str(m if not m or Path(m).is_absolute() else base / m) for m in items["mask"]
        ]
    items = items.reset_index(drop=True)
    items["error"] = ""
    dup = items["item_id"].duplicated()
    for i in np.flatnonzero(dup.to_numpy()):
        items.loc[i, "error"] = error_json(
            "list",
            ValueError(
                f"duplicate ref_id {items.loc[i, 'item_id']!r}; the first occurrence is kept"
            ),
        )
    return items


def _reference_rows(batch: dict):
    for i in range(len(batch["item_id"])):
        if batch["error"][i]:
            yield batch["shard"][i], {"errors": [error_row(batch, i)]}
            continue
        yield (
            batch["shard"][i],
            {
                "references": [
                    {
                        "ref_id": str(batch["item_id"][i]),
                        "caption": str(batch["caption"][i]),
                        "source": str(batch["source"][i]),
                        "image": encode_png(batch["image"][i].astype(np.float32) / 255.0),
                        "fg_mask": encode_png(batch["fg_mask"][i]),
                        "fg_fraction": float(batch["fg_fraction"][i]),
                        "embedding": batch["embedding"][i].tolist(),
                    }
                ]
            },
        )


def build_reference(
    src: str | Path,
    out: str | Path,
    config: ReferenceConfig = ReferenceConfig(),
    overwrite: bool = False,
) -> dict:
    """Build (or resume building) a reference store; returns its manifest."""
    from scanner.retrieve import CandidateIndex

    out = Path(out)
    started = time.time()
    items = reference_items(src)
    resolved = asdict(config)
    tables = ShardedTables(out, TABLES)
    tables.prepare(config_digest({"src": str(Path(src).resolve()), **resolved}), overwrite)
    shards = split_shards(items, config.shard_size)
    pending = [(s, part) for s, part in shards if not tables.is_done(s)]
    done_items = len(items) - sum(len(p) for _, p in pending)
    progress = Progress(len(items), done_items, "img", "references")
    collector = ShardCollector(tables, {s: len(p) for s, p in pending}, _reference_rows, progress)
    stages = [
        LoadImages(config.size, config.min_side),
        Segment(config.segmenter),
        Embed(config.embed),
    ]
    run_local(pending, stages, config.batch_size, collector)
    seconds = progress.close()

    # The index streams the embeddings shard by shard: memory stays bounded by one shard.
    total = tables.count("references")
    chunks = (
        np.stack(pq.read_table(part, columns=["embedding"]).column("embedding").to_pylist()).astype(
            np.float32
        )
        for part in tables.parts("references")
    )
    index = (
        CandidateIndex.build_from_chunks(chunks, total=total, exact_limit=config.exact_limit)
        if total
        else None
    )
    if index is not None:
        index.save(out / "index")
    manifest = {
        "kind": "reference-store",
        "source": str(src),
        "config": resolved,
        "segmenter": stages[1].segmenter.name,
        "given_masks": int((items["mask"] != "").sum()),  # kept as given, not segmented
        "embedder": stages[2].embedder.name,
        "index": index.kind if index is not None else None,
        "versions": package_versions(),
        "started": started,
        "finished": time.time(),
        "seconds_this_run": round(seconds, 2),
        "rows": {t: tables.count(t) for t in TABLES},
    }
    write_manifest(out, manifest)
    return manifest


class ReferenceStore:
    """Read side of a reference store: ref ids, the index, and pixels by row on demand."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        from scanner.retrieve import CandidateIndex

        self.root = Path(path)
        self.manifest = self.read_manifest(path)
        self.image_size = self.manifest["config"]["size"]
        tables = ShardedTables(self.root, TABLES)
        self.parts = tables.parts("references")
        # Where every row group starts (in store rows): one metadata read per file, here, so
        # that `load` on the scoring hot path opens no file but the row group it reads.
        self.group_starts, self.groups = [], []
        start = 0
        for part, file in enumerate(self.parts):
            meta = pq.ParquetFile(file).metadata
            for group in range(meta.num_row_groups):
                self.group_starts.append(start)
                self.groups.append((part, group))
                start += meta.row_group(group).num_rows
        self.ref_ids = tables.read("references", ["ref_id"]).column("ref_id").to_pylist()
        self.index = (
            CandidateIndex.load(self.root / "index", device=device) if self.ref_ids else None
        )
        self._row_group = lru_cache(maxsize=64)(self._read_row_group)

    @staticmethod
    def read_manifest(path: str | Path) -> dict:
        file = Path(path) / "manifest.json"
        if not file.exists():
            raise ValueError(
                f"{path}: not a reference store (no manifest.json); build one with `fbmem build-reference`"
            )
        return json.loads(file.read_text())

    def __len__(self) -> int:
        return len(self.ref_ids)

    def _read_row_group(self, part: int, group: int):
        return pq.ParquetFile(self.parts[part]).read_row_group(group, columns=["image", "fg_mask"])

    def load(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(3, S, S) float image in [0, 1] and (S, S) bool mask of reference row `row`."""
        i = bisect.bisect_right(self.group_starts, row) - 1
        table = self._row_group(*self.groups[i])
        local = row - self.group_starts[i]
        image = load_image(table.column("image")[local].as_py(), self.image_size)
        mask = decode_mask_png(table.column("fg_mask")[local].as_py())
        return torch.from_numpy(image), torch.from_numpy(mask)
