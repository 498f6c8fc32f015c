"""Region-pooled scores against a literal implementation of their definition, and the cases
they exist for: zeroed areas that match in masked mode, background copies with a new shape."""

from __future__ import annotations

import json

import numpy as np
import pytest
import pytorch_msssim
import torch
import torch.nn.functional as F
from pytorch_msssim.ssim import _fspecial_gauss_1d, gaussian_filter

from scanner import similarity
from scanner.fbmem import score_pairs
from scanner.scoring import EngineConfig
from scanner.sscd import SSCDModel
from tests.test_fbmem import S, box, scene  # noqa: F401  (scene is a fixture)

WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
INSIDE = similarity.REGION_INSIDE  # a window is in a region when this share of it is (by weight)


def pooled_oracle(gen, ref, gen_fg, ref_fg, beta=0.03):
    """(M_full, M_fg, M_bg) of one pair, written out from the definition one scale at a time,
    with pytorch-msssim's own Gaussian filter and torch's average pooling."""
    x, y = gen[None].double(), ref[None].double()
    masks = gen_fg[None, None].double(), ref_fg[None, None].double()
    win = _fspecial_gauss_1d(11, 1.5).double()[None]  # (1, 1, 1, 11): one channel
    win3 = win.repeat(3, 1, 1, 1)
    c1, c2 = 0.01**2, 0.03**2
    cs_maps, ssim_maps, shares = [], [], []
    for _ in WEIGHTS:
        mu_x, mu_y = (
            gaussian_filter(x, win3),
            gaussian_filter(y, win3),
        )
        var_x = gaussian_filter(x * x, win3) - mu_x**2
        var_y = gaussian_filter(y * y, win3) - mu_y**2
        cov = gaussian_filter(x * y, win3) - mu_x * mu_y
        cs = (2 * cov + c2) / (var_x + var_y + c2)
        cs_maps.append(cs[0])
        ssim_maps.append((cs * (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1))[0])
        shares.append([gaussian_filter(m, win)[0, 0] for m in masks])
        pool = [s % 2 for s in x.shape[2:]]
        x, y = F.avg_pool2d(x, 2, padding=pool), F.avg_pool2d(y, 2, padding=pool)
        masks = [F.avg_pool2d(m, 2, padding=pool) for m in masks]

    def inside(side, share):
        if side == "whole":
            return torch.ones_like(share, dtype=torch.bool)
        return share >= INSIDE if side == "fg" else 1 - share >= INSIDE

    def region(side_gen, side_ref):
        windows = []
        for share_gen, share_ref in shares:
            both = inside(side_gen, share_gen) & inside(side_ref, share_ref)
            if not both.any():
                break  # this scale and the coarser ones cannot see the region
            windows.append(both)
        if not windows:
            return 0.0
        used = WEIGHTS[: len(windows)]
        score = torch.ones(3, dtype=torch.float64)
        for level, both in enumerate(windows):
            maps = ssim_maps if level == len(windows) - 1 else cs_maps
            mean = maps[level][:, both].mean(1).clamp(min=0)
            score *= mean ** (used[level] * sum(WEIGHTS) / sum(used))
        return score.mean().item()

    full = pytorch_msssim.ms_ssim(gen[None].double(), ref[None].double(), data_range=1.0).item()
    p = gen_fg.float().mean().item()
    if p <= beta:
        return full, region("whole", "fg"), region("bg", "bg")
    if p >= 1 - beta:
        return full, region("fg", "fg"), region("whole", "bg")
    return full, region("fg", "fg"), region("bg", "bg")


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_pooled_scores_match_their_definition(scene, dtype, tol):  # noqa: F811
    gens, refs, gen_fg, ref_fg = scene
    res = score_pairs(gens.to(dtype), refs.to(dtype), gen_fg, ref_fg, region_mode="pooled")
    assert sorted(set(res.branch)) == ["balanced", "large_fg", "small_fg"]
    for i, (g, r) in enumerate(res.pairs):
        expected = pooled_oracle(gens[g], refs[r], gen_fg[g], ref_fg[r])
        got = (res.m_full[i], res.m_fg[i], res.m_bg[i])
        np.testing.assert_allclose(got, expected, atol=tol, rtol=0, err_msg=f"pair {g, r}")


def test_all_ones_masks_give_plain_ms_ssim():
    """Both foregrounds fill the image: the foreground region is every window, so pooled M_fg
    is pytorch-msssim's MS-SSIM of the two images; the background holds no window: 0."""
    p = _photos()
    gen = (0.6 * p["astronaut"] + 0.4 * p["coffee"]).double()[None]
    ref = p["astronaut"].double()[None]
    ones = torch.ones(1, S, S, dtype=torch.bool)
    res = score_pairs(gen, ref, ones, ones, region_mode="pooled")
    plain = pytorch_msssim.ms_ssim(gen, ref, data_range=1.0).item()
    assert res.branch.tolist() == ["large_fg"]
    assert 0.3 < plain < 0.95  # a pair that is neither identical nor unrelated
    assert res.m_fg[0] == pytest.approx(plain, abs=1e-6)
    assert res.m_full[0] == pytest.approx(plain, abs=1e-6)
    assert res.m_bg[0] == 0


def test_constant_images_with_different_masks_by_hand():
    """Two flat images, a = 0.4 and b = 0.6: every cs value is 1 and every SSIM value is
    s = (2ab + c1) / (a^2 + b^2 + c1), so a region's pooled MS-SSIM is s to the rescaled
    weight of the coarsest scale that sees it.

    192 px; the scales are 192, 96, 48, 24 and 12 px. The generation's foreground is the
    square [32, 96), the reference's [64, 128). Both hold [64, 96): 32 px, then 16, 8, 4 and
    2 px. An 8 px square holds a 3.5-px-radius window with 98% of its weight (>= 90%), a 4 px
    one at most 64%: the foreground is seen by scales 0-2. The background both hold (outside
    both squares) holds windows at 24 px (the corner far from the squares) but none at 12 px,
    where every window covers the squares: scales 0-3."""
    a, b, c1 = 0.4, 0.6, 0.01**2
    gen = torch.full((1, 3, S, S), a, dtype=torch.float64)
    ref = torch.full((1, 3, S, S), b, dtype=torch.float64)
    gen_fg, ref_fg = box(32, 32, 64, 64)[None], box(64, 64, 64, 64)[None]
    s = (2 * a * b + c1) / (a * a + b * b + c1)

    def seen_up_to(level):  # weights of the scales that see the region, rescaled to their sum
        return s ** (WEIGHTS[level] * sum(WEIGHTS) / sum(WEIGHTS[: level + 1]))

    res = score_pairs(gen, ref, gen_fg, ref_fg, region_mode="pooled")
    assert res.branch.tolist() == ["balanced"]
    assert res.m_full[0] == pytest.approx(s ** WEIGHTS[4], abs=1e-5)
    assert res.m_fg[0] == pytest.approx(seen_up_to(2), abs=1e-5)
    assert res.m_bg[0] == pytest.approx(seen_up_to(3), abs=1e-5)
    # Masked mode instead compares each flat image with a zeroed remainder of another shape.
    masked = score_pairs(gen, ref, gen_fg, ref_fg)
    assert abs(masked.m_fg[0] - res.m_fg[0]) > 0.05


def test_masked_is_the_default_and_unchanged(scene):  # noqa: F811
    """The default is the paper's masked mode: the literal oracle of test_fbmem holds for it."""
    from tests.test_fbmem import oracle

    gens, refs, gen_fg, ref_fg = scene
    default = score_pairs(gens, refs, gen_fg, ref_fg)
    masked = score_pairs(gens, refs, gen_fg, ref_fg, region_mode="masked")
    for field in ("m_full", "m_fg", "m_bg", "label"):
        np.testing.assert_array_equal(getattr(default, field), getattr(masked, field))
    g, r = default.pairs[0]
    expected = oracle(gens[g], refs[r], gen_fg[g], ref_fg[r])
    got = (default.m_full[0], default.m_fg[0], default.m_bg[0])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_full_score_is_the_same_in_both_modes(scene):  # noqa: F811
    masked = score_pairs(*scene)
    pooled = score_pairs(*scene, region_mode="pooled")
    np.testing.assert_array_equal(pooled.m_full, masked.m_full)


def _photos():
    from tests.conftest import photo

    return {n: photo(n, S) for n in ("astronaut", "coffee", "chelsea", "rocket")}


def test_zeroed_areas_do_not_match_each_other():
    """Two unrelated photos with the same large foreground mask: masked mode compares two
    mostly black backgrounds and calls it a background copy; pooled mode does not."""
    p = _photos()
    mask = ~box(0, 0, 30, S)[None]  # 84% foreground, a strip of background at the top
    masked = score_pairs(p["astronaut"][None], p["coffee"][None], mask, mask)
    pooled = score_pairs(p["astronaut"][None], p["coffee"][None], mask, mask, region_mode="pooled")
    assert masked.label.tolist() == ["BM"] and masked.m_bg[0] > 0.9
    assert pooled.label.tolist() == ["NM"] and pooled.m_bg[0] < 0.2


def test_background_copy_with_a_new_foreground_shape():
    """The reference's background behind a new foreground of another shape and place: the
    masks disagree, so masked mode sees real pixels against zeros; pooled mode compares the
    background both images hold."""
    p = _photos()
    ref_fg, gen_fg = box(40, 50, 100, 90), box(60, 30, 80, 120)
    ref = torch.where(ref_fg, p["astronaut"], p["coffee"])
    gen = (torch.where(gen_fg, p["rocket"], p["coffee"]) + 0.01 * torch.randn(3, S, S)).clamp(0, 1)
    masked = score_pairs(gen[None], ref[None], gen_fg[None], ref_fg[None])
    pooled = score_pairs(gen[None], ref[None], gen_fg[None], ref_fg[None], region_mode="pooled")
    assert masked.label.tolist() == ["NM"]
    assert pooled.label.tolist() == ["BM"] and pooled.m_bg[0] > 0.9


def test_a_region_no_scale_sees_scores_zero():
    p = _photos()
    astro = p["astronaut"][None]
    res = score_pairs(
        astro, astro, box(0, 0, 40, 40)[None], box(150, 150, 40, 40)[None], region_mode="pooled"
    )
    assert res.m_fg[0] == 0  # the two foregrounds share no pixel: nothing to compare
    assert res.m_full[0] == pytest.approx(1.0) and res.m_bg[0] == pytest.approx(1.0)


def test_tensor_path_equals_fused_cpu_path(scene, monkeypatch):  # noqa: F811
    gens, refs, gen_fg, ref_fg = (t.double() if t.is_floating_point() else t for t in scene)
    fused = score_pairs(gens, refs, gen_fg, ref_fg, region_mode="pooled")
    monkeypatch.setattr(similarity, "_fused", lambda *tensors: False)
    tensor = score_pairs(gens, refs, gen_fg, ref_fg, region_mode="pooled")
    for field in ("m_full", "m_fg", "m_bg"):
        np.testing.assert_allclose(getattr(tensor, field), getattr(fused, field), atol=1e-10)


def test_tiles_and_sparse_pairs_equal_dense(scene):  # noqa: F811
    gens, refs, gen_fg, ref_fg = scene
    dense = score_pairs(gens, refs, gen_fg, ref_fg, region_mode="pooled")
    pairs = torch.tensor([[3, 1], [0, 0], [2, 1], [1, 0], [0, 0]])
    engine = EngineConfig(gen_tile=3, ref_tile=1, pair_batch=2)
    sparse = score_pairs(gens, refs, gen_fg, ref_fg, pairs, engine=engine, region_mode="pooled")
    rows = pairs[:, 0] * 2 + pairs[:, 1]
    for field in ("m_full", "m_fg", "m_bg"):
        np.testing.assert_allclose(getattr(sparse, field), getattr(dense, field)[rows], atol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit.s[a-z]+` is deprecated:FutureWarning")
def test_region_mode_is_checked(scene, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="region_mode"):
        score_pairs(*scene, region_mode="soft")
    scripted = torch.jit.script(torch.nn.Flatten())
    scripted.save(str(tmp_path / "sscd.pt"))
    with pytest.raises(ValueError, match="pooled"):
        score_pairs(*scene, metric=SSCDModel(str(tmp_path / "sscd.pt")), region_mode="pooled")


# Wiring: the option reaches the engine from the CLI, the scan config and the Ray job's config.


def _bm_files(tmp_path):
    """A background copy with a new foreground shape (masked: NM, pooled: BM) as files."""
    from scanner.images import encode_png

    p = _photos()
    ref_fg, gen_fg = box(40, 50, 100, 90), box(60, 30, 80, 120)
    ref = torch.where(ref_fg, p["astronaut"], p["coffee"])
    gen = (torch.where(gen_fg, p["rocket"], p["coffee"]) + 0.01 * torch.randn(3, S, S)).clamp(0, 1)
    for name, array in {"gen": gen, "ref": ref, "gen_mask": gen_fg, "ref_mask": ref_fg}.items():
        (tmp_path / f"{name}.png").write_bytes(encode_png(array.numpy()))
    return tmp_path


@pytest.mark.parametrize("mode,label", [("masked", "NM"), ("pooled", "BM")])
def test_compare_command_takes_the_region_mode(tmp_path, capsys, mode, label):
    from scanner.cli import main

    files = _bm_files(tmp_path)
    code = main(
        ["compare", str(files / "gen.png"), str(files / "ref.png"), "--size", str(S), "--json"]
        + ["--gen-mask", str(files / "gen_mask.png"), "--ref-mask", str(files / "ref_mask.png")]
        + ["--region-mode", mode]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["label"] == label


def test_scan_records_its_region_mode(tmp_path):
    import pandas as pd

    from scanner.calibrate import calibrate
    from scanner.cli import main
    from scanner.store import ShardedTables

    files = _bm_files(tmp_path)
    pd.DataFrame({"path": ["ref.png"], "caption": ["x"]}).to_csv(files / "refs.csv", index=False)
    pd.DataFrame({"path": ["gen.png"], "prompt": ["x"]}).to_csv(files / "gens.csv", index=False)
    assert (
        main(
            [
                "build-reference",
                str(files / "refs.csv"),
                "--out",
                str(files / "store"),
                "--size",
                str(S),
            ]
        )
        == 0
    )
    out = files / "scan"
    argv = ["scan-images", str(files / "gens.csv"), "--reference", str(files / "store")]
    assert main([*argv, "--out", str(out), "--top-k", "0", "--region-mode", "pooled"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["region_mode"] == "pooled"
    labels = ShardedTables(out, ["labels"]).read("labels").to_pandas()
    assert len(labels) == 1 and labels["label"][0] == "BM"  # masked mode would say NM
    # Calibration scores whole images, so a pooled scan calibrates like any other.
    human = pd.DataFrame({"gen_id": labels["gen_id"], "label": ["TM"]})
    scores = calibrate(human, out).scores
    assert scores["ref_id"].tolist() == [labels["ref_id"][0]]
    assert scores["ms_ssim"][0] == pytest.approx(labels["m_full"][0], abs=1e-4)
    assert main([*argv, "--out", str(out), "--metric", "sscd", "--region-mode", "pooled"]) == 2


def test_full_scan_config_takes_the_region_mode():
    import jobs.full_scan as job
    from scanner.plan import load_config

    _, overrides, _ = job.parse_args(["--region-mode", "pooled"])
    assert load_config(None, overrides).region_mode == "pooled"
    assert load_config(None, {"demo": "replication"}).region_mode == "masked"
    with pytest.raises(ValueError, match="SSCD"):
        load_config(None, {"demo": "replication", "region_mode": "pooled", "metric": "sscd"})
    with pytest.raises(ValueError, match="region_mode"):
        load_config(None, {"demo": "replication", "region_mode": "soft"})


def test_holdout_background_copies_need_pooled_mode(tmp_path):
    """The judging set's background copies carry new foregrounds through masks of their own
    shape: with the true masks, pooled mode finds each of them and masked mode misses them."""
    from scanner.images import load_image, load_mask
    from scanner.replication_holdout import build_holdout_set

    manifest = build_holdout_set(tmp_path, size=256)
    copies = manifest[manifest["kind"] == "background"]
    assert len(copies) == 8
    for row in copies.itertuples():
        gen_mask, ref_mask = load_mask(tmp_path / row.gen_mask), load_mask(tmp_path / row.ref_mask)
        assert (gen_mask != ref_mask).mean() > 0.05  # the foregrounds differ in shape or place

    def stack(loader, paths):
        return torch.from_numpy(np.stack([loader(tmp_path / p, 256) for p in paths]))

    inputs = (
        stack(load_image, copies["gen"]),
        stack(load_image, copies["ref"]),
        stack(load_mask, copies["gen_mask"]),
        stack(load_mask, copies["ref_mask"]),
        torch.arange(len(copies)).repeat(2, 1).T,  # each copy against its own reference
    )
    assert score_pairs(*inputs, region_mode="pooled").label.tolist() == ["BM"] * 8
    assert (score_pairs(*inputs).label == "BM").sum() <= 1


def test_demo_takes_the_region_mode(tmp_path, monkeypatch, capsys):
    """`fbmem demo --region-mode pooled` labels the replication set in pooled mode (true masks
    only here: the segmenters have their own tests) and says so in its summary."""
    from scanner import demo
    from scanner.cli import main

    monkeypatch.setattr(demo, "demo_segmenters", lambda device, u2netp_path=None: [])
    assert main(["demo", "--out", str(tmp_path), "--region-mode", "pooled"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["region_mode"] == "pooled" and list(summary["runs"]) == ["true"]
    assert summary["runs"]["true"]["correct"] == summary["generations"] == 32
    assert "region mode pooled" in capsys.readouterr().out
