"""Wanda pruning: its scoring and masking by hand, and the mask on the tiny SD."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scanner.generate import GenerationConfig, Generator
from scanner.mitigation.base import GenerationRows
from scanner.mitigation.methods import get_method
from scanner.mitigation.trajectory import first_steps
from scanner.mitigation.wanda import (
    Wanda,
    WandaConfig,
    ff_layers,
    input_norms,
    layer_mask,
    pruned,
    row_top,
    step_mask,
    wanda_scores,
)
from scanner.tiny_sd import TINY_SIZE, sd_v1_unet_on_meta

# A Linear(4 -> 2) by hand. Scores |W_ij| * ||X_j||:
#   memorized norms (1, 1, 2, 4): row 0 -> (1, 2, 6, 1), row 1 -> (4, 1, 2, 8)
#   empty norms   (2, 0.5, 1, 4): row 0 -> (2, 1, 3, 1), row 1 -> (8, 0.5, 1, 8)
WEIGHT = torch.tensor([[1.0, -2.0, 3.0, 0.25], [-4.0, 1.0, 1.0, 2.0]])
MEMORIZED = torch.tensor([1.0, 1.0, 2.0, 4.0])
EMPTY = torch.tensor([2.0, 0.5, 1.0, 4.0])


def test_scores_are_weight_magnitude_times_input_norm():
    expected = torch.tensor([[1.0, 2.0, 6.0, 1.0], [4.0, 1.0, 2.0, 8.0]])
    assert torch.equal(wanda_scores(WEIGHT, MEMORIZED), expected)


@pytest.mark.parametrize(
    ("sparsity", "expected"),
    [
        # k = max(1, ceil(0.01 * 4)) = 1: row 0's best is column 2 (6 > 3: kept); row 1's is
        # column 3, but 8 is not above the empty prompt's 8: nothing in row 1.
        (0.01, {(0, 2)}),
        (0.25, {(0, 2)}),
        # k = ceil(0.3 * 4) = 2: row 0 adds column 1 (2 > 1); row 1's two best (8, 4) are
        # not above the empty prompt's (8, 8).
        (0.3, {(0, 1), (0, 2)}),
        # every weight whose score beats the empty prompt's: (0, 1), (0, 2), (1, 1), (1, 2)
        (1.0, {(0, 1), (0, 2), (1, 1), (1, 2)}),
    ],
)
def test_step_mask_by_hand(sparsity, expected):
    mask = step_mask(WEIGHT, MEMORIZED, EMPTY, sparsity)
    assert {tuple(ix) for ix in mask.nonzero().tolist()} == expected


def test_row_top_rounds_up_and_keeps_at_least_one():
    scores = torch.arange(200.0).reshape(2, 100)
    assert row_top(scores, 0.001).sum(dim=1).tolist() == [1, 1]  # 0.1 -> 1
    assert row_top(scores, 0.011).sum(dim=1).tolist() == [2, 2]  # 1.1 -> 2
    assert row_top(scores, 0.011)[:, -2:].all()  # the largest ones


def test_layer_mask_is_the_union_over_timesteps():
    # second step: the empty prompt is quiet on column 3, so row 1's best (8) now counts
    second = torch.tensor([1.0, 1.0, 1.0, 1.0])
    union = layer_mask(WEIGHT, [MEMORIZED, MEMORIZED], [EMPTY, second], sparsity=0.25)
    assert {tuple(ix) for ix in union.nonzero().tolist()} == {(0, 2), (1, 3)}
    with pytest.raises(ValueError, match="one memorized and one empty-prompt norm per timestep"):
        layer_mask(WEIGHT, [MEMORIZED], [], 0.25)


def test_scores_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match=r"need a weight \(out, in\) and norms \(in,\)"):
        wanda_scores(WEIGHT, torch.ones(3))
    with pytest.raises(ValueError, match="sparsity must be in"):
        WandaConfig(sparsity=0.0)


def test_sd_v1_has_16_feed_forward_output_layers():
    layers = ff_layers(sd_v1_unet_on_meta())
    assert len(layers) == 16 and all(name.endswith("ff.net.2") for name in layers)
    assert sum(name.startswith("down_blocks") for name in layers) == 6
    assert sum(name.startswith("mid_block") for name in layers) == 1


# --- on the tiny SD ------------------------------------------------------------------------

PROMPTS = ["Shaw Floors carpet in a living room", "a red car", "mountains at dawn"]


@pytest.fixture(scope="module")
def generator(tiny_sd_dir, one_thread) -> Generator:
    config = GenerationConfig(model=str(tiny_sd_dir), steps=3, size=TINY_SIZE, batch_size=2)
    return Generator(config)


@pytest.fixture(scope="module")
def mask(generator) -> dict:
    return Wanda().prepare(generator, PROMPTS, [0, 1, 2])


def test_input_norms_add_up_over_batches_and_are_read_over_tokens(generator):
    """Sums of squares add over batches (same batch shape: the same bits), and each step's norm
    is the L2 norm over tokens of the layer's input, conditional half apart from the empty one."""
    config = WandaConfig(batch_size=1)
    together = input_norms(generator, PROMPTS, [0, 1, 2], config)
    alone = [input_norms(generator, [p], [i], config) for i, p in enumerate(PROMPTS)]
    assert len(together.memorized) == 3  # the schedule has 3 steps (< 10): all of them
    for step in range(3):
        for layer in range(len(together.layers)):
            for half in ("memorized", "empty"):
                summed = sum(getattr(a, half)[step][layer] ** 2 for a in alone)
                torch.testing.assert_close(getattr(together, half)[step][layer] ** 2, summed)
    seen = []
    module = generator.unet.get_submodule(together.layers[0])
    handle = module.register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0].clone()))
    try:
        list(first_steps(generator, PROMPTS[:1], [0], [0], 3))
    finally:
        handle.remove()
    assert len(seen) == 3
    for step, x in enumerate(seen):  # x: (2, tokens, in) = [empty prompt; prompt]
        torch.testing.assert_close(alone[0].memorized[step][0], torch.linalg.norm(x[1], dim=0))
        torch.testing.assert_close(alone[0].empty[step][0], torch.linalg.norm(x[0], dim=0))


def test_mask_rows_hold_at_most_k_weights_per_step(generator, mask):
    layers = ff_layers(generator.unet)
    assert list(mask["layers"]) == layers
    for index, name in enumerate(layers):
        weight = generator.unet.get_submodule(name).weight
        k = max(1, int(np.ceil(0.01 * weight.shape[1])))
        chosen = mask["layer"] == index
        per_row = np.bincount(mask["row"][chosen], minlength=weight.shape[0])
        assert per_row.max() <= 3 * k  # union of 3 steps
    assert len(mask["row"]) > 0


def test_mask_is_applied_inside_the_block_and_undone_after(generator, mask):
    name = mask["layers"][mask["layer"][0]]
    weight = generator.unet.get_submodule(str(name)).weight
    before = weight.detach().clone()
    chosen = mask["layer"] == mask["layer"][0]
    rows, cols = mask["row"][chosen], mask["col"][chosen]
    assert (before[rows, cols] != 0).all()
    with pruned(generator.unet, mask):
        assert (weight[rows, cols] == 0).all()
        untouched = torch.ones_like(weight, dtype=torch.bool)
        untouched[rows, cols] = False
        assert torch.equal(weight[untouched], before[untouched])
    assert torch.equal(weight, before)


def test_wanda_generation_differs_from_the_model_as_is(generator, mask):
    rows = GenerationRows(PROMPTS[:2], [0, 1], [0, 0], [[], []])
    plain = get_method("none").generate(generator, rows, None)
    pruned_images = get_method("wanda").generate(generator, rows, mask)
    assert np.abs(pruned_images - plain).max() > 1e-3
    assert np.array_equal(get_method("none").generate(generator, rows, None), plain)  # restored
    with pytest.raises(ValueError, match="run its prepare step first"):
        get_method("wanda").generate(generator, rows, None)


def test_a_mask_of_another_model_is_refused(generator, mask):
    other = dict(mask, layers=mask["layers"][:-1])
    with pytest.raises(ValueError, match="computed on another model"):
        with pruned(generator.unet, other):
            pass
