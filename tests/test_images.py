"""Image and mask loading: every colour mode and every broken file the scanner may meet."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from scanner.images import (
    ImageError,
    check_max_pixels,
    decode_mask_png,
    encode_png,
    image_hw,
    load_image,
    load_mask,
    read_rgb,
)
from tests.conftest import write_bomb_png


def save(tmp_path, name, img: Image.Image, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


@pytest.fixture
def rgb_array():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(200, 240, 3), dtype=np.uint8)


def test_rgb_exact_values_and_center_crop(tmp_path, rgb_array):
    path = save(tmp_path, "a.png", Image.fromarray(rgb_array))
    out = load_image(path, size=200)  # 200x240 -> centre 200x200 crop, no resampling
    assert out.shape == (3, 200, 200) and out.dtype == np.float32
    np.testing.assert_array_equal(out, rgb_array[:, 20:220].transpose(2, 0, 1) / np.float32(255))


def test_resize_to_canonical_size_stays_in_range(tmp_path, rgb_array):
    out = load_image(save(tmp_path, "a.png", Image.fromarray(rgb_array)), size=176)
    assert out.shape == (3, 176, 176)
    assert 0 <= out.min() and out.max() <= 1


def test_grayscale_is_replicated_to_three_channels(tmp_path):
    gray = np.arange(200 * 200, dtype=np.uint32).reshape(200, 200) % 256
    out = load_image(save(tmp_path, "g.png", Image.fromarray(gray.astype(np.uint8), "L")), size=200)
    assert np.array_equal(out[0], out[1]) and np.array_equal(out[0], out[2])
    assert out[0, 0, 5] == pytest.approx(5 / 255)


def test_sixteen_bit_grayscale_keeps_its_scale(tmp_path):
    arr = np.full((200, 200), 65535 // 2, dtype=np.uint16)
    arr[0, 0] = 65535
    path = save(tmp_path, "g16.png", Image.fromarray(arr))
    out = load_image(path, size=200)
    assert out[0, 0, 0] == pytest.approx(1.0)
    assert out[1, 5, 5] == pytest.approx(0.5, abs=1e-4)


def test_rgba_is_composited_on_white(tmp_path):
    arr = np.zeros((200, 200, 4), dtype=np.uint8)
    arr[..., 0] = 255  # red
    arr[:100, :, 3] = 255  # top half opaque, bottom half transparent
    out = load_image(save(tmp_path, "a.png", Image.fromarray(arr, "RGBA")), size=200)
    np.testing.assert_allclose(out[:, 10, 10], [1, 0, 0])
    np.testing.assert_allclose(out[:, 150, 10], [1, 1, 1])


def test_palette_image_uses_its_palette(tmp_path):
    img = Image.new("P", (200, 200))
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    img.paste(1, (0, 0, 200, 100))
    out = load_image(save(tmp_path, "p.png", img), size=200)
    np.testing.assert_allclose(out[:, 10, 10], np.array([10, 200, 30]) / 255, atol=1e-6)
    np.testing.assert_allclose(out[:, 150, 10], [0, 0, 0])


def test_cmyk_jpeg_converts(tmp_path, rgb_array):
    path = save(tmp_path, "c.jpg", Image.fromarray(rgb_array).convert("CMYK"))
    assert load_image(path, size=200).shape == (3, 200, 200)


def test_bytes_source(rgb_array):
    buf = io.BytesIO()
    Image.fromarray(rgb_array).save(buf, format="PNG")
    assert load_image(buf.getvalue(), size=200).shape == (3, 200, 200)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"this is not an image at all"), "not a readable image"),
    ],
)
def test_unreadable_files(tmp_path, make, match):
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(ImageError, match=match):
        load_image(path)


def test_truncated_file(tmp_path, rgb_array):
    full = save(tmp_path, "full.png", Image.fromarray(rgb_array))
    data = full.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated|corrupt"):
        load_image(cut)


def test_too_small_image_is_rejected(tmp_path):
    path = save(tmp_path, "s.png", Image.new("RGB", (300, 160)))
    with pytest.raises(ImageError, match="300x160.*at least 161"):
        read_rgb(path)


def test_bad_canonical_size():
    with pytest.raises(ValueError, match="canonical size"):
        load_image(b"x", size=100)


def test_mask_binarized_and_size_checked(tmp_path):
    m = np.zeros((200, 240), dtype=np.uint8)
    m[50:150, 70:170] = 255
    path = save(tmp_path, "m.png", Image.fromarray(m))
    mask = load_mask(path, size=200, image_hw=(200, 240))
    assert mask.dtype == bool and mask.shape == (200, 200)
    assert mask.sum() == 100 * 100 and mask[50, 50] and not mask[49, 50]
    with pytest.raises(ImageError, match="mask is 240x200 px but its image is 300x200"):
        load_mask(path, size=200, image_hw=(200, 300))


def test_png_roundtrip_of_images_and_masks(rgb_array):
    img = rgb_array[:, :200].transpose(2, 0, 1) / np.float32(255)
    assert np.array_equal(load_image(encode_png(img), size=200), img)
    mask = np.zeros((200, 200), dtype=bool)
    mask[3:50, 7:9] = True
    assert np.array_equal(decode_mask_png(encode_png(mask)), mask)


# ---- decompression bombs and other files that must not be decoded ----------------------------


def test_decompression_bomb_is_an_image_error_naming_the_limit(bomb):
    # 400 M pixels: PIL itself refuses it while opening; the scanner says why and what to do.
    with pytest.raises(
        ImageError, match=r"400,000,000 pixels, over the limit of 50,000,000.*--max-pixels"
    ):
        load_image(bomb)


def test_images_over_the_limit_are_refused_from_their_header(tmp_path):
    # 144 M pixels lies between PIL's warning (89 M) and its refusal (179 M): PIL would decode it
    # (about 3 GB here). The pixel data is cut short, so any attempt to decode it would report
    # a truncated file instead: the limit must act on the header alone.
    path = write_bomb_png(tmp_path / "big.png", 12000, 12000, truncate=True)
    with pytest.raises(ImageError, match=r"12000x12000 px \(144,000,000 pixels\), over the limit"):
        load_image(path)
    with pytest.raises(ImageError, match="over the limit"):
        image_hw(path)
    with pytest.raises(ImageError, match="over the limit"):
        load_mask(path)


def test_pixel_limit_is_configurable(tmp_path, rgb_array):
    path = save(tmp_path, "x.png", Image.fromarray(rgb_array))  # 240 x 200 = 48,000 pixels
    assert load_image(path, size=200, max_pixels=48_000).shape == (3, 200, 200)
    with pytest.raises(ImageError, match="240x200 px.*over the limit of 47,999 pixels"):
        load_image(path, size=200, max_pixels=47_999)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (100, r"max_pixels must be an integer >= 25,921"),
        (10**9, "above PIL's own"),
        (1.5e6, "integer"),
    ],
)
def test_bad_pixel_limits_are_refused(value, message):
    with pytest.raises(ValueError, match=message):
        check_max_pixels(value)


def test_a_directory_is_not_an_image(tmp_path):
    with pytest.raises(ImageError, match="is a directory, not an image file"):
        load_image(tmp_path)
