"""NeMo's neurons and the hooks that scale them, per sample.

NeMo (Hintersdorf et al. 2024) localizes memorization in the output channels of the
cross-attention value projections (`attn2.to_v`) of the UNet's down blocks and mid block:
the only place where the text enters the UNet. Deactivating (alpha = 0) or dampening
(alpha = 0.1, 0.2) a neuron means multiplying its channel of `to_v`'s output by alpha, for
every token, both classifier-free-guidance halves and every denoising step. Because NeMo-C
gives each prompt cluster its own neuron set, the scale is per sample, so one batch can mix
prompts with different sets.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

# NeMo's per-neuron holdout mean and std for SD v1.4, in value_layers order (see data/LICENSE-nemo.md).
SD_V1_4_HOLDOUT_STATISTICS = Path(__file__).parent / "data" / "nemo_holdout_statistics_v1_4.pt"


@dataclass(frozen=True)
class ValueLayer:
    """One cross-attention value projection; its output channels are NeMo's neurons."""

    name: str  # module path in the UNet, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"
    index: int  # position in forward order; NeMo's layer number
    size: int  # output channels = neurons in this layer


def value_layers(unet: nn.Module) -> list[ValueLayer]:
    """The value projections of the cross-attentions in the down blocks, then the mid block.

    Found by structure (diffusers `Attention` modules that attend to the text), not by a list
    of names, so tiny test UNets and SD v1.x alike work. Up blocks are excluded, as in NeMo.
    """
    if not hasattr(unet, "down_blocks") or not hasattr(unet, "mid_block"):
        raise TypeError(
            f"expected a diffusers UNet with down_blocks and mid_block, got {type(unet).__name__}"
        )
    # named_modules() lists up_blocks before mid_block (registration order), so the forward
    # order is spelled out here.
    scopes = [(f"down_blocks.{i}", block) for i, block in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        scopes.append(("mid_block", unet.mid_block))
    layers: list[ValueLayer] = []
    for prefix, block in scopes:
        for name, module in block.named_modules():
            if isinstance(module, Attention) and module.is_cross_attention:
                layers.append(
                    ValueLayer(
                        name=f"{prefix}.{name}.to_v",
                        index=len(layers),
                        size=module.to_v.out_features,
                    )
                )
    return layers


def neuron_mask_to_scales(
    neurons_per_sample: Sequence[Iterable[tuple[int, int]]],
    layers: Sequence[ValueLayer],
    alpha: float,
) -> dict[int, torch.Tensor]:
    """Per-sample channel scales: alpha on each sample's (layer, channel) neurons, 1 elsewhere.

    Returns `{layer index: (B, size) float32 tensor}` for the layers that any sample touches,
    ready for `scale_neurons`. A sample with no neurons gets all ones (the model as is).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (0 deactivates, 0.1/0.2 dampen), got {alpha}")
    sizes = {layer.index: layer.size for layer in layers}
    scales: dict[int, torch.Tensor] = {}
    n = len(neurons_per_sample)
    for sample, neurons in enumerate(neurons_per_sample):
        for layer, channel in neurons:
            if layer not in sizes:
                raise ValueError(
                    f"sample {sample}: layer {layer} does not exist; layers are {sorted(sizes)}"
                )
            if not 0 <= channel < sizes[layer]:
                raise ValueError(
                    f"sample {sample}: channel {channel} is outside layer {layer} "
                    f"(0..{sizes[layer] - 1})"
                )
            if layer not in scales:
                scales[layer] = torch.ones(n, sizes[layer])
            scales[layer][sample, channel] = alpha
    return scales


def _checked_scales(
    layers: Sequence[ValueLayer], scales: Mapping[int, torch.Tensor]
) -> dict[int, torch.Tensor]:
    by_index = {layer.index: layer for layer in layers}
    batch_sizes = set()
    for index, scale in scales.items():
        if index not in by_index:
            raise ValueError(f"layer {index} does not exist; layers are {sorted(by_index)}")
        if not isinstance(scale, torch.Tensor):
            raise TypeError(
                f"layer {index}: scale must be a torch.Tensor, got {type(scale).__name__}"
            )
        size = by_index[index].size
        if scale.ndim not in (1, 2) or scale.shape[-1] != size:
            raise ValueError(
                f"layer {index}: scale must have shape ({size},) or (B, {size}), "
                f"got {tuple(scale.shape)}"
            )
        if scale.ndim == 2:
            batch_sizes.add(scale.shape[0])
    if len(batch_sizes) > 1:
        raise ValueError(f"per-sample scales disagree on the batch size: {sorted(batch_sizes)}")
    return dict(scales)


def _scaling_hook(scale: torch.Tensor):
    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        if scale.ndim == 1:
            return output * scale
        rows, samples = output.shape[0], scale.shape[0]
        if rows == samples:
            per_row = scale
        elif rows == 2 * samples:  # classifier-free guidance: [uncond; cond], same samples twice
            per_row = torch.cat([scale, scale])
        else:
            raise ValueError(
                f"scales are for {samples} samples, but the batch has {rows} rows "
                f"(expected {samples}, or {2 * samples} with classifier-free guidance)"
            )
        return output * per_row[:, None, :]

    return hook


@contextmanager
def scale_neurons(unet: nn.Module, scales: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Multiply the chosen value layers' output channels by per-sample scales inside the block.

    `scales` maps a layer index (see `value_layers`) to a (B, C) per-sample scale or a (C,)
    scale shared by all samples. The hooks are forward hooks on the `to_v` modules, removed on
    exit even when the block raises.
    """
    layers = value_layers(unet)
    checked = _checked_scales(layers, scales)
    handles = []
    try:
        for index, scale in checked.items():
            to_v = unet.get_submodule(layers[index].name)
            on_device = scale.to(device=to_v.weight.device, dtype=to_v.weight.dtype)
            handles.append(to_v.register_forward_hook(_scaling_hook(on_device)))
        yield
    finally:
        for handle in handles:
            handle.remove()
