"""Evidence picture for one (generation, training image) pair: where is the copy?

Algorithm 1 reduces each region comparison to one number. This draws the two images with
their foreground masks and, for each region (full, foreground, background), the local SSIM
map at the finest scale of exactly the two image variants that region's score compared,
so a reader sees which pixels agree. Pixels blacked out in both variants agree trivially
(0 against 0) and are hatched: they inflate masked scores but carry no evidence.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from scanner.analysis import read_manifest
from scanner.fbmem import DEFAULT_BETA, DEFAULT_TAU, score_pairs
from scanner.images import decode_mask_png, load_image
from scanner.report.rows import read_rows, reference_dir
from scanner.scoring import BRANCH_NAMES, REGION_VARIANTS
from scanner.similarity import Metric, SSIMSpec, blur, gaussian_window, spec_for

REGIONS = ("full", "fg", "bg")
VARIANT_NAMES = ("whole", "foreground only", "background only")
GEN_OUTLINE = "#00d5ff"  # cyan: the generation's foreground
REF_OUTLINE = "#ff3df2"  # magenta: the training image's foreground
LABEL_TEXT = {
    "VM": "VM: verbatim copy",
    "FM": "FM: foreground copy",
    "BM": "BM: background copy",
    "NM": "NM: not memorized",
}


def local_ssim_map(x: torch.Tensor, y: torch.Tensor, spec: SSIMSpec) -> torch.Tensor:
    """SSIM map (luminance x contrast-structure) of two (C, H, W) images at full resolution,
    valid filtering, averaged over channels: (H - win + 1, W - win + 1)."""
    x, y = x[None].double(), y[None].double()
    win = gaussian_window(spec, x.dtype, x.device)
    c1 = (spec.k1 * spec.data_range) ** 2
    c2 = (spec.k2 * spec.data_range) ** 2
    mu_x, mu_y = blur(x, win), blur(y, win)
    var_x = blur(x * x, win) - mu_x**2
    var_y = blur(y * y, win) - mu_y**2
    cov = blur(x * y, win) - mu_x * mu_y
    luminance = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
    contrast_structure = (2 * cov + c2) / (var_x + var_y + c2)
    return (luminance * contrast_structure)[0].mean(0)


def _variants(image: torch.Tensor, fg: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(image variant, its kept-pixel mask) in the order of `scanner.scoring`'s variant codes."""
    m = fg.to(image.dtype)
    ones = torch.ones_like(fg)
    return [(image, ones), (image * m, fg), (image * (1 - m), ~fg)]


def _check(name: str, value, ndim: int, dtype_ok, expected: str) -> None:
    if not isinstance(value, torch.Tensor) or value.ndim != ndim or not dtype_ok(value):
        got = (
            f"{type(value).__name__} {tuple(value.shape)} {value.dtype}"
            if isinstance(value, torch.Tensor)
            else type(value).__name__
        )
        raise TypeError(f"{name} must be {expected}, got {got}")


def _show_image(ax, image: torch.Tensor, mask: torch.Tensor, color: str, title: str) -> None:
    ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    ax.contour(mask.numpy().astype(float), levels=[0.5], colors=[color], linewidths=1.4)
    ax.set_title(title, fontsize=9)


def _mask_composite(gen_fg: torch.Tensor, ref_fg: torch.Tensor) -> np.ndarray:
    g, r = gen_fg.numpy(), ref_fg.numpy()
    out = np.full((*g.shape, 3), 0.12)
    out[g & ~r] = (0.0, 0.84, 1.0)
    out[r & ~g] = (1.0, 0.24, 0.95)
    out[g & r] = (1.0, 1.0, 1.0)
    return out


def explain_pair(
    gen_image: torch.Tensor,
    ref_image: torch.Tensor,
    gen_fg: torch.Tensor,
    ref_fg: torch.Tensor,
    *,
    beta: float = DEFAULT_BETA,
    tau: float = DEFAULT_TAU,
    metric: Metric = "ms_ssim",
    out_png: str | Path,
) -> dict:
    """Draw the evidence of one pair to `out_png`; returns the pair's Algorithm 1 record
    (m_full, m_fg, m_bg, fg_fraction, branch, label), from `scanner.fbmem.score_pairs`.

    Images are (3, S, S) floats in [0, 1], masks (S, S) booleans (True = foreground).
    """
    for name, image in (("gen_image", gen_image), ("ref_image", ref_image)):
        _check(name, image, 3, torch.Tensor.is_floating_point, "a (3, S, S) float tensor")
    for name, mask in (("gen_fg", gen_fg), ("ref_fg", ref_fg)):
        _check(name, mask, 2, lambda t: t.dtype == torch.bool, "an (S, S) boolean tensor")
    record = score_pairs(
        gen_image[None],
        ref_image[None],
        gen_fg[None],
        ref_fg[None],
        tau=tau,
        beta=beta,
        metric=metric,
    ).records()[0]
    spec = spec_for(metric)
    gen_image, ref_image = gen_image.detach().cpu(), ref_image.detach().cpu()
    gen_fg, ref_fg = gen_fg.detach().cpu(), ref_fg.detach().cpu()
    gen_v, ref_v = _variants(gen_image, gen_fg), _variants(ref_image, ref_fg)
    region_variants = REGION_VARIANTS[BRANCH_NAMES.index(record["branch"])].tolist()

    fig = Figure(figsize=(11, 7.6), layout="constrained")
    axes = fig.subplots(2, 3)
    _show_image(
        axes[0, 0],
        gen_image,
        gen_fg,
        GEN_OUTLINE,
        f"generated image, foreground {record['fg_fraction']:.0%} (cyan)",
    )
    _show_image(axes[0, 1], ref_image, ref_fg, REF_OUTLINE, "training image, foreground (magenta)")
    axes[0, 2].imshow(_mask_composite(gen_fg, ref_fg))
    axes[0, 2].set_title("masks: generated (cyan), training (magenta), both (white)", fontsize=9)

    size = gen_image.shape[-1]
    half = spec.win_size // 2
    extent = (half - 0.5, size - half - 0.5, size - half - 0.5, half - 0.5)
    hatch = ListedColormap([(0, 0, 0, 0), (0.55, 0.55, 0.58, 0.85)])
    for ax, region, (gv, rv) in zip(axes[1], REGIONS, region_variants):
        (x, x_kept), (y, y_kept) = gen_v[gv], ref_v[rv]
        smap = local_ssim_map(x, y, spec).numpy()
        shown = ax.imshow(smap, cmap="inferno", vmin=0, vmax=1, extent=extent)
        blank = (~x_kept & ~y_kept).numpy()
        if blank.any():
            ax.imshow(blank.astype(float), cmap=hatch, vmin=0, vmax=1, interpolation="nearest")
        score = record[f"m_{region}"]
        verdict = "≥" if score >= tau else "<"
        ax.set_title(
            f"M_{region} = {score:.3f} {verdict} τ\n"
            f"gen {VARIANT_NAMES[gv]} vs training {VARIANT_NAMES[rv]}",
            fontsize=9,
        )
        ax.set_xlim(-0.5, size - 0.5)
        ax.set_ylim(size - 0.5, -0.5)
    cbar = fig.colorbar(shown, ax=axes[1].tolist(), shrink=0.85)
    cbar.set_label("local SSIM, finest scale (grey: blank in both)", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(
        f"{LABEL_TEXT[record['label']]}   |   branch {record['branch']}   |   "
        f"{metric}, τ = {tau}, β = {beta}",
        fontsize=11,
        fontweight="bold",
    )
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110, facecolor="white")
    return {k: v for k, v in record.items() if k not in ("gen_index", "ref_index")}


def _stored_pair(root: Path, table: str, key: str, value: str, size: int):
    row = next(read_rows(root, table, key, {value}, ["image", "fg_mask"]), None)
    if row is None:
        raise ValueError(f"{key} {value!r} is not in {root / table}")
    image = torch.from_numpy(load_image(row["image"], size))
    return image, torch.from_numpy(decode_mask_png(row["fg_mask"]))


def explain_scan_pair(
    scan_dir: str | Path,
    gen_id: str,
    ref_id: str,
    out_png: str | Path,
    *,
    reference: str | Path | None = None,
) -> dict:
    """`explain_pair` for a generation and a training image of a scan, by their ids, with the
    scan's own tau, beta and metric; `reference` overrides the store named in the manifest."""
    scan_dir = Path(scan_dir)
    manifest = read_manifest(scan_dir)
    config = manifest.get("config", {})
    refs = reference_dir(manifest, reference, scan_dir)
    size = json.loads((refs / "manifest.json").read_text())["config"]["size"]
    gen, gen_fg = _stored_pair(scan_dir, "generations", "gen_id", gen_id, size)
    ref, ref_fg = _stored_pair(refs, "references", "ref_id", ref_id, size)
    return explain_pair(
        gen,
        ref,
        gen_fg,
        ref_fg,
        beta=config.get("beta", DEFAULT_BETA),
        tau=config.get("tau", DEFAULT_TAU),
        metric=config.get("metric", "ms_ssim"),
        out_png=out_png,
    )
