"""The full-scan Ray job end to end (`jobs/full_scan.py`, run as users run it: a subprocess).

Each job run starts its own local Ray instance (~15 s before any work on 2 cores), so runs
are module fixtures shared by several tests: the replay demo (tables, verbatim copies, and
the baseline of the resume test) and two tiny-sd runs with different batching (determinism,
bad prompts). Bad images are tested through the in-process scan, without Ray.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from scanner.images import encode_png, load_image
from scanner.replication import KINDS
from scanner.scan import PROMPTS_SHARD, SCAN_TABLES, ScanConfig, scan_images
from scanner.store import SCHEMAS, ShardedTables

REPO = Path(__file__).resolve().parents[1]
JOB = REPO / "jobs" / "full_scan.py"
RUN_TIMEOUT_S = 600
REPLAY_TOP_K = 3  # of the 10 references: 3x fewer exact scores than the default, same checks
REPLAY_SHARD_PROMPTS = 1  # 8 shards of 4 generations: the resume test has shards to skip

# A prompt file with two bad lines between good ones (DESIGN 7: errors, never drops).
PROMPT_LINES = [
    b"a photo of a red fox",
    b"",  # empty
    b"caf\xe9 au lait",  # Latin-1, not UTF-8
    b"an astronaut riding a horse",
    b"the great wave off kanagawa",
]
GOOD_PROMPTS = (0, 3, 4)
TINY_N = 2
TINY_GEN_BATCH = 4  # the generator's own padded batch: equal in both runs (docs/generation.md)


# Processes ---------------------------------------------------------------------------------


def marked_pids(marker: str) -> list[int]:
    """Live processes whose environment carries `marker`: the job and every Ray process it
    started (they inherit the environment, though Ray moves workers into process groups and
    sessions of their own). Linux /proc; zombies are left to their parent."""
    needle = f"FBMEM_TEST_RUN={marker}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if needle in proc.joinpath("environ").read_bytes().split(b"\0"):
                found.append(int(proc.name))
        except (OSError, IndexError):
            continue
    return found


def end_marked(marker: str, timeout: float = 30.0) -> list[int]:
    """SIGKILL every process carrying `marker` until none is left; returns those it killed."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while (pids := marked_pids(marker)) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(0.5)
    return sorted(killed)


def job_command(out: Path, *args: str) -> list[str]:
    return [sys.executable, str(JOB), "--out", str(out), *args]


def job_env(marker: str) -> dict[str, str]:
    # RAY_ADDRESS=local: a fresh local instance, never a cluster someone else started here.
    return {**os.environ, "RAY_ADDRESS": "local", "FBMEM_TEST_RUN": marker}


def start_job(command: list[str], log: Path, marker: str) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=job_env(marker),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def run_job(command: list[str], log: Path) -> None:
    """Run the job to completion; fail with the end of its log if it does not succeed."""
    marker = uuid.uuid4().hex
    proc = start_job(command, log, marker)
    try:
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        end_marked(marker)
    if rc != 0:
        pytest.fail(f"{' '.join(command)} exited {rc}:\n{log.read_text()[-4000:]}")


def write_config(path: Path, values: dict) -> Path:
    # The job's plumbing, not segmentation: the fast weightless segmenter unless a test says
    # otherwise (u2netp, the default, runs end to end in test_mitigate_job.py).
    path.write_text(yaml.safe_dump({"segmenter": "classical", **values}))
    return path


# Reading a scan ----------------------------------------------------------------------------


def table(out: Path, name: str) -> pd.DataFrame:
    """A table as readers see it: done shards only."""
    return ShardedTables(out, SCAN_TABLES).read(name).to_pandas()


SORT_KEYS = {
    "prompts": ["prompt_id"],
    "generations": ["gen_id"],
    "matches": ["gen_id", "ref_id"],
    "labels": ["gen_id"],
    "errors": ["item_id", "stage"],
}


def comparable(out: Path, name: str) -> pd.DataFrame:
    """Rows in key order, file paths relative to the scan directory (runs use other dirs)."""
    frame = table(out, name).sort_values(SORT_KEYS[name]).reset_index(drop=True)
    if "source" in frame.columns:
        frame["source"] = [os.path.relpath(s, out) if s else s for s in frame["source"]]
    return frame


def png_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# The replay demo ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def replay_config(tmp_path_factory) -> Path:
    return write_config(
        tmp_path_factory.mktemp("config") / "replay.yaml",
        {"report": False, "top_k": REPLAY_TOP_K, "shard_size": REPLAY_SHARD_PROMPTS},
    )


def replay_command(out: Path, config: Path) -> list[str]:
    return job_command(out, "--demo", "replication", "--config", str(config))


@pytest.fixture(scope="module")
def replay_scan(tmp_path_factory, replay_config) -> Path:
    out = tmp_path_factory.mktemp("replay") / "scan"
    run_job(replay_command(out, replay_config), out.parent / "job.log")
    return out


@pytest.mark.ray
@pytest.mark.slow
def test_replay_demo_writes_every_table_with_its_rows(replay_scan):
    replication = pd.read_csv(replay_scan / "replication" / "replication.csv")
    refs = pd.read_csv(replay_scan / "replication" / "references.csv")
    n_gen, n_ref = len(replication), len(refs)
    assert (n_gen, n_ref) == (32, 10)  # the replication set the demo replays
    per_gen = min(REPLAY_TOP_K, n_ref)
    expected = {
        "prompts": n_ref,
        "generations": n_gen,
        "matches": n_gen * per_gen,
        "labels": n_gen,
        "errors": 0,
    }
    for name, rows in expected.items():
        frame = table(replay_scan, name)
        assert list(frame.columns) == SCHEMAS[name].names, name
        assert len(frame) == rows, name

    generations, labels = table(replay_scan, "generations"), table(replay_scan, "labels")
    assert generations["gen_id"].is_unique
    assert list(generations["gen_id"]) == [
        f"{p}:{g}" for p, g in zip(generations["prompt_id"], generations["gen_idx"])
    ]
    assert set(labels["gen_id"]) == set(generations["gen_id"])
    assert set(labels["label"]) <= {"VM", "FM", "BM", "NM"}
    assert labels["ref_id"].isin(refs["ref_id"]).all()
    matches = table(replay_scan, "matches")
    ranks = matches.groupby("gen_id")["prefilter_rank"].apply(sorted)
    assert all(r == list(range(per_gen)) for r in ranks)
    # The label row repeats its match's scores.
    chosen = labels.merge(matches, on=["gen_id", "ref_id"], suffixes=("", "_match"))
    assert len(chosen) == n_gen
    for col in ("label", "m_full", "m_fg", "m_bg"):
        assert (chosen[col] == chosen[f"{col}_match"]).all(), col

    manifest = json.loads((replay_scan / "manifest.json").read_text())
    assert manifest["rows"] == expected
    assert manifest["config"]["top_k"] == REPLAY_TOP_K


@pytest.mark.ray
@pytest.mark.slow
def test_replay_demo_stores_the_replayed_pixels(replay_scan):
    generations = table(replay_scan, "generations")
    size = json.loads((replay_scan / "manifest.json").read_text())["config"]["size"]
    for source, png in zip(generations["source"], generations["image"]):
        expected = (load_image(source, size) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0)
        np.testing.assert_array_equal(png_pixels(png), expected)


@pytest.mark.ray
@pytest.mark.slow
def test_replay_demo_labels_verbatim_copies_vm_against_their_reference(replay_scan):
    replication = pd.read_csv(replay_scan / "replication" / "replication.csv")
    refs = pd.read_csv(replay_scan / "replication" / "references.csv")
    prompt_of = {r: i for i, r in enumerate(refs["ref_id"])}  # one prompt per training image
    labels = table(replay_scan, "labels").set_index(["prompt_id", "gen_idx"])
    for _, row in replication.iterrows():
        got = labels.loc[(prompt_of[row["ref_id"]], KINDS.index(row["kind"]))]
        if row["kind"] == "verbatim":
            assert (got["label"], got["ref_id"]) == ("VM", row["ref_id"]), row["gen_id"]
            assert got["m_full"] >= 0.8
        else:
            # M_full needs no mask: only an exact copy of the whole image reaches tau.
            assert got["label"] != "VM", row["gen_id"]


# Resume -----------------------------------------------------------------------------------


def shard_files(out: Path, shard: str) -> dict[Path, int]:
    """A shard's files (tables it has rows for, and its done marker) with their mtimes."""
    files = [out / name / f"{shard}.parquet" for name in SCAN_TABLES] + [out / "_done" / shard]
    return {f: f.stat().st_mtime_ns for f in files if f.exists()}


@pytest.mark.ray
@pytest.mark.slow
def test_scan_killed_midway_resumes_to_the_rows_of_an_uninterrupted_run(
    tmp_path, replay_config, replay_scan
):
    out = tmp_path / "scan"
    command = replay_command(out, replay_config)
    marker = uuid.uuid4().hex
    proc = start_job(command, tmp_path / "killed.log", marker)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (out / "_done" / "shard-000000").exists():
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "no shard finished in time"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its local Ray head, ...
        proc.wait()
    finally:
        end_marked(marker)  # ... and the Ray workers, which sit in process groups of their own
    all_shards = ShardedTables(replay_scan, SCAN_TABLES).done_shards()
    done = [s for s in ShardedTables(out, SCAN_TABLES).done_shards() if s != PROMPTS_SHARD]
    work_shards = [s for s in all_shards if s != PROMPTS_SHARD]
    assert 1 <= len(done) < len(work_shards), f"killed too late to test resuming: {done}"
    assert not (out / "manifest.json").exists()
    before = {f: t for s in done for f, t in shard_files(out, s).items()}

    run_job(command, tmp_path / "resumed.log")

    assert ShardedTables(out, SCAN_TABLES).done_shards() == all_shards
    assert {f: f.stat().st_mtime_ns for f in before} == before  # finished shards not redone
    manifest = json.loads((out / "manifest.json").read_text())
    baseline = json.loads((replay_scan / "manifest.json").read_text())
    per_shard = baseline["config"]["n_per_prompt"] * REPLAY_SHARD_PROMPTS
    redone = baseline["rows"]["generations"] - per_shard * len(done)
    assert manifest["generations_this_run"] == redone  # only the unfinished shards' items
    assert manifest["rows"] == baseline["rows"]
    for name in SCAN_TABLES:
        pd.testing.assert_frame_equal(comparable(out, name), comparable(replay_scan, name))


# Determinism and bad prompts (tiny-sd) ------------------------------------------------------


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_bytes(b"\n".join(PROMPT_LINES) + b"\n")
    return path


TINY_RUNS = {
    # one prompt per shard, so every Ray batch holds 2 generations; one actor per stage
    "a": {
        "shard_size": 1,
        "resources": {"generate": {"batch_size": TINY_GEN_BATCH}},
    },
    # 3 prompts per shard: Ray batches of 4 mixing prompts; 2 generate and 2 match actors,
    # other stages batched 1 and 3 at a time
    "b": {
        "shard_size": 3,
        "resources": {
            "generate": {"batch_size": TINY_GEN_BATCH, "min_actors": 2, "max_actors": 2},
            "segment": {"batch_size": 1},
            "embed": {"batch_size": 3},
            "match": {"batch_size": 2, "min_actors": 2, "max_actors": 2},
        },
    },
}


@pytest.fixture(scope="module")
def tiny_scans(tmp_path_factory, prompt_file) -> dict[str, Path]:
    outs = {}
    for name, values in TINY_RUNS.items():
        root = tmp_path_factory.mktemp(f"tiny-{name}")
        config = write_config(root / "config.yaml", {"report": False, "top_k": 3, **values})
        out = root / "scan"
        command = job_command(
            out,
            "--demo",
            "tiny-sd",
            "--config",
            str(config),
            "--prompts",
            str(prompt_file),
            "--n-per-prompt",
            str(TINY_N),
            "--steps",
            "2",
        )
        run_job(command, root / "job.log")
        outs[name] = out
    return outs


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_sd_results_do_not_depend_on_batching_or_workers(tiny_scans):
    a, b = tiny_scans["a"], tiny_scans["b"]
    assert (
        ShardedTables(a, SCAN_TABLES).done_shards() != ShardedTables(b, SCAN_TABLES).done_shards()
    )
    gens_a, gens_b = comparable(a, "generations"), comparable(b, "generations")
    assert list(gens_a["gen_id"]) == [f"{p}:{g}" for p in GOOD_PROMPTS for g in range(TINY_N)]
    assert list(gens_a["image"]) == list(gens_b["image"])  # PNG bytes
    assert list(gens_a["fg_mask"]) == list(gens_b["fg_mask"])
    for name in ("generations", "matches", "labels", "errors"):
        pd.testing.assert_frame_equal(comparable(a, name), comparable(b, name))
    images = [png_pixels(p) for p in gens_a["image"]]
    assert all(im.std() > 0 for im in images)  # real generations, not blank placeholders
    assert len({im.tobytes() for im in images}) == len(images)


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_sd_images_equal_one_at_a_time_generation_in_process(
    tiny_scans, prompt_file, one_thread
):
    """An independent oracle: each generation made alone, in this process, without Ray."""
    from scanner.generate import GenerationConfig
    from scanner.plan import generation_items
    from scanner.prompts import load_prompts
    from scanner.stages import Generate, to_float

    scan = tiny_scans["a"]
    config = json.loads((scan / "manifest.json").read_text())["config"]
    generate = Generate(
        GenerationConfig(
            model=config["model"],
            steps=config["steps"],
            guidance=config["guidance"],
            size=config["gen_size"],
            seed=config["seed"],
            batch_size=TINY_GEN_BATCH,
        ),
        out_size=config["size"],
    )
    items = generation_items(load_prompts(str(prompt_file)), TINY_N, config["seed"])
    items = items[items["error"] == ""].iloc[::-1]  # reversed: yet another batching
    stored = comparable(scan, "generations").set_index("gen_id")["image"]
    # One torch thread (fixture), as each actor runs on this machine: threads change low bits.
    for i in range(len(items)):
        row = items.iloc[[i]]
        batch = {c: row[c].to_numpy() for c in row.columns}
        image = generate(batch)["image"][0]
        assert encode_png(to_float(image)) == stored[row["item_id"].iloc[0]]


@pytest.mark.ray
@pytest.mark.slow
def test_bad_prompts_land_in_errors_and_good_ones_are_scanned(tiny_scans):
    scan = tiny_scans["a"]
    errors = comparable(scan, "errors")
    bad = {1: "prompt is empty", 2: "not valid UTF-8"}
    assert list(errors["item_id"]) == [f"{p}:{g}" for p in bad for g in range(TINY_N)]
    assert set(errors["stage"]) == {"prompts"}
    assert set(errors["error_type"]) == {"ValueError"}
    for item, message in zip(errors["item_id"], errors["message"]):
        assert bad[int(item.split(":")[0])] in message
    assert list(comparable(scan, "prompts")["prompt_id"]) == list(range(len(PROMPT_LINES)))
    labels = comparable(scan, "labels")
    assert list(labels["gen_id"]) == [f"{p}:{g}" for p in GOOD_PROMPTS for g in range(TINY_N)]
    assert len(labels) + len(errors) == len(PROMPT_LINES) * TINY_N  # nothing dropped


# Bad images, in-process (no Ray) ------------------------------------------------------------


def test_corrupt_truncated_and_empty_images_land_in_errors(tmp_path):
    from skimage import data

    from scanner.reference import ReferenceConfig, build_reference
    from scanner.segment import SegmenterConfig

    refs = tmp_path / "refs"
    refs.mkdir()
    photos = {"astronaut": data.astronaut(), "coffee": data.coffee()}
    for name, pixels in photos.items():
        Image.fromarray(pixels).save(refs / f"{name}.png")
    store = tmp_path / "store"
    classical = SegmenterConfig(kind="classical")  # error rows, not segmentation
    build_reference(refs, store, ReferenceConfig(size=192, segmenter=classical))

    gens = tmp_path / "gens"
    gens.mkdir()
    good = (refs / "coffee.png").read_bytes()
    (gens / "a_copy.png").write_bytes(good)
    (gens / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    (gens / "c_truncated.png").write_bytes(good[: len(good) // 2])
    (gens / "d_empty.png").write_bytes(b"")

    out = tmp_path / "scan"
    manifest = scan_images(
        gens, out, ScanConfig(reference=str(store), top_k=0, segmenter=classical)
    )

    assert manifest["rows"] == {
        "prompts": 4,
        "generations": 1,
        "matches": 2,
        "labels": 1,
        "errors": 3,
    }
    labels = table(out, "labels")
    assert list(zip(labels["gen_id"], labels["label"], labels["ref_id"])) == [
        ("0:0", "VM", "coffee.png")
    ]
    errors = table(out, "errors").sort_values("item_id")
    assert list(errors["item_id"]) == ["1:0", "2:0", "3:0"]  # listing order: b, c, d
    assert set(errors["stage"]) == {"load"}
    assert set(errors["error_type"]) == {"ImageError"}
    messages = list(errors["message"])
    assert "b_corrupt.png" in messages[0] and "corrupt" in messages[0]
    assert "c_truncated.png" in messages[1] and "truncated" in messages[1]
    assert "d_empty.png" in messages[2] and "0 bytes" in messages[2]


def test_example_config_loads_and_gives_generation_most_gpus():
    from scanner.plan import load_config

    example = REPO / "configs" / "example.yaml"
    config = load_config(str(example), {})
    assert (config.n_per_prompt, config.top_k, config.tau, config.beta) == (5, 16, 0.8, 0.03)
    res = config.resources
    assert res["generate"].gpus == 1.0
    assert all(0.25 <= res[s].gpus <= 0.5 for s in ("segment", "embed", "match"))
    light = sum(res[s].gpus * res[s].max_actors for s in ("segment", "embed", "match"))
    assert res["generate"].gpus * res["generate"].max_actors > 2 * light
    # Flags override the file, as on the command line.
    assert load_config(str(example), {"prompt_limit": 20, "top_k": None}).prompt_limit == 20
