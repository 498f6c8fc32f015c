"""Throughput of the full scan: each stage in-process, and the whole Ray job with its memory.

`stages` calls each stage class of `scanner.stages` on batches in this process (no Ray):
images per second per stage on one device. `scan` runs `jobs/full_scan.py` the way users
run it (a subprocess with its own local Ray instance) over P prompts, for each P given, and
samples the peak resident memory (VmHWM) of the driver and of every Ray process it starts:
what grows with the prompt count shows up as a peak that grows with P. Both print one JSON
object per line.

    python benchmarks/bench_pipeline.py stages                      # tiny model, CPU
    python benchmarks/bench_pipeline.py stages --model /models/sd-v1-4 --gen-size 512 --steps 50
    python benchmarks/bench_pipeline.py scan --prompts 2000 20000    # end to end + memory
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scanner.driver import to_batch
from scanner.generate import GenerationConfig
from scanner.plan import generation_items
from scanner.prompts import load_prompts
from scanner.reference import ReferenceConfig, ReferenceStore, build_reference
from scanner.replication import build_replication_set
from scanner.scan import reference_embed_config
from scanner.segment import SegmenterConfig
from scanner.stages import Embed, Generate, LoadImages, Match, Segment
from scanner.tiny_sd import build_tiny_pipeline

JOB = ROOT / "jobs" / "full_scan.py"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# Shared inputs -----------------------------------------------------------------------------


def inputs(work: Path, size: int, model: str | None) -> tuple[Path, Path, str]:
    """Replication set, a reference store at `size` built from it, and the model folder."""
    replication = work / "replication"
    manifest = build_replication_set(replication, size=512)
    refs = pd.read_csv(replication / "references.csv")
    refs["path"] = [str(replication / p) for p in refs["path"]]
    table = replication / "references_for_store.csv"
    refs[["ref_id", "path", "caption"]].to_csv(table, index=False)
    store = work / f"reference-{size}"
    build_reference(table, store, ReferenceConfig(size=size))
    generations = replication / "generations.csv"
    pd.DataFrame({"path": [str(replication / p) for p in manifest["gen"]]}).to_csv(
        generations, index=False
    )
    if model is None:
        model = str(work / "tiny-sd")
        if not (Path(model) / "model_index.json").exists():
            build_tiny_pipeline(model)
    return store, generations, model


# 1. Per stage, in-process --------------------------------------------------------------------


def time_stage(stage, batch: dict, repeats: int, device: str) -> float:
    stage(batch)  # warm-up: lazy initialisation, caches, kernel selection
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        stage(batch)
    sync(device)
    return time.perf_counter() - start


def bench_stages(args: argparse.Namespace, work: Path) -> None:
    store, generations, model = inputs(work, args.size, args.model)
    device = args.device
    size = ReferenceStore.read_manifest(store)["config"]["size"]
    paths = pd.read_csv(generations)["path"].tolist()
    n = args.batch_size
    files = pd.DataFrame({"source": [paths[i % len(paths)] for i in range(n)], "item_id": ""})
    prompts = load_prompts("memorized", n)
    gen_items = generation_items(prompts, 1, 0)

    load = LoadImages(size)
    generate = Generate(
        GenerationConfig(
            model=model,
            steps=args.steps,
            size=args.gen_size,
            device=device,
            batch_size=n,
        ),
        out_size=size,
    )
    segment = Segment(SegmenterConfig(device=device))
    embed = Embed(reference_embed_config(ReferenceStore.read_manifest(store), device))
    match = Match(str(store), top_k=args.top_k, device=device)

    batch = load(to_batch(files, "bench"))
    segmented = segment(batch)
    embedded = embed(segmented)
    runs = [
        ("load", load, to_batch(files, "bench")),
        ("generate", generate, to_batch(gen_items, "bench")),
        ("segment", segment, batch),
        ("embed", embed, segmented),
        ("match", match, embedded),
    ]
    for name, stage, stage_input in runs:
        seconds = time_stage(stage, stage_input, args.repeats, device)
        record = {
            "bench": "stage",
            "stage": name,
            "device": device_name(device),
            "batch_size": n,
            "images": n * args.repeats,
            "seconds": round(seconds, 3),
            "images_per_s": round(n * args.repeats / seconds, 3),
            "size": size,
        }
        if name == "generate":
            record |= {"model": model, "gen_size": args.gen_size, "steps": args.steps}
        if name == "match":
            record |= {"top_k": min(args.top_k, len(match.refs)), "metric": "ms_ssim"}
        print(json.dumps(record), flush=True)


# 2. The Ray job end to end, with peak memory per process ---------------------------------------


def process_title(pid: int) -> str:
    """A Ray worker's title ("ray::MapWorker(MapBatches(GenerateActor))"), else the program."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split()[0]
    scripts = [a.decode(errors="replace") for a in argv[1:] if a.endswith(b".py")]
    return Path(scripts[0] if scripts else first).name


def status_kb(status: str, field: str) -> int:
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(field))


FIELDS = {  # /proc/<pid>/status field -> name in the output
    "VmHWM": "peak_rss_mb",  # the kernel's own peak resident set: exact whenever sampled
    "RssAnon": "peak_anon_mb",  # private memory: where anything growing with the input would sit
    "RssFile": "peak_file_mb",  # mapped files: Python, torch and the other libraries
    "RssShmem": "peak_shmem_mb",  # shared memory: pages of Ray's object store this process touched
}


class PeakMemory:
    """Samples the memory of every process carrying the run's marker, in a thread.

    VmHWM is a true peak; the three parts of the resident set are the largest values seen
    by the sampler. A worker changes title when it becomes an actor, so each pid keeps its
    last title that is not `ray::IDLE`.
    """

    def __init__(self, marker: str, interval: float = 0.25):
        self.needle = f"FBMEM_BENCH_RUN={marker}".encode()
        self.interval = interval
        self.titles: dict[int, str] = {}
        self.peaks: dict[int, dict[str, int]] = {}  # pid -> status field -> largest kB seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if self.needle not in proc.joinpath("environ").read_bytes().split(b"\0"):
                    continue
                status = proc.joinpath("status").read_text()
                values = {field: status_kb(status, field) for field in FIELDS}
                title = process_title(int(proc.name))
            except (OSError, StopIteration, IndexError):
                continue  # gone, or a zombie without memory
            pid = int(proc.name)
            if title != "ray::IDLE" or pid not in self.titles:
                self.titles[pid] = title
            old = self.peaks.get(pid, {})
            self.peaks[pid] = {f: max(v, old.get(f, 0)) for f, v in values.items()}

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def by_title(self, driver_pid: int) -> dict[str, dict]:
        """Per kind of process: the largest peaks (MB) among its processes, and how many."""
        out: dict[str, dict] = {}
        for pid, peaks in self.peaks.items():
            name = "driver" if pid == driver_pid else self.titles[pid]
            entry = out.setdefault(name, {"processes": 0})
            entry["processes"] += 1
            for field, key in FIELDS.items():
                entry[key] = max(entry.get(key, 0.0), round(peaks[field] / 1024, 1))
        return dict(sorted(out.items()))


def write_prompts(path: Path, count: int) -> None:
    """`count` distinct prompts: the bundled ones, numbered past the first round."""
    base = load_prompts("memorized")["prompt"].tolist()
    lines = [
        base[i % len(base)] + (f" #{i // len(base)}" if i >= len(base) else "")
        for i in range(count)
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def bench_scan(args: argparse.Namespace, work: Path) -> None:
    store, _, model = inputs(work, args.size, args.model)
    config = work / "scan.yaml"
    gpu = args.device.startswith("cuda")
    resources = {  # on a GPU: generation holds a whole one, the light stages share
        stage: {"batch_size": args.batch_size, "gpus": (1.0 if stage == "generate" else 0.25) * gpu}
        for stage in ("generate", "segment", "embed", "match")
    }
    config.write_text(
        json.dumps(
            {
                "report": False,
                "gen_size": args.gen_size,
                "shard_size": args.shard_size,
                "resources": resources,
            }
        )
    )
    for count in args.prompts:
        prompts = work / f"prompts-{count}.txt"
        write_prompts(prompts, count)
        out = work / f"scan-{count}"
        command = [
            sys.executable,
            str(JOB),
            "--config",
            str(config),
            "--model",
            model,
            "--prompts",
            str(prompts),
            "--n-per-prompt",
            str(args.n_per_prompt),
            "--steps",
            str(args.steps),
            "--reference",
            str(store),
            "--top-k",
            str(args.top_k),
            "--out",
            str(out),
            "--overwrite",
        ]
        marker = uuid.uuid4().hex
        env = {**os.environ, "RAY_ADDRESS": "local", "FBMEM_BENCH_RUN": marker}
        if args.object_store_share is not None:
            env["RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION"] = str(args.object_store_share)
        log = work / f"scan-{count}.log"
        start = time.perf_counter()
        with PeakMemory(marker) as memory, log.open("wb") as sink:
            proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
            rc = proc.wait()
        wall = time.perf_counter() - start
        if rc != 0:
            sys.exit(f"scan of {count} prompts failed ({rc}); see {log}")
        manifest = json.loads((out / "manifest.json").read_text())
        print(
            json.dumps(
                {
                    "bench": "scan",
                    "prompts": count,
                    "generations": manifest["rows"]["generations"],
                    "errors": manifest["rows"]["errors"],
                    "device": device_name(args.device),
                    "model": model,
                    "gen_size": args.gen_size,
                    "steps": args.steps,
                    "size": ReferenceStore.read_manifest(store)["config"]["size"],
                    "top_k": args.top_k,
                    "object_store_share": args.object_store_share,
                    "wall_s": round(wall, 1),
                    "scan_s": manifest["seconds_this_run"],
                    "images_per_s": manifest["images_per_s_this_run"],
                    "peak_rss": memory.by_title(proc.pid),
                }
            ),
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("mode", choices=("stages", "scan"))
    p.add_argument("--model", help="diffusers folder (default: the tiny offline model)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (stages)")
    p.add_argument("--size", type=int, default=256, help="reference store's canonical size")
    p.add_argument("--gen-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="timed batches per stage")
    p.add_argument("--prompts", type=int, nargs="+", default=[2000], help="scan: prompt counts")
    p.add_argument("--n-per-prompt", type=int, default=1)
    p.add_argument("--shard-size", type=int, default=64, help="scan: prompts per shard")
    p.add_argument(
        "--object-store-share",
        type=float,
        help="scan: share of RAM for Ray's object store (Ray's default: 0.3); the shared part "
        "of each process's RSS grows with the data passed until it covers the store",
    )
    p.add_argument("--work", help="folder for inputs and scans (default: a temporary one)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    np.random.seed(0)
    torch.manual_seed(0)
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
        run(args, work)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
            run(args, Path(tmp))


def run(args: argparse.Namespace, work: Path) -> None:
    {"stages": bench_stages, "scan": bench_scan}[args.mode](args, work)


if __name__ == "__main__":
    main()
