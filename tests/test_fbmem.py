"""Algorithm 1: branches against an independent pytorch-msssim oracle, labels by hand."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_msssim
import torch

from scanner.fbmem import PairScores, branches, classify, score_pairs, select_matches
from scanner.scoring import BALANCED, LARGE_FG, SMALL_FG, EngineConfig

S = 192


def oracle(gen, ref, gen_fg, ref_fg, beta=0.03):
    """Algorithm 1's three scores written out literally from the paper's pseudo-code."""

    def m(a, b):
        return pytorch_msssim.ms_ssim(a[None], b[None], data_range=1.0).item()

    p = gen_fg.float().mean().item()
    sf_g, sb_g = gen_fg.to(gen.dtype), (~gen_fg).to(gen.dtype)
    sf_t, sb_t = ref_fg.to(ref.dtype), (~ref_fg).to(ref.dtype)
    full = m(gen, ref)
    if p <= beta:
        return full, m(gen, ref * sf_t), m(gen * sb_g, ref * sb_t)
    if p >= 1 - beta:
        return full, m(gen * sf_g, ref * sf_t), m(gen, ref * sb_t)
    return full, m(gen * sf_g, ref * sf_t), m(gen * sb_g, ref * sb_t)


def box(top, left, h, w):
    mask = torch.zeros(S, S, dtype=torch.bool)
    mask[top : top + h, left : left + w] = True
    return mask


@pytest.fixture(scope="module")
def scene():
    """Generations covering all three branches against references with known copies."""
    from tests.conftest import photo

    astro, coffee, chelsea, rocket = (
        photo(n, S) for n in ("astronaut", "coffee", "chelsea", "rocket")
    )
    fg_ref = box(40, 50, 100, 90)
    ref0 = torch.where(fg_ref, astro, coffee)  # astronaut patch on coffee
    ref1 = torch.where(fg_ref, coffee, chelsea)
    gen_fg = torch.stack(
        [
            box(40, 50, 100, 90),  # balanced
            box(0, 0, 5, 5),  # p = 25 / 192^2 <= 0.03: small_fg
            ~box(0, 0, 10, 10),  # p >= 0.97: large_fg
            box(40, 50, 100, 90),  # balanced
        ]
    )
    gens = torch.stack(
        [
            torch.where(
                fg_ref, astro, rocket
            ),  # ref0's foreground on a new background: FM against ref0
            (coffee + 0.02 * torch.randn_like(coffee)).clamp(
                0, 1
            ),  # near-copy of ref0's background
            chelsea,
            torch.where(
                fg_ref, rocket, coffee
            ),  # ref0's background with a new foreground: BM against ref0
        ]
    )
    refs = torch.stack([ref0, ref1])
    ref_fg = torch.stack([fg_ref, fg_ref])
    return gens, refs, gen_fg, ref_fg


def test_branches_follow_foreground_fraction():
    p = torch.tensor([0.0, 0.03, 0.0301, 0.5, 0.9699, 0.97, 1.0])
    expected = [SMALL_FG, SMALL_FG, BALANCED, BALANCED, BALANCED, LARGE_FG, LARGE_FG]
    assert branches(p, beta=0.03).tolist() == expected


def test_label_order_and_tau_boundary():
    m_full = np.array([0.8, 0.79999, 0.9, 0.1, 0.1, 0.1, 0.5])
    m_fg = np.array([0.1, 0.8, 0.9, 0.85, 0.1, 0.79, 0.95])
    m_bg = np.array([0.1, 0.9, 0.9, 0.9, 0.8, 0.79, 0.95])
    assert classify(m_full, m_fg, m_bg, tau=0.8).tolist() == [
        "VM",
        "FM",
        "VM",
        "FM",
        "BM",
        "NM",
        "FM",
    ]
    assert classify(m_full, m_fg, m_bg, tau=0.96).tolist() == ["NM"] * 7


def test_all_branches_match_the_literal_algorithm(scene):
    gens, refs, gen_fg, ref_fg = scene
    res = score_pairs(gens, refs, gen_fg, ref_fg)
    assert res.branch.reshape(4, 2)[:, 0].tolist() == [
        "balanced",
        "small_fg",
        "large_fg",
        "balanced",
    ]
    for i, (g, r) in enumerate(res.pairs):
        expected = oracle(gens[g], refs[r], gen_fg[g], ref_fg[r])
        got = (res.m_full[i], res.m_fg[i], res.m_bg[i])
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert res.fg_fraction[2] == pytest.approx(25 / S**2)


def test_known_copies_get_their_labels(scene):
    gens, refs, gen_fg, ref_fg = scene
    res = score_pairs(gens, refs, gen_fg, ref_fg)
    labels = dict(zip(map(tuple, res.pairs.tolist()), res.label))
    assert labels[(0, 0)] == "FM"  # same foreground, new background
    assert labels[(3, 0)] == "BM"  # same background, new foreground
    assert labels[(0, 1)] == "NM"


def test_identical_pair_is_verbatim(photos):
    x = photos["chelsea"][None]
    fg = box(20, 20, 100, 100)[None]
    res = score_pairs(x, x, fg, fg)
    assert res.label.tolist() == ["VM"]
    assert res.m_full[0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    "engine",
    [
        EngineConfig(gen_tile=1, ref_tile=1, pair_batch=1),
        EngineConfig(gen_tile=3, ref_tile=2, pair_batch=5),
        EngineConfig(),
    ],
)
def test_tiles_and_sparse_pairs_equal_dense(scene, engine):
    gens, refs, gen_fg, ref_fg = scene
    refs = torch.cat([refs, refs.flip(0), refs[:1]])  # 5 references: tiles that do not divide
    ref_fg = torch.cat([ref_fg, ref_fg.flip(0), ref_fg[:1]])
    dense = score_pairs(gens, refs, gen_fg, ref_fg)
    pairs = torch.tensor(
        [[3, 4], [0, 0], [2, 1], [0, 3], [3, 0], [1, 2], [0, 0]]
    )  # unsorted, repeated
    sparse = score_pairs(gens, refs, gen_fg, ref_fg, pairs, engine=engine)
    rows = pairs[:, 0] * 5 + pairs[:, 1]
    for field in ("m_full", "m_fg", "m_bg"):
        np.testing.assert_allclose(getattr(sparse, field), getattr(dense, field)[rows], atol=1e-6)
    assert sparse.label.tolist() == dense.label[rows].tolist()
    assert sparse.pairs.tolist() == pairs.tolist()


def test_reduced_precision_storage_stays_close(scene):
    gens, refs, gen_fg, ref_fg = scene
    exact = score_pairs(gens, refs, gen_fg, ref_fg)
    half = score_pairs(gens, refs, gen_fg, ref_fg, engine=EngineConfig(storage="float16"))
    for field in ("m_full", "m_fg", "m_bg"):
        assert np.abs(getattr(half, field) - getattr(exact, field)).max() < 5e-3


def test_empty_pair_list(scene):
    gens, refs, gen_fg, ref_fg = scene
    res = score_pairs(gens, refs, gen_fg, ref_fg, torch.zeros(0, 2, dtype=torch.long))
    assert len(res) == 0
    assert select_matches(res) == {}


def _scores(rows):
    pairs, m_full, m_fg, m_bg, labels = zip(*rows)
    n = len(rows)
    return PairScores(
        pairs=np.array(pairs),
        m_full=np.array(m_full),
        m_fg=np.array(m_fg),
        m_bg=np.array(m_bg),
        fg_fraction=np.full(n, 0.5),
        branch=np.array(["balanced"] * n),
        label=np.array(labels),
    )


_CANDIDATES = [
    ((0, 0), 0.5, 0.85, 0.9, "FM"),  # mean 0.875
    ((0, 1), 0.6, 0.82, 0.99, "FM"),  # mean 0.905: highest mean; higher M_bg, same label
    ((0, 2), 0.7, 0.5, 0.95, "BM"),  # highest M_full, less severe
    ((1, 0), 0.3, 0.2, 0.1, "NM"),
    ((1, 1), 0.4, 0.2, 0.15, "NM"),  # highest by every measure
    ((2, 3), 0.81, 0.1, 0.1, "VM"),  # most severe, highest M_full, lowest mean
    ((2, 4), 0.5, 0.9, 0.9, "FM"),  # highest mean: the paper's match is FM, not VM
    ((3, 5), 0.6, 0.9, 0.1, "FM"),
    ((3, 2), 0.6, 0.9, 0.1, "FM"),  # exact tie: lower reference index wins
]


@pytest.mark.parametrize(
    "match_by,expected",
    [
        ("mean", {0: 1, 1: 4, 2: 6, 3: 8}),
        ("full", {0: 2, 1: 4, 2: 5, 3: 8}),
        ("most-severe", {0: 0, 1: 4, 2: 5, 3: 8}),  # FM decided by M_fg, NM by M_full
    ],
)
def test_one_match_per_generation(match_by, expected):
    assert select_matches(_scores(_CANDIDATES), match_by) == expected


def test_default_match_is_highest_mean_similarity():
    assert select_matches(_scores(_CANDIDATES)) == select_matches(_scores(_CANDIDATES), "mean")


def test_unknown_match_by():
    with pytest.raises(ValueError, match="match_by"):
        select_matches(_scores(_CANDIDATES), "max")


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        ({"tau": 0.0}, ValueError, "tau"),
        ({"beta": 0.5}, ValueError, "beta"),
        ({"metric": "lpips"}, ValueError, "unknown metric"),
        ({"pairs": torch.tensor([[0, 9]])}, ValueError, "out of range"),
        ({"pairs": torch.tensor([0.0, 1.0])}, ValueError, r"\(P, 2\)"),
    ],
)
def test_bad_arguments(scene, kwargs, err, match):
    gens, refs, gen_fg, ref_fg = scene
    with pytest.raises(err, match=match):
        score_pairs(gens, refs, gen_fg, ref_fg, **kwargs)


def test_bad_masks_and_ranges(scene):
    gens, refs, gen_fg, ref_fg = scene
    with pytest.raises(TypeError, match="boolean"):
        score_pairs(gens, refs, gen_fg.float(), ref_fg)
    with pytest.raises(ValueError, match="shape"):
        score_pairs(gens, refs, gen_fg[:, :10], ref_fg)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        score_pairs(gens * 255, refs, gen_fg, ref_fg)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_cpu(scene):
    gens, refs, gen_fg, ref_fg = scene
    cpu = score_pairs(gens, refs, gen_fg, ref_fg)
    gpu = score_pairs(gens.cuda(), refs.cuda(), gen_fg.cuda(), ref_fg.cuda())
    for field in ("m_full", "m_fg", "m_bg"):
        np.testing.assert_allclose(getattr(gpu, field), getattr(cpu, field), atol=1e-4)
    assert gpu.label.tolist() == cpu.label.tolist()
