"""What a scan of the organism reads: its training set as a reference table, and its captions.

The reference store is the training set itself, deduplicated (a verbatim image is stored once),
at the 128 px it was trained at with its true masks; the store upsamples it to the scan's
canonical size through the same resampler that upsamples the organism's generations. The caption
table carries every caption's ground truth (`group`, `designed`, `concept`) into the scan's
`prompts` table, and marks the subset the demo scans (`demo`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from scanner.images import encode_png
from scanner.organism.design import Design

# The demo's captions per group (the rest of the table stays available to `--prompts`).
DEMO_PER_CONCEPT = 3  # trained captions of each fg / bg concept
DEMO_HELDOUT_CONCEPT = 1  # held-out captions with a concept word, per concept
DEMO_HELDOUT_UNRELATED = 6
DEMO_SINGLETONS = 4


def caption_table(design: Design) -> pd.DataFrame:
    """prompt_id, prompt, group, designed, concept, demo: every caption a scan may use."""
    table = pd.DataFrame(
        [
            {"prompt": c.prompt, "group": c.group, "designed": c.designed, "concept": c.concept}
            for c in design.captions
        ]
    )
    rank = table.groupby(["group", "concept"]).cumcount()
    limits = {
        "verbatim": len(table),
        "fg-concept": DEMO_PER_CONCEPT,
        "bg-concept": DEMO_PER_CONCEPT,
        "heldout-concept": DEMO_HELDOUT_CONCEPT,
        "heldout-unrelated": DEMO_HELDOUT_UNRELATED,
        "singleton": DEMO_SINGLETONS,
    }
    table["demo"] = rank < table["group"].map(limits)
    table.insert(0, "prompt_id", np.arange(len(table), dtype=np.int64))
    return table


def write_training_set(design: Design, out: str | Path) -> Path:
    """Write the training images (PNG, 128 px) and true masks; return the reference table
    (ref_id, path, mask, caption, group, concept, copies) that `build_reference` reads."""
    out = Path(out).resolve()
    (out / "images").mkdir(parents=True, exist_ok=True)
    pixels, masks = design.render()
    rows = []
    for image, picture, mask in zip(design.images, pixels, masks):
        path, mask_path = f"images/{image.image_id}.png", f"images/{image.image_id}_mask.png"
        (out / path).write_bytes(encode_png(picture))
        (out / mask_path).write_bytes(encode_png(mask))
        rows.append(
            {
                "ref_id": image.image_id,
                "path": path,
                "mask": mask_path,
                "caption": image.caption,
                "group": image.group,
                "concept": image.concept,
                "copies": image.copies,
            }
        )
    table = out / "training_set.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table
