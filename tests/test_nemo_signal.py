"""NeMo's memorization signal: its MS-SSIM against scikit-image, and the tiny SD pipeline."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from skimage.metrics import structural_similarity

from scanner.mitigation.search import SearchConfig
from scanner.mitigation.signal import (
    MemorizationSignal,
    SignalConfig,
    detection_timestep,
    holdout_statistics,
    initial_latents,
    localize_prompt,
    max_pairwise_similarity,
    noise_ms_ssim,
    prompt_activations,
    text_embeddings,
)
from scanner.neurons import value_layers

WEIGHTS = (0.33, 0.33, 0.33)
# The tiny UNet's own 8 x 8 latents are too small for 3-scale MS-SSIM; 48 is the smallest
# side the UNet (divisible by 8) and the 11-tap window at the third scale (>= 44) both accept.
TINY = SignalConfig(num_samples=2, latent_side=48)


def normalized(x: torch.Tensor) -> torch.Tensor:
    low, high = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    return (x - low) / (high - low)


def related_pair(seed: int, batch: int = 4, side: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 4, side, side, generator=g)
    return normalized(x), normalized(0.6 * x + 0.4 * torch.rand(x.shape, generator=g))


def skimage_ms_ssim(x: np.ndarray, y: np.ndarray, weights) -> float:
    """One pair (C, H, W) through scikit-image: SSIM per scale, cs from SSIM with C1 -> inf."""
    terms = []
    for level in range(len(weights)):
        if level:
            x = x.reshape(x.shape[0], x.shape[1] // 2, 2, x.shape[2] // 2, 2).mean(axis=(2, 4))
            y = y.reshape(y.shape[0], y.shape[1] // 2, 2, y.shape[2] // 2, 2).mean(axis=(2, 4))
        data_range = max(np.ptp(x), np.ptp(y))
        # A huge K1 makes SSIM's luminance factor 1, leaving contrast-structure alone.
        k1 = 0.01 if level == len(weights) - 1 else 1e4
        value = structural_similarity(
            x,
            y,
            data_range=data_range,
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            K1=k1,
            K2=0.03,
        )
        terms.append(max(value, 0.0))
    return float(np.prod(np.array(terms) ** np.array(weights)))


# --- similarity, pure ----------------------------------------------------------------------


@pytest.mark.parametrize("side", [48, 64])
def test_ms_ssim_matches_scikit_image(side):
    x, y = related_pair(seed=side, side=side)
    ours = noise_ms_ssim(x, y, WEIGHTS)
    expected = [
        skimage_ms_ssim(a.double().numpy(), b.double().numpy(), WEIGHTS)
        for a, b in zip(x, y, strict=True)
    ]
    np.testing.assert_allclose(ours.numpy(), expected, atol=2e-5)
    assert 0.5 < min(expected) < max(expected) < 0.95  # a real range, not a trivial 0 or 1


def test_ms_ssim_is_one_on_identical_inputs_and_batch_independent():
    x, y = related_pair(seed=1)
    np.testing.assert_allclose(noise_ms_ssim(x, x, WEIGHTS).numpy(), 1.0, atol=1e-6)
    one_by_one = torch.cat([noise_ms_ssim(x[i : i + 1], y[i : i + 1], WEIGHTS) for i in range(4)])
    torch.testing.assert_close(noise_ms_ssim(x, y, WEIGHTS), one_by_one)


def test_ms_ssim_rejects_latents_too_small_for_three_scales():
    x, _ = related_pair(seed=2, side=40)
    with pytest.raises(ValueError, match="side 40 .* need at least 44"):
        noise_ms_ssim(x, x, WEIGHTS)
    with pytest.raises(ValueError, match="need at least 44"):
        SignalConfig(latent_side=32)


def test_max_pairwise_similarity_takes_each_samples_best_partner():
    x, y = related_pair(seed=3, batch=2)
    diffs = torch.stack([x[0], x[0], y[1]])  # samples 0 and 1 identical
    best = max_pairwise_similarity(diffs, WEIGHTS)
    to_2 = noise_ms_ssim(diffs[:2], diffs[2:].expand(2, -1, -1, -1), WEIGHTS)
    torch.testing.assert_close(best, torch.stack([best.new_tensor(1.0)] * 2 + [to_2.max()]))


def test_holdout_statistics_use_the_sample_std_as_nemo():
    rng = np.random.default_rng(0)
    acts = [rng.random((5, 3)), rng.random((5, 7))]
    means, stds = holdout_statistics(acts)
    for values, mean, std in zip(acts, means, stds, strict=True):
        torch.testing.assert_close(torch.from_numpy(mean), torch.from_numpy(values).mean(0))
        torch.testing.assert_close(torch.from_numpy(std), torch.from_numpy(values).std(0))
    with pytest.raises(ValueError, match="prompts >= 2"):
        holdout_statistics([rng.random((1, 3))])


def test_config_defaults_and_checks():
    config = SignalConfig()
    assert (config.num_samples, config.seed, config.timestep_index) == (10, 1, 1)
    assert (config.threshold, config.alpha, config.latent_side) == (0.428, 0.0, None)
    with pytest.raises(ValueError, match="timestep_index"):
        SignalConfig(timestep_index=50)
    with pytest.raises(ValueError, match="num_samples"):
        SignalConfig(num_samples=1)


def test_latents_are_nemos_draws_in_order():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)  # what NeMo's code does before drawing its latents
        nemo = torch.randn((10, 4, 64, 64))
    torch.testing.assert_close(initial_latents(SignalConfig(), 4, 64), nemo, rtol=0, atol=0)
    three = initial_latents(SignalConfig(num_samples=3), 4, 64)
    torch.testing.assert_close(three, nemo[:3], rtol=0, atol=0)


# --- the tiny pipeline ---------------------------------------------------------------------

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(tiny_sd_dir):
    return StableDiffusionPipeline.from_pretrained(tiny_sd_dir)


@pytest.fixture(scope="module")
def embedding(pipe):
    return text_embeddings(pipe.tokenizer, pipe.text_encoder, ["a photo of a red chair"])[0]


def test_text_embeddings_match_the_pipelines_encoder(pipe, embedding):
    expected = pipe.encode_prompt("a photo of a red chair", "cpu", 1, False)[0][0]
    assert embedding.shape == (77, 32)
    torch.testing.assert_close(embedding, expected)


def test_detection_timestep_is_the_second_of_fifty_ddim_steps(pipe):
    assert detection_timestep(pipe.scheduler, SignalConfig()) == 961
    assert detection_timestep(pipe.scheduler, SignalConfig(timestep_index=0)) == 981


def test_activations_equal_the_value_layers_outputs_inside_the_unet(pipe, embedding):
    unet, layers = pipe.unet, value_layers(pipe.unet)
    seen = {}
    handles = [
        unet.get_submodule(layer.name).register_forward_hook(
            lambda module, inputs, output, i=layer.index: seen.setdefault(i, output[0])
        )
        for layer in layers
    ]
    try:
        with torch.no_grad():
            unet(torch.randn(1, 4, 8, 8), 961, encoder_hidden_states=embedding[None])
    finally:
        for handle in handles:
            handle.remove()
    ours = prompt_activations(unet, embedding[None])
    assert [a.shape for a in ours] == [(1, layer.size) for layer in layers]
    for layer in layers:
        expected = seen[layer.index].abs().mean(dim=0).numpy()
        np.testing.assert_allclose(ours[layer.index][0], expected, rtol=1e-5, atol=1e-7)


def test_noise_differences_are_normalized_deterministic_and_one_call(pipe, embedding):
    first = MemorizationSignal(pipe.unet, pipe.scheduler, TINY)
    diffs = first.noise_differences(embedding)
    assert diffs.shape == (2, 4, 48, 48)
    assert first.unet_calls == 1
    np.testing.assert_allclose(diffs.amin(dim=(2, 3)).numpy(), 0.0, atol=1e-7)
    np.testing.assert_allclose(diffs.amax(dim=(2, 3)).numpy(), 1.0, atol=1e-6)
    again = MemorizationSignal(pipe.unet, pipe.scheduler, TINY).noise_differences(embedding)
    torch.testing.assert_close(diffs, again, rtol=0, atol=0)
    # A subset of samples gives those samples' differences (batch composition is irrelevant).
    torch.testing.assert_close(
        first.noise_differences(embedding, samples=[1]), diffs[1:], atol=1e-5, rtol=0
    )


def test_blocked_score_is_one_for_nothing_blocked_and_drops_when_blocking(pipe, embedding):
    forced = SignalConfig(num_samples=2, latent_side=48, threshold=-1.0)  # every sample memorizes
    signal = MemorizationSignal(pipe.unet, pipe.scheduler, forced)
    detection = signal.detect(embedding)
    assert detection.memorized and detection.samples == (0, 1)
    score = signal.blocked_score(embedding, detection)
    assert score(frozenset()) == pytest.approx(1.0, abs=1e-5)
    layers = value_layers(pipe.unet)
    everything = frozenset((layer.index, c) for layer in layers for c in range(layer.size))
    assert score(everything) < 0.999  # a random tiny model leans little on the text
    assert signal.unet_calls == 3


def test_blocking_equals_zeroing_the_value_weights(pipe, embedding):
    # SD v1's to_v has no bias: a zeroed output channel is a zeroed weight row.
    neurons = frozenset({(0, 1), (0, 7), (3, 5)})
    blocked = MemorizationSignal(pipe.unet, pipe.scheduler, TINY).noise_differences(
        embedding, neurons
    )
    edited = copy.deepcopy(pipe.unet)
    layers = value_layers(edited)
    with torch.no_grad():
        for layer, channel in neurons:
            edited.get_submodule(layers[layer].name).weight[channel] = 0.0
    expected = MemorizationSignal(edited, pipe.scheduler, TINY).noise_differences(embedding)
    torch.testing.assert_close(blocked, expected)
    unblocked = MemorizationSignal(pipe.unet, pipe.scheduler, TINY).noise_differences(embedding)
    assert (blocked - unblocked).abs().max() > 1e-4


def test_unmemorized_prompt_costs_one_unet_call(pipe, embedding):
    never = SignalConfig(num_samples=2, latent_side=48, threshold=1.0)  # MS-SSIM <= 1
    signal = MemorizationSignal(pipe.unet, pipe.scheduler, never)
    result = localize_prompt(signal, embedding, means=[], stds=[])
    assert not result.memorized and result.search is None
    assert result.unet_calls == signal.unet_calls == 1
    assert len(result.pairwise_max) == 2


def test_localization_costs_one_unet_call_per_score_plus_detection(pipe, embedding):
    signal = MemorizationSignal(
        pipe.unet, pipe.scheduler, SignalConfig(num_samples=2, latent_side=48, threshold=-1.0)
    )
    acts = [a[0] for a in prompt_activations(pipe.unet, embedding[None])]
    means = [a.copy() for a in acts]
    stds = [np.ones_like(a) for a in acts]
    for layer, channel in [(0, 1), (0, 2), (3, 0)]:
        means[layer][channel] -= 10.0  # z = 10: outliers at the first (theta, k) = (5, 0)
    # Any score passes the threshold 2: the selection stops at once and refinement unblocks
    # layer 3, then layer 0 (2 calls); no neuron is left for the neuron pass.
    result = localize_prompt(signal, embedding, means, stds, SearchConfig(threshold=2.0))
    search = result.search
    assert search.initial == {(0, 1), (0, 2), (3, 0)} and search.refined == frozenset()
    assert [step.stage for step in search.trace] == ["initial", "layer", "layer"]
    assert search.score_calls == 3
    assert result.unet_calls == signal.unet_calls == 1 + 3
