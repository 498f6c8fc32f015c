"""`report/index.html`: a static, self-contained page a person reads to judge a scan.

No server and no network: styles and script are inline, figures and thumbnails are files
next to the page (relative paths), and the gallery's records are JSON inside the page.
The gallery holds at most `ReportConfig.max_cards` matches, most severe first, and shows
one page of them at a time, so a million-generation scan opens as fast as a small one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from html import escape
from pathlib import Path

import pandas as pd

from scanner.analysis import MEMORIZED, ScanAggregates, aggregate, write_summary
from scanner.fbmem import DEFAULT_TAU, LABELS
from scanner.report.gallery import MASK_TINT, Gallery, build_gallery
from scanner.report.page_assets import CSS, JS
from scanner.report.plots import (
    LABEL_COLORS,
    LABEL_NAMES,
    quality_drop,
    read_mitigation,
    write_plots,
)
from scanner.report.rows import read_rows, reference_dir
from scanner.store import ShardedTables


@dataclass(frozen=True)
class ReportConfig:
    max_cards: int = 2000  # matches in the gallery: "at most a few thousand thumbnails" (issue 7)
    page_size: int = 48  # cards rendered at a time
    thumb_size: int = 224  # px; cards show images at ~150 px, so sharp on 1.5x screens
    jpeg_quality: int = 85  # 6-15 kB per 224 px photo (measured on scikit-image photos)

    def __post_init__(self) -> None:
        for name in ("max_cards", "page_size", "thumb_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be in 1..95, got {self.jpeg_quality!r}")


def build_report(
    scan_dir: str | Path,
    *,
    reference: str | Path | None = None,
    config: ReportConfig = ReportConfig(),
    count_nm: bool = False,
) -> Path:
    """Write `report/` (summary.json, figures, thumbnails, index.html); returns the page's path.

    `count_nm`: one-to-many tables counted as the FB-Mem authors' script did (NM included).
    """
    scan_dir = Path(scan_dir)
    report_dir = scan_dir / "report"
    # 1. Aggregates and summary.json
    aggregates = aggregate(scan_dir, count_nm=count_nm)
    write_summary(aggregates)
    refs = reference_dir(aggregates.manifest, reference)
    # 2. Figures
    plots = write_plots(aggregates, report_dir)
    # 3. Gallery cards and thumbnails
    gallery = build_gallery(
        scan_dir,
        refs,
        report_dir,
        max_cards=config.max_cards,
        thumb_size=config.thumb_size,
        jpeg_quality=config.jpeg_quality,
    )
    # 4. The page
    page = Page(aggregates, plots, gallery, refs, config).render()
    out = report_dir / "index.html"
    tmp = report_dir / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out


def _num(value) -> str:
    return f"{int(value):,}"


def _table(headers: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    """An HTML table; cells are escaped unless they are `Markup`."""

    def cell(tag: str, i: int, value) -> str:
        cls = ' class="num"' if i in numeric else ""
        text = value if isinstance(value, Markup) else escape(str(value))
        return f"<{tag}{cls}>{text}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows
    )
    return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class Markup(str):
    """Trusted HTML built here, inserted into tables unescaped."""


def _badge(label: str) -> Markup:
    return Markup(f'<span class="badge {label}">{label}</span>')


def _clipped(text: str) -> Markup:
    """Text shown on one line, in full on hover."""
    return Markup(f'<span title="{escape(text)}">{escape(text)}</span>')


def _count_share(count: int, share: float) -> Markup:
    return Markup(f'{_num(count)}<span class="sub">{share:.1%}</span>')


def _when(epoch) -> str:
    if epoch is None:
        return "n/a"
    return datetime.fromtimestamp(float(epoch), tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _segmenter(manifest: dict) -> str:
    """Which segmenter made the masks: the backend's recorded name, else the configured kind;
    the references' own when their store was segmented by another."""
    backends = manifest.get("backends") or {}
    kind = (manifest.get("config") or {}).get("segmenter")
    name = backends.get("segmenter") or (kind.get("kind") if isinstance(kind, dict) else kind)
    ref = backends.get("reference_segmenter")
    text = str(name or "not recorded")
    return text if not ref or ref == name else f"{text} (training images: {ref})"


def _flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, out)
    else:
        out[prefix] = value
    return out


def _kv(items: dict) -> str:
    rows = "".join(f"<dt>{escape(str(k))}</dt><dd>{escape(str(v))}</dd>" for k, v in items.items())
    return f'<dl class="kv">{rows}</dl>'


@dataclass(frozen=True)
class Page:
    """The page's sections, each rendered from the aggregates, figures and gallery."""

    aggregates: ScanAggregates
    plots: dict[str, Path]
    gallery: Gallery
    reference: Path
    config: ReportConfig

    @property
    def run_config(self) -> dict:
        return self.aggregates.manifest.get("config", {})

    def render(self) -> str:
        labelled = "distribution" in self.plots
        sections = [
            self.distribution_section() if labelled else self.nothing_labelled(),
            self.one_to_many_section() if labelled else "",
            self.designed_section(),
            self.clusters_section(),
            self.mitigation_section(),
            self.gallery_section(),
            self.references_section(),
            self.run_section(),
        ]
        colors = "".join(f"--{k}: {v};" for k, v in LABEL_COLORS.items())
        return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>FB-Mem scan report: {escape(self.aggregates.scan_dir.name)}</title>
<style>:root {{ {colors} }}{CSS}</style></head>
<body>
{self.header()}
<main class="wrap">
{self.kpis()}
{"".join(s for s in sections if s)}
<footer>Written by fbmem-scanner. Every row behind this page is in the scan directory's Parquet
tables (<code>labels/</code>, <code>matches/</code>, <code>generations/</code>); the figures' numbers
are in <code>report/summary.json</code>.</footer>
</main>
<script type="application/json" id="gallery-data">{self.gallery_json()}</script>
<script>{JS}</script>
</body></html>
"""

    def header(self) -> str:
        m = self.aggregates.manifest
        cfg = self.run_config
        bits = [
            f"scan <code>{escape(str(self.aggregates.scan_dir))}</code>",
            f"{escape(str(m.get('kind', 'scan')))}",
            f"finished {_when(m.get('finished'))}",
            f"metric {escape(str(cfg.get('metric', 'ms_ssim')))}, τ = {cfg.get('tau', DEFAULT_TAU)}, "
            f"β = {cfg.get('beta', 'n/a')}",
            f"match by {escape(str(cfg.get('match_by', 'most-severe')))}",
            f"segmenter {escape(_segmenter(m))}",
        ]
        links = [
            ("distribution", "Distribution"),
            ("one-to-many", "One-to-many"),
            ("designed", "Designed vs found") if self.aggregates.designed is not None else None,
            ("clusters", "Clusters") if self.aggregates.clusters is not None else None,
            ("mitigation", "Mitigation") if "mitigation" in self.plots else None,
            ("gallery-section", "Gallery"),
            ("references", "Training images"),
            ("run", "Run configuration"),
        ]
        toc = "".join(f'<a href="#{a}">{t}</a>' for a, t in filter(None, links))
        return f"""<header class="top"><div class="wrap">
<h1>Foreground-background memorization report</h1>
<div class="meta">{" · ".join(bits)}</div>
<nav class="toc">{toc}</nav></div></header>"""

    def kpis(self) -> str:
        agg = self.aggregates
        dist = agg.distribution
        base = dist.index[0] if len(dist) else None
        tiles = [
            ("generations", _num(agg.rows.get("generations", 0))),
            ("prompts", _num(agg.rows.get("prompts", 0))),
            ("per prompt (N)", _num(agg.n)),
        ]
        if base is not None:
            memorized = dist.loc[base, list(MEMORIZED)].sum() / max(dist.loc[base, "total"], 1)
            tiles.append((f"memorized ({base})", f"{memorized:.1%}"))
            tiles += [(f"{lab} ({base})", _num(dist.loc[base, lab])) for lab in MEMORIZED]
        tiles.append(("errors", _num(agg.rows.get("errors", 0))))
        body = "".join(
            f'<div class="kpi"><div class="v">{v}</div><div class="k">{escape(k)}</div></div>'
            for k, v in tiles
        )
        return f'<div class="kpis">{body}</div>'

    def nothing_labelled(self) -> str:
        return """<section class="panel" id="distribution"><h2>Memorization distribution</h2>
<p class="lead">No generation has been labelled in this scan yet.</p></section>"""

    def distribution_section(self) -> str:
        dist = self.aggregates.distribution
        rows = [
            [r.Index, _num(r.total)]
            + [_count_share(getattr(r, lab), getattr(r, f"share_{lab}")) for lab in LABELS]
            for r in dist.itertuples()
        ]
        table = _table(
            ["method", "generations", *[LABEL_NAMES[lab] for lab in LABELS]], rows, {1, 2, 3, 4, 5}
        )
        return f"""<section class="panel" id="distribution"><h2>Memorization distribution</h2>
<p class="lead">{self.match_rule()} Labels follow Algorithm 1: verbatim if the whole images agree (M_full ≥ τ), else foreground if the foreground
regions agree (M_fg ≥ τ), else background (M_bg ≥ τ), else not memorized.</p>
<div class="split"><img class="plot" src="{self.plots["distribution"].name}" alt="distribution per method">
<div>{table}</div></div></section>"""

    def match_rule(self) -> str:
        """How this scan picked each generation's one match (scans before `match_by` existed
        used the most severe label)."""
        match_by = self.run_config.get("match_by", "most-severe")
        return {
            "mean": "Each generation is labelled by its one match: the candidate training image "
            "with the highest (M_fg + M_bg) / 2, as the paper's authors rank.",
            "full": "Each generation is labelled by its one match: the candidate training image "
            "with the highest M_full (the paper's Table 1).",
        }.get(
            match_by,
            "Each generation gets the most severe label over its candidate training images "
            "(a worst-case audit view, not the paper's single best match).",
        )

    def one_to_many_section(self) -> str:
        table = self.aggregates.one_to_many
        counted = [label for label in LABELS if label in table.columns]  # NM when counted
        rows = [
            [r["method"], r["distinct_refs"], *(_num(r[c]) for c in ["prompts", *counted])]
            + [_num(r["generations"])]
            for r in table.to_dict("records")
        ]
        nm = "NM" in counted
        html_table = _table(
            [
                "method",
                "distinct training images",
                "prompts",
                *counted,
                "generations" if nm else "memorized generations",
            ],
            rows,
            set(range(1, len(counted) + 4)),
        )
        lead = (
            f"For each prompt, all its generations (of N = {self.aggregates.n}), NM included, are "
            "grouped by how many distinct training images they matched, as the FB-Mem authors' "
            "script counts (the paper's text counts memorized generations only)."
            if nm
            else f"For each prompt, its memorized generations (of N = {self.aggregates.n}) are "
            "grouped by how many distinct training images they matched. Prompts with no "
            "memorized generation are in no category."
        )
        return f"""<section class="panel" id="one-to-many"><h2>One prompt, many training images</h2>
<p class="lead">{lead}</p>
<div class="split"><img class="plot" src="{self.plots["one_to_many"].name}" alt="one-to-many histogram">
<div class="scroll">{html_table}</div></div></section>"""

    def designed_section(self) -> str:
        """Designed vs found: only for prompt sources that carry ground truth (`designed`)."""
        designed = self.aggregates.designed
        if designed is None:
            return ""
        nearest = self.aggregates.nearest
        close = (
            {(r.method, r.group): r for r in nearest.itertuples()} if nearest is not None else {}
        )
        rows = []
        for r in designed.itertuples():
            near = close.get((r.method, r.group))
            rows.append(
                [
                    r.method,
                    r.group,
                    r.designed,
                    _num(r.total),
                    *[_num(getattr(r, lab)) for lab in LABELS],
                    f"{r.as_designed / r.total:.0%}" if r.designed in LABELS else "n/a",
                    f"{near.median:.3f} ({near.min:.3f}-{near.max:.3f})" if near else "",
                ]
            )
        table = _table(
            [
                "method",
                "group",
                "designed",
                "generations",
                *LABELS,
                "as designed",
                "nearest M_full: median (range)",
            ],
            rows,
            {3, 4, 5, 6, 7, 8},
        )
        return f"""<section class="panel" id="designed"><h2>Designed vs found</h2>
<p class="lead">The prompts carry the memorization they were designed (or are known) to show; each row
counts the labels their generations got. "Nearest M_full" is each generation's highest whole-image
MS-SSIM over its scored training images: how close it comes to copying one.</p>
<div class="scroll">{table}</div></section>"""

    def clusters_section(self) -> str:
        clusters = self.aggregates.clusters
        if clusters is None:
            return ""
        prompts = (
            ShardedTables(self.aggregates.scan_dir, ["prompts"])
            .read("prompts", ["cluster_id", "prompt"])
            .to_pandas()
        )
        example = prompts.dropna(subset=["cluster_id"]).groupby("cluster_id")["prompt"].first()
        rows = [
            [
                r.method,
                r.cluster_id,
                _num(r.prompts),
                _num(r.VM),
                _num(r.FM),
                _num(r.BM),
                _num(r.NM),
                f"{r.memorized_share:.1%}",
                _clipped(example.get(r.cluster_id, "")),
            ]
            for r in clusters.itertuples()
        ]
        table = _table(
            ["method", "cluster", "prompts", "VM", "FM", "BM", "NM", "memorized", "example prompt"],
            rows,
            {1, 2, 3, 4, 5, 6, 7},
        )
        return f"""<section class="panel" id="clusters"><h2>Prompt clusters</h2>
<p class="lead">Prompts clustered by their text embeddings; the labels of each cluster's generations.
NeMo-C mitigates a whole cluster at once.</p>
<div class="stack"><img class="plot" src="{self.plots["clusters"].name}" alt="labels per cluster">
<div class="scroll clip-last">{table}</div></div></section>"""

    def mitigation_section(self) -> str:
        if "mitigation" not in self.plots:
            return ""
        mitigation = read_mitigation(self.plots["mitigation"].parent)
        base = float(mitigation["baseline_quality"])
        rows = [
            [
                r["method"],
                f"{r['mitigation_score']:.3f}",
                f"{r['quality']:.3f}",
                r["quality_metric"],
                f"{quality_drop(float(r['quality']), base, r['quality_metric']):+.3f}",
            ]
            for r in mitigation["methods"]
        ]
        table = _table(
            ["method", "mitigation score", "quality", "metric", "quality drop"], rows, {1, 2, 4}
        )
        return f"""<section class="panel" id="mitigation"><h2>Mitigation trade-off</h2>
<p class="lead">Mitigation score: mean over generations of the label transition scores of the paper's
Table 2 (higher = more copies removed). Quality drop against the unmitigated model ({base:.3f}); right
means worse images.</p>
<div class="split"><img class="plot" src="{self.plots["mitigation"].name}" alt="mitigation trade-off">
<div>{table}</div></div></section>"""

    def gallery_section(self) -> str:
        g = self.gallery
        counts = pd.Series([c["label"] for c in g.cards]).value_counts()
        boxes = "".join(
            f'<label><input type="checkbox" class="f-label" id="f-label-{lab}" value="{lab}" checked>'
            f'{_badge(lab)} <span class="sub">{_num(counts.get(lab, 0))}</span></label>'
            for lab in MEMORIZED
        )
        methods = sorted({c["method"] for c in g.cards}, key=lambda m: (m != "none", m))
        method_opts = "".join(f'<option value="{escape(m)}">{escape(m)}</option>' for m in methods)
        clusters = sorted({c["cluster"] for c in g.cards if c["cluster"] is not None})
        cluster_filter = (
            '<label>cluster <select id="f-cluster"><option value="">all</option>'
            + "".join(f'<option value="{c}">{c}</option>' for c in clusters)
            + "</select></label>"
            if clusters
            else ""
        )
        note = (
            f"Showing the {_num(len(g.cards))} most severe of {_num(g.memorized)} memorized generations "
            "(VM, then FM, then BM, each by its deciding score; methods share the budget). "
            "All of them are in the labels table."
        )
        if g.missing:
            note += f" {_num(g.missing)} chosen matches are left out: their image or training image was not found."
        return f"""<section class="panel" id="gallery-section"><h2>Most severe matches</h2>
<p class="lead">Each card: the generated image and the training image it matched, each with its
foreground outlined (<span class="swatch" style="background:{_rgb(MASK_TINT["gen"])}"></span>generated,
<span class="swatch" style="background:{_rgb(MASK_TINT["ref"])}"></span>training), the three region
scores (bold: the one that decided the label; tick: τ), Algorithm 1's branch and the foreground share.</p>
<div class="filters">
<span class="group">{boxes}</span>
<label>method <select id="f-method"><option value="">all</option>{method_opts}</select></label>
{cluster_filter}
<label><input type="search" id="f-query" placeholder="search prompt, caption or id"></label>
<span class="spacer"></span>
<label><input type="checkbox" id="f-masks" checked> outline masks</label>
</div>
<div id="gallery-grid-wrap"><div id="gallery" data-shown="0"></div></div>
<div class="pager"><button id="prev" type="button">‹ previous</button><span id="page-info"></span>
<button id="next" type="button">next ›</button></div>
<p class="note">{escape(note)}</p></section>"""

    def gallery_json(self) -> str:
        payload = {
            "cards": self.gallery.cards,
            "page_size": self.config.page_size,
            "tau": float(self.run_config.get("tau", DEFAULT_TAU)),
            "colors": LABEL_COLORS,
            "tints": {k: _rgb(v) for k, v in MASK_TINT.items()},
        }
        text = json.dumps(payload, separators=(",", ":"))
        # No "<", ">" or "&" inside the script element: data can never end or escape it.
        return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")

    def references_section(self) -> str:
        top = self.aggregates.top_references
        captions = {
            r["ref_id"]: r["caption"]
            for r in read_rows(
                self.reference, "references", "ref_id", set(top["ref_id"]), ["caption"]
            )
        }
        rows = [
            [
                r.ref_id,
                captions.get(r.ref_id, ""),
                _num(r.generations),
                _num(r.prompts),
                _num(r.VM),
                _num(r.FM),
                _num(r.BM),
            ]
            for r in top.itertuples()
        ]
        table = _table(
            ["training image", "caption", "memorized generations", "prompts", "VM", "FM", "BM"],
            rows,
            {2, 3, 4, 5, 6},
        )
        return f"""<section class="panel" id="references"><h2>Most matched training images</h2>
<p class="lead">Training images ranked by the memorized generations (all methods) that matched them.</p>
<div class="scroll">{table}</div></section>"""

    def run_section(self) -> str:
        agg = self.aggregates
        m = agg.manifest
        run = {
            "kind": m.get("kind"),
            "started": _when(m.get("started")),
            "finished": _when(m.get("finished")),
            **_flatten("", self.run_config, {}),
        }
        backends = _flatten("", m.get("backends") or {}, {})
        if m.get("noise"):
            backends["noise"] = m["noise"]
        errors = (
            _table(
                ["stage", "error type", "count"],
                [[r.stage, r.error_type, _num(r.count)] for r in agg.errors.itertuples()],
                {2},
            )
            if len(agg.errors)
            else "<p>No errors: every input was processed.</p>"
        )
        return f"""<section class="panel" id="run"><h2>Run configuration</h2>
<p class="lead">From <code>manifest.json</code>: how this scan was made.</p>
<div class="cols"><div><h3>Configuration</h3>{_kv(run)}</div>
<div><h3>Backends and versions</h3>{_kv({**backends, **(m.get("versions") or {})})}
<h3 style="margin-top:14px">Rows per table</h3>{_kv({k: _num(v) for k, v in agg.rows.items()})}
<h3 style="margin-top:14px">Errors by stage</h3>{errors}</div></div></section>"""


def _rgb(color: tuple[int, int, int]) -> str:
    return "rgb({}, {}, {})".format(*color)
