"""Cost of each mitigation method against the model as is, on the same generations.

In-process (no Ray), on the tiny offline SD unless --model names a diffusers folder: the same
prompts (bundled memorized LAION captions) and seeds under every method. For each method it
times the once-per-run preparation (Wanda's mask) and the generation of the items, and prints
one JSON object with seconds, seconds per generation and the ratio to `none` measured in the
same run. Methods are measured in interleaved rounds and each figure is the fastest of its
rounds, so a burst of load from other processes on a shared machine skews no method alone. Activation scaling is timed with a fixed neuron set (16 neurons of the first value
layer per prompt): NeMo's localization, which it needs before, is costed in docs/mitigation.md
(UNet calls per prompt).

    python benchmarks/bench_mitigation_methods.py [--prompts 8] [--steps 10] [--threads 2]
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's scanner, not an installed one
    sys.path.insert(0, str(ROOT))

from scanner.generate import GenerationConfig, Generator
from scanner.mitigation.base import GenerationRows
from scanner.mitigation.methods import get_method
from scanner.prompts import load_prompts
from scanner.tiny_sd import TINY_SIZE, build_tiny_pipeline

METHODS = ("none", "nemo", "wanda", "detectmem")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", help="diffusers folder (default: the tiny offline SD)")
    p.add_argument("--size", type=int, help="pixels (default: 64 for the tiny SD, else 512)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repeats; the fastest counts")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(build_tiny_pipeline(Path(tmp) / "tiny"))
        size = args.size or (TINY_SIZE if args.model is None else 512)
        generator = Generator(
            GenerationConfig(
                model=model,
                steps=args.steps,
                size=size,
                batch_size=args.batch,
                device=args.device,
            )
        )
        prompts = load_prompts("memorized", args.prompts)["prompt"].tolist()
        ids = list(range(len(prompts)))
        neurons = [[(0, c) for c in range(16)] for _ in prompts]
        rows = GenerationRows(prompts, ids, [0] * len(ids), neurons)
        generator(prompts[:1], [0], [0])  # warm-up: first calls allocate
        if args.device == "cuda":
            device = torch.cuda.get_device_name()
        else:
            device = f"{os.cpu_count()}-core {platform.machine()} CPU"
        device += f", {args.threads} torch threads"

        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.rounds):
            for name in METHODS:
                method = get_method(name)
                state, prepare_s = (None, 0.0)
                if method.prepares:
                    state, prepare_s = timed(lambda m=method: m.prepare(generator, prompts, ids))
                _, generate_s = timed(lambda m=method, s=state: m.generate(generator, rows, s))
                previous = best.get(name, (float("inf"), float("inf")))
                best[name] = (min(previous[0], prepare_s), min(previous[1], generate_s))
        baseline = sum(best["none"])
        for name in METHODS:
            method = get_method(name)
            prepare_s, generate_s = best[name]
            total = prepare_s + generate_s
            print(
                json.dumps(
                    {
                        "method": name,
                        "kind": method.kind,
                        "generations": len(prompts),
                        "rounds": args.rounds,
                        "steps": args.steps,
                        "size": size,
                        "model": "tiny offline SD (random weights)"
                        if args.model is None
                        else model,
                        "prepare_s": round(prepare_s, 3),
                        "generate_s": round(generate_s, 3),
                        "s_per_generation": round(total / len(prompts), 4),
                        "ratio_to_none": round(total / baseline, 3),
                        "settings": method.settings(generator.latent_shape),
                        "device": device,
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
