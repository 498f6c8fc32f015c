"""Image and mask loading: any PIL-readable file to a canonical RGB float square.

Every stage of the scanner compares images pixel by pixel, so all of them go through one
conversion: decode, convert the colour mode to RGB in [0, 1], centre-crop to a square and
resize to the canonical size. Centre-cropping (rather than squashing) is what Stable
Diffusion's training transform did to LAION images, so a generation that copies a training
image copies its centre crop.
"""

from __future__ import annotations

import io
from os import PathLike
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# MS-SSIM's 5 scales with an 11-tap window need a shorter side above (11 - 1) * 2**4 = 160.
MIN_SIDE = 161
DEFAULT_SIZE = 512  # the paper's and SD v1's resolution

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently padded

Source = str | PathLike | bytes


class ImageError(ValueError):
    """An input image or mask cannot be used; the message says why and what to do."""


def _describe(source: Source) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, bytes) else str(source)


def _open(source: Source) -> Image.Image:
    name = _describe(source)
    if not isinstance(source, bytes):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name}: no such file")
        if path.stat().st_size == 0:
            raise ImageError(f"{name}: file is empty (0 bytes)")
        data = path.read_bytes()
    else:
        data = source
        if not data:
            raise ImageError("image bytes are empty")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated data, broken chunks
        raise ImageError(f"{name}: corrupt or truncated image ({exc})") from None
    return img


def _to_float(img: Image.Image, name: str) -> np.ndarray:
    """Convert any supported PIL mode to float32 HxWxC in [0, 1] (C = 1 or 3)."""
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale (PNG/TIFF); mode "I" is how PIL widens 16-bit PNGs.
        arr = np.asarray(img, dtype=np.float64)
        if arr.max(initial=0) > 65535 or arr.min(initial=0) < 0:
            raise ImageError(f"{name}: 32-bit integer image with values outside 0..65535")
        return (arr / 65535.0).astype(np.float32)[..., None]
    if mode == "F":
        raise ImageError(
            f"{name}: floating-point images (mode F) have no defined range; save as 8 or 16-bit"
        )
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        # Transparent pixels are composited on white, as image-dataset tools do for LAION.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
    elif mode in ("1", "L"):
        return (np.asarray(img.convert("L"), dtype=np.float32) / 255.0)[..., None]
    elif mode != "RGB":
        img = img.convert("RGB")  # P, CMYK, YCbCr, LAB, HSV
    return np.asarray(img, dtype=np.float32) / 255.0


def _check_side(arr: np.ndarray, name: str, min_side: int) -> None:
    h, w = arr.shape[:2]
    if min(h, w) < min_side:
        raise ImageError(
            f"{name}: image is {w}x{h} px; the shorter side must be at least {min_side} px "
            f"(5-scale MS-SSIM with an 11-tap window); upsampling would invent the detail it compares"
        )


def center_square(arr: np.ndarray) -> np.ndarray:
    """Centre-crop an HxW[xC] array to its largest square."""
    h, w = arr.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return arr[top : top + side, left : left + side]


def _resize_plane(plane: np.ndarray, size: int) -> np.ndarray:
    # PIL's float resize widens the kernel when shrinking, so downsampling is antialiased.
    out = Image.fromarray(plane.astype(np.float32), mode="F").resize((size, size), Image.BICUBIC)
    return np.asarray(out, dtype=np.float32)


def canonical(arr: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop and resize HxWxC float data to size x size; exact sizes pass unchanged."""
    sq = center_square(arr)
    if sq.shape[0] == size:
        return np.ascontiguousarray(sq, dtype=np.float32)
    planes = [_resize_plane(sq[..., c], size) for c in range(sq.shape[2])]
    return np.clip(np.stack(planes, axis=-1), 0.0, 1.0)


def check_size(size: int) -> int:
    if not isinstance(size, int) or size < MIN_SIDE:
        raise ValueError(f"canonical size must be an integer >= {MIN_SIDE} px, got {size!r}")
    return size


def read_rgb(source: Source, min_side: int = MIN_SIDE) -> np.ndarray:
    """Decode an image at its own size to float32 HxWx3 in [0, 1]."""
    name = _describe(source)
    arr = _to_float(_open(source), name)
    _check_side(arr, name, min_side)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return arr


def load_image(source: Source, size: int = DEFAULT_SIZE, min_side: int = MIN_SIDE) -> np.ndarray:
    """Load an image as float32 3 x size x size in [0, 1] (channels first, ready for torch).

    `min_side` guards against inventing detail by upsampling; only images whose generations are
    upsampled the same way (the memorization organism's 128 px training set) may lower it.
    """
    check_size(size)
    return canonical(read_rgb(source, min_side), size).transpose(2, 0, 1).copy()


def load_mask(
    source: Source,
    size: int = DEFAULT_SIZE,
    image_hw: tuple[int, int] | None = None,
    threshold: float = 0.5,
) -> np.ndarray:
    """Load a foreground mask as a boolean size x size array (True = foreground).

    Any mode is accepted (binary, 8/16-bit gray, RGB uses its mean); values are scaled to
    [0, 1], cropped and resized like the image, then binarized at `threshold`. When
    `image_hw` is given the mask must have the image's original height and width.
    """
    name = _describe(source)
    arr = _to_float(_open(source), name).mean(axis=2, keepdims=True)
    if image_hw is not None and arr.shape[:2] != tuple(image_hw):
        h, w = image_hw
        raise ImageError(
            f"{name}: mask is {arr.shape[1]}x{arr.shape[0]} px but its image is {w}x{h} px; "
            "a mask must have its image's size"
        )
    return canonical(arr, size)[..., 0] > threshold


def image_hw(source: Source) -> tuple[int, int]:
    """Original (height, width) of an image, decoded only as far as its header."""
    img = _open(source)
    return img.height, img.width


def to_uint8(image: np.ndarray) -> np.ndarray:
    """3xHxW float [0, 1] -> HxWx3 uint8 (rounded)."""
    return (np.clip(image, 0, 1).transpose(1, 2, 0) * 255.0 + 0.5).astype(np.uint8)


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a 3xHxW float image or an HxW boolean mask (lossless, for tables)."""
    if array.dtype == bool:
        pil = Image.fromarray(array.astype(np.uint8) * 255, mode="L")
    else:
        pil = Image.fromarray(to_uint8(array), mode="RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_mask_png(data: bytes) -> np.ndarray:
    """Inverse of `encode_png` for masks."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("L")) > 127
