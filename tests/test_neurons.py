"""NeMo neuron discovery and the per-sample scaling hooks, on the tiny UNet and SD v1.4's shape."""

from __future__ import annotations

import hashlib

import pytest
import torch
from diffusers import UNet2DConditionModel

from scanner.neurons import (
    SD_V1_4_HOLDOUT_STATISTICS,
    ValueLayer,
    neuron_mask_to_scales,
    scale_neurons,
    value_layers,
)
from scanner.tiny_sd import sd_v1_unet_on_meta

SD_V1_4_LAYERS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v",
    "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_v",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet(tiny_sd_dir) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet").eval()


@pytest.fixture(scope="module")
def unet_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """Two samples laid out as classifier-free guidance does: rows [uncond0, uncond1, cond0, cond1]."""
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=gen).repeat(2, 1, 1, 1)
    text = torch.randn(4, 77, 32, generator=gen)
    return latents, text


def run_capturing(unet, inputs, layer: ValueLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """UNet output and the given layer's to_v output (after any scaling hook installed before)."""
    captured = []
    # Forward hooks run in registration order, each seeing the previous one's result, so this
    # one sees the scaled output when called inside scale_neurons.
    handle = unet.get_submodule(layer.name).register_forward_hook(
        lambda module, args, output: captured.append(output.detach().clone())
    )
    try:
        with torch.no_grad():
            out = unet(inputs[0], 500, encoder_hidden_states=inputs[1]).sample
    finally:
        handle.remove()
    return out, captured[0]


def test_value_layers_of_the_tiny_unet_follow_forward_order(unet):
    layers = value_layers(unet)
    assert [layer.name for layer in layers] == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v",
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_v",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    ]
    assert [layer.index for layer in layers] == [0, 1, 2, 3]
    assert [layer.size for layer in layers] == [32, 64, 64, 64]


def test_sd_v1_4_architecture_has_nemos_7_layers_and_5760_neurons():
    layers = value_layers(sd_v1_unet_on_meta())
    assert [layer.name for layer in layers] == SD_V1_4_LAYERS
    assert [layer.size for layer in layers] == [320, 320, 640, 640, 1280, 1280, 1280]
    assert sum(layer.size for layer in layers) == 5760


def test_shipped_sd_v1_4_statistics_line_up_with_the_layers():
    data = SD_V1_4_HOLDOUT_STATISTICS.read_bytes()
    assert hashlib.md5(data).hexdigest() == "cfe00e5b554c6f516cfcfe4468896dcb"  # as published
    means, stds = torch.load(SD_V1_4_HOLDOUT_STATISTICS, weights_only=True)
    sizes = [layer.size for layer in value_layers(sd_v1_unet_on_meta())]
    assert [m.shape for m in means] == [torch.Size([s]) for s in sizes]
    assert [s.shape for s in stds] == [torch.Size([s]) for s in sizes]
    assert all(torch.isfinite(m).all() for m in means)
    assert all((s > 0).all() for s in stds)  # z-scores divide by them


def test_value_layers_rejects_a_non_unet():
    with pytest.raises(TypeError, match="Linear"):
        value_layers(torch.nn.Linear(2, 2))


def test_zeroing_hits_only_the_chosen_channels_of_the_chosen_sample(unet, unet_inputs):
    layer = value_layers(unet)[1]
    channels = [3, 17, 40]
    scale = torch.ones(2, layer.size)
    scale[0, channels] = 0.0  # sample 0 only
    base_out, base_v = run_capturing(unet, unet_inputs, layer)
    with scale_neurons(unet, {layer.index: scale}):
        out, v = run_capturing(unet, unet_inputs, layer)
    for row in (0, 2):  # sample 0, unconditional and conditional halves
        assert (v[row][:, channels] == 0).all()
        others = [c for c in range(layer.size) if c not in channels]
        assert torch.equal(v[row][:, others], base_v[row][:, others])
        assert not torch.equal(out[row], base_out[row])
    for row in (1, 3):  # sample 1: untouched, all the way to the UNet's output
        assert torch.equal(v[row], base_v[row])
        assert torch.equal(out[row], base_out[row])


def test_dampening_multiplies_exactly_and_without_guidance_too(unet, unet_inputs):
    layers = value_layers(unet)
    neurons = [{(1, 5), (3, 0), (3, 63)}, set()]  # sample 0 dampened, sample 1 as is
    scales = neuron_mask_to_scales(neurons, layers, alpha=0.2)
    cond_only = (unet_inputs[0][2:], unet_inputs[1][2:])  # B rows: no guidance
    for layer in (layers[1], layers[3]):
        _, base_v = run_capturing(unet, cond_only, layer)
        with scale_neurons(unet, scales):
            _, v = run_capturing(unet, cond_only, layer)
        chosen = [c for lay, c in neurons[0] if lay == layer.index]
        expected = base_v.clone()
        expected[0][:, chosen] = base_v[0][:, chosen] * 0.2
        assert torch.equal(v, expected)


def test_a_shared_scale_applies_to_every_sample(unet, unet_inputs):
    layer = value_layers(unet)[0]
    scale = torch.ones(layer.size)
    scale[7] = 0.1
    _, base_v = run_capturing(unet, unet_inputs, layer)
    with scale_neurons(unet, {0: scale}):
        _, v = run_capturing(unet, unet_inputs, layer)
    expected = base_v.clone()
    expected[:, :, 7] = base_v[:, :, 7] * 0.1
    assert torch.equal(v, expected)


def test_hooks_are_removed_on_exit_and_on_error(unet, unet_inputs):
    layer = value_layers(unet)[2]
    base_out, _ = run_capturing(unet, unet_inputs, layer)
    zero_all = {i.index: torch.zeros(i.size) for i in value_layers(unet)}
    with scale_neurons(unet, zero_all):
        hooked_out, _ = run_capturing(unet, unet_inputs, layer)
    assert not torch.equal(hooked_out, base_out)
    assert torch.equal(run_capturing(unet, unet_inputs, layer)[0], base_out)
    with pytest.raises(RuntimeError, match="boom"), scale_neurons(unet, zero_all):
        raise RuntimeError("boom")
    assert torch.equal(run_capturing(unet, unet_inputs, layer)[0], base_out)


def test_neuron_mask_to_scales_builds_per_sample_scales():
    layers = [ValueLayer("a", 0, 4), ValueLayer("b", 1, 3), ValueLayer("c", 2, 2)]
    scales = neuron_mask_to_scales([[(0, 1), (2, 1)], [], [(0, 3), (0, 1)]], layers, alpha=0.1)
    assert sorted(scales) == [0, 2]  # layer 1 untouched: no hook needed
    torch.testing.assert_close(
        scales[0], torch.tensor([[1, 0.1, 1, 1], [1, 1, 1, 1], [1, 0.1, 1, 0.1]]), rtol=0, atol=0
    )
    torch.testing.assert_close(scales[2], torch.tensor([[1, 0.1], [1, 1], [1, 1]]), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("neurons", "alpha", "message"),
    [
        ([[(0, 4)]], 0.0, "channel 4 is outside layer 0"),
        ([[(5, 0)]], 0.0, "layer 5 does not exist"),
        ([[(0, 0)]], 1.5, "alpha must be in"),
        ([[(0, 0)]], -0.1, "alpha must be in"),
    ],
)
def test_neuron_mask_to_scales_rejects_bad_input(neurons, alpha, message):
    with pytest.raises(ValueError, match=message):
        neuron_mask_to_scales(neurons, [ValueLayer("a", 0, 4)], alpha)


@pytest.mark.parametrize(
    ("scales", "error", "message"),
    [
        ({9: torch.ones(32)}, ValueError, "layer 9 does not exist"),
        ({0: torch.ones(31)}, ValueError, r"shape \(32,\) or \(B, 32\), got \(31,\)"),
        ({0: torch.ones(1, 2, 32)}, ValueError, "got \\(1, 2, 32\\)"),
        ({0: [1.0] * 32}, TypeError, "torch.Tensor"),
        ({0: torch.ones(2, 32), 1: torch.ones(3, 64)}, ValueError, "disagree on the batch size"),
    ],
)
def test_scale_neurons_rejects_bad_scales(unet, scales, error, message):
    with pytest.raises(error, match=message), scale_neurons(unet, scales):
        pass


def test_scales_for_the_wrong_batch_fail_loudly(unet, unet_inputs):
    with scale_neurons(unet, {0: torch.ones(3, 32)}), pytest.raises(ValueError, match="3 samples"):
        run_capturing(unet, unet_inputs, value_layers(unet)[0])
