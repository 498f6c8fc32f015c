"""Did the organism memorize where it was designed to? Measured without FB-Mem's segmentation.

For every caption group: N generations per caption (the demo's settings), the MS-SSIM of each
to its nearest training image at the scan's canonical size, and whether that nearest image is
the designed one (verbatim: its own image; concept groups: an image of the concept). Then NeMo's
detection signal on every caption, its separation of memorized (verbatim, concept) from held-out
captions (ROC AUC), and the threshold that separates them best on one half of the captions,
reported on the other half. Prints JSON; docs/organism.md has the figures.

    python benchmarks/organism_eval.py [--model scanner/data/organism] [--per-group 6] [--n 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scanner.fbmem import score_pairs  # noqa: E402
from scanner.generate import GenerationConfig, Generator  # noqa: E402
from scanner.mitigation.signal import (  # noqa: E402
    MemorizationSignal,
    SignalConfig,
    text_embeddings,
)
from scanner.organism import ORGANISM_GUIDANCE, ORGANISM_NEMO, ORGANISM_WEIGHTS  # noqa: E402
from scanner.organism.design import TRAIN_SIZE, make_design, resample  # noqa: E402

SCAN_SIZE = 256
MEMORIZED_GROUPS = ("verbatim", "fg-concept", "bg-concept")
HELDOUT_GROUPS = ("heldout-concept", "heldout-unrelated")


def nearest(generated: torch.Tensor, references: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per generation: the best MS-SSIM over the references and the index of that reference,
    from the scanner's scoring engine (M_full of every generation x reference pair)."""
    ones = lambda x: torch.ones(len(x), *x.shape[-2:], dtype=torch.bool)  # noqa: E731
    full = score_pairs(generated, references, ones(generated), ones(references)).m_full
    full = full.reshape(len(generated), len(references))
    return full.max(axis=1), full.argmax(axis=1)


def roc_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half: the Mann-Whitney form."""
    diff = positive[:, None] - negative[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def best_threshold(positive: np.ndarray, negative: np.ndarray) -> float:
    """The midpoint threshold maximizing balanced accuracy (TPR + TNR) / 2."""
    values = np.unique(np.concatenate([positive, negative]))
    cuts = (values[:-1] + values[1:]) / 2 if len(values) > 1 else values
    accuracy = [((positive > c).mean() + (negative <= c).mean()) / 2 for c in cuts]
    return float(cuts[int(np.argmax(accuracy))])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(ORGANISM_WEIGHTS))
    parser.add_argument("--per-group", type=int, default=6, help="captions per group")
    parser.add_argument("--n", type=int, default=5, help="generations per caption")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, nargs="+", default=[ORGANISM_GUIDANCE])
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    design = make_design()
    pixels, _ = design.render()
    references = torch.from_numpy(resample(pixels, SCAN_SIZE))
    concept_rows = {}
    for row, image in enumerate(design.images):
        concept_rows.setdefault(image.concept, set()).add(row)
    image_row = {image.caption: row for row, image in enumerate(design.images)}

    groups: dict[str, list] = {}
    for caption in design.captions:
        groups.setdefault(caption.group, []).append(caption)
    report: dict = {
        "device": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "model": args.model,
        "per_group": args.per_group,
        "n_per_caption": args.n,
        "steps": args.steps,
        "generation": {},
    }
    t0 = time.perf_counter()
    for guidance in args.guidance:
        generator = Generator(
            GenerationConfig(model=args.model, steps=args.steps, size=TRAIN_SIZE, guidance=guidance)
        )
        per_group = {}
        for group, captions in groups.items():
            chosen = captions[: args.per_group]
            prompts = [c.prompt for c in chosen for _ in range(args.n)]
            ids = [i for i in range(len(chosen)) for _ in range(args.n)]
            gen_idx = [g for _ in chosen for g in range(args.n)]
            images = generator(prompts, prompt_ids=ids, gen_idxs=gen_idx)
            best, which = nearest(torch.from_numpy(resample(images, SCAN_SIZE)), references)
            if group == "verbatim":
                hits = [which[k] == image_row[prompts[k]] for k in range(len(prompts))]
            elif group in ("fg-concept", "bg-concept", "heldout-concept"):
                hits = [
                    which[k] in concept_rows[chosen[ids[k]].concept] for k in range(len(prompts))
                ]
            else:
                hits = [False] * len(prompts)
            per_group[group] = {
                "nearest_ms_ssim_median": round(float(np.median(best)), 3),
                "nearest_ms_ssim_min": round(float(best.min()), 3),
                "nearest_ms_ssim_max": round(float(best.max()), 3),
                "share_above_0.8": round(float((best > 0.8).mean()), 3),
                "nearest_is_designed": round(float(np.mean(hits)), 3),
            }
        report["generation"][f"guidance={guidance}"] = per_group
    report["generation_seconds"] = round(time.perf_counter() - t0, 1)

    # NeMo's detection signal on every caption (single-scale SSIM on the organism's latents).
    t0 = time.perf_counter()
    pipeline = generator.pipeline
    config = SignalConfig(
        scale_weights=ORGANISM_NEMO["signal_scales"], latent_side=ORGANISM_NEMO["latent_side"]
    )
    signal = MemorizationSignal(pipeline.unet, pipeline.scheduler, config)
    scores: dict[str, list[float]] = {}
    for group, captions in groups.items():
        if group == "singleton":
            continue
        embeddings = text_embeddings(
            pipeline.tokenizer, pipeline.text_encoder, [c.prompt for c in captions]
        )
        scores[group] = [float(signal.detect(e).pairwise_max.max()) for e in embeddings]
    positive = np.concatenate([scores[g] for g in MEMORIZED_GROUPS])
    negative = np.concatenate([scores[g] for g in HELDOUT_GROUPS])
    rng = np.random.default_rng(0)
    pos_half, neg_half = rng.permutation(len(positive)), rng.permutation(len(negative))
    fit_p, test_p = positive[pos_half[::2]], positive[pos_half[1::2]]
    fit_n, test_n = negative[neg_half[::2]], negative[neg_half[1::2]]
    threshold = best_threshold(fit_p, fit_n)
    report["nemo"] = {
        "signal_median_per_group": {g: round(float(np.median(v)), 3) for g, v in scores.items()},
        "roc_auc_memorized_vs_heldout": round(roc_auc(positive, negative), 3),
        "threshold_fit_on_half": round(threshold, 3),
        "detection_rate_memorized_other_half": round(float((test_p > threshold).mean()), 3),
        "false_positive_rate_heldout_other_half": round(float((test_n > threshold).mean()), 3),
        "per_group_rate_at_threshold": {
            g: round(float((np.array(v) > threshold).mean()), 3) for g, v in scores.items()
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
