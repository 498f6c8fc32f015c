"""Convert the FB-Mem authors' published artifacts into the package's compact files.

    python scripts/convert_fbmem_reference.py SOURCE_DIR [--out scanner/data]

SOURCE_DIR holds the authors' files as `../shared/data/fbmem-reference/README.md` names them
(memorized_prompts_clusters.csv, nemo_neurons_per_prompt.csv, neurons_cluster/*.npz). Writes
`fbmem_prompts_sd_v1_4.csv` (one row per memorized prompt: caption, cluster, type) and
`fbmem_neurons_sd_v1_4.npz` (integer and float arrays only; loads with allow_pickle=False).
Provenance and licence: scanner/data/LICENSE-fbmem.md. Run once; the outputs are committed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

LAYER_SIZES = (320, 320, 640, 640, 1280, 1280, 1280)  # SD v1.4's attn2.to_v layers, in order
CLUSTERS_WITH_UNIONS = range(10)  # the authors stored unions for clusters 0-9 only


def read_unions(source: Path) -> np.ndarray:
    """(cluster, layer, channel) rows of every published union, sorted, duplicates refused."""
    rows = []
    for cluster in CLUSTERS_WITH_UNIONS:
        with np.load(source / "neurons_cluster" / f"neurons_cluster_{cluster}.npz") as npz:
            for layer in range(len(LAYER_SIZES)):
                channels = npz[f"arr_{layer}"]
                if len(np.unique(channels)) != len(channels):
                    raise ValueError(f"cluster {cluster} layer {layer}: repeated channels")
                rows += [(cluster, layer, int(c)) for c in channels]
    return np.array(sorted(rows), dtype=np.int64).reshape(-1, 3)


def read_per_prompt(source: Path, captions: pd.Series):
    """Per localized prompt: its row in the prompt table, refined neurons and both scores."""
    table = pd.read_csv(source / "nemo_neurons_per_prompt.csv", sep=";", keep_default_na=False)
    row_of = {caption: row for row, caption in enumerate(captions)}
    rows, neurons = [], []
    for caption, refined in zip(table["Caption"], table["Refined Neurons"]):
        row = row_of[caption]  # KeyError: a localized prompt outside the 500
        rows.append(row)
        layers = json.loads(refined)
        if len(layers) != len(LAYER_SIZES):
            raise ValueError(f"{caption!r}: {len(layers)} layers, expected {len(LAYER_SIZES)}")
        for layer, channels in enumerate(layers):
            neurons += sorted({(row, layer, int(c)) for c in channels})
    return (
        np.array(rows, dtype=np.int16),
        np.array(sorted(neurons), dtype=np.int64).reshape(-1, 3),
        table["Initial SSIM"].to_numpy(np.float32),
        table["Refined SSIM"].to_numpy(np.float32),
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", type=Path)
    p.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "scanner" / "data")
    args = p.parse_args(argv)

    clusters = pd.read_csv(
        args.source / "memorized_prompts_clusters.csv", sep=";", keep_default_na=False
    )
    prompts = pd.DataFrame(
        {"caption": clusters["Caption"], "cluster": clusters["cluster"], "type": clusters["type"]}
    )
    prompts.to_csv(args.out / "fbmem_prompts_sd_v1_4.csv", sep=";", index=False)

    unions = read_unions(args.source)
    localized, refined, initial_ssim, refined_ssim = read_per_prompt(
        args.source, prompts["caption"]
    )
    np.savez_compressed(
        args.out / "fbmem_neurons_sd_v1_4.npz",
        layer_sizes=np.array(LAYER_SIZES, dtype=np.int16),
        union_cluster=unions[:, 0].astype(np.int8),
        union_layer=unions[:, 1].astype(np.int8),
        union_channel=unions[:, 2].astype(np.int16),
        localized_row=localized,
        initial_ssim=initial_ssim,
        refined_ssim=refined_ssim,
        prompt_row=refined[:, 0].astype(np.int16),
        prompt_layer=refined[:, 1].astype(np.int8),
        prompt_channel=refined[:, 2].astype(np.int16),
    )
    print(
        f"{len(prompts)} prompts, {len(unions)} union neurons in {len(CLUSTERS_WITH_UNIONS)} "
        f"clusters, {len(refined)} refined neurons of {len(localized)} localized prompts"
    )


if __name__ == "__main__":
    main()
