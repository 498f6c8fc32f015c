"""NeMo-C aggregation and method parsing, on hand-made tables."""

from __future__ import annotations

import pandas as pd
import pytest

from scanner.mitigation.nemo_c import (
    Method,
    localization_tables,
    method_neurons,
    parse_method,
    union_per_cluster,
)
from scanner.mitigation.search import NeuronSearchResult
from scanner.mitigation.signal import PromptLocalization

# Prompts 1, 2, 3 form cluster 0; 4, 5 cluster 1; 6 is alone in cluster 2.
# Prompt 3 was not memorized (no neurons), nor were 5 and 6; (0, 7) is shared by 1 and 2.
NEURONS = {1: [(0, 7), (2, 1)], 2: [(0, 7), (1, 4)], 4: [(3, 0)]}
CLUSTER_OF = {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 2}


def neuron_sets(neurons=NEURONS) -> pd.DataFrame:
    rows = [(pid, layer, ch) for pid, ns in neurons.items() for layer, ch in ns]
    return pd.DataFrame(rows, columns=["prompt_id", "layer", "channel"]).astype(
        {"prompt_id": "int64", "layer": "int32", "channel": "int32"}
    )


def clusters() -> pd.DataFrame:
    return pd.DataFrame(
        {"prompt_id": list(CLUSTER_OF), "cluster_id": list(CLUSTER_OF.values()), "prompt": "p"}
    )


def test_union_per_cluster_by_hand():
    union = union_per_cluster(neuron_sets(), clusters())
    assert list(union.itertuples(index=False, name=None)) == [
        (0, 0, 7),  # shared by prompts 1 and 2: once
        (0, 1, 4),
        (0, 2, 1),
        (1, 3, 0),
    ]  # cluster 2 has no neurons: no rows
    assert union.dtypes.astype(str).tolist() == ["int64", "int32", "int32"]


def test_union_refuses_prompts_without_a_cluster():
    orphan = neuron_sets({**NEURONS, 99: [(0, 0)]})
    with pytest.raises(ValueError, match=r"prompts without a cluster: \[99\]"):
        union_per_cluster(orphan, clusters())


@pytest.mark.parametrize(
    ("method", "expected", "alpha"),
    [
        ("none", [set(), set(), set(), set()], 1.0),
        ("nemo", [{(0, 7), (1, 4)}, set(), set(), set()], 0.0),
        (
            "nemo-c",
            [{(0, 7), (2, 1), (1, 4)}, {(0, 7), (2, 1), (1, 4)}, {(3, 0)}, set()],
            0.0,
        ),
        (
            "nemo-c:alpha=0.1",
            [{(0, 7), (2, 1), (1, 4)}, {(0, 7), (2, 1), (1, 4)}, {(3, 0)}, set()],
            0.1,
        ),
        ("nemo:alpha=0.2", [{(0, 7), (1, 4)}, set(), set(), set()], 0.2),
    ],
)
def test_method_neurons_per_prompt(method, expected, alpha):
    """Prompts asked for out of order: 2, 3 (memorized nowhere), 5 (cluster mate of 4), 6."""
    sets, got_alpha = method_neurons(method, [2, 3, 5, 6], neuron_sets(), clusters())
    assert [set(s) for s in sets] == expected
    assert all(isinstance(s, frozenset) for s in sets)
    assert got_alpha == alpha


def test_nemo_c_needs_clusters_covering_the_prompts():
    with pytest.raises(ValueError, match="needs the clusters table"):
        method_neurons("nemo-c", [1], neuron_sets())
    with pytest.raises(ValueError, match=r"prompts without a cluster: \[42\]"):
        method_neurons("nemo-c", [1, 42], neuron_sets(), clusters())


@pytest.mark.parametrize(
    ("name", "method", "canonical"),
    [
        ("none", Method("none", 1.0), "none"),
        ("nemo", Method("nemo", 0.0), "nemo"),
        ("nemo-c", Method("nemo-c", 0.0), "nemo-c"),
        ("nemo-c:alpha=0.1", Method("nemo-c", 0.1), "nemo-c:alpha=0.1"),
        ("nemo-c:alpha=0.20", Method("nemo-c", 0.2), "nemo-c:alpha=0.2"),
        ("nemo-c:alpha=0", Method("nemo-c", 0.0), "nemo-c"),
        ("nemo:alpha=1", Method("nemo", 1.0), "nemo:alpha=1"),
        ("nemo-c:published", Method("nemo-c", 0.0, True), "nemo-c:published"),
        ("nemo:published", Method("nemo", 0.0, True), "nemo:published"),
        (
            "nemo-c:published:alpha=0.10",
            Method("nemo-c", 0.1, True),
            "nemo-c:published:alpha=0.1",
        ),
    ],
)
def test_parse_method(name, method, canonical):
    assert parse_method(name) == method
    assert parse_method(name).name == canonical
    assert parse_method(canonical) == method  # the stored name reads back as the same method


def test_only_localized_methods_need_localization():
    needs = {m: parse_method(m).needs_localization for m in ("none", "nemo", "nemo-c:alpha=0.1")}
    assert needs == {"none": False, "nemo": True, "nemo-c:alpha=0.1": True}
    assert not parse_method("nemo-c:published").needs_localization
    assert not parse_method("nemo:published:alpha=0.2").needs_localization


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nemoc", "unknown method 'nemoc'; valid forms: none, nemo, nemo-c"),
        ("wanda", "unknown method 'wanda'"),
        ("nemo-c:beta=0.1", "unknown method"),
        ("nemo-c:alpha=", "unknown method"),
        ("nemo-c:alpha=x", "alpha 'x' is not a number"),
        ("nemo-c:alpha=1.5", r"alpha must be in \[0, 1\], got 1.5"),
        ("nemo-c:alpha=nan", r"alpha must be in \[0, 1\]"),
        ("none:alpha=0.1", "no :published, no alpha"),
        ("none:published", "no :published, no alpha"),
        ("nemo-c:alpha=0.1:published", "unknown method"),  # options in one order only
        ("nemo-c:publish", "unknown method"),
    ],
)
def test_parse_method_rejects(name, message):
    with pytest.raises(ValueError, match=message):
        parse_method(name)


def test_neuron_sets_are_validated():
    with pytest.raises(ValueError, match=r"\(1, 0, 7\) repeats"):
        method_neurons("nemo", [1], pd.concat([neuron_sets(), neuron_sets().iloc[[0]]]))
    with pytest.raises(TypeError, match="neuron_sets.channel must hold integers"):
        method_neurons("nemo", [1], neuron_sets().astype({"channel": float}))
    with pytest.raises(ValueError, match="lacks columns"):
        union_per_cluster(neuron_sets().drop(columns="layer"), clusters())
    with pytest.raises(ValueError, match="one row per prompt_id"):
        union_per_cluster(neuron_sets(), pd.concat([clusters(), clusters().iloc[[0]]]))


def _search(refined) -> NeuronSearchResult:
    return NeuronSearchResult(
        initial=frozenset(refined) | {(6, 6)},
        refined=frozenset(refined),
        theta=4.0,
        k=4,
        success=True,
        initial_score=0.3,
        refined_score=0.4,
        score_calls=9,
        trace=(),
    )


def test_localization_tables_from_localize_prompt_results():
    results = {
        7: PromptLocalization(True, (0.5, 0.2), _search({(1, 3), (0, 9)}), unet_calls=10),
        8: PromptLocalization(False, (0.1, 0.1), None, unet_calls=1),
        9: PromptLocalization(True, (0.6, 0.6), _search(set()), unet_calls=12),
    }
    neurons, localized = localization_tables(results)
    assert list(neurons.itertuples(index=False, name=None)) == [(7, 0, 9), (7, 1, 3)]
    assert neurons.dtypes.astype(str).tolist() == ["int64", "int32", "int32"]
    assert list(localized.itertuples(index=False, name=None)) == [
        (7, True, 10),
        (8, False, 1),
        (9, True, 12),
    ]
    assert localized.dtypes.astype(str).tolist() == ["int64", "bool", "int64"]
    # the table round-trips into the aggregation
    sets, _ = method_neurons("nemo", [9, 7], neurons)
    assert sets == [frozenset(), frozenset({(0, 9), (1, 3)})]
