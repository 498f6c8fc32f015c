"""Full scan on Ray: generate N images per prompt, segment, embed, prefilter, score, aggregate.

    python jobs/full_scan.py                       # demo: replication set replayed, local Ray
    python jobs/full_scan.py --demo tiny-sd        # demo: tiny offline diffusion model
    python jobs/full_scan.py --config scan.yaml    # a real scan (see configs/example.yaml)
    ray job submit --working-dir . -- python jobs/full_scan.py --config scan.yaml

Each stage is a Ray Data `map_batches` over an actor pool (actors/stages.py); the driver
(this process) streams the results into the scan directory shard by shard (resumable: run
the same command again after an interruption), then writes the summary and the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if (
    str(ROOT) not in sys.path
):  # `ray job submit --working-dir .` runs the file without installing it
    sys.path.insert(0, str(ROOT))

from scanner.driver import Progress, ShardCollector, split_shards
from scanner.embed import EmbedConfig
from scanner.plan import FullScanConfig, generation_items, load_config
from scanner.prompts import load_prompts
from scanner.scan import (
    PROMPTS_SHARD,
    SCAN_TABLES,
    reference_embed_config,
    scan_rows,
    write_prompts,
)
from scanner.segment import SegmenterConfig
from scanner.store import ShardedTables, config_digest, gen_id, package_versions, write_manifest

DEMO_SIZE = 256  # canonical size of the demos' reference store: fast on a CPU


def parse_args(argv: list[str] | None) -> tuple[str | None, dict, bool]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", help="YAML config; flags given here override it")
    p.add_argument(
        "--overwrite", action="store_true", help="discard an existing scan at --out and start fresh"
    )
    p.add_argument(
        "--demo",
        choices=("replay", "tiny-sd"),
        help="built-in demo (default when neither --config nor --model is given: replay)",
    )
    p.add_argument("--out")
    p.add_argument("--model", help="diffusers folder or model id")
    p.add_argument(
        "--prompts", help="bundled set (memorized, unmemorized) or CSV/Parquet/text file"
    )
    p.add_argument("--prompt-limit", type=int)
    p.add_argument("--n-per-prompt", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--reference", help="reference store folder")
    p.add_argument("--reference-images", help="training images to build the reference store from")
    p.add_argument("--top-k", type=int)
    p.add_argument("--tau", type=float)
    p.add_argument("--beta", type=float)
    p.add_argument("--shard-size", type=int)
    args = vars(p.parse_args(argv))
    config_path, overwrite = args.pop("config"), args.pop("overwrite")
    if config_path is None and args["demo"] is None and args["model"] is None:
        args["demo"] = "replay"
    return config_path, args, overwrite


# 1. Demo inputs ---------------------------------------------------------------------------


def demo_replay(config: FullScanConfig) -> tuple[FullScanConfig, pd.DataFrame]:
    """Replication set: its training images become the reference store, its generations the
    items (no model needed), one prompt per training image, N = 4 kinds per prompt."""
    from scanner.replication import KINDS, build_replication_set

    root = Path(config.out) / "replication"
    manifest = build_replication_set(root, size=512)
    references = pd.read_csv(root / "references.csv")
    references["path"] = [str(root / p) for p in references["path"]]
    ref_table = root / "references_for_store.csv"
    references[["ref_id", "path", "caption"]].to_csv(ref_table, index=False)
    prompt_of = {r: i for i, r in enumerate(references["ref_id"])}
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
        config, reference_images=str(ref_table), size=DEMO_SIZE, n_per_prompt=len(KINDS)
    )
    return config, items.sort_values(["prompt_id", "gen_idx"]).reset_index(drop=True)


def demo_tiny_sd(config: FullScanConfig) -> FullScanConfig:
    """Tiny random-weight SD built offline, 20 bundled memorized prompts, the replication
    set's training images as references: proves the generation path end to end."""
    from scanner.replication import build_replication_set
    from scanner.tiny_sd import build_tiny_pipeline

    out = Path(config.out)
    model = out / "tiny-sd"
    if not (model / "model_index.json").exists():
        build_tiny_pipeline(model)
    root = out / "replication"
    build_replication_set(root, size=512)
    references = pd.read_csv(root / "references.csv")
    references["path"] = [str(root / p) for p in references["path"]]
    ref_table = root / "references_for_store.csv"
    references[["ref_id", "path", "caption"]].to_csv(ref_table, index=False)
    return dataclasses.replace(
        config,
        model=str(model),
        prompts="memorized",
        prompt_limit=config.prompt_limit or 20,
        n_per_prompt=2
        if config.n_per_prompt == FullScanConfig.n_per_prompt
        else config.n_per_prompt,
        steps=4 if config.steps == FullScanConfig.steps else config.steps,
        gen_size=64,
        reference_images=str(ref_table),
        size=DEMO_SIZE,
    )


# 2. Reference store ------------------------------------------------------------------------


def ensure_reference(config: FullScanConfig) -> str:
    if config.reference:
        return config.reference
    from scanner.reference import ReferenceConfig, build_reference

    path = Path(config.out) / "reference"
    ref_config = ReferenceConfig(
        size=config.size,
        segmenter=segmenter_config(config),
        embed=EmbedConfig(image_kind="clip" if config.clip else "pixels", clip_path=config.clip),
    )
    build_reference(config.reference_images, path, ref_config)
    return str(path)


def segmenter_config(config: FullScanConfig) -> SegmenterConfig:
    return SegmenterConfig(
        kind=config.segmenter,
        birefnet_path=config.birefnet,
        trust_remote_code=config.trust_remote_code,
    )


# 3. Ray pipeline ---------------------------------------------------------------------------


def cpu_share(config: FullScanConfig, stage: str, n_stages: int) -> float:
    """CPUs per actor: as asked, else a share that leaves room for Ray Data's read tasks
    (an actor pool holding every CPU starves them and the dataset hangs, ray issue 44687)."""
    import ray

    asked = config.resources_for(stage).cpus
    if asked is not None:
        return asked
    total = ray.cluster_resources().get("CPU", 1.0)
    return max(0.25, min(2.0, total / (2 * n_stages)))


def build_dataset(items: pd.DataFrame, config: FullScanConfig, reference: str, ref_size: int):
    import ray

    from actors.stages import EmbedActor, GenerateActor, LoadActor, MatchActor, SegmentActor
    from scanner.generate import GenerationConfig
    from scanner.reference import ReferenceStore

    ref_manifest = ReferenceStore.read_manifest(reference)
    if "source" in items.columns:
        first = ("load", LoadActor, {"size": ref_size})
    else:
        gen_config = GenerationConfig(
            model=config.model,
            steps=config.steps,
            guidance=config.guidance,
            size=config.gen_size,
            seed=config.seed,
            per_prompt_noise=config.per_prompt_noise,
            batch_size=config.resources_for("generate").batch_size,
            trust_remote_code=config.trust_remote_code,
        )
        first = ("generate", GenerateActor, {"config": gen_config, "out_size": ref_size})
    stages = [
        first,
        ("segment", SegmentActor, {"config": segmenter_config(config)}),
        ("embed", EmbedActor, {"config": reference_embed_config(ref_manifest, "cpu")}),
        (
            "match",
            MatchActor,
            {
                "reference": reference,
                "top_k": config.top_k,
                "tau": config.tau,
                "beta": config.beta,
                "metric": config.metric,
            },
        ),
    ]
    ds = ray.data.from_pandas(items)
    for name, actor, kwargs in stages:
        res = config.resources_for(name)
        cpus = cpu_share(config, name, len(stages))
        ds = ds.map_batches(
            actor,
            fn_constructor_kwargs={**kwargs, "threads": max(1, int(cpus))},
            compute=ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
            num_gpus=res.gpus,
            num_cpus=cpus,
            batch_size=res.batch_size,
            batch_format="numpy",
        )
    return ds


# 4. The job ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    config_path, overrides, overwrite = parse_args(argv)
    config = load_config(config_path, overrides)
    out = Path(config.out)
    if overwrite and out.exists():
        shutil.rmtree(
            out
        )  # first, so inputs built below (demo data, reference store) are fresh too

    # 1. Inputs
    if config.demo == "replay":
        config, items = demo_replay(config)
        prompts = items.drop_duplicates("prompt_id")[["prompt_id", "prompt"]]
    else:
        if config.demo == "tiny-sd":
            config = demo_tiny_sd(config)
        prompts = load_prompts(config.prompts, config.prompt_limit)
        items = generation_items(prompts, config.n_per_prompt, config.seed)

    # 2. Reference store (built once, reused by later runs)
    reference = ensure_reference(config)
    from scanner.reference import ReferenceStore

    ref_size = ReferenceStore.read_manifest(reference)["config"]["size"]

    # 3. Scan directory: same config -> same shards; finished shards are skipped
    resolved = dataclasses.asdict(config) | {"reference": reference}
    tables = ShardedTables(out, SCAN_TABLES)
    tables.prepare(
        config_digest({k: v for k, v in resolved.items() if k not in ("report", "resources")}),
        overwrite=False,
    )
    if not tables.is_done(PROMPTS_SHARD):
        write_prompts(tables, items)
    per_shard = config.shard_size * config.n_per_prompt
    shards = split_shards(items, per_shard)
    pending = [(s, part) for s, part in shards if not tables.is_done(s)]
    todo = pd.concat([part.assign(shard=s) for s, part in pending]) if pending else None
    print(
        f"{len(items)} generations in {len(shards)} shards; {len(pending)} shards to do -> {tables.root}"
    )

    # 4. Ray: stream the pending shards through the stages into the scan directory
    progress = Progress(len(items), len(items) - (0 if todo is None else len(todo)), "img", "scan")
    if todo is not None:
        import ray

        ray.init(ignore_reinit_error=True, log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # shards complete in order: few held in memory
        ctx.enable_progress_bars = False
        collector = ShardCollector(tables, {s: len(p) for s, p in pending}, scan_rows, progress)
        for batch in build_dataset(todo, config, reference, ref_size).iter_batches(
            batch_size=None, batch_format="numpy"
        ):
            collector.add(batch)
        collector.finish()
    seconds = progress.close()

    # 5. Manifest, summary, report
    manifest = {
        "kind": "full-scan",
        "config": resolved,
        "noise": "per-prompt latents"
        if config.per_prompt_noise
        else "shared latents: the i-th of N is the i-th draw of the run's seed",
        "versions": package_versions(),
        "started": started,
        "finished": time.time(),
        "seconds_this_run": round(seconds, 2),
        "generations_this_run": progress.fresh,
        "images_per_s_this_run": round(progress.fresh / seconds, 3)
        if seconds > 0 and progress.fresh
        else None,
        "rows": {t: tables.count(t) for t in SCAN_TABLES},
    }
    write_manifest(tables.root, manifest)
    if config.report:
        from scanner.analysis import summarize
        from scanner.report.html import build_report

        summary = summarize(tables.root)
        page = build_report(tables.root)
        print_summary(summary, page)
    return 0


def print_summary(summary: dict, page: Path) -> None:
    print("\nmemorization distribution:")
    for method, row in summary.get("distribution", {}).items():
        print(f"  {method}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
    print(f"report: {page}")


if __name__ == "__main__":
    sys.exit(main())
