"""NeMo's memorization signal and the per-prompt localization recipe built on it.

A memorized prompt pulls the UNet towards one image whatever noise it starts from, so its
predicted noise minus the starting noise looks alike across starting latents; for other
prompts it looks like the (different) noise itself. NeMo (Hintersdorf et al. 2024) reads this
from one UNet call per latent, no guidance, and uses it twice: to decide that a prompt is
memorized, and, with neurons blocked, as the score its neuron search drives down. Everything
here follows NeMo's official code; docs/mitigation.md lists where it is more specific than
the paper.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from torch import nn

from scanner.mitigation.search import (
    Neuron,
    NeuronSearchResult,
    ScoreFn,
    SearchConfig,
    search_neurons,
)
from scanner.neurons import neuron_mask_to_scales, scale_neurons, value_layers
from scanner.similarity import blur

# NeMo's similarity is torchmetrics' MS-SSIM as its code calls it: Gaussian window of 11 taps,
# sigma 1.5, K = (0.01, 0.03), 2x2 average pooling between scales (see noise_ms_ssim).
_WINDOW, _SIGMA, _K1, _K2 = 11, 1.5, 0.01, 0.03


@dataclass(frozen=True)
class SignalConfig:
    num_samples: int = 10  # NeMo's samples_per_prompt: initial latents per prompt
    seed: int = 1  # NeMo's --seed: every prompt starts from the same latents
    num_inference_steps: int = 50  # NeMo's schedule; only fixes which timestep is used
    # Index into that schedule of the one timestep the UNet is called at. 1 = NeMo's code
    # (t = 961 for SD v1.4; its first UNet call, at t = 981, is discarded); the paper says
    # the first step (0). NeMo's 0.428 threshold was calibrated with the code, so 1.
    timestep_index: int = 1
    threshold: float = 0.428  # NeMo's pairwise SSIM threshold: above it a sample memorizes
    scale_weights: tuple[float, ...] = (0.33, 0.33, 0.33)  # NeMo's code; the paper: 1/3 each
    latent_side: int | None = None  # None: the UNet's sample_size (64 = NeMo's 512 px / 8)
    alpha: float = 0.0  # NeMo's scaling_factor: blocked neurons are multiplied by it

    def __post_init__(self) -> None:
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 to compare samples, got {self.num_samples}")
        if not 0 <= self.timestep_index < self.num_inference_steps:
            raise ValueError(
                f"timestep_index must be in [0, {self.num_inference_steps}), "
                f"got {self.timestep_index}"
            )
        if not self.scale_weights or any(w <= 0 for w in self.scale_weights):
            raise ValueError(f"scale_weights must be positive, got {self.scale_weights}")
        if self.latent_side is not None:
            _check_side(self.latent_side, len(self.scale_weights))
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")


# --- activations ---------------------------------------------------------------------------


@torch.no_grad()
def text_embeddings(tokenizer, text_encoder: nn.Module, prompts: Sequence[str]) -> torch.Tensor:
    """(B, 77, D) CLIP embeddings as NeMo makes them: padded to the context, truncated."""
    tokens = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return text_encoder(tokens.input_ids.to(text_encoder.device))[0]


@torch.no_grad()
def prompt_activations(unet: nn.Module, embeddings: torch.Tensor) -> list[np.ndarray]:
    """Per value layer, (B, C_l): the mean over token positions of |to_v(text embedding)|.

    `to_v` of a cross-attention sees the text embedding itself, so no UNet call is needed
    (NeMo's statistics script calls the layers directly too). Computed in float32 whatever the
    UNet's dtype, as NeMo's statistics were.
    """
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must be (batch, tokens, dim), got {tuple(embeddings.shape)}")
    if getattr(unet, "encoder_hid_proj", None) is not None:
        raise ValueError(
            "this UNet projects the text embedding before attention (encoder_hid_proj)"
        )
    activations = []
    for layer in value_layers(unet):
        attention = unet.get_submodule(layer.name.rsplit(".", 1)[0])
        if getattr(attention, "norm_cross", None) is not None:
            raise ValueError(f"{layer.name}: the text embedding is normalized before to_v")
        to_v = unet.get_submodule(layer.name)
        bias = None if to_v.bias is None else to_v.bias.float()
        values = F.linear(embeddings.to(to_v.weight.device).float(), to_v.weight.float(), bias)
        activations.append(values.abs().mean(dim=1).cpu().numpy())
    return activations


def holdout_statistics(
    activations: Sequence[np.ndarray],
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-neuron mean and std over prompts; `activations[l]` is (prompts, C_l).

    The std is the sample std (n - 1), as torch.std in NeMo's statistics script.
    """
    for layer, values in enumerate(activations):
        if values.ndim != 2 or values.shape[0] < 2:
            raise ValueError(
                f"layer {layer}: need (prompts >= 2, channels) activations, got {values.shape}"
            )
    return (
        [values.mean(axis=0) for values in activations],
        [values.std(axis=0, ddof=1) for values in activations],
    )


# --- similarity ----------------------------------------------------------------------------


def noise_ms_ssim(x: torch.Tensor, y: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Per pair, MS-SSIM of noise differences (B, C, H, W), as NeMo computes it.

    torchmetrics' definition, which NeMo calls: per scale, contrast-structure (the last scale:
    full SSIM) averaged over channels and pixels, clamped at 0, then the product of their
    weighted powers; the data range behind K1 and K2 is measured again at every scale (NeMo
    leaves torchmetrics' data_range unset). torchmetrics measures it over the whole batch;
    here it is per pair, so a pair's score does not depend on its batch. Unlike
    pytorch-msssim it works on 64 px latents: only the coarsest scale must still hold an
    11-tap window (sides >= 44 for 3 scales).
    """
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(
            f"expected two (B, C, H, W) tensors of one shape, got {x.shape}, {y.shape}"
        )
    _check_side(min(x.shape[-2:]), len(weights))
    x, y = x.float(), y.float()
    window = _gaussian_window(x.device)
    terms = []
    for level in range(len(weights)):
        if level:
            x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
        data_range = torch.maximum(_value_range(x), _value_range(y))
        c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
        mu_x, mu_y = blur(x, window), blur(y, window)
        var_x = (blur(x * x, window) - mu_x**2).clamp(min=0)
        var_y = (blur(y * y, window) - mu_y**2).clamp(min=0)
        cov = blur(x * y, window) - mu_x * mu_y
        term = (2 * cov + c2) / (var_x + var_y + c2)
        if level == len(weights) - 1:
            term = term * (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1)
        terms.append(term.flatten(1).mean(dim=1).relu())
    powers = torch.tensor(weights, dtype=x.dtype, device=x.device).view(-1, 1)
    return (torch.stack(terms) ** powers).prod(dim=0)


def max_pairwise_similarity(diffs: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """For each sample, its highest MS-SSIM to any other sample, shape (n,)."""
    n = diffs.shape[0]
    first, second = torch.triu_indices(n, n, offset=1, device=diffs.device)
    similarity = noise_ms_ssim(diffs[first], diffs[second], weights)
    table = torch.full((n, n), -torch.inf, device=diffs.device)
    table[first, second] = similarity
    table[second, first] = similarity
    return table.max(dim=1).values


def _value_range(x: torch.Tensor) -> torch.Tensor:
    """max - min of each item, shaped to broadcast over (B, C, H, W)."""
    flat = x.flatten(1)
    return (flat.amax(dim=1) - flat.amin(dim=1)).view(-1, 1, 1, 1)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    offsets = torch.arange(_WINDOW, dtype=torch.float64) - _WINDOW // 2
    window = torch.exp(-((offsets / _SIGMA) ** 2) / 2)
    return (window / window.sum()).to(device=device, dtype=torch.float32)


def _check_side(side: int, scales: int) -> None:
    if side >> (scales - 1) < _WINDOW:
        raise ValueError(
            f"latents of side {side} are too small for {scales}-scale MS-SSIM with an "
            f"{_WINDOW}-tap window: need at least {_WINDOW << (scales - 1)}"
        )


# --- the signal ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Detection:
    pairwise_max: np.ndarray  # (num_samples,) each sample's highest similarity to another
    samples: tuple[int, ...]  # the samples above the threshold: the memorizing ones
    reference: torch.Tensor  # their noise differences without blocking

    @property
    def memorized(self) -> bool:
        return bool(self.samples)


class MemorizationSignal:
    """NeMo's detection and search score for one UNet; counts the UNet calls it makes."""

    def __init__(self, unet: nn.Module, scheduler, config: SignalConfig = SignalConfig()) -> None:
        self.unet = unet
        self.config = config
        self.layers = value_layers(unet)
        self.timestep = detection_timestep(scheduler, config)
        side = config.latent_side or unet.config.sample_size
        _check_side(side, len(config.scale_weights))
        # Kept in float32: the difference is taken against the latents as drawn, whatever
        # precision the UNet runs in (NeMo ran it under fp16 autocast).
        self.latents = initial_latents(config, unet.config.in_channels, side).to(unet.device)
        self.unet_calls = 0

    @torch.no_grad()
    def noise_differences(
        self,
        embedding: torch.Tensor,
        neurons: frozenset[Neuron] = frozenset(),
        samples: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """UNet noise prediction minus the latent, min-max normalized per sample and channel.

        One batched UNet call on the chosen samples' latents (all by default) with `neurons`
        multiplied by alpha. `embedding` is one prompt's (77, D) or (1, 77, D) embedding.
        """
        latents = self.latents if samples is None else self.latents[list(samples)]
        context = embedding.reshape(1, *embedding.shape[-2:]).to(latents.device, self.unet.dtype)
        per_sample = neuron_mask_to_scales([neurons], self.layers, self.config.alpha)
        shared = {index: scale[0] for index, scale in per_sample.items()}
        with scale_neurons(self.unet, shared):
            # NeMo's DDIM scheduler leaves the model input unscaled, so the latent goes in as is.
            noise = self.unet(
                latents.to(self.unet.dtype),
                self.timestep,
                encoder_hidden_states=context.expand(len(latents), -1, -1),
            ).sample
        self.unet_calls += 1
        diff = noise.float() - latents
        low = diff.amin(dim=(2, 3), keepdim=True)
        high = diff.amax(dim=(2, 3), keepdim=True)
        return (diff - low) / (high - low)

    def detect(self, embedding: torch.Tensor) -> Detection:
        """Is the prompt memorized: does some sample resemble another above the threshold."""
        diffs = self.noise_differences(embedding)
        pairwise = max_pairwise_similarity(diffs, self.config.scale_weights).cpu().numpy()
        samples = tuple(int(i) for i in np.flatnonzero(pairwise > self.config.threshold))
        return Detection(pairwise_max=pairwise, samples=samples, reference=diffs[list(samples)])

    def blocked_score(self, embedding: torch.Tensor, detection: Detection) -> ScoreFn:
        """The search's score: max over memorizing samples of MS-SSIM(unblocked, blocked)."""
        if not detection.memorized:
            raise ValueError("the prompt is not memorized: there is no sample to score")

        def score(neurons: frozenset[Neuron]) -> float:
            blocked = self.noise_differences(embedding, neurons, detection.samples)
            similarity = noise_ms_ssim(detection.reference, blocked, self.config.scale_weights)
            return float(similarity.max())

        return score


def detection_timestep(scheduler, config: SignalConfig) -> int:
    """The timestep of the signal: NeMo's DDIM schedule built from the model's scheduler config."""
    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(config.num_inference_steps)
    return int(ddim.timesteps[config.timestep_index])


def initial_latents(config: SignalConfig, channels: int, side: int) -> torch.Tensor:
    """(num_samples, channels, side, side) on the CPU: the i-th latent is the seed's i-th draw."""
    generator = torch.Generator().manual_seed(config.seed)
    return torch.randn((config.num_samples, channels, side, side), generator=generator)


# --- one prompt ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptLocalization:
    memorized: bool
    pairwise_max: tuple[float, ...]  # per sample, see Detection
    search: NeuronSearchResult | None  # None when the prompt is not memorized
    unet_calls: int  # 1 for detection + one per search score


def localize_prompt(
    signal: MemorizationSignal,
    embedding: torch.Tensor,
    means: Sequence[np.ndarray],
    stds: Sequence[np.ndarray],
    search_config: SearchConfig = SearchConfig(),
) -> PromptLocalization:
    """NeMo for one prompt: detect memorization, then search its neurons if memorized."""
    # 1. Detection: one UNet call on all samples.
    calls_before = signal.unet_calls
    detection = signal.detect(embedding)
    result = None
    if detection.memorized:
        # 2. The prompt's activations: no UNet call.
        one = embedding.reshape(1, *embedding.shape[-2:])
        acts = [layer[0] for layer in prompt_activations(signal.unet, one)]
        # 3. Initial selection and refinement: one UNet call per score.
        score = signal.blocked_score(embedding, detection)
        result = search_neurons(acts, means, stds, score, search_config)
    return PromptLocalization(
        memorized=detection.memorized,
        pairwise_max=tuple(detection.pairwise_max.tolist()),
        search=result,
        unet_calls=signal.unet_calls - calls_before,
    )
