"""Prefilter quality: how often top-k retrieval keeps the match an exhaustive scan finds.

Builds the replication set, adds distractor training images (random crops and composites of
the same bundled photos, so they look alike at a glance), scans the replication generations
with top-k in {1, 4, 16, 64} and exhaustively, and prints one JSON object per (embedder, k):
recall of the exhaustive match (same ref_id and label) over all generations, over memorized
ones (exhaustive label != NM) and over verbatim copies, plus generations per second.

    python benchmarks/bench_prefilter.py [--distractors 100] [--size 192] [--clip PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from skimage import data as skdata
from skimage.draw import ellipse

from scanner.embed import EmbedConfig
from scanner.images import canonical, encode_png
from scanner.reference import ReferenceConfig, build_reference
from scanner.replication import build_replication_set
from scanner.scan import ScanConfig, scan_images
from scanner.store import ShardedTables

PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
)


def _photo(name: str) -> np.ndarray:
    arr = getattr(skdata, name)()[..., :3]
    return arr.astype(np.float32) / 255.0


def distractors(folder: Path, count: int, size: int, seed: int = 0) -> None:
    """Random square crops of the bundled photos, half with another photo pasted in an ellipse."""
    rng = np.random.default_rng(seed)
    photos = [_photo(n) for n in PHOTOS]
    folder.mkdir(parents=True, exist_ok=True)

    def crop(img: np.ndarray) -> np.ndarray:
        h, w = img.shape[:2]
        side = int(min(h, w) * rng.uniform(0.35, 1.0))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        out = canonical(img[top : top + side, left : left + side], size)
        return out[:, ::-1] if rng.random() < 0.5 else out

    for i in range(count):
        base = crop(photos[rng.integers(len(photos))])
        if i % 2:
            patch = crop(photos[rng.integers(len(photos))])
            rr, cc = ellipse(
                size * rng.uniform(0.3, 0.7),
                size * rng.uniform(0.3, 0.7),
                size * 0.25,
                size * 0.3,
                shape=(size, size),
            )
            base[rr, cc] = patch[rr, cc]
        (folder / f"distractor-{i:05d}.png").write_bytes(
            encode_png(np.ascontiguousarray(base.transpose(2, 0, 1)))
        )


def labels_of(scan: Path) -> pd.DataFrame:
    return ShardedTables(scan, ["labels"]).read("labels").to_pandas().set_index("gen_id")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--distractors", type=int, default=100)
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--clip", help="CLIP model folder: also measure the CLIP embedder")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", help="keep files here (default: a temporary folder)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        manifest = build_replication_set(work / "replication", size=args.size)
        refs = pd.read_csv(work / "replication" / "references.csv")
        distractors(work / "distractors", args.distractors, args.size)
        table = pd.concat(
            [
                pd.DataFrame(
                    {
                        "path": [str(work / "replication" / p) for p in refs["path"]],
                        "ref_id": refs["ref_id"],
                    }
                ),
                pd.DataFrame(
                    {"path": sorted(str(p) for p in (work / "distractors").glob("*.png"))}
                ).assign(ref_id=lambda d: [Path(p).stem for p in d["path"]]),
            ]
        )
        table.to_csv(work / "references.csv", index=False)
        gens = manifest.assign(
            path=[str(work / "replication" / p) for p in manifest["gen"]],
            prompt_id=range(len(manifest)),
        )
        gens[["path", "prompt", "prompt_id"]].to_csv(work / "gens.csv", index=False)
        embedders = [("pixels", EmbedConfig(image_kind="pixels", device=args.device))]
        if args.clip:
            embedders.append(
                ("clip", EmbedConfig(image_kind="clip", clip_path=args.clip, device=args.device))
            )
        kind_of = dict(zip([f"{i}:0" for i in range(len(manifest))], manifest["kind"]))

        for name, embed in embedders:
            store = work / f"store-{name}"
            build_reference(
                work / "references.csv", store, ReferenceConfig(size=args.size, embed=embed)
            )
            results = {}
            for k in [0, *args.ks]:
                t0 = time.perf_counter()
                scan_images(
                    work / "gens.csv",
                    work / f"scan-{name}-{k}",
                    ScanConfig(reference=str(store), top_k=k, device=args.device),
                    overwrite=True,
                )
                results[k] = (labels_of(work / f"scan-{name}-{k}"), time.perf_counter() - t0)
            truth, t_exhaustive = results[0]
            memorized = truth.index[truth["label"] != "NM"]
            verbatim = [g for g in truth.index if kind_of[g] == "verbatim"]
            for k in [*args.ks, 0]:
                got, seconds = results[k]
                same = (got["ref_id"] == truth["ref_id"]) & (got["label"] == truth["label"])
                print(
                    json.dumps(
                        {
                            "device": torch.cuda.get_device_name()
                            if args.device.startswith("cuda")
                            else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
                            "embedder": name,
                            "k": k if k else "exhaustive",
                            "references": len(table),
                            "generations": len(truth),
                            "size": args.size,
                            "recall_all": round(float(same.mean()), 4),
                            "recall_memorized": round(float(same[memorized].mean()), 4),
                            "recall_verbatim": round(float(same[verbatim].mean()), 4),
                            "memorized": len(memorized),
                            "gens_per_s": round(len(truth) / seconds, 3),
                            "speedup_vs_exhaustive": round(t_exhaustive / seconds, 2),
                        }
                    ),
                    flush=True,
                )


if __name__ == "__main__":
    main()
