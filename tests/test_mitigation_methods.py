"""The mitigation-method registry: names, the job's options and items, the generate stage's
dispatch, and a new method added with one class and one registry line."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from scanner.mitigation.base import MitigationMethod
from scanner.mitigation.detectmem import DetectMem
from scanner.mitigation.methods import REGISTRY, get_method
from scanner.mitigation.nemo_c import parse_method
from scanner.mitigation.scaling import ActivationScaling
from scanner.mitigation.wanda import Wanda

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def job():
    spec = importlib.util.spec_from_file_location("mitigate_job_m", ROOT / "jobs" / "mitigate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.parametrize(
    ("name", "kind", "localizes"),
    [
        ("none", "none", False),
        ("nemo", "activation-scaling", True),
        (" nemo-c:alpha=0.10 ", "activation-scaling", True),
        ("nemo-c:published:alpha=0.2", "activation-scaling", False),
        ("nemo:published", "activation-scaling", False),
    ],
)
def test_scaling_names_keep_their_reading(name, kind, localizes):
    method = get_method(name)
    assert isinstance(method, ActivationScaling) and method.kind == kind
    assert method.name == parse_method(name).name  # the same canonical spelling as before
    assert method.needs_localization == localizes and not method.prepares


def test_baselines_are_registered_with_their_kinds():
    wanda, detectmem = get_method("wanda"), get_method(" detectmem ")
    assert isinstance(wanda, Wanda) and wanda.kind == "weight-editing" and wanda.prepares
    assert isinstance(detectmem, DetectMem) and detectmem.kind == "prompt-optimization"
    assert not detectmem.prepares and not detectmem.needs_localization
    assert (wanda.name, detectmem.name) == ("wanda", "detectmem")
    sets, alpha = wanda.prompt_neurons([3, 4], ["a", "b"], None, None)
    assert sets == [frozenset(), frozenset()] and alpha == 1.0  # no neurons to scale


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("nemo-x", ValueError, r"unknown method 'nemo-x'; valid forms: none, .*wanda, detectmem"),
        ("wanda:alpha=0.1", ValueError, "wanda takes no options"),
        ("detectmem:fast", ValueError, "detectmem takes no options"),
        ("nemo:alpha=2", ValueError, r"alpha must be in \[0, 1\]"),
        (3, TypeError, "method must be a string"),
    ],
)
def test_bad_names_are_refused(name, error, message):
    with pytest.raises(error, match=message):
        get_method(name)


# --- the job's options and items -----------------------------------------------------------


def test_options_from_yaml_section_and_flags(job, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        "model: /models/sd\nreference: refstore\nout: scans/x\n"
        "mitigation:\n  methods: [none, wanda, detectmem]\n  k: 5\n"
    )
    scan, _, options = job.parse_args(["--config", str(config)])
    assert scan["out"] == "scans/x" and scan["model"] == "/models/sd"
    assert options.methods == ("none", "wanda", "detectmem") and options.k == 5
    flags = ["--config", str(config), "--methods", "none", "nemo-c:alpha=0.1", "--out", "o"]
    scan, _, options = job.parse_args(flags)
    assert options.methods == ("none", "nemo-c:alpha=0.1") and options.k == 5  # flag wins
    assert scan["out"] == "o"
    assert job.parse_args(["--demo", "tiny-sd"])[2] == job.MitigationOptions()  # defaults


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"methods": ["wanda"]}, "methods must include none"),
        ({"methods": ["none", "wanda", "wanda"]}, "methods repeat"),
        ({"methods": "none"}, "must be a list of method names"),
        ({"methods": ["none", "prune"]}, "unknown method 'prune'"),
        ({"methodz": ["none"]}, r"unknown mitigation keys \['methodz'\]"),
    ],
)
def test_bad_options_are_refused_before_anything_runs(job, values, message):
    with pytest.raises(ValueError, match=message):
        job.mitigation_options(values)


def test_cli_errors_are_usage_errors(job, capsys):
    from scanner import exits

    argv = ["--demo", "tiny-sd", "--methods", "none", "prune"]
    assert exits.run("mitigate.py", job.main, argv) == exits.USAGE
    assert "mitigate.py: error: unknown method 'prune'" in capsys.readouterr().err


def test_baseline_items_carry_no_neurons_and_the_same_seeds(job):
    prompts = pd.DataFrame(
        {"prompt_id": np.array([4, 9], dtype=np.int64), "prompt": ["a", "b"], "error": ["", ""]}
    )
    options = job.MitigationOptions(methods=("none", "wanda", "detectmem"))
    config = SimpleNamespace(n_per_prompt=2, seed=3, shard_size=8)
    empty = job.localize(None, prompts, None, options)  # nothing localizes: no tables needed
    items = pd.concat(part for _, part in job.method_items(prompts, None, empty, config, options))
    assert items.groupby("method").size().to_dict() == {"detectmem": 4, "none": 4, "wanda": 4}
    assert set(items["neurons"]) == {""} and set(items["alpha"]) == {1.0}
    assert "4:1@wanda" in set(items["item_id"]) and "9:0@detectmem" in set(items["item_id"])
    by_method = {m: g["seed"].tolist() for m, g in items.groupby("method")}
    assert by_method["wanda"] == by_method["none"] == by_method["detectmem"]


# --- one class and one registry line: a new method, end to end through the generate stage ----


class Inverted(MitigationMethod):
    """A toy method: the model's image, inverted; it prepares a constant to add."""

    kind = "weight-editing"
    prepares = True
    name = "inverted"

    @classmethod
    def from_name(cls, name: str) -> Inverted:
        return cls()

    def prepare(self, generator, prompts, prompt_ids):
        return {"offset": np.array([0.0], dtype=np.float32)}

    def generate(self, generator, rows, state):
        images = generator(rows.prompts, rows.prompt_ids, rows.gen_idxs)
        return 1.0 - images + state["offset"][0]


@pytest.fixture(scope="module")
def stage(tiny_sd_dir, tmp_path_factory):
    from scanner.generate import GenerationConfig
    from scanner.stages import Generate
    from scanner.tiny_sd import TINY_SIZE

    state = tmp_path_factory.mktemp("states") / "inverted.npz"
    np.savez(state, offset=np.array([0.0], dtype=np.float32))
    config = GenerationConfig(model=str(tiny_sd_dir), steps=2, size=TINY_SIZE, batch_size=2)
    return Generate(config, out_size=TINY_SIZE, method_states={"inverted": str(state)})


def test_a_new_method_is_one_class_and_one_registry_line(stage, job, monkeypatch, one_thread):
    monkeypatch.setitem(REGISTRY, "inverted", Inverted.from_name)  # the one line
    assert job.mitigation_options({"methods": ["none", "inverted"]}).methods == (
        "none",
        "inverted",
    )
    batch = {
        "prompt": np.array(["a red car", "a red car", "a cat", "a cat"], dtype=object),
        "prompt_id": np.array([0, 0, 1, 1]),
        "gen_idx": np.array([0, 0, 0, 0]),
        "method": np.array(["none", "inverted", "inverted", "nemo"], dtype=object),
        "neurons": np.array(["", "", "", json.dumps([[0, 1], [0, 2]])], dtype=object),
        "error": np.array(["", "", "", ""], dtype=object),
    }
    out = stage(batch)
    assert (out["error"] == "").all()
    plain = out["image"][0].astype(int)
    assert np.abs(out["image"][1].astype(int) - (255 - plain)).max() <= 1  # inverted, same seed
    # rows of other methods are untouched by it: the NeMo row scales its own neurons only
    alone = stage({k: v[3:] for k, v in batch.items()})
    assert np.array_equal(alone["image"][0], out["image"][3])


def test_a_failing_method_errors_its_own_rows_only(stage, monkeypatch, one_thread):
    class Broken(Inverted):
        def generate(self, generator, rows, state):
            raise ValueError("out of ideas")

    monkeypatch.setitem(REGISTRY, "inverted", Broken.from_name)
    batch = {
        "prompt": np.array(["a red car", "a cat"], dtype=object),
        "prompt_id": np.array([0, 1]),
        "gen_idx": np.array([0, 0]),
        "method": np.array(["inverted", "none"], dtype=object),
        "neurons": np.array(["", ""], dtype=object),
        "error": np.array(["", ""], dtype=object),
    }
    out = stage(batch)
    assert json.loads(out["error"][0])["message"] == "out of ideas"
    assert out["error"][1] == "" and out["image"][1].std() > 0
