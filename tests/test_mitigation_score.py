"""The paper's Table 2 mitigation score on hand-made label tables."""

from __future__ import annotations

import itertools
import json

import pandas as pd
import pytest

from scanner.mitigation.score import LABELS, mitigation_score

# The FB-Mem paper's Table 2, typed again from the paper (from, to) -> score.
PAPER_TABLE = {
    ("VM", "FM"): 0.5,
    ("VM", "BM"): 1.5,
    ("VM", "NM"): 2.0,
    ("FM", "VM"): -0.5,
    ("FM", "BM"): 1.0,
    ("FM", "NM"): 1.5,
    ("BM", "VM"): -1.5,
    ("BM", "FM"): -0.5,
    ("BM", "NM"): 0.5,
    ("NM", "VM"): -2.0,
    ("NM", "FM"): -1.5,
    ("NM", "BM"): -0.5,
    **{(label, label): 0.0 for label in LABELS},
}


def labels(rows, **extra):
    """A labels table from (prompt_id, gen_idx, label) rows."""
    table = pd.DataFrame(rows, columns=["prompt_id", "gen_idx", "label"])
    for name, value in extra.items():
        table[name] = value
    return table


@pytest.mark.parametrize(("src", "dst"), list(itertools.product(LABELS, LABELS)))
def test_each_transition_scores_as_in_the_paper(src, dst):
    result = mitigation_score(labels([(7, 0, src)]), labels([(7, 0, dst)]))
    assert result.score == PAPER_TABLE[(src, dst)]
    assert result.n == 1
    counts = [[0] * 4 for _ in range(4)]
    counts[LABELS.index(src)][LABELS.index(dst)] = 1
    assert result.transitions == tuple(map(tuple, counts))


def test_all_sixteen_transitions_at_once():
    pairs = list(itertools.product(LABELS, LABELS))
    pre = labels([(i, 0, src) for i, (src, _) in enumerate(pairs)])
    post = labels([(i, 0, dst) for i, (_, dst) in enumerate(pairs)])
    result = mitigation_score(pre, post)
    # Row sums of Table 2: VM 4.0, FM 2.0, BM -1.5, NM -4.0; total 0.5 over 16 generations.
    assert result.score == pytest.approx(0.5 / 16)
    assert result.transitions == ((1, 1, 1, 1),) * 4


def test_generations_are_matched_by_key_not_by_row_order():
    # 3 x VM->NM (+2), 2 x FM->BM (+1), 1 x NM->VM (-2), 4 x BM->BM (0): 6 / 10.
    pre_rows = (
        [(1, g, "VM") for g in range(3)]
        + [(2, g, "FM") for g in range(2)]
        + [(3, 0, "NM")]
        + [(4, g, "BM") for g in range(4)]
    )
    post_rows = (
        [(4, g, "BM") for g in reversed(range(4))]
        + [(3, 0, "VM")]
        + [(2, g, "BM") for g in range(2)]
        + [(1, g, "NM") for g in range(3)]
    )
    result = mitigation_score(labels(pre_rows, method="none"), labels(post_rows, method="nemo"))
    assert result.score == pytest.approx(0.6)
    assert result.n == 10
    assert result.transitions == ((0, 0, 0, 3), (0, 0, 2, 0), (0, 0, 4, 0), (1, 0, 0, 0))


def test_unmatched_generations_are_an_error_listing_them():
    pre = labels([(1, 0, "VM"), (1, 1, "VM"), (2, 0, "FM")])
    post = labels([(1, 0, "NM"), (3, 4, "NM")])
    with pytest.raises(ValueError) as error:
        mitigation_score(pre, post)
    message = str(error.value)
    assert "2: (1, 1), (2, 0) only in pre" in message
    assert "1: (3, 4) only in post" in message


def test_allow_unmatched_scores_the_matched_and_reports_the_rest():
    pre = labels([(1, 0, "VM"), (1, 1, "VM"), (2, 0, "FM")])
    post = labels([(1, 0, "NM"), (3, 4, "NM")])
    result = mitigation_score(pre, post, allow_unmatched=True)
    assert (result.score, result.n) == (2.0, 1)
    assert result.unmatched_pre == ((1, 1), (2, 0))
    assert result.unmatched_post == ((3, 4),)
    as_json = json.loads(json.dumps(result.to_dict()))
    assert as_json["transitions"]["VM"] == {"VM": 0, "FM": 0, "BM": 0, "NM": 1}
    assert as_json["unmatched_pre"] == [[1, 1], [2, 0]]


def test_nothing_matched_is_an_error():
    with pytest.raises(ValueError, match="nothing to score"):
        mitigation_score(labels([(1, 0, "VM")]), labels([(2, 0, "VM")]), allow_unmatched=True)


@pytest.mark.parametrize("bad", ["XM", "vm", None, 3])
def test_unknown_labels_are_rejected(bad):
    pre = labels([(1, 0, "VM"), (1, 1, bad)])
    with pytest.raises(ValueError, match=r"pre: labels must be one of \['VM', 'FM', 'BM', 'NM'\]"):
        mitigation_score(pre, labels([(1, 0, "VM"), (1, 1, "VM")]))


def test_duplicate_keys_are_rejected_with_a_hint_about_methods():
    post = labels([(1, 0, "VM"), (1, 0, "NM")], method=["nemo", "nemo-c"])
    with pytest.raises(ValueError, match=r"post: .* repeated: 1: \(1, 0\) \(filter to one method"):
        mitigation_score(labels([(1, 0, "VM")]), post)


def test_missing_columns_and_non_integer_keys_are_rejected():
    with pytest.raises(ValueError, match=r"pre: missing columns \['gen_idx'\]"):
        mitigation_score(pd.DataFrame({"prompt_id": [1], "label": ["VM"]}), labels([(1, 0, "VM")]))
    with pytest.raises(ValueError, match="'gen_idx' must hold integers"):
        mitigation_score(labels([(1, 0.5, "VM")]), labels([(1, 0, "VM")]))
    with pytest.raises(TypeError, match="DataFrame"):
        mitigation_score([(1, 0, "VM")], labels([(1, 0, "VM")]))
