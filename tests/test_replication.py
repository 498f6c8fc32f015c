"""The replication set is ground truth: its files are complete and reproducible, and an
independent Algorithm 1 (pytorch-msssim on the true masks) gives every generation its
expected label against its own reference and NM against the others."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from pytorch_msssim import ms_ssim

from scanner.images import load_image, load_mask
from scanner.replication import build_replication_set

SIZE = 256  # the set is also checked at 512 (docs/replication.md); 256 keeps the oracle fast
TAU, BETA = 0.8, 0.03  # DESIGN 4.2
MIN_MARGIN = 0.05  # every deciding score at least this far from tau (measured: 0.10 or more)
MANIFEST_COLUMNS = [
    "gen_id",
    "gen",
    "gen_mask",
    "ref_id",
    "ref",
    "ref_mask",
    "kind",
    "expected",
    "prompt",
]
KIND_LABEL = {"verbatim": "VM", "foreground": "FM", "background": "BM", "unrelated": "NM"}


@pytest.fixture(scope="module")
def replication(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("replication")
    return out, build_replication_set(out, size=SIZE, seed=0)


def _tensors(out: Path, manifest: pd.DataFrame):
    refs = pd.read_csv(out / "references.csv")
    ref = torch.stack([torch.from_numpy(load_image(out / p, SIZE)) for p in refs["path"]])
    ref_fg = torch.stack([torch.from_numpy(load_mask(out / p, SIZE)) for p in refs["mask"]])
    gen = torch.stack([torch.from_numpy(load_image(out / p, SIZE)) for p in manifest["gen"]])
    gen_fg = torch.stack([torch.from_numpy(load_mask(out / p, SIZE)) for p in manifest["gen_mask"]])
    return list(refs["ref_id"]), ref, ref_fg, gen, gen_fg


def _algorithm1(xg, xt, sg, st) -> pd.DataFrame:
    """Algorithm 1 of the paper, written out with pytorch-msssim, for a batch of pairs."""

    def m(a, b):
        return ms_ssim(a, b, data_range=1.0, size_average=False)

    sg, st = sg[:, None].float(), st[:, None].float()
    p = sg.mean(dim=(1, 2, 3))
    small, large = p <= BETA, p >= 1 - BETA
    # Small foreground: the whole generation against the reference's foreground.
    gen_for_fg = torch.where(small[:, None, None, None], xg, xg * sg)
    # Large foreground: the whole generation against the reference's background.
    gen_for_bg = torch.where(large[:, None, None, None], xg, xg * (1 - sg))
    full, fg, bg = m(xg, xt), m(gen_for_fg, xt * st), m(gen_for_bg, xt * (1 - st))
    label = [
        "VM" if f >= TAU else "FM" if g >= TAU else "BM" if b >= TAU else "NM"
        for f, g, b in zip(full.tolist(), fg.tolist(), bg.tolist(), strict=True)
    ]
    return pd.DataFrame({"p": p, "m_full": full, "m_fg": fg, "m_bg": bg, "label": label})


def _score(out: Path, manifest: pd.DataFrame, ref_of_gen) -> pd.DataFrame:
    """Score generation i against reference ref_of_gen(i, ref_ids)."""
    ref_ids, ref, ref_fg, gen, gen_fg = _tensors(out, manifest)
    pairs = [(g, ref_ids.index(ref_of_gen(g, ref_ids))) for g in range(len(manifest))]
    gi = torch.tensor([g for g, _ in pairs])
    ri = torch.tensor([r for _, r in pairs])
    scores = _algorithm1(gen[gi], ref[ri], gen_fg[gi], ref_fg[ri])
    scores.insert(0, "ref_id", [ref_ids[r] for r in ri.tolist()])
    scores.insert(0, "gen_id", manifest["gen_id"].to_numpy()[gi.numpy()])
    return scores


def _assert_nm(scores: pd.DataFrame) -> None:
    wrong = scores[scores["label"] != "NM"]
    assert wrong.empty, f"generations matched an unintended reference:\n{wrong}"
    deciding = scores[["m_full", "m_fg", "m_bg"]].to_numpy().max(axis=1)
    assert (deciding <= TAU - MIN_MARGIN).all(), scores[deciding > TAU - MIN_MARGIN]


def test_manifest_and_files(replication):
    out, manifest = replication
    refs = pd.read_csv(out / "references.csv")
    assert list(refs.columns) == ["ref_id", "path", "mask", "caption"]
    assert 8 <= len(refs) <= 12 and refs["ref_id"].is_unique
    on_disk = pd.read_csv(out / "replication.csv")
    assert list(on_disk.columns[: len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
    pd.testing.assert_frame_equal(on_disk, manifest)
    assert manifest["gen_id"].is_unique
    assert (manifest["expected"] == manifest["kind"].map(KIND_LABEL)).all()
    assert set(manifest["kind"]) == set(KIND_LABEL)
    captions = refs.set_index("ref_id")["caption"]
    assert (manifest["prompt"] == manifest["ref_id"].map(captions)).all()
    assert (manifest["ref"] == manifest["ref_id"].map(refs.set_index("ref_id")["path"])).all()

    paths = (
        list(refs["path"]) + list(refs["mask"]) + list(manifest["gen"]) + list(manifest["gen_mask"])
    )
    assert not any(Path(p).is_absolute() for p in paths)  # the folder can move
    for path in paths:
        with Image.open(out / path) as img:
            assert img.format == "PNG" and img.size == (SIZE, SIZE)
            if "mask" in path:
                assert img.mode == "L" and set(np.unique(np.asarray(img))) <= {0, 255}
            else:
                assert img.mode == "RGB"


def test_each_branch_of_algorithm_1_is_covered(replication):
    out, manifest = replication
    p = np.array([load_mask(out / m, SIZE).mean() for m in manifest["gen_mask"]])
    small, large = p <= BETA, p >= 1 - BETA
    assert small.sum() >= 2 and large.sum() >= 2
    balanced = manifest[~small & ~large]
    assert set(balanced["kind"]) == set(KIND_LABEL)
    # Margins: the foreground region must be far from the beta boundaries, not just across them.
    assert (p[small] <= BETA - 0.005).all() and (p[large] >= 1 - BETA + 0.005).all()


def test_copies_are_where_the_masks_say(replication):
    out, manifest = replication
    rows = manifest.set_index("gen_id")
    for gen_id, row in rows.iterrows():
        gen, ref = load_image(out / row["gen"], SIZE), load_image(out / row["ref"], SIZE)
        gen_fg, ref_fg = (
            load_mask(out / row["gen_mask"], SIZE),
            load_mask(out / row["ref_mask"], SIZE),
        )
        error = np.abs(gen - ref).mean(axis=0)
        inside, outside = error[ref_fg].mean(), error[~ref_fg].mean()
        if row["kind"] in ("verbatim", "foreground", "background"):
            assert (gen_fg == ref_fg).all(), gen_id
        if row["kind"] == "verbatim":
            assert inside < 0.08 and outside < 0.08, gen_id  # tint + noise + JPEG
        elif row["kind"] == "foreground":
            assert inside < 0.02 < 0.1 < outside, gen_id
        elif row["kind"] == "background":
            assert outside < 0.02 < 0.1 < inside, gen_id


def test_rebuild_is_byte_identical_and_seed_only_moves_noise(replication, tmp_path):
    out, manifest = replication
    again = tmp_path / "again"
    build_replication_set(again, size=SIZE, seed=0)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel

    other = tmp_path / "other_seed"
    build_replication_set(other, size=SIZE, seed=1)
    for rel in files:
        same = (out / rel).read_bytes() == (other / rel).read_bytes()
        # References and masks are recipes; generation pixels carry the seed's noise.
        assert same == (rel.parts[0] == "references" or rel.name.endswith(("_mask.png", ".csv")))


def test_intended_reference_gives_expected_label_with_margin(replication):
    out, manifest = replication
    scores = _score(out, manifest, lambda g, _: manifest["ref_id"][g])
    expected = manifest["expected"].to_numpy()
    mismatched = scores[scores["label"].to_numpy() != expected]
    assert mismatched.empty, f"labels differ from the ground truth:\n{mismatched}"

    # How far the scores that decide the label are from tau, on the side they must be.
    full, fg, bg = (scores[c].to_numpy() - TAU for c in ("m_full", "m_fg", "m_bg"))
    margin = np.select(
        [expected == "VM", expected == "FM", expected == "BM"],
        [full, np.minimum(-full, fg), np.minimum.reduce([-full, -fg, bg])],
        np.minimum.reduce([-full, -fg, -bg]),
    )
    assert (margin >= MIN_MARGIN).all(), scores[margin < MIN_MARGIN]


def test_a_neighbouring_reference_gives_nm(replication):
    out, manifest = replication
    _assert_nm(
        _score(out, manifest, lambda g, ids: ids[(ids.index(manifest["ref_id"][g]) + 1) % len(ids)])
    )


@pytest.mark.slow
def test_every_other_reference_gives_nm(replication):
    out, manifest = replication
    ref_ids = list(pd.read_csv(out / "references.csv")["ref_id"])
    for shift in range(2, len(ref_ids)):  # shift 1 is the fast test above
        _assert_nm(
            _score(
                out,
                manifest,
                lambda g, ids, s=shift: ids[(ids.index(manifest["ref_id"][g]) + s) % len(ids)],
            )
        )


@pytest.mark.parametrize("size", [160, 0, 256.0, "512"])
def test_rejects_a_size_msssim_cannot_score(tmp_path, size):
    with pytest.raises(ValueError, match="canonical size"):
        build_replication_set(tmp_path, size=size)


@pytest.mark.parametrize("seed", [-1, 0.5, "0"])
def test_rejects_a_seed_that_is_not_a_non_negative_int(tmp_path, seed):
    with pytest.raises(ValueError, match="seed"):
        build_replication_set(tmp_path, seed=seed)
