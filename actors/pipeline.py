"""Ray Data composition shared by the jobs: stages as actor pools, results into shards.

Each stage is `map_batches` over an `ActorPoolStrategy` pool with the stage's GPU share;
the driver iterates the output in order (so shards complete one after another and only the
shards in flight are held) and hands every batch to a `ShardCollector`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pandas as pd

from actors.stages import EmbedActor, GenerateActor, LoadActor, MatchActor, SegmentActor
from scanner.driver import Progress, ShardCollector
from scanner.plan import FullScanConfig, StageResources, generation_config, segmenter_config
from scanner.reference import ReferenceStore
from scanner.scan import reference_embed_config
from scanner.store import ShardedTables

Stage = tuple[str, type, dict]


def start_ray() -> None:
    """Connect to the cluster (RAY_ADDRESS, as `ray job submit` sets it) or start a local one."""
    import ray

    ray.init(ignore_reinit_error=True, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards complete in order: few held in memory
    ctx.enable_progress_bars = False  # the driver's own bar counts generations
    _spend_restart_notice()


def _spend_restart_notice() -> None:
    """Keep a false alarm out of the job's output. Ray's core worker logs once per process,
    as an ERROR line, that an actor with restarts takes constructor arguments from the object
    store (ray issue 53727: they may be lost with their node). Ray Data passes every actor
    pool's arguments that way, so every scan printed it, though here the driver owns those
    objects for the whole run: a lost worker node loses none of them. One such actor is
    created with stderr silenced for that synchronous call, which spends the once-per-process
    line; every other message of Ray stays."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=1)
    class _Spend:
        def __init__(self, _arg) -> None:
            pass

    argument = ray.put(0)  # an object-store argument, as Ray Data's are
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            actor = _Spend.remote(argument)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    ray.kill(actor)


def cpu_share(res: StageResources, n_stages: int) -> float:
    """CPUs per actor: as asked, else a share that leaves room for Ray Data's read tasks
    (an actor pool holding every CPU starves them and the dataset hangs, ray issue 44687)."""
    import ray

    if res.cpus is not None:
        return res.cpus
    total = ray.cluster_resources().get("CPU", 1.0)
    return max(0.25, min(2.0, total / (2 * n_stages)))


def scan_stages(
    config: FullScanConfig,
    reference: str,
    from_files: bool,
    method_states: dict[str, str] | None = None,
) -> list[Stage]:
    """generate (or load) -> segment -> embed -> match, as (name, actor class, kwargs).

    `method_states`: mitigation method -> its prepared state file (see jobs/mitigate.py)."""
    ref_manifest = ReferenceStore.read_manifest(reference)
    size = ref_manifest["config"]["size"]
    if from_files:
        first: Stage = ("load", LoadActor, {"size": size, "max_pixels": config.max_pixels})
    else:
        generate = {"config": generation_config(config), "out_size": size}
        first = ("generate", GenerateActor, generate | {"method_states": method_states or {}})
    match = {
        "reference": reference,
        "top_k": config.top_k,
        "tau": config.tau,
        "beta": config.beta,
        "metric": config.metric,
        "sscd": config.sscd,
        "match_by": config.match_by,
        "region_mode": config.region_mode,
    }
    return [
        first,
        ("segment", SegmentActor, {"config": segmenter_config(config)}),
        ("embed", EmbedActor, {"config": reference_embed_config(ref_manifest, "cpu")}),
        ("match", MatchActor, match),
    ]


def run_task(fn: Callable, res: StageResources, **kwargs):
    """Run `fn(threads=..., **kwargs)` once as a Ray task with a stage's resources, and return
    its result: one-off work on a GPU, such as a mitigation method's preparation."""
    import ray

    cpus = cpu_share(res, 1)
    task = ray.remote(num_gpus=res.gpus, num_cpus=cpus)(fn)
    return ray.get(task.remote(threads=max(1, int(cpus)), **kwargs))


def run_shards(
    tables: ShardedTables,
    pending: list[tuple[str, pd.DataFrame]],
    stages: list[Stage],
    resources: Callable[[str], StageResources],
    to_rows,
    progress: Progress,
) -> None:
    """Stream the pending shards through the stages into `tables` (done marker per shard)."""
    import ray

    if not pending:
        return
    # One block per shard: from one block, a stage would run on a single actor and hand the
    # driver nothing until the very end (no streaming, no finished shards to resume from).
    ds = ray.data.from_pandas([part.assign(shard=shard) for shard, part in pending])
    for name, actor, kwargs in stages:
        res = resources(name)
        cpus = cpu_share(res, len(stages))
        ds = ds.map_batches(
            actor,
            fn_constructor_kwargs={**kwargs, "threads": max(1, int(cpus))},
            compute=ray.data.ActorPoolStrategy(min_size=res.min_actors, max_size=res.max_actors),
            num_gpus=res.gpus,
            num_cpus=cpus,
            batch_size=res.batch_size,
            batch_format="numpy",
        )
    collector = ShardCollector(tables, {s: len(p) for s, p in pending}, to_rows, progress)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        collector.add(batch)
    collector.finish()
