"""Segmenters on the replication set: time per image and mask IoU against the true masks.

Builds the replication set (32 generations, 10 training images, exact masks), loads it at
the demo's canonical size, and segments every image with the classical segmenter (the
baseline) and U2-NetP (when installed or given), in the same run. Prints one JSON object per
segmenter: seconds per image (wall and process CPU; the model's load apart), the ratio to
the classical segmenter's time, and mean / minimum IoU with the true masks. Which one labels
more generations as intended is `fbmem demo`'s business (docs/segmentation.md).

    python benchmarks/bench_segment.py [--size 256] [--repeat 2] [--u2netp PATH] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from scanner.demo import demo_segmenters
from scanner.images import load_image, load_mask
from scanner.replication import build_replication_set
from scanner.segment import make_segmenter


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def replication(size: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Generations and references of the replication set at `size`, with their true masks."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        gens = build_replication_set(root, size=512)
        refs = pd.read_csv(root / "references.csv")
        out = {}
        for name, paths, masks in (
            ("generations", gens["gen"], gens["gen_mask"]),
            ("references", refs["path"], refs["mask"]),
        ):
            out[name] = (
                np.stack([load_image(root / p, size) for p in paths]),
                np.stack([load_mask(root / p, size) for p in masks]),
            )
    return out


def iou(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    inter = (pred & true).reshape(len(pred), -1).sum(1)
    union = (pred | true).reshape(len(pred), -1).sum(1)
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256, help="canonical size (the demo's: 256)")
    parser.add_argument("--repeat", type=int, default=2, help="timed passes over all images")
    parser.add_argument("--u2netp", metavar="PATH", help="a u2netp.onnx file")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    data = replication(args.size)
    images = np.concatenate([data["generations"][0], data["references"][0]])
    baseline = None
    for config in demo_segmenters(args.device, args.u2netp):
        t = time.perf_counter()
        segmenter = make_segmenter(config)
        segmenter(images[:1])  # warm-up: first-call allocations stay out of the timing
        load_s = time.perf_counter() - t
        wall, cpu = [], []
        for _ in range(args.repeat):
            w, c = time.perf_counter(), time.process_time()
            masks = segmenter(images)
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
        per_image = min(wall) / len(images)
        baseline = baseline or per_image  # the classical segmenter comes first
        n_gen = len(data["generations"][0])
        scores = {
            name: iou(masks[sl], data[name][1])
            for name, sl in (("generations", slice(0, n_gen)), ("references", slice(n_gen, None)))
        }
        record = {
            "segmenter": segmenter.name,
            "device": device_name(args.device),
            "provider": getattr(segmenter, "provider", "numpy/scipy"),
            "size": args.size,
            "images": len(images),
            "s_per_image": round(per_image, 4),
            "cpu_s_per_image": round(min(cpu) / len(images), 4),
            "time_vs_classical": round(per_image / baseline, 2),
            "load_and_warmup_s": round(load_s, 2),
            **{f"iou_{k}_mean": round(float(v.mean()), 3) for k, v in scores.items()},
            **{f"iou_{k}_min": round(float(v.min()), 3) for k, v in scores.items()},
        }
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
