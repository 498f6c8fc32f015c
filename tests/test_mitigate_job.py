"""jobs/mitigate.py end to end on the tiny model, with neuron sets given so their effect shows,
and the baselines (Wanda, DetectMem) beside NeMo and NeMo-C."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scanner.mitigation.localize import Localize, LocalizeConfig
from scanner.mitigation.signal import SignalConfig
from scanner.store import ShardedTables

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mitigate")
    neurons = pd.DataFrame(
        {"prompt_id": [0] * 16 + [2], "layer": [0] * 16 + [1], "channel": list(range(16)) + [3]}
    )
    neurons = neurons.astype({"prompt_id": "int64", "layer": "int32", "channel": "int32"})
    neurons.to_parquet(tmp / "neurons.parquet")
    out = tmp / "out"
    cmd = [
        sys.executable,
        str(ROOT / "jobs" / "mitigate.py"),
        "--demo",
        "tiny-sd",
        "--out",
        str(out),
        "--prompt-limit",
        "3",
        "--n-per-prompt",
        "1",
        "--steps",
        "2",
        "--methods",
        "none",
        "nemo",
        "nemo-c",
        "wanda",
        "detectmem",
        "--neurons",
        str(tmp / "neurons.parquet"),
    ]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def table(out, name):
    return ShardedTables(out, [name]).read(name).to_pandas()


def test_every_method_generated_and_scored(run):
    out, stdout = run
    labels = table(out, "labels")
    assert sorted(labels["method"].unique()) == ["detectmem", "nemo", "nemo-c", "none", "wanda"]
    assert labels.groupby("method").size().tolist() == [3, 3, 3, 3, 3]
    result = json.loads((out / "report" / "mitigation.json").read_text())
    scores = {m["method"]: m for m in result["methods"]}
    assert scores["none"]["mitigation_score"] == 0.0 and scores["nemo"]["transitions"] is not None
    assert result["quality_metric"] == "piqe" and result["baseline_quality"] > 0
    assert (out / "report" / "index.html").exists() and "Table 2 score" in stdout


def test_neurons_change_exactly_the_prompts_that_carry_them(run):
    out, _ = run
    gens = table(out, "generations").set_index("gen_id")
    clusters = table(out, "prompts").set_index("prompt_id")["cluster_id"]

    def same(pid, method):
        return gens.loc[f"{pid}:0", "image"] == gens.loc[f"{pid}:0@{method}", "image"]

    assert not same(0, "nemo") and not same(2, "nemo")
    assert same(1, "nemo")  # prompt 1 has no neurons of its own
    with_neurons = {clusters[0], clusters[2]}
    assert same(1, "nemo-c") == (clusters[1] not in with_neurons)  # NeMo-C: its cluster's union


def test_localization_stage_on_the_tiny_model(tiny_sd_dir):
    model = tiny_sd_dir
    stage = Localize(
        LocalizeConfig(
            model=str(model), holdout_prompts=20, signal=SignalConfig(latent_side=44, num_samples=4)
        )
    )
    batch = {
        "prompt": np.array(["a red chair", ""], dtype=object),
        "error": np.array(["", "empty"], dtype=object),
    }
    out = stage(batch)
    assert out["unet_calls"].tolist() == [1, 0]  # detection only: random weights memorize nothing
    assert out["memorized"].tolist() == [False, False] and out["neurons"].tolist() == ["[]", "[]"]


def test_baselines_change_every_generation_and_record_their_settings(run):
    out, _ = run
    gens = table(out, "generations").set_index("gen_id")["image"]
    for pid in range(3):
        for method in ("wanda", "detectmem"):
            assert gens[f"{pid}:0@{method}"] != gens[f"{pid}:0"], (pid, method)
    manifest = json.loads((out / "manifest.json").read_text())["methods"]
    assert manifest["detectmem"]["settings"]["target_loss"] == pytest.approx(0.375)  # 4 x 8 x 8
    assert manifest["wanda"]["kind"] == "weight-editing"
    with np.load(manifest["wanda"]["state"], allow_pickle=False) as mask:
        assert len(mask["layers"]) == 10 and len(mask["row"]) > 0  # the tiny SD's ff.net.2
    result = json.loads((out / "report" / "mitigation.json").read_text())
    kinds = {m["method"]: m["kind"] for m in result["methods"]}
    assert kinds == {
        "none": "none",
        "nemo": "activation-scaling",
        "nemo-c": "activation-scaling",
        "wanda": "weight-editing",
        "detectmem": "prompt-optimization",
    }
