"""(MS-)SSIM split into per-image statistics and a per-pair cross term.

SSIM needs, at every scale, five Gaussian-filtered maps of an image pair: mu_x, mu_y,
E[x^2], E[y^2] and E[xy]. Only E[xy] depends on both images. This module computes the
per-image part once (`image_stats`) and the pair part on demand (`pair_scores`), which is
what makes one-against-many comparison cheap (see `scanner.scoring`). Composed, the two
reproduce `pytorch_msssim.ms_ssim` / `ssim` operation for operation: 11-tap Gaussian
window with sigma 1.5 (built in float32 like pytorch-msssim), valid filtering, 2x2 average
pooling with padding on odd sides, negative contrast-structure clamped at 0 (MS-SSIM only),
per-channel products then the mean over channels.

Two implementations of the same arithmetic: on CPUs (float32/float64) the fused numba
kernels of `scanner.ssim_cpu`, which filter row by row in cache and never write a map they
do not keep; elsewhere (GPUs, half-precision storage) tensor ops, with depthwise convolutions
as the filter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from scanner import ssim_cpu
from scanner.defaults import METRICS

Metric = Literal["ms_ssim", "ssim"]

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, pytorch-msssim


@dataclass(frozen=True)
class SSIMSpec:
    """Constants of the structural similarity; defaults are pytorch-msssim's."""

    weights: tuple[float, ...] = MS_SSIM_WEIGHTS  # one per scale; (1.0,) is single-scale SSIM
    win_size: int = 11  # Gaussian window taps (Wang et al. 2004)
    win_sigma: float = 1.5
    k1: float = 0.01
    k2: float = 0.03
    data_range: float = 1.0  # images in [0, 1]; callers must say so, never a silent 255
    clamp_negative: bool = True  # MS-SSIM clamps cs/ssim at 0; pytorch-msssim's ssim() does not

    @property
    def levels(self) -> int:
        return len(self.weights)

    @property
    def min_side(self) -> int:
        """Smallest shorter side accepted (pytorch-msssim asserts side > (win-1) * 2**(levels-1))."""
        return (
            (self.win_size - 1) * 2 ** (self.levels - 1) + 1 if self.levels > 1 else self.win_size
        )


def spec_for(metric: Metric, data_range: float = 1.0) -> SSIMSpec:
    """The SSIMSpec of a metric name; the one place metric names are dispatched."""
    if metric == "ms_ssim":
        return SSIMSpec(data_range=data_range)
    if metric == "ssim":
        return SSIMSpec(weights=(1.0,), clamp_negative=False, data_range=data_range)
    raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")


def gaussian_window(spec: SSIMSpec, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """1-D window, computed in float32 first so float64 runs match pytorch-msssim bit for bit."""
    coords = torch.arange(spec.win_size, dtype=torch.float32) - spec.win_size // 2
    g = torch.exp(-(coords**2) / (2 * spec.win_sigma**2))
    return (g / g.sum()).to(device=device, dtype=dtype)


def band_matrix(n: int, win: torch.Tensor) -> torch.Tensor:
    """(n, n - taps + 1) matrix whose column j holds the window at rows j..j+taps-1, so
    `x @ band` is the valid 1-D filter of x's last dimension."""
    taps = win.numel()
    cols = torch.arange(n - taps + 1, device=win.device)
    band = torch.zeros(n, n - taps + 1, dtype=win.dtype, device=win.device)
    for k in range(taps):
        band[cols + k, cols] = win[k]
    return band


BAND_BLOCK = 128  # output columns per banded product on CPU (measured: 128 beats 32, 64 and 512)


def _band_filter_last(x: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    """Valid filter of the last dimension as products with slices of one band matrix.

    A full (W, W - taps + 1) band is mostly zeros (23x the filter's work at 256 px, 46x at
    512); blocks of BAND_BLOCK outputs cut the waste to (BAND_BLOCK + taps - 1) / taps while
    each product stays large enough for BLAS to run near peak."""
    taps, out = win.numel(), x.shape[-1] - win.numel() + 1
    band = band_matrix(min(BAND_BLOCK, out) + taps - 1, win)
    parts = []
    for j in range(0, out, BAND_BLOCK):
        b = min(BAND_BLOCK, out - j)
        parts.append(x[..., j : j + b + taps - 1] @ band[: b + taps - 1, :b])
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def blur(x: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    """Separable valid Gaussian filter of (N, C, H, W), each channel on its own.

    On CPUs blocked banded matrix products beat oneDNN's depthwise convolution (measured
    here on 2 cores: 2-3x at 256 and 512 px, 4x at 161 px): BLAS runs near peak, which
    outweighs the zeros in the band. GPUs keep the memory-bound convolution, which also stays clear of
    TF32 matmul settings a caller may have switched on.
    """
    if x.device.type == "cpu":
        return _band_filter_last(_band_filter_last(x, win).transpose(-1, -2), win).transpose(-1, -2)
    c = x.shape[1]
    k = win.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    out = F.conv2d(x, k, groups=c)
    return F.conv2d(out, k.transpose(2, 3), groups=c)


def downsample(x: torch.Tensor) -> torch.Tensor:
    padding = [s % 2 for s in x.shape[2:]]
    return F.avg_pool2d(x, kernel_size=2, padding=padding)


@dataclass
class LevelStats:
    """One scale of a batch of images: the image itself and its filtered mean and variance,
    and, for region-pooled scores, the share of each SSIM window inside the foreground."""

    image: torch.Tensor  # (N, C, h, w)
    mu: torch.Tensor  # (N, C, h - win + 1, w - win + 1)
    var: torch.Tensor  # E[x^2] - mu^2, same shape as mu
    share: torch.Tensor | None = None  # (N, h - win + 1, w - win + 1), see `window_shares`

    def with_image_dtype(self, dtype: torch.dtype) -> LevelStats:
        """Half-precision copies of the images are safe; mu and var stay exact, because the
        covariance E[xy] - mu_x mu_y cancels and fp16 rounding of mu (~2e-4) would dominate it."""
        return LevelStats(self.image.to(dtype), self.mu, self.var, self.share)


def check_images(x: torch.Tensor, spec: SSIMSpec, name: str = "images") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point in [0, {spec.data_range}], got {x.dtype}")
    if min(x.shape[-2:]) < spec.min_side:
        raise ValueError(
            f"{name} are {x.shape[-1]}x{x.shape[-2]} px; {spec.levels}-scale SSIM with a "
            f"{spec.win_size}-tap window needs a shorter side of at least {spec.min_side} px"
        )


def _fused(*tensors: torch.Tensor) -> bool:
    """Whether the numba kernels take these tensors: CPU, one dtype, float32 or float64."""
    dtype = tensors[0].dtype
    return dtype in (torch.float32, torch.float64) and all(
        t.device.type == "cpu" and t.dtype == dtype for t in tensors
    )


def _window_tuple(spec: SSIMSpec, dtype: torch.dtype) -> tuple:
    """The window as numpy scalars of the data's dtype: the kernels' compile-time taps."""
    return tuple(gaussian_window(spec, dtype, "cpu").numpy())


def image_stats(x: torch.Tensor, spec: SSIMSpec) -> list[LevelStats]:
    """Per-image statistics at every scale; computed once per image, reused for every pair."""
    if _fused(x):
        win = _window_tuple(spec, x.dtype)
        x = x.contiguous().numpy()
        levels = []
        for level in range(spec.levels):
            mu, var = ssim_cpu.moments(x, win)
            levels.append(LevelStats(*(torch.from_numpy(t) for t in (x, mu, var))))
            if level < spec.levels - 1:
                x = ssim_cpu.downsample(x)
        return levels
    win = gaussian_window(spec, x.dtype, x.device)
    levels = []
    for level in range(spec.levels):
        mu = blur(x, win)
        var = blur(x * x, win).sub_(mu * mu)
        levels.append(LevelStats(x, mu, var))
        if level < spec.levels - 1:
            x = downsample(x)
    return levels


# A window belongs to a region when at least this share of it (by Gaussian weight) lies in
# the region. Tuned on the replication set alone (docs/region-modes.md): every value from 0.9
# to 0.99 labels all its pairs as intended at 512 and 256 px, 0.935 with the widest smallest
# margin to tau. Lower lets windows straddling the boundary hide background copies; higher
# leaves few windows in small regions, so chance texture decides.
REGION_INSIDE = 0.935


def window_shares(fg: torch.Tensor, spec: SSIMSpec) -> list[torch.Tensor]:
    """Per scale, the share of every SSIM window that lies in the foreground: (N, h', w').

    The mask is downsampled with the image (the same 2x2 average pooling, so a coarse pixel
    holds the foreground fraction of the pixels it pools) and then seen through the SSIM
    window (the same valid Gaussian filter as the means). The share is therefore shaped and
    aligned like the cs map of its scale, border included; 1 - share is the background's."""
    x = fg.to(torch.promote_types(fg.dtype, torch.float32)).unsqueeze(1)
    return [level.mu[:, 0] for level in image_stats(x, spec)]


def pair_scores(
    a: list[LevelStats],
    ia: torch.Tensor,
    b: list[LevelStats],
    ib: torch.Tensor,
    spec: SSIMSpec,
) -> torch.Tensor:
    """(MS-)SSIM of the pairs (a[ia[j]], b[ib[j]]): one filtered cross term per scale and pair."""
    no_regions = torch.zeros(ia.numel(), 0, 2, dtype=torch.long, device=ia.device)
    return _scores(a, ia, b, ib, no_regions, spec)[:, 0]


def pooled_scores(
    a: list[LevelStats],
    ia: torch.Tensor,
    b: list[LevelStats],
    ib: torch.Tensor,
    regions: torch.Tensor,
    spec: SSIMSpec,
) -> torch.Tensor:
    """(J, 1 + K): the (MS-)SSIM of the pairs, then K region-pooled scores from the same maps.

    regions (J, K, 2) holds, per pair and region, the variant code (0 whole, 1 foreground,
    2 background) of the a and b side; `a` and `b` need window shares (`window_shares`).
    A region's score is MS-SSIM restricted to the windows that lie in the region in both
    images (share >= REGION_INSIDE; the whole image holds every window): at each scale the
    cs maps of the unmasked images are averaged over those windows, and the scales combine
    as in MS-SSIM. Scales where no window lies in the region cannot see it and are left out:
    the region's MS-SSIM runs over the scales that see it, the last of them with the full SSIM
    map (luminance too), the weights rescaled to their usual sum. A region no scale sees
    scores 0: there is nothing to compare. Masked-out pixels never meet each other here."""
    if a[0].share is None or b[0].share is None:
        raise ValueError("pooled scores need window shares: build the stats with window_shares")
    return _scores(a, ia, b, ib, regions, spec)


def _scores(a, ia, b, ib, regions, spec: SSIMSpec) -> torch.Tensor:
    # Images may be stored in half precision to save memory; arithmetic is never below fp32.
    dtype = torch.promote_types(a[0].mu.dtype, torch.float32)
    weights = torch.tensor(spec.weights, dtype=dtype, device=a[0].mu.device)
    n_regions = regions.shape[1]
    means, masses = [], []
    for level, (la, lb) in enumerate(zip(a, b, strict=True)):
        last = level == spec.levels - 1  # the full SSIM map at the coarsest scale, cs elsewhere
        if _fused(la.image, la.mu, la.var, lb.image, lb.mu, lb.var):
            level_means, mass = _level_means_fused(la, ia, lb, ib, regions, spec, last)
        else:
            level_means, mass = _level_means_torch(la, ia, lb, ib, regions, spec, last, dtype)
        means.append(level_means.relu() if spec.clamp_negative else level_means)
        masses.append(mass)
    stacked = torch.stack(means)  # (levels, J, C, 1 + 2K): plain, region cs, region SSIM
    plain = torch.prod(stacked[..., 0] ** weights.view(-1, 1, 1), dim=0).mean(-1)
    if n_regions == 0:
        return plain.unsqueeze(1)
    # Per pair and region, the scales that see it: the leading run of levels with windows.
    seen = torch.cumprod((torch.stack(masses) > 0).to(torch.int64), dim=0).bool()  # (L, J, K)
    n_seen = seen.sum(0)  # (J, K)
    level = torch.arange(spec.levels, device=seen.device).view(-1, 1, 1)
    cs, ssim_ = stacked[..., 1 : 1 + n_regions], stacked[..., 1 + n_regions :]
    factor = torch.where((level == n_seen - 1).unsqueeze(2), ssim_, cs)  # (L, J, C, K)
    used = torch.where(seen, weights.view(-1, 1, 1), torch.zeros((), dtype=dtype))
    exponent = used * weights.sum() / used.sum(0).clamp(min=1e-30)  # (L, J, K)
    pooled = torch.prod(factor ** exponent.unsqueeze(2), dim=0).mean(1)  # (J, K)
    return torch.cat([plain.unsqueeze(1), torch.where(n_seen > 0, pooled, 0)], dim=1)


def _constants(spec: SSIMSpec) -> tuple[float, float]:
    return (spec.k1 * spec.data_range) ** 2, (spec.k2 * spec.data_range) ** 2


def _inside(share: torch.Tensor | None, index, codes, dtype) -> torch.Tensor:
    """(J, K, h', w') 1 where each pair's window lies in its side's region, else 0."""
    if codes.shape[1] == 0:
        return torch.zeros(*codes.shape, 1, 1, dtype=dtype, device=codes.device)
    s = share[index].unsqueeze(1)
    codes = codes[..., None, None]
    return (
        (codes == 0)
        | ((codes == 1) & (s >= REGION_INSIDE))
        | ((codes == 2) & (1 - s >= REGION_INSIDE))
    ).to(dtype)


def _level_means_torch(
    la: LevelStats,
    ia: torch.Tensor,
    lb: LevelStats,
    ib: torch.Tensor,
    regions: torch.Tensor,
    spec: SSIMSpec,
    last: bool,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(J, C, 1 + 2K) plain, region cs and region SSIM channel means, and the (J, K) region
    window counts, with tensor ops: the GPU path."""
    c1, c2 = _constants(spec)
    win = gaussian_window(spec, dtype, la.mu.device)
    mu_a, mu_b = la.mu[ia], lb.mu[ib]
    mu_ab = mu_a * mu_b
    cov = blur(la.image[ia].to(dtype) * lb.image[ib].to(dtype), win).sub_(mu_ab)
    var_sum = la.var[ia].add_(lb.var[ib]).add_(c2)
    cs_map = cov.mul_(2).add_(c2).div_(var_sum)
    if regions.shape[1] == 0 and not last:
        return cs_map.flatten(2).mean(-1, keepdim=True), mu_ab.new_zeros(ia.numel(), 0)
    lum = mu_ab.mul_(2).add_(c1).div_(mu_a.pow_(2) + mu_b.pow_(2) + c1)
    plain = (cs_map * lum if last else cs_map).flatten(2).mean(-1, keepdim=True)
    if regions.shape[1] == 0:
        return plain, mu_ab.new_zeros(ia.numel(), 0)
    both = _inside(la.share, ia, regions[..., 0], dtype) * _inside(
        lb.share, ib, regions[..., 1], dtype
    )
    mass = both.flatten(2).sum(-1)  # (J, K)
    n = mass.clamp(min=1).unsqueeze(1)
    pooled_cs = torch.einsum("jchw,jkhw->jck", cs_map, both) / n
    pooled_ssim = torch.einsum("jchw,jkhw->jck", cs_map * lum, both) / n
    return torch.cat([plain, pooled_cs, pooled_ssim], dim=-1), mass


def _level_means_fused(
    la: LevelStats,
    ia: torch.Tensor,
    lb: LevelStats,
    ib: torch.Tensor,
    regions: torch.Tensor,
    spec: SSIMSpec,
    last: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What `_level_means_torch` returns, from the fused numba kernel: the CPU path."""
    dtype = la.mu.dtype
    scalar = la.mu.numpy().dtype.type
    c1, c2 = (scalar(c) for c in _constants(spec))
    no_share = np.empty((0, 0, 0), scalar)
    means, mass = ssim_cpu.cross_means(
        la.image.numpy(),
        la.mu.numpy(),
        la.var.numpy(),
        no_share if la.share is None else la.share.to(dtype).numpy(),
        ia.to(torch.int64).contiguous().numpy(),
        lb.image.numpy(),
        lb.mu.numpy(),
        lb.var.numpy(),
        no_share if lb.share is None else lb.share.to(dtype).numpy(),
        ib.to(torch.int64).contiguous().numpy(),
        regions.to(torch.int64).contiguous().numpy(),
        scalar(REGION_INSIDE),
        _window_tuple(spec, dtype),
        c1,
        c2,
        last,
    )
    return torch.from_numpy(means).to(dtype), torch.from_numpy(mass)


def similarity(
    x: torch.Tensor, y: torch.Tensor, metric: Metric = "ms_ssim", *, data_range: float
) -> torch.Tensor:
    """One score per pair (x[i], y[i]); equals pytorch_msssim with size_average=False."""
    spec = spec_for(metric, data_range)
    check_images(x, spec, "x")
    check_images(y, spec, "y")
    if x.shape != y.shape:
        raise ValueError(
            f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    idx = torch.arange(x.shape[0], device=x.device)
    return pair_scores(image_stats(x, spec), idx, image_stats(y, spec), idx, spec)


def ms_ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float) -> torch.Tensor:
    return similarity(x, y, "ms_ssim", data_range=data_range)


def ssim(x: torch.Tensor, y: torch.Tensor, *, data_range: float) -> torch.Tensor:
    return similarity(x, y, "ssim", data_range=data_range)
