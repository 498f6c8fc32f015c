"""NeMo localization as a batch stage: prompts in, each prompt's refined neuron set out.

Holdout statistics are what the search measures outliers against. For SD v1.4 NeMo's own
(50,000 LAION prompts) ship with the package; for any other model they are computed here
from a set of non-memorized prompts (the bundled LAION controls by default, the organism's
held-out captions for the organism), with the same code path NeMo uses (mean |to_v| over the
77 tokens, per neuron).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from scanner.mitigation.search import SearchConfig
from scanner.mitigation.signal import (
    MemorizationSignal,
    SignalConfig,
    holdout_statistics,
    localize_prompt,
    prompt_activations,
    text_embeddings,
)

Statistics = Literal["holdout", "sd-v1.4"]


@dataclass(frozen=True)
class LocalizeConfig:
    model: str  # diffusers folder or model id (the model to mitigate)
    statistics: Statistics = "holdout"  # computed here, or NeMo's shipped SD v1.4 file
    holdout: str = "unmemorized"  # non-memorized prompts for "holdout" statistics (a prompt set)
    holdout_prompts: int = 500  # how many of them
    signal: SignalConfig = field(default_factory=SignalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    device: str = "cpu"
    trust_remote_code: bool = False


def shipped_statistics(layer_sizes: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """NeMo's SD v1.4 statistics, checked against the UNet's value layers."""
    from scanner.neurons import SD_V1_4_HOLDOUT_STATISTICS

    means, stds = torch.load(SD_V1_4_HOLDOUT_STATISTICS, weights_only=True)
    sizes = [int(m.numel()) for m in means]
    if sizes != layer_sizes:
        raise ValueError(
            f"the shipped SD v1.4 statistics have layer sizes {sizes} but this UNet has {layer_sizes}; "
            "use statistics='holdout' for other models"
        )
    return [m.float().numpy() for m in means], [s.float().numpy() for s in stds]


class Localize:
    """Adds `memorized`, `success`, `unet_calls`, `neurons` (JSON [[layer, channel], ...]),
    `initial_score` and `refined_score` to a batch of prompts."""

    def __init__(self, config: LocalizeConfig):
        from scanner.generate import GenerationConfig, Generator
        from scanner.neurons import value_layers
        from scanner.prompts import load_prompts

        pipe = Generator(
            GenerationConfig(
                model=config.model, device=config.device, trust_remote_code=config.trust_remote_code
            )
        ).pipeline
        self.config = config
        self.tokenizer, self.text_encoder = pipe.tokenizer, pipe.text_encoder
        self.signal = MemorizationSignal(pipe.unet, pipe.scheduler, config.signal)
        sizes = [layer.size for layer in value_layers(pipe.unet)]
        if config.statistics == "sd-v1.4":
            self.means, self.stds = shipped_statistics(sizes)
        elif config.statistics == "holdout":
            holdout = load_prompts(config.holdout, config.holdout_prompts)["prompt"].tolist()
            with torch.no_grad():
                emb = text_embeddings(self.tokenizer, self.text_encoder, holdout)
            self.means, self.stds = holdout_statistics(prompt_activations(pipe.unet, emb))
        else:
            raise ValueError(
                f"statistics must be 'holdout' or 'sd-v1.4', got {config.statistics!r}"
            )

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        n = len(batch["prompt"])
        out = {
            "memorized": np.zeros(n, dtype=bool),
            "success": np.zeros(n, dtype=bool),
            "unet_calls": np.zeros(n, dtype=np.int64),
            "neurons": np.full(n, "[]", dtype=object),
            "initial_score": np.full(n, np.nan),
            "refined_score": np.full(n, np.nan),
        }
        for i in np.flatnonzero(batch["error"] == ""):
            emb = text_embeddings(self.tokenizer, self.text_encoder, [str(batch["prompt"][i])])[0]
            found = localize_prompt(self.signal, emb, self.means, self.stds, self.config.search)
            out["memorized"][i] = found.memorized
            out["unet_calls"][i] = found.unet_calls
            if found.search is not None:
                out["success"][i] = found.search.success
                out["neurons"][i] = json.dumps(
                    sorted([int(layer), int(c)] for layer, c in found.search.refined)
                )
                out["initial_score"][i] = found.search.initial_score
                out["refined_score"][i] = found.search.refined_score
        return {**batch, **out}
