"""Prompt clustering (DESIGN 4.4): k-means over text embeddings, two recipes.

The FB-Mem paper finds memorization cluster-wise: prompts that share a template ("Shaw Floors
... <colour> <code>") copy the same training images, and NeMo-C deactivates one neuron set
per cluster. Cluster ids are part of that contract (they name neuron sets and report rows),
so they are renumbered by a rule that depends only on the partition, never on k-means'
internal label order.

Recipes (`method`):
- `default`: a sentence embedding (MiniLM, or CLIP's pooled text feature) made unit length,
  k-means with 10 restarts and the caller's seed;
- `authors`: what the FB-Mem authors' clustering script did, to reproduce their clusters: the
  Stable Diffusion model's own text encoder states for the padded 77-token prompt, flattened
  (77 x 768 for SD v1), not normalized, `KMeans(k, max_iter=500, random_state=1)` with one
  k-means++ start (scikit-learn 1.4's default, the version they pinned).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.cluster import KMeans

from scanner.embed import EmbedConfig, TextEmbedder, make_text_embedder
from scanner.prompts import load_prompts

DEFAULT_K = 12  # the FB-Mem paper's number of clusters
TYPICAL_SHOWN = 3  # prompts printed per cluster by the `cluster` command
COLUMNS = ["prompt_id", "prompt", "cluster_id", "distance"]
ClusterMethod = Literal["default", "authors"]


@dataclass(frozen=True)
class KMeansRecipe:
    """How the embeddings are prepared and k-means is run."""

    unit_rows: bool  # L2-normalize each embedding first
    n_init: int  # k-means restarts; the best inertia wins
    max_iter: int
    seed: int  # random_state when the caller gives none


RECIPES: dict[str, KMeansRecipe] = {
    # 300 iterations: scikit-learn's default
    "default": KMeansRecipe(unit_rows=True, n_init=10, max_iter=300, seed=0),
    # the authors' prompts_cluster_2.py: KMeans(n_clusters=12, max_iter=500, random_state=1)
    "authors": KMeansRecipe(unit_rows=False, n_init=1, max_iter=500, seed=1),
}


class SDTokenStates:
    """A Stable Diffusion model's prompt encoding, flattened: the vectors the authors cluster.

    The text encoder's last hidden states for the prompt padded (and truncated) to the
    tokenizer's context, as the pipeline conditions its UNet on them; float32. `model` is a
    diffusers folder (or cached id) with `tokenizer/` and `text_encoder/`. Rows are not unit
    length, unlike a `TextEmbedder`'s.
    """

    def __init__(self, model: str, device: str = "cpu", batch_size: int = 32) -> None:
        import torch
        from transformers import CLIPTextModel, CLIPTokenizer

        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        try:
            self._tokenizer = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
            encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder")
        except OSError as exc:
            raise ValueError(
                f"model {model!r}: expected a Stable Diffusion folder with tokenizer/ and "
                f"text_encoder/ ({exc})"
            ) from None
        self._device = torch.device(device)
        self._encoder = encoder.to(device=self._device, dtype=torch.float32).eval()
        self._batch_size = batch_size
        self.name = f"sd-token-states:{model}"
        self.dim = int(self._tokenizer.model_max_length * encoder.config.hidden_size)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(texts), self._batch_size):
                batch = texts[start : start + self._batch_size]
                tokens = self._tokenizer(
                    batch,
                    padding="max_length",
                    max_length=self._tokenizer.model_max_length,
                    truncation=True,
                    return_tensors="pt",
                )
                states = self._encoder(tokens.input_ids.to(self._device)).last_hidden_state
                out[start : start + len(batch)] = states.reshape(len(batch), -1).cpu().numpy()
        return out


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
    embedder: TextEmbedder | SDTokenStates | None = None,
    seed: int | None = None,
    method: ClusterMethod = "default",
) -> pd.DataFrame:
    """Columns prompt_id, prompt, cluster_id, distance; one row per usable prompt, input order.

    Rows with a non-empty `error` are left out (the caller counts them from its own table).
    `distance` is the cosine distance, 1 - cos, between the prompt's embedding and its
    cluster's centroid: k-means on unit vectors ranks a cluster's members the same way, and
    unlike the raw L2 distance it is comparable across clusters. Cluster 0 is the largest;
    equal sizes are ordered by their smallest prompt_id. `method` picks the recipe (module
    docstring); `authors` needs `embedder=SDTokenStates(model)`. `seed` defaults to the
    recipe's. `attrs` records the text encoder, method, k and seed (pandas keeps them in the
    Parquet file).
    """
    usable = usable_prompts(prompts)
    if method not in RECIPES:
        raise ValueError(f"unknown clustering method {method!r}; expected one of {list(RECIPES)}")
    recipe = RECIPES[method]
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > len(usable):
        raise ValueError(f"k = {k} clusters need at least {k} usable prompts, got {len(usable)}")
    if method == "authors" and not isinstance(embedder, SDTokenStates):
        raise ValueError(
            "method 'authors' clusters a Stable Diffusion model's own text-encoder states: "
            "pass embedder=SDTokenStates(model_folder)"
        )
    seed = recipe.seed if seed is None else seed
    embedder = embedder or make_text_embedder(EmbedConfig())

    vectors = embedder(usable["prompt"].tolist())
    if recipe.unit_rows:  # a caller's embedder may not normalize
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    kmeans = KMeans(
        n_clusters=k, random_state=seed, n_init=recipe.n_init, max_iter=recipe.max_iter
    ).fit(vectors)
    ids = usable["prompt_id"].to_numpy()
    order = _stable_order(kmeans.labels_, ids, k)
    cluster_id = order[kmeans.labels_]
    centroids = kmeans.cluster_centers_ / np.linalg.norm(kmeans.cluster_centers_, axis=1)[:, None]
    cosine = np.einsum("ij,ij->i", vectors, centroids[kmeans.labels_])
    cosine /= np.linalg.norm(vectors, axis=1)

    clusters = pd.DataFrame(
        {
            "prompt_id": ids.astype(np.int64),
            "prompt": usable["prompt"].to_numpy(),
            "cluster_id": cluster_id.astype(np.int64),
            "distance": np.clip(1.0 - cosine, 0.0, None).astype(np.float64),
        }
    )
    clusters.attrs = {"text_encoder": embedder.name, "method": method, "k": k, "seed": seed}
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
    method: ClusterMethod = "default",
    model: str | None = None,
    device: str = "cpu",
) -> pd.DataFrame:
    """`fbmem cluster`: cluster a prompt set, write the Parquet table, print a summary.

    Method `default`: `text_encoder` is a local CLIPModel folder, the bundled MiniLM encoder
    without it. Method `authors`: `model` is a Stable Diffusion folder (its own text encoder).
    """
    if method == "authors":
        if model is None or text_encoder is not None:
            raise ValueError(
                "--method authors embeds with the Stable Diffusion model's own text encoder: "
                "give --model SD_FOLDER (and no --text-encoder)"
            )
        embedder = SDTokenStates(model, device=device)
    else:
        if model is not None:
            raise ValueError("--model is for --method authors; the default takes --text-encoder")
        kind = "clip" if text_encoder else "minilm"
        embedder = make_text_embedder(
            EmbedConfig(text_kind=kind, clip_path=text_encoder, device=device)
        )
    prompts = load_prompts(prompts_spec, limit)
    clusters = cluster_prompts(prompts, k=k, embedder=embedder, method=method)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clusters.to_parquet(out, index=False)

    skipped = len(prompts) - len(clusters)
    print(
        f"{len(clusters)} prompts in {k} clusters (method {method}, text encoder "
        f"{clusters.attrs['text_encoder']}); {skipped} left out for errors; written to {out}"
    )
    sizes = clusters["cluster_id"].value_counts()
    for cluster_id, rows in typical_prompts(clusters).groupby("cluster_id"):
        print(f"cluster {cluster_id}: {sizes[cluster_id]} prompts")
        for prompt, distance in zip(rows["prompt"], rows["distance"]):
            print(f"    {distance:.3f}  {prompt}")
    return clusters
