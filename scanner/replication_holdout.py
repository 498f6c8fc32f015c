"""A second replication set, to judge on: other crops, shapes and seeds than the first.

The replication set (`scanner.replication`) was tuned until Algorithm 1 gave every
generation its intended label; a method tuned on it must be judged on images it has not seen.
These recipes follow the same rules (balanced foregrounds cover about 20-40% of the frame,
new backgrounds differ at coarse scale, no dark backgrounds) with other crops of the
bundled photos and other mask shapes, and were written down before anything was scored on
them. Two things differ on purpose, because real copies do them:

- a background copy gets a new foreground through a mask of its own shape and place, not
  the reference's (in the first set it keeps the reference's mask), so the two images'
  foregrounds only partly overlap;
- half of the unrelated generations use their reference's mask, so in masked mode their
  zeroed regions coincide with the reference's.

No generation repeats a training image's pixels in place unless it is made from it: every
photo used twice is cropped, scaled or flipped so that the same source pixels land elsewhere
in the frame (audited crop by crop; one background copy's new foreground first repeated
another reference's foreground in place and now comes from another photo).

`build_holdout_set` writes the same files and manifest as `build_replication_set`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from scanner.replication import (
    Blob,
    Case,
    Composite,
    Ellipse,
    Outside,
    Polygon,
    View,
    build_replication_set,
)

HOLDOUT_SEED = 1  # the first set's default seed is 0

_DIAMOND = Polygon(((0.1, 0.5), (0.5, 0.9), (0.9, 0.5), (0.5, 0.1)))
_PENTAGON = Polygon(((0.2, 0.15), (0.1, 0.6), (0.45, 0.85), (0.8, 0.7), (0.75, 0.2)))

HOLDOUT_CASES: tuple[Case, ...] = (
    Case(
        reference=Composite(
            View("china", 0, 240, 400, "a lake with a pagoda", flip=True),
            View("coffee", 50, 300, 300, "a coffee cup"),
            Ellipse(0.5, 0.5, 0.32, 0.36, 10),
        ),
        new_background=View("motorcycle", 80, 300, 400, "a workshop"),
        new_foreground=View("astronaut", 100, 150, 300, "a space suit"),
        new_foreground_mask=Blob(0.45, 0.55, 0.3, 0.25, 31),
        unrelated=Composite(
            View("ihc", 100, 100, 400, "a stained tissue slide"),
            View("rocket", 0, 100, 427, "a rocket"),
            Ellipse(0.5, 0.5, 0.32, 0.36, 10),  # the reference's mask
        ),
    ),
    Case(
        reference=Composite(
            View("coffee", 0, 0, 400, "a wooden table", flip=True),
            View("astronaut", 0, 256, 256, "a flag"),
            Polygon(((0.15, 0.2), (0.15, 0.75), (0.6, 0.85), (0.85, 0.5), (0.6, 0.15))),
        ),
        new_background=View("grass", 256, 0, 256, "a lawn"),
        new_foreground=View("chelsea", 0, 0, 300, "a cat"),
        new_foreground_mask=Ellipse(0.6, 0.4, 0.3, 0.3),
        unrelated=Composite(
            View("brick", 0, 256, 256, "a brick wall"),
            View("flower", 0, 0, 427, "a flower bed"),
            Blob(0.5, 0.5, 0.35, 0.2, 32),
        ),
    ),
    Case(
        reference=Composite(
            View("motorcycle", 0, 0, 500, "a garage", flip=True),
            View("logo", 0, 0, 500, "a badge"),
            Blob(0.5, 0.45, 0.34, 0.25, 33),
        ),
        new_background=View("ihc", 0, 0, 512, "a stained tissue slide"),
        new_foreground=View("coins", 0, 0, 303, "coins"),
        new_foreground_mask=Ellipse(0.4, 0.6, 0.25, 0.38, -20),
        unrelated=Composite(
            View("astronaut", 200, 0, 312, "a space station"),
            View("camera", 0, 100, 400, "a photographer"),
            Blob(0.5, 0.45, 0.34, 0.25, 33),  # the reference's mask
        ),
    ),
    Case(
        reference=Composite(
            View("flower", 0, 213, 427, "a flower bed"),
            View("rocket", 0, 0, 427, "a rocket gantry", flip=True),
            Ellipse(0.5, 0.55, 0.38, 0.28),
        ),
        new_background=View("astronaut", 0, 0, 512, "an astronaut portrait", flip=True),
        new_foreground=View("colorwheel", 0, 0, 370, "a colour wheel"),
        new_foreground_mask=Polygon(((0.2, 0.3), (0.2, 0.9), (0.8, 0.9), (0.8, 0.3))),
        unrelated=Composite(
            View("gravel", 100, 100, 400, "gravel"),
            View("camera", 300, 0, 212, "a tripod leg"),
            Ellipse(0.45, 0.5, 0.3, 0.3),
        ),
    ),
    Case(
        reference=Composite(
            View("camera", 0, 0, 512, "a man with a camera", flip=True),
            View("flower", 100, 300, 300, "a dahlia"),
            Blob(0.55, 0.5, 0.36, 0.3, 34),
        ),
        new_background=View("china", 0, 100, 427, "hills", flip=True),
        new_foreground=View("ihc", 300, 300, 212, "a tissue sample"),
        new_foreground_mask=Ellipse(0.3, 0.3, 0.25, 0.25),
        unrelated=Composite(
            View("coffee", 100, 200, 300, "a saucer"),
            View("colorwheel", 0, 0, 370, "a colour wheel", flip=True),
            Blob(0.55, 0.5, 0.36, 0.3, 34),  # the reference's mask
        ),
    ),
    Case(
        reference=Composite(
            View("ihc", 0, 0, 400, "a stained slide", flip=True),
            View("chelsea", 50, 200, 250, "a cat's face"),
            Ellipse(0.5, 0.5, 0.36, 0.33),
        ),
        new_background=View("brick", 100, 100, 400, "a brick wall"),
        new_foreground=View("rocket", 50, 300, 300, "a launch pad"),
        new_foreground_mask=Blob(0.5, 0.5, 0.3, 0.3, 35),
        unrelated=Composite(
            View("china", 0, 300, 340, "a lake"),
            View("coins", 0, 50, 303, "old coins"),
            _DIAMOND,
        ),
    ),
    Case(
        reference=Composite(
            View("motorcycle", 0, 241, 500, "a workbench"),
            View("chelsea", 100, 0, 200, "a cat's flank"),
            _PENTAGON,
        ),
        new_background=View("page", 0, 0, 191, "a printed page"),
        new_foreground=View("flower", 0, 0, 400, "a flower"),
        new_foreground_mask=Ellipse(0.55, 0.45, 0.35, 0.25, 45),
        unrelated=Composite(
            View("ihc", 200, 200, 312, "a tissue section"),
            View("astronaut", 0, 100, 350, "a helmet"),
            _PENTAGON,  # the reference's mask
        ),
    ),
    Case(
        reference=Composite(
            View("rocket", 0, 150, 427, "a launch tower", flip=True),
            View("chelsea", 0, 100, 300, "a tabby cat", flip=True),
            Blob(0.5, 0.5, 0.33, 0.35, 36),
        ),
        new_background=View("camera", 200, 200, 312, "a tripod"),
        new_foreground=View("retina", 400, 400, 600, "a retina"),
        new_foreground_mask=Ellipse(0.5, 0.5, 0.25, 0.4, 90),
        unrelated=Composite(
            View("flower", 0, 0, 427, "flowers", flip=True),
            View("ihc", 0, 212, 300, "tissue"),
            Ellipse(0.5, 0.5, 0.35, 0.35),
        ),
    ),
    # Tiny foreground (p <= beta) and a foreground that fills the frame (p >= 1 - beta).
    Case(
        reference=Composite(
            View("astronaut", 100, 0, 400, "a space shuttle scene"),
            View("rocket", 100, 300, 200, "a rocket nose"),
            Ellipse(0.7, 0.3, 0.07, 0.09),
        ),
        unrelated=Composite(
            View("coffee", 0, 150, 400, "a kitchen table"),
            View("flower", 200, 200, 200, "a bud"),
            Ellipse(0.3, 0.7, 0.08, 0.08),
        ),
    ),
    Case(
        reference=Composite(
            View("ihc", 200, 0, 312, "a slide"),
            View("china", 0, 50, 427, "a landscape"),
            Outside(Ellipse(1.0, 0.0, 0.16, 0.16)),
        ),
        unrelated=Composite(
            View("brick", 0, 0, 300, "bricks"),
            View("coins", 0, 81, 303, "a coin tray"),
            Outside(Blob(0.0, 1.0, 0.15, 0.2, 37)),
        ),
    ),
)


def build_holdout_set(out_dir: Path, size: int = 512, seed: int = HOLDOUT_SEED) -> pd.DataFrame:
    """Write the holdout set under `out_dir` (the same layout as the replication set)."""
    return build_replication_set(out_dir, size=size, seed=seed, cases=HOLDOUT_CASES)
