"""The organism's training code: a tiny budget runs end to end, is deterministic, and its output
loads through the scanner's own model loading (the path a user's --model PATH takes)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from scanner.cli import main as fbmem
from scanner.generate import GenerationConfig, Generator
from scanner.organism.design import DesignConfig
from scanner.organism.model import ArchitectureConfig
from scanner.organism.train import TrainConfig, train_organism

TINY = TrainConfig(
    design=DesignConfig(images_per_concept=2, verbatim_copies=2, singletons=2, heldout_unrelated=4),
    arch=ArchitectureConfig(
        latent_channels=4, vae_channels=(8, 8, 16, 16), unet_channels=(16, 32, 32)
    ),
    vae_steps=3,
    vae_batch=2,
    vae_crop=32,
    unet_steps=3,
    unet_batch=2,
    check_size=161,
)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {
        f"{f.parent.name}/{k}": v
        for f in sorted(folder.glob("*/*.safetensors"))
        for k, v in load_file(f).items()
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("organism") / "a"
    return out, train_organism(out, TINY, log=lambda _: None, command="test")


def test_training_writes_a_diffusers_folder_with_its_recipe(trained):
    out, recipe = trained
    assert (out / "model_index.json").exists() and (out / "captions.csv").exists()
    on_disk = json.loads((out / "recipe.json").read_text())
    assert on_disk["command"] == "test" and on_disk["config"]["unet_steps"] == 3
    assert (
        len(on_disk["reconstruction_ms_ssim"]) == recipe["images"] == 6 + 6 + 6 + 2
    )  # verbatim, fg, bg, singletons
    # Saved in half precision (the repository's size limit), every tensor of every component.
    assert {v.dtype for v in _weights(out).values()} == {torch.float16}


def test_training_is_deterministic(trained, tmp_path):
    out, _ = trained
    again = tmp_path / "b"
    train_organism(again, TINY, log=lambda _: None)
    first, second = _weights(out), _weights(again)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_trained_folder_generates_through_the_scanners_loader(trained):
    out, _ = trained
    generator = Generator(GenerationConfig(model=str(out), steps=2, size=64, guidance=3.0))
    images = generator(["astronaut photo", ""], prompt_ids=[0, 1], gen_idxs=[0, 0])
    assert images.shape == (2, 3, 64, 64) and np.isfinite(images).all()
    assert generator.pipeline.unet.dtype == torch.float32  # float16 on disk, float32 to compute


def test_cli_rejects_a_bad_budget_with_a_clear_line(tmp_path, capsys):
    code = fbmem(["organism", "train", "--out", str(tmp_path / "x"), "--unet-steps", "0"])
    assert code == 2
    assert "unet_steps" in capsys.readouterr().err
