"""Prompt clustering (DESIGN 4.4): k-means over unit-length text embeddings.

The FB-Mem paper finds memorization cluster-wise: prompts that share a template ("Shaw Floors
... <colour> <code>") copy the same training images, and NeMo-C deactivates one neuron set
per cluster. Cluster ids are part of that contract (they name neuron sets and report rows),
so they are renumbered by a rule that depends only on the partition, never on k-means'
internal label order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans

from scanner.embed import EmbedConfig, TextEmbedder, make_text_embedder
from scanner.prompts import load_prompts

DEFAULT_K = 12  # the FB-Mem paper's number of clusters
N_INIT = 10  # k-means restarts; the best inertia wins
TYPICAL_SHOWN = 3  # prompts printed per cluster by the `cluster` command
COLUMNS = ["prompt_id", "prompt", "cluster_id", "distance"]


def usable_prompts(prompts: pd.DataFrame) -> pd.DataFrame:
    """The rows to cluster: those without an `error` (load_prompts marks bad rows, never drops them)."""
    if not isinstance(prompts, pd.DataFrame):
        raise TypeError(f"prompts must be a pandas DataFrame, got {type(prompts).__name__}")
    missing = [c for c in ("prompt_id", "prompt") if c not in prompts.columns]
    if missing:
        raise ValueError(f"prompts lacks columns {missing}; it has {list(prompts.columns)}")
    usable = prompts if "error" not in prompts.columns else prompts[prompts["error"].eq("")]
    duplicated = usable["prompt_id"][usable["prompt_id"].duplicated()].unique()
    if len(duplicated):
        raise ValueError(f"prompt_id must be unique, found duplicates {duplicated[:10].tolist()}")
    return usable


def cluster_prompts(
    prompts: pd.DataFrame,
    k: int = DEFAULT_K,
    embedder: TextEmbedder | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """Columns prompt_id, prompt, cluster_id, distance; one row per usable prompt, input order.

    Rows with a non-empty `error` are left out (the caller counts them from its own table).
    `distance` is the cosine distance, 1 - cos, between the prompt's embedding and its
    cluster's centroid: k-means on unit vectors ranks a cluster's members the same way, and
    unlike the raw L2 distance it is comparable across clusters. Cluster 0 is the largest;
    equal sizes are ordered by their smallest prompt_id. `attrs` records the text encoder,
    k and seed (pandas keeps them in the Parquet file).
    """
    usable = usable_prompts(prompts)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > len(usable):
        raise ValueError(f"k = {k} clusters need at least {k} usable prompts, got {len(usable)}")
    embedder = embedder or make_text_embedder(EmbedConfig())

    vectors = embedder(usable["prompt"].tolist())
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)  # a caller's may not be
    kmeans = KMeans(n_clusters=k, random_state=seed, n_init=N_INIT).fit(vectors)
    ids = usable["prompt_id"].to_numpy()
    order = _stable_order(kmeans.labels_, ids, k)
    cluster_id = order[kmeans.labels_]
    centroids = kmeans.cluster_centers_ / np.linalg.norm(kmeans.cluster_centers_, axis=1)[:, None]
    cosine = np.einsum("ij,ij->i", vectors, centroids[kmeans.labels_])

    clusters = pd.DataFrame(
        {
            "prompt_id": ids.astype(np.int64),
            "prompt": usable["prompt"].to_numpy(),
            "cluster_id": cluster_id.astype(np.int64),
            "distance": np.clip(1.0 - cosine, 0.0, None).astype(np.float64),
        }
    )
    clusters.attrs = {"text_encoder": embedder.name, "k": k, "seed": seed}
    return clusters


def _stable_order(labels: np.ndarray, prompt_ids: np.ndarray, k: int) -> np.ndarray:
    """k-means label -> cluster id: by size descending, then by smallest prompt_id."""
    sizes = np.bincount(labels, minlength=k)
    first = np.full(k, np.iinfo(np.int64).max)
    np.minimum.at(first, labels, prompt_ids)
    ranked = sorted(range(k), key=lambda label: (-sizes[label], first[label]))
    order = np.empty(k, dtype=np.int64)
    order[ranked] = np.arange(k)
    return order


def typical_prompts(clusters: pd.DataFrame, n: int = TYPICAL_SHOWN) -> pd.DataFrame:
    """The n prompts closest to each centroid, by cluster then distance (ties: prompt_id)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    missing = [c for c in COLUMNS if c not in clusters.columns]
    if missing:
        raise ValueError(f"clusters lacks columns {missing}; it has {list(clusters.columns)}")
    ranked = clusters.sort_values(["cluster_id", "distance", "prompt_id"], kind="stable")
    return ranked.groupby("cluster_id", sort=False).head(n).reset_index(drop=True)


def run_cluster_command(
    prompts_spec: str,
    k: int,
    text_encoder: str | None,
    out: str | Path,
    limit: int | None = None,
) -> pd.DataFrame:
    """`fbmem cluster`: cluster a prompt set, write the Parquet table, print a summary.

    `text_encoder` is a local CLIPModel folder; without it the bundled MiniLM encoder is used.
    """
    prompts = load_prompts(prompts_spec, limit)
    config = (
        EmbedConfig(text_kind="clip", clip_path=text_encoder) if text_encoder else EmbedConfig()
    )
    clusters = cluster_prompts(prompts, k=k, embedder=make_text_embedder(config))

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clusters.to_parquet(out, index=False)

    skipped = len(prompts) - len(clusters)
    print(
        f"{len(clusters)} prompts in {k} clusters (text encoder {clusters.attrs['text_encoder']}); "
        f"{skipped} left out for errors; written to {out}"
    )
    sizes = clusters["cluster_id"].value_counts()
    for cluster_id, rows in typical_prompts(clusters).groupby("cluster_id"):
        print(f"cluster {cluster_id}: {sizes[cluster_id]} prompts")
        for prompt, distance in zip(rows["prompt"], rows["distance"]):
            print(f"    {distance:.3f}  {prompt}")
    return clusters
