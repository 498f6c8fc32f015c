"""DetectMem (Wen et al. 2024): detect memorization by the text-conditional noise prediction,
and mitigate it at inference time by optimizing the prompt embedding.

A memorized prompt pulls the model hard towards its image, so the text-conditional part of the
noise prediction, eps(x_t, prompt) - eps(x_t, ""), is large from the first steps on:

- detection score: the L2 norm of that difference per generation, averaged over the first
  denoising steps of the guided generation (`detection_scores`);
- mitigation: before generating, minimize that norm at the first step, on the generation's
  own initial latent, over the prompt's text embedding: AdamW (lr 0.05, torch's default weight
  decay 0.01, as Wen et al.'s code), at most 10 iterations, stopping as soon as the norm is at
  or below a target; the gradient of the BOS token's embedding is zeroed. The image is then
  generated from the optimized embedding and the same initial latent.

The paper's target loss 3 is for SD v1.4's 4 x 64 x 64 latents; the norm grows with the square
root of the number of elements, so the target here is 3 * sqrt(latent elements / 16384) unless
given (`DetectMemConfig.target_loss`); the job records the value used in its manifest.

Wen et al.'s code optimizes one embedding per prompt against all its latents at once (the norm
of the whole batch); here each generation gets its own embedding from its own latent, so a
generation depends on its own ids only (DESIGN 7) and the paper's per-latent target applies.
Its training-time variant fine-tunes the model and is not run here: a model fine-tuned that way
is mitigated with the method `none` on `--model PATH` (docs/mitigation-methods.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from scanner.mitigation.base import GenerationRows, MitigationMethod, State

PAPER_TARGET_LOSS = 3.0  # Wen et al.'s target for SD v1.4
PAPER_LATENT_ELEMENTS = 4 * 64 * 64  # SD v1.4's latent at 512 px, which that target is for


@dataclass(frozen=True)
class DetectMemConfig:
    lr: float = 0.05  # Wen et al.'s --optim_lr
    iterations: int = 10  # Wen et al.'s --optim_iters: at most this many steps
    target_loss: float | None = None  # None: PAPER_TARGET_LOSS scaled to the latent's size

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.iterations < 0:
            raise ValueError(f"need lr > 0 and iterations >= 0, got {self.lr}, {self.iterations}")
        if self.target_loss is not None and not self.target_loss >= 0:
            raise ValueError(f"target_loss must be >= 0 or None, got {self.target_loss}")

    def target_for(self, latent_shape: Sequence[int]) -> float:
        """The stopping loss for one latent of this shape (C, h, w)."""
        if self.target_loss is not None:
            return self.target_loss
        return PAPER_TARGET_LOSS * math.sqrt(math.prod(latent_shape) / PAPER_LATENT_ELEMENTS)


def text_noise_norm(eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> torch.Tensor:
    """Per sample, ||eps(x_t, prompt) - eps(x_t, "")||_2 over all latent elements, (B,)."""
    return (eps_cond.float() - eps_uncond.float()).flatten(1).norm(dim=1)


def detection_scores(
    generator,
    prompts: Sequence[str],
    prompt_ids: Sequence[int],
    gen_idxs: Sequence[int],
    steps: int,
) -> np.ndarray:
    """Each generation's detection score: the text-conditional norm averaged over its first
    `steps` denoising steps (Wen et al. report 1, 10 and 50). Higher means more memorized."""
    from scanner.mitigation.trajectory import first_steps

    norms = [
        text_noise_norm(step.eps_cond, step.eps_uncond)
        for step in first_steps(generator, prompts, prompt_ids, gen_idxs, steps)
    ]
    return torch.stack(norms).mean(dim=0).cpu().numpy()


@dataclass(frozen=True, eq=False)
class Optimized:
    embedding: torch.Tensor  # (tokens, D) float32, the embedding to generate from
    losses: tuple[float, ...]  # the norm at each evaluation; [0] is the one-step detection score
    steps: int  # optimizer steps taken (0 when the first norm already met the target)


def optimize_embedding(
    unet: nn.Module,
    model_input: torch.Tensor,
    timestep: int,
    embedding: torch.Tensor,
    empty: torch.Tensor,
    target: float,
    config: DetectMemConfig = DetectMemConfig(),
) -> Optimized:
    """Lower ||eps(x, e) - eps(x, "")|| over the text embedding e of one generation.

    `model_input` (1, C, h, w) is the first step's scaled latent, `embedding` and `empty` are
    the prompt's and the empty prompt's (tokens, D) embeddings. The embedding is optimized in
    float32 whatever the UNet's dtype (Adam's moments need it).
    """
    with torch.no_grad():  # the empty prompt's prediction does not depend on e
        eps_uncond = unet(model_input, timestep, encoder_hidden_states=empty[None]).sample
    e = embedding.detach().float().clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([e], lr=config.lr)
    losses, steps = [], 0
    with torch.enable_grad():
        for _ in range(config.iterations + 1):  # the last evaluation only checks the target
            eps_cond = unet(model_input, timestep, encoder_hidden_states=e[None].to(unet.dtype))
            loss = text_noise_norm(eps_cond.sample, eps_uncond)[0]
            losses.append(loss.item())
            if losses[-1] <= target or steps == config.iterations:
                break
            (grad,) = torch.autograd.grad(loss, [e])
            grad[0] = 0  # the BOS token's embedding is the same for every prompt: keep it
            e.grad = grad
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
    return Optimized(embedding=e.detach(), losses=tuple(losses), steps=steps)


def mitigated_embeddings(
    generator,
    prompts: Sequence[str],
    prompt_ids: Sequence[int],
    gen_idxs: Sequence[int],
    target: float,
    config: DetectMemConfig,
) -> tuple[torch.Tensor, list[Optimized]]:
    """Each generation's optimized embedding (B, tokens, D), from its own initial latent."""
    from scanner.mitigation.trajectory import prompt_embeddings

    pipe = generator.pipeline
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(generator.config.steps, device=pipe.device)
    first = scheduler.timesteps[0]
    cond, uncond = prompt_embeddings(generator, prompts)
    latents = generator.initial_latents(prompt_ids, gen_idxs).to(pipe.device, pipe.unet.dtype)
    results = []
    for i in range(len(prompts)):  # one at a time: a generation depends on its own inputs only
        x = scheduler.scale_model_input(latents[i : i + 1] * scheduler.init_noise_sigma, first)
        results.append(optimize_embedding(pipe.unet, x, first, cond[i], uncond[i], target, config))
    return torch.stack([r.embedding for r in results]), results


class DetectMem(MitigationMethod):
    """`detectmem`: per generation, the prompt embedding optimized on its initial latent."""

    kind = "prompt-optimization"

    def __init__(self, config: DetectMemConfig = DetectMemConfig()):
        self.config = config
        self.name = "detectmem"

    @classmethod
    def from_name(cls, name: str) -> DetectMem:
        if name.strip() != "detectmem":
            raise ValueError(f"method {name!r}: detectmem takes no options; write 'detectmem'")
        return cls()

    def settings(self, latent_shape) -> dict:
        return {
            "lr": self.config.lr,
            "iterations": self.config.iterations,
            "target_loss": self.config.target_for(latent_shape),
            "paper_target_loss": PAPER_TARGET_LOSS,
            "latent_shape": list(latent_shape),
        }

    def generate(self, generator, rows: GenerationRows, state: State | None) -> np.ndarray:
        target = self.config.target_for(generator.latent_shape)
        embeds, _ = mitigated_embeddings(
            generator, rows.prompts, rows.prompt_ids, rows.gen_idxs, target, self.config
        )
        return generator(rows.prompts, rows.prompt_ids, rows.gen_idxs, prompt_embeds=embeds)
