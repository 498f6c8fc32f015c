"""Text-to-image generation with reproducible noise and optional per-sample neuron scaling.

A scan compares each generation with training images, and a mitigation is judged by the label
change of the *same* generation before and after (DESIGN 4.7), so the starting noise of
generation (prompt_id, gen_idx) must depend on nothing but the run's seed and those ids: not on
which prompts share a batch, the batch size, or the worker. The noise is therefore drawn on the
CPU from generators keyed by those ids, and handed to the pipeline as explicit latents.

Noise keys (DESIGN 7):
- default, as the paper and NeMo's code: every prompt starts from the same N latents; latent
  i is the i-th draw of `torch.randn(latent_shape)` from a CPU generator seeded with `seed`
  (equal to row i of one `torch.randn((N, *latent_shape))` draw, which is what a pipeline
  call with `num_images_per_prompt=N` and that generator draws).
- `per_prompt_noise`: the same, from a CPU generator seeded with
  `stable_seed("latents", seed, prompt_id)`, so prompts get independent noise.
Schedulers that add noise at each step (ancestral ones, DDIM with eta > 0) get one CPU
generator per sample, seeded with `stable_seed("steps", seed, gen_idx)` (or with the prompt id
as well under `per_prompt_noise`); DDIM as used here (eta = 0) adds none.
"""

from __future__ import annotations

import hashlib
import logging
import math
import operator
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from scanner.neurons import scale_neurons

SchedulerName = Literal["ddim", "model-default"]
DtypeName = Literal["auto", "float16", "float32"]


@dataclass(frozen=True)
class GenerationConfig:
    model: str  # local diffusers folder or model id (read from the local Hugging Face cache)
    steps: int = 50  # the paper's and SD v1.4's setting
    guidance: float = 7.5  # SD v1.4's default classifier-free guidance; <= 1 turns guidance off
    size: int = 512  # SD v1's training resolution, and the scanner's canonical size
    scheduler: SchedulerName = "ddim"  # the paper generates with DDIM (eta = 0)
    seed: int = 0  # the run's seed; all noise derives from it (DESIGN 7)
    per_prompt_noise: bool = False  # False: all prompts share the same N latents, as the paper
    device: str = "cpu"
    dtype: DtypeName = "auto"  # fp16 on CUDA (what SD is served in), fp32 elsewhere
    batch_size: int = 8  # images per pipeline call; shorter calls are padded (see _generate)
    trust_remote_code: bool = False  # remote pipeline code runs only when asked (DESIGN 7)

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a local path or model id, got {self.model!r}")
        for name in ("steps", "size", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance!r}")
        if self.scheduler not in get_args(SchedulerName):
            raise ValueError(
                f"scheduler must be one of {get_args(SchedulerName)}, got {self.scheduler!r}"
            )
        if self.dtype not in get_args(DtypeName):
            raise ValueError(f"dtype must be one of {get_args(DtypeName)}, got {self.dtype!r}")
        try:
            torch.device(self.device)
        except RuntimeError as exc:
            raise ValueError(f"device {self.device!r} is not a torch device ({exc})") from None

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if torch.device(self.device).type == "cuda" else torch.float32
        return getattr(torch, self.dtype)


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from its parts, the same on every machine and Python run (unlike hash())."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


class _TruncationOnce(logging.Filter):
    """diffusers logs CLIP's 77-token truncation on every pipeline call (every batch of a
    scan); the first notice says it for all, the rest are dropped."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "truncated because CLIP" not in record.getMessage():
            return True
        if self.seen:
            return False
        self.seen = True
        record.msg = f"{record.getMessage()} (said once per process: later prompts over 77 tokens are truncated the same way)"
        record.args = ()
        return True


_TRUNCATION_ONCE = _TruncationOnce()


def _load_pipeline(config: GenerationConfig) -> DiffusionPipeline:
    index = DiffusionPipeline.load_config(config.model)  # model_index.json: the components
    overrides = {}
    if "safety_checker" in index:  # the scanner must see what the model makes, unfiltered
        overrides = {"safety_checker": None, "requires_safety_checker": False}
    pipeline = DiffusionPipeline.from_pretrained(
        config.model,
        dtype=config.torch_dtype,
        trust_remote_code=config.trust_remote_code,
        **overrides,
    )
    if not hasattr(pipeline, "unet") or not hasattr(pipeline, "vae_scale_factor"):
        raise ValueError(
            f"{config.model}: {type(pipeline).__name__} is not a UNet text-to-image pipeline "
            "(Stable Diffusion 1.x/2.x style), which is what the scanner generates with"
        )
    if config.scheduler == "ddim":
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    elif config.scheduler != "model-default":
        raise ValueError(f"unknown scheduler {config.scheduler!r}")
    if pipeline.unet.dtype != config.torch_dtype:  # older diffusers ignore `dtype` (torch_dtype)
        pipeline.to(dtype=config.torch_dtype)
    pipeline.set_progress_bar_config(disable=True)
    logging.getLogger(type(pipeline).__module__).addFilter(_TRUNCATION_ONCE)  # once per process
    # Attention already runs through PyTorch SDPA: diffusers' default processor on torch >= 2.
    return pipeline.to(device=config.device)


def latent_shape(model: str, size: int) -> tuple[int, int, int]:
    """(channels, side, side) of the model's latents at `size` px, from its configs alone, as
    the pipeline derives them (VAE factor 2 ** (VAE blocks - 1))."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.load_config(model, subfolder="unet")
    vae = AutoencoderKL.load_config(model, subfolder="vae")
    side = size // 2 ** (len(vae["block_out_channels"]) - 1)
    return (int(unet["in_channels"]), side, side)


def _ids(name: str, values: Sequence[int], expected: int) -> list[int]:
    """`values` as non-negative Python ints, one per prompt."""
    if len(values) != expected:
        raise ValueError(f"{name} has {len(values)} entries, expected {expected} (one per prompt)")
    ids = [operator.index(v) for v in values]  # TypeError for floats and strings
    negative = [v for v in ids if v < 0]
    if negative:
        raise ValueError(f"{name} must be >= 0, got {negative[:5]}")
    return ids


class Generator:
    """A diffusers text-to-image pipeline whose images are reproducible per (prompt_id, gen_idx)."""

    def __init__(self, config: GenerationConfig) -> None:
        self.config = config
        self.pipeline = _load_pipeline(config)
        factor = self.pipeline.vae_scale_factor
        if config.size % factor:
            raise ValueError(
                f"size must be a multiple of the VAE's factor {factor}, got {config.size}"
            )
        side = config.size // factor
        self.latent_shape = (self.pipeline.unet.config.in_channels, side, side)
        self._shared_rng = _cpu_generator(config.seed)  # default mode: draws continue from here
        self._shared_draws: list[torch.Tensor] = []  # latent i of every prompt (N is small)

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipeline.unet

    def _draws(self, rng: torch.Generator, drawn: list[torch.Tensor], upto: int) -> None:
        while len(drawn) <= upto:
            drawn.append(torch.randn(self.latent_shape, generator=rng))

    def initial_latents(self, prompt_ids: Sequence[int], gen_idxs: Sequence[int]) -> torch.Tensor:
        """(B, C, h, w) float32 CPU noise for each (prompt_id, gen_idx), before scheduler scaling."""
        n = len(prompt_ids)
        prompt_ids, gen_idxs = _ids("prompt_ids", prompt_ids, n), _ids("gen_idxs", gen_idxs, n)
        if not self.config.per_prompt_noise:
            self._draws(self._shared_rng, self._shared_draws, max(gen_idxs, default=-1))
            return torch.stack([self._shared_draws[g] for g in gen_idxs])
        pairs = list(zip(prompt_ids, gen_idxs, strict=True))
        per_prompt: dict[int, list[torch.Tensor]] = {}
        for pid in sorted(set(prompt_ids)):
            upto = max(g for p, g in pairs if p == pid)
            rng = _cpu_generator(stable_seed("latents", self.config.seed, pid))
            self._draws(rng, per_prompt.setdefault(pid, []), upto)
        return torch.stack([per_prompt[p][g] for p, g in pairs])

    def step_generators(self, prompt_ids: list[int], gen_idxs: list[int]) -> list[torch.Generator]:
        """The per-sample generators of the scheduler's step noise (see the module docstring)."""
        seed = self.config.seed
        if self.config.per_prompt_noise:
            return [
                _cpu_generator(stable_seed("steps", seed, p, g))
                for p, g in zip(prompt_ids, gen_idxs, strict=True)
            ]
        return [_cpu_generator(stable_seed("steps", seed, g)) for g in gen_idxs]

    def __call__(
        self,
        prompts: Sequence[str],
        prompt_ids: Sequence[int],
        gen_idxs: Sequence[int],
        neuron_scales: Mapping[int, torch.Tensor] | None = None,
        prompt_embeds: torch.Tensor | None = None,
    ) -> np.ndarray:
        """Generate one image per prompt: (B, 3, size, size) float32 in [0, 1].

        `neuron_scales` (see `scanner.neurons.scale_neurons`) holds, per value layer, a (B, C)
        per-sample channel scale or a (C,) scale for all; None generates the model as is.
        `prompt_embeds` (B, tokens, D) replaces the text encoder's embedding of `prompts` (which
        then only name the rows), as DetectMem's optimized embeddings do; the unconditional
        half stays the empty prompt's.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, got a single string")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be strings, got {type(bad[0]).__name__}: {bad[0]!r}")
        n = len(prompts)
        prompt_ids = _ids("prompt_ids", prompt_ids, n)
        gen_idxs = _ids("gen_idxs", gen_idxs, n)
        for index, scale in (neuron_scales or {}).items():
            if isinstance(scale, torch.Tensor) and scale.ndim == 2 and scale.shape[0] != n:
                raise ValueError(
                    f"neuron_scales[{index}] has {scale.shape[0]} rows, expected {n} (one per prompt)"
                )
        if prompt_embeds is not None and (prompt_embeds.ndim != 3 or len(prompt_embeds) != n):
            raise ValueError(
                f"prompt_embeds must be (B={n}, tokens, dim), one per prompt, "
                f"got {tuple(prompt_embeds.shape)}"
            )
        if n == 0:
            return np.zeros((0, 3, self.config.size, self.config.size), dtype=np.float32)
        images = []
        size = self.config.batch_size
        for start in range(0, n, size):
            stop = min(start + size, n)
            # Pad to a full batch with copies of the last row: see _generate.
            rows = list(range(start, stop)) + [stop - 1] * (size - (stop - start))
            chunk_scales = None
            if neuron_scales:
                chunk_scales = {
                    i: s[rows] if isinstance(s, torch.Tensor) and s.ndim == 2 else s
                    for i, s in neuron_scales.items()
                }
            chunk = self._generate(
                [prompts[r] for r in rows],
                [prompt_ids[r] for r in rows],
                [gen_idxs[r] for r in rows],
                chunk_scales,
                None if prompt_embeds is None else prompt_embeds[rows],
            )
            images.append(chunk[: stop - start])
        return np.concatenate(images)

    def _generate(
        self,
        prompts: list[str],
        prompt_ids: list[int],
        gen_idxs: list[int],
        neuron_scales: Mapping[int, torch.Tensor] | None,
        prompt_embeds: torch.Tensor | None = None,
    ) -> np.ndarray:
        """One pipeline call on exactly `batch_size` rows.

        CPU and GPU kernels choose their algorithm (and so their float rounding) by tensor shape:
        oneDNN convolutions, GroupNorm and small matmuls give a sample different bits in a batch
        of 1 than in a batch of 4. With every call the same shape, a generation's bits depend
        only on its own inputs, never on which prompts share its batch.
        """
        cfg = self.config
        latents = self.initial_latents(prompt_ids, gen_idxs).to(cfg.device, cfg.torch_dtype)
        hooks = scale_neurons(self.unet, neuron_scales) if neuron_scales else nullcontext()
        with hooks:
            text = {"prompt": prompts}
            if prompt_embeds is not None:
                text = {"prompt_embeds": prompt_embeds.to(cfg.device, cfg.torch_dtype)}
            output = self.pipeline(
                **text,
                height=cfg.size,
                width=cfg.size,
                num_inference_steps=cfg.steps,
                guidance_scale=cfg.guidance,
                latents=latents,
                generator=self.step_generators(prompt_ids, gen_idxs),
                output_type="np",
            )
        return np.ascontiguousarray(output.images.transpose(0, 3, 1, 2), dtype=np.float32)
