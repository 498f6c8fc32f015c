"""Cost of `fbmem cluster --method authors` against the default recipe, on the same prompts.

The authors' recipe encodes every prompt with the SD model's own text encoder (CLIP ViT-L/14's
text tower for SD v1.4: 12 layers of width 768, 77 tokens) and runs k-means on 59,136-value
vectors; the default embeds with the bundled MiniLM and runs k-means on 384 values. No SD
weights exist here, so the text encoder has SD v1.4's shape and random weights: the cost is
the real model's, the clusters mean nothing. Prints one JSON object per recipe, with seconds
per stage, prompts per second and the ratio to the default measured in the same run.

    python benchmarks/bench_clustering.py [--prompts 100] [--k 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's scanner, not an installed one
    sys.path.insert(0, str(ROOT))

from scanner.clustering import SDTokenStates, cluster_prompts
from scanner.embed import EmbedConfig, make_text_embedder
from scanner.prompts import load_prompts
from scanner.tiny_sd import build_tiny_pipeline

# CLIP ViT-L/14's text tower, SD v1.x's text encoder
SD_V1_TEXT = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
)


def sd_v1_shaped_model(folder: Path) -> Path:
    """A diffusers folder whose text encoder has SD v1's shape (random weights, seeded)."""
    build_tiny_pipeline(folder)  # the byte-level tokenizer pads every prompt to 77 tokens
    tiny = CLIPTextConfig.from_pretrained(folder / "text_encoder")
    config = CLIPTextConfig(
        **SD_V1_TEXT,
        vocab_size=tiny.vocab_size,
        max_position_embeddings=77,
        bos_token_id=tiny.bos_token_id,
        eos_token_id=tiny.eos_token_id,
        pad_token_id=tiny.pad_token_id,
    )
    torch.manual_seed(0)
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    return folder


class Cached(SDTokenStates):
    """Vectors computed already, so k-means is timed apart from the embedding."""

    def __init__(self, name: str, vectors) -> None:
        self.name, self.dim, self._vectors = name, vectors.shape[1], vectors

    def __call__(self, texts):
        return self._vectors


def timed(embedder, prompts, k: int, method: str) -> dict:
    """Wall and CPU seconds of the embedding and of k-means (CPU time: the machine is shared)."""
    wall, cpu = time.perf_counter(), time.process_time()
    vectors = embedder(prompts["prompt"].tolist())
    embed = (time.perf_counter() - wall, time.process_time() - cpu)
    wall, cpu = time.perf_counter(), time.process_time()
    cluster_prompts(prompts, k=k, embedder=Cached(embedder.name, vectors), method=method)
    kmeans = (time.perf_counter() - wall, time.process_time() - cpu)
    return {"embed": embed, "kmeans": kmeans, "dim": int(vectors.shape[1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--k", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    prompts = load_prompts("memorized", args.prompts)
    device = (
        f"{os.cpu_count()}-core {platform.machine()} CPU, {args.threads} torch threads, "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )

    with tempfile.TemporaryDirectory() as tmp:
        model = sd_v1_shaped_model(Path(tmp) / "sd")
        timed(SDTokenStates(str(model)), prompts.head(4), 2, "authors")  # warm-up
        authors = timed(SDTokenStates(str(model)), prompts, args.k, "authors")
    minilm = make_text_embedder(EmbedConfig())
    timed(minilm, prompts.head(4), 2, "default")  # warm-up
    default = timed(minilm, prompts, args.k, "default")

    base = default["embed"][0] + default["kmeans"][0]  # wall seconds
    for method, r in (("default", default), ("authors", authors)):
        wall = r["embed"][0] + r["kmeans"][0]
        print(
            json.dumps(
                {
                    "recipe": method,
                    "prompts": len(prompts),
                    "k": args.k,
                    "vector_dim": r["dim"],
                    "embed_wall_s": round(r["embed"][0], 3),
                    "embed_cpu_s": round(r["embed"][1], 3),
                    "kmeans_wall_s": round(r["kmeans"][0], 3),
                    "kmeans_cpu_s": round(r["kmeans"][1], 3),
                    "prompts_per_wall_s": round(len(prompts) / wall, 2),
                    "wall_vs_default": round(wall / base, 2),
                    "device": device,
                }
            )
        )


if __name__ == "__main__":
    main()
