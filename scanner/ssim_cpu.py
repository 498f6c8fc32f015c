"""Fused CPU kernels of the SSIM engine, compiled with numba.

Why: a valid separable Gaussian filter costs 2 * taps multiply-adds per output pixel, but
as blocked banded matrix products it costs (block + taps - 1) / taps times that, and every
intermediate map (products, gathered statistics, cs maps) makes a round trip through memory.
Here each (image, channel) is filtered row by row into a ring buffer of `taps` rows that stays
in L1 cache, and the per-pixel SSIM arithmetic runs on each output row as it is made, so every
input map is read once and nothing of image size is written but the statistics themselves.

The window is passed as a tuple, so its length is part of the compiled signature: the tap
loops unroll and each output pixel accumulates in a register, which is what lets the
compiler vectorize across pixels. The arithmetic is pytorch-msssim's, in the input's
precision (float32 or float64); only the means of the cs/SSIM maps accumulate in float64.
Kernels are serial and release the GIL; `_in_parallel` spreads them over Python threads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch

# Compiler flags of every kernel. FMA contraction only: results stay within rounding of the
# unfused arithmetic, and no reassociation can change a sum's order between runs.
# error_model="numpy" (no Python ZeroDivisionError check) is what lets divisions vectorize;
# every denominator holds c1 or c2 > 0. No Python float (a float64) ever meets float32 data,
# or the arithmetic would silently widen: 2x is written x + x, c1 and c2 come in the data's
# dtype.
_JIT = {"cache": True, "fastmath": {"contract"}, "error_model": "numpy"}


@numba.njit(**_JIT)
def _filter_row(src, dst, win):  # pragma: no cover - compiled
    """dst[j] = sum_k win[k] * src[j + k]: the valid 1-D filter of one row."""
    for j in range(dst.shape[0]):
        acc = win[0] * src[j]
        for k in range(1, len(win)):
            acc += win[k] * src[j + k]
        dst[j] = acc


@numba.njit(**_JIT)
def _filter_column(ring, top, dst, win):  # pragma: no cover - compiled
    """dst[j] = sum_k win[k] * ring[(top + k) % taps, j]: the vertical filter of one row."""
    taps = len(win)
    for j in range(dst.shape[0]):
        acc = win[0] * ring[top % taps, j]
        for k in range(1, taps):
            acc += win[k] * ring[(top + k) % taps, j]
        dst[j] = acc


@numba.njit(nogil=True, **_JIT)
def _moments(x, win, mu, var):  # pragma: no cover - compiled
    """mu = G * x and var = G * x^2 - mu^2 (valid filter G) of every (image, channel) of x."""
    n, c, h, w = x.shape
    taps = len(win)
    wo = w - taps + 1
    ring_x = np.empty((taps, wo), x.dtype)
    ring_xx = np.empty((taps, wo), x.dtype)
    sq = np.empty(w, x.dtype)
    for job in range(n * c):
        i, ch = job // c, job % c
        for r in range(h):
            row = x[i, ch, r]
            for j in range(w):
                sq[j] = row[j] * row[j]
            _filter_row(row, ring_x[r % taps], win)
            _filter_row(sq, ring_xx[r % taps], win)
            if r >= taps - 1:
                top = r - taps + 1
                m, v = mu[i, ch, top], var[i, ch, top]
                _filter_column(ring_x, top, m, win)
                _filter_column(ring_xx, top, v, win)
                for j in range(wo):
                    v[j] -= m[j] * m[j]


@numba.njit(**_JIT)
def _region_rows(share, i, top, code, inside, dst):  # pragma: no cover - compiled
    """One row of an image's region indicator: 1 where the window lies in the region (code 0,
    the whole image: everywhere; 1, foreground: share >= inside; 2, background: 1 - share >=
    inside), else 0."""
    for j in range(dst.shape[0]):
        if code == 0:
            dst[j] = 1
        elif code == 1:
            dst[j] = 1 if share[i, top, j] >= inside else 0
        else:
            dst[j] = 1 if 1 - share[i, top, j] >= inside else 0


@numba.njit(nogil=True, **_JIT)
def _cross_means(
    xa, mua, vara, sa, ia, xb, mub, varb, sb, ib, regions, inside, win, c1, c2, luminance, out, mass
):  # pragma: no cover - compiled
    """Means of the cs map (the SSIM map when `luminance`) of the pairs (a[ia[p]], b[ib[p]]).

    out[p, ch, 0] is the plain mean over the valid map. For each region k of regions (P, K, 2)
    (variant codes of the a and b sides: 0 whole, 1 foreground, 2 background), out[p, ch,
    1 + k] is the mean of the cs map and out[p, ch, 1 + K + k] the mean of the SSIM map over
    the windows that lie in the region in both images (window shares sa, sb at least
    `inside`); mass[p, k] counts those windows. Only the cross term E[ab] is filtered here;
    means and variances come from `_moments`."""
    n_pairs, c = ia.shape[0], xa.shape[1]
    h, w = xa.shape[2], xa.shape[3]
    taps = len(win)
    wo = w - taps + 1
    n_regions = regions.shape[1]
    ring = np.empty((taps, wo), xa.dtype)
    prod = np.empty(w, xa.dtype)
    cs = np.empty(wo, xa.dtype)
    lum = np.empty(wo, xa.dtype)
    in_a = np.empty(wo, xa.dtype)
    in_b = np.empty(wo, xa.dtype)
    total = np.empty(wo, np.float64)
    sum_cs = np.empty((n_regions, wo), np.float64)
    sum_ssim = np.empty((n_regions, wo), np.float64)
    counts = np.empty((n_regions, wo), np.float64)
    for job in range(n_pairs * c):
        p, ch = job // c, job % c
        a, b = ia[p], ib[p]
        total[:] = 0
        sum_cs[:] = 0
        sum_ssim[:] = 0
        counts[:] = 0
        for r in range(h):
            ra, rb = xa[a, ch, r], xb[b, ch, r]
            for j in range(w):
                prod[j] = ra[j] * rb[j]
            _filter_row(prod, ring[r % taps], win)
            if r < taps - 1:
                continue
            top = r - taps + 1
            _filter_column(ring, top, cs, win)
            ma, mb = mua[a, ch, top], mub[b, ch, top]
            va, vb = vara[a, ch, top], varb[b, ch, top]
            for j in range(wo):
                cov = cs[j] - ma[j] * mb[j]
                cs[j] = (cov + cov + c2) / (va[j] + vb[j] + c2)
            if luminance or n_regions > 0:
                for j in range(wo):
                    mab = ma[j] * mb[j]
                    lum[j] = (mab + mab + c1) / (ma[j] * ma[j] + mb[j] * mb[j] + c1)
            if luminance:
                for j in range(wo):
                    total[j] += cs[j] * lum[j]
            else:
                for j in range(wo):
                    total[j] += cs[j]
            for k in range(n_regions):
                _region_rows(sa, a, top, regions[p, k, 0], inside, in_a)
                _region_rows(sb, b, top, regions[p, k, 1], inside, in_b)
                for j in range(wo):
                    both = in_a[j] * in_b[j]
                    sum_cs[k, j] += cs[j] * both
                    sum_ssim[k, j] += cs[j] * lum[j] * both
                    counts[k, j] += both
        out[p, ch, 0] = total.sum() / ((h - taps + 1) * wo)
        for k in range(n_regions):
            mass[p, k] = counts[k].sum()
            n = max(mass[p, k], 1.0)
            out[p, ch, 1 + k] = sum_cs[k].sum() / n
            out[p, ch, 1 + n_regions + k] = sum_ssim[k].sum() / n


@numba.njit(nogil=True, **_JIT)
def _downsample(x, pad_h, pad_w, out):  # pragma: no cover - compiled
    """2x2 average pooling with zero padding (pad_h, pad_w) on both sides, divisor 4: torch's
    avg_pool2d(kernel 2, padding) with count_include_pad, summed in its order, bit for bit."""
    n, c, h, w = x.shape
    ho, wo = out.shape[2], out.shape[3]
    for job in range(n * c):
        i, ch = job // c, job % c
        for oi in range(ho):
            row = out[i, ch, oi]
            first = True
            for r in range(max(2 * oi - pad_h, 0), min(2 * oi - pad_h + 2, h)):
                src = x[i, ch, r]
                for oj in range(wo):
                    c0 = 2 * oj - pad_w
                    if c0 < 0:
                        s = src[0] if first else row[oj] + src[0]
                    else:
                        s = src[c0] if first else row[oj] + src[c0]
                        if c0 + 1 < w:
                            s += src[c0 + 1]
                    row[oj] = s
                first = False
            for oj in range(wo):
                row[oj] = row[oj] / 4


def _in_parallel(kernel, n: int, split) -> None:
    """Run `kernel(*split(lo, hi))` over [0, n) cut into one slice per torch thread.

    Python threads rather than numba's parallel loops: the kernels release the GIL, compile
    in a third of the time without parfors, and bring no second OpenMP runtime next to
    torch's; torch.set_num_threads is the one knob for both."""
    threads = max(1, min(torch.get_num_threads(), n))
    if threads == 1:
        kernel(*split(0, n))
        return
    bounds = np.linspace(0, n, threads + 1).astype(int)
    with ThreadPoolExecutor(threads) as pool:
        jobs = [pool.submit(kernel, *split(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]
        for job in jobs:
            job.result()


def moments(x: np.ndarray, win: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Filtered mean and variance (N, C, H - taps + 1, W - taps + 1) of x (N, C, H, W)."""
    shape = (*x.shape[:2], *(s - len(win) + 1 for s in x.shape[2:]))
    mu, var = np.empty(shape, x.dtype), np.empty(shape, x.dtype)
    _in_parallel(_moments, x.shape[0], lambda lo, hi: (x[lo:hi], win, mu[lo:hi], var[lo:hi]))
    return mu, var


def cross_means(
    xa, mua, vara, sa, ia, xb, mub, varb, sb, ib, regions, inside, win, c1, c2, luminance
) -> tuple[np.ndarray, np.ndarray]:
    """(P, C, 1 + 2K) plain, region cs and region SSIM means of the pairs' maps, and the (P, K)
    region window counts; see `_cross_means`."""
    out = np.empty((ia.shape[0], xa.shape[1], 1 + 2 * regions.shape[1]), np.float64)
    mass = np.empty((ia.shape[0], regions.shape[1]), np.float64)
    _in_parallel(
        _cross_means,
        ia.shape[0],
        lambda lo, hi: (
            xa,
            mua,
            vara,
            sa,
            ia[lo:hi],
            xb,
            mub,
            varb,
            sb,
            ib[lo:hi],
            regions[lo:hi],
            inside,
            win,
            c1,
            c2,
            luminance,
            out[lo:hi],
            mass[lo:hi],
        ),
    )
    return out, mass


def downsample(x: np.ndarray) -> np.ndarray:
    """pytorch-msssim's 2x2 average pooling, padding 1 on odd sides."""
    pad_h, pad_w = x.shape[2] % 2, x.shape[3] % 2
    out = np.empty((*x.shape[:2], x.shape[2] // 2 + pad_h, x.shape[3] // 2 + pad_w), x.dtype)
    _in_parallel(_downsample, x.shape[0], lambda lo, hi: (x[lo:hi], pad_h, pad_w, out[lo:hi]))
    return out
