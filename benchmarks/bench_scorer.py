"""Throughput of the Algorithm 1 engine against pytorch-msssim on the same pairs and device.

A "pair" is one (generation, reference) pair with all three region scores. The baseline
builds each pair's masked variants and calls `pytorch_msssim.ms_ssim` once per region on
batches of pairs, which is how one would use it without the engine. Engine and baseline
alternate `--repeat` rounds in one process, so a shared machine's load hits both alike; the
JSON gives the median rates, the median ratio and every round's ratio, with the load average
before and after. One JSON object per configuration.

    python benchmarks/bench_scorer.py                 # CPU defaults
    python benchmarks/bench_scorer.py --configs 512:8x8 --repeat 3 --baseline-pairs 16
    python benchmarks/bench_scorer.py --device cuda --configs 512:64x64 512:256x256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pytorch_msssim
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scanner.fbmem import branches, score_pairs
from scanner.scoring import REGION_VARIANTS, EngineConfig


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic(g: int, r: int, size: int, device: torch.device, seed: int = 0):
    """Smooth random images with random rectangular foregrounds covering all three branches."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(g + r, 3, size // 16, size // 16, generator=gen)
    images = torch.nn.functional.interpolate(
        low, size=(size, size), mode="bilinear", align_corners=False
    )
    images = (images + 0.05 * torch.rand(images.shape, generator=gen)).clamp(0, 1)
    masks = torch.zeros(g + r, size, size, dtype=torch.bool)
    for i in range(g + r):
        kind = i % 8
        if kind == 0:
            masks[i, :4, :4] = True  # tiny foreground
        elif kind == 1:
            masks[i] = True  # foreground fills the image
        else:
            t, lft = torch.randint(0, size // 2, (2,), generator=gen).tolist()
            masks[i, t : t + size // 3, lft : lft + size // 3] = True
    return images[:g].to(device), images[g:].to(device), masks[:g].to(device), masks[g:].to(device)


def baseline(gen, ref, gen_fg, ref_fg, pairs, beta: float, batch: int) -> torch.Tensor:
    """The three region scores with pytorch-msssim, variants built per pair."""
    branch = branches(gen_fg.flatten(1).float().mean(1), beta)
    out = []
    for p0 in range(0, pairs.shape[0], batch):
        p = pairs[p0 : p0 + batch]
        gi, ri = p[:, 0], p[:, 1]
        g_img, r_img = gen[gi], ref[ri]
        g_m, r_m = gen_fg[gi].unsqueeze(1).to(gen.dtype), ref_fg[ri].unsqueeze(1).to(ref.dtype)
        g_var = torch.stack([g_img, g_img * g_m, g_img * (1 - g_m)], dim=1)
        r_var = torch.stack([r_img, r_img * r_m, r_img * (1 - r_m)], dim=1)
        variants = REGION_VARIANTS.to(gen.device)[branch[gi]]  # (B, 3, 2)
        rows = torch.arange(len(p), device=gen.device)
        regions = [
            pytorch_msssim.ms_ssim(
                g_var[rows, variants[:, k, 0]],
                r_var[rows, variants[:, k, 1]],
                data_range=1.0,
                size_average=False,
            )
            for k in range(3)
        ]
        out.append(torch.stack(regions, dim=1))
    return torch.cat(out)


def timed(fn, device: torch.device):
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - t0, result


def run(
    config: str,
    device: torch.device,
    repeat: int,
    engine: EngineConfig,
    baseline_batch: int,
    baseline_pairs: int | None,
) -> dict:
    size_s, shape = config.split(":")
    g, r = (int(v) for v in shape.split("x"))
    size = int(size_s)
    gen, ref, gen_fg, ref_fg = synthetic(g, r, size, device)
    pairs = torch.cartesian_prod(torch.arange(g), torch.arange(r)).to(device)
    # An even spread of the pairs, so the baseline's subset holds every branch like the whole.
    pick = torch.linspace(0, len(pairs) - 1, min(baseline_pairs or len(pairs), len(pairs)))
    base_pairs = pairs[pick.round().long().to(device)]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def run_engine():
        s = score_pairs(gen, ref, gen_fg, ref_fg, pairs, engine=engine)
        return torch.from_numpy(np.stack([s.m_full, s.m_fg, s.m_bg], axis=1))

    def run_baseline():
        return baseline(gen, ref, gen_fg, ref_fg, base_pairs, 0.03, baseline_batch)

    load_before = os.getloadavg()[0]
    timed(run_engine, device)  # warm-up (on CPU: loads or compiles the kernels)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:  # the engine runs first, so the process peak so far is its peak (plus inputs)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    baseline(gen, ref, gen_fg, ref_fg, base_pairs[:2], 0.03, baseline_batch)  # warm-up
    engine_rates, base_rates = [], []
    for _ in range(repeat):
        t_engine, got = timed(run_engine, device)
        t_base, expected = timed(run_baseline, device)
        engine_rates.append(len(pairs) / t_engine)
        base_rates.append(len(base_pairs) / t_base)
    ratios = [e / b for e, b in zip(engine_rates, base_rates)]
    return {
        "device": device_name(device),
        "size": size,
        "gens": g,
        "refs": r,
        "pairs": len(pairs),
        "baseline_pairs": len(base_pairs),
        "engine": {k: v for k, v in vars(engine).items() if v is not None},
        "engine_pairs_per_s": round(statistics.median(engine_rates), 2),
        "baseline_pairs_per_s": round(statistics.median(base_rates), 3),
        "speedup": round(statistics.median(ratios), 2),
        "speedup_per_round": [round(x, 2) for x in ratios],
        "max_abs_diff": float((got[pick.round().long()] - expected.cpu()).abs().max()),
        "peak_mem_mb": round(peak, 1),
        "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--configs", nargs="+", default=["256:16x16", "256:8x32", "512:8x8"], help="SIZE:GENSxREFS"
    )
    parser.add_argument("--repeat", type=int, default=3, help="alternating timed rounds")
    parser.add_argument("--gen-tile", type=int)
    parser.add_argument("--ref-tile", type=int)
    parser.add_argument("--pair-batch", type=int)
    parser.add_argument("--storage", default="float32", choices=("float32", "float16", "bfloat16"))
    parser.add_argument(
        "--baseline-batch", type=int, default=16, help="pairs per pytorch-msssim call"
    )
    parser.add_argument(
        "--baseline-pairs",
        type=int,
        help="time the baseline on N of the pairs, evenly spread (it is slow); rates stay per pair",
    )
    args = parser.parse_args()
    device = torch.device(args.device)
    engine = EngineConfig(
        gen_tile=args.gen_tile,
        ref_tile=args.ref_tile,
        pair_batch=args.pair_batch,
        storage=args.storage,
    )
    for config in args.configs:
        result = run(config, device, args.repeat, engine, args.baseline_batch, args.baseline_pairs)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
