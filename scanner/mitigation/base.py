"""What a mitigation method is: the one interface the job, the generate stage and the CLI use.

The FB-Mem paper compares three kinds of mitigation, which differ in what they change and when:

- activation scaling (NeMo, NeMo-C, dampening): multiply chosen value neurons by alpha,
  per prompt, at generation time; the neurons come from a localization or a published set;
- weight editing (Wanda pruning): once per run, compute from the model and the run's
  prompts which weights to zero, then generate every prompt with them zeroed;
- prompt optimization (DetectMem): per generation, optimize the prompt embedding on the
  model before generating from it.

A method answers four questions, each with a default that means "nothing of that kind":
which neurons each prompt scales (`prompt_neurons`), what it computes once per run
(`prepare`, when `prepares`), which settings it resolved for this model (`settings`, written to
the manifest), and how it generates a batch of rows (`generate`). The registry in
`scanner.mitigation.methods` turns a method's name into its object.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # generation imports torch and diffusers; naming a method needs neither
    import pandas as pd

    from scanner.generate import Generator
    from scanner.mitigation.search import Neuron

Kind = Literal["none", "activation-scaling", "weight-editing", "prompt-optimization"]
State = Mapping[str, np.ndarray]  # what `prepare` computed, as plain arrays (saved as .npz)


@dataclass(frozen=True)
class GenerationRows:
    """The rows of one method in a generate batch: each is one (prompt, gen_idx) generation."""

    prompts: list[str]
    prompt_ids: list[int]
    gen_idxs: list[int]
    neurons: list[list[tuple[int, int]]]  # per row, the neurons `prompt_neurons` gave its prompt


class MitigationMethod:
    """Base of every method; subclasses set `name` and `kind` and override what they need."""

    name: str  # canonical spelling, as the scan's `method` column stores it
    kind: Kind
    needs_localization: bool = False  # its neurons come from NeMo run on the model at hand
    prepares: bool = False  # `prepare` must run once per run, before any generation

    def prompt_neurons(
        self,
        prompt_ids: Sequence[int],
        prompts: Sequence[str],
        neuron_sets: pd.DataFrame | None,
        clusters: pd.DataFrame | None,
    ) -> tuple[list[frozenset[Neuron]], float]:
        """Each prompt's neurons to scale, in `prompt_ids` order, and the factor alpha."""
        return [frozenset() for _ in prompt_ids], 1.0

    def prepare(
        self, generator: Generator, prompts: Sequence[str], prompt_ids: Sequence[int]
    ) -> dict[str, np.ndarray]:
        """The once-per-run state `generate` receives, computed on the model from all prompts."""
        raise NotImplementedError(f"method {self.name!r} prepares nothing")

    def settings(self, latent_shape: tuple[int, ...]) -> dict:
        """The values this method runs with on a model of this latent shape (for the manifest)."""
        return {}

    def generate(
        self, generator: Generator, rows: GenerationRows, state: State | None
    ) -> np.ndarray:
        """Images of the rows under this method, (B, 3, size, size) float32 in [0, 1]."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"
