"""Mitigation on Ray: localize NeMo neurons per prompt, aggregate them per prompt cluster
(NeMo-C), regenerate the same prompts with the same seeds under each method, scan them, and
score each method against the unmitigated model (the paper's Table 2) and on image quality.

    python jobs/mitigate.py --demo tiny-sd                      # tiny offline model, 4 prompts
    python jobs/mitigate.py --config scan.yaml --methods none nemo nemo-c wanda detectmem
    ray job submit --working-dir . -- python jobs/mitigate.py --config scan.yaml

Methods are names of the registry `scanner.mitigation.methods` (docs/mitigation-methods.md).
The YAML config holds the scan's keys (as jobs/full_scan.py) and a `mitigation:` section with
the keys of MitigationOptions (methods, k, statistics, ...); flags override both.

The output directory is one scan directory (its `method` column tells the methods apart)
plus `localizations/` and `neuron_sets/` tables, each preparing method's state under
`methods/` and `report/mitigation.json`. Like the full scan it is resumable: rerun the same
command after an interruption.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
# `ray job submit --working-dir .` runs this file without installing the project.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from actors.pipeline import run_shards, run_task, scan_stages, start_ray
from actors.stages import LocalizeActor, prepare_method
from scanner import exits
from scanner.clustering import cluster_prompts
from scanner.demo_inputs import demo_organism, demo_tiny_sd
from scanner.driver import Progress, error_row, split_shards
from scanner.generate import latent_shape
from scanner.mitigation.localize import LocalizeConfig
from scanner.mitigation.methods import FORMS, get_method
from scanner.mitigation.nemo_c import NEURON_DTYPES
from scanner.mitigation.published import STATUSES, check_model, lookup_published
from scanner.mitigation.quality import QualityConfig, make_quality_metric
from scanner.mitigation.scaling import ActivationScaling
from scanner.mitigation.score import mitigation_score
from scanner.mitigation.signal import SignalConfig
from scanner.organism import ORGANISM_CONCEPTS, ORGANISM_NEMO
from scanner.plan import generation_config, generation_items, load_config, reference_store
from scanner.prompts import load_prompts
from scanner.scan import PROMPTS_SHARD, SCAN_TABLES, scan_rows, write_prompts
from scanner.store import ShardedTables, config_digest, package_versions, write_manifest

TABLES = (*SCAN_TABLES, "localizations", "neuron_sets", "published_sets")
PUBLISHED_SHARD = "published"
DEFAULT_METHODS = ("none", "nemo", "nemo-c", "nemo-c:alpha=0.1")


@dataclasses.dataclass(frozen=True)
class MitigationOptions:
    methods: tuple[str, ...] = DEFAULT_METHODS  # names of scanner.mitigation.methods
    k: int = 12  # prompt clusters (the paper's)
    statistics: str = "holdout"  # NeMo holdout statistics: computed, or "sd-v1.4" (shipped)
    holdout: str = "unmemorized"  # the non-memorized prompts "holdout" statistics come from
    neurons: str | None = None  # a neuron_sets Parquet from an earlier run: skip localization
    latent_side: int | None = None  # NeMo's latent side (None: the UNet's; tiny models need >= 44)
    # NeMo's signal: MS-SSIM scale weights and detection threshold (NeMo's for SD v1.4; the
    # organism's 16 x 16 latents use one scale and a threshold calibrated on it)
    signal_scales: tuple[float, ...] = SignalConfig().scale_weights
    signal_threshold: float = SignalConfig().threshold
    quality: str = "piqe"
    quality_weights: str | None = None
    quality_sample: int = 500  # generations per method rated for quality


def parse_args(argv):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config", help="YAML config of the scan part (as jobs/full_scan.py); flags override it"
    )
    p.add_argument("--overwrite", action="store_true", help="discard an existing run at --out")
    p.add_argument(
        "--demo",
        choices=("organism", "tiny-sd"),
        help="organism (default without --config/--model): the memorization model organism and "
        "its demo captions; tiny-sd: a random-weight model, 4 bundled prompts",
    )
    p.add_argument("--out")
    p.add_argument("--model")
    p.add_argument("--prompts")
    p.add_argument("--prompt-limit", type=int)
    p.add_argument("--n-per-prompt", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--reference")
    p.add_argument("--reference-images")
    p.add_argument("--top-k", type=int)
    defaults = MitigationOptions()
    p.add_argument(
        "--methods",
        nargs="+",
        help=f"default: {' '.join(defaults.methods)}; valid forms: {FORMS}. nemo-c:published and "
        "nemo:published use the FB-Mem authors' SD v1.4 sets (no localization)",
    )
    p.add_argument("--k", type=int, help=f"prompt clusters for NeMo-C (default {defaults.k})")
    p.add_argument(
        "--statistics", choices=("holdout", "sd-v1.4"), help=f"default {defaults.statistics}"
    )
    p.add_argument(
        "--neurons", help="neuron_sets Parquet (prompt_id, layer, channel): skip localization"
    )
    p.add_argument("--latent-side", type=int)
    p.add_argument(
        "--quality", choices=("piqe", "dbcnn", "qalign"), help=f"default {defaults.quality}"
    )
    p.add_argument("--quality-weights")
    p.add_argument("--quality-sample", type=int, help=f"default {defaults.quality_sample}")
    args = vars(p.parse_args(argv))
    config_path, overwrite = args.pop("config"), args.pop("overwrite")
    flags = {f: args.pop(f) for f in _OPTION_FLAGS}
    scan, section = read_yaml(config_path)  # ValueError: a usage error (scanner.exits)
    options = mitigation_options(section | {k: v for k, v in flags.items() if v is not None})
    args = scan | {k: v for k, v in args.items() if v is not None}
    if config_path is None and args.get("demo") is None and args.get("model") is None:
        args["demo"] = "organism"
    args.setdefault("out", "scans/mitigate-demo")
    return args, overwrite, options


_OPTION_FLAGS = (
    "methods",
    "k",
    "statistics",
    "neurons",
    "latent_side",
    "quality",
    "quality_weights",
    "quality_sample",
)


def read_yaml(path: str | None) -> tuple[dict, dict]:
    """A YAML config split into the scan's keys and its `mitigation:` section."""
    import yaml

    if path is None:
        return {}, {}
    loaded = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: a config file must be a YAML mapping")
    section = loaded.pop("mitigation", None) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{path}: `mitigation:` must be a mapping of MitigationOptions keys")
    return loaded, section


def mitigation_options(values: dict) -> MitigationOptions:
    """MitigationOptions from YAML and flag values, every method name checked by the registry."""
    known = [f.name for f in dataclasses.fields(MitigationOptions)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown mitigation keys {unknown}; known: {known}")
    methods = values.get("methods", MitigationOptions().methods)
    if isinstance(methods, str) or not methods:
        raise ValueError(f"methods must be a list of method names, got {methods!r}")
    names = tuple(get_method(m).name for m in methods)
    if "none" not in names:
        raise ValueError("methods must include none: every method is scored against it")
    if len(set(names)) != len(names):
        raise ValueError(f"methods repeat: {list(names)}")
    return MitigationOptions(**(values | {"methods": names}))


# 1. Localization --------------------------------------------------------------------------------


def localization_rows(batch: dict):
    for i in range(len(batch["prompt_id"])):
        shard, pid = batch["shard"][i], int(batch["prompt_id"][i])
        if batch["error"][i]:
            yield shard, {"errors": [error_row(batch, i)]}
            continue
        neurons = json.loads(batch["neurons"][i])
        yield (
            shard,
            {
                "localizations": [
                    {
                        "prompt_id": pid,
                        "memorized": bool(batch["memorized"][i]),
                        "success": bool(batch["success"][i]),
                        "unet_calls": int(batch["unet_calls"][i]),
                        "initial_score": float(batch["initial_score"][i]),
                        "refined_score": float(batch["refined_score"][i]),
                        "neurons": len(neurons),
                    }
                ],
                "neuron_sets": [
                    {"prompt_id": pid, "layer": layer, "channel": channel}
                    for layer, channel in neurons
                ],
            },
        )


def localize(tables, prompts, config, options) -> pd.DataFrame:
    """Each prompt's refined neuron set (sharded over actors, resumable)."""
    if options.neurons:
        return pd.read_parquet(options.neurons)
    if not any(get_method(m).needs_localization for m in options.methods):
        return pd.DataFrame(columns=list(NEURON_DTYPES)).astype(NEURON_DTYPES)
    items = prompts.assign(item_id=prompts["prompt_id"].astype(str))[
        ["prompt_id", "prompt", "item_id", "error"]
    ]
    pending = [
        (s, p)
        for s, p in split_shards(items, config.shard_size, "localize")
        if not tables.is_done(s)
    ]
    signal = SignalConfig(
        latent_side=options.latent_side,
        seed=config.seed,
        scale_weights=options.signal_scales,
        threshold=options.signal_threshold,
    )
    loc = LocalizeConfig(
        model=config.model,
        statistics=options.statistics,
        holdout=options.holdout,
        signal=signal,
        trust_remote_code=config.trust_remote_code,
    )
    progress = Progress(
        len(items), len(items) - sum(len(p) for _, p in pending), "prompt", "localize"
    )
    stage = ("localize", LocalizeActor, {"config": loc})
    run_shards(tables, pending, [stage], config.resources_for, localization_rows, progress)
    progress.close()
    return tables.read("neuron_sets").to_pandas()


# 2. Generations under every method ----------------------------------------------------------


def method_items(prompts, clusters, neuron_sets, config, options) -> list[tuple[str, pd.DataFrame]]:
    """Shards of (prompt, gen_idx, method) items; same seeds under every method."""
    base = generation_items(prompts, config.n_per_prompt, config.seed)
    usable = prompts[prompts["error"] == ""]  # rows with an error get no neurons
    shards = []
    for index, method in enumerate(options.methods):
        neurons, alpha = get_method(method).prompt_neurons(
            usable["prompt_id"].tolist(), usable["prompt"].tolist(), neuron_sets, clusters
        )
        encoded = {
            pid: json.dumps(sorted([int(layer), int(c)] for layer, c in n)) if n else ""
            for pid, n in zip(usable["prompt_id"].tolist(), neurons)
        }
        items = base.assign(
            method=method,
            neurons=[encoded.get(pid, "") for pid in base["prompt_id"].tolist()],
            alpha=alpha,
        )
        items["item_id"] = [f"{i}@{method}" if method != "none" else i for i in base["item_id"]]
        shards += split_shards(items, config.shard_size * config.n_per_prompt, f"m{index}")
    return shards


def published_rows(prompts, options) -> list[dict]:
    """The `published_sets` rows: what each prompt gets under each `:published` method."""
    rows = []
    for method in map(get_method, options.methods):
        if isinstance(method, ActivationScaling) and method.published:
            _, table = lookup_published(prompts["prompt"].tolist(), method.parsed.kind)
            table.insert(0, "method", method.name)
            table.insert(0, "prompt_id", prompts["prompt_id"].to_numpy())
            rows += table.to_dict("records")
    return rows


def prepare_methods(out: Path, prompts: pd.DataFrame, config, options) -> dict[str, dict]:
    """Each preparing method's once-per-run state (Wanda's mask), as a Ray task on the generate
    stage's resources, saved to <out>/methods/<method>.npz: method -> {"state": path,
    "prepare_seconds_this_run"}. A saved state is reused (same directory, same config: same
    state) and costs 0 s."""
    prepared = {}
    for method in map(get_method, options.methods):
        if not method.prepares:
            continue
        path = out / "methods" / f"{method.name.replace(':', '_')}.npz"
        started = time.time()
        if not path.exists():
            state = run_task(
                prepare_method,
                config.resources_for("generate"),
                config=generation_config(config),
                name=method.name,
                prompts=prompts["prompt"].tolist(),
                prompt_ids=prompts["prompt_id"].tolist(),
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            with open(partial, "wb") as file:
                np.savez(file, **state)
            partial.replace(path)  # complete or absent, never half written
            print(f"{method.name}: prepared in {time.time() - started:.1f} s -> {path}")
        seconds = round(time.time() - started, 2)
        prepared[method.name] = {"state": str(path), "prepare_seconds_this_run": seconds}
    return prepared


# 3. Scores -------------------------------------------------------------------------------------


def quality_by_method(tables, options) -> tuple[dict[str, float], object]:
    """Mean no-reference quality of (a sample of) each method's generations."""
    from scanner.images import load_image

    metric = make_quality_metric(
        QualityConfig(metric=options.quality, weights=options.quality_weights)
    )
    gens = tables.read("generations", ["method", "image"]).to_pandas()
    means = {}
    for method, group in gens.groupby("method"):
        sample = group.head(options.quality_sample)
        images = np.stack([load_image(png, size=_png_side(png)) for png in sample["image"]])
        means[method] = float(np.mean(metric(images)))
    return means, metric


def _png_side(png: bytes) -> int:
    from scanner.images import image_hw

    return image_hw(png)[0]


def score_methods(tables, options, settings: dict[str, dict]) -> dict:
    labels = tables.read("labels").to_pandas()
    published = tables.read("published_sets", ["method", "status"]).to_pandas()
    pre = labels[labels["method"] == "none"]
    quality, metric = quality_by_method(tables, options)
    rows = []
    for method in options.methods:
        post = labels[labels["method"] == method]
        counts = published.loc[published["method"] == method, "status"].value_counts()
        parsed = get_method(method)
        result = mitigation_score(pre, post).to_dict() if method != "none" else None
        rows.append(
            {
                "method": method,
                "kind": parsed.kind,
                "settings": settings[method],
                "mitigation_score": result["score"] if result else 0.0,
                "transitions": result["transitions"] if result else None,
                "generations": int(len(post)),
                "quality": quality.get(method),
                "quality_metric": metric.name,
                "higher_is_better": metric.higher_is_better,
                "published_sets": (
                    {s: int(counts.get(s, 0)) for s in STATUSES}
                    if isinstance(parsed, ActivationScaling) and parsed.published
                    else None
                ),
            }
        )
    return {"methods": rows, "baseline_quality": quality.get("none"), "quality_metric": metric.name}


# The job ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    overrides, overwrite, options = parse_args(argv)
    config = load_config(None, overrides)
    out = Path(config.out)
    if overwrite and out.exists():
        shutil.rmtree(out)

    # 1. Inputs: prompts, clusters, reference store
    if config.demo == "organism":
        config = demo_organism(config)
        options = dataclasses.replace(options, **ORGANISM_NEMO, k=min(options.k, ORGANISM_CONCEPTS))
    elif config.demo == "tiny-sd":
        config = demo_tiny_sd(dataclasses.replace(config, prompt_limit=config.prompt_limit or 4))
        options = dataclasses.replace(
            options, latent_side=options.latent_side or 44, k=min(options.k, 2)
        )
    methods = [get_method(m) for m in options.methods]
    if any(isinstance(m, ActivationScaling) and m.published for m in methods):
        check_model(config.model)  # the published sets fit SD v1.4's layers only: refuse first
    prompts = load_prompts(config.prompts, config.prompt_limit)
    usable = prompts[prompts["error"] == ""]
    clusters = cluster_prompts(usable, k=min(options.k, len(usable)), seed=config.seed)
    reference = reference_store(config)

    # 2. Output directory: same config -> same shards
    mitigation = dataclasses.asdict(options)
    resolved = dataclasses.asdict(config) | {"reference": reference, "mitigation": mitigation}
    tables = ShardedTables(out, TABLES)
    # Resources change where work runs, not what it computes, except the generator's batch
    # size: calls are padded to it, and it moves the images' lowest bits (docs/generation.md).
    results_config = {k: v for k, v in resolved.items() if k not in ("report", "resources")}
    results_config["generate_batch_size"] = config.resources_for("generate").batch_size
    digest = config_digest(results_config)
    tables.prepare(digest, overwrite=False)
    if not tables.is_done(PROMPTS_SHARD):
        write_prompts(
            tables,
            prompts.assign(error=""),
            dict(zip(clusters["prompt_id"], clusters["cluster_id"])),
        )
    if not tables.is_done(PUBLISHED_SHARD):
        tables.write_shard(PUBLISHED_SHARD, {"published_sets": published_rows(usable, options)})

    # 3. NeMo per prompt, NeMo-C per cluster, each preparing method's state (Wanda's mask),
    # then every method's generations, scanned
    start_ray()
    neuron_sets = localize(tables, prompts, config, options)
    prepared = prepare_methods(out, usable, config, options)
    states = {name: info["state"] for name, info in prepared.items()}
    shards = method_items(prompts, clusters, neuron_sets, config, options)
    pending = [(s, p) for s, p in shards if not tables.is_done(s)]
    total = sum(len(p) for _, p in shards)
    progress = Progress(total, total - sum(len(p) for _, p in pending), "img", "generate+scan")
    run_shards(
        tables,
        pending,
        scan_stages(config, reference, from_files=False, method_states=states),
        config.resources_for,
        scan_rows,
        progress,
    )
    seconds = progress.close()

    # 4. Scores, manifest, report
    shape = latent_shape(config.model, config.gen_size)
    settings = {m.name: m.settings(shape) for m in methods}
    results = score_methods(tables, options, settings)
    (out / "report").mkdir(exist_ok=True)
    (out / "report" / "mitigation.json").write_text(json.dumps(results, indent=2))
    write_manifest(
        out,
        {
            "kind": "mitigation",
            "config": resolved,
            "versions": package_versions(),
            "started": started,
            "finished": time.time(),
            "seconds_generate_scan_this_run": round(seconds, 2),
            "methods": {
                m.name: {"kind": m.kind, "settings": settings[m.name]} | prepared.get(m.name, {})
                for m in methods
            },
            "rows": {t: tables.count(t) for t in TABLES},
        },
    )
    from scanner.analysis import summarize
    from scanner.report.html import build_report
    from scanner.report.plots import method_name

    summarize(out)
    page = build_report(out)
    print(
        f"\n{'method':<22} {'Table 2 score':>13} {'quality (' + results['quality_metric'] + ')':>16}"
    )
    for row in results["methods"]:
        print(
            f"{method_name(row['method']):<22} {row['mitigation_score']:>13.3f} {row['quality']:>16.2f}"
        )
    print(f"report: {page}")
    return exits.finished(tables.count("errors"))  # 0, or 3: some inputs are error rows


if __name__ == "__main__":
    sys.exit(exits.run("mitigate.py", main))
