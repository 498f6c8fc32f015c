"""DetectMem: the detection score by hand on a stub UNet, the optimization on the tiny SD."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from scanner.generate import GenerationConfig, Generator
from scanner.mitigation.base import GenerationRows
from scanner.mitigation.detectmem import (
    DetectMem,
    DetectMemConfig,
    detection_scores,
    mitigated_embeddings,
    optimize_embedding,
    text_noise_norm,
)
from scanner.mitigation.methods import get_method
from scanner.mitigation.trajectory import prompt_embeddings
from scanner.tiny_sd import TINY_SIZE

PROMPTS = ["Shaw Floors carpet in a living room", "a red car"]


class StubUNet(nn.Module):
    """eps(x, e) = x / 2 + a * m(e), m(e) the mean over tokens of the embedding's first feature
    (CLIP's final layer norm makes the mean over all features ~0): the text-conditional part
    a * (m(e) - m(e_empty)) is the same at every latent, so its norm is
    |a (m(e) - m(e_empty))| * sqrt(latent elements) at every step."""

    def __init__(self, a: float, channels: int, sample_size: int):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.config = SimpleNamespace(in_channels=channels, sample_size=sample_size)

    dtype = torch.float32
    device = torch.device("cpu")

    def forward(self, x, t, encoder_hidden_states):
        shift = self.a * encoder_hidden_states[..., 0].mean(dim=1)
        return SimpleNamespace(sample=x / 2 + shift.view(-1, 1, 1, 1))


@pytest.fixture(scope="module")
def generator(tiny_sd_dir, one_thread) -> Generator:
    config = GenerationConfig(model=str(tiny_sd_dir), steps=3, size=TINY_SIZE, batch_size=2)
    return Generator(config)


@pytest.fixture
def stubbed(generator):
    """The tiny generator with its UNet swapped for the stub, restored after the test."""
    real = (
        generator.pipeline.unet
    )  # set past diffusers' __setattr__, which records it in the config
    object.__setattr__(generator.pipeline, "unet", StubUNet(3.0, *generator.latent_shape[:2]))
    yield generator
    object.__setattr__(generator.pipeline, "unet", real)


def test_detection_score_by_hand_on_a_stub_unet(stubbed):
    cond, empty = prompt_embeddings(stubbed, PROMPTS)
    elements = math.prod(stubbed.latent_shape)
    expected = [
        abs(3.0 * (cond[i, :, 0].mean() - empty[i, :, 0].mean()).item()) * math.sqrt(elements)
        for i in range(len(PROMPTS))
    ]
    for steps in (1, 3):  # the same at every step, so the same averaged over any steps
        scores = detection_scores(stubbed, PROMPTS, [0, 1], [0, 0], steps)
        np.testing.assert_allclose(scores, expected, rtol=1e-5)
    with pytest.raises(ValueError, match=r"count must be in \[1, 3\]"):
        detection_scores(stubbed, PROMPTS, [0, 1], [0, 0], 4)


def test_text_noise_norm_is_per_sample():
    a = torch.zeros(2, 4, 8, 8)
    b = torch.zeros(2, 4, 8, 8)
    b[1] = 0.5  # 256 elements of 0.5: norm 8
    assert text_noise_norm(b, a).tolist() == [0.0, 8.0]


def test_optimization_steps_keep_the_bos_token_but_for_weight_decay():
    """On the stub, the loss a * |m(e) - m(e0)| * sqrt(n) has the same gradient for every token;
    BOS must not move except by AdamW's decoupled weight decay (0.01, torch's default)."""
    unet = StubUNet(1.0, 4, 8)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    e = torch.randn(77, 32, generator=torch.Generator().manual_seed(1)) + 1  # mean 1: far off
    empty = torch.zeros(77, 32)
    config = DetectMemConfig(lr=0.05, iterations=4)
    result = optimize_embedding(unet, x, 981, e, empty, target=0.0, config=config)
    assert result.steps == 4 and len(result.losses) == 5  # 4 steps, then the final check
    assert result.losses[-1] < result.losses[0]
    decay = (1 - 0.05 * 0.01) ** 4
    torch.testing.assert_close(result.embedding[0], e[0] * decay)
    assert not torch.allclose(result.embedding[1:], e[1:] * decay)


def test_optimization_stops_at_the_target():
    unet = StubUNet(1.0, 4, 8)
    x, e, empty = torch.zeros(1, 4, 8, 8), torch.ones(77, 32), torch.zeros(77, 32)
    result = optimize_embedding(unet, x, 981, e, empty, target=100.0)
    assert result.steps == 0 and result.losses == pytest.approx((16.0,))  # 1 * 1 * sqrt(256)
    assert torch.equal(result.embedding, e)


@pytest.mark.parametrize(
    ("shape", "target"),
    [((4, 64, 64), 3.0), ((4, 8, 8), 0.375), ((8, 16, 16), 3.0 * math.sqrt(2048 / 16384))],
)
def test_target_loss_scales_with_the_latent_size(shape, target):
    settings = DetectMem().settings(shape)
    assert settings["target_loss"] == pytest.approx(target)
    assert settings["paper_target_loss"] == 3.0 and settings["latent_shape"] == list(shape)
    assert DetectMemConfig(target_loss=1.5).target_for(shape) == 1.5


def test_optimization_lowers_the_detection_norm_on_the_tiny_model(generator):
    config = DetectMemConfig()
    _, results = mitigated_embeddings(generator, PROMPTS, [0, 1], [0, 0], 0.0, config)
    # the first loss is the one-step detection score, computed by the other (batched) path
    scores = detection_scores(generator, PROMPTS, [0, 1], [0, 0], 1)
    np.testing.assert_allclose([r.losses[0] for r in results], scores, rtol=1e-3)
    for result in results:
        assert result.steps == 10 and result.losses[-1] < 0.95 * result.losses[0]


def test_detectmem_generates_from_the_optimized_embedding(generator):
    rows = GenerationRows(PROMPTS, [0, 1], [0, 0], [[], []])
    plain = get_method("none").generate(generator, rows, None)
    mitigated = get_method("detectmem").generate(generator, rows, None)
    assert np.abs(mitigated - plain).max() > 1e-3
    # with nothing to optimize (target above any loss) the embedding is the prompt's own
    lenient = DetectMem(DetectMemConfig(target_loss=1e9)).generate(generator, rows, None)
    np.testing.assert_allclose(lenient, plain, atol=2e-6)


def test_prompt_embeds_path_matches_the_prompts(generator):
    cond, _ = prompt_embeddings(generator, PROMPTS)
    from_embeds = generator(PROMPTS, [0, 1], [0, 1], prompt_embeds=cond)
    np.testing.assert_allclose(from_embeds, generator(PROMPTS, [0, 1], [0, 1]), atol=2e-6)
    with pytest.raises(ValueError, match="prompt_embeds must be"):
        generator(PROMPTS, [0, 1], [0, 1], prompt_embeds=cond[:1])
