"""Wanda pruning for diffusion (Chavhan et al. 2024's adaptation), the FB-Mem paper's baseline.

Wanda scores a weight by what it carries: |W_ij| times the L2 norm of its input feature j.
Weights that carry much for the memorized prompts and more than for the empty prompt are
taken to carry the memorization, and are zeroed. As the FB-Mem paper runs it (1% sparsity):

- layers: the second linear layer of every UNet transformer block's feed-forward (`ff.net.2`);
- per timestep t of the first `timesteps` denoising steps, over the memorized prompts: the
  input-feature norm ||X_j||_2 is taken over all tokens (spatial positions) and all prompts of
  the conditional half of classifier-free guidance; the empty prompt's norm over the same
  positions of the unconditional half, i.e. the empty prompt at the same states x_t;
- mask_t: a weight is in its output row's top `sparsity` (ceil, at least one weight) by the
  memorized prompts' score AND its score is above the empty prompt's score;
- the mask is the union of mask_t over the timesteps; the method zeroes it for every prompt.

One mask per run, from all the run's prompts (the job's prompt set is the memorized set, as in
the paper's evaluation); docs/mitigation-methods.md lists these choices.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.models.attention import FeedForward
from torch import nn

from scanner.mitigation.base import GenerationRows, MitigationMethod, State


@dataclass(frozen=True)
class WandaConfig:
    sparsity: float = 0.01  # the FB-Mem paper's 1% per output row
    timesteps: int = 10  # first denoising steps whose masks are united (Chavhan et al.)
    batch_size: int = 8  # prompts per UNet call while collecting input norms

    def __post_init__(self) -> None:
        if not 0.0 < self.sparsity <= 1.0:
            raise ValueError(f"sparsity must be in (0, 1], got {self.sparsity}")
        if self.timesteps < 1 or self.batch_size < 1:
            raise ValueError(
                f"timesteps and batch_size must be >= 1, got {self.timesteps}, {self.batch_size}"
            )


# --- scoring and masking: pure tensor functions --------------------------------------------


def wanda_scores(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 for a Linear weight (out, in) and its input-feature norms (in,)."""
    if weight.ndim != 2 or input_norm.shape != (weight.shape[1],):
        raise ValueError(
            f"need a weight (out, in) and norms (in,), got {tuple(weight.shape)}, "
            f"{tuple(input_norm.shape)}"
        )
    return weight.abs() * input_norm[None, :]


def row_top(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask of each row's top ceil(sparsity * columns) scores (at least one)."""
    k = max(1, math.ceil(sparsity * scores.shape[1]))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, scores.topk(k, dim=1).indices, True)
    return mask


def step_mask(
    weight: torch.Tensor, memorized_norm: torch.Tensor, empty_norm: torch.Tensor, sparsity: float
) -> torch.Tensor:
    """One timestep's mask: in the row's top `sparsity` for the memorized prompts, and above
    the empty prompt's score."""
    memorized = wanda_scores(weight, memorized_norm)
    return row_top(memorized, sparsity) & (memorized > wanda_scores(weight, empty_norm))


def layer_mask(
    weight: torch.Tensor,
    memorized_norms: Sequence[torch.Tensor],
    empty_norms: Sequence[torch.Tensor],
    sparsity: float,
) -> torch.Tensor:
    """The union over timesteps of `step_mask`, one (memorized, empty) pair of norms per step."""
    if len(memorized_norms) != len(empty_norms) or not memorized_norms:
        raise ValueError("need one memorized and one empty-prompt norm per timestep, at least one")
    mask = torch.zeros_like(weight, dtype=torch.bool)
    for memorized, empty in zip(memorized_norms, empty_norms):
        mask |= step_mask(weight, memorized, empty, sparsity)
    return mask


# --- the model -----------------------------------------------------------------------------


def ff_layers(unet: nn.Module) -> list[str]:
    """Module paths of `ff.net.2`, the feed-forward's output Linear, of every transformer block.

    Found by structure (diffusers `FeedForward` modules), so tiny test UNets and SD v1.x alike
    work; SD v1.x has 16 (down 6, mid 1, up 9).
    """
    names = [
        f"{name}.net.2"
        for name, module in unet.named_modules()
        if isinstance(module, FeedForward) and isinstance(module.net[2], nn.Linear)
    ]
    if not names:
        raise ValueError(f"{type(unet).__name__} has no transformer feed-forward (ff.net.2) layers")
    return names


@dataclass(frozen=True, eq=False)
class InputNorms:
    """Per step and layer, the input-feature L2 norms of the two guidance halves."""

    layers: list[str]
    memorized: list[list[torch.Tensor]]  # [step][layer] -> (in,), conditional half
    empty: list[list[torch.Tensor]]  # [step][layer] -> (in,), unconditional half


def input_norms(
    generator,
    prompts: Sequence[str],
    prompt_ids: Sequence[int],
    config: WandaConfig = WandaConfig(),
) -> InputNorms:
    """Collect ||X_j||_2 over tokens and prompts at each of the first steps, batch by batch.

    Each prompt starts from its generation 0's latent and follows its guided trajectory; the
    sums of squares add up over batches, so the batch size changes nothing but rounding.
    """
    from scanner.mitigation.trajectory import first_steps

    unet = generator.unet
    layers = ff_layers(unet)
    steps = min(config.timesteps, generator.config.steps)
    sums = [[[0.0, 0.0] for _ in layers] for _ in range(steps)]  # [step][layer][cond, uncond]
    call: list = [None] * len(layers)  # the last UNet call's sums of squares, per layer

    def hook(index: int):
        def collect(module, inputs):
            uncond, cond = inputs[0].float().chunk(2)  # [empty; prompts], as the pipeline
            call[index] = (cond.pow(2).sum(dim=(0, 1)), uncond.pow(2).sum(dim=(0, 1)))

        return collect

    handles = [
        unet.get_submodule(name).register_forward_pre_hook(hook(i)) for i, name in enumerate(layers)
    ]
    try:
        for start in range(0, len(prompts), config.batch_size):
            ids = list(prompt_ids[start : start + config.batch_size])
            batch = list(prompts[start : start + config.batch_size])
            for step in first_steps(generator, batch, ids, [0] * len(ids), steps):
                for index, (cond, uncond) in enumerate(call):  # this step's UNet call
                    slot = sums[step.index][index]
                    slot[0], slot[1] = slot[0] + cond, slot[1] + uncond
    finally:
        for handle in handles:
            handle.remove()
    return InputNorms(
        layers=layers,
        memorized=[[torch.sqrt(cond) for cond, _ in step] for step in sums],
        empty=[[torch.sqrt(uncond) for _, uncond in step] for step in sums],
    )


def wanda_mask(
    generator, prompts: Sequence[str], prompt_ids: Sequence[int], config: WandaConfig
) -> dict[str, np.ndarray]:
    """The run's mask as arrays: `layers` (module paths), and per masked weight its `layer`
    (index into `layers`), `row` (output feature) and `col` (input feature)."""
    if len(prompts) == 0:
        raise ValueError("Wanda needs at least one memorized prompt to compute its mask")
    norms = input_norms(generator, prompts, prompt_ids, config)
    found = {"layer": [], "row": [], "col": []}
    for index, name in enumerate(norms.layers):
        weight = generator.unet.get_submodule(name).weight.detach().float()
        memorized = [step[index] for step in norms.memorized]
        empty = [step[index] for step in norms.empty]
        rows, cols = layer_mask(weight, memorized, empty, config.sparsity).nonzero(as_tuple=True)
        found["layer"].append(np.full(len(rows), index, dtype=np.int32))
        found["row"].append(rows.cpu().numpy().astype(np.int32))
        found["col"].append(cols.cpu().numpy().astype(np.int32))
    return {"layers": np.array(norms.layers), **{k: np.concatenate(v) for k, v in found.items()}}


@contextmanager
def pruned(unet: nn.Module, mask: State) -> Iterator[None]:
    """Zero the masked weights inside the block; the originals come back on exit."""
    layers = ff_layers(unet)
    if list(mask["layers"]) != layers:
        raise ValueError(
            f"the Wanda mask is for layers {list(mask['layers'])[:3]}... ({len(mask['layers'])}), "
            f"this UNet has {layers[:3]}... ({len(layers)}): it was computed on another model"
        )
    saved = []
    try:
        with torch.no_grad():
            for index, name in enumerate(layers):
                chosen = mask["layer"] == index
                if not chosen.any():
                    continue
                weight = unet.get_submodule(name).weight
                rows, cols = mask["row"][chosen], mask["col"][chosen]
                if rows.max() >= weight.shape[0] or cols.max() >= weight.shape[1]:
                    raise ValueError(
                        f"the Wanda mask of {name} lies outside its weight {tuple(weight.shape)}"
                    )
                rows = torch.from_numpy(rows).long().to(weight.device)
                cols = torch.from_numpy(cols).long().to(weight.device)
                saved.append((weight, rows, cols, weight[rows, cols].clone()))
                weight[rows, cols] = 0
        yield
    finally:
        with torch.no_grad():
            for weight, rows, cols, values in saved:
                weight[rows, cols] = values


class Wanda(MitigationMethod):
    """`wanda`: one mask from all the run's prompts, zeroed for every generation."""

    kind = "weight-editing"
    prepares = True

    def __init__(self, config: WandaConfig = WandaConfig()):
        self.config = config
        self.name = "wanda"

    @classmethod
    def from_name(cls, name: str) -> Wanda:
        if name.strip() != "wanda":
            raise ValueError(f"method {name!r}: wanda takes no options; write 'wanda'")
        return cls()

    def prepare(self, generator, prompts, prompt_ids) -> dict[str, np.ndarray]:
        return wanda_mask(generator, prompts, prompt_ids, self.config)

    def settings(self, latent_shape) -> dict:
        return {
            "layers": "ff.net.2",
            "sparsity": self.config.sparsity,
            "timesteps": self.config.timesteps,
            "batch_size": self.config.batch_size,  # moves float rounding only
        }

    def generate(self, generator, rows: GenerationRows, state: State | None) -> np.ndarray:
        if state is None:
            raise ValueError("wanda generates with its mask: run its prepare step first")
        with pruned(generator.unet, state):
            return generator(rows.prompts, rows.prompt_ids, rows.gen_idxs)
