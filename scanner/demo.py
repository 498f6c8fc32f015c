"""`fbmem demo`: the replication set labelled by Algorithm 1, with true and segmented masks.

The replication set's generations copy known regions of known training images, so the
intended kind vs FB-Mem label table shows at a glance what the metric gets right, and one
run per available segmenter shows what each costs compared with perfect masks.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from scanner.defaults import DEFAULT_REGION_MODE
from scanner.fbmem import DEFAULT_MATCH_BY, LABELS, check_region_mode, score_pairs, select_matches
from scanner.images import load_image, load_mask
from scanner.replication import KINDS, build_replication_set
from scanner.segment import SegmenterConfig, default_kind, make_segmenter


def label_set(
    manifest: pd.DataFrame,
    references: pd.DataFrame,
    root: Path,
    size: int,
    masks: SegmenterConfig | None,
    device: str,
    match_by: str = DEFAULT_MATCH_BY,
    region_mode: str = DEFAULT_REGION_MODE,
) -> tuple[pd.DataFrame, dict]:
    """Each generation against every reference; one row per generation with its match.

    `masks` None means the true masks. Also returns the masks' quality: mean IoU with the
    true masks (generations and references) and seconds per segmented image.
    """
    gens = torch.from_numpy(np.stack([load_image(root / p, size) for p in manifest["gen"]]))
    refs = torch.from_numpy(np.stack([load_image(root / p, size) for p in references["path"]]))
    gen_fg = np.stack([load_mask(root / p, size) for p in manifest["gen_mask"]])
    ref_fg = np.stack([load_mask(root / p, size) for p in references["mask"]])
    quality = {"segmenter": "true masks"}
    if masks is not None:
        segmenter = make_segmenter(masks)
        t = time.perf_counter()
        seg_gen, seg_ref = segmenter(gens.numpy()), segmenter(refs.numpy())
        quality = {
            "segmenter": segmenter.name,
            "iou_generations": round(mean_iou(seg_gen, gen_fg), 3),
            "iou_references": round(mean_iou(seg_ref, ref_fg), 3),
            "s_per_image": round((time.perf_counter() - t) / (len(gens) + len(refs)), 3),
        }
        gen_fg, ref_fg = seg_gen, seg_ref
    dev = torch.device(device)
    scores = score_pairs(
        gens.to(dev),
        refs.to(dev),
        torch.from_numpy(gen_fg).to(dev),
        torch.from_numpy(ref_fg).to(dev),
        region_mode=region_mode,
    )
    matches = select_matches(scores, match_by)
    rows = []
    for g, row in enumerate(manifest.itertuples()):
        i = matches[g]
        rows.append(
            {
                "gen_id": row.gen_id,
                "kind": row.kind,
                "expected": row.expected,
                "label": scores.label[i],
                "matched_ref": references["ref_id"].iloc[scores.pairs[i, 1]],
                "intended_ref": row.ref_id,
                "m_full": scores.m_full[i],
                "m_fg": scores.m_fg[i],
                "m_bg": scores.m_bg[i],
                "fg_fraction": scores.fg_fraction[i],
                "branch": scores.branch[i],
            }
        )
    return pd.DataFrame(rows), quality


def mean_iou(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean over images of intersection over union; two empty masks agree fully."""
    inter = (pred & true).reshape(len(pred), -1).sum(1)
    union = (pred | true).reshape(len(pred), -1).sum(1)
    return float(np.mean(np.where(union > 0, inter / np.maximum(union, 1), 1.0)))


def demo_segmenters(device: str, u2netp_path: str | None = None) -> list[SegmenterConfig]:
    """Every segmenter that runs here without the user's weights: classical, and u2netp when
    it is installed or its file given (BiRefNet needs weights the demo cannot have)."""
    configs = [SegmenterConfig(kind="classical")]
    if default_kind(u2netp_path) == "u2netp":
        configs.append(SegmenterConfig(kind="u2netp", u2netp_path=u2netp_path, device=device))
    return configs


def confusion(results: pd.DataFrame) -> pd.DataFrame:
    """Intended kind (rows) against FB-Mem label (columns)."""
    table = pd.crosstab(
        pd.Categorical(results["kind"], KINDS),
        pd.Categorical(results["label"], LABELS),
        dropna=False,
    )
    table.index.name, table.columns.name = "intended", "label"
    return table


def run_demo(
    out: Path,
    size: int = 256,
    device: str = "cpu",
    match_by: str = DEFAULT_MATCH_BY,
    u2netp_path: str | None = None,
    region_mode: str = DEFAULT_REGION_MODE,
) -> dict:
    check_region_mode(region_mode, "ms_ssim")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    manifest = build_replication_set(out / "replication", size=512)
    references = pd.read_csv(out / "replication" / "references.csv")
    print(
        f"replication set: {len(manifest)} generations, {len(references)} training images -> {out / 'replication'}"
    )
    print(f"match by {match_by}, region mode {region_mode}")
    summary = {
        "size": size,
        "generations": len(manifest),
        "references": len(references),
        "match_by": match_by,
        "region_mode": region_mode,
        "runs": {},
    }
    for masks in (None, *demo_segmenters(device, u2netp_path)):
        run = "true" if masks is None else masks.kind
        t = time.perf_counter()
        results, quality = label_set(
            manifest, references, out / "replication", size, masks, device, match_by, region_mode
        )
        seconds = time.perf_counter() - t
        results.to_csv(out / f"labels_{run}_masks.csv", index=False)
        table = confusion(results)
        correct = (results["label"] == results["expected"]) & (
            (results["label"] == "NM") | (results["matched_ref"] == results["intended_ref"])
        )
        pairs = len(manifest) * len(references)
        intended = results["label"] == results["expected"]
        print(
            f"\nmasks: {quality['segmenter']}  ({pairs} pairs in {seconds:.1f} s, {1000 * seconds / pairs:.0f} ms per pair incl. loading and segmenting)"
        )
        if masks is not None:
            print(
                f"mask IoU with the true masks: generations {quality['iou_generations']:.3f}, "
                f"references {quality['iou_references']:.3f}; {quality['s_per_image']:.2f} s per image"
            )
        print(table.to_string())
        print(
            f"labelled as intended: {int(intended.sum())}/{len(results)}; "
            f"correct label and match: {int(correct.sum())}/{len(results)}"
        )
        summary["runs"][run] = {
            **quality,
            "confusion": {kind: table.loc[kind].to_dict() for kind in KINDS},
            "intended": int(intended.sum()),
            "correct": int(correct.sum()),
            "seconds": round(seconds, 2),
            "ms_per_pair": round(1000 * seconds / pairs, 1),
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=int))
    print(f"\nresults in {out} ({time.perf_counter() - t0:.0f} s)")
    return summary
