"""MS-SSIM / SSIM against pytorch-msssim, the independent oracle."""

from __future__ import annotations

import pytest
import pytorch_msssim
import torch

from scanner import similarity, ssim_cpu
from scanner.similarity import image_stats, ms_ssim, pair_scores, spec_for, ssim


def _pairs(kind: str, dtype: torch.dtype, photos, size: int = 192):
    if kind == "random":
        x = torch.rand(3, 3, size, size, dtype=dtype)
        y = (0.6 * x + 0.4 * torch.rand_like(x)).clamp(0, 1)
        return x, y
    x = torch.stack([photos["astronaut"], photos["coffee"], photos["chelsea"]]).to(dtype)
    noisy = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    y = torch.stack([noisy[0], photos["rocket"].to(dtype), noisy[2]])
    return x, y


@pytest.mark.parametrize("kind", ["random", "natural"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-5), (torch.float32, 1e-4)])
def test_ms_ssim_matches_pytorch_msssim(kind, dtype, tol, photos):
    x, y = _pairs(kind, dtype, photos)
    expected = pytorch_msssim.ms_ssim(x, y, data_range=1.0, size_average=False)
    got = ms_ssim(x, y, data_range=1.0)
    assert got.shape == (3,)
    torch.testing.assert_close(got, expected, atol=tol, rtol=0)


@pytest.mark.parametrize("kind", ["random", "natural"])
def test_ssim_matches_pytorch_msssim(kind, photos):
    x, y = _pairs(kind, torch.float64, photos)
    expected = pytorch_msssim.ssim(x, y, data_range=1.0, size_average=False)
    torch.testing.assert_close(ssim(x, y, data_range=1.0), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [161, 173])
def test_odd_sizes_pool_like_pytorch_msssim(size):
    x = torch.rand(2, 3, size, size, dtype=torch.float64)
    y = (x + 0.1 * torch.rand_like(x)).clamp(0, 1)
    expected = pytorch_msssim.ms_ssim(x, y, data_range=1.0, size_average=False)
    torch.testing.assert_close(ms_ssim(x, y, data_range=1.0), expected, atol=1e-5, rtol=0)


def test_data_range_is_respected():
    x = torch.rand(2, 3, 192, 192, dtype=torch.float64) * 255
    y = (x + 20 * torch.rand_like(x)).clamp(0, 255)
    expected = pytorch_msssim.ms_ssim(x, y, data_range=255.0, size_average=False)
    torch.testing.assert_close(ms_ssim(x, y, data_range=255.0), expected, atol=1e-5, rtol=0)


def test_batched_equals_one_by_one(photos):
    x, y = _pairs("natural", torch.float32, photos)
    batched = ms_ssim(x, y, data_range=1.0)
    single = torch.cat([ms_ssim(x[i : i + 1], y[i : i + 1], data_range=1.0) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-6, rtol=0)


def test_cached_statistics_pair_any_to_any(photos):
    """One statistics pass per image serves every pairing, identical to direct calls."""
    imgs = torch.stack(list(photos.values())).double()
    spec = spec_for("ms_ssim")
    stats = image_stats(imgs, spec)
    ia = torch.tensor([0, 0, 1, 3, 2])
    ib = torch.tensor([1, 2, 3, 0, 2])
    expected = pytorch_msssim.ms_ssim(imgs[ia], imgs[ib], data_range=1.0, size_average=False)
    torch.testing.assert_close(
        pair_scores(stats, ia, stats, ib, spec), expected, atol=1e-10, rtol=0
    )


def test_identical_images_score_one(photos):
    x = photos["coffee"][None].double()
    assert ms_ssim(x, x, data_range=1.0).item() == pytest.approx(1.0, abs=1e-12)


def test_data_range_is_mandatory():
    x = torch.rand(1, 3, 192, 192)
    with pytest.raises(TypeError):
        ms_ssim(x, x)  # no silent default of 255


@pytest.mark.parametrize(
    "x,y,err,match",
    [
        (torch.rand(1, 3, 160, 160), torch.rand(1, 3, 160, 160), ValueError, "at least 161"),
        (torch.rand(1, 3, 192, 192), torch.rand(1, 3, 200, 200), ValueError, "same shape"),
        (torch.rand(3, 192, 192), torch.rand(3, 192, 192), ValueError, r"\(N, C, H, W\)"),
        (
            torch.zeros(1, 3, 192, 192, dtype=torch.uint8),
            torch.zeros(1, 3, 192, 192, dtype=torch.uint8),
            TypeError,
            "floating",
        ),
    ],
)
def test_bad_inputs_raise_clear_errors(x, y, err, match):
    with pytest.raises(err, match=match):
        ms_ssim(x, y, data_range=1.0)


def test_ssim_accepts_small_images():
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    expected = pytorch_msssim.ssim(x, x * 0.5, data_range=1.0, size_average=False)
    torch.testing.assert_close(ssim(x, x * 0.5, data_range=1.0), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("shape", [(64, 64), (33, 48), (161, 173)])
def test_cpu_downsample_is_avg_pool_bit_for_bit(shape):
    x = torch.rand(2, 3, *shape)
    expected = torch.nn.functional.avg_pool2d(x, 2, padding=[s % 2 for s in shape])
    assert torch.equal(torch.from_numpy(ssim_cpu.downsample(x.numpy())), expected)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_tensor_path_equals_fused_cpu_path(dtype, tol, photos, monkeypatch):
    """GPUs run the tensor path (depthwise convolutions there, banded products on a CPU);
    forced onto the CPU it must give what the fused kernels give."""
    x, y = _pairs("natural", dtype, photos)
    fused = ms_ssim(x, y, data_range=1.0)
    monkeypatch.setattr(similarity, "_fused", lambda *tensors: False)
    torch.testing.assert_close(ms_ssim(x, y, data_range=1.0), fused, atol=tol, rtol=0)


def test_thread_count_does_not_change_scores(photos):
    x, y = _pairs("natural", torch.float32, photos)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ms_ssim(x, y, data_range=1.0)
        torch.set_num_threads(2)
        two = ms_ssim(x, y, data_range=1.0)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
