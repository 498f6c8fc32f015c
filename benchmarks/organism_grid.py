"""A picture grid of an organism scan that a reader can check by eye (docs/organism.md).

One row per caption (two per designed group): the training image the caption was designed to
copy (verbatim: its own image; concepts: the match of its first generation), then its N
generations, each titled with its FB-Mem label and M_full / M_fg / M_bg.

    python benchmarks/organism_grid.py scans/demo docs/organism-grid.png
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scanner.report.rows import read_rows  # noqa: E402
from scanner.store import ShardedTables  # noqa: E402

GROUPS = ("verbatim", "fg-concept", "bg-concept", "heldout-concept", "heldout-unrelated")
PER_GROUP = 2


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def main(scan: str, out: str) -> None:
    tables = ShardedTables(scan, ["prompts", "labels"])
    prompts = tables.read("prompts").to_pandas()
    labels = tables.read(
        "labels", ["gen_id", "prompt_id", "label", "ref_id", "m_full", "m_fg", "m_bg"]
    ).to_pandas()
    labels = labels.merge(prompts[["prompt_id", "prompt", "group"]], on="prompt_id")
    chosen = (
        prompts[prompts["group"].isin(GROUPS)]
        .groupby("group", sort=False)
        .head(PER_GROUP)
        .assign(order=lambda t: t["group"].map(GROUPS.index))
        .sort_values(["order", "prompt_id"])
    )
    rows = labels[labels["prompt_id"].isin(chosen["prompt_id"])].sort_values("gen_id")
    images = {
        r["gen_id"]: _png(r["image"])
        for r in read_rows(scan, "generations", "gen_id", set(rows["gen_id"]), ["image"])
    }
    reference = Path(
        pd.read_json(Path(scan) / "manifest.json", typ="series")["config"]["reference"]
    )
    wanted = set(rows.groupby("prompt_id")["ref_id"].first())
    refs = {
        r["ref_id"]: _png(r["image"])
        for r in read_rows(reference, "references", "ref_id", wanted, ["image"])
    }
    n = int(rows.groupby("prompt_id").size().max())
    fig, axes = plt.subplots(len(chosen), n + 1, figsize=(1.6 * (n + 1), 1.75 * len(chosen)))
    for i, (_, caption) in enumerate(chosen.iterrows()):
        gens = rows[rows["prompt_id"] == caption["prompt_id"]]
        ref_id = gens["ref_id"].iloc[0]
        axes[i, 0].imshow(refs[ref_id])
        axes[i, 0].set_title(f"training {ref_id}", fontsize=6)
        axes[i, 0].set_ylabel(f"{caption['group']}\n{caption['prompt'][:28]}", fontsize=6)
        for j, (_, g) in enumerate(gens.iterrows(), start=1):
            axes[i, j].imshow(images[g["gen_id"]])
            axes[i, j].set_title(
                f"{g['label']} {g['m_full']:.2f}/{g['m_fg']:.2f}/{g['m_bg']:.2f}", fontsize=6
            )
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("training image | generations: label M_full/M_fg/M_bg", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
