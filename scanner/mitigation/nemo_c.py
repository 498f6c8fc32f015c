"""NeMo-C (DESIGN 4.6): one neuron set per prompt cluster, and the neurons each method blocks.

The FB-Mem paper observes that the prompts of a cluster copy the same training images, so the
neurons NeMo finds for one of them are part of the memorization of all of them: NeMo-C blocks
the union of the cluster's refined NeMo sets for every prompt of the cluster, including the
prompts in which NeMo found no memorization.

Tables (Parquet; the column names are the interface):
- `neuron_sets`: one row per refined neuron of a prompt: `prompt_id` int64, `layer` int32
  (index in `scanner.neurons.value_layers` order), `channel` int32. A prompt without rows has
  no neurons: either not memorized or localized to an empty set.
- `localizations`: one row per prompt that went through NeMo: `prompt_id` int64, `memorized`
  bool, `unet_calls` int64. It tells "localized, nothing found" from "never localized",
  which `neuron_sets` alone cannot, and it is where the per-prompt cost is counted.
- `published_sets`: for the `:published` methods, which take the FB-Mem authors' SD v1.4
  sets instead of localizing (`scanner.mitigation.published`): one row per (prompt, method):
  `prompt_id` int64, `method`, `authors_cluster` int64 (-1 outside the authors' 500 prompts),
  `status` (`published`, `no-set`, `unknown-prompt`), `neurons` int64 (how many it gets).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from scanner.mitigation.published import (
    PublishedCoverageWarning,
    coverage_warning,
    lookup_published,
)
from scanner.mitigation.search import Neuron

if TYPE_CHECKING:  # signal imports torch and diffusers; the aggregation needs neither
    from scanner.mitigation.signal import PromptLocalization

# Column dtypes of the tables above and of union_per_cluster's output.
NEURON_DTYPES = {"prompt_id": "int64", "layer": "int32", "channel": "int32"}
LOCALIZATION_DTYPES = {"prompt_id": "int64", "memorized": "bool", "unet_calls": "int64"}
UNION_DTYPES = {"cluster_id": "int64", "layer": "int32", "channel": "int32"}
NEURON_COLUMNS = list(NEURON_DTYPES)

MethodKind = Literal["none", "nemo", "nemo-c"]
METHOD_KINDS: tuple[str, ...] = ("none", "nemo", "nemo-c")
METHOD_FORMS = (
    "none, nemo, nemo-c, nemo:published, nemo-c:published, "
    "each but none optionally followed by :alpha=A with A in [0, 1]"
)
_METHOD = re.compile(r"(?P<kind>[a-z-]+)(?P<published>:published)?(?::alpha=(?P<alpha>[^:]+))?")


@dataclass(frozen=True)
class Method:
    """A parsed mitigation method: which neurons, and the factor they are multiplied by."""

    kind: MethodKind
    alpha: float  # 0 deactivates (NeMo's default); 0.1, 0.2 are the FB-Mem paper's dampening
    published: bool = False  # the FB-Mem authors' SD v1.4 sets instead of localized ones

    @property
    def name(self) -> str:
        """Canonical spelling, as the scan's `method` column stores it."""
        base = f"{self.kind}:published" if self.published else self.kind
        if self.kind == "none" or self.alpha == 0.0:
            return base
        return f"{base}:alpha={self.alpha:g}"

    @property
    def needs_localization(self) -> bool:
        """Whether the method's neurons come from NeMo run on the model at hand."""
        return self.kind != "none" and not self.published


def parse_method(name: str) -> Method:
    """Read a method name ("none", "nemo-c:alpha=0.1", ...); ValueError lists the valid forms."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}")
    match = _METHOD.fullmatch(name.strip())
    if match is None or match["kind"] not in METHOD_KINDS:
        raise ValueError(f"unknown method {name!r}; valid forms: {METHOD_FORMS}")
    kind, alpha_text, published = match["kind"], match["alpha"], match["published"] is not None
    if kind == "none" and (published or alpha_text is not None):
        raise ValueError(f"method {name!r}: 'none' blocks no neurons: no :published, no alpha")
    if alpha_text is None:
        return Method(kind, 1.0 if kind == "none" else 0.0, published)
    try:
        alpha = float(alpha_text)
    except ValueError:
        raise ValueError(f"method {name!r}: alpha {alpha_text!r} is not a number") from None
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"method {name!r}: alpha must be in [0, 1], got {alpha}")
    return Method(kind, alpha, published)


def localization_tables(
    results: Mapping[int, PromptLocalization],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`localize_prompt` results by prompt_id -> the (neuron_sets, localizations) tables."""
    neuron_rows = [
        (prompt_id, layer, channel)
        for prompt_id, result in results.items()
        if result.search is not None
        for layer, channel in sorted(result.search.refined)
    ]
    localization_rows = [(pid, r.memorized, r.unet_calls) for pid, r in results.items()]
    return (
        pd.DataFrame(neuron_rows, columns=NEURON_COLUMNS).astype(NEURON_DTYPES),
        pd.DataFrame(localization_rows, columns=list(LOCALIZATION_DTYPES)).astype(
            LOCALIZATION_DTYPES
        ),
    )


def union_per_cluster(neuron_sets: pd.DataFrame, clusters: pd.DataFrame) -> pd.DataFrame:
    """One row per (cluster_id, layer, channel): the union of the cluster's prompts' neurons.

    `clusters` maps prompt_id to cluster_id (the `fbmem cluster` table). Every prompt with
    neurons must have a cluster: a missing one means the tables come from different prompt
    sets. Clusters without any neuron have no rows. Sorted by cluster, layer, channel.
    """
    neuron_sets = check_neuron_sets(neuron_sets)
    cluster_of = _cluster_map(clusters)
    orphans = np.setdiff1d(neuron_sets["prompt_id"].unique(), cluster_of.index.to_numpy())
    if len(orphans):
        raise ValueError(
            f"neuron_sets has prompts without a cluster: {orphans[:10].tolist()} "
            f"({len(orphans)} in all); cluster the same prompt set the neurons came from"
        )
    union = pd.DataFrame(
        {
            "cluster_id": cluster_of.loc[neuron_sets["prompt_id"]].to_numpy(),
            "layer": neuron_sets["layer"].to_numpy(),
            "channel": neuron_sets["channel"].to_numpy(),
        }
    )
    union = union.drop_duplicates().sort_values(list(UNION_DTYPES), ignore_index=True)
    return union.astype(UNION_DTYPES)


def method_neurons(
    method: str,
    prompt_ids: Sequence[int],
    neuron_sets: pd.DataFrame | None,
    clusters: pd.DataFrame | None = None,
    prompts: Sequence[str] | None = None,
) -> tuple[list[frozenset[Neuron]], float]:
    """The neurons `method` blocks for each prompt, in `prompt_ids` order, and their factor alpha.

    none: no neurons (alpha 1); nemo: the prompt's own refined set; nemo-c: the union of its
    cluster's sets (`clusters` required, every prompt must be in it). The `:published` forms
    take the FB-Mem authors' SD v1.4 sets instead (`scanner.mitigation.published`): they need
    the prompts' text (`prompts`, same order) and no `neuron_sets` or `clusters`, and warn
    (PublishedCoverageWarning) with the count of prompts that get no set. The result feeds
    `scanner.neurons.neuron_mask_to_scales`. Cost is linear in the tables: call it once per
    method for a whole batch of prompts, not per prompt.
    """
    parsed = parse_method(method)
    prompt_ids = [int(pid) for pid in prompt_ids]
    if parsed.kind == "none":
        return [frozenset() for _ in prompt_ids], parsed.alpha
    if parsed.published:
        return _published_neurons(parsed, prompt_ids, prompts), parsed.alpha
    if neuron_sets is None:
        raise ValueError(f"method {method!r} needs the neuron_sets table of a localization")
    if parsed.kind == "nemo":
        own = _sets_by_key(check_neuron_sets(neuron_sets), "prompt_id")
        return [own.get(pid, frozenset()) for pid in prompt_ids], parsed.alpha
    # nemo-c
    if clusters is None:
        raise ValueError(f"method {method!r} needs the clusters table (prompt_id, cluster_id)")
    cluster_of = _cluster_map(clusters)
    unknown = [pid for pid in prompt_ids if pid not in cluster_of.index]
    if unknown:
        raise ValueError(f"prompts without a cluster: {unknown[:10]} ({len(unknown)} in all)")
    by_cluster = _sets_by_key(union_per_cluster(neuron_sets, clusters), "cluster_id")
    return [by_cluster.get(cluster_of[pid], frozenset()) for pid in prompt_ids], parsed.alpha


def _published_neurons(
    method: Method, prompt_ids: list[int], prompts: Sequence[str] | None
) -> list[frozenset[Neuron]]:
    if prompts is None:
        raise ValueError(
            f"method {method.name!r} joins the published sets by caption: pass the prompts' text"
        )
    if isinstance(prompts, str) or len(prompts) != len(prompt_ids):
        raise ValueError(
            f"method {method.name!r}: prompts must be one text per prompt id "
            f"({len(prompt_ids)} ids, got {1 if isinstance(prompts, str) else len(prompts)})"
        )
    sets, table = lookup_published(prompts, method.kind)
    line = coverage_warning(table, method.name)
    if line is not None:  # stacklevel 3: the line that called method_neurons
        warnings.warn(line, PublishedCoverageWarning, stacklevel=3)
    return sets


def check_neuron_sets(neuron_sets: pd.DataFrame) -> pd.DataFrame:
    """Validate a `neuron_sets` table; returns it with the schema's dtypes."""
    _require(neuron_sets, NEURON_COLUMNS, "neuron_sets")
    frame = neuron_sets[NEURON_COLUMNS]
    for column in NEURON_COLUMNS:
        if not pd.api.types.is_integer_dtype(frame[column]):
            raise TypeError(
                f"neuron_sets.{column} must hold integers, got dtype {frame[column].dtype}"
            )
    if len(frame) and (frame[["layer", "channel"]].to_numpy() < 0).any():
        raise ValueError("neuron_sets: layer and channel must be >= 0")
    duplicated = frame.duplicated()
    if duplicated.any():
        first = tuple(int(v) for v in frame[duplicated].iloc[0])
        raise ValueError(
            f"neuron_sets must have one row per (prompt_id, layer, channel); {first} repeats"
        )
    return frame.astype(NEURON_DTYPES)


def _cluster_map(clusters: pd.DataFrame) -> pd.Series:
    """prompt_id -> cluster_id, checked."""
    _require(clusters, ["prompt_id", "cluster_id"], "clusters")
    duplicated = clusters["prompt_id"].duplicated()
    if duplicated.any():
        raise ValueError(
            f"clusters must have one row per prompt_id; "
            f"{clusters['prompt_id'][duplicated].unique()[:10].tolist()} repeat"
        )
    return pd.Series(
        clusters["cluster_id"].to_numpy(dtype=np.int64),
        index=clusters["prompt_id"].to_numpy(dtype=np.int64),
    )


def _sets_by_key(table: pd.DataFrame, key: str) -> dict[int, frozenset[Neuron]]:
    return {
        int(value): frozenset(zip(rows["layer"].tolist(), rows["channel"].tolist()))
        for value, rows in table.groupby(key, sort=False)
    }


def _require(frame: pd.DataFrame, columns: Iterable[str], name: str) -> None:
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(f"{name} must be a pandas DataFrame, got {type(frame).__name__}")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} lacks columns {missing}; it has {list(frame.columns)}")
