"""Full scan on Ray: generate N images per prompt, segment, embed, prefilter, score, aggregate.

    python jobs/full_scan.py                       # demo: the memorization model organism
    python jobs/full_scan.py --demo replication    # demo: replication set replayed, no model
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

ROOT = Path(__file__).resolve().parents[1]
# `ray job submit --working-dir .` runs this file without installing the project.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from actors.pipeline import run_shards, scan_stages, start_ray
from scanner import exits
from scanner.defaults import REGION_MODES
from scanner.demo_inputs import demo_organism, demo_replay, demo_tiny_sd
from scanner.driver import Progress, split_shards
from scanner.fbmem import MATCH_BY
from scanner.plan import DEMOS, generation_items, load_config, reference_store
from scanner.prompts import load_prompts
from scanner.scan import PROMPTS_SHARD, SCAN_TABLES, scan_rows, write_prompts
from scanner.store import ShardedTables, config_digest, package_versions, write_manifest


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
        choices=DEMOS,
        help="built-in demo (default when neither --config nor --model is given: organism)",
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
    p.add_argument(
        "--match-by",
        choices=MATCH_BY,
        help="each generation's one match: highest (M_fg + M_bg) / 2 (mean, default), M_full, "
        "or the most severe label (a worst-case audit view)",
    )
    p.add_argument(
        "--region-mode",
        choices=REGION_MODES,
        help="masked (default, the paper's Algorithm 1) or pooled: region scores from the SSIM "
        "maps of the unmasked images where both images hold the region (docs/region-modes.md)",
    )
    p.add_argument("--shard-size", type=int)
    p.add_argument("--max-pixels", type=int, help="largest image file decoded (default 50 MP)")
    args = vars(p.parse_args(argv))
    config_path, overwrite = args.pop("config"), args.pop("overwrite")
    if config_path is None and args["demo"] is None and args["model"] is None:
        args["demo"] = "organism"
    return config_path, args, overwrite


# The job ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    started = time.time()
    config_path, overrides, overwrite = parse_args(argv)
    config = load_config(config_path, overrides)
    out = Path(config.out)
    if overwrite and out.exists():
        # First, so that inputs built below (demo data, reference store) are fresh too.
        shutil.rmtree(out)

    # 1. Inputs
    if config.demo == "replication":
        config, items = demo_replay(config)
        prompts = items
    else:
        if config.demo == "organism":
            config = demo_organism(config)
        elif config.demo == "tiny-sd":
            config = demo_tiny_sd(config)
        prompts = load_prompts(config.prompts, config.prompt_limit)
        items = generation_items(prompts, config.n_per_prompt, config.seed)

    # 2. Reference store (built once, reused by later runs)
    reference = reference_store(config)

    # 3. Scan directory: same config -> same shards; finished shards are skipped
    resolved = dataclasses.asdict(config) | {"reference": reference}
    tables = ShardedTables(out, SCAN_TABLES)
    # Resources change where work runs, not what it computes, except the generator's batch
    # size: calls are padded to it, and it moves the images' lowest bits (docs/generation.md).
    results_config = {k: v for k, v in resolved.items() if k not in ("report", "resources")}
    results_config["generate_batch_size"] = config.resources_for("generate").batch_size
    tables.prepare(config_digest(results_config), overwrite=False)
    if not tables.is_done(PROMPTS_SHARD):
        write_prompts(tables, prompts)
    per_shard = config.shard_size * config.n_per_prompt
    shards = split_shards(items, per_shard)
    pending = [(s, part) for s, part in shards if not tables.is_done(s)]
    print(
        f"{len(items)} generations in {len(shards)} shards; {len(pending)} shards to do -> {tables.root}"
    )

    # 4. Ray: stream the pending shards through the stages into the scan directory
    progress = Progress(len(items), len(items) - sum(len(p) for _, p in pending), "img", "scan")
    if pending:
        start_ray()
        stages = scan_stages(config, reference, from_files="source" in items.columns)
        run_shards(tables, pending, stages, config.resources_for, scan_rows, progress)
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
    return exits.finished(manifest["rows"]["errors"])  # 0, or 3: some inputs are error rows


def print_summary(summary: dict, page: Path) -> None:
    from scanner.report.plots import method_name  # "none" is said as "none (no mitigation)"

    print("\nmemorization distribution (generations, share):")
    for method, row in summary.get("distribution", {}).items():
        cells = "  ".join(
            f"{k} {row[k]:>5} ({100 * row['share_' + k]:5.1f}%)" for k in ("VM", "FM", "BM", "NM")
        )
        print(f"  {method_name(method):<22} {cells}   total {row['total']}")
    print(f"report: {page}")


if __name__ == "__main__":
    sys.exit(exits.run("full_scan.py", main))
