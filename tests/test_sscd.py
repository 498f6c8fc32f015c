"""SSCD as a metric: TorchScript loading, SSCD's preprocessing, region scores by dot products."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from scanner.sscd import SSCDModel

# Test models are scripted and saved with torch.jit, which torch deprecates; SSCD ships as TorchScript.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.s[a-z]+` is deprecated:FutureWarning")


class TinyDescriptor(torch.nn.Module):
    """SSCD's shape in miniature: convolution, global pooling, projection."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=5, stride=4)
        self.proj = torch.nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class SeenInput(torch.nn.Module):
    """Returns what it was fed, flattened: the descriptor is the preprocessed image itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def _save(module: torch.nn.Module, path) -> str:
    torch.jit.save(torch.jit.script(module.eval()), str(path))
    return str(path)


@pytest.fixture
def tiny(tmp_path) -> SSCDModel:
    torch.manual_seed(0)
    return SSCDModel(_save(TinyDescriptor(), tmp_path / "tiny.torchscript.pt"), batch_size=4)


def _blob_masks(n: int, size: int, fractions: list[float]) -> torch.Tensor:
    """Masks whose foreground covers roughly the given fractions (a top-left square)."""
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i, fraction in enumerate(fractions):
        side = round(size * fraction**0.5)
        masks[i, :side, :side] = True
    return masks


def test_model_sees_a_320px_imagenet_normalized_image(tmp_path, photos):
    model = SSCDModel(_save(SeenInput(), tmp_path / "seen.pt"))
    for size in (192, 512):  # upsampled and (antialiased) downsampled
        images = torch.stack([photos["astronaut"], photos["coffee"]])
        images = F.interpolate(images, size=(size, size), mode="bilinear").clamp(0, 1)
        # Oracle: torchvision's resize and normalize, as in SSCD's README ("skew_320").
        expected = TF.normalize(
            TF.resize(images, [320, 320], antialias=True),
            mean=[0.485, 0.456, 0.406],
            std=[0.229, 0.224, 0.225],
        )
        seen = model.embed(images)
        assert seen.shape == (2, 3 * 320 * 320)
        torch.testing.assert_close(seen, F.normalize(expected.flatten(1), dim=1), atol=1e-6, rtol=0)


def test_embeddings_are_unit_length_and_batching_changes_nothing(tiny, photos):
    images = torch.stack(list(photos.values()) + [photos["rocket"].flip(-1)])
    batched = tiny.embed(images)  # batch_size 4: one full batch and one of 1
    one_by_one = torch.cat([tiny.embed(images[i : i + 1]) for i in range(len(images))])
    torch.testing.assert_close(batched, one_by_one, atol=1e-6, rtol=0)
    torch.testing.assert_close(batched.norm(dim=1), torch.ones(len(images)))
    assert batched.shape == (5, 16)


# Algorithm 1 (DESIGN 4.2), written out per branch: (gen variant, ref variant) of each region.
ALGORITHM_1 = {
    0: [("whole", "whole"), ("whole", "fg"), ("bg", "bg")],  # p <= beta
    1: [("whole", "whole"), ("fg", "fg"), ("whole", "bg")],  # p >= 1 - beta
    2: [("whole", "whole"), ("fg", "fg"), ("bg", "bg")],  # otherwise
}


def _variant(image: torch.Tensor, fg: torch.Tensor, which: str) -> torch.Tensor:
    if which == "whole":
        return image
    return image * (fg if which == "fg" else ~fg).float()


def test_region_scores_equal_brute_force_cosines(tiny, photos):
    size = 96
    images = F.interpolate(torch.stack(list(photos.values())), size=(size, size), mode="area")
    gen, ref = images[:3], images[1:].flip(-1)
    gen_fg = _blob_masks(3, size, [0.02, 0.99, 0.4])
    ref_fg = _blob_masks(3, size, [0.3, 0.5, 0.1])
    branch = torch.tensor([0, 1, 2])
    pairs = torch.tensor([[0, 0], [0, 2], [1, 1], [2, 0], [2, 2], [1, 0], [2, 0]])
    scores = tiny.region_scores(gen, ref, gen_fg, ref_fg, pairs, branch)
    assert scores.shape == (len(pairs), 3)
    for p, (g, r) in enumerate(pairs.tolist()):
        for region, (gv, rv) in enumerate(ALGORITHM_1[int(branch[g])]):
            a = tiny.embed(_variant(gen[g], gen_fg[g], gv)[None])
            b = tiny.embed(_variant(ref[r], ref_fg[r], rv)[None])
            expected = F.cosine_similarity(a, b).item()
            assert scores[p, region].item() == pytest.approx(expected, abs=1e-5)
    # Identical images with identical masks score 1 in every region.
    same = tiny.region_scores(gen, gen, gen_fg, gen_fg, torch.tensor([[2, 2]]), branch)
    torch.testing.assert_close(same, torch.ones(1, 3), atol=1e-5, rtol=0)


def test_no_pairs_gives_an_empty_result(tiny, photos):
    gen = photos["coffee"][None]
    fg = torch.zeros(1, 192, 192, dtype=torch.bool)
    out = tiny.region_scores(
        gen, gen, fg, fg, torch.zeros(0, 2, dtype=torch.long), torch.tensor([2])
    )
    assert out.shape == (0, 3)


def test_bad_model_files_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        SSCDModel(tmp_path / "missing.torchscript.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a TorchScript file"):
        SSCDModel(junk)
    with pytest.raises(ValueError, match="batch_size"):
        SSCDModel(junk, batch_size=0)


def test_bad_inputs_and_outputs_are_rejected(tiny, tmp_path, photos):
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        tiny.embed(photos["coffee"])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiny.embed(photos["coffee"][None] * 255)
    with pytest.raises(TypeError, match="floating point"):
        tiny.embed((photos["coffee"][None] * 255).to(torch.uint8))
    with pytest.raises(TypeError, match="boolean"):
        tiny.variant_embeddings(photos["coffee"][None], torch.ones(1, 192, 192))

    class Scalar(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean()

    scalar = SSCDModel(_save(Scalar(), tmp_path / "scalar.pt"))
    with pytest.raises(ValueError, match="one descriptor per image"):
        scalar.embed(photos["coffee"][None])


@pytest.mark.weights
@pytest.mark.skipif(
    not os.environ.get("FBMEM_SSCD_PATH"),
    reason="set FBMEM_SSCD_PATH to an SSCD TorchScript file (e.g. sscd_disc_mixup.torchscript.pt)",
)
def test_real_sscd_ranks_verbatim_copies_above_unrelated_images(tmp_path):
    from scanner.images import load_image
    from scanner.replication import build_replication_set

    manifest = build_replication_set(tmp_path, size=256)
    model = SSCDModel(os.environ["FBMEM_SSCD_PATH"])

    def load(col, kind):
        rows = manifest[manifest["kind"] == kind]
        return torch.stack([torch.from_numpy(load_image(tmp_path / p, 256)) for p in rows[col]])

    verbatim = model.similarity(load("gen", "verbatim"), load("ref", "verbatim"))
    unrelated = model.similarity(load("gen", "unrelated"), load("ref", "unrelated"))
    assert verbatim.min() > unrelated.max()


def test_algorithm_1_runs_on_sscd_from_the_command_line(tmp_path, photos, capsys):
    """`fbmem compare --metric sscd`: the labels come from SSCD's cosines of the same variants."""
    import json

    from scanner.cli import main
    from scanner.images import encode_png

    torch.manual_seed(0)
    path = _save(TinyDescriptor(), tmp_path / "sscd.pt")
    (tmp_path / "a.png").write_bytes(encode_png(photos["coffee"].numpy()))
    (tmp_path / "b.png").write_bytes(encode_png(photos["rocket"].numpy()))
    mask = torch.zeros(192, 192, dtype=torch.bool)
    mask[50:120, 40:150] = True
    (tmp_path / "m.png").write_bytes(encode_png(mask.numpy()))
    masks = ["--gen-mask", str(tmp_path / "m.png"), "--ref-mask", str(tmp_path / "m.png")]
    args = ["compare", "--json", "--size", "192", "--metric", "sscd", "--sscd", path, *masks]
    assert main([*args, str(tmp_path / "a.png"), str(tmp_path / "a.png")]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["label"] == "VM" and same["m_full"] == pytest.approx(1.0, abs=1e-5)
    assert main([*args, str(tmp_path / "a.png"), str(tmp_path / "b.png")]) == 0
    other = json.loads(capsys.readouterr().out)
    expected = SSCDModel(path).similarity(photos["coffee"][None], photos["rocket"][None])
    assert other["m_full"] == pytest.approx(float(expected[0]), abs=1e-5)
    assert (
        main(["compare", "--metric", "sscd", str(tmp_path / "a.png"), str(tmp_path / "b.png")]) == 2
    )
