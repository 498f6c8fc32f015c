"""The FB-Mem authors' published neuron sets: shipped files, caption join, layer checks.

Oracles: the shipped npz re-read with numpy directly, facts read by eye from the authors'
release (quoted where used), and, when the release itself is on disk, every value of it.
"""

from __future__ import annotations

import json
import re
import warnings
from importlib.resources import files
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scanner.mitigation.nemo_c import method_neurons
from scanner.mitigation.published import (
    PublishedCoverageWarning,
    check_layers,
    check_model,
    lookup_published,
    normalize_caption,
)

DATA = files("scanner") / "data"
SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "fbmem-reference"
SD_V1_4_SIZES = (320, 320, 640, 640, 1280, 1280, 1280)
PODCAST = "The No Limits Business Woman Podcast"  # row 0: cluster 7, refined [[221], [], ...]
INTERVIEW = "Sony Won't Release <i>The Interview</i> on VOD"  # cluster 11: no union released


@pytest.fixture(scope="module")
def shipped():
    with np.load(str(DATA / "fbmem_neurons_sd_v1_4.npz"), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    prompts = pd.read_csv(str(DATA / "fbmem_prompts_sd_v1_4.csv"), sep=";", keep_default_na=False)
    return arrays, prompts


def union_of(arrays, cluster) -> set[tuple[int, int]]:
    keep = arrays["union_cluster"] == cluster
    return set(zip(arrays["union_layer"][keep].tolist(), arrays["union_channel"][keep].tolist()))


def test_shipped_files_are_plain_arrays_and_the_500_prompts(shipped):
    arrays, prompts = shipped
    assert all(a.dtype.kind in "iuf" for a in arrays.values())  # no object arrays, no pickle
    assert tuple(arrays["layer_sizes"]) == SD_V1_4_SIZES
    assert len(prompts) == 500 and prompts["cluster"].between(0, 11).all()
    assert sorted(set(arrays["union_cluster"].tolist())) == list(range(10))  # none for 10, 11
    assert len(arrays["localized_row"]) == 251
    # the NeMo type column is the bundled memorized set's, row for row
    bundled = pd.read_csv(
        str(DATA / "memorized_laion_prompts.csv"), sep=";", index_col=0, keep_default_na=False
    )
    assert prompts["caption"].tolist() == bundled["Caption"].tolist()
    assert prompts["type"].tolist() == bundled["type"].tolist()


def test_lookup_gives_the_clusters_union_as_the_npz_holds_it(shipped):
    arrays, prompts = shipped
    rows = [0, 3, 100, 499]
    sets, table = lookup_published(prompts["caption"].iloc[rows].tolist(), "nemo-c")
    for row, got, (cluster, status, count) in zip(rows, sets, table.itertuples(index=False)):
        expected_cluster = int(prompts["cluster"].iat[row])
        assert cluster == expected_cluster
        if expected_cluster < 10:
            assert status == "published" and got == union_of(arrays, expected_cluster)
            assert count == len(got) > 0
        else:
            assert status == "no-set" and got == frozenset() and count == 0
    assert list(table.columns) == ["authors_cluster", "status", "neurons"]


def test_nemo_published_is_the_prompts_own_refined_set():
    sets, table = lookup_published([PODCAST, INTERVIEW], "nemo")
    assert sets[0] == {(0, 221)}  # release: "Refined Neurons" [[221], [], [], [], [], [], []]
    # release: [[25, 267], [], [], [105], [364], [], []]
    assert sets[1] == {(0, 25), (0, 267), (3, 105), (4, 364)}
    assert table["status"].tolist() == ["published", "published"]


def test_prompts_join_by_caption_ignoring_whitespace_runs_and_case():
    variants = [PODCAST, "  the no limits   BUSINESS woman\tpodcast ", "The No Limits Podcast"]
    sets, table = lookup_published(variants, "nemo-c")
    assert sets[0] == sets[1] and len(sets[0]) == 613  # cluster 7's union
    assert table["authors_cluster"].tolist() == [7, 7, -1]
    assert table["status"].tolist() == ["published", "published", "unknown-prompt"]
    assert sets[2] == frozenset() and table["neurons"].tolist() == [613, 613, 0]
    # a caption stored with a double space matches its single-spaced spelling
    assert lookup_published(["Blue Guitar - Throw Pillow"], "nemo-c")[1]["status"][0] != (
        "unknown-prompt"
    )
    assert normalize_caption(" A  b\nC ") == "a b c"
    with pytest.raises(TypeError, match="strings"):
        lookup_published([None], "nemo-c")
    with pytest.raises(ValueError, match="'nemo' and 'nemo-c'"):
        lookup_published([PODCAST], "wanda")


def test_method_neurons_published_warns_with_the_count_left_unmitigated():
    with pytest.warns(PublishedCoverageWarning) as caught:
        sets, alpha = method_neurons(
            "nemo-c:published:alpha=0.1",
            [5, 6, 7],
            None,
            prompts=[PODCAST, INTERVIEW, "a photo of a cat"],
        )
    assert alpha == 0.1 and [len(s) for s in sets] == [613, 0, 0]
    (line,) = [str(w.message) for w in caught]
    assert line.startswith("nemo-c:published:alpha=0.1: 2 of 3 prompts get no published")
    assert "1 not among" in line and "1 among them without a published set" in line
    assert caught[0].filename == __file__  # points at the caller, not the library

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every prompt covered: no warning
        method_neurons("nemo:published", [1], None, prompts=[PODCAST])
    with pytest.raises(ValueError, match="pass the prompts' text"):
        method_neurons("nemo-c:published", [1], None)
    with pytest.raises(ValueError, match="one text per prompt id"):
        method_neurons("nemo-c:published", [1, 2], None, prompts=[PODCAST])
    with pytest.raises(ValueError, match="needs the neuron_sets"):
        method_neurons("nemo-c", [1], None)


def test_published_sets_fit_sd_v1_layers_built_on_meta(shipped):
    from scanner.neurons import neuron_mask_to_scales, value_layers
    from scanner.tiny_sd import sd_v1_unet_on_meta

    layers = value_layers(sd_v1_unet_on_meta())
    check_layers(layers)
    _, prompts = shipped
    sets, _ = lookup_published(prompts["caption"].tolist(), "nemo-c")
    scales = neuron_mask_to_scales(sets, layers, 0.0)  # raises on any channel out of range
    zeros = {(layer, int(c)) for layer, s in scales.items() for c in np.flatnonzero(s[0] == 0)}
    assert zeros == set(sets[0])  # sample 0 (cluster 7): exactly its union is scaled


def test_a_model_with_other_layers_is_refused(tiny_sd_dir, tmp_path):
    from scanner.tiny_sd import sd_v1_unet_on_meta

    with pytest.raises(ValueError, match=r"SD v1.4's 7 value layers.*has 4 of sizes \(32, 64"):
        check_model(str(tiny_sd_dir))
    sd_v1_unet_on_meta().save_config(tmp_path / "unet")  # SD v1's UNet config, no weights
    check_model(str(tmp_path))
    with pytest.raises(ValueError, match="cannot read its UNet config"):
        check_model(str(tmp_path / "missing"))


@pytest.mark.skipif(not SOURCE.is_dir(), reason="the authors' release is not on disk")
def test_shipped_values_equal_the_authors_release(shipped):
    arrays, prompts = shipped
    source = pd.read_csv(SOURCE / "memorized_prompts_clusters.csv", sep=";", keep_default_na=False)
    assert prompts["caption"].tolist() == source["Caption"].tolist()
    assert prompts["cluster"].tolist() == source["cluster"].tolist()
    for cluster in range(10):
        with np.load(SOURCE / "neurons_cluster" / f"neurons_cluster_{cluster}.npz") as npz:
            expected = {(layer, int(c)) for layer in range(7) for c in npz[f"arr_{layer}"]}
        assert union_of(arrays, cluster) == expected
    per_prompt = pd.read_csv(SOURCE / "nemo_neurons_per_prompt.csv", sep=";", keep_default_na=False)
    sets, table = lookup_published(per_prompt["Caption"].tolist(), "nemo")
    assert (table["status"] == "published").all()
    for got, text in zip(sets, per_prompt["Refined Neurons"]):
        layers = re.findall(r"\[([^\[\]]*)\]", text)  # "[[1, 2], [], ...]" -> per-layer lists
        assert got == {
            (i, int(c)) for i, part in enumerate(layers) for c in re.findall(r"\d+", part)
        }
    localized_captions = prompts["caption"].iloc[arrays["localized_row"]].tolist()
    assert localized_captions == per_prompt["Caption"].tolist()
    assert np.allclose(arrays["refined_ssim"], per_prompt["Refined SSIM"], rtol=1e-6)
    assert json.loads(per_prompt["Refined Neurons"][0]) == [[221], [], [], [], [], [], []]
