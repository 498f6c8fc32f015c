"""FB-Mem, the paper's Algorithm 1: where does a generation copy a training image?

Each (generation, training image) pair gets three scores: M_full on the whole images, M_fg
on the foreground and M_bg on the background, with the region variants chosen by the
generation's foreground fraction p (tiny foreground, foreground filling the image, or
balanced). The label is the first region whose score reaches tau, in the order whole ->
foreground -> background: VM (verbatim), FM (foreground), BM (background), else NM.

tau = 0.8 is the paper's MS-SSIM verbatim threshold; the paper does not state Algorithm
1's own tau, so it is a configurable assumption. beta = 0.03 is the paper's.

`region_mode="masked"` (default) is the paper: a region's score is the MS-SSIM of the images
with the other region zeroed, so the zeroed area of both images counts as a perfect match.
`region_mode="pooled"` (beyond the paper) averages the SSIM maps of the unmasked images over
the pixels both images hold in the region, so it never does (docs/region-modes.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from scanner.defaults import (
    DEFAULT_BETA,
    DEFAULT_MATCH_BY,
    DEFAULT_REGION_MODE,
    DEFAULT_TAU,
    MATCH_BY,
    REGION_MODES,
    MatchBy,
    RegionMode,
)
from scanner.scoring import (
    BALANCED,
    BRANCH_NAMES,
    LARGE_FG,
    SMALL_FG,
    EngineConfig,
    region_scores,
)
from scanner.similarity import METRICS, Metric, SSIMSpec, check_images, spec_for
from scanner.sscd import SSCDModel

LABELS = ("VM", "FM", "BM", "NM")  # most severe first
SEVERITY = {label: rank for rank, label in enumerate(LABELS)}


@dataclass(frozen=True)
class PairScores:
    """Per-pair results of Algorithm 1, aligned with the `pairs` that were scored."""

    pairs: np.ndarray  # (P, 2) int64: generation index, reference index
    m_full: np.ndarray  # (P,) float
    m_fg: np.ndarray
    m_bg: np.ndarray
    fg_fraction: np.ndarray  # (P,) foreground fraction p of the generation
    branch: np.ndarray  # (P,) str: small_fg / large_fg / balanced
    label: np.ndarray  # (P,) str: VM / FM / BM / NM

    def __len__(self) -> int:
        return len(self.label)

    def records(self) -> list[dict]:
        return [
            {
                "gen_index": int(g),
                "ref_index": int(r),
                "m_full": float(self.m_full[i]),
                "m_fg": float(self.m_fg[i]),
                "m_bg": float(self.m_bg[i]),
                "fg_fraction": float(self.fg_fraction[i]),
                "branch": str(self.branch[i]),
                "label": str(self.label[i]),
            }
            for i, (g, r) in enumerate(self.pairs)
        ]


def branches(fg_fraction: torch.Tensor, beta: float) -> torch.Tensor:
    """Algorithm 1's case of each generation from its foreground fraction."""
    code = torch.full_like(fg_fraction, BALANCED, dtype=torch.long)
    code[fg_fraction >= 1 - beta] = LARGE_FG
    code[fg_fraction <= beta] = SMALL_FG
    return code


def classify(m_full: np.ndarray, m_fg: np.ndarray, m_bg: np.ndarray, tau: float) -> np.ndarray:
    """VM if M_full >= tau, else FM if M_fg >= tau, else BM if M_bg >= tau, else NM."""
    return np.select([m_full >= tau, m_fg >= tau, m_bg >= tau], ["VM", "FM", "BM"], default="NM")


def check_region_mode(region_mode: str, metric: str) -> None:
    """A region mode and a metric name ("ms_ssim", "ssim", "sscd") that work together."""
    if region_mode not in REGION_MODES:
        raise ValueError(f"unknown region_mode {region_mode!r}; expected one of {REGION_MODES}")
    if region_mode == "pooled" and metric == "sscd":
        raise ValueError(
            "region_mode 'pooled' averages SSIM maps over a region; SSCD has none: "
            "use metric ms_ssim or ssim, or region_mode 'masked'"
        )


def _check_inputs(gen, ref, gen_fg, ref_fg, pairs, tau, beta, metric, region_mode) -> torch.Tensor:
    check_region_mode(region_mode, "sscd" if isinstance(metric, SSCDModel) else metric)
    if isinstance(metric, SSCDModel):
        spec = SSIMSpec(weights=(1.0,), win_size=1)  # any size: SSCD resizes to 320 px itself
    elif metric in METRICS:
        spec = spec_for(metric)
    else:
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS} or an SSCDModel")
    check_images(gen, spec, "gen")
    check_images(ref, spec, "ref")
    if gen.shape[1:] != ref.shape[1:]:
        raise ValueError(
            f"gen and ref must share (C, H, W), got {tuple(gen.shape[1:])} and {tuple(ref.shape[1:])}"
        )
    if float(gen.min()) < 0 or float(gen.max()) > 1 or float(ref.min()) < 0 or float(ref.max()) > 1:
        raise ValueError("images must be in [0, 1] (data range 1); rescale 8-bit data by 1/255")
    for name, mask, images in (("gen_fg", gen_fg, gen), ("ref_fg", ref_fg, ref)):
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{name} must be a boolean torch.Tensor (True = foreground)")
        if mask.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(
                f"{name} must have shape {(images.shape[0], *images.shape[2:])}, got {tuple(mask.shape)}"
            )
    if not 0 < tau <= 1:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    if not 0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 0.5), got {beta}")
    if pairs is None:
        g, r = torch.meshgrid(torch.arange(gen.shape[0]), torch.arange(ref.shape[0]), indexing="ij")
        return torch.stack([g.flatten(), r.flatten()], dim=1)
    pairs = torch.as_tensor(pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.is_floating_point():
        raise ValueError(
            f"pairs must be an integer tensor of shape (P, 2), got {tuple(pairs.shape)} {pairs.dtype}"
        )
    pairs = pairs.long()
    if pairs.numel() and (
        pairs.min() < 0 or pairs[:, 0].max() >= gen.shape[0] or pairs[:, 1].max() >= ref.shape[0]
    ):
        raise ValueError(
            f"pairs index out of range: {gen.shape[0]} generations, {ref.shape[0]} references"
        )
    return pairs


def load_metric(name: str, sscd_path: str | None = None, device: str = "cpu") -> Metric | SSCDModel:
    """A metric as named on a command line ("ms_ssim", "ssim", "sscd") -> what score_pairs takes."""
    if name == "sscd":
        if not sscd_path:
            raise ValueError("metric 'sscd' needs the SSCD TorchScript file: give --sscd PATH")
        return SSCDModel(sscd_path, device=device)
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; expected one of {(*METRICS, 'sscd')}")
    return name


def score_pairs(
    gen: torch.Tensor,
    ref: torch.Tensor,
    gen_fg: torch.Tensor,
    ref_fg: torch.Tensor,
    pairs: torch.Tensor | None = None,
    *,
    tau: float = DEFAULT_TAU,
    beta: float = DEFAULT_BETA,
    metric: Metric | SSCDModel = "ms_ssim",
    engine: EngineConfig = EngineConfig(),
    region_mode: RegionMode = DEFAULT_REGION_MODE,
) -> PairScores:
    """Algorithm 1 for every pair; `pairs` (P, 2) or None for all G x R pairs.

    gen (G, 3, H, W) and ref (R, 3, H, W) are floats in [0, 1] on the device that should do
    the work; gen_fg (G, H, W) and ref_fg (R, H, W) are boolean foreground masks. `metric` is
    "ms_ssim" (the paper's), "ssim", or a loaded `SSCDModel` (cosine of copy-detection
    embeddings of the same region variants). `region_mode` is "masked" (the paper's) or
    "pooled" (SSIM metrics only; see the module docstring).
    """
    pairs = _check_inputs(gen, ref, gen_fg, ref_fg, pairs, tau, beta, metric, region_mode)
    fg_fraction = gen_fg.flatten(1).float().mean(1)
    branch = branches(fg_fraction, beta).to(gen.device)
    if isinstance(metric, SSCDModel):
        scores = metric.region_scores(gen, ref, gen_fg, ref_fg, pairs.to(gen.device), branch)
    else:
        scores = region_scores(
            gen, ref, gen_fg, ref_fg, pairs, branch, spec_for(metric), engine, region_mode
        )
    scores = scores.float().cpu().numpy()
    pairs_np = pairs.cpu().numpy()
    gen_idx = pairs_np[:, 0]
    m_full, m_fg, m_bg = scores[:, 0], scores[:, 1], scores[:, 2]
    return PairScores(
        pairs=pairs_np,
        m_full=m_full,
        m_fg=m_fg,
        m_bg=m_bg,
        fg_fraction=fg_fraction.cpu().numpy()[gen_idx],
        branch=np.array(BRANCH_NAMES)[branch.cpu().numpy()[gen_idx]],
        label=classify(m_full, m_fg, m_bg, tau),
    )


def select_matches(scores: PairScores, match_by: MatchBy = DEFAULT_MATCH_BY) -> dict[int, int]:
    """Per generation, the row of its one match among its scored candidates.

    As in the paper, a generation has exactly one match, the training image with the highest
    similarity, and its label is Algorithm 1's label of that pair. "Similarity" is
    `mean` ((M_fg + M_bg) / 2, the authors' ranking) or `full` (M_full, the paper's Table 1).
    `most-severe` is a worst-case audit view, not the paper's: the most severe label over the
    candidates (VM > FM > BM > NM), then the highest score deciding that label. Ties go to the
    lower reference index, so the choice never depends on candidate order.
    """
    if match_by not in MATCH_BY:
        raise ValueError(f"unknown match_by {match_by!r}; expected one of {MATCH_BY}")
    if match_by == "mean":
        keys = [-(scores.m_fg.astype(np.float64) + scores.m_bg) / 2]
    elif match_by == "full":
        keys = [-scores.m_full.astype(np.float64)]
    else:
        decide = np.select(
            [scores.label == "FM", scores.label == "BM"],
            [scores.m_fg, scores.m_bg],
            default=scores.m_full,
        )
        severity = np.array([SEVERITY[label] for label in scores.label], dtype=np.int64)
        keys = [-decide, severity]
    # np.lexsort's last key is its primary one: generation, then `keys` from last to first,
    # then the reference index.
    order = np.lexsort((scores.pairs[:, 1], *keys, scores.pairs[:, 0]))
    first = np.ones(len(order), dtype=bool)
    first[1:] = scores.pairs[order[1:], 0] != scores.pairs[order[:-1], 0]
    return {int(scores.pairs[i, 0]): int(i) for i in order[first]}
