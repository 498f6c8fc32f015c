"""No-reference quality through pyiqa: PIQE on real photos; the offline guards of DB-CNN and Q-Align."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from scanner.mitigation.quality import (
    QualityConfig,
    make_quality_metric,
    quality_drop,
)
from tests.conftest import photo

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    return np.stack([photo(name, 256).numpy() for name in PHOTOS])


@pytest.fixture(scope="module")
def piqe():
    return make_quality_metric(QualityConfig())


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt fails the test instead of hanging or downloading."""

    def refuse(self, address):
        raise AssertionError(f"network access attempted: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_piqe_direction_and_name(piqe):
    # PIQE (Venkatanath et al. 2015) measures distortion: lower is better.
    assert piqe.name == "piqe" and piqe.higher_is_better is False


@pytest.mark.parametrize(
    "distort",
    [
        lambda x, rng: gaussian_filter(x, sigma=(0, 0, 2, 2)),
        lambda x, rng: np.clip(x + rng.normal(0.0, 0.2, x.shape), 0.0, 1.0),
    ],
    ids=["blur", "noise"],
)
def test_piqe_scores_distorted_photos_worse(piqe, clean, distort):
    """Measured: clean 50, 32, 31, 37; blurred (sigma 2) 90 to 95; noised (sigma 0.2) 66 to 74.

    PIQE rewards slight noise (sigma 0.02 lowers every score here), so the distortions are strong.
    """
    distorted = distort(clean, np.random.default_rng(0)).astype(np.float32)
    before, after = piqe(clean), piqe(distorted)
    assert before.shape == (4,) and before.dtype == np.float64
    assert np.all(after > before + 10.0), (before, after)
    assert quality_drop(before, after, piqe.higher_is_better) > 10.0


def test_piqe_batch_equals_one_by_one(piqe, clean):
    batch = piqe(clean)
    single = np.concatenate([piqe(clean[i : i + 1]) for i in range(len(clean))])
    np.testing.assert_allclose(batch, single, rtol=1e-6)


def test_piqe_gives_black_images_its_worst_score(piqe, clean):
    """pyiqa divides by the image maximum, so black would be NaN; flat grey already scores 100."""
    flat = np.stack([np.zeros((3, 64, 64)), np.full((3, 64, 64), 0.5)]).astype(np.float32)
    np.testing.assert_array_equal(piqe(flat), [100.0, 100.0])
    assert np.isfinite(piqe(np.concatenate([clean[:1, :, :64, :64], flat[:1]]))).all()


def test_images_are_checked(piqe):
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        piqe(np.full((1, 3, 64, 64), 2.0, dtype=np.float32))
    with pytest.raises(ValueError, match="H, W >= 32"):
        piqe(np.zeros((1, 3, 16, 64), dtype=np.float32))
    assert piqe(np.zeros((0, 3, 64, 64), dtype=np.float32)).shape == (0,)


def test_quality_drop_is_positive_for_worse_in_both_directions():
    assert quality_drop([30.0, 40.0], [45.0, 45.0], higher_is_better=False) == 10.0
    assert quality_drop([0.7, 0.5], [0.4, 0.4], higher_is_better=True) == pytest.approx(0.2)
    assert quality_drop([0.4], [0.6], higher_is_better=True) == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="method_scores must be a non-empty 1-D array"):
        quality_drop([1.0], [np.nan], higher_is_better=True)


def test_config_validation():
    with pytest.raises(ValueError, match="unknown quality metric 'niqe'"):
        QualityConfig(metric="niqe")
    with pytest.raises(ValueError, match="piqe needs no weights"):
        QualityConfig(weights="/some/file.pth")
    with pytest.raises(ValueError, match="dbcnn needs weights supplied locally"):
        QualityConfig(metric="dbcnn")
    with pytest.raises(ValueError, match="qalign needs weights supplied locally"):
        QualityConfig(metric="qalign")


def _dbcnn_caches(tmp_path, monkeypatch):
    """Point the torch hub and pyiqa caches at empty temporary folders."""
    import pyiqa.utils.download_util

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(pyiqa.utils.download_util, "DEFAULT_CACHE_DIR", str(tmp_path / "pyiqa"))
    return tmp_path / "torch" / "hub" / "checkpoints", tmp_path / "pyiqa"


def test_dbcnn_missing_files_are_named_without_network(tmp_path, monkeypatch, no_network):
    vgg_dir, scnn_dir = _dbcnn_caches(tmp_path, monkeypatch)
    with pytest.raises(ValueError, match="dbcnn weights: no such file"):
        make_quality_metric(QualityConfig(metric="dbcnn", weights=str(tmp_path / "none.pth")))

    checkpoint = tmp_path / "DBCNN_KonIQ10k.pth"
    torch.save({"params": {"fc.weight": torch.zeros(1, 4)}}, checkpoint)
    with pytest.raises(ValueError, match="vgg16-397923af.pth.*DBCNN_scnn-7ea73d75.pth"):
        make_quality_metric(QualityConfig(metric="dbcnn", weights=str(checkpoint)))

    vgg_dir.mkdir(parents=True)
    torch.save({}, vgg_dir / "vgg16-397923af.pth")
    with pytest.raises(ValueError, match=f"{scnn_dir}/DBCNN_scnn-7ea73d75.pth") as error:
        make_quality_metric(QualityConfig(metric="dbcnn", weights=str(checkpoint)))
    assert "vgg16" not in str(error.value)


class NotATensor:
    """A pickled instance of this needs code to rebuild: weights_only=True refuses it."""


def test_dbcnn_refuses_checkpoints_that_are_not_plain_tensors(tmp_path, monkeypatch, no_network):
    vgg_dir, scnn_dir = _dbcnn_caches(tmp_path, monkeypatch)
    for path in (vgg_dir / "vgg16-397923af.pth", scnn_dir / "DBCNN_scnn-7ea73d75.pth"):
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({}, path)
    checkpoint = tmp_path / "DBCNN_KonIQ10k.pth"
    torch.save({"params": NotATensor()}, checkpoint)
    with pytest.raises(ValueError, match="not a plain tensor checkpoint"):
        make_quality_metric(QualityConfig(metric="dbcnn", weights=str(checkpoint)))


def test_qalign_needs_a_filled_offline_hub_cache(tmp_path, no_network):
    with pytest.raises(ValueError, match="not a Hugging Face hub cache holding q-future/one-align"):
        make_quality_metric(QualityConfig(metric="qalign", weights=str(tmp_path)))

    snapshot = tmp_path / "models--q-future--one-align" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    # This process's hub cache is elsewhere (or not offline): loading would go to the network.
    with pytest.raises(
        ValueError, match=f"start it with HF_HUB_CACHE='{tmp_path}' HF_HUB_OFFLINE=1"
    ):
        make_quality_metric(QualityConfig(metric="qalign", weights=str(tmp_path)))


@pytest.mark.weights
@pytest.mark.skipif(
    not os.environ.get("FBMEM_DBCNN_WEIGHTS"),
    reason="set FBMEM_DBCNN_WEIGHTS to a DB-CNN checkpoint (VGG-16 and SCNN in their caches)",
)
def test_dbcnn_with_real_weights_prefers_clean_photos(clean):
    dbcnn = make_quality_metric(
        QualityConfig(metric="dbcnn", weights=os.environ["FBMEM_DBCNN_WEIGHTS"])
    )
    assert dbcnn.higher_is_better
    blurred = gaussian_filter(clean, sigma=(0, 0, 2, 2)).astype(np.float32)
    assert np.all(dbcnn(clean) > dbcnn(blurred))
