"""The report gallery's content: which matches to show, and their thumbnails on disk.

A scan may hold millions of generations; the page holds at most `max_cards` of them, the
most severe first, so it opens instantly while every row stays in the Parquet tables.
Image bytes are read only for the chosen rows (`scanner.report.rows`).
"""

from __future__ import annotations

import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from scanner.analysis import MEMORIZED
from scanner.fbmem import SEVERITY
from scanner.images import decode_mask_png
from scanner.report.rows import read_rows
from scanner.store import ShardedTables

DECIDING_SCORE = {"VM": "m_full", "FM": "m_fg", "BM": "m_bg"}  # DESIGN 4.2 match selection
CARD_COLUMNS = ["gen_id", "prompt_id", "method", "label", "ref_id", "m_full", "m_fg", "m_bg"]
MASK_TINT = {"gen": (0, 213, 255), "ref": (255, 61, 242)}  # cyan / magenta, as in explain.py


def select_cards(labels: pd.DataFrame, max_cards: int) -> pd.DataFrame:
    """The most severe memorized generations: VM, then FM, then BM, each by its deciding score.

    Methods share the budget: the k-th most severe match of every method comes before the
    (k+1)-th of any, so a mitigated method with few copies is never crowded out of the page.
    """
    if not isinstance(max_cards, int) or max_cards < 1:
        raise ValueError(f"max_cards must be a positive integer, got {max_cards!r}")
    cards = labels[labels["label"].isin(MEMORIZED)].copy()
    cards["severity"] = cards["label"].map(SEVERITY)
    cards["score"] = np.select(
        [cards["label"] == label for label in DECIDING_SCORE],
        [cards[column] for column in DECIDING_SCORE.values()],
    )
    order = ["severity", "score", "gen_id"]
    cards = cards.sort_values(order, ascending=[True, False, True])
    cards["rank_in_method"] = cards.groupby("method").cumcount()
    cards = cards.sort_values(["rank_in_method", *order], ascending=[True, True, False, True])
    return cards.head(max_cards).sort_values(
        order, ascending=[True, False, True], ignore_index=True
    )


def matched_branches(scan_dir: Path, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], str]:
    """Algorithm 1 branch of each (gen_id, ref_id) pair, from the `matches` table."""
    gen_ids = {g for g, _ in pairs}
    out = {}
    for row in read_rows(scan_dir, "matches", "gen_id", gen_ids, ["ref_id", "branch"]):
        if (row["gen_id"], row["ref_id"]) in pairs:
            out[(row["gen_id"], row["ref_id"])] = row["branch"]
    return out


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of `mask` within `width` px of its border (4-neighbour erosion)."""
    inner = mask.copy()
    for _ in range(width):
        shrunk = inner.copy()
        shrunk[1:] &= inner[:-1]
        shrunk[:-1] &= inner[1:]
        shrunk[:, 1:] &= inner[:, :-1]
        shrunk[:, :-1] &= inner[:, 1:]
        inner = shrunk
    return mask & ~inner


def write_thumbnail(png: bytes, out: Path, size: int, quality: int) -> None:
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.resize((size, size), Image.LANCZOS).save(
        out, format="JPEG", quality=quality, optimize=True
    )


def write_mask_overlay(mask_png: bytes, out: Path, size: int, tint: tuple[int, int, int]) -> None:
    """Transparent PNG: the mask's outline in `tint`, its inside faintly tinted."""
    mask = decode_mask_png(mask_png)
    mask = (
        np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST))
        > 127
    )
    rgba = np.zeros((size, size, 4), np.uint8)
    rgba[..., :3] = tint
    rgba[..., 3] = np.where(mask, 20, 0)
    rgba[_outline(mask, max(2, size // 96)), 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(out, format="PNG")


@dataclass(frozen=True)
class Gallery:
    cards: list[dict]  # one per shown match, most severe first; image paths relative to report/
    memorized: int  # memorized generations in the whole scan
    missing: int  # chosen matches left out because their image or training image is gone


def build_gallery(
    scan_dir: Path,
    reference_dir: Path,
    report_dir: Path,
    *,
    max_cards: int,
    thumb_size: int,
    jpeg_quality: int,
) -> Gallery:
    """Choose the gallery's matches and write their thumbnails to `report/thumbs/`."""
    # 1. Choose cards from the labels' small columns
    tables = ShardedTables(scan_dir, ["labels", "prompts"])
    labels = tables.read("labels", CARD_COLUMNS).to_pandas()
    chosen = select_cards(labels, max_cards)
    thumbs = report_dir / "thumbs"
    shutil.rmtree(thumbs, ignore_errors=True)
    thumbs.mkdir(parents=True)

    # 2. Generated images: thumbnails written as their row groups stream by
    card_of = {gid: i for i, gid in enumerate(chosen["gen_id"])}
    fg_fraction = {}
    for row in read_rows(
        scan_dir, "generations", "gen_id", set(card_of), ["image", "fg_mask", "fg_fraction"]
    ):
        i = card_of[row["gen_id"]]
        write_thumbnail(row["image"], thumbs / f"g{i:05d}.jpg", thumb_size, jpeg_quality)
        write_mask_overlay(row["fg_mask"], thumbs / f"g{i:05d}m.png", thumb_size, MASK_TINT["gen"])
        fg_fraction[i] = row["fg_fraction"]

    # 3. Matched training images, one thumbnail per distinct reference
    ref_of = {rid: j for j, rid in enumerate(sorted(set(chosen["ref_id"])))}
    captions = {}
    for row in read_rows(
        reference_dir, "references", "ref_id", set(ref_of), ["image", "fg_mask", "caption"]
    ):
        j = ref_of[row["ref_id"]]
        write_thumbnail(row["image"], thumbs / f"r{j:05d}.jpg", thumb_size, jpeg_quality)
        write_mask_overlay(row["fg_mask"], thumbs / f"r{j:05d}m.png", thumb_size, MASK_TINT["ref"])
        captions[row["ref_id"]] = row["caption"]

    # 4. Card records: scores, branch, prompt and cluster beside the thumbnails
    branches = matched_branches(scan_dir, set(zip(chosen["gen_id"], chosen["ref_id"])))
    prompts = tables.read("prompts", ["prompt_id", "prompt", "cluster_id"]).to_pandas()
    prompts = prompts[prompts["prompt_id"].isin(chosen["prompt_id"])].set_index("prompt_id")
    cards = []
    for i, row in enumerate(chosen.itertuples(index=False)):
        if i not in fg_fraction or row.ref_id not in captions:
            continue
        j = ref_of[row.ref_id]
        cluster = prompts["cluster_id"].get(row.prompt_id)
        cards.append(
            {
                "gen_id": row.gen_id,
                "prompt_id": int(row.prompt_id),
                "prompt": str(prompts["prompt"].get(row.prompt_id, "")),
                "cluster": None if pd.isna(cluster) else int(cluster),
                "method": row.method,
                "label": row.label,
                "ref_id": row.ref_id,
                "caption": captions[row.ref_id],
                "m_full": round(float(row.m_full), 4),
                "m_fg": round(float(row.m_fg), 4),
                "m_bg": round(float(row.m_bg), 4),
                "branch": branches.get((row.gen_id, row.ref_id)),
                "fg_fraction": round(float(fg_fraction[i]), 4),
                "gen": f"thumbs/g{i:05d}.jpg",
                "gen_mask": f"thumbs/g{i:05d}m.png",
                "ref": f"thumbs/r{j:05d}.jpg",
                "ref_mask": f"thumbs/r{j:05d}m.png",
            }
        )
    return Gallery(
        cards=cards,
        memorized=int(labels["label"].isin(MEMORIZED).sum()),
        missing=len(chosen) - len(cards),
    )
