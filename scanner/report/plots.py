"""The report's figures as PNG files, in the style of the paper's Figures 3 and 5.

Figures are built on `matplotlib.figure.Figure` directly (no pyplot): no global backend
state, no display needed, safe inside a Ray driver or worker.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from scanner.analysis import ScanAggregates, method_order
from scanner.fbmem import LABELS

# One colour per label, shared with the HTML page: severity reads from red to grey.
LABEL_COLORS = {"VM": "#c0392b", "FM": "#e67e22", "BM": "#2e86c1", "NM": "#b8bec6"}
LABEL_NAMES = {
    "VM": "verbatim (VM)",
    "FM": "foreground (FM)",
    "BM": "background (BM)",
    "NM": "not memorized (NM)",
}
# Direction of the no-reference quality metrics DESIGN 4.8 uses (pyiqa's `lower_better`).
QUALITY_LOWER_IS_BETTER = {"piqe": True, "dbcnn": False, "qalign": False}
DPI = 150


def _style(ax) -> None:
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(axis="y", color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)


def _save(fig: Figure, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, bbox_inches="tight", facecolor="white")
    return out


def _stacked(ax, x, heights: dict[str, np.ndarray], labels, annotate_min: float | None = None):
    bottom = np.zeros(len(x))
    for label in labels:
        h = np.asarray(heights[label], dtype=float)
        ax.bar(x, h, bottom=bottom, color=LABEL_COLORS[label], label=LABEL_NAMES[label], width=0.7)
        if annotate_min is not None:
            for xi, b, hi in zip(x, bottom, h):
                if hi >= annotate_min:
                    color = "#374151" if label == "NM" else "white"
                    ax.text(
                        xi,
                        b + hi / 2,
                        f"{hi:.0%}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color=color,
                    )
        bottom += h


def plot_distribution(dist: pd.DataFrame, out: str | Path) -> Path:
    """Stacked shares of VM/FM/BM/NM, one bar per method (the paper's Figure 5)."""
    methods = list(dist.index)
    fig = Figure(figsize=(max(3.2, 1.1 * len(methods) + 2.2), 3.6))
    ax = fig.subplots()
    x = np.arange(len(methods))
    _stacked(ax, x, {lab: dist[f"share_{lab}"].to_numpy() for lab in LABELS}, LABELS, 0.04)
    ax.set_xticks(x, [f"{m}\n(n={t:,})" for m, t in zip(methods, dist["total"])], fontsize=8)
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.set_ylabel("share of generations")
    ax.set_title("Memorization by region", fontsize=10)
    ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _style(ax)
    return _save(fig, out)


def plot_one_to_many(table: pd.DataFrame, out: str | Path) -> Path:
    """Memorized generations by the number of distinct training images their prompt matched,
    stacked by label, one panel per method (the paper's Figure 3); NM too when counted."""
    methods = method_order(table["method"])
    counted = [label for label in LABELS if label in table.columns]
    fig = Figure(figsize=(3.2 * len(methods) + 0.6, 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(methods), sharey=True, squeeze=False)[0])
    for ax, method in zip(axes, methods):
        part = table[table["method"] == method]
        x = part["distinct_refs"].to_numpy()
        _stacked(ax, x, {lab: part[lab].to_numpy() for lab in counted}, counted)
        for xi, total, prompts in zip(x, part["generations"], part["prompts"]):
            if prompts:
                ax.text(
                    xi,
                    total,
                    f"{prompts} p",
                    ha="center",
                    va="bottom",
                    fontsize=6.5,
                    color="#4b5563",
                )
        ax.set_xticks(x)
        ax.set_title(f"method: {method}", fontsize=9)
        ax.margins(y=0.12)
        _style(ax)
    axes[0].set_ylabel("generations" if "NM" in counted else "memorized generations")
    axes[-1].legend(fontsize=7, frameon=False, loc="upper right")
    fig.supxlabel("distinct training images matched per prompt (p = prompts)", fontsize=9)
    fig.suptitle("One prompt, many training images", fontsize=10)
    return _save(fig, out)


def plot_clusters(clusters: pd.DataFrame, out: str | Path) -> Path:
    """Stacked label shares per prompt cluster, one row of bars per method."""
    methods = method_order(clusters["method"])
    n_clusters = clusters["cluster_id"].nunique()
    fig = Figure(figsize=(max(4.6, 0.45 * n_clusters + 3.0), 1.9 * len(methods) + 0.5))
    axes = np.atleast_1d(fig.subplots(len(methods), 1, sharex=True, squeeze=False)[:, 0])
    for ax, method in zip(axes, methods):
        part = clusters[clusters["method"] == method].sort_values("cluster_id")
        x = part["cluster_id"].to_numpy()
        shares = {lab: (part[lab] / part["total"]).to_numpy() for lab in LABELS}
        _stacked(ax, x, shares, LABELS)
        ax.set_ylim(0, 1)
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
        ax.set_title(f"method: {method}", fontsize=9)
        ax.set_xticks(x)
        _style(ax)
    axes[-1].set_xlabel("prompt cluster")
    axes[0].legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, out)


def quality_drop(quality: float, baseline: float, metric: str) -> float:
    """How much worse the images got (positive = worse), whichever way the metric points."""
    key = metric.lower().replace("-", "").replace("_", "")
    if key not in QUALITY_LOWER_IS_BETTER:
        raise ValueError(
            f"unknown quality metric {metric!r}; expected one of {sorted(QUALITY_LOWER_IS_BETTER)}"
        )
    return quality - baseline if QUALITY_LOWER_IS_BETTER[key] else baseline - quality


def plot_mitigation(mitigation: dict, out: str | Path) -> Path:
    """Utility against mitigation: quality drop (x) and Table 2 score (y), one point per method.

    `mitigation` is `report/mitigation.json`: {"methods": [{"method", "mitigation_score",
    "quality", "quality_metric"}], "baseline_quality"}.
    """
    if (
        not isinstance(mitigation, dict)
        or "methods" not in mitigation
        or "baseline_quality" not in mitigation
    ):
        raise ValueError("mitigation must be a dict with 'methods' and 'baseline_quality'")
    rows = mitigation["methods"]
    metrics = {r["quality_metric"] for r in rows}
    if len(metrics) > 1:
        raise ValueError(f"methods were rated with different quality metrics {sorted(metrics)}")
    fig = Figure(figsize=(4.6, 3.6))
    ax = fig.subplots()
    base = float(mitigation["baseline_quality"])
    for r in rows:
        drop = quality_drop(float(r["quality"]), base, r["quality_metric"])
        ax.scatter(drop, r["mitigation_score"], s=46, color="#1f3a5f", zorder=3)
        ax.annotate(
            r["method"],
            (drop, r["mitigation_score"]),
            xytext=(5, 4),
            textcoords="offset points",
            fontsize=8,
        )
    ax.axvline(0, color="#9ca3af", linewidth=0.8, linestyle="--")
    ax.margins(0.2)
    metric = next(iter(metrics), "quality")
    ax.set_xlabel(f"quality drop ({metric}; right = worse images)")
    ax.set_ylabel("mitigation score (Table 2)")
    ax.set_title("Mitigation trade-off (top-left is best)", fontsize=10)
    ax.grid(color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, out)


def read_mitigation(report_dir: Path) -> dict | None:
    """`report/mitigation.json` when a mitigation job wrote one, else None."""
    file = Path(report_dir) / "mitigation.json"
    return json.loads(file.read_text()) if file.exists() else None


def write_plots(aggregates: ScanAggregates, report_dir: str | Path) -> dict[str, Path]:
    """Every figure the scan supports, as `report/<name>.png`; returns name -> path."""
    report_dir = Path(report_dir)
    plots = {}
    if len(aggregates.distribution):  # a scan with no labelled generation has nothing to draw
        plots["distribution"] = plot_distribution(
            aggregates.distribution, report_dir / "distribution.png"
        )
        plots["one_to_many"] = plot_one_to_many(
            aggregates.one_to_many, report_dir / "one_to_many.png"
        )
    if aggregates.clusters is not None:
        plots["clusters"] = plot_clusters(aggregates.clusters, report_dir / "clusters.png")
    mitigation = read_mitigation(report_dir)
    if mitigation is not None:
        plots["mitigation"] = plot_mitigation(mitigation, report_dir / "mitigation.png")
    return plots
