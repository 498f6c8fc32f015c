"""Shared fixtures: natural photos that ship with scikit-image (no network)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scanner.images import canonical


def photo(name: str, size: int) -> torch.Tensor:
    """A scikit-image sample photo as a 3 x size x size float tensor in [0, 1]."""
    from skimage import data

    arr = getattr(data, name)()
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    arr = arr[..., :3].astype(np.float32) / 255.0
    return torch.from_numpy(canonical(arr, size).transpose(2, 0, 1).copy())


@pytest.fixture(scope="session")
def photos() -> dict[str, torch.Tensor]:
    """Four natural photos at 192 px (the smallest size with margin above MS-SSIM's 161)."""
    return {name: photo(name, 192) for name in ("astronaut", "coffee", "chelsea", "rocket")}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny-model tests are fastest single-threaded; two threads on shared cores oversubscribe."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """The tiny offline SD pipeline, built once per test session (1.5 s, 13 MB)."""
    from scanner.tiny_sd import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


def write_bomb_png(path, width: int, height: int, truncate: bool = False):
    """A valid all-black 1-bit PNG of width x height: a decompression bomb (20000 x 20000 is
    48 KB on disk, 400 M pixels). `truncate` cuts its pixel data short, so only the header is
    sound: a reader that refuses the file from its header alone never notices the cut."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the row's bits
    packer = zlib.compressobj(9)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    if truncate:
        pixels = pixels[: len(pixels) // 2]
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, grayscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )
    return path


@pytest.fixture(scope="session")
def bomb(tmp_path_factory):
    """The decompression bomb of issue 13: 20000 x 20000 px, over PIL's own hard limit."""
    return write_bomb_png(tmp_path_factory.mktemp("bomb") / "bomb.png", 20000, 20000)
