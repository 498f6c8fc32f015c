"""The registry of mitigation methods: a method's name -> its object (`scanner.mitigation.base`).

A name is a family, optionally followed by `:options` that the family reads ("nemo-c:alpha=0.1").
The job's `--methods`, its YAML and the manifest all go through `get_method`, so a name that is
not here is refused before anything runs. Adding a method: a module with a `MitigationMethod`
subclass and a `from_name` constructor, and one line below.
"""

from __future__ import annotations

from collections.abc import Callable

from scanner.mitigation.base import MitigationMethod
from scanner.mitigation.detectmem import DetectMem
from scanner.mitigation.scaling import ActivationScaling
from scanner.mitigation.wanda import Wanda

# family -> constructor from the full name
REGISTRY: dict[str, Callable[[str], MitigationMethod]] = {
    "none": ActivationScaling.from_name,  # the model as is
    "nemo": ActivationScaling.from_name,  # NeMo: each prompt's own neurons (Hintersdorf et al.)
    "nemo-c": ActivationScaling.from_name,  # NeMo-C: the union of its cluster's (FB-Mem)
    "wanda": Wanda.from_name,  # Wanda pruning of ff.net.2 (Chavhan et al.)
    "detectmem": DetectMem.from_name,  # prompt-embedding optimization (Wen et al.)
}

FORMS = (
    "none, nemo, nemo-c, nemo:published, nemo-c:published (each but none optionally followed "
    "by :alpha=A with A in [0, 1]), wanda, detectmem"
)


def get_method(name: str) -> MitigationMethod:
    """The method a name stands for; ValueError (listing the valid forms) for anything else."""
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}: {name!r}")
    family = name.strip().split(":", 1)[0]
    if family not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; valid forms: {FORMS}")
    return REGISTRY[family](name)
