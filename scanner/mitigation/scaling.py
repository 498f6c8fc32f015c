"""Activation scaling: none, NeMo, NeMo-C and their dampened and published forms, as methods.

The names and their reading are `scanner.mitigation.nemo_c.parse_method`'s; the neurons each
prompt gets are `method_neurons`'; generation multiplies them by alpha through per-sample hooks
on the value layers (`scanner.neurons`). `none` is the form without neurons: the model as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from scanner.mitigation.base import GenerationRows, MitigationMethod, State
from scanner.mitigation.nemo_c import Method, method_neurons, parse_method


class ActivationScaling(MitigationMethod):
    def __init__(self, parsed: Method):
        self.parsed = parsed
        self.name = parsed.name
        self.kind = "none" if parsed.kind == "none" else "activation-scaling"
        self.needs_localization = parsed.needs_localization

    @classmethod
    def from_name(cls, name: str) -> ActivationScaling:
        return cls(parse_method(name))

    @property
    def published(self) -> bool:
        """Whether the neurons are the FB-Mem authors' SD v1.4 sets (`:published`)."""
        return self.parsed.published

    def prompt_neurons(self, prompt_ids, prompts, neuron_sets, clusters):
        return method_neurons(self.name, prompt_ids, neuron_sets, clusters, prompts)

    def settings(self, latent_shape: Sequence[int]) -> dict:
        return {} if self.kind == "none" else {"alpha": self.parsed.alpha}

    def generate(self, generator, rows: GenerationRows, state: State | None) -> np.ndarray:
        from scanner.neurons import neuron_mask_to_scales, value_layers

        scales = None
        if any(rows.neurons):
            layers = value_layers(generator.unet)
            scales = neuron_mask_to_scales(rows.neurons, layers, self.parsed.alpha)
        return generator(rows.prompts, rows.prompt_ids, rows.gen_idxs, neuron_scales=scales)
