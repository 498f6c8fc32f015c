"""Calibration against human labels: how well does each metric separate what people call copies?

The paper's Table 1 justifies its choice of MS-SSIM this way: on hand-labelled generations
(VM verbatim, TM template / partial copy, NM no copy) it asks how well the whole-image
similarity of a generation to its training image separates the classes, for SSIM, MS-SSIM
and SSCD. `calibrate` does the same for a scan and the user's own labels, so the metric and
its threshold tau are checked on the data they will be applied to, not taken on trust.

Per metric and task (VM-vs-NM, TM-vs-NM, VM-vs-TM; the first class is the positive one):
AUROC (Mann-Whitney, ties count half), the tau with the best F1 when "score >= tau" is
called positive (Algorithm 1's rule), that F1 and the accuracy at it, and the largest TPR
among operating points with FPR <= 1% (not interpolated).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy.stats import rankdata

from scanner.images import load_image
from scanner.reference import ReferenceStore
from scanner.report.rows import read_rows, reference_dir
from scanner.similarity import similarity
from scanner.sources import read_table
from scanner.sscd import SSCDModel
from scanner.store import ShardedTables

HUMAN_LABELS: tuple[str, ...] = ("VM", "TM", "NM")
# (positive, negative) class of each of the paper's Table 1 comparisons.
TASKS: tuple[tuple[str, str], ...] = (("VM", "NM"), ("TM", "NM"), ("VM", "TM"))
MAX_FPR = 0.01  # Table 1's "TPR at 1% FPR"
PIXEL_METRICS = ("ssim", "ms_ssim")  # always computed; "sscd" joins when a model is given
METRIC_NAMES = {"ssim": "SSIM", "ms_ssim": "MS-SSIM", "sscd": "SSCD"}
CHUNK = 16  # labelled pairs decoded and scored together: memory stays flat at any label count
SHOWN = 5  # offending values quoted in an error message


# --- Table 1 measures on two score samples ------------------------------------------------


def auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a random positive scores above a random negative), ties counted half."""
    ranks = rankdata(np.concatenate([pos, neg]))  # ties get their average rank
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def operating_points(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, ...]:
    """(tau, TP, FP) for every distinct score as tau, highest first, calling score >= tau positive."""
    taus = np.unique(np.concatenate([pos, neg]))[::-1]
    tp = len(pos) - np.searchsorted(np.sort(pos), taus, side="left")
    fp = len(neg) - np.searchsorted(np.sort(neg), taus, side="left")
    return taus, tp, fp


def best_f1(pos: np.ndarray, neg: np.ndarray) -> tuple[float, float, float]:
    """(F1, tau, accuracy) at the tau maximizing F1; on ties the highest such tau."""
    taus, tp, fp = operating_points(pos, neg)
    f1 = 2 * tp / (tp + fp + len(pos))  # 2TP / (2TP + FP + FN), with FN = |pos| - TP
    i = int(np.argmax(f1))  # first maximum = highest tau
    accuracy = (tp[i] + len(neg) - fp[i]) / (len(pos) + len(neg))
    return float(f1[i]), float(taus[i]), float(accuracy)


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, max_fpr: float = MAX_FPR) -> float:
    """Largest TPR over operating points with FPR <= max_fpr; tau above every score gives 0."""
    _, tp, fp = operating_points(pos, neg)
    allowed = fp / len(neg) <= max_fpr
    return float(tp[allowed].max(initial=0) / len(pos))


def task_measures(scores: np.ndarray, labels: np.ndarray, positive: str, negative: str) -> dict:
    """Table 1's measures for one metric and task; NaN where a class has no examples."""
    pos, neg = scores[labels == positive], scores[labels == negative]
    row = {"task": f"{positive}-vs-{negative}", "n_pos": len(pos), "n_neg": len(neg)}
    if not len(pos) or not len(neg):
        nan = float("nan")
        return {**row, "auroc": nan, "f1": nan, "tau": nan, "accuracy": nan, "tpr_at_1pct_fpr": nan}
    f1, tau, accuracy = best_f1(pos, neg)
    return {
        **row,
        "auroc": auroc(pos, neg),
        "f1": f1,
        "tau": tau,
        "accuracy": accuracy,
        "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg),
    }


# --- Human labels against the scan ------------------------------------------------------


def _examples(values) -> str:
    values = list(values)
    more = f" and {len(values) - SHOWN} more" if len(values) > SHOWN else ""
    return ", ".join(repr(v) for v in values[:SHOWN]) + more


def _scan_manifest(scan_dir: Path) -> dict:
    file = scan_dir / "manifest.json"
    if not file.exists():
        raise ValueError(f"{scan_dir}: not a scan directory (no manifest.json); run `fbmem scan`")
    return json.loads(file.read_text())


def _gen_ids_of_paths(paths: pd.Series, scan_dir: Path) -> pd.Series:
    """Generation ids of image files, matched on the scan's `source` column."""
    sources = ShardedTables(scan_dir, ["generations"]).read("generations", ["gen_id", "source"])
    by_file = {
        os.path.realpath(s): g
        for g, s in zip(sources.column("gen_id").to_pylist(), sources.column("source").to_pylist())
        if s
    }
    ids = paths.map(lambda p: by_file.get(os.path.realpath(p)))
    if ids.isna().any():
        raise ValueError(
            f"labelled paths not scanned in {scan_dir}: {_examples(paths[ids.isna()])}; "
            "label the files the scan read (its generations table's `source` column) or use gen_id"
        )
    return ids


def resolve_labels(labels: pd.DataFrame, scan_dir: str | Path) -> pd.DataFrame:
    """`gen_id`, `label`, `ref_id` per labelled generation, every id checked against the scan.

    `labels` has `label` (VM / TM / NM) and `gen_id` or `path` (an image file the scan read,
    relative paths taken from the working directory); `ref` optionally names the training
    image (a ref_id), else the scan's matched reference of that generation is used.
    """
    if not isinstance(labels, pd.DataFrame):
        raise TypeError(f"labels must be a pandas DataFrame, got {type(labels).__name__}")
    key = "gen_id" if "gen_id" in labels.columns else "path"
    if "label" not in labels.columns or key not in labels.columns:
        raise ValueError(
            f"labels need a `label` column and a `gen_id` or `path` column; found {list(labels.columns)}"
        )
    if labels.empty:
        raise ValueError("labels are empty: nothing to calibrate")
    scan_dir = Path(scan_dir)
    _scan_manifest(scan_dir)
    label = labels["label"].astype(str).str.strip().str.upper()
    bad = ~label.isin(HUMAN_LABELS)
    if bad.any():
        rows = [f"row {i}: {v!r}" for i, v in zip(labels.index[bad], labels["label"][bad])]
        raise ValueError(f"labels must be one of {HUMAN_LABELS}; got {_examples(rows)}")
    if key == "gen_id":
        gen_ids = labels["gen_id"].astype(str).str.strip()
    else:
        gen_ids = _gen_ids_of_paths(labels["path"].astype(str).str.strip(), scan_dir)
    dup = gen_ids.duplicated()
    if dup.any():
        raise ValueError(
            f"each generation may be labelled once; repeated: {_examples(gen_ids[dup])}"
        )
    matched = ShardedTables(scan_dir, ["labels"]).read("labels", ["gen_id", "ref_id"]).to_pandas()
    matched_ref = matched.set_index("gen_id")["ref_id"]
    missing = ~gen_ids.isin(matched_ref.index)
    if missing.any():
        raise ValueError(f"generations not in the scan {scan_dir}: {_examples(gen_ids[missing])}")
    ref_ids = gen_ids.map(matched_ref)
    if "ref" in labels.columns:
        given = labels["ref"].astype("string").str.strip().replace("", pd.NA)
        ref_ids = given.fillna(ref_ids).astype(object)
    no_ref = ref_ids.isna()
    if no_ref.any():
        raise ValueError(
            f"no training image for {_examples(gen_ids[no_ref])}: the scan matched none; "
            "name it in a `ref` column"
        )
    return pd.DataFrame(
        {"gen_id": gen_ids.to_numpy(), "label": label.to_numpy(), "ref_id": ref_ids.to_numpy()}
    )


# --- Whole-image scores -----------------------------------------------------------------


def whole_image_scores(
    pairs: pd.DataFrame, scan_dir: Path, refs: ReferenceStore, sscd: SSCDModel | None, device: str
) -> pd.DataFrame:
    """SSIM, MS-SSIM (and SSCD) of each labelled generation against its training image."""
    row_of = {rid: i for i, rid in enumerate(refs.ref_ids)}
    unknown = ~pairs["ref_id"].isin(row_of)
    if unknown.any():
        raise ValueError(
            f"training images not in the reference store {refs.root}: "
            f"{_examples(pairs['ref_id'][unknown].unique())}"
        )
    metrics = (*PIXEL_METRICS, "sscd") if sscd is not None else PIXEL_METRICS
    columns = {m: np.empty(len(pairs)) for m in metrics}
    for start in range(0, len(pairs), CHUNK):
        chunk = pairs.iloc[start : start + CHUNK]
        png = {
            row["gen_id"]: row["image"]
            for row in read_rows(scan_dir, "generations", "gen_id", set(chunk["gen_id"]), ["image"])
        }
        gen = torch.stack(
            [torch.from_numpy(load_image(png[g], refs.image_size)) for g in chunk["gen_id"]]
        )
        ref = torch.stack([refs.load(row_of[r])[0] for r in chunk["ref_id"]])
        gen, ref = gen.to(device), ref.to(device)
        span = slice(start, start + len(chunk))
        for metric in PIXEL_METRICS:
            columns[metric][span] = similarity(gen, ref, metric, data_range=1.0).cpu().numpy()
        if sscd is not None:
            columns["sscd"][span] = sscd.similarity(gen, ref).cpu().numpy()
    return pairs.assign(**columns)


# --- The result and the two entry points ------------------------------------------------


def _finite_or_none(value):
    return None if isinstance(value, float) and math.isnan(value) else value


@dataclass(frozen=True)
class CalibrationResult:
    """Per-generation scores and Table 1's measures, with what produced them."""

    scores: pd.DataFrame  # gen_id, label, ref_id, ssim, ms_ssim[, sscd]
    measures: pd.DataFrame  # one row per (metric, task)
    scan: str
    reference: str
    sscd: str | None  # the SSCD model file, None when SSCD was not computed

    def to_dict(self) -> dict:
        """JSON-ready: NaN (a class without examples) becomes null."""
        counts = self.scores["label"].value_counts()
        return {
            "scan": self.scan,
            "reference": self.reference,
            "sscd": self.sscd,
            "counts": {label: int(counts.get(label, 0)) for label in HUMAN_LABELS},
            "max_fpr": MAX_FPR,
            "measures": [
                {k: _finite_or_none(v) for k, v in row.items()}
                for row in self.measures.to_dict("records")
            ],
            "scores": self.scores.to_dict("records"),
        }

    def table(self) -> str:
        """Markdown table, one row per metric and task."""
        lines = [
            "| metric | task | n+ | n- | AUROC | best F1 | tau at best F1 | TPR@1%FPR | accuracy |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in self.measures.itertuples():
            lines.append(
                f"| {METRIC_NAMES[r.metric]} | {r.task} | {r.n_pos} | {r.n_neg} | {r.auroc:.3f} | "
                f"{r.f1:.3f} | {r.tau:.3f} | {r.tpr_at_1pct_fpr:.3f} | {r.accuracy:.3f} |"
            )
        return "\n".join(lines)


def calibrate(
    labels: pd.DataFrame,
    scan_dir: str | Path,
    *,
    sscd_path: str | Path | None = None,
    device: str = "cpu",
    reference: str | Path | None = None,
) -> CalibrationResult:
    """Table 1's measures of SSIM, MS-SSIM (and SSCD) on human labels of a scan's generations;
    `reference` overrides the store named in the scan's manifest."""
    scan_dir = Path(scan_dir)
    # 1. Check the labels against the scan before any image is decoded.
    pairs = resolve_labels(labels, scan_dir)
    # 2. Open the training images the scan used, and the SSCD model when one is named.
    store = reference_dir(_scan_manifest(scan_dir), reference, scan_dir)
    refs = ReferenceStore(store)
    sscd = SSCDModel(sscd_path, device=device) if sscd_path is not None else None
    # 3. Whole-image similarity of every labelled generation to its training image.
    scores = whole_image_scores(pairs, scan_dir, refs, sscd, device)
    # 4. Table 1's measures per metric and task.
    metrics = [m for m in (*PIXEL_METRICS, "sscd") if m in scores.columns]
    label = scores["label"].to_numpy()
    measures = pd.DataFrame(
        [
            {"metric": m, **task_measures(scores[m].to_numpy(), label, positive, negative)}
            for m in metrics
            for positive, negative in TASKS
        ]
    )
    return CalibrationResult(
        scores=scores,
        measures=measures,
        scan=str(scan_dir),
        reference=str(store),
        sscd=str(sscd_path) if sscd_path is not None else None,
    )


def run_calibrate_command(
    labels_csv: str | Path,
    scan_dir: str | Path,
    sscd_path: str | Path | None = None,
    out_json: str | Path | None = None,
    reference: str | Path | None = None,
) -> CalibrationResult:
    """`fbmem calibrate`: read the labels table (relative paths from its folder), print the
    table, write the JSON when asked."""
    labels_csv = Path(labels_csv)
    if not labels_csv.is_file():
        raise ValueError(f"{labels_csv}: no such labels file")
    labels = read_table(labels_csv)
    if "path" in labels.columns:
        labels["path"] = [
            str(p if Path(p).is_absolute() else labels_csv.parent / p)
            for p in labels["path"].astype(str)
        ]
    result = calibrate(labels, scan_dir, sscd_path=sscd_path, reference=reference)
    counts = result.to_dict()["counts"]
    print(
        f"{len(result.scores)} labelled generations "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f"; scan {result.scan}"
    )
    print(result.table())
    if out_json is not None:
        out_json = Path(out_json)
        out_json.parent.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(result.to_dict(), indent=2))
        print(f"wrote {out_json}")
    return result
