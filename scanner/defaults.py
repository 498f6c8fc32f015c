"""Defaults and choices the command line shows, importable without torch, numpy or PIL.

`fbmem --help` builds every subcommand's options from these, so it must not pay for the
heavy imports of the modules that use them (torch alone takes 2.5-7 s to import here).
"""

from __future__ import annotations

from typing import Literal, get_args

DEFAULT_TAU = 0.8  # paper's MS-SSIM threshold for verbatim copies (assumed for Algorithm 1)
DEFAULT_BETA = 0.03  # paper's segmentation threshold

MatchBy = Literal["mean", "full", "most-severe"]
MATCH_BY: tuple[str, ...] = get_args(MatchBy)
DEFAULT_MATCH_BY: MatchBy = "mean"  # what the authors' code ranks by (DESIGN 4.2)

RegionMode = Literal["masked", "pooled"]
REGION_MODES: tuple[str, ...] = get_args(RegionMode)
DEFAULT_REGION_MODE: RegionMode = "masked"  # the paper's Algorithm 1 (docs/region-modes.md)

METRICS: tuple[str, ...] = ("ms_ssim", "ssim")  # pixel metrics; "sscd" needs a model file

# MS-SSIM's 5 scales with an 11-tap window need a shorter side above (11 - 1) * 2**4 = 160.
MIN_SIDE = 161
DEFAULT_SIZE = 512  # the paper's and SD v1's resolution
# Largest image (width x height) decoded. Decoding and resizing take about 21-27 bytes per
# pixel (measured on 10 and 40 MP PNGs), so 50 MP (every camera photo up to 50 MP) stays
# near 1 GB; bigger files, decompression bombs included, become error rows, never decoded.
DEFAULT_MAX_PIXELS = 50_000_000
