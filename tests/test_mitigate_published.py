"""jobs/mitigate.py's wiring of the published methods, without Ray or generation.

A run with SD v1.4's weights cannot happen here; what can is checked: the items each method
generates, the `published_sets` rows, the warning, and the refusal of a model whose layers are
not SD v1.4's before any work starts.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from scanner.mitigation.published import PublishedCoverageWarning

ROOT = Path(__file__).resolve().parents[1]
PODCAST = "The No Limits Business Woman Podcast"  # cluster 7; union of 613 neurons
INTERVIEW = "Sony Won't Release <i>The Interview</i> on VOD"  # cluster 11: no union


@pytest.fixture(scope="module")
def job():
    spec = importlib.util.spec_from_file_location("mitigate_job", ROOT / "jobs" / "mitigate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.fixture
def prompts() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt_id": np.array([10, 11, 12, 13], dtype=np.int64),
            "prompt": [PODCAST, "a photo of a cat", INTERVIEW, ""],
            "error": ["", "", "", '{"message": "prompt is empty"}'],
        }
    )


def published_union(cluster: int) -> list[list[int]]:
    from importlib.resources import files

    path = files("scanner") / "data" / "fbmem_neurons_sd_v1_4.npz"
    with np.load(str(path), allow_pickle=False) as npz:
        keep = npz["union_cluster"] == cluster
        return sorted(
            [int(a), int(b)] for a, b in zip(npz["union_layer"][keep], npz["union_channel"][keep])
        )


def test_items_carry_the_published_union_and_nothing_else(job, prompts):
    options = job.MitigationOptions(methods=("none", "nemo-c:published:alpha=0.2"))
    config = SimpleNamespace(n_per_prompt=2, seed=3, shard_size=8)
    empty = job.localize(None, prompts, None, options)  # no localization is run (no tables)
    assert empty.empty and list(empty.columns) == ["prompt_id", "layer", "channel"]
    with pytest.warns(PublishedCoverageWarning, match=r"2 of 3 prompts get no published"):
        shards = job.method_items(prompts, None, empty, config, options)
    items = pd.concat(part for _, part in shards)
    mitigated = items[items["method"] == "nemo-c:published:alpha=0.2"]
    neurons = dict(zip(mitigated["item_id"], mitigated["neurons"]))
    assert json.loads(neurons["10:0@nemo-c:published:alpha=0.2"]) == published_union(7)
    assert neurons["10:1@nemo-c:published:alpha=0.2"] == neurons["10:0@nemo-c:published:alpha=0.2"]
    assert {
        neurons[f"{p}:{g}@nemo-c:published:alpha=0.2"] for p in (11, 12, 13) for g in (0, 1)
    } == {""}
    assert set(mitigated["alpha"]) == {0.2}
    assert set(items.loc[items["method"] == "none", "neurons"]) == {""}
    # same seeds under every method
    assert (mitigated["seed"].to_numpy() == items.loc[items["method"] == "none", "seed"]).all()


def test_published_rows_say_what_each_prompt_gets(job, prompts):
    options = job.MitigationOptions(methods=("none", "nemo-c:published", "nemo:published"))
    usable = prompts[prompts["error"] == ""]
    rows = pd.DataFrame(job.published_rows(usable, options))
    assert list(rows.columns) == ["prompt_id", "method", "authors_cluster", "status", "neurons"]
    by = rows.set_index(["method", "prompt_id"])
    assert by.loc[("nemo-c:published", 10)].tolist() == [7, "published", 613]
    assert by.loc[("nemo-c:published", 11)].tolist() == [-1, "unknown-prompt", 0]
    assert by.loc[("nemo-c:published", 12)].tolist() == [11, "no-set", 0]
    assert by.loc[("nemo:published", 12)].tolist() == [11, "published", 4]  # its own refined set
    assert len(rows) == 6  # the errored prompt is in the errors table, not here


def test_a_model_without_sd_v1_4_layers_is_refused_before_any_work(job, tiny_sd_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["--model", str(tiny_sd_dir), "--reference-images", str(tmp_path), "--out", str(out)]
    with pytest.raises(SystemExit, match=r"SD v1.4's 7 value layers.*has 4 of sizes"):
        job.main([*argv, "--methods", "none", "nemo-c:published"])
    assert not out.exists()
