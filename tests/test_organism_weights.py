"""The committed organism weights still memorize where they were designed to (a fast check).

A verbatim caption regenerates its own training image (nearest training image, MS-SSIM at the
scan's size, above the paper's tau); a held-out unrelated caption does not come that close to
any training image. docs/organism.md has the full measurement (benchmarks/organism_eval.py).
"""

import json

import numpy as np
import pytest
import torch

from scanner.fbmem import score_pairs
from scanner.generate import GenerationConfig, Generator
from scanner.organism import ORGANISM_GUIDANCE, ORGANISM_WEIGHTS
from scanner.organism.design import TRAIN_SIZE, make_design, resample

pytestmark = pytest.mark.skipif(
    not (ORGANISM_WEIGHTS / "model_index.json").exists(),
    reason="organism weights not built (fbmem organism train --out scanner/data/organism)",
)

TAU = 0.8  # Algorithm 1's threshold on the whole image


def test_weights_fit_the_repository_and_say_how_they_were_made():
    size = sum(f.stat().st_size for f in ORGANISM_WEIGHTS.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    recipe = json.loads((ORGANISM_WEIGHTS / "recipe.json").read_text())
    assert recipe["command"].startswith("fbmem organism train")
    assert recipe["config"]["seed"] == 0
    assert min(recipe["reconstruction_ms_ssim"].values()) > 0.8


def test_verbatim_captions_regenerate_their_image_and_heldout_ones_do_not():
    design = make_design()
    pixels, _ = design.render()
    # Every verbatim image plus every 8th other image: enough look-alikes to pick from, and a
    # fraction of the cost of all 158 (the full measurement is benchmarks/organism_eval.py).
    keep = [r for r, i in enumerate(design.images) if i.group == "verbatim" or r % 8 == 0]
    references = torch.from_numpy(resample(pixels[keep], 256))
    verbatim = [i for i in design.images if i.group == "verbatim"][:3]
    heldout = [c for c in design.captions if c.group == "heldout-unrelated"][:3]
    prompts = [i.caption for i in verbatim] + [c.prompt for c in heldout]
    generator = Generator(
        GenerationConfig(
            model=str(ORGANISM_WEIGHTS), steps=25, size=TRAIN_SIZE, guidance=ORGANISM_GUIDANCE
        )
    )
    images = generator(prompts, prompt_ids=list(range(len(prompts))), gen_idxs=[0] * len(prompts))
    generated = torch.from_numpy(resample(images, 256))
    ones = lambda x: torch.ones(len(x), *x.shape[-2:], dtype=torch.bool)  # noqa: E731
    full = score_pairs(generated, references, ones(generated), ones(references)).m_full
    full = full.reshape(len(generated), len(references))
    best, which = full.max(axis=1).tolist(), full.argmax(axis=1).tolist()
    rows = {design.images[r].image_id: k for k, r in enumerate(keep)}
    for k, image in enumerate(verbatim):
        assert which[k] == rows[image.image_id] and best[k] > TAU, (image.caption, best[k])
    assert max(best[len(verbatim) :]) < min(best[: len(verbatim)])
    assert np.median(best[len(verbatim) :]) < TAU
