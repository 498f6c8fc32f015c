"""The first denoising steps of a generation, both guidance halves apart: what the baselines read.

Wanda reads the feed-forward inputs of the conditional and the unconditional half at each early
step; DetectMem reads the difference of the two halves' noise predictions. Both must see the
states x_t that the generation itself passes through, so this is the generator's own sampling
loop (its scheduler, initial latents, step noise and guidance scale) cut after the first steps,
without decoding. The unconditional half is the empty prompt, as in the pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from scanner.generate import Generator


@dataclass(frozen=True, eq=False)
class Step:
    index: int  # position in the generation's schedule, 0 = the first denoising step
    timestep: int
    latents: torch.Tensor  # x_t, (B, C, h, w), before the scheduler's input scaling
    eps_uncond: torch.Tensor  # noise prediction for the empty prompt, (B, C, h, w)
    eps_cond: torch.Tensor  # noise prediction for the prompt


@torch.no_grad()
def prompt_embeddings(
    generator: Generator, prompts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt, empty prompt) text embeddings, each (B, tokens, D), as the pipeline encodes them."""
    pipe = generator.pipeline
    cond, uncond = pipe.encode_prompt(list(prompts), pipe.device, 1, True)
    return cond, uncond


@torch.no_grad()
def first_steps(
    generator: Generator,
    prompts: Sequence[str],
    prompt_ids: Sequence[int],
    gen_idxs: Sequence[int],
    count: int,
) -> Iterator[Step]:
    """The first `count` steps of generating each (prompt, prompt_id, gen_idx), batched."""
    config, pipe = generator.config, generator.pipeline
    if not 1 <= count <= config.steps:
        raise ValueError(
            f"count must be in [1, {config.steps}] (the schedule's steps), got {count}"
        )
    cond, uncond = prompt_embeddings(generator, prompts)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)  # the pipeline's own
    scheduler.set_timesteps(config.steps, device=pipe.device)  # stays untouched
    latents = generator.initial_latents(prompt_ids, gen_idxs).to(pipe.device, pipe.unet.dtype)
    latents = latents * scheduler.init_noise_sigma
    extra = pipe.prepare_extra_step_kwargs(generator.step_generators(prompt_ids, gen_idxs), 0.0)
    context = torch.cat([uncond, cond])
    for index, t in enumerate(scheduler.timesteps[:count]):
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps_uncond, eps_cond = pipe.unet(
            model_input, t, encoder_hidden_states=context
        ).sample.chunk(2)
        yield Step(index, int(t), latents, eps_uncond, eps_cond)
        if config.guidance > 1:  # as the pipeline: no guidance at or below 1
            noise = eps_uncond + config.guidance * (eps_cond - eps_uncond)
        else:
            noise = eps_cond
        latents = scheduler.step(noise, t, latents, **extra).prev_sample
