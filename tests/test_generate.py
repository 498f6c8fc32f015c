"""Generation through diffusers' real loading path, with reproducible noise and neuron hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionPipeline,
)
from safetensors.torch import load_file

from scanner.generate import GenerationConfig, Generator, stable_seed
from scanner.neurons import neuron_mask_to_scales, value_layers
from scanner.tiny_sd import TINY_SIZE, build_tiny_pipeline

PROMPTS = ["Shaw Floors carpet in a living room", "a red car", "mountains at dawn", "a cat"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny_model(tiny_sd_dir) -> str:
    return str(tiny_sd_dir)


def make(model: str, **overrides) -> Generator:
    settings = {"steps": 2, "size": TINY_SIZE, "batch_size": 4, "seed": 3} | overrides
    return Generator(GenerationConfig(model=model, **settings))


@pytest.fixture(scope="module")
def generator(tiny_model) -> Generator:
    return make(tiny_model)


def test_loads_the_saved_pipeline_as_configured(generator):
    pipeline = generator.pipeline
    assert isinstance(pipeline, StableDiffusionPipeline)
    assert isinstance(pipeline.scheduler, DDIMScheduler)
    assert pipeline.safety_checker is None
    assert pipeline.unet.dtype == torch.float32  # "auto" on CPU
    images = generator([PROMPTS[0], "Café 東京 🎨"], [0, 1], [0, 0])  # byte-level tokenizer
    assert images.shape == (2, 3, TINY_SIZE, TINY_SIZE) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert images.std() > 0.01  # a picture, not a constant


def test_tiny_pipeline_is_deterministic_and_leaves_the_global_rng_alone(tiny_model, tmp_path):
    state = torch.random.get_rng_state()
    again = build_tiny_pipeline(tmp_path / "again", seed=0)
    other = build_tiny_pipeline(tmp_path / "other", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    weights = "unet/diffusion_pytorch_model.safetensors"
    reference = load_file(f"{tiny_model}/{weights}")
    same, different = load_file(again / weights), load_file(other / weights)
    assert all(torch.equal(reference[k], same[k]) for k in reference)
    assert not all(torch.equal(reference[k], different[k]) for k in reference)


def test_default_latents_are_the_seeded_generators_sequential_draws(generator):
    # The oracle: what one pipeline call with num_images_per_prompt=5 and this seed draws.
    oracle = torch.randn((5, *generator.latent_shape), generator=torch.Generator().manual_seed(3))
    latents = generator.initial_latents([8, 2, 8, 5], [4, 0, 1, 4])
    assert torch.equal(latents, oracle[[4, 0, 1, 4]])  # same for every prompt
    assert torch.equal(generator.initial_latents([0], [2]), oracle[[2]])


def test_per_prompt_noise_keys_latents_by_prompt(tiny_model):
    generator = make(tiny_model, per_prompt_noise=True)
    latents = generator.initial_latents([7, 7, 8], [0, 2, 0])
    assert not torch.equal(latents[0], latents[2])
    assert stable_seed("latents", 3, 7) == 0x6FB68DC8A2F7C433  # fixed forever: reruns must agree
    seeded = torch.Generator().manual_seed(stable_seed("latents", 3, 7))
    oracle = torch.randn((3, *generator.latent_shape), generator=seeded)
    assert torch.equal(latents[:2], oracle[[0, 2]])


def test_images_do_not_depend_on_batch_composition(generator):
    alone = generator([PROMPTS[0]], [10], [1])
    in_three = generator([PROMPTS[2], PROMPTS[1], PROMPTS[0]], [12, 11, 10], [1, 0, 1])
    # 6 prompts at batch_size 4: the target is the 2nd row of the second, padded, call.
    prompts = [PROMPTS[1], PROMPTS[2], PROMPTS[3], PROMPTS[1], PROMPTS[3], PROMPTS[0]]
    mixed = generator(prompts, [11, 12, 13, 11, 13, 10], [0, 2, 1, 1, 0, 1])
    assert np.array_equal(in_three[2], alone[0])
    assert np.array_equal(mixed[5], alone[0])
    assert np.array_equal(mixed[0], in_three[1])  # prompt 11, gen 0 in both
    assert not np.array_equal(mixed[0], mixed[3])  # same prompt, gen_idx 0 and 1 differ


def test_step_noise_of_ancestral_schedulers_is_keyed_too(tiny_model, tmp_path):
    pipeline = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipeline.scheduler = EulerAncestralDiscreteScheduler.from_config(pipeline.scheduler.config)
    pipeline.save_pretrained(tmp_path)
    generator = make(str(tmp_path), scheduler="model-default")
    assert isinstance(generator.pipeline.scheduler, EulerAncestralDiscreteScheduler)
    alone = generator([PROMPTS[1]], [4], [0])
    mixed = generator([PROMPTS[0], PROMPTS[1]], [2, 4], [1, 0])
    assert np.array_equal(mixed[1], alone[0])


def test_neuron_scales_change_only_their_own_sample(generator):
    layers = value_layers(generator.unet)
    prompts, ids, gens = PROMPTS[:3], [0, 1, 2], [0, 0, 0]
    base = generator(prompts, ids, gens)
    neurons = [[], [(layer.index, c) for layer in layers for c in range(layer.size)], []]
    scaled = generator(prompts, ids, gens, neuron_scales=neuron_mask_to_scales(neurons, layers, 0))
    assert np.array_equal(scaled[[0, 2]], base[[0, 2]])
    assert np.abs(scaled[1] - base[1]).max() > 0.01
    assert np.array_equal(generator(prompts, ids, gens), base)  # hooks gone afterwards


def test_neuron_scales_follow_their_rows_across_padded_calls(generator):
    layers = value_layers(generator.unet)
    prompts, ids, gens = PROMPTS + PROMPTS[:1], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]
    neurons = [[]] * 4 + [[(0, c) for c in range(layers[0].size)]]  # only the 5th, in call 2
    scales = neuron_mask_to_scales(neurons, layers, alpha=0.0)
    batched = generator(prompts, ids, gens, neuron_scales=scales)
    alone = generator(prompts[4:], ids[4:], gens[4:], neuron_scales={0: scales[0][4:]})
    assert np.array_equal(batched[4], alone[0])
    assert np.array_equal(batched[:4], generator(prompts[:4], ids[:4], gens[:4]))


def test_empty_call_gives_an_empty_batch(generator):
    assert generator([], [], []).shape == (0, 3, TINY_SIZE, TINY_SIZE)


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (("a cat", [0], [0]), TypeError, "single string"),
        (([None], [0], [0]), TypeError, "NoneType"),
        ((["a"], [0, 1], [0]), ValueError, "prompt_ids has 2 entries, expected 1"),
        ((["a"], [0], [-1]), ValueError, r"gen_idxs must be >= 0, got \[-1\]"),
        ((["a"], [0.5], [0]), TypeError, "float"),
    ],
)
def test_call_rejects_bad_input(generator, args, error, message):
    with pytest.raises(error, match=message):
        generator(*args)


def test_call_rejects_scales_for_another_batch(generator):
    with pytest.raises(ValueError, match="2 rows, expected 1"):
        generator(["a"], [0], [0], neuron_scales={0: torch.ones(2, 32)})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("steps", 0, "steps must be a positive integer"),
        ("batch_size", 2.0, "batch_size must be a positive integer"),
        ("seed", -1, "seed must be an integer"),
        ("guidance", float("nan"), "guidance must be a finite number"),
        ("scheduler", "pndm", "scheduler must be one of"),
        ("dtype", "bfloat16", "dtype must be one of"),
        ("device", "gpu0", "not a torch device"),
        ("model", "", "model must be"),
    ],
)
def test_config_rejects_bad_values(field, value, message):
    settings = {"model": "some/model", field: value}
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**settings)


def test_auto_dtype_is_fp16_on_cuda_and_fp32_elsewhere():
    assert GenerationConfig(model="m", device="cuda:0").torch_dtype == torch.float16
    assert GenerationConfig(model="m", device="cpu").torch_dtype == torch.float32
    assert GenerationConfig(model="m", dtype="float16").torch_dtype == torch.float16


def test_size_must_fit_the_vae(tiny_model):
    with pytest.raises(ValueError, match="multiple of the VAE's factor 8, got 60"):
        make(tiny_model, size=60)


def test_clip_truncation_is_said_once_per_process(generator, monkeypatch):
    # diffusers logs the 77-token truncation on every pipeline call: every batch of a scan.
    import logging

    from scanner import generate

    monkeypatch.setattr(generate._TRUNCATION_ONCE, "seen", False)
    said: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logger = logging.getLogger(type(generator.pipeline).__module__)
    logger.addHandler(handler)
    try:
        long_prompt = "a very long prompt " * 10  # 190 bytes: over the 77-token context
        generator([long_prompt, PROMPTS[1]], [0, 1], [0, 0])
        generator([PROMPTS[2], long_prompt + "again"], [2, 3], [0, 0])
    finally:
        logger.removeHandler(handler)
    truncations = [m for m in said if "truncated because CLIP" in m]
    assert len(truncations) == 1 and "said once per process" in truncations[0]
