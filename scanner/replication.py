"""Replication set: composites of bundled real photos whose FB-Mem labels are known.

No public memorization benchmark ships offline, and Algorithm 1 is about regions, so its
ground truth needs foreground masks that are exact. Cutting a region of one real photo
(from scikit-image and scikit-learn, no download) into another through a drawn mask gives
training images whose foreground is known to the pixel, and generations that copy exactly
the part chosen: the whole image (VM), the foreground only (FM), the background only (BM),
or nothing (NM). The recipes below were tuned so that Algorithm 1 with MS-SSIM, tau = 0.8
and beta = 0.03 on the true masks gives each generation its intended label against its own
reference and NM against every other one (docs/replication.md lists the scores).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pandas as pd
import skimage.data
import skimage.draw
from PIL import Image
from sklearn.datasets import load_sample_image

from scanner.images import canonical, check_size, encode_png, to_uint8

Kind = Literal["verbatim", "foreground", "background", "unrelated"]
KINDS: tuple[Kind, ...] = get_args(Kind)

EXPECTED_LABEL: dict[Kind, str] = {
    "verbatim": "VM",
    "foreground": "FM",
    "background": "BM",
    "unrelated": "NM",
}

# Every photo here is inside the installed wheels; the skimage ones that need a download
# (eagle, lily, kidney, ...) are left out on purpose.
_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": skimage.data.astronaut,
    "brick": skimage.data.brick,
    "camera": skimage.data.camera,
    "chelsea": skimage.data.chelsea,
    "china": lambda: load_sample_image("china.jpg"),
    "coffee": skimage.data.coffee,
    "coins": skimage.data.coins,
    "colorwheel": skimage.data.colorwheel,
    "flower": lambda: load_sample_image("flower.jpg"),
    "grass": skimage.data.grass,
    "gravel": skimage.data.gravel,
    "ihc": skimage.data.immunohistochemistry,
    "logo": skimage.data.logo,
    "motorcycle": lambda: skimage.data.stereo_motorcycle()[0],
    "page": skimage.data.page,
    "retina": skimage.data.retina,
    "rocket": skimage.data.rocket,
}


@cache
def _photo(name: str) -> np.ndarray:
    """A bundled photo as uint8 HxWx3 (gray repeated, alpha dropped); all of them: ~17 MB."""
    pixels = np.asarray(_PHOTOS[name]())
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    pixels = np.ascontiguousarray(pixels[..., :3])
    pixels.flags.writeable = False
    return pixels


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1], so every shape is the same at any size."""
    centres = (np.arange(size, dtype=np.float64) + 0.5) / size
    return np.meshgrid(centres, centres, indexing="ij")


@dataclass(frozen=True)
class View:
    """A square crop of a bundled photo, in that photo's own pixels."""

    photo: str
    top: int
    left: int
    side: int
    noun: str  # what the crop shows, for captions
    flip: bool = False

    def render(self, size: int) -> np.ndarray:
        return _render_view(self, size)


@lru_cache(maxsize=8)
def _render_view(view: View, size: int) -> np.ndarray:
    """Cached: a reference's photos are drawn again for its foreground and background copies."""
    pixels = _photo(view.photo)
    height, width = pixels.shape[:2]
    if view.top + view.side > height or view.left + view.side > width:
        raise ValueError(f"{view} does not fit in the {width}x{height} photo {view.photo!r}")
    crop = pixels[view.top : view.top + view.side, view.left : view.left + view.side]
    rendered = canonical((crop[:, ::-1] if view.flip else crop).astype(np.float32) / 255.0, size)
    rendered.flags.writeable = False
    return rendered


@dataclass(frozen=True)
class Ellipse:
    """Centre and radii as fractions of the side; angle in degrees."""

    cy: float
    cx: float
    ry: float
    rx: float
    angle: float = 0.0

    def rasterize(self, size: int) -> np.ndarray:
        y, x = _grid(size)
        theta = np.deg2rad(self.angle)
        along = (x - self.cx) * np.cos(theta) + (y - self.cy) * np.sin(theta)
        across = -(x - self.cx) * np.sin(theta) + (y - self.cy) * np.cos(theta)
        return (along / self.rx) ** 2 + (across / self.ry) ** 2 <= 1.0


@dataclass(frozen=True)
class Blob:
    """An irregular star-shaped region: the radius wobbles with angle (harmonics 2..6)."""

    cy: float
    cx: float
    radius: float
    wobble: float  # relative amplitude of the radius variation
    shape_seed: int  # fixes the harmonics; part of the recipe, not of the run's seed

    def rasterize(self, size: int) -> np.ndarray:
        y, x = _grid(size)
        angle = np.arctan2(y - self.cy, x - self.cx)
        harmonics = np.random.default_rng(self.shape_seed).uniform(0, 2 * np.pi, size=5)
        bump = sum(np.cos(k * angle + phase) / k for k, phase in enumerate(harmonics, start=2))
        return np.hypot(y - self.cy, x - self.cx) <= self.radius * (1 + self.wobble * bump)


@dataclass(frozen=True)
class Polygon:
    """Vertices (y, x) as fractions of the side."""

    vertices: tuple[tuple[float, float], ...]

    def rasterize(self, size: int) -> np.ndarray:
        return skimage.draw.polygon2mask((size, size), np.asarray(self.vertices) * size)


@dataclass(frozen=True)
class Horse:
    """scikit-image's horse silhouette, a natural object outline, filling the frame."""

    def rasterize(self, size: int) -> np.ndarray:
        silhouette = ~skimage.data.horse()  # the file stores the horse as False
        height, width = silhouette.shape
        square = np.zeros((width, width), dtype=np.float32)  # pad the 328x400 frame to square
        square[(width - height) // 2 : (width - height) // 2 + height] = silhouette
        return canonical(square[..., None], size)[..., 0] > 0.5


@dataclass(frozen=True)
class Outside:
    """Everything but a shape: a foreground that fills the frame around a small background."""

    hole: Ellipse | Blob | Polygon

    def rasterize(self, size: int) -> np.ndarray:
        return ~self.hole.rasterize(size)


Shape = Ellipse | Blob | Polygon | Horse | Outside


@dataclass(frozen=True)
class Composite:
    """A foreground photo cut into a background photo through a known mask."""

    background: View
    foreground: View
    mask: Shape

    @property
    def caption(self) -> str:
        return f"{self.foreground.noun} against {self.background.noun}"

    def render(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        mask = self.mask.rasterize(size)
        image = np.where(
            mask[..., None], self.foreground.render(size), self.background.render(size)
        )
        return image, mask


@dataclass(frozen=True)
class Case:
    """One training image and the generations made from it."""

    reference: Composite
    unrelated: Composite
    new_background: View | None = None  # behind the same foreground: a "foreground" copy
    new_foreground: View | None = None  # through the same mask: a "background" copy
    new_foreground_mask: Shape | None = None  # the background copy's own mask, if not the same


@dataclass(frozen=True)
class CopyDistortion:
    """What separates a near-verbatim copy from its training image."""

    noise_sigma: float = 0.02  # Gaussian pixel noise, about 5 grey levels of 255
    colour_shift: float = 0.03  # largest per-channel offset, a faint tint
    jpeg_quality: int = 75  # PIL's default JPEG quality


GENERATION_NOISE = 0.01  # every generation gets faint noise: no sampler reproduces pixels exactly
VERBATIM = CopyDistortion()

# Balanced foregrounds cover 27-45 % of the frame: enough that a new foreground pulls the
# whole-image score below tau, little enough that a new background does too.
CASES: tuple[Case, ...] = (
    Case(
        reference=Composite(
            View("brick", 0, 0, 300, "a brick wall"),
            View("astronaut", 0, 0, 512, "an astronaut"),
            Ellipse(0.5, 0.5, 0.38, 0.31),
        ),
        new_background=View("grass", 0, 0, 300, "a lawn"),
        new_foreground=View("colorwheel", 0, 0, 370, "a colour wheel"),
        unrelated=Composite(
            View("gravel", 0, 0, 300, "gravel"),
            View("logo", 0, 0, 500, "a logo"),
            Blob(0.45, 0.55, 0.35, 0.25, 1),
        ),
    ),
    Case(
        reference=Composite(
            View("ihc", 0, 0, 300, "a stained tissue slide"),
            View("chelsea", 0, 75, 300, "a tabby cat"),
            Blob(0.5, 0.5, 0.36, 0.3, 2),
        ),
        new_background=View("brick", 212, 212, 300, "a brick wall"),
        new_foreground=View("coffee", 0, 150, 400, "a cup of coffee"),
        unrelated=Composite(
            View("china", 0, 213, 427, "a lake shore"),
            View("camera", 0, 0, 512, "a cameraman"),
            Ellipse(0.55, 0.45, 0.35, 0.4, 30),
        ),
    ),
    Case(
        reference=Composite(
            View("gravel", 212, 212, 300, "gravel"),
            View("rocket", 0, 213, 427, "a rocket on its launch pad"),
            Polygon(((0.12, 0.32), (0.2, 0.8), (0.58, 0.9), (0.85, 0.6), (0.8, 0.15), (0.42, 0.1))),
        ),
        new_background=View("ihc", 212, 212, 300, "a stained tissue slide"),
        new_foreground=View("motorcycle", 100, 150, 400, "a motorcycle", flip=True),
        unrelated=Composite(
            View("page", 0, 0, 191, "a printed page"),
            View("flower", 50, 150, 300, "a dahlia"),
            Blob(0.5, 0.5, 0.38, 0.3, 4),
        ),
    ),
    Case(
        reference=Composite(
            View("motorcycle", 0, 0, 420, "a garage"),
            View("flower", 0, 150, 427, "a dahlia", flip=True),
            Horse(),
        ),
        new_background=View("retina", 200, 200, 1000, "a retina"),
        new_foreground=View("coins", 0, 0, 303, "a coin collection"),
        unrelated=Composite(
            View("grass", 212, 212, 300, "a lawn"),
            View("astronaut", 0, 0, 300, "a flag and an astronaut", flip=True),
            Ellipse(0.5, 0.5, 0.38, 0.38),
        ),
    ),
    Case(
        reference=Composite(
            View("camera", 300, 312, 200, "a lawn"),
            View("coffee", 0, 200, 400, "a cup of coffee", flip=True),
            Blob(0.5, 0.5, 0.36, 0.2, 5),
        ),
        new_background=View("motorcycle", 0, 341, 400, "a workshop"),
        new_foreground=View("chelsea", 0, 151, 300, "a cat", flip=True),
        unrelated=Composite(
            View("ihc", 0, 212, 300, "a stained tissue slide"),
            View("rocket", 0, 0, 427, "a launch tower"),
            Polygon(((0.1, 0.1), (0.1, 0.9), (0.9, 0.9), (0.9, 0.1))),
        ),
    ),
    Case(
        reference=Composite(
            View("china", 0, 0, 427, "a pagoda"),
            View("gravel", 0, 212, 300, "a heap of gravel"),
            Ellipse(0.55, 0.5, 0.3, 0.48, -15),
        ),
        new_background=View("brick", 0, 212, 300, "a brick wall"),
        new_foreground=View("grass", 0, 212, 300, "grass"),
        unrelated=Composite(
            View("coffee", 0, 0, 300, "a wooden table"),
            View("ihc", 212, 0, 300, "a stained tissue slide"),
            Horse(),
        ),
    ),
    # Tiny foregrounds (p <= beta): Algorithm 1's first branch.
    Case(
        reference=Composite(
            View("coffee", 100, 0, 300, "a coffee cup"),
            View("chelsea", 60, 100, 200, "a cat's eye"),
            Ellipse(0.3, 0.7, 0.08, 0.07),
        ),
        unrelated=Composite(
            View("brick", 100, 100, 300, "a brick wall"),
            View("astronaut", 200, 200, 300, "a badge"),
            Blob(0.7, 0.3, 0.08, 0.2, 7),
        ),
    ),
    Case(
        reference=Composite(
            View("grass", 100, 100, 300, "a lawn"),
            View("flower", 0, 150, 427, "a dahlia"),
            Blob(0.6, 0.4, 0.075, 0.25, 8),
        ),
        unrelated=Composite(
            View("gravel", 100, 100, 300, "gravel"),
            View("retina", 500, 300, 600, "a retina"),
            Ellipse(0.3, 0.5, 0.1, 0.05),
        ),
    ),
    # Foregrounds that fill the frame (p >= 1 - beta): Algorithm 1's second branch.
    Case(
        reference=Composite(
            View("brick", 300, 0, 212, "a brick wall"),
            View("motorcycle", 50, 100, 450, "a motorcycle"),
            Outside(Ellipse(0.0, 1.0, 0.15, 0.15)),
        ),
        unrelated=Composite(
            View("ihc", 300, 300, 212, "a stained tissue slide"),
            View("camera", 0, 0, 512, "a cameraman"),
            Outside(Blob(1.0, 0.0, 0.15, 0.2, 9)),
        ),
    ),
    Case(
        reference=Composite(
            View("gravel", 300, 0, 212, "gravel"),
            View("astronaut", 0, 100, 400, "an astronaut's suit"),
            Outside(Blob(1.0, 1.0, 0.16, 0.2, 10)),
        ),
        unrelated=Composite(
            View("grass", 300, 0, 212, "a lawn"),
            View("china", 0, 100, 427, "a pagoda"),
            Outside(Ellipse(0.0, 0.0, 0.15, 0.15)),
        ),
    ),
)


def _noisy(image: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(sigma)
    return np.clip(image + noise, 0.0, 1.0)


def _near_copy(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Tint, noise and JPEG round trip: a copy no pixel-exact test would catch."""
    tinted = image + rng.uniform(-VERBATIM.colour_shift, VERBATIM.colour_shift, size=3)
    noisy = _noisy(np.clip(tinted, 0.0, 1.0), VERBATIM.noise_sigma, rng)
    buffer = io.BytesIO()
    Image.fromarray(to_uint8(noisy.transpose(2, 0, 1))).save(
        buffer, format="JPEG", quality=VERBATIM.jpeg_quality
    )
    return np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255.0


def _generations(case: Case) -> list[tuple[Kind, Composite | None]]:
    """The generations of a case; None stands for the near-verbatim copy of the reference."""
    ref = case.reference
    made: list[tuple[Kind, Composite | None]] = [("verbatim", None)]
    if case.new_background is not None:
        made.append(("foreground", Composite(case.new_background, ref.foreground, ref.mask)))
    if case.new_foreground is not None:
        mask = case.new_foreground_mask or ref.mask
        made.append(("background", Composite(ref.background, case.new_foreground, mask)))
    made.append(("unrelated", case.unrelated))
    return made


def _write(path: Path, array: np.ndarray) -> None:
    """HxWx3 float image or HxW boolean mask (white = foreground) to PNG."""
    path.write_bytes(encode_png(array if array.dtype == bool else array.transpose(2, 0, 1)))


def build_replication_set(
    out_dir: Path, size: int = 512, seed: int = 0, cases: tuple[Case, ...] = CASES
) -> pd.DataFrame:
    """Write the replication set under `out_dir` and return its manifest.

    `out_dir` gets `references/`, `generations/` (PNG images and masks, white = foreground),
    `references.csv` (ref_id, path, mask, caption) and `replication.csv` (one row per
    generation: gen_id, gen, gen_mask, ref_id, ref, ref_mask, kind, expected, prompt).
    Paths are relative to `out_dir`. The photos, crops and masks are fixed recipes (`cases`;
    `scanner.replication_holdout` has a second set); `seed` only draws the generations'
    noise, so a rerun writes byte-identical files.
    """
    check_size(size)
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    out_dir = Path(out_dir)
    (out_dir / "references").mkdir(parents=True, exist_ok=True)
    (out_dir / "generations").mkdir(parents=True, exist_ok=True)

    references, rows = [], []
    for case_index, case in enumerate(cases):
        ref_id = f"r{case_index + 1:02d}"
        ref_image, ref_mask = case.reference.render(size)
        ref_path, ref_mask_path = f"references/{ref_id}.png", f"references/{ref_id}_mask.png"
        _write(out_dir / ref_path, ref_image)
        _write(out_dir / ref_mask_path, ref_mask)
        references.append(
            {
                "ref_id": ref_id,
                "path": ref_path,
                "mask": ref_mask_path,
                "caption": case.reference.caption,
            }
        )
        for kind, composite in _generations(case):
            rng = np.random.default_rng([seed, case_index, KINDS.index(kind)])
            if composite is None:
                gen_image, gen_mask = _near_copy(ref_image, rng), ref_mask
            else:
                gen_image, gen_mask = composite.render(size)
                gen_image = _noisy(gen_image, GENERATION_NOISE, rng)
            gen_id = f"{ref_id}-{kind}"
            gen_path, gen_mask_path = f"generations/{gen_id}.png", f"generations/{gen_id}_mask.png"
            _write(out_dir / gen_path, gen_image)
            _write(out_dir / gen_mask_path, gen_mask)
            rows.append(
                {
                    "gen_id": gen_id,
                    "gen": gen_path,
                    "gen_mask": gen_mask_path,
                    "ref_id": ref_id,
                    "ref": ref_path,
                    "ref_mask": ref_mask_path,
                    "kind": kind,
                    "expected": EXPECTED_LABEL[kind],
                    "prompt": case.reference.caption,
                }
            )
    pd.DataFrame(references).to_csv(out_dir / "references.csv", index=False)
    manifest = pd.DataFrame(rows)
    manifest.to_csv(out_dir / "replication.csv", index=False)
    return manifest
