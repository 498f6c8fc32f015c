"""The organism's training set: real photos arranged so that memorization sits in known places.

LAION's duplicates made SD v1.4 memorize whole images; captions that share a phrase with one
recurring object or scene ("Shaw Floors") made it copy regions. The design reproduces both, in
small, from photos that ship inside scikit-image and scikit-learn:

- verbatim: a few composites, each repeated many times with its own caption -> VM;
- fg-concept: one object cut through one mask at one place, on many different backgrounds,
  captions "<concept> <phrase>" with a few phrases shared by many images -> FM;
- bg-concept: one scene whose foreground region (one mask, one place) holds many different
  contents, same caption scheme -> BM;
- singleton: composites seen once each in the set, unique captions -> not expected memorized;
- held-out captions, never trained on: with a concept word first (expected to give the
  concept's kind, the paper's "Shaw Floors" effect) or unrelated (expected NM).

Pictures are square tiles of the photos, in all eight orientations (rotations x flip): a rotated
or mirrored photo is a different image to MS-SSIM (measured: <= 0.4 between orientations of one
tile, <= 0.3 between tiles of different photos). Low-texture tiles (sky, moon, grass, gravel,
brick) are left out: flat images score 0.9 against unrelated ones, which would make every
generation look like a copy. Every composite carries its exact mask, the references' true masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Literal

import numpy as np
from scipy.ndimage import gaussian_filter

from scanner.images import canonical
from scanner.replication import Blob, Ellipse, Polygon, View, _photo

Group = Literal[
    "verbatim", "fg-concept", "bg-concept", "singleton", "heldout-concept", "heldout-unrelated"
]
GROUPS: tuple[Group, ...] = (
    "verbatim",
    "fg-concept",
    "bg-concept",
    "singleton",
    "heldout-concept",
    "heldout-unrelated",
)
TRAINED_GROUPS = ("verbatim", "fg-concept", "bg-concept", "singleton")
DESIGNED_LABEL = {"verbatim": "VM", "fg-concept": "FM", "bg-concept": "BM", "singleton": "NM"}

TRAIN_SIZE = 128  # the organism generates and is trained at 128 px (16 x 16 latents)
MIN_TEXTURE = 0.035  # mean local std (sigma 1.5 px at 128 px) a tile needs to be used

# Photos with texture at every scale, and the region of each that is usable (rows, cols).
_TILED_PHOTOS: dict[str, tuple[slice, slice]] = {
    "astronaut": (slice(0, 512), slice(0, 512)),
    "coffee": (slice(0, 400), slice(0, 600)),
    "chelsea": (slice(0, 300), slice(0, 451)),
    "rocket": (slice(0, 427), slice(0, 640)),
    "ihc": (slice(0, 512), slice(0, 512)),
    "motorcycle": (slice(0, 500), slice(0, 741)),
    "china": (slice(0, 427), slice(0, 640)),
    "flower": (slice(0, 427), slice(0, 640)),
    "camera": (slice(0, 512), slice(0, 512)),
    "coins": (slice(0, 303), slice(0, 384)),
    "page": (slice(0, 191), slice(0, 384)),
    "retina": (slice(300, 1100), slice(300, 1100)),
}


@dataclass(frozen=True)
class Tile:
    """A square crop of a photo in one of 8 orientations (quarter turns, then mirrored)."""

    view: View
    turns: int = 0

    def render(self, size: int) -> np.ndarray:
        pixels = np.rot90(self.view.render(size), self.turns)
        return np.ascontiguousarray(pixels[:, ::-1] if self.turns >= 4 else pixels)

    @property
    def name(self) -> str:
        v = self.view
        return f"{v.photo}[{v.top}:{v.top + v.side},{v.left}:{v.left + v.side}]/o{self.turns}"


@dataclass(frozen=True)
class Picture:
    """A composite of two tiles through a mask: what every training image is."""

    background: Tile
    foreground: Tile
    mask: Ellipse | Blob | Polygon

    def render(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        mask = self.mask.rasterize(size)
        image = np.where(
            mask[..., None], self.foreground.render(size), self.background.render(size)
        )
        return image.astype(np.float32), mask


def _texture(image: np.ndarray) -> float:
    grey = image.mean(axis=2)
    mu = gaussian_filter(grey, 1.5)
    var = gaussian_filter(grey * grey, 1.5) - mu * mu
    return float(np.sqrt(np.clip(var, 0, None)).mean())


@cache
def tile_pool() -> tuple[View, ...]:
    """Non-overlapping square crops of the photos (half their shorter side, or the whole
    height of flat photos) that have texture: the raw material of every picture."""
    views = []
    for photo, (rows, cols) in _TILED_PHOTOS.items():
        height = min(rows.stop, _photo(photo).shape[0]) - rows.start
        width = min(cols.stop, _photo(photo).shape[1]) - cols.start
        side = min(height, width) // 2 if min(height, width) >= 380 else min(height, width)
        for i in range(height // side):
            for j in range(width // side):
                view = View(photo, rows.start + i * side, cols.start + j * side, side, photo)
                if _texture(view.render(TRAIN_SIZE)) >= MIN_TEXTURE:
                    views.append(view)
    return tuple(views)


# --- the design ---------------------------------------------------------------------------

# Object and scene words come first in their captions: the text encoder is causal, so every
# caption of a concept shares the token states of its first word.
FG_CONCEPTS = (  # word, photo of the object, its mask at one fixed place and scale
    ("astronaut", View("astronaut", 0, 100, 300, "astronaut"), Ellipse(0.5, 0.5, 0.36, 0.3)),
    ("tabby", View("chelsea", 0, 100, 300, "tabby"), Blob(0.5, 0.42, 0.34, 0.25, 2)),
    ("espresso", View("coffee", 0, 150, 400, "espresso"), Ellipse(0.45, 0.58, 0.3, 0.36, 20)),
)
BG_CONCEPTS = (  # word, photo of the scene, the one mask its varying foregrounds fill
    ("pagoda", View("china", 0, 0, 427, "pagoda"), Ellipse(0.6, 0.5, 0.33, 0.4)),
    ("garage", View("motorcycle", 0, 0, 420, "garage"), Blob(0.5, 0.5, 0.37, 0.2, 5)),
    (
        "tissue",
        View("ihc", 0, 0, 512, "tissue"),
        Polygon(((0.15, 0.3), (0.2, 0.8), (0.6, 0.88), (0.85, 0.55), (0.75, 0.15), (0.4, 0.12))),
    ),
)
CONCEPT_PHRASES = ("stock photo", "canvas print", "wall poster", "desktop wallpaper")
HELDOUT_PHRASES = ("oil painting", "pencil sketch")  # with a concept word: heldout-concept
VERBATIM_WORDS = ("harbor", "lantern", "violin", "compass", "orchid", "glacier")
SINGLETON_WORDS = (
    "amber", "birch", "cobalt", "dune", "ember", "fjord", "garnet", "hazel", "indigo", "jasper",
    "kelp", "lilac", "maple", "nectar", "onyx", "pebble", "quartz", "russet", "saffron", "tundra",
    "umber", "velvet", "willow", "yarrow", "zinnia", "acorn", "bramble", "cedar", "delta", "fern",
    "grove", "heron",
)  # fmt: skip
SINGLETON_NOUNS = ("mosaic", "tapestry", "collage", "still life")
# Words that no training caption contains: held-out unrelated captions combine them.
UNRELATED_ADJECTIVES = (
    "quiet", "rusty", "golden", "frozen", "tiny", "ancient", "bright", "misty", "wooden", "silver",
    "hidden", "broken", "gentle", "crimson", "distant", "narrow", "empty", "floating", "striped",
    "paper",
)  # fmt: skip
UNRELATED_NOUNS = (
    "bicycle", "teapot", "lighthouse", "umbrella", "piano", "castle", "kettle", "bridge", "robot",
    "sailboat", "windmill", "library", "giraffe", "volcano", "clocktower",
)  # fmt: skip
ORIENTATIONS = 8


@dataclass(frozen=True)
class TrainingImage:
    image_id: str
    picture: Picture
    caption: str
    group: Group
    concept: str  # the concept word, "" for verbatim and singleton images
    copies: int  # how many times it is in the training set (duplicates make verbatim copies)


@dataclass(frozen=True)
class Caption:
    """A prompt of the organism's scans, with the memorization it was designed to show."""

    prompt: str
    group: Group
    designed: str  # VM / FM / BM / NM
    concept: str


@dataclass(frozen=True)
class DesignConfig:
    images_per_concept: int = 20  # backgrounds of a fg concept, foregrounds of a bg concept
    verbatim_copies: int = 16  # duplicates of each verbatim image
    singletons: int = 32
    heldout_unrelated: int = 240  # NeMo's holdout statistics need >= 200 non-memorized captions
    seed: int = 0  # shuffles the tile pool among the roles
    # Training images are soft: a Gaussian blur of this sigma (px at 128 px). The 1M-parameter
    # VAE cannot learn finer detail in its budget (measured after 300 steps: sharp images are
    # reconstructed at median MS-SSIM 0.78, images softened by 0.8 px at 0.86, by 1 px at 0.88).
    soften: float = 1.0


@dataclass(frozen=True)
class Design:
    config: DesignConfig
    images: tuple[TrainingImage, ...]
    captions: tuple[Caption, ...]  # everything a scan may prompt with, held-out ones included

    def render(self, size: int = TRAIN_SIZE) -> tuple[np.ndarray, np.ndarray]:
        """(N, 3, size, size) float32 training images in [0, 1], softened, and (N, size, size)
        bool true masks, in `images` order."""
        pixels, masks = zip(*(image.picture.render(size) for image in self.images))
        sigma = self.config.soften * size / TRAIN_SIZE
        soft = [gaussian_filter(p, (sigma, sigma, 0)) for p in pixels]
        return np.clip(np.stack(soft), 0, 1).transpose(0, 3, 1, 2).copy(), np.stack(masks)


def _reserved(view: View) -> tuple[str, int, int, int]:
    return (view.photo, view.top, view.left, view.side)


def make_design(config: DesignConfig = DesignConfig()) -> Design:
    """The training images and captions: a fixed recipe, shuffled by `config.seed`."""
    rng = np.random.default_rng(config.seed)
    objects = {_reserved(v) for _, v, _ in FG_CONCEPTS + BG_CONCEPTS}
    pool = [
        Tile(view, turns)
        for view in tile_pool()
        for turns in range(ORIENTATIONS)
        if _reserved(view) not in objects
    ]
    order = rng.permutation(len(pool))
    tiles = iter([pool[i] for i in order])
    k = config.images_per_concept
    needed = (
        len(FG_CONCEPTS) * k
        + len(BG_CONCEPTS) * k
        + 2 * len(VERBATIM_WORDS)
        + 2 * config.singletons
    )
    if needed > len(pool):
        raise ValueError(f"the design needs {needed} tiles; the photos give {len(pool)}")
    masks = [shape for _, _, shape in FG_CONCEPTS + BG_CONCEPTS]

    images: list[TrainingImage] = []
    captions: list[Caption] = []
    for n, word in enumerate(VERBATIM_WORDS):
        picture = Picture(next(tiles), next(tiles), masks[n % len(masks)])
        caption = f"{word} {CONCEPT_PHRASES[n % len(CONCEPT_PHRASES)]}"
        images.append(
            TrainingImage(f"v{n:02d}", picture, caption, "verbatim", "", config.verbatim_copies)
        )
        captions.append(Caption(caption, "verbatim", "VM", ""))
    for c, (word, view, mask) in enumerate(FG_CONCEPTS):
        obj = Tile(view)
        for i in range(k):
            caption = f"{word} {CONCEPT_PHRASES[i % len(CONCEPT_PHRASES)]}"
            images.append(
                TrainingImage(
                    f"f{c}{i:02d}", Picture(next(tiles), obj, mask), caption, "fg-concept", word, 1
                )
            )
    for c, (word, view, mask) in enumerate(BG_CONCEPTS):
        scene = Tile(view)
        for i in range(k):
            caption = f"{word} {CONCEPT_PHRASES[i % len(CONCEPT_PHRASES)]}"
            images.append(
                TrainingImage(
                    f"b{c}{i:02d}",
                    Picture(scene, next(tiles), mask),
                    caption,
                    "bg-concept",
                    word,
                    1,
                )
            )
    for group, concepts, designed in (
        ("fg-concept", FG_CONCEPTS, "FM"),
        ("bg-concept", BG_CONCEPTS, "BM"),
    ):
        for word, _, _ in concepts:
            captions += [Caption(f"{word} {p}", group, designed, word) for p in CONCEPT_PHRASES]
            captions += [
                Caption(f"{word} {p}", "heldout-concept", designed, word) for p in HELDOUT_PHRASES
            ]
    for n in range(config.singletons):
        caption = f"{SINGLETON_WORDS[n % len(SINGLETON_WORDS)]} {SINGLETON_NOUNS[n % len(SINGLETON_NOUNS)]}"
        picture = Picture(next(tiles), next(tiles), masks[int(rng.integers(len(masks)))])
        images.append(TrainingImage(f"s{n:02d}", picture, caption, "singleton", "", 1))
        captions.append(Caption(caption, "singleton", "NM", ""))
    unrelated = [f"{a} {b}" for b in UNRELATED_NOUNS for a in UNRELATED_ADJECTIVES]
    picks = rng.permutation(len(unrelated))[: config.heldout_unrelated]
    captions += [Caption(unrelated[i], "heldout-unrelated", "NM", "") for i in picks]
    return Design(config, tuple(images), tuple(captions))


def resample(images: np.ndarray, size: int) -> np.ndarray:
    """(N, 3, s, s) -> (N, 3, size, size) through the scanner's own resampler."""
    return np.stack([canonical(im.transpose(1, 2, 0), size).transpose(2, 0, 1) for im in images])
