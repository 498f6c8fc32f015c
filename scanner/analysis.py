"""Driver-side aggregation of a scan's labels: what the paper's Figures 3 and 5 count.

The functions over DataFrames are pure. `aggregate` reads a scan directory column by column
(prompt ids, methods, labels, matched ref ids; never image bytes), so summarizing a
million-generation scan holds a few small columns in memory, not its pictures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from scanner.fbmem import LABELS
from scanner.store import ShardedTables

MEMORIZED = LABELS[:3]  # VM, FM, BM: every label but NM
BASELINE_METHOD = "none"  # the model as is (DESIGN 3), listed first
TOP_REFERENCES = 20  # training images listed in the summary, most often matched first
LABEL_COLUMNS = ["prompt_id", "method", "label", "ref_id"]
SUMMARY_TABLES = ("prompts", "generations", "matches", "labels", "errors")


def _require(frame: pd.DataFrame, columns: list[str], name: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{name} must be a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} lacks columns {missing}; it has {list(frame.columns)}")


def _check_labels(labels: pd.DataFrame, columns: list[str]) -> None:
    _require(labels, columns, "labels")
    unknown = sorted(set(labels["label"].dropna().unique()) - set(LABELS))
    if unknown or labels["label"].isna().any():
        raise ValueError(f"labels must be one of {LABELS}, found {unknown or [None]}")


def method_order(methods) -> list[str]:
    """The baseline first, then mitigation methods alphabetically."""
    found = sorted(set(methods))
    return [m for m in found if m == BASELINE_METHOD] + [m for m in found if m != BASELINE_METHOD]


def _method_rank(column: pd.Series) -> pd.Series:
    """Sort key putting methods in `method_order`; other columns sort as they are."""
    if column.name != "method":
        return column
    return column.map({m: i for i, m in enumerate(method_order(column))})


def _label_counts(labels: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Counts of all four labels per group, zeros included, plus the group total."""
    counts = labels.groupby(keys + ["label"]).size().unstack("label", fill_value=0)
    counts = counts.reindex(columns=list(LABELS), fill_value=0).astype(np.int64)
    counts.columns.name = None
    counts["total"] = counts.sum(axis=1)
    return counts


def distribution(labels: pd.DataFrame) -> pd.DataFrame:
    """Per method (index): counts of VM, FM, BM, NM, their total, and shares `share_<label>`."""
    _check_labels(labels, ["method", "label"])
    counts = _label_counts(labels, ["method"])
    counts = counts.reindex(method_order(counts.index))
    for label in LABELS:
        counts[f"share_{label}"] = counts[label] / counts["total"]
    return counts


def _one_to_many(labels: pd.DataFrame, n: int, keys: list[str], count_nm: bool) -> pd.DataFrame:
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n (generations per prompt) must be a positive integer, got {n!r}")
    per_prompt = labels.groupby(keys + ["prompt_id"]).size()
    if len(per_prompt) and per_prompt.max() > n:
        where = per_prompt.idxmax()
        raise ValueError(
            f"group {where} has {per_prompt.max()} generations but n = {n}; "
            "n must be at least the number of generations per prompt"
        )
    memorized = labels[labels["label"] != "NM"]
    if memorized["ref_id"].isna().any():
        bad = memorized.loc[memorized["ref_id"].isna(), "prompt_id"].tolist()[:5]
        raise ValueError(f"memorized generations without a ref_id (prompts {bad})")
    # counting NM: every generation with a match (an NM one may have had no candidate at all)
    counted = labels[labels["ref_id"].notna()] if count_nm else memorized
    counted_labels = [*MEMORIZED, "NM"] if count_nm else list(MEMORIZED)
    per_prompt_keys, per_category = keys + ["prompt_id"], keys + ["distinct_refs"]
    distinct = counted.groupby(per_prompt_keys)["ref_id"].transform("nunique")
    tagged = counted[per_prompt_keys + ["label"]].assign(distinct_refs=distinct.astype(np.int64))
    counts = {"prompts": tagged.drop_duplicates(per_prompt_keys).groupby(per_category).size()}
    for label in counted_labels:
        counts[label] = tagged[tagged["label"] == label].groupby(per_category).size()

    groups = labels[keys].drop_duplicates().sort_values(keys, key=_method_rank)
    out = groups.merge(pd.DataFrame({"distinct_refs": np.arange(1, n + 1)}), how="cross")
    cells = pd.MultiIndex.from_frame(out[per_category])
    for name, series in counts.items():
        out[name] = series.reindex(cells, fill_value=0).to_numpy(np.int64)
    out["generations"] = out[counted_labels].sum(axis=1)
    return out


def one_to_many(labels: pd.DataFrame, n: int, count_nm: bool = False) -> pd.DataFrame:
    """DESIGN 4.3, the paper's Figure 3: how many training images one prompt copies.

    Per (method, prompt), the memorized generations (label != NM) are counted by the number
    c of distinct training images they matched. Rows: every method x c in 1..n, with the
    number of prompts in category c and their memorized generations by label (VM, FM, BM).
    Prompts without a memorized generation belong to no category and are not counted.

    `count_nm=True` counts as the FB-Mem authors' script did instead: c is the number of
    distinct training images matched by all of the prompt's generations, NM included, every
    prompt with a match is in a category, and an `NM` column counts its NM generations
    (`generations` then includes them).
    """
    _check_labels(labels, LABEL_COLUMNS)
    return _one_to_many(labels, n, ["method"], count_nm)


def has_clusters(prompts: pd.DataFrame) -> bool:
    _require(prompts, ["prompt_id", "cluster_id"], "prompts")
    return bool(prompts["cluster_id"].notna().any())


def _with_clusters(labels: pd.DataFrame, prompts: pd.DataFrame) -> pd.DataFrame:
    _check_labels(labels, LABEL_COLUMNS)
    _require(prompts, ["prompt_id", "cluster_id"], "prompts")
    clusters = prompts.drop_duplicates("prompt_id").set_index("prompt_id")["cluster_id"]
    cluster = labels["prompt_id"].map(clusters)
    if cluster.isna().any():
        missing = sorted(labels.loc[cluster.isna(), "prompt_id"].unique().tolist())
        raise ValueError(
            f"{len(missing)} labelled prompts have no cluster_id (first: {missing[:5]}); "
            "clustering assigns every prompt, so the prompts table is incomplete"
        )
    return labels.assign(cluster_id=cluster.astype(np.int64))


def cluster_counts(labels: pd.DataFrame, prompts: pd.DataFrame) -> pd.DataFrame:
    """Per (method, cluster_id): prompts, label counts, total and the memorized share."""
    labelled = _with_clusters(labels, prompts)
    counts = _label_counts(labelled, ["method", "cluster_id"])
    counts.insert(0, "prompts", labelled.groupby(["method", "cluster_id"])["prompt_id"].nunique())
    counts["memorized_share"] = counts[list(MEMORIZED)].sum(axis=1) / counts["total"]
    counts = counts.reset_index()
    return counts.sort_values(["method", "cluster_id"], key=_method_rank, ignore_index=True)


def cluster_one_to_many(
    labels: pd.DataFrame, prompts: pd.DataFrame, n: int, count_nm: bool = False
) -> pd.DataFrame:
    """`one_to_many` per (method, cluster_id): DESIGN 4.3 over all prompts of each cluster."""
    return _one_to_many(_with_clusters(labels, prompts), n, ["method", "cluster_id"], count_nm)


def top_references(labels: pd.DataFrame, k: int = TOP_REFERENCES) -> pd.DataFrame:
    """The training images matched by the most memorized generations, with their labels."""
    _check_labels(labels, LABEL_COLUMNS)
    memorized = labels[labels["label"] != "NM"]
    counts = _label_counts(memorized, ["ref_id"]).drop(columns="NM")
    counts = counts.rename(columns={"total": "generations"})
    counts["prompts"] = memorized.groupby("ref_id")["prompt_id"].nunique()
    counts = counts.reset_index().sort_values(["generations", "ref_id"], ascending=[False, True])
    return counts.head(k).reset_index(drop=True)


def designed_vs_found(labels: pd.DataFrame, prompts: pd.DataFrame) -> pd.DataFrame | None:
    """Per (method, group, designed): label counts of the generations, when the prompt source
    carries ground truth (`designed`; `group` splits it further, e.g. the organism's held-out
    captions with and without a concept word). None when no prompt has a designed label."""
    _check_labels(labels, ["prompt_id", "method", "label"])
    if "designed" not in prompts.columns or prompts["designed"].isna().all():
        return None
    truth = prompts.drop_duplicates("prompt_id").set_index("prompt_id")
    group = truth["group"] if "group" in truth.columns else truth["designed"]
    tagged = labels.assign(
        group=labels["prompt_id"].map(group.fillna(truth["designed"])).fillna("(none)"),
        designed=labels["prompt_id"].map(truth["designed"]).fillna("(none)"),
    )
    counts = _label_counts(tagged, ["method", "group", "designed"])
    hit = [
        row[d] if d in LABELS else 0
        for d, (_, row) in zip(counts.index.get_level_values("designed"), counts.iterrows())
    ]
    counts["as_designed"] = np.asarray(hit, dtype=np.int64)
    counts = counts.reset_index()
    return counts.sort_values(["method", "group"], key=_method_rank, ignore_index=True)


def nearest_similarity(
    labels: pd.DataFrame, matches: pd.DataFrame, prompts: pd.DataFrame
) -> pd.DataFrame | None:
    """Per (method, group): how close generations come to their nearest training image, the
    highest M_full over their scored candidates (mean, median, min, max). None without groups."""
    if "designed" not in prompts.columns or prompts["designed"].isna().all() or matches.empty:
        return None
    truth = prompts.drop_duplicates("prompt_id").set_index("prompt_id")
    group = truth["group"] if "group" in truth.columns else truth["designed"]
    best = matches.groupby("gen_id")["m_full"].max().rename("nearest_m_full")
    tagged = labels.set_index("gen_id").join(best, how="inner")
    tagged["group"] = tagged["prompt_id"].map(group.fillna(truth["designed"])).fillna("(none)")
    stats = tagged.groupby(["method", "group"])["nearest_m_full"].agg(
        ["count", "mean", "median", "min", "max"]
    )
    return stats.reset_index().sort_values(["method", "group"], key=_method_rank, ignore_index=True)


@dataclass(frozen=True)
class ScanAggregates:
    """Everything the summary and the report show, computed once from a scan directory."""

    scan_dir: Path
    manifest: dict
    rows: dict[str, int]
    n: int  # generations per prompt: the one-to-many categories run 1..n
    distribution: pd.DataFrame
    one_to_many: pd.DataFrame
    clusters: pd.DataFrame | None  # None when the scan's prompts carry no cluster ids
    cluster_one_to_many: pd.DataFrame | None
    top_references: pd.DataFrame
    errors: pd.DataFrame  # stage, error_type, count
    one_to_many_counts_nm: bool = False  # the authors' counting (NM matches too), not the paper's
    designed: pd.DataFrame | None = None  # designed vs found, when prompts carry ground truth
    nearest: pd.DataFrame | None = None  # nearest training image's M_full per group

    def to_dict(self) -> dict:
        def records(frame: pd.DataFrame | None):
            return None if frame is None else json.loads(frame.to_json(orient="records"))

        config = self.manifest.get("config", {})
        return {
            "scan": str(self.scan_dir),
            "kind": self.manifest.get("kind"),
            "config": config,
            "backends": self.manifest.get("backends"),
            "started": self.manifest.get("started"),
            "finished": self.manifest.get("finished"),
            "rows": self.rows,
            "n_per_prompt": self.n,
            "distribution": json.loads(self.distribution.to_json(orient="index")),
            "one_to_many": records(self.one_to_many),
            "one_to_many_counts_nm": self.one_to_many_counts_nm,
            "one_to_many_note": (
                "as the FB-Mem authors' script: NM generations' matches count too"
                if self.one_to_many_counts_nm
                else "prompts without a memorized generation are in no category"
            ),
            "clusters": records(self.clusters),
            "cluster_one_to_many": records(self.cluster_one_to_many),
            "top_references": records(self.top_references),
            "errors": records(self.errors),
            "designed_vs_found": records(self.designed),
            "nearest_m_full": records(self.nearest),
        }


def read_manifest(scan_dir: Path) -> dict:
    file = scan_dir / "manifest.json"
    if not file.exists():
        raise ValueError(f"{scan_dir}: not a scan directory (no manifest.json)")
    return json.loads(file.read_text())


def generations_per_prompt(manifest: dict, labels: pd.DataFrame) -> int:
    """The run's N: from its config when recorded, else the most generations of any prompt."""
    configured = manifest.get("config", {}).get("n_per_prompt")
    if configured:
        return int(configured)
    sizes = labels.groupby(["method", "prompt_id"]).size()
    return int(sizes.max()) if len(sizes) else 1


def aggregate(scan_dir: str | Path, n: int | None = None, count_nm: bool = False) -> ScanAggregates:
    """Read a scan directory's small columns and compute every aggregate of the report.

    `count_nm` switches the one-to-many tables to the authors' counting (see `one_to_many`).
    """
    scan_dir = Path(scan_dir)
    manifest = read_manifest(scan_dir)
    tables = ShardedTables(scan_dir, SUMMARY_TABLES)
    labels = tables.read("labels", ["gen_id", *LABEL_COLUMNS]).to_pandas()
    prompts = tables.read(
        "prompts",
        tables.present("prompts", ["prompt_id", "cluster_id", "designed", "concept", "group"]),
    ).to_pandas()
    errors = tables.read("errors", ["stage", "error_type"]).to_pandas()
    n = generations_per_prompt(manifest, labels) if n is None else n
    clustered = has_clusters(prompts)
    designed = designed_vs_found(labels, prompts)
    # The nearest training image needs every scored candidate: read only with ground truth.
    nearest = (
        nearest_similarity(
            labels, tables.read("matches", ["gen_id", "m_full"]).to_pandas(), prompts
        )
        if designed is not None
        else None
    )
    return ScanAggregates(
        scan_dir=scan_dir,
        manifest=manifest,
        rows={t: tables.count(t) for t in SUMMARY_TABLES},
        n=n,
        distribution=distribution(labels),
        one_to_many=one_to_many(labels, n, count_nm),
        clusters=cluster_counts(labels, prompts) if clustered else None,
        cluster_one_to_many=(
            cluster_one_to_many(labels, prompts, n, count_nm) if clustered else None
        ),
        top_references=top_references(labels),
        errors=errors.groupby(["stage", "error_type"]).size().rename("count").reset_index(),
        one_to_many_counts_nm=count_nm,
        designed=designed,
        nearest=nearest,
    )


def write_summary(aggregates: ScanAggregates) -> dict:
    summary = aggregates.to_dict()
    out = aggregates.scan_dir / "report"
    out.mkdir(exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def summarize(scan_dir: str | Path, n: int | None = None, count_nm: bool = False) -> dict:
    """Aggregate a scan directory and write `report/summary.json`; returns the summary."""
    return write_summary(aggregate(scan_dir, n, count_nm))
