"""Embedders: the weightless pixel descriptor on real photos, tiny CLIP through the real loader, MiniLM."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

from scanner.embed import (
    PIXELS_DIM,
    EmbedConfig,
    area_mean,
    make_image_embedder,
    make_text_embedder,
)
from scanner.images import canonical, to_uint8

SIZE = 256
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "immunohistochemistry", "coins")
PHOTOS += ("moon", "brick", "grass", "gravel", "retina", "page", "horse")


def photo(name: str) -> np.ndarray:
    """A bundled photo as 3 x SIZE x SIZE float32 in [0, 1]."""
    pixels = np.asarray(getattr(skimage.data, name)(), dtype=np.float32)
    pixels = pixels / pixels.max()  # horse is boolean, the rest uint8
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return canonical(pixels[..., :3], SIZE).transpose(2, 0, 1).copy()


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return np.stack([photo(name) for name in PHOTOS])


def near_copy(image: np.ndarray, seed: int) -> np.ndarray:
    """Tint, noise and a JPEG round trip: what a generation that copies its training image shows."""
    rng = np.random.default_rng(seed)
    tinted = image + rng.uniform(-0.04, 0.04, size=(3, 1, 1))
    noisy = np.clip(tinted + rng.normal(0, 0.03, image.shape), 0, 1)
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(noisy)).save(buffer, format="JPEG", quality=60)
    return np.asarray(Image.open(buffer), dtype=np.float32).transpose(2, 0, 1) / 255.0


def ellipse_mask(size: int) -> np.ndarray:
    y, x = np.mgrid[:size, :size] / size
    return ((y - 0.5) / 0.4) ** 2 + ((x - 0.5) / 0.33) ** 2 <= 1.0  # ~41 % of the frame


@pytest.fixture(scope="module")
def pixels():
    return make_image_embedder(EmbedConfig(image_kind="pixels", batch_size=4))


# ---------------------------------------------------------------- weightless pixels


def test_near_copy_retrieves_its_original_first(pixels, photos):
    refs = pixels(photos)
    copies = pixels(np.stack([near_copy(p, seed) for seed, p in enumerate(photos)]))
    scores = copies @ refs.T
    np.testing.assert_array_equal(scores.argmax(axis=1), np.arange(len(PHOTOS)))
    assert np.diag(scores).min() > 0.8


def test_region_copies_rank_both_sources_first(pixels, photos):
    """A foreground pasted on a new background matches both photos it came from, same position."""
    mask = ellipse_mask(SIZE)
    refs = pixels(photos)
    n = len(PHOTOS)
    pairs = [(i, (i + 3) % n) for i in range(n)]
    composites = np.stack([np.where(mask, photos[fg], photos[bg]) for fg, bg in pairs])
    scores = pixels(composites) @ refs.T
    top = [set(np.argsort(-row)[:3]) for row in scores]
    assert all({fg, bg} <= three for (fg, bg), three in zip(pairs, top))
    both_first = [set(np.argsort(-row)[:2]) == {fg, bg} for (fg, bg), row in zip(pairs, scores)]
    assert sum(both_first) >= n - 1  # measured: only the dim moon behind the rocket slips to 3rd


def test_shifted_copy_is_not_found(pixels, photos):
    """Documented blind spot: the descriptor compares same positions only."""
    refs = pixels(photos)
    shifted = np.roll(photos[0], SIZE // 4, axis=2)
    same = pixels(shifted[None]) @ refs[0]
    copy = pixels(near_copy(photos[0], 0)[None]) @ refs[0]
    assert same[0] < copy[0] - 0.3


def test_pixel_embeddings_are_unit_deterministic_and_batch_independent(pixels, photos):
    batch = pixels(photos)
    assert batch.shape == (len(PHOTOS), PIXELS_DIM) and batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-6)
    one_by_one = np.concatenate([pixels(p[None]) for p in photos])
    np.testing.assert_allclose(batch, one_by_one, atol=1e-6)
    np.testing.assert_array_equal(pixels(photos), batch)
    assert pixels(photos[:0]).shape == (0, PIXELS_DIM)


def test_flat_images_have_a_direction(pixels):
    """All-black images (a safety checker's output) embed to unit vectors that match each other."""
    flat = np.zeros((3, 3, 64, 64), dtype=np.float32)
    flat[1] = 0.5
    flat[2, 0] = 1.0  # pure red
    out = pixels(flat)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert out[0] @ pixels(np.zeros((1, 3, 96, 96), dtype=np.float32))[0] == pytest.approx(1.0)
    assert out[0] @ out[2] < 0.99


def test_area_mean_fast_path_equals_adaptive_pooling():
    x = torch.rand(2, 3, 96, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(area_mean(x, 32), F.adaptive_avg_pool2d(x, 32))
    odd = torch.rand(1, 3, 50, 70)
    torch.testing.assert_close(area_mean(odd, 32), F.adaptive_avg_pool2d(odd, 32))


@pytest.mark.parametrize(
    ("images", "error", "message"),
    [
        (np.zeros((1, 3, 64, 64), dtype=np.uint8), TypeError, "floats in"),
        ([[0.0]], TypeError, "numpy array"),
        (np.zeros((1, 64, 64, 3), dtype=np.float32), ValueError, r"\(B, 3, H, W\)"),
        (np.zeros((1, 3, 16, 64), dtype=np.float32), ValueError, "H, W >= 32"),
        (np.full((1, 3, 64, 64), 1.5, dtype=np.float32), ValueError, r"in \[0, 1\]"),
        (np.full((1, 3, 64, 64), np.nan, dtype=np.float32), ValueError, "finite"),
    ],
)
def test_pixel_embedder_rejects_bad_images(pixels, images, error, message):
    with pytest.raises(error, match=message):
        pixels(images)


def test_config_validation():
    with pytest.raises(ValueError, match="need clip_path"):
        EmbedConfig(image_kind="clip")
    with pytest.raises(ValueError, match="batch_size"):
        EmbedConfig(batch_size=0)
    with pytest.raises(ValueError, match="device must look like"):
        EmbedConfig(device="gpu zero")
    with pytest.raises(ValueError, match="unknown image embedder 'sscd'"):
        make_image_embedder(EmbedConfig(image_kind="sscd"))
    with pytest.raises(ValueError, match="unknown text embedder 'bert'"):
        make_text_embedder(EmbedConfig(text_kind="bert"))


# ---------------------------------------------------------------- CLIP


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    """A random-weight CLIP with a byte-level tokenizer and a 64 px processor, saved like a hub model."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPTokenizer,
    )
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    small = {
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    text = {**small, "vocab_size": len(tokens), "max_position_embeddings": 77}
    text |= {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos}
    config = CLIPConfig(
        text_config=text,
        vision_config={**small, "image_size": 64, "patch_size": 16},
        projection_dim=24,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-clip")
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(
        size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}
    ).save_pretrained(folder)
    return str(folder)


def test_tiny_clip_image_embedder_matches_transformers_on_uint8_input(tiny_clip, photos):
    from transformers import CLIPImageProcessor, CLIPModel

    embed = make_image_embedder(EmbedConfig(image_kind="clip", clip_path=tiny_clip, batch_size=3))
    assert (embed.name, embed.dim) == (f"clip:{tiny_clip}", 24)
    out = embed(photos[:5])
    assert out.shape == (5, 24) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.concatenate([embed(p[None]) for p in photos[:5]]), out, atol=1e-5)

    # Oracle: the usual transformers recipe on uint8 pictures of the same photos.
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    processor = CLIPImageProcessor.from_pretrained(tiny_clip)
    pictures = [Image.fromarray(to_uint8(p)) for p in photos[:5]]
    with torch.no_grad():
        inputs = processor(images=pictures, return_tensors="pt")
        features = model.get_image_features(**inputs)
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    expected = F.normalize(features, dim=1).numpy()
    # Measured 1 - 2e-6 (the uint8 path resizes rounded pixels); skipping CLIP's mean/std
    # normalization gives 0.74 to 0.97, and different photos 0.74 to 0.99.
    np.testing.assert_allclose((out * expected).sum(axis=1), 1.0, atol=1e-4)


def test_tiny_clip_text_embedder_matches_transformers(tiny_clip):
    from transformers import CLIPModel, CLIPTokenizer

    prompts = ["a photo of a cat", "an astronaut riding a horse on the moon, oil painting", ""]
    embed = make_text_embedder(EmbedConfig(text_kind="clip", clip_path=tiny_clip, batch_size=2))
    out = embed(prompts)
    assert out.shape == (3, 24)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip)
    with torch.no_grad():
        for prompt, row in zip(prompts, out):  # one by one: no padding at all
            features = model.get_text_features(**tokenizer([prompt], return_tensors="pt"))
            features = features if isinstance(features, torch.Tensor) else features.pooler_output
            np.testing.assert_allclose(row, F.normalize(features, dim=1)[0].numpy(), atol=1e-5)
    with pytest.raises(TypeError, match="sequence of strings"):
        embed("a photo of a cat")


@pytest.mark.weights
@pytest.mark.skipif(
    not os.environ.get("FBMEM_CLIP_PATH"), reason="set FBMEM_CLIP_PATH to real CLIP weights"
)
def test_real_clip_matches_photos_with_their_captions(photos):
    config = EmbedConfig(
        image_kind="clip", text_kind="clip", clip_path=os.environ["FBMEM_CLIP_PATH"]
    )
    images = make_image_embedder(config)(photos[[PHOTOS.index("chelsea"), PHOTOS.index("rocket")]])
    texts = make_text_embedder(config)(
        ["a photo of a cat", "a photo of a rocket on its launch pad"]
    )
    np.testing.assert_array_equal((images @ texts.T).argmax(axis=1), [0, 1])
    copy = make_image_embedder(config)(near_copy(photo("chelsea"), 0)[None])
    assert float(copy[0] @ images[0]) > 0.85


# ---------------------------------------------------------------- MiniLM


def test_minilm_puts_paraphrases_closer_than_unrelated_prompts():
    embed = make_text_embedder(EmbedConfig(text_kind="minilm"))
    assert (embed.name, embed.dim) == ("all-MiniLM-L6-v2", 384)
    cat, kitten, market = embed(
        ["a photo of a cat", "a picture of a kitten", "stock market report"]
    )
    np.testing.assert_allclose(np.linalg.norm([cat, kitten, market], axis=1), 1.0, atol=1e-5)
    assert cat @ kitten > 0.6 > 0.2 > max(cat @ market, kitten @ market)
    assert embed([]).shape == (0, 384)
