"""Driver aggregation on hand-made label tables, with every expected count worked out by hand."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from scanner.analysis import (
    cluster_counts,
    cluster_one_to_many,
    distribution,
    one_to_many,
    summarize,
    top_references,
)
from scanner.store import ShardedTables

N = 5

# (method, prompt_id, [(label, ref_id) per generation])
RUNS = [
    # 5 memorized generations matching 3 distinct refs: category 3 (VM 3, FM 1, BM 1)
    ("none", 1, [("VM", "r1"), ("VM", "r1"), ("FM", "r2"), ("BM", "r3"), ("VM", "r2")]),
    # NM rows carry their best candidate but must not count: category 1 (VM 2)
    ("none", 2, [("VM", "ra"), ("VM", "ra"), ("NM", "r7"), ("NM", "r8"), ("NM", "r9")]),
    # nothing memorized: in no category
    ("none", 3, [("NM", "r1"), ("NM", "r2"), ("NM", "r3"), ("NM", "r4"), ("NM", "r5")]),
    # category 2 (FM 1, BM 1)
    ("none", 4, [("FM", "r4"), ("BM", "r5"), ("NM", "r1"), ("NM", "r1"), ("NM", "r2")]),
    ("nemo_c", 1, [("BM", "r1"), ("NM", "r1"), ("NM", "r1"), ("NM", "r2"), ("NM", "r3")]),
    ("nemo_c", 2, [("NM", "ra")] * 5),
]
CLUSTERS = {1: 0, 2: 0, 3: 1, 4: 1}


def label_rows() -> list[dict]:
    rows = []
    for method, prompt, gens in RUNS:
        for g, (label, ref) in enumerate(gens):
            suffix = "" if method == "none" else f"@{method}"
            rows.append(
                {
                    "gen_id": f"{prompt}:{g}{suffix}",
                    "prompt_id": prompt,
                    "gen_idx": g,
                    "method": method,
                    "label": label,
                    "ref_id": ref,
                    "m_full": 0.9 if label == "VM" else 0.5,
                    "m_fg": 0.85 if label == "FM" else 0.4,
                    "m_bg": 0.82 if label == "BM" else 0.3,
                }
            )
    return rows


@pytest.fixture
def labels() -> pd.DataFrame:
    return pd.DataFrame(label_rows())


@pytest.fixture
def prompts() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt_id": list(CLUSTERS),
            "prompt": ["a", "b", "c", "d"],
            "cluster_id": list(CLUSTERS.values()),
        }
    )


def test_distribution_counts_and_shares(labels):
    dist = distribution(labels)
    assert list(dist.index) == ["none", "nemo_c"]  # baseline first
    assert dist.loc["none", ["VM", "FM", "BM", "NM", "total"]].tolist() == [5, 2, 2, 11, 20]
    assert dist.loc["nemo_c", ["VM", "FM", "BM", "NM", "total"]].tolist() == [0, 0, 1, 9, 10]
    assert dist.loc["none", "share_VM"] == pytest.approx(5 / 20)
    assert dist.loc["nemo_c", "share_NM"] == pytest.approx(0.9)
    assert dist.loc["nemo_c", "share_FM"] == 0.0  # absent labels are still columns


def test_one_to_many_matches_hand_counts(labels):
    table = one_to_many(labels, N).set_index(["method", "distinct_refs"])
    cols = ["prompts", "VM", "FM", "BM", "generations"]
    assert table.loc[("none", 1), cols].tolist() == [1, 2, 0, 0, 2]
    assert table.loc[("none", 2), cols].tolist() == [1, 0, 1, 1, 2]
    assert table.loc[("none", 3), cols].tolist() == [1, 3, 1, 1, 5]
    assert table.loc[("none", 4), cols].tolist() == [0, 0, 0, 0, 0]
    assert table.loc[("none", 5), cols].tolist() == [0, 0, 0, 0, 0]
    assert table.loc[("nemo_c", 1), cols].tolist() == [1, 0, 0, 1, 1]
    # every method has all categories 1..N, even with nothing memorized in them
    assert len(table) == 2 * N
    # prompt 3 (only NM) is in no category: 3 of the 4 baseline prompts are counted
    assert table.loc["none", "prompts"].sum() == 3


def test_one_to_many_counting_nm_as_the_authors_script(labels):
    """Per prompt, distinct refs over all 5 generations (RUNS above, counted by hand):
    none: p1 {r1, r2, r3} -> 3; p2 {ra, r7, r8, r9} -> 4; p3 {r1..r5} -> 5; p4 {r4, r5, r1, r2}
    -> 4. nemo_c: p1 {r1, r2, r3} -> 3; p2 {ra} -> 1."""
    table = one_to_many(labels, N, count_nm=True).set_index(["method", "distinct_refs"])
    cols = ["prompts", "VM", "FM", "BM", "NM", "generations"]
    assert table.loc[("none", 1), cols].tolist() == [0, 0, 0, 0, 0, 0]
    assert table.loc[("none", 2), cols].tolist() == [0, 0, 0, 0, 0, 0]
    assert table.loc[("none", 3), cols].tolist() == [1, 3, 1, 1, 0, 5]
    assert table.loc[("none", 4), cols].tolist() == [2, 2, 1, 1, 6, 10]
    assert table.loc[("none", 5), cols].tolist() == [1, 0, 0, 0, 5, 5]
    assert table.loc[("nemo_c", 1), cols].tolist() == [1, 0, 0, 0, 5, 5]
    assert table.loc[("nemo_c", 3), cols].tolist() == [1, 0, 0, 1, 4, 5]
    assert table.loc["none", "prompts"].sum() == 4  # every prompt has a category now
    assert "NM" not in one_to_many(labels, N).columns  # the paper's default counts no NM


def test_one_to_many_counting_nm_skips_nm_generations_without_a_match(labels):
    labels.loc[(labels["prompt_id"] == 3) & (labels["method"] == "none"), "ref_id"] = [
        None,
        "r2",
        "r3",
        "r4",
        "r5",
    ]
    table = one_to_many(labels, N, count_nm=True).set_index(["method", "distinct_refs"])
    assert table.loc[("none", 5), "prompts"] == 0
    assert table.loc[("none", 4), ["prompts", "NM"]].tolist() == [3, 6 + 4]


def test_one_to_many_rejects_n_below_generations_per_prompt(labels):
    with pytest.raises(ValueError, match="n must be at least"):
        one_to_many(labels, 4)
    with pytest.raises(ValueError, match="positive integer"):
        one_to_many(labels, 0)


def test_one_to_many_rejects_memorized_without_reference(labels):
    labels.loc[0, "ref_id"] = None
    with pytest.raises(ValueError, match="without a ref_id"):
        one_to_many(labels, N)


def test_unknown_label_is_rejected(labels):
    labels.loc[3, "label"] = "TM"
    with pytest.raises(ValueError, match="TM"):
        distribution(labels)


def test_cluster_counts(labels, prompts):
    table = cluster_counts(labels, prompts).set_index(["method", "cluster_id"])
    cols = ["prompts", "VM", "FM", "BM", "NM", "total"]
    assert table.loc[("none", 0), cols].tolist() == [2, 5, 1, 1, 3, 10]
    assert table.loc[("none", 1), cols].tolist() == [2, 0, 1, 1, 8, 10]
    assert table.loc[("nemo_c", 0), cols].tolist() == [2, 0, 0, 1, 9, 10]
    assert table.loc[("none", 0), "memorized_share"] == pytest.approx(0.7)
    assert ("nemo_c", 1) not in table.index


def test_cluster_one_to_many(labels, prompts):
    table = cluster_one_to_many(labels, prompts, N).set_index(
        ["method", "cluster_id", "distinct_refs"]
    )
    cols = ["prompts", "VM", "FM", "BM"]
    assert table.loc[("none", 0, 1), cols].tolist() == [1, 2, 0, 0]
    assert table.loc[("none", 0, 3), cols].tolist() == [1, 3, 1, 1]
    assert table.loc[("none", 1, 2), cols].tolist() == [1, 0, 1, 1]
    assert table.loc[("none", 1, 3), cols].tolist() == [0, 0, 0, 0]


def test_cluster_one_to_many_counting_nm(labels, prompts):
    table = cluster_one_to_many(labels, prompts, N, count_nm=True).set_index(
        ["method", "cluster_id", "distinct_refs"]
    )
    cols = ["prompts", "VM", "FM", "BM", "NM"]
    assert table.loc[("none", 0, 3), cols].tolist() == [1, 3, 1, 1, 0]  # prompt 1
    assert table.loc[("none", 0, 4), cols].tolist() == [1, 2, 0, 0, 3]  # prompt 2
    assert table.loc[("none", 1, 4), cols].tolist() == [1, 0, 1, 1, 3]  # prompt 4
    assert table.loc[("none", 1, 5), cols].tolist() == [1, 0, 0, 0, 5]  # prompt 3


def test_cluster_counts_reject_unclustered_prompt(labels, prompts):
    with pytest.raises(ValueError, match="no cluster_id"):
        cluster_counts(labels, prompts[prompts.prompt_id != 4])


def test_top_references(labels):
    top = top_references(labels)
    assert top["ref_id"].tolist() == ["r1", "r2", "ra", "r3", "r4", "r5"]
    assert top.iloc[0][["generations", "VM", "FM", "BM", "prompts"]].tolist() == [3, 2, 0, 1, 1]


def test_summarize_reads_only_small_columns(tmp_path, labels, prompts, monkeypatch):
    tables = ShardedTables(tmp_path, ["prompts", "generations", "matches", "labels", "errors"])
    rows = label_rows()
    prompt_rows = [
        {"prompt_id": p, "prompt": f"prompt {p}", "cluster_id": c} for p, c in CLUSTERS.items()
    ]
    tables.prepare("test", overwrite=False)
    # prompt 1's generations are split over two shards: grouping must be global
    tables.write_shard("prompts", {"prompts": prompt_rows})
    tables.write_shard(
        "s0",
        {
            "labels": rows[:3],
            "errors": [
                {"stage": "load", "item_id": "x", "error_type": "ImageError", "message": "m"}
            ],
        },
    )
    tables.write_shard(
        "s1",
        {
            "labels": rows[3:],
            "errors": [
                {"stage": "load", "item_id": "y", "error_type": "ImageError", "message": "m"},
                {"stage": "prompt", "item_id": "z", "error_type": "ValueError", "message": "m"},
            ],
        },
    )
    (tmp_path / "manifest.json").write_text(
        json.dumps({"kind": "full-scan", "config": {"n_per_prompt": N, "tau": 0.8}})
    )
    read_columns = []
    original = ShardedTables.read

    def spy(self, table, columns=None):
        read_columns.append((table, columns))
        return original(self, table, columns)

    monkeypatch.setattr(ShardedTables, "read", spy)
    summary = summarize(tmp_path)

    assert all(cols is not None and "image" not in cols for _, cols in read_columns)
    assert json.loads((tmp_path / "report" / "summary.json").read_text()) == summary
    assert summary["rows"] == {
        "prompts": 4,
        "generations": 0,
        "matches": 0,
        "labels": 30,
        "errors": 3,
    }
    assert summary["n_per_prompt"] == N
    assert summary["distribution"]["none"]["VM"] == 5
    assert summary["distribution"]["nemo_c"]["BM"] == 1
    category3 = [
        r for r in summary["one_to_many"] if r["method"] == "none" and r["distinct_refs"] == 3
    ]
    assert category3 == [
        {
            "method": "none",
            "distinct_refs": 3,
            "prompts": 1,
            "VM": 3,
            "FM": 1,
            "BM": 1,
            "generations": 5,
        }
    ]
    assert {(r["method"], r["cluster_id"]) for r in summary["clusters"]} == {
        ("none", 0),
        ("none", 1),
        ("nemo_c", 0),
    }
    assert summary["top_references"][0]["ref_id"] == "r1"
    assert summary["one_to_many_counts_nm"] is False
    authors = summarize(tmp_path, count_nm=True)
    assert authors["one_to_many_counts_nm"] is True and "NM" in authors["one_to_many_note"]
    assert [r["NM"] for r in authors["one_to_many"] if r["method"] == "none"] == [0, 0, 0, 6, 5]
    assert sorted((e["stage"], e["error_type"], e["count"]) for e in summary["errors"]) == [
        ("load", "ImageError", 2),
        ("prompt", "ValueError", 1),
    ]
