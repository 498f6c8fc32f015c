"""Prompt clustering: synthetic embeddings with a known partition, and the bundled prompts."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from scanner.clustering import (
    SDTokenStates,
    cluster_prompts,
    run_cluster_command,
    typical_prompts,
)
from scanner.embed import EmbedConfig, make_text_embedder
from scanner.prompts import load_prompts


class TableEmbedder:
    """Looks prompts up in a fixed table, and remembers what it was asked to embed."""

    name = "table"

    def __init__(self, vectors: dict[str, np.ndarray]) -> None:
        self._vectors = vectors
        self.seen: list[str] = []

    def __call__(self, texts):
        self.seen.extend(texts)
        return np.stack([self._vectors[t] for t in texts]).astype(np.float32)


def three_groups() -> tuple[pd.DataFrame, TableEmbedder, dict[int, int]]:
    """11 prompts in 3 tight groups along 3 axes; the expected cluster of each prompt_id.

    Sizes 3 (axis 0), 5 (axis 1), 3 (axis 2), ids interleaved so that the expected numbering
    (largest first, then smallest prompt_id) differs from the axis order and the row order.
    """
    rng = np.random.default_rng(0)
    axis_of = {40: 0, 11: 1, 12: 2, 13: 1, 14: 0, 15: 2, 16: 1, 17: 1, 18: 2, 19: 0, 20: 1}
    vectors = {}
    for pid, axis in axis_of.items():
        v = np.zeros(8)
        v[axis] = 1.0
        vectors[f"prompt {pid}"] = v + 0.05 * rng.normal(size=8)
    prompts = pd.DataFrame(
        {"prompt_id": list(axis_of), "prompt": [f"prompt {pid}" for pid in axis_of]}
    )
    # axis 1 (5 prompts) -> 0; axes 0 and 2 have 3 each: axis 2 holds id 12 < 14 -> 1, axis 0 -> 2
    expected_cluster = {pid: {1: 0, 2: 1, 0: 2}[axis] for pid, axis in axis_of.items()}
    return prompts, TableEmbedder(vectors), expected_cluster


def test_recovers_a_known_partition_with_stable_numbering():
    prompts, embedder, expected = three_groups()
    clusters = cluster_prompts(prompts, k=3, embedder=embedder)
    assert list(clusters.columns) == ["prompt_id", "prompt", "cluster_id", "distance"]
    assert clusters["prompt_id"].tolist() == prompts["prompt_id"].tolist()  # input order
    assert dict(zip(clusters["prompt_id"], clusters["cluster_id"])) == expected
    assert clusters.attrs == {"text_encoder": "table", "method": "default", "k": 3, "seed": 0}


def test_numbering_does_not_depend_on_row_order_or_seed():
    prompts, embedder, expected = three_groups()
    shuffled = prompts.sample(frac=1.0, random_state=3)
    for seed in (0, 1, 2):
        clusters = cluster_prompts(shuffled, k=3, embedder=embedder, seed=seed)
        assert dict(zip(clusters["prompt_id"], clusters["cluster_id"])) == expected


def test_distance_is_cosine_distance_to_the_member_mean():
    prompts, embedder, _ = three_groups()
    clusters = cluster_prompts(prompts, k=3, embedder=embedder)
    unit = {t: v / np.linalg.norm(v) for t, v in embedder._vectors.items()}
    for _, members in clusters.groupby("cluster_id"):
        vectors = np.stack([unit[t] for t in members["prompt"]])
        centroid = vectors.mean(axis=0)
        expected = 1.0 - vectors @ centroid / np.linalg.norm(centroid)
        np.testing.assert_allclose(members["distance"], expected, atol=1e-6)


def test_typical_prompts_are_the_closest_per_cluster():
    clusters = pd.DataFrame(
        {
            "prompt_id": [1, 2, 3, 4, 5, 6],
            "prompt": list("abcdef"),
            "cluster_id": [0, 0, 0, 0, 1, 1],
            "distance": [0.3, 0.1, 0.2, 0.1, 0.5, 0.4],
        }
    )
    typical = typical_prompts(clusters, n=2)
    assert list(zip(typical["cluster_id"], typical["prompt_id"])) == [
        (0, 2),
        (0, 4),
        (1, 6),
        (1, 5),
    ]
    with pytest.raises(ValueError, match="n must be a positive integer"):
        typical_prompts(clusters, n=0)


def test_error_rows_are_left_out_and_never_embedded():
    prompts, embedder, expected = three_groups()
    prompts["error"] = ""
    prompts.loc[prompts["prompt_id"].isin([13, 19]), "error"] = '{"message": "bad"}'
    clusters = cluster_prompts(prompts, k=3, embedder=embedder)
    assert set(clusters["prompt_id"]) == set(expected) - {13, 19}
    assert "prompt 13" not in embedder.seen and "prompt 19" not in embedder.seen


def test_k_is_validated_against_usable_prompts():
    prompts, embedder, _ = three_groups()
    prompts["error"] = ["", "x"] + [""] * 9  # 10 usable prompts
    cluster_prompts(prompts, k=10, embedder=embedder)
    with pytest.raises(ValueError, match="k = 11 clusters need at least 11 usable prompts, got 10"):
        cluster_prompts(prompts, k=11, embedder=embedder)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            cluster_prompts(prompts, k=bad, embedder=embedder)


def test_rejects_duplicate_ids_and_missing_columns():
    prompts, embedder, _ = three_groups()
    with pytest.raises(ValueError, match=r"duplicates \[11\]"):
        cluster_prompts(pd.concat([prompts, prompts.iloc[[1]]]), k=3, embedder=embedder)
    with pytest.raises(ValueError, match="lacks columns"):
        cluster_prompts(prompts.drop(columns="prompt"), k=3, embedder=embedder)


# ----------------------------------------------------------------- the bundled MiniLM encoder


@pytest.fixture(scope="module")
def memorized_vectors() -> tuple[pd.DataFrame, TableEmbedder]:
    """The 500 memorized prompts and their MiniLM vectors, embedded once for the module."""
    prompts = load_prompts("memorized")
    texts = prompts["prompt"].tolist()
    vectors = make_text_embedder(EmbedConfig())(texts)
    return prompts, TableEmbedder(dict(zip(texts, vectors)))


@pytest.fixture(scope="module")
def memorized_clusters(memorized_vectors) -> pd.DataFrame:
    prompts, embedder = memorized_vectors
    return cluster_prompts(prompts, k=12, embedder=embedder)


def test_memorized_prompts_cluster_deterministically(memorized_vectors, memorized_clusters):
    prompts, embedder = memorized_vectors
    first, second = memorized_clusters, cluster_prompts(prompts, k=12, embedder=embedder)
    pd.testing.assert_frame_equal(first, second)
    sizes = first["cluster_id"].value_counts().sort_index()
    assert sizes.is_monotonic_decreasing and sizes.sum() == 500


def test_shaw_floors_prompts_fall_together(memorized_clusters):
    """The 148 "Shaw Floors ..." prompts (30% of the set) end up in clusters of their own.

    With MiniLM and k = 12 they are not one cluster: k-means splits them by product line
    (measured, seed 0: 122 in cluster 0 and the 26 "Caress By Shaw Cashmere" ones in
    cluster 7), each joined by one other flooring product. So "together" is asserted as: every
    Shaw prompt lies in a Shaw-majority cluster, those clusters are at least 95% Shaw
    (measured 148/150; a partition blind to the text would give 30%), and there are at most 3
    of them (3 is what other seeds give).
    """
    clusters = memorized_clusters
    shaw = clusters["prompt"].str.startswith("Shaw Floors")
    assert shaw.sum() == 148
    share = shaw.groupby(clusters["cluster_id"]).mean()
    shaw_clusters = share.index[share > 0.5]
    in_shaw_clusters = clusters["cluster_id"].isin(shaw_clusters)
    assert (in_shaw_clusters | ~shaw).all()
    assert shaw[in_shaw_clusters].mean() >= 0.95
    assert 1 <= len(shaw_clusters) <= 3


def test_cluster_command_writes_parquet_and_prints(tmp_path, capsys):
    lines = [
        "red velvet cake recipe",
        "chocolate layer cake with frosting",
        "",  # an empty prompt: an error row, left out
        "lemon sponge cake",
        "mountain bike with disc brakes",
        "carbon road bike frame",
        "kids bike with training wheels",
    ]
    source = tmp_path / "prompts.txt"
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out" / "clusters.parquet"
    clusters = run_cluster_command(str(source), k=2, text_encoder=None, out=out)

    written = pd.read_parquet(out)
    pd.testing.assert_frame_equal(written, clusters)
    assert written.attrs["text_encoder"] == "all-MiniLM-L6-v2"
    assert 2 not in set(written["prompt_id"])
    cakes = set(written.loc[written["prompt"].str.contains("cake"), "cluster_id"])
    bikes = set(written.loc[written["prompt"].str.contains("bike"), "cluster_id"])
    assert len(cakes) == len(bikes) == 1 and cakes != bikes

    printed = capsys.readouterr().out
    assert "6 prompts in 2 clusters" in printed and "1 left out for errors" in printed
    assert "cluster 0: 3 prompts" in printed and "cluster 1: 3 prompts" in printed


# ----------------------------------------------------------------- the authors' recipe


def test_sd_token_states_are_the_text_encoders_flattened_states(tiny_sd_dir, one_thread):
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer

    texts = ["a red chair", "Shaw Floors Value Collections", "x" * 300]  # the last is truncated
    states = SDTokenStates(str(tiny_sd_dir), batch_size=2)(texts)

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd_dir, subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder").eval()
    with torch.no_grad():
        for text, row in zip(texts, states):
            ids = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
            expected = encoder(torch.tensor([ids]))[0][0]  # (77, 32), one prompt at a time
            np.testing.assert_allclose(row, expected.flatten().numpy(), atol=1e-5)
    assert states.shape == (3, 77 * 32) and states.dtype == np.float32
    with pytest.raises(ValueError, match="tokenizer/ and text_encoder/"):
        SDTokenStates(str(tiny_sd_dir / "unet"))


def test_authors_recipe_recovers_prompts_that_encode_the_same(tiny_sd_dir, one_thread):
    """Case and whitespace variants tokenize alike (CLIP lowercases, collapses spaces), so
    their states are equal: three distinct texts, four spellings each, must give 3 clusters."""
    groups = ["a red chair", "Shaw Floors Marble Gray", "mountain bike"]
    spellings = [str.lower, str.upper, str.title, lambda t: "  " + t.replace(" ", "   ")]
    texts = [spell(g) for spell in spellings for g in groups]
    prompts = pd.DataFrame({"prompt_id": range(100, 112), "prompt": texts})
    clusters = cluster_prompts(
        prompts, k=3, embedder=SDTokenStates(str(tiny_sd_dir)), method="authors"
    )
    group_of = {pid: i % 3 for i, pid in enumerate(range(100, 112))}
    partition = {frozenset(p for p in group_of if group_of[p] == g) for g in range(3)}
    found = {frozenset(rows["prompt_id"]) for _, rows in clusters.groupby("cluster_id")}
    assert found == partition
    np.testing.assert_allclose(clusters["distance"], 0.0, atol=1e-5)  # members equal centroids
    assert clusters.attrs["method"] == "authors" and clusters.attrs["seed"] == 1


def test_authors_recipe_is_sklearn_kmeans_on_the_raw_states(tiny_sd_dir, one_thread):
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    texts = load_prompts("memorized", limit=40)["prompt"].tolist()
    prompts = pd.DataFrame({"prompt_id": range(40), "prompt": texts})
    embedder = SDTokenStates(str(tiny_sd_dir))
    clusters = cluster_prompts(prompts, k=6, embedder=embedder, method="authors")
    # the authors' call, as in their script: no normalization, max_iter 500, random_state 1
    oracle = KMeans(n_clusters=6, max_iter=500, random_state=1, n_init=1).fit(embedder(texts))
    assert adjusted_rand_score(oracle.labels_, clusters["cluster_id"]) == 1.0


class FixedStates(SDTokenStates):
    """Designed 'token states' (no model): only the vectors matter to the recipe."""

    def __init__(self, vectors: dict[str, tuple[float, float]]) -> None:
        self._vectors, self.name, self.dim = vectors, "fixed", 2

    def __call__(self, texts):
        return np.array([self._vectors[t] for t in texts], dtype=np.float32)


def test_authors_recipe_keeps_magnitudes_the_default_normalizes_away():
    """Two near-parallel directions at two magnitudes: raw vectors split by magnitude (what
    the authors clustered), unit vectors by direction (the project's default)."""
    vectors = {"a": (1.0, 0.1), "b": (1.0, -0.1), "c": (10.0, 1.0), "d": (10.0, -1.0)}
    prompts = pd.DataFrame({"prompt_id": [1, 2, 3, 4], "prompt": list("abcd")})

    def partition(method):
        found = cluster_prompts(prompts, k=2, embedder=FixedStates(vectors), method=method)
        return {frozenset(rows["prompt"]) for _, rows in found.groupby("cluster_id")}

    assert partition("authors") == {frozenset("ab"), frozenset("cd")}
    assert partition("default") == {frozenset("ac"), frozenset("bd")}


def test_authors_method_needs_the_sd_model(tiny_sd_dir, tmp_path):
    prompts, embedder, _ = three_groups()
    with pytest.raises(ValueError, match="pass embedder=SDTokenStates"):
        cluster_prompts(prompts, k=3, embedder=embedder, method="authors")
    with pytest.raises(ValueError, match="unknown clustering method 'tfidf'"):
        cluster_prompts(prompts, k=3, embedder=embedder, method="tfidf")
    with pytest.raises(ValueError, match="give --model SD_FOLDER"):
        run_cluster_command("memorized", 12, None, tmp_path / "c.parquet", method="authors")
    with pytest.raises(ValueError, match="--model is for --method authors"):
        run_cluster_command("memorized", 12, None, tmp_path / "c.parquet", model="x")
    from scanner.cli import main

    code = main(["cluster", "memorized", "--method", "authors", "--out", str(tmp_path / "c.pq")])
    assert code == 2 and not (tmp_path / "c.pq").exists()


def test_cluster_command_with_the_authors_recipe(tiny_sd_dir, tmp_path, capsys, one_thread):
    source = tmp_path / "prompts.txt"
    source.write_text("a red chair\nA RED CHAIR\nmountain bike\nMountain  Bike\n")
    out = tmp_path / "clusters.parquet"
    clusters = run_cluster_command(
        str(source), 2, None, out, method="authors", model=str(tiny_sd_dir)
    )
    assert pd.read_parquet(out).attrs["text_encoder"] == f"sd-token-states:{tiny_sd_dir}"
    assert clusters["cluster_id"].tolist() in ([0, 0, 1, 1], [1, 1, 0, 0])
    assert "4 prompts in 2 clusters (method authors" in capsys.readouterr().out


SD14 = os.environ.get("FBMEM_SD14_PATH")


@pytest.mark.weights
@pytest.mark.skipif(not SD14, reason="set FBMEM_SD14_PATH to a local SD v1.4 diffusers folder")
def test_authors_recipe_agrees_with_the_published_assignment():
    """The 500 memorized prompts with SD v1.4's own text encoder against the authors' clusters."""
    from sklearn.metrics import adjusted_rand_score

    from scanner.mitigation.published import load_published

    prompts = load_prompts("memorized")
    clusters = cluster_prompts(prompts, k=12, embedder=SDTokenStates(SD14), method="authors")
    published = load_published().prompts
    assert clusters["prompt"].tolist() == published["caption"].tolist()  # same rows, same order
    ari = adjusted_rand_score(published["cluster"], clusters["cluster_id"])
    print(f"adjusted Rand index against the authors' assignment: {ari:.4f}")
    assert ari >= 0.9
