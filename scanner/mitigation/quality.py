"""No-reference image quality of generations (DESIGN 4.8), through pyiqa.

A mitigation that stops copying by wrecking the images is no mitigation, so every method's
generations are scored for quality and the drop against the unmitigated model is plotted
against the mitigation score. The FB-Mem paper uses DB-CNN and Q-Align; both need weights,
so they are used when the user supplies them, and PIQE, which needs none, otherwise.

pyiqa downloads any weights it cannot find, and this software runs where there is no
network: before pyiqa is asked to build a learned metric, every file it would fetch is
checked to be present locally, and a missing one is a ValueError that names it. Every file
pyiqa would unpickle (its loaders pass weights_only=False) is first opened with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import numpy as np
import torch

from scanner.embed import check_images

QualityMetricName = Literal["piqe", "dbcnn", "qalign"]
METRICS: tuple[str, ...] = ("piqe", "dbcnn", "qalign")
MIN_SIDE = 32  # PIQE scores 16 px blocks and DB-CNN's VGG-16 halves the image 4 times
QALIGN_REPO = "q-future/one-align"  # the model pyiqa's Q-Align loads, by this fixed id
# PIQE divides by the image's maximum, so an all-black image (a safety checker's output)
# would score NaN; every other flat image gets PIQE's worst score, and so does that one.
PIQE_WORST = 100.0


@dataclass(frozen=True)
class QualityConfig:
    metric: QualityMetricName = "piqe"  # the no-reference metric that needs no weights (DESIGN 4.8)
    # dbcnn: a DB-CNN checkpoint file (e.g. pyiqa's DBCNN_KonIQ10k-2de81c0a.pth);
    # qalign: the Hugging Face hub cache folder that holds q-future/one-align; piqe: none.
    weights: str | None = None
    device: str = "cpu"  # Q-Align, a 7B-parameter model, is only practical on a GPU

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"unknown quality metric {self.metric!r}; expected one of {METRICS}")
        if self.metric == "piqe" and self.weights is not None:
            raise ValueError(f"piqe needs no weights, got weights={self.weights!r}")
        if self.metric != "piqe" and not self.weights:
            raise ValueError(
                f"{self.metric} needs weights supplied locally (QualityConfig.weights: "
                f"{_WEIGHTS_HELP[self.metric]}); use metric='piqe' to run without weights"
            )
        torch.device(self.device)  # raises on a malformed device string


_WEIGHTS_HELP = {
    "dbcnn": "the DB-CNN checkpoint file, e.g. DBCNN_KonIQ10k-2de81c0a.pth",
    "qalign": f"the Hugging Face hub cache folder that holds {QALIGN_REPO}",
}


class QualityMetric:
    """A pyiqa no-reference metric: (B, 3, H, W) floats in [0, 1] -> (B,) float64 scores."""

    def __init__(self, name: str, net, one_at_a_time: bool) -> None:
        self.name = name
        self.higher_is_better = not net.lower_better  # pyiqa's own record of the direction
        self._net = net
        self._one_at_a_time = one_at_a_time  # pyiqa's Q-Align takes batches of one

    @torch.inference_mode()
    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = check_images(images, MIN_SIDE)
        if not len(images):
            return np.empty(0)
        batches = np.split(images, len(images)) if self._one_at_a_time else [images]
        scores = np.concatenate(
            [self._net(torch.from_numpy(b)).reshape(-1).double().cpu().numpy() for b in batches]
        )
        if self.name == "piqe":
            scores[images.reshape(len(images), -1).max(axis=1, initial=0.0) == 0.0] = PIQE_WORST
        return scores


def make_quality_metric(config: QualityConfig) -> QualityMetric:
    """Build the configured metric; learned ones only from files already on disk."""
    import pyiqa

    if config.metric == "piqe":
        net = pyiqa.create_metric("piqe", device=config.device)
        return QualityMetric("piqe", net, one_at_a_time=False)
    if config.metric == "dbcnn":
        checkpoint = _dbcnn_files(config.weights)
        net = pyiqa.create_metric("dbcnn", device=config.device, pretrained_model_path=checkpoint)
        return QualityMetric("dbcnn", net, one_at_a_time=False)
    if config.metric == "qalign":
        _check_qalign_cache(config.weights)
        net = pyiqa.create_metric("qalign", device=config.device)
        return QualityMetric("qalign", net, one_at_a_time=True)
    raise ValueError(f"unknown quality metric {config.metric!r}; expected one of {METRICS}")


def _dbcnn_files(weights: str) -> str:
    """Check the three files pyiqa's DB-CNN loads; returns the checkpoint's path.

    Besides its own checkpoint, pyiqa's DB-CNN constructor loads torchvision's ImageNet VGG-16
    and its SCNN branch from their download caches, whatever checkpoint follows.
    """
    import pyiqa.utils.download_util
    from pyiqa.archs.dbcnn_arch import default_model_urls
    from torchvision.models import VGG16_Weights

    checkpoint = Path(weights)
    if not checkpoint.is_file():
        raise ValueError(f"dbcnn weights: no such file {str(checkpoint)!r}")
    vgg = Path(torch.hub.get_dir()) / "checkpoints" / _file_name(VGG16_Weights.IMAGENET1K_V1.url)
    scnn_cache = Path(pyiqa.utils.download_util.DEFAULT_CACHE_DIR)
    scnn = scnn_cache / _file_name(default_model_urls["scnn"])
    caches = {vgg: "torchvision's VGG-16, torch hub cache", scnn: "DB-CNN's SCNN, pyiqa cache"}
    missing = [f"{path} ({what})" for path, what in caches.items() if not path.is_file()]
    if missing:
        raise ValueError(
            "dbcnn needs these files locally and would try to download them: " + "; ".join(missing)
        )
    for path in (checkpoint, *caches):
        _require_tensors_only(path)
    return str(checkpoint)


def _file_name(url: str) -> str:
    return Path(urlparse(url).path).name


def _require_tensors_only(path: Path) -> None:
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever the reason, pyiqa must not unpickle it
        raise ValueError(
            f"{path}: not a plain tensor checkpoint (torch.load with weights_only=True "
            f"refused it: {exc}); it will not be unpickled"
        ) from exc


def _check_qalign_cache(weights: str) -> None:
    """pyiqa's Q-Align loads q-future/one-align by id, through the hub cache of the process.

    huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE from the environment once, at
    import, so the folder cannot be switched from here: the process must start with both set.
    """
    from huggingface_hub import constants

    cache = Path(weights)
    snapshots = cache / f"models--{QALIGN_REPO.replace('/', '--')}" / "snapshots"
    if not any(snapshots.glob("*/config.json")):
        raise ValueError(
            f"qalign weights: {str(cache)!r} is not a Hugging Face hub cache holding "
            f"{QALIGN_REPO} (no {snapshots}/<revision>/config.json)"
        )
    if Path(constants.HF_HUB_CACHE).resolve() != cache.resolve() or not constants.HF_HUB_OFFLINE:
        raise ValueError(
            f"qalign reads {QALIGN_REPO} from the hub cache this process started with "
            f"(HF_HUB_CACHE={constants.HF_HUB_CACHE!r}, HF_HUB_OFFLINE={constants.HF_HUB_OFFLINE}); "
            f"start it with HF_HUB_CACHE={str(cache)!r} HF_HUB_OFFLINE=1"
        )


def quality_drop(
    baseline_scores: np.ndarray, method_scores: np.ndarray, higher_is_better: bool
) -> float:
    """Mean quality lost by a method against the unmitigated model, in the metric's units.

    Positive means worse images, whichever way the metric points; the trade-off plot puts
    this on x and the mitigation score on y.
    """
    means = []
    for name, scores in (("baseline_scores", baseline_scores), ("method_scores", method_scores)):
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 1 or scores.size == 0 or not np.isfinite(scores).all():
            raise ValueError(f"{name} must be a non-empty 1-D array of finite scores, got {scores}")
        means.append(scores.mean())
    baseline, method = means
    return float(baseline - method if higher_is_better else method - baseline)
