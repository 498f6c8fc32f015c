"""What a full scan does: its configuration (YAML + flags) and its work items.

Pure and Ray-free, so a config can be checked and its shards listed before any cluster
work starts (validation tier of STYLE: per job, before anything runs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scanner.defaults import DEFAULT_REGION_MODE
from scanner.fbmem import (
    DEFAULT_BETA,
    DEFAULT_MATCH_BY,
    DEFAULT_TAU,
    MATCH_BY,
    check_region_mode,
)
from scanner.images import DEFAULT_MAX_PIXELS, check_max_pixels
from scanner.store import gen_id

STAGES = ("generate", "load", "segment", "embed", "match", "localize")


@dataclass(frozen=True)
class StageResources:
    """Ray resources of one stage's actor pool; fractional GPUs let light stages share."""

    gpus: float = 0.0
    cpus: float | None = None  # None: a share of the cluster's CPUs (see jobs/full_scan.py)
    min_actors: int = 1
    max_actors: int = 1
    batch_size: int = 8


DEMOS = ("organism", "replication", "tiny-sd")


@dataclass(frozen=True)
class FullScanConfig:
    out: str = "scans/demo"
    demo: str | None = None  # one of DEMOS (scanner/demo_inputs.py says what each is)
    model: str | None = None  # diffusers folder or model id
    prompts: str = "memorized"  # bundled set name or CSV/Parquet/text file
    prompt_limit: int | None = None  # first rows only
    n_per_prompt: int = 5  # the paper's N
    seed: int = 0
    per_prompt_noise: bool = (
        False  # False: every prompt starts from the same N latents (paper, NeMo)
    )
    steps: int = 50  # DDIM steps (paper's setting for SD v1.4)
    guidance: float = 7.5
    gen_size: int = 512  # generation resolution
    reference: str | None = None  # existing reference store
    reference_images: str | None = None  # or: images to build one from (stored at <out>/reference)
    size: int = 512  # canonical size of a reference store built by this job
    clip: str | None = None  # CLIP path for the prefilter of a store built here
    top_k: int = 16
    tau: float = DEFAULT_TAU
    beta: float = DEFAULT_BETA
    metric: str = "ms_ssim"  # ms_ssim (the paper's), ssim or sscd
    sscd: str | None = None  # SSCD TorchScript file, for metric sscd
    match_by: str = (
        DEFAULT_MATCH_BY  # one match per generation (DESIGN 4.2): mean, full, most-severe
    )
    region_mode: str = DEFAULT_REGION_MODE  # masked (the paper's) or pooled (docs/region-modes.md)
    segmenter: str | None = None  # None: u2netp if installed, else classical (load_config)
    u2netp: str | None = None  # a u2netp.onnx file; None: the one of the u2netp extra
    birefnet: str | None = None
    trust_remote_code: bool = False
    shard_size: int = 64  # prompts per resumable shard (times N generations)
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger image files are error rows, never decoded
    report: bool = True
    resources: dict[str, StageResources] = field(default_factory=dict)

    def resources_for(self, stage: str) -> StageResources:
        return self.resources.get(stage, StageResources())


def _coerce_resources(raw: Any) -> dict[str, StageResources]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(
            f"resources must be a mapping of stage -> settings, got {type(raw).__name__}"
        )
    out = {}
    names = {f.name for f in dataclasses.fields(StageResources)}
    for stage, settings in raw.items():
        if stage not in STAGES:
            raise ValueError(f"resources: unknown stage {stage!r}; stages are {STAGES}")
        if isinstance(settings, StageResources):
            out[stage] = settings
            continue
        unknown = set(settings or {}) - names
        if unknown:
            raise ValueError(
                f"resources.{stage}: unknown settings {sorted(unknown)}; known: {sorted(names)}"
            )
        out[stage] = StageResources(**(settings or {}))
    return out


def load_config(path: str | None, overrides: dict[str, Any]) -> FullScanConfig:
    """YAML file (optional) with command-line overrides on top; unknown keys are errors."""
    import yaml

    values: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a YAML mapping")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(FullScanConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)}; known: {sorted(known)}")
    values["resources"] = _coerce_resources(values.get("resources"))
    config = FullScanConfig(**values)
    validate(config)
    # The default segmenter depends on what is installed: name it, so the manifest says which.
    return dataclasses.replace(config, segmenter=segmenter_config(config).kind)


def validate(config: FullScanConfig) -> None:
    if config.demo not in (None, *DEMOS):
        raise ValueError(f"demo must be one of {', '.join(DEMOS)}; got {config.demo!r}")
    if config.demo is None and not config.model:
        raise ValueError(
            f"give --model (a diffusers folder or model id) or --demo {'|'.join(DEMOS)}"
        )
    if config.demo is None and not (config.reference or config.reference_images):
        raise ValueError(
            "give --reference STORE or --reference-images SRC (training images to build one from)"
        )
    if config.match_by not in MATCH_BY:
        raise ValueError(f"match_by must be one of {MATCH_BY}, got {config.match_by!r}")
    check_region_mode(config.region_mode, config.metric)
    if config.n_per_prompt < 1 or config.shard_size < 1 or config.top_k < 0:
        raise ValueError("n_per_prompt and shard_size must be >= 1 and top_k >= 0")
    check_max_pixels(config.max_pixels)


def segmenter_config(config: FullScanConfig):
    from scanner.segment import SegmenterConfig

    return SegmenterConfig(
        kind=config.segmenter,
        u2netp_path=config.u2netp,
        birefnet_path=config.birefnet,
        trust_remote_code=config.trust_remote_code,
    )


def generation_config(config: FullScanConfig):
    from scanner.generate import GenerationConfig

    return GenerationConfig(
        model=config.model,
        steps=config.steps,
        guidance=config.guidance,
        size=config.gen_size,
        seed=config.seed,
        per_prompt_noise=config.per_prompt_noise,
        batch_size=config.resources_for("generate").batch_size,
        trust_remote_code=config.trust_remote_code,
    )


def reference_store(config: FullScanConfig) -> str:
    """The scan's reference store, as an absolute path (the manifest's readers may run from
    another directory): the one given, or one built (resumably) at <out>/reference."""
    from scanner.reference import ReferenceStore

    if config.reference:
        path = Path(config.reference).resolve()
        ReferenceStore.read_manifest(path)  # not a store: a usage error before any work
        return str(path)
    from scanner.embed import EmbedConfig
    from scanner.reference import ReferenceConfig, build_reference

    path = Path(config.out) / "reference"
    embed = EmbedConfig(image_kind="clip" if config.clip else "pixels", clip_path=config.clip)
    build_reference(
        config.reference_images,
        path,
        ReferenceConfig(
            size=config.size,
            segmenter=segmenter_config(config),
            embed=embed,
            max_pixels=config.max_pixels,
        ),
    )
    return str(path.resolve())


def generation_items(prompts: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """One row per (prompt, gen_idx), prompt-major, so a shard holds whole prompts."""
    rows = prompts.loc[prompts.index.repeat(n)].reset_index(drop=True)
    rows["gen_idx"] = np.tile(np.arange(n, dtype=np.int64), len(prompts))
    items = pd.DataFrame(
        {
            "prompt_id": rows["prompt_id"].astype("int64"),
            "gen_idx": rows["gen_idx"],
            "prompt": rows["prompt"].astype(str),
            "method": "none",
            "seed": np.int64(seed),
            "neurons": "",
            "alpha": 1.0,
            "error": rows["error"].astype(str),
        }
    )
    items["item_id"] = [gen_id(p, g) for p, g in zip(items["prompt_id"], items["gen_idx"])]
    return items
