"""Scanning generations against a reference store, into a scan directory (DESIGN 3).

`scan_items` turns generated-image listings into work items, `scan_rows` turns the match
stage's output into table rows, and `scan_images` runs the whole scan in-process. The Ray
job (`jobs/full_scan.py`) reuses the first two with Ray Data in between.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from scanner.defaults import DEFAULT_REGION_MODE
from scanner.driver import Progress, ShardCollector, error_row, run_local, split_shards
from scanner.embed import EmbedConfig
from scanner.fbmem import DEFAULT_BETA, DEFAULT_MATCH_BY, DEFAULT_TAU, check_region_mode
from scanner.images import DEFAULT_MAX_PIXELS, check_max_pixels
from scanner.segment import SegmenterConfig
from scanner.sources import list_images
from scanner.stages import Embed, LoadImages, Match, Segment, error_json
from scanner.store import ShardedTables, config_digest, gen_id, package_versions, write_manifest

SCAN_TABLES = ("prompts", "generations", "matches", "labels", "errors")
PROMPTS_SHARD = "prompts"


@dataclass(frozen=True)
class ScanConfig:
    reference: str  # reference store folder (fbmem build-reference)
    top_k: int = 16  # prefilter candidates per generation; 0 = every reference (exhaustive)
    tau: float = DEFAULT_TAU
    beta: float = DEFAULT_BETA
    metric: str = "ms_ssim"  # ms_ssim, ssim or sscd
    sscd: str | None = None  # SSCD TorchScript file, for metric sscd
    match_by: str = DEFAULT_MATCH_BY  # one match per generation: highest mean, full, or most-severe
    region_mode: str = DEFAULT_REGION_MODE  # masked (the paper's) or pooled (docs/region-modes.md)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    device: str = "cpu"
    shard_size: int = 256  # generations per resumable shard
    batch_size: int = 16  # generations per stage call
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger image files are error rows, never decoded

    def __post_init__(self) -> None:
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = exhaustive), got {self.top_k}")
        check_max_pixels(self.max_pixels)
        check_region_mode(self.region_mode, self.metric)


def scan_items(src: str | Path) -> pd.DataFrame:
    """Work items for generated images: a folder, or a table with path [, prompt, prompt_id, gen_idx, method].

    Without a `prompt_id` column every file is its own item (`attrs["from_files"]`): a scan of
    images, not of prompts, so the report counts images and has no one-to-many section.
    """
    table = list_images(src, "prompt")
    n = len(table)
    items = pd.DataFrame(
        {
            "prompt_id": table["prompt_id"].astype("int64")
            if "prompt_id" in table.columns
            else np.arange(n, dtype=np.int64),
            "gen_idx": table["gen_idx"].astype("int64")
            if "gen_idx" in table.columns
            else np.zeros(n, dtype=np.int64),
            "method": table["method"].astype(str) if "method" in table.columns else "none",
            "prompt": table["prompt"].astype(str),
            "source": table["path"].astype(str),
            "seed": table["seed"].astype("int64")
            if "seed" in table.columns
            else np.full(n, -1, dtype=np.int64),
        }
    )
    items["item_id"] = [
        gen_id(p, g, m) for p, g, m in zip(items["prompt_id"], items["gen_idx"], items["method"])
    ]
    items["error"] = ""
    items.attrs["from_files"] = "prompt_id" not in table.columns
    for i in np.flatnonzero(items["item_id"].duplicated().to_numpy()):
        items.loc[i, "error"] = error_json(
            "list",
            ValueError(f"duplicate generation id {items.loc[i, 'item_id']!r}; the first is kept"),
        )
    return items


def scan_rows(batch: dict):
    """One generation's rows of every table, from the match stage's output batch."""
    for i in range(len(batch["item_id"])):
        shard = batch["shard"][i]
        if batch["error"][i]:
            yield shard, {"errors": [error_row(batch, i)]}
            continue
        gid = str(batch["item_id"][i])
        yield (
            shard,
            {
                "generations": [
                    {
                        "gen_id": gid,
                        "prompt_id": int(batch["prompt_id"][i]),
                        "gen_idx": int(batch["gen_idx"][i]),
                        "seed": int(batch["seed"][i]),
                        "method": str(batch["method"][i]),
                        "source": str(batch["source"][i]) if "source" in batch else "",
                        "image": batch["image_png"][i],
                        "fg_mask": batch["fg_mask_png"][i],
                        "fg_fraction": float(batch["fg_fraction"][i]),
                    }
                ],
                "matches": [{"gen_id": gid, **m} for m in json.loads(batch["matches"][i])],
                "labels": [
                    {
                        "gen_id": gid,
                        "prompt_id": int(batch["prompt_id"][i]),
                        "gen_idx": int(batch["gen_idx"][i]),
                        "method": str(batch["method"][i]),
                        "source": str(batch["source"][i]) if "source" in batch else "",
                        "label": str(batch["label"][i]),
                        "ref_id": str(batch["ref_id"][i]),
                        "m_full": float(batch["m_full"][i]),
                        "m_fg": float(batch["m_fg"][i]),
                        "m_bg": float(batch["m_bg"][i]),
                    }
                ],
            },
        )


def reference_embed_config(manifest: dict, device: str) -> EmbedConfig:
    """Generations must be embedded exactly as the references were, or top-k is meaningless."""
    return EmbedConfig(**{**manifest["config"]["embed"], "device": device})


GROUND_TRUTH = ("designed", "concept", "group")  # optional prompt columns kept in `prompts`


def _text_or_none(value) -> str | None:
    return str(value) if isinstance(value, str) and value else None


def write_prompts(
    tables: ShardedTables, items: pd.DataFrame, clusters: dict[int, int] | None = None
) -> None:
    prompts = items.drop_duplicates("prompt_id").sort_values("prompt_id")
    known = [c for c in GROUND_TRUTH if c in prompts.columns]
    rows = [
        {
            "prompt_id": int(row["prompt_id"]),
            "prompt": str(row["prompt"]),
            "cluster_id": (clusters or {}).get(int(row["prompt_id"])),
            **{c: _text_or_none(row[c]) for c in known},
        }
        for _, row in prompts.iterrows()
    ]
    tables.write_shard(PROMPTS_SHARD, {"prompts": rows})


def scan_images(
    src: str | Path, out: str | Path, config: ScanConfig, overwrite: bool = False
) -> dict:
    """Scan a folder (or table) of generated images; resumable; returns the manifest."""
    out = Path(out)
    started = time.time()
    items = scan_items(src)
    # 1. Open the models and the reference store first: a bad path fails before any output.
    match = Match(
        config.reference,
        config.top_k,
        config.tau,
        config.beta,
        config.metric,
        config.device,
        sscd=config.sscd,
        match_by=config.match_by,
        region_mode=config.region_mode,
    )
    segment = Segment(config.segmenter)
    embed = Embed(reference_embed_config(match.refs.manifest, config.device))
    # 2. The scan directory: same input and config -> same shards; finished ones are skipped.
    # The store is recorded absolute, so the scan's readers find it from any directory.
    resolved = {
        "source": str(Path(src).resolve()),
        **asdict(config),
        "reference": str(Path(config.reference).resolve()),
    }
    tables = ShardedTables(out, SCAN_TABLES)
    tables.prepare(config_digest(resolved), overwrite)
    if not tables.is_done(PROMPTS_SHARD):
        write_prompts(tables, items)
    shards = split_shards(items, config.shard_size)
    pending = [(s, part) for s, part in shards if not tables.is_done(s)]
    # 3. Stream the pending shards through the stages.
    progress = Progress(len(items), len(items) - sum(len(p) for _, p in pending), "img", "scan")
    collector = ShardCollector(tables, {s: len(p) for s, p in pending}, scan_rows, progress)
    stages = [
        LoadImages(match.refs.image_size, max_pixels=config.max_pixels),
        segment,
        embed,
        match,
    ]
    run_local(pending, stages, config.batch_size, collector)
    seconds = progress.close()
    manifest = {
        "kind": "scan",
        "config": resolved,
        "images_from_files": items.attrs["from_files"],  # no prompts: each file is one item
        "backends": {
            "segmenter": segment.segmenter.name,
            "reference_segmenter": match.refs.manifest.get("segmenter"),
            "embedder": embed.embedder.name,
            "reference_embedder": match.refs.manifest.get("embedder"),
        },
        "versions": package_versions(),
        "started": started,
        "finished": time.time(),
        "seconds_this_run": round(seconds, 2),
        "generations_this_run": progress.fresh,
        "rows": {t: tables.count(t) for t in SCAN_TABLES},
    }
    write_manifest(out, manifest)
    return manifest
