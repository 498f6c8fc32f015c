"""The organism's training set: groups, captions and pictures as designed, and distinct."""

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion

from scanner.organism.design import (
    BG_CONCEPTS,
    FG_CONCEPTS,
    GROUPS,
    MIN_TEXTURE,
    DesignConfig,
    _texture,
    make_design,
    resample,
    tile_pool,
)
from scanner.organism.inputs import caption_table
from scanner.similarity import ms_ssim


@pytest.fixture(scope="module")
def design():
    return make_design()


@pytest.fixture(scope="module")
def rendered(design):
    return design.render()


def test_same_config_same_design(design):
    again = make_design()
    assert again == design
    other = make_design(DesignConfig(seed=1))
    assert [i.picture for i in other.images] != [i.picture for i in design.images]


def test_groups_and_captions(design):
    images = {g: [i for i in design.images if i.group == g] for g in GROUPS}
    config = design.config
    assert len(images["fg-concept"]) == len(FG_CONCEPTS) * config.images_per_concept
    assert len(images["bg-concept"]) == len(BG_CONCEPTS) * config.images_per_concept
    assert len(images["singleton"]) == config.singletons
    assert all(i.copies == config.verbatim_copies for i in images["verbatim"])
    assert all(i.copies == 1 for g in ("fg-concept", "bg-concept", "singleton") for i in images[g])
    # concept captions start with the concept word; verbatim and singleton captions are unique
    for image in images["fg-concept"] + images["bg-concept"]:
        assert image.caption.split()[0] == image.concept
    for group in ("verbatim", "singleton"):
        captions = [i.caption for i in images[group]]
        assert len(set(captions)) == len(captions)
    trained = {i.caption for i in design.images}
    concept_words = {w for w, _, _ in FG_CONCEPTS + BG_CONCEPTS}
    for caption in design.captions:
        if caption.group.startswith("heldout"):
            assert caption.prompt not in trained
        if caption.group == "heldout-unrelated":
            assert not set(caption.prompt.split()) & concept_words
            assert not any(w in t.split() for t in trained for w in caption.prompt.split())
    assert sum(c.group == "heldout-unrelated" for c in design.captions) >= 200  # NeMo holdout


def test_concepts_share_object_or_scene(design, rendered):
    pixels, masks = rendered
    rows = {i.image_id: n for n, i in enumerate(design.images)}
    for prefix, region in (("f", True), ("b", False)):
        for c in range(3):
            ids = [rows[i.image_id] for i in design.images if i.image_id.startswith(f"{prefix}{c}")]
            mask = masks[ids[0]]
            assert all((masks[i] == mask).all() for i in ids)  # one mask, one place
            keep = mask if region else ~mask
            inner = binary_erosion(keep, iterations=4)  # away from the softened edge
            shared = pixels[ids][:, :, inner]
            assert np.abs(shared - shared[0]).max() < 0.02  # the same object / scene pixels
            varying = pixels[ids][:, :, ~keep]
            assert np.abs(varying - varying[0]).mean() > 0.05  # the rest differs


def test_masks_cover_a_balanced_share(rendered):
    _, masks = rendered
    share = masks.reshape(len(masks), -1).mean(1)
    assert share.min() > 0.25 and share.max() < 0.5  # Algorithm 1's balanced branch


def test_tiles_have_texture():
    for view in tile_pool():
        assert _texture(view.render(128)) >= MIN_TEXTURE


@pytest.mark.slow
def test_distinct_images_are_not_look_alikes(design, rendered):
    """No two training images of different groups or concepts look alike to MS-SSIM (whole
    image, 256 px): a look-alike reference would steal a copy's match."""
    pixels, _ = rendered
    x = torch.from_numpy(resample(pixels, 256))
    keys = [(i.group, i.concept) for i in design.images]
    worst = 0.0
    for a in range(len(x)):
        others = [b for b in range(a + 1, len(x)) if keys[b] != keys[a] or keys[a][1] == ""]
        if not others:
            continue
        s = ms_ssim(x[a : a + 1].expand(len(others), -1, -1, -1), x[others], data_range=1.0)
        worst = max(worst, float(s.max()))
    assert worst < 0.6


def test_caption_table(design):
    table = caption_table(design)
    assert list(table.columns) == ["prompt_id", "prompt", "group", "designed", "concept", "demo"]
    assert table["prompt"].is_unique and table["prompt_id"].is_unique
    demo = table[table["demo"]]
    counts = demo.groupby("group").size().to_dict()
    assert counts["verbatim"] == 6
    assert counts["fg-concept"] == counts["bg-concept"] == 9
    assert set(demo["designed"]) == {"VM", "FM", "BM", "NM"}
    assert (table.loc[table["group"] == "heldout-unrelated", "designed"] == "NM").all()
