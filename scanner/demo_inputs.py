"""Inputs of the built-in demos of the Ray jobs: data and models that need no download.

- organism (the default): the memorization model organism, a small diffusion model trained
  here to memorize in known places (scanner/organism), generates N images per caption of its
  demo captions and they are scanned against its own training set (true masks); every prompt
  carries its designed kind, so the report shows designed vs found.
- replay: the replication set's training images become the reference store and its
  generations are replayed through every stage after generation (no model needed), one
  prompt per training image and N = 4 generations (its four kinds) per prompt.
- tiny-sd: a tiny random-weight Stable Diffusion built offline generates from the bundled
  memorized prompts against the same reference store: proves the generation path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from scanner.plan import FullScanConfig
from scanner.replication import KINDS, build_replication_set
from scanner.store import gen_id

DEMO_SIZE = 256  # canonical size of the demos' reference store: fast on a CPU


def replication_references(root: Path) -> Path:
    """Build the replication set under `root`; return a reference table for build_reference."""
    root = root.resolve()  # the table is read from its own folder: store absolute paths
    build_replication_set(root, size=512)
    refs = pd.read_csv(root / "references.csv")
    refs["path"] = [str(root / p) for p in refs["path"]]
    table = root / "references_for_store.csv"
    refs[["ref_id", "path", "caption"]].to_csv(table, index=False)
    return table


def demo_replay(config: FullScanConfig) -> tuple[FullScanConfig, pd.DataFrame]:
    root = (Path(config.out) / "replication").resolve()
    table = replication_references(root)
    manifest = pd.read_csv(root / "replication.csv")
    prompt_of = {r: i for i, r in enumerate(pd.read_csv(table)["ref_id"])}
    items = pd.DataFrame(
        {
            "prompt_id": [prompt_of[r] for r in manifest["ref_id"]],
            "gen_idx": [KINDS.index(k) for k in manifest["kind"]],
            "prompt": manifest["prompt"],
            "method": "none",
            "seed": -1,
            "source": [str(root / p) for p in manifest["gen"]],
            "error": "",
        }
    ).astype({"prompt_id": "int64", "gen_idx": "int64", "seed": "int64"})
    items["item_id"] = [gen_id(p, g) for p, g in zip(items["prompt_id"], items["gen_idx"])]
    config = dataclasses.replace(
        config,
        prompts="replication",
        reference_images=str(table),
        size=DEMO_SIZE,
        n_per_prompt=len(KINDS),
    )
    return config, items.sort_values(["prompt_id", "gen_idx"]).reset_index(drop=True)


def demo_organism(config: FullScanConfig) -> FullScanConfig:
    """Defaults of the organism demo (flags still win): its demo captions, N = 5, 25 DDIM steps
    at 128 px with guidance ORGANISM_GUIDANCE, scanned at 256 px against its training set, top-8."""
    from scanner.organism import ORGANISM_GUIDANCE, ORGANISM_WEIGHTS
    from scanner.organism.design import TRAIN_SIZE, make_design
    from scanner.organism.inputs import caption_table, write_training_set
    from scanner.reference import ReferenceConfig, build_reference

    root = (Path(config.out) / "organism").resolve()
    defaults = FullScanConfig()
    model = config.model or str(ORGANISM_WEIGHTS)
    design = make_design()  # the committed weights were trained on this design (recipe.json)
    prompts = config.prompts
    if prompts == defaults.prompts:  # not chosen: the demo's captions
        root.mkdir(parents=True, exist_ok=True)
        table = caption_table(design)
        prompts = str(root / "prompts.csv")
        table[table["demo"]].to_csv(prompts, index=False)
    reference = root / "reference"  # resumable: a finished store is reused as it is
    build_reference(
        write_training_set(design, root / "training"),
        reference,
        ReferenceConfig(size=DEMO_SIZE, min_side=TRAIN_SIZE),
    )
    changed = lambda name: getattr(config, name) != getattr(defaults, name)  # noqa: E731
    return dataclasses.replace(
        config,
        model=model,
        prompts=prompts,
        reference=str(reference),
        size=DEMO_SIZE,
        gen_size=TRAIN_SIZE,
        n_per_prompt=config.n_per_prompt,
        steps=config.steps if changed("steps") else 25,
        guidance=config.guidance if changed("guidance") else ORGANISM_GUIDANCE,
        top_k=config.top_k if changed("top_k") else 8,
    )


def demo_tiny_sd(config: FullScanConfig) -> FullScanConfig:
    """Defaults of the tiny-sd demo: 20 prompts, N = 2, 4 steps at 64 px (flags still win)."""
    from scanner.tiny_sd import TINY_SIZE, build_tiny_pipeline

    out = Path(config.out)
    model = out / "tiny-sd"
    if not (model / "model_index.json").exists():
        build_tiny_pipeline(model)
    defaults = FullScanConfig()
    return dataclasses.replace(
        config,
        model=str(model),
        prompt_limit=config.prompt_limit or 20,
        n_per_prompt=2 if config.n_per_prompt == defaults.n_per_prompt else config.n_per_prompt,
        steps=4 if config.steps == defaults.steps else config.steps,
        gen_size=TINY_SIZE,
        reference_images=str(replication_references(out / "replication")),
        size=DEMO_SIZE,
    )
