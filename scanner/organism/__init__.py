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
ORGANISM_GUIDANCE = 3.0  # classifier-free guidance the demo generates with (see docs/organism.md)
