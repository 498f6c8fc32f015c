"""Region modes on labelled sets: how often Algorithm 1 finds the intended label, masked vs pooled.

Builds the replication set (the tuning set) and the holdout set (other crops, shapes and
seeds: the judging set; `scanner.replication_holdout`), scores every generation against every
training image in both region modes, with the true masks or a segmenter's (`--masks`), and
prints one JSON object per (set, size, masks, mode):

- intended pairs (each generation against the training image it was made from): recall of
  VM, FM and BM among the generations made to be that, and the NM rate of unrelated ones;
- other pairs (a generation against any other training image): how many get a label other
  than NM (false positives);
- the paper's one match per generation (the candidate with the highest (M_fg + M_bg) / 2):
  the share of memorized generations whose match is their source with the intended label,
  and the unrelated generations labelled anything but NM (NM false positives);
- the smallest margin over all pairs: how far a deciding score is from tau on the side of
  the pair's expected label (its kind against its own training image, NM against the others;
  the margin of docs/replication.md), negative where a pair gets another label;
- the scoring time of all pairs (torch's threads, the device named).

After each pooled record, one more object gives its agreement with masked mode: the share of
generations whose one-match label is the same in both modes, and of all pairs. `--inside`
tries several window-share thresholds of pooled mode (how REGION_INSIDE was tuned: on the
replication set alone, the value with the largest smallest margin at both sizes).

    python benchmarks/region_modes.py [--sizes 512 256] [--sets replication holdout]
        [--masks true classical u2netp] [--inside 0.9 0.95] [--per-generation]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scanner import similarity
from scanner.fbmem import DEFAULT_TAU, score_pairs, select_matches
from scanner.images import load_image, load_mask
from scanner.replication import build_replication_set
from scanner.replication_holdout import build_holdout_set
from scanner.segment import SegmenterConfig, make_segmenter

SETS = {"replication": build_replication_set, "holdout": build_holdout_set}
KIND_LABEL = {"verbatim": "VM", "foreground": "FM", "background": "BM", "unrelated": "NM"}


def load_set(root: Path, size: int, masks: str = "true"):
    """A set's tables, images and masks: the true masks, or a segmenter kind's."""
    manifest = pd.read_csv(root / "replication.csv")
    references = pd.read_csv(root / "references.csv")

    def stack(loader, paths):
        return torch.from_numpy(np.stack([loader(root / p, size) for p in paths]))

    gens, refs = stack(load_image, manifest["gen"]), stack(load_image, references["path"])
    if masks == "true":
        gen_fg, ref_fg = (
            stack(load_mask, manifest["gen_mask"]),
            stack(load_mask, references["mask"]),
        )
    else:
        segmenter = make_segmenter(SegmenterConfig(kind=masks))
        gen_fg = torch.from_numpy(segmenter(gens.numpy()))
        ref_fg = torch.from_numpy(segmenter(refs.numpy()))
    return manifest, references, gens, refs, gen_fg, ref_fg


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return platform.machine()


def margins(scores, expected: np.ndarray, tau: float = DEFAULT_TAU) -> np.ndarray:
    """Per pair, how far the deciding scores are from tau on the side of the expected label
    (docs/replication.md): negative where the pair gets another label."""
    full, fg, bg = scores.m_full, scores.m_fg, scores.m_bg
    return np.select(
        [expected == "VM", expected == "FM", expected == "BM"],
        [
            full - tau,
            np.minimum(tau - full, fg - tau),
            np.minimum.reduce([tau - full, tau - fg, bg - tau]),
        ],
        default=tau - np.maximum.reduce([full, fg, bg]),
    )


def measure(manifest, references, gens, refs, gen_fg, ref_fg, region_mode: str):
    """The JSON record of one mode, and its scores (for the agreement)."""
    t = time.perf_counter()
    scores = score_pairs(gens, refs, gen_fg, ref_fg, region_mode=region_mode)
    seconds = time.perf_counter() - t
    ref_index = {r: i for i, r in enumerate(references["ref_id"])}
    intended = np.array([ref_index[r] for r in manifest["ref_id"]])
    own = scores.pairs[:, 1] == intended[scores.pairs[:, 0]]
    kinds = manifest["kind"].to_numpy()
    result: dict = {"pairs": len(scores), "seconds": round(seconds, 2), "intended": {}, "match": {}}
    for kind, label in KIND_LABEL.items():
        rows = np.flatnonzero(own & (kinds[scores.pairs[:, 0]] == kind))
        hits = int((scores.label[rows] == label).sum())
        result["intended"][kind] = f"{hits}/{len(rows)}"
    others = ~own
    result["other_pairs_not_nm"] = (
        f"{int((scores.label[others] != 'NM').sum())}/{int(others.sum())}"
    )
    expected = np.where(own, kinds[scores.pairs[:, 0]], "unrelated")
    margin = margins(scores, np.array([KIND_LABEL[k] for k in expected]))
    worst = int(np.argmin(margin))
    g, r = scores.pairs[worst]
    result["min_margin"] = {
        "margin": round(float(margin[worst]), 3),
        "gen_id": manifest["gen_id"].iloc[g],
        "ref_id": references["ref_id"].iloc[r],
    }
    matches = select_matches(scores)
    for kind, label in KIND_LABEL.items():
        gens = np.flatnonzero(kinds == kind)
        if kind == "unrelated":
            bad = [g for g in gens if scores.label[matches[g]] != "NM"]
            result["match"]["nm_false_positives"] = f"{len(bad)}/{len(gens)}"
            continue
        found = [
            g
            for g in gens
            if scores.label[matches[g]] == label and scores.pairs[matches[g], 1] == intended[g]
        ]
        result["match"][kind] = f"{len(found)}/{len(gens)}"
    result["per_generation"] = [
        {
            "gen_id": manifest["gen_id"].iloc[g],
            "kind": kinds[g],
            "label": str(scores.label[matches[g]]),
            "matched_ref": references["ref_id"].iloc[scores.pairs[matches[g], 1]],
            "intended_ref": manifest["ref_id"].iloc[g],
            "own": {
                k: round(float(getattr(scores, k)[i]), 3)
                for k in ("m_full", "m_fg", "m_bg")
                for i in np.flatnonzero(own & (scores.pairs[:, 0] == g))
            },
        }
        for g in range(len(manifest))
    ]
    return result, scores


def agreement(masked, pooled) -> dict:
    """How often the two modes give the same label: per generation's one match, per pair."""
    m, p = select_matches(masked), select_matches(pooled)
    same = [masked.label[m[g]] == pooled.label[p[g]] for g in m]
    changed = [
        f"{masked.label[m[g]]}->{pooled.label[p[g]]}"
        for g in m
        if masked.label[m[g]] != pooled.label[p[g]]
    ]
    return {
        "generations_same_label": f"{sum(same)}/{len(same)}",
        "pairs_same_label": f"{int((masked.label == pooled.label).sum())}/{len(masked)}",
        "changes": {k: int(v) for k, v in pd.Series(changed, dtype=object).value_counts().items()},
    }


def run(loaded, mode: str, head: dict, per_generation: bool):
    """Score one mode, print its record; its scores and the record's head."""
    if mode == "pooled":
        head = {**head, "inside": similarity.REGION_INSIDE}
    result, scores = measure(*loaded, region_mode=mode)
    if not per_generation:
        result.pop("per_generation")
    print(json.dumps({**head, "region_mode": mode, **result}), flush=True)
    return scores, head


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 256])
    parser.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    parser.add_argument("--per-generation", action="store_true", help="include every generation")
    parser.add_argument(
        "--inside",
        type=float,
        nargs="+",
        default=[similarity.REGION_INSIDE],
        help="pooled mode's window share thresholds to try (similarity.REGION_INSIDE)",
    )
    parser.add_argument(
        "--masks",
        nargs="+",
        default=["true"],
        choices=["true", "classical", "u2netp"],
        help="whose masks: the sets' true masks, or a segmenter's (u2netp needs its extra)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets:
            root = Path(tmp) / name
            SETS[name](root, size=max(args.sizes))
            for size, masks in itertools.product(args.sizes, args.masks):
                loaded = load_set(root, size, masks)
                head = {"set": name, "size": size, "masks": masks, "device": cpu_name()}
                masked, _ = run(loaded, "masked", head, args.per_generation)
                for inside in args.inside:
                    similarity.REGION_INSIDE = inside
                    pooled, head_pooled = run(loaded, "pooled", head, args.per_generation)
                    agree = agreement(masked, pooled)
                    print(json.dumps({**head_pooled, "agreement": agree}), flush=True)


if __name__ == "__main__":
    main()
