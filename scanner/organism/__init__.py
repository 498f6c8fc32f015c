"""The memorization model organism: a small text-to-image diffusion model trained here to memorize
in known places, the ground truth for the whole chain (generation, FB-Mem, NeMo, mitigation).

Its weights ship in `scanner/data/organism/` (a diffusers pipeline folder, with `recipe.json`:
the command, seed, sizes and timings that made them) and load through the same code path as a
user's `--model PATH`. `fbmem organism train --out DIR` remakes them. docs/organism.md has the
design and what was measured.
"""

from pathlib import Path

ORGANISM_WEIGHTS = Path(__file__).resolve().parent.parent / "data" / "organism"
ORGANISM_CAPTIONS = ORGANISM_WEIGHTS / "captions.csv"
ORGANISM_GUIDANCE = (
    7.0  # classifier-free guidance of its demo: verbatim copies need it (docs/organism.md)
)
# NeMo on the organism: its 16 x 16 latents are too small for NeMo's 3-scale MS-SSIM (side >= 44),
# so the signal is single-scale SSIM at the native size, with the detection threshold calibrated
# on the organism's memorized vs held-out captions (docs/organism.md; SD v1.4's is 0.428).
ORGANISM_NEMO = {
    "holdout": "organism-holdout",
    "latent_side": None,
    "signal_scales": (1.0,),
    "signal_threshold": 0.12,  # fit on half the captions (benchmarks/organism_eval.py)
}
ORGANISM_CONCEPTS = 6  # designed concepts: NeMo-C's k on the organism
