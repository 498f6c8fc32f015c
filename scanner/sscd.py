"""SSCD (Pizzi et al., CVPR 2022), a copy-detection descriptor, as a similarity metric.

SSCD maps an image to an L2-normalized descriptor trained so that edited copies of an image
land close to it; two images' similarity is the cosine of their descriptors. Unlike
(MS-)SSIM, nothing here is per pair: every image variant Algorithm 1 needs (whole,
foreground-masked, background-masked) is embedded once, and each pair's three region
scores are dot products. That is what turns the paper's "over 5 minutes with SSCD" for one
generation against 500 training images into one forward pass per image variant.

The model is a TorchScript file the user names (the official `*.torchscript.pt` releases);
loading it runs its serialized TorchScript graph, so only load files you trust.
"""

from __future__ import annotations

import warnings
from os import PathLike
from pathlib import Path

import torch
import torch.nn.functional as F

from scanner.scoring import N_VARIANTS, REGION_VARIANTS, variants

SSCD_SIZE = 320  # SSCD README: resize straight to a 320 x 320 square ("skew_320") for batching
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # SSCD README's Normalize: torchvision's ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)
PAIR_CHUNK = 65536  # pairs gathered at once in region_scores: bounds the (chunk, 3, D) temporaries


def _load_torchscript(path: str | PathLike, device: torch.device) -> torch.jit.ScriptModule:
    if path is None or str(path) == "":
        raise ValueError("an SSCD model path is required (a TorchScript file, *.torchscript.pt)")
    file = Path(path)
    if not file.is_file():
        raise ValueError(
            f"SSCD model {file}: no such file; pass the path of a TorchScript model such as "
            "sscd_disc_mixup.torchscript.pt"
        )
    try:
        with warnings.catch_warnings():
            # torch deprecates TorchScript for torch.export; SSCD is released as TorchScript only.
            warnings.filterwarnings("ignore", r"`torch\.jit\.load` is deprecated", FutureWarning)
            model = torch.jit.load(str(file), map_location=device)
    except (RuntimeError, ValueError) as exc:
        raise ValueError(f"SSCD model {file}: not a TorchScript file ({exc})") from None
    return model.eval()


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be floating point in [0, 1], got {images.dtype}")
    if images.numel() and (float(images.min()) < 0 or float(images.max()) > 1):
        raise ValueError("images must be in [0, 1]; rescale 8-bit data by 1/255")


class SSCDModel:
    """An SSCD TorchScript model with its preprocessing: `embed` images, score region pairs."""

    def __init__(self, path: str | PathLike, device: str = "cpu", batch_size: int = 32):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.path = Path(path) if path is not None else None
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = _load_torchscript(path, self.device)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, 3, 320, 320) normalized, on the model's device."""
        x = images.to(self.device, torch.float32)
        if x.shape[-2:] != (SSCD_SIZE, SSCD_SIZE):
            x = F.interpolate(
                x, size=(SSCD_SIZE, SSCD_SIZE), mode="bilinear", antialias=True, align_corners=False
            )
        return (x - self._mean) / self._std

    @torch.inference_mode()
    def _embed_batch(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(self.preprocess(images))
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != images.shape[0]:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(
                f"SSCD model {self.path} returned {shape} for {images.shape[0]} images; "
                "expected one descriptor per image, shape (N, D)"
            )
        return F.normalize(out.float(), dim=1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, D) L2-normalized descriptors of (N, 3, H, W) images in [0, 1]."""
        _check_images(images)
        if images.shape[0] == 0:
            return torch.empty(0, 0, device=self.device)
        return torch.cat(
            [
                self._embed_batch(images[i : i + self.batch_size])
                for i in range(0, images.shape[0], self.batch_size)
            ]
        )

    def similarity(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """(N,) cosine similarity of each pair (x[i], y[i])."""
        if x.shape != y.shape:
            raise ValueError(
                f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        return (self.embed(x) * self.embed(y)).sum(dim=1)

    def variant_embeddings(self, images: torch.Tensor, fg: torch.Tensor) -> torch.Tensor:
        """(N, 3, D): descriptors of each image whole, foreground-masked and background-masked
        (masked pixels set to 0, Algorithm 1's x ⊙ S), indexed by `scanner.scoring`'s variant codes."""
        _check_images(images)
        if not isinstance(fg, torch.Tensor) or fg.dtype != torch.bool:
            raise TypeError("fg must be a boolean torch.Tensor (True = foreground)")
        if fg.shape != (images.shape[0], *images.shape[2:]):
            raise ValueError(
                f"fg must have shape {(images.shape[0], *images.shape[2:])}, got {tuple(fg.shape)}"
            )
        chunk = max(1, self.batch_size // N_VARIANTS)
        out = []
        for i in range(0, images.shape[0], chunk):
            x = variants(images[i : i + chunk].float(), fg[i : i + chunk])  # embedded in one call
            out.append(self.embed(x.flatten(0, 1)).view(x.shape[0], N_VARIANTS, -1))
        return torch.cat(out)

    def region_scores(
        self,
        gen: torch.Tensor,
        ref: torch.Tensor,
        gen_fg: torch.Tensor,
        ref_fg: torch.Tensor,
        pairs: torch.Tensor,
        branch: torch.Tensor,
    ) -> torch.Tensor:
        """(P, 3) cosine scores (full, fg, bg) of the pairs, each region with its branch's
        variants (`scanner.scoring.REGION_VARIANTS`); same contract as
        `scanner.scoring.region_scores`: images and masks are checked here, `pairs` and
        `branch` by the caller (`scanner.fbmem.score_pairs`)."""
        out = torch.empty(pairs.shape[0], 3, dtype=torch.float32, device=gen.device)
        if pairs.shape[0] == 0:
            return out
        gen_emb = self.variant_embeddings(gen, gen_fg)
        ref_emb = self.variant_embeddings(ref, ref_fg)
        pairs = pairs.to(self.device)
        variants = REGION_VARIANTS.to(self.device)[branch.to(self.device)[pairs[:, 0]]]
        for j in range(0, pairs.shape[0], PAIR_CHUNK):
            p, v = pairs[j : j + PAIR_CHUNK], variants[j : j + PAIR_CHUNK]  # (c, 2), (c, 3, 2)
            a = gen_emb[p[:, :1], v[..., 0]]  # (c, 3, D)
            b = ref_emb[p[:, 1:], v[..., 1]]
            out[j : j + PAIR_CHUNK] = (a * b).sum(-1).to(out.device)
        return out
