"""The FB-Mem authors' published neuron sets for SD v1.4, looked up per prompt.

A user with SD v1.4's weights can mitigate with the paper's own neurons without running
NeMo's localization: `nemo-c:published` blocks, for each prompt, the NeMo-C union the
authors used for the prompt's cluster; `nemo:published` blocks the prompt's own refined
NeMo set from the authors' run. The data and its licence: `scanner/data/LICENSE-fbmem.md`.

Prompts join the authors' 500 memorized captions by text, after collapsing whitespace runs,
stripping both ends and lowercasing. SD v1.4's CLIP tokenizer does the same before encoding,
so prompts that differ only there have the same text embedding and the same images; the
500 captions stay distinct under it. What a prompt gets, as the `status` of its lookup row:

- `published`: the authors' set (nemo-c: its cluster's union; nemo: its refined set);
- `no-set`: one of the 500 without a published set: nemo-c, clusters 10 and 11 (the
  authors' code clusters into 12 but released unions for 0-9); nemo, the 249 prompts their
  NeMo run did not cover;
- `unknown-prompt`: not one of the 500.

The last two get no neurons (they are generated as the model is); `method_neurons` warns
with their count and the job writes the lookup table, so none is dropped silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources import files
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from scanner.mitigation.search import Neuron

if TYPE_CHECKING:  # neurons imports diffusers; the lookup needs neither
    from scanner.neurons import ValueLayer

PROMPTS_FILE = "fbmem_prompts_sd_v1_4.csv"
NEURONS_FILE = "fbmem_neurons_sd_v1_4.npz"
PublishedKind = Literal["nemo", "nemo-c"]
STATUSES = ("published", "no-set", "unknown-prompt")
LOOKUP_DTYPES = {"authors_cluster": "int64", "status": "object", "neurons": "int64"}
NO_CLUSTER = -1  # authors_cluster of a prompt outside the 500


class PublishedCoverageWarning(UserWarning):
    """Some prompts have no published set and are generated without mitigation."""


@dataclass(frozen=True)
class PublishedSets:
    """The authors' data, indexed for lookup (rows are those of the shipped CSV)."""

    prompts: pd.DataFrame  # caption, cluster, type: the 500 memorized prompts
    layer_sizes: tuple[int, ...]  # SD v1.4's value layers, scanner.neurons.value_layers order
    unions: dict[int, frozenset[Neuron]]  # cluster -> NeMo-C union (clusters 0-9)
    refined: dict[int, frozenset[Neuron]]  # row -> refined NeMo set (the 251 localized prompts)
    row_of: dict[str, int]  # normalized caption -> row


def normalize_caption(text: str) -> str:
    """The join key: whitespace runs collapsed, ends stripped, lowercased (as CLIP's tokenizer)."""
    if not isinstance(text, str):
        raise TypeError(f"prompts must be strings, got {type(text).__name__}: {text!r}")
    return " ".join(text.split()).lower()


def _sets(keys: np.ndarray, layers: np.ndarray, channels: np.ndarray) -> dict[int, frozenset]:
    out: dict[int, set[Neuron]] = {}
    for key, layer, channel in zip(keys.tolist(), layers.tolist(), channels.tolist()):
        out.setdefault(key, set()).add((layer, channel))
    return {key: frozenset(neurons) for key, neurons in out.items()}


@lru_cache(maxsize=1)
def load_published() -> PublishedSets:
    """Read the shipped CSV and npz once per process."""
    data = files("scanner") / "data"
    prompts = pd.read_csv(
        str(data / PROMPTS_FILE), sep=";", keep_default_na=False, dtype={"caption": object}
    )
    with np.load(str(data / NEURONS_FILE), allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    refined = _sets(arrays["prompt_row"], arrays["prompt_layer"], arrays["prompt_channel"])
    for row in arrays["localized_row"].tolist():  # localized, whatever the refined set holds
        refined.setdefault(row, frozenset())
    keys = [normalize_caption(c) for c in prompts["caption"]]
    row_of = {key: row for row, key in enumerate(keys)}
    if len(row_of) != len(keys):
        raise ValueError(f"{PROMPTS_FILE}: two captions share a normalized form")
    return PublishedSets(
        prompts=prompts,
        layer_sizes=tuple(arrays["layer_sizes"].tolist()),
        unions=_sets(arrays["union_cluster"], arrays["union_layer"], arrays["union_channel"]),
        refined=refined,
        row_of=row_of,
    )


def lookup_published(
    prompts: Sequence[str], kind: PublishedKind
) -> tuple[list[frozenset[Neuron]], pd.DataFrame]:
    """Each prompt's published neurons, in input order, and its lookup row.

    The table has one row per prompt: `authors_cluster` (-1 outside the 500), `status`
    (see the module docstring) and `neurons` (how many the prompt gets).
    """
    if kind not in ("nemo", "nemo-c"):
        raise ValueError(f"published sets exist for 'nemo' and 'nemo-c', not {kind!r}")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of strings, not one string")
    data = load_published()
    sets, rows = [], []
    for text in prompts:
        row = data.row_of.get(normalize_caption(text))
        if row is None:
            neurons, cluster, status = frozenset(), NO_CLUSTER, "unknown-prompt"
        else:
            cluster = int(data.prompts["cluster"].iat[row])
            found = data.unions.get(cluster) if kind == "nemo-c" else data.refined.get(row)
            neurons, status = (frozenset(), "no-set") if found is None else (found, "published")
        sets.append(neurons)
        rows.append((cluster, status, len(neurons)))
    table = pd.DataFrame(rows, columns=list(LOOKUP_DTYPES)).astype(LOOKUP_DTYPES)
    return sets, table


def coverage_warning(table: pd.DataFrame, method: str) -> str | None:
    """One line saying how many prompts `method` leaves unmitigated, or None when none."""
    counts = table["status"].value_counts()
    unknown, no_set = int(counts.get("unknown-prompt", 0)), int(counts.get("no-set", 0))
    if not unknown and not no_set:
        return None
    return (
        f"{method}: {unknown + no_set} of {len(table)} prompts get no published neurons and are "
        f"generated without mitigation ({unknown} not among the FB-Mem authors' 500 memorized "
        f"SD v1.4 prompts, {no_set} among them without a published set)"
    )


def check_layers(layers: Sequence[ValueLayer], model: str = "this model") -> None:
    """ValueError unless `layers` (scanner.neurons.value_layers) are SD v1.4's value layers."""
    expected = load_published().layer_sizes
    found = tuple(layer.size for layer in layers)
    if found != expected:
        raise ValueError(
            f"the published neuron sets index SD v1.4's {len(expected)} value layers of sizes "
            f"{expected}; {model} has {len(found)} of sizes {found}. They were found on SD v1.4 "
            "and mean nothing on another model: localize this model's own neurons with the "
            "methods nemo or nemo-c instead"
        )


def check_model(model: str) -> None:
    """`check_layers` on a diffusers model folder, from its UNet config alone (no weights read).

    The UNet is built on the meta device, which allocates nothing, so a full-size model costs
    about 0.1 s here. Same layer sizes do not prove the weights are SD v1.4's (v1.5 has the
    same shapes): the sets are that model's neurons only for SD v1.4 itself.
    """
    import torch
    from diffusers import UNet2DConditionModel

    from scanner.neurons import value_layers

    try:
        config = UNet2DConditionModel.load_config(model, subfolder="unet")
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"model {model!r}: cannot read its UNet config (unet/config.json), needed to check "
            f"the published neuron sets against its layers: {exc}"
        ) from None
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    check_layers(value_layers(unet), f"model {model!r}")
