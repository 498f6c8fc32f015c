"""The GPU benchmark suite (benchmarks/gpu_suite.py): its CPU smoke run, harness and models.

The full suite needs a GPU; its smoke mode runs the same code at tiny sizes on the CPU, so a
change anywhere on its path (the stages, the loaders, the engine) breaks this test, not the
one GPU run a lent machine allows.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # the suite lives in a script folder, not a package

import gpu_harness  # noqa: E402
import gpu_models  # noqa: E402
import gpu_suite  # noqa: E402

COMMON = ("section", "figure", "label", "value", "unit", "status", "device", "torch", "run")


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def no_ray(tmp_path_factory) -> dict:
    """An environment in which `import ray` fails: the GPU machine has no Ray."""
    stubs = tmp_path_factory.mktemp("stubs")
    (stubs / "ray").mkdir()
    (stubs / "ray" / "__init__.py").write_text("raise ImportError('no Ray on the GPU machine')\n")
    path = os.pathsep.join([str(stubs), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    env.pop("OUT", None)
    probe = subprocess.run([sys.executable, "-c", "import ray"], env=env, capture_output=True)
    assert probe.returncode != 0, "the stub does not block Ray"
    return env


@pytest.mark.slow
def test_smoke_run_measures_every_section_without_ray(tmp_path, no_ray):
    out = tmp_path / "suite.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(out)],
        env=no_ray,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = read_lines(out)
    printed = [json.loads(t) for t in proc.stdout.splitlines() if t.startswith("{")]
    assert printed == lines  # every line printed and written alike

    for line in lines:
        assert set(COMMON) <= set(line), line
        assert line["smoke"] is True and line["device"].startswith("cpu")
    errors = [line for line in lines if line["status"] not in ("ok", "not available")]
    assert not errors, errors
    figures = {s: [ln for ln in lines if ln["section"] == s] for s in gpu_suite.SECTIONS}
    for section, section_lines in figures.items():
        measured = [ln for ln in section_lines if ln["figure"] != "section time"]
        assert measured, f"section {section} produced no figure"
        for line in measured:
            if line["status"] == "ok":
                assert math.isfinite(line["value"]) and line["value"] > 0, line

    # The engine's figures are of the same scores pytorch-msssim computes (the project's bounds).
    engine = [ln for ln in figures["scoring"] if ln["figure"] == "engine"]
    assert {(ln["layout"], ln["storage"]) for ln in engine} == {
        (layout, storage)
        for layout in ("dense", "sparse top-2")
        for storage in ("float32", "float16")
    }
    for line in engine:
        assert line["max_abs_diff"] <= (1e-4 if line["storage"] == "float32" else 5e-3), line
        assert line["ratio_vs_pytorch_msssim"] > 0

    generate = {ln["figure"]: ln for ln in figures["generate"]}
    assert {"stage", "plain diffusers", "neuron hooks"} <= set(generate)
    assert [ln["batch"] for ln in figures["generate"] if ln["figure"] == "stage"] == [1, 2]
    assert generate["neuron hooks"]["neurons_per_sample"] > 0
    assert {ln["figure"] for ln in figures["compile"]} >= {"stage", "plain diffusers"}

    stages = {ln["figure"]: ln for ln in figures["stages"]}
    assert set(stages["scan"]["gpu_share_at_50_steps"]) == {"generate", "segment", "embed", "match"}
    assert sum(stages["scan"]["gpu_share_at_50_steps"].values()) == pytest.approx(1, abs=1e-3)

    summary = out.with_name("suite_summary.md").read_text().splitlines()
    assert len(summary) == 2 + len(lines)  # header, rule, one row per line


def smoke_context(tmp_path: Path) -> gpu_suite.Context:
    rec = gpu_harness.Recorder(tmp_path / "lines.jsonl", {"device": "test"})
    return gpu_suite.Context(gpu_suite.SMOKE, rec, tmp_path)


def test_scoring_without_pytorch_msssim_says_so_and_still_measures_the_engine(
    tmp_path, monkeypatch, one_thread
):
    monkeypatch.setitem(sys.modules, "pytorch_msssim", None)  # `import` raises ImportError
    ctx = smoke_context(tmp_path)
    gpu_suite.section_scoring(ctx)
    lines = read_lines(tmp_path / "lines.jsonl")
    missing = [ln for ln in lines if ln["status"] == "missing"]
    assert len(missing) == 1 and "pytorch-msssim" in missing[0]["label"]
    engine = [ln for ln in lines if ln["figure"] == "engine"]
    assert len(engine) == 4
    assert all(ln["value"] > 0 and ln["ratio_vs_pytorch_msssim"] is None for ln in engine)


def test_a_failing_or_overrunning_section_leaves_an_error_line_and_the_next_one_runs(tmp_path):
    def boom(ctx):
        raise ValueError("broken on purpose")

    def overrun(ctx):
        ctx.rec.emit("overrun", "partial", "measured before the cap", 1.0, "s")
        time.sleep(30)

    def fine(ctx):
        ctx.rec.emit("fine", "figure", "measured", 2.0, "s")

    ctx = smoke_context(tmp_path)
    sections = {"boom": boom, "overrun": overrun, "fine": fine}
    started = time.monotonic()
    gpu_harness.run_sections(sections, dict.fromkeys(sections, 0.5), 60, ctx)
    assert time.monotonic() - started < 20  # the cap cut the 30 s sleep
    lines = read_lines(tmp_path / "lines.jsonl")
    by = {(ln["section"], ln["figure"]): ln for ln in lines}
    assert by[("boom", "error")]["error_type"] == "ValueError"
    assert by[("boom", "error")]["message"] == "broken on purpose"
    assert by[("overrun", "partial")]["value"] == 1.0  # kept: written when measured
    assert "time cap" in by[("overrun", "error")]["message"]
    assert by[("fine", "figure")]["status"] == "ok"
    assert {s for s, f in by if f == "section time"} == set(sections)


def test_sections_are_skipped_once_the_budget_is_spent(tmp_path):
    ran = []
    ctx = smoke_context(tmp_path)
    gpu_harness.run_sections({"a": ran.append}, {"a": 10}, 0, ctx)
    assert ran == []
    assert [ln["status"] for ln in read_lines(tmp_path / "lines.jsonl")] == ["skipped"]


def test_each_line_is_on_disk_as_soon_as_it_is_emitted(tmp_path):
    rec = gpu_harness.Recorder(tmp_path / "sub" / "lines.jsonl", {"device": "test"})
    rec.emit("s", "first", "one", 1.0, "s")
    assert len(read_lines(tmp_path / "sub" / "lines.jsonl")) == 1
    rec.emit("s", "second", "two", None, None, "not available", reason="absent")
    second = read_lines(tmp_path / "sub" / "lines.jsonl")[1]
    assert second["status"] == "not available" and second["reason"] == "absent"


def test_summary_is_one_markdown_row_per_line_whatever_the_labels_hold(tmp_path):
    rec = gpu_harness.Recorder(None, {})
    rec.emit("s", "error", "ValueError: two\nlines | and a pipe", None, None, "error")
    rec.emit("s", "figure", "fine", 1234.5678, "pairs/s")
    header, rule, *rows = rec.summary().splitlines()
    assert len(rows) == 2
    assert all(row.count("|") == header.count("|") == 7 for row in rows)
    assert rows[1] == "| s | figure | fine | 1,235 | pairs/s | ok |"


def test_full_size_stand_ins_have_the_published_parameter_counts():
    """On the meta device (no memory): SD v1.4's released UNet, VAE and text encoder, CLIP
    ViT-L/14 (openai/clip-vit-large-patch14), and timm's Swin-L (196.7 M with its 1,000-class
    head of 1.54 M) as the BiRefNet-size backbone."""
    from birefnet_standin import StandIn, StandInConfig
    from transformers import CLIPConfig, CLIPModel

    parts = gpu_models.sd_v1_components("meta")
    assert {name: gpu_models.parameters(m) for name, m in parts.items()} == {
        "unet": 859_520_964,
        "vae": 83_653_863,
        "text_encoder": 123_060_480,
    }
    config = CLIPConfig(
        text_config=gpu_models.CLIP_L14_TEXT,
        vision_config=gpu_models.CLIP_L14_VISION,
        projection_dim=768,
    )
    with torch.device("meta"):
        clip = CLIPModel(config)
        standin = StandIn(StandInConfig())
    assert gpu_models.parameters(clip) == 427_616_513
    assert gpu_models.parameters(standin.backbone) == pytest.approx(196.7e6 - 1.54e6, rel=0.01)
