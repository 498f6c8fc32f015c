"""Tiled engine for Algorithm 1's three region scores over many (generation, reference) pairs.

Cost model. Algorithm 1 compares six image variants: each generation and each reference
whole, foreground-masked and background-masked. For a pair, each region score is one
(MS-)SSIM of a variant of the generation with a variant of the reference; which variants is
fixed by the generation's branch (`REGION_VARIANTS`). SSIM's filtered means and variances
depend on one image only, so the engine computes them once per image variant and tile
(`similarity.image_stats`: 2 filtered maps per scale) and, per pair and region, filters
only the cross product x*y (1 filtered map per scale) plus a handful of elementwise ops.
pytorch-msssim filters 5 maps per region and pair, so the filter work per pair drops from
15 to 3 maps; the remaining cost is the cross filter and the elementwise cs/ssim maps.

Region modes. `masked` (the paper's Algorithm 1) scores each region as the MS-SSIM of the
masked variants: 3 cross terms per pair. `pooled` (beyond the paper) filters one cross term
per pair, of the unmasked images, and averages its cs maps over each region where both
images hold it (`similarity.pooled_scores`): the per-image statistics are those of the whole
images plus each image's window shares of its foreground.

Tiles: generations are taken `gen_tile` at a time; for each such tile, the references its
pairs touch are taken `ref_tile` at a time, and the pairs inside the (gen tile, ref tile)
block are scored `pair_batch` region-jobs at a time. Tile sizes come from the memory the
device has free unless given, so memory stays bounded whatever G, R and the pair count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from scanner.defaults import DEFAULT_REGION_MODE, REGION_MODES, RegionMode
from scanner.similarity import (
    LevelStats,
    SSIMSpec,
    image_stats,
    pair_scores,
    pooled_scores,
    window_shares,
)

Storage = Literal["float32", "float16", "bfloat16"]

# Variant codes of an image inside a tile's statistics.
WHOLE, FG, BG = 0, 1, 2
N_VARIANTS = 3

# Branch codes, in the order of Algorithm 1's cases.
SMALL_FG, LARGE_FG, BALANCED = 0, 1, 2
BRANCH_NAMES = ("small_fg", "large_fg", "balanced")

# (generation variant, reference variant) for the full, foreground and background scores.
REGION_VARIANTS = torch.tensor(
    [
        [
            [WHOLE, WHOLE],
            [WHOLE, FG],
            [BG, BG],
        ],  # p <= beta: tiny foreground, compare fg against the whole gen
        [
            [WHOLE, WHOLE],
            [FG, FG],
            [WHOLE, BG],
        ],  # p >= 1 - beta: fg fills the gen, bg against the whole gen
        [[WHOLE, WHOLE], [FG, FG], [BG, BG]],  # otherwise
    ]
)


@dataclass(frozen=True)
class EngineConfig:
    """Tiling and precision of the scoring engine; None sizes are derived from free memory."""

    gen_tile: int | None = None  # generations whose statistics are cached together
    ref_tile: int | None = None  # references whose statistics are cached together
    pair_batch: int | None = None  # region comparisons (3 per pair) filtered in one call
    memory_fraction: float = 0.5  # share of the device's free memory the engine may plan for
    storage: Storage = (
        "float32"  # dtype of cached image pyramids; means, variances and arithmetic stay fp32
    )

    def __post_init__(self) -> None:
        for name in ("gen_tile", "ref_tile", "pair_batch"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not 0 < self.memory_fraction <= 1:
            raise ValueError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")
        if self.storage not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"storage must be float32, float16 or bfloat16, got {self.storage!r}")


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


@dataclass(frozen=True)
class TilePlan:
    gen_tile: int
    ref_tile: int
    pair_batch: int


def plan_tiles(
    config: EngineConfig, shape: tuple[int, int, int], device: torch.device, itemsize: int
) -> TilePlan:
    """Choose tile sizes so cached statistics and one job batch fit the memory budget.

    An image variant caches, at every scale, the image, its mean and its variance: with the
    pyramid adding a third, 4/3 * C*H*W values each. A region job's temporaries hold about
    8 * C*H*W values at the finest scale. A third of the budget goes to each of the
    generation tile, the reference tile and the job batch.
    """
    c, h, w = shape
    stat_bytes = max(itemsize, 4)
    image_bytes = stat_bytes if config.storage == "float32" else 2
    per_image = N_VARIANTS * 4 / 3 * c * h * w * (image_bytes + 2 * stat_bytes)
    per_job = 8 * c * h * w * stat_bytes
    budget = free_memory_bytes(device) * config.memory_fraction / 3
    auto_tile = max(1, min(256, int(budget // per_image)))
    auto_batch = max(1, min(1024, int(budget // per_job)))
    return TilePlan(
        gen_tile=config.gen_tile or auto_tile,
        ref_tile=config.ref_tile or auto_tile,
        pair_batch=config.pair_batch or auto_batch,
    )


def variants(images: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
    """(N, 3, C, H, W): each image whole, foreground-masked and background-masked (masked
    pixels 0, Algorithm 1's x ⊙ S), in the order of the variant codes WHOLE, FG, BG."""
    m = fg.unsqueeze(1).to(images.device, images.dtype)
    out = images.new_empty(images.shape[0], N_VARIANTS, *images.shape[1:])
    out[:, WHOLE] = images
    torch.mul(images, m, out=out[:, FG])
    torch.mul(images, 1 - m, out=out[:, BG])
    return out


def variant_stats(
    images: torch.Tensor, fg: torch.Tensor, spec: SSIMSpec, storage: torch.dtype
) -> list:
    """Statistics of whole, fg-masked and bg-masked variants; row i*3 + v is image i, variant v."""
    images = images.to(torch.promote_types(images.dtype, torch.float32))
    stats = image_stats(variants(images, fg).flatten(0, 1), spec)
    return (
        [level.with_image_dtype(storage) for level in stats] if storage != images.dtype else stats
    )


def pooled_stats(
    images: torch.Tensor, fg: torch.Tensor, spec: SSIMSpec, storage: torch.dtype
) -> list:
    """Statistics of the whole images, with each image's window shares of its foreground."""
    images = images.to(torch.promote_types(images.dtype, torch.float32))
    stats = image_stats(images, spec)
    shares = window_shares(fg.to(images.dtype), spec)
    return [
        LevelStats(level.image.to(storage), level.mu, level.var, share)
        for level, share in zip(stats, shares, strict=True)
    ]


def region_scores(
    gen: torch.Tensor,
    ref: torch.Tensor,
    gen_fg: torch.Tensor,
    ref_fg: torch.Tensor,
    pairs: torch.Tensor,
    branch: torch.Tensor,
    spec: SSIMSpec,
    config: EngineConfig = EngineConfig(),
    region_mode: RegionMode = DEFAULT_REGION_MODE,
) -> torch.Tensor:
    """(P, 3) scores (full, fg, bg) of the pairs, each region with its branch's variants.

    `pairs` (P, 2) holds (generation index, reference index); `branch` (G,) the branch code
    of every generation. In `masked` mode a region's variants are the masked images; in
    `pooled` mode they name the region whose pixels are pooled (`similarity.pooled_scores`).
    Inputs are validated by the caller (`scanner.fbmem.score_pairs`).
    """
    if region_mode not in REGION_MODES:
        raise ValueError(f"unknown region_mode {region_mode!r}; expected one of {REGION_MODES}")
    pooled = region_mode == "pooled"
    stats_of = pooled_stats if pooled else variant_stats
    scores_per_job = 3 if pooled else 1
    device = gen.device
    out = torch.empty(
        pairs.shape[0], 3, dtype=torch.promote_types(gen.dtype, torch.float32), device=device
    )
    if pairs.shape[0] == 0:
        return out
    plan = plan_tiles(config, tuple(gen.shape[1:]), device, gen.element_size())
    storage = getattr(torch, config.storage) if config.storage != "float32" else gen.dtype
    region_variants = REGION_VARIANTS.to(device)
    pairs = pairs.to(device)
    order = torch.argsort(pairs[:, 0] * ref.shape[0] + pairs[:, 1])
    sorted_pairs = pairs[order]
    gen_ids = sorted_pairs[:, 0].contiguous()

    for g0 in range(0, gen.shape[0], plan.gen_tile):
        g1 = min(g0 + plan.gen_tile, gen.shape[0])
        lo, hi = torch.searchsorted(gen_ids, torch.tensor([g0, g1], device=device)).tolist()
        if lo == hi:
            continue
        tile_pairs, tile_order = sorted_pairs[lo:hi], order[lo:hi]
        g_stats = stats_of(gen[g0:g1], gen_fg[g0:g1], spec, storage)
        refs_used = torch.unique(tile_pairs[:, 1])
        for r0 in range(0, refs_used.numel(), plan.ref_tile):
            ref_ids = refs_used[r0 : r0 + plan.ref_tile]
            r_stats = stats_of(ref[ref_ids], ref_fg[ref_ids], spec, storage)
            in_block = torch.isin(tile_pairs[:, 1], ref_ids)
            block, block_order = tile_pairs[in_block], tile_order[in_block]
            local_ref = torch.searchsorted(ref_ids, block[:, 1].contiguous())
            variants = region_variants[branch[block[:, 0]]]  # (B, 3 regions, 2)
            if pooled:  # one job per pair: whole images, fg and bg pooled from its maps
                ia, ib, regions = block[:, 0] - g0, local_ref, variants[:, 1:]
            else:  # one job per pair and region: the region's masked variants
                ia = ((block[:, 0] - g0).unsqueeze(1) * N_VARIANTS + variants[..., 0]).flatten()
                ib = (local_ref.unsqueeze(1) * N_VARIANTS + variants[..., 1]).flatten()
            scores = torch.empty(ia.numel(), scores_per_job, dtype=out.dtype, device=device)
            for j0 in range(0, ia.numel(), plan.pair_batch):
                j1 = j0 + plan.pair_batch
                if pooled:
                    scores[j0:j1] = pooled_scores(
                        g_stats, ia[j0:j1], r_stats, ib[j0:j1], regions[j0:j1], spec
                    )
                else:
                    scores[j0:j1, 0] = pair_scores(g_stats, ia[j0:j1], r_stats, ib[j0:j1], spec)
            out[block_order] = scores.view(-1, 3)
    return out
