"""Algorithm 1 on image files: the engine behind `fbmem compare` and the demo.

Files are read once each however many pairs name them; pairs whose files cannot be used
get an error record (and the others still run), so one bad file never hides the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from scanner.defaults import DEFAULT_REGION_MODE
from scanner.fbmem import (
    DEFAULT_BETA,
    DEFAULT_TAU,
    check_region_mode,
    load_metric,
    score_pairs,
)
from scanner.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_SIZE,
    ImageError,
    check_max_pixels,
    image_hw,
    load_image,
    load_mask,
)


@dataclass(frozen=True)
class PairSpec:
    gen: str
    ref: str
    gen_mask: str | None = None
    ref_mask: str | None = None


@dataclass(frozen=True)
class CompareOptions:
    tau: float = DEFAULT_TAU
    beta: float = DEFAULT_BETA
    size: int = DEFAULT_SIZE
    metric: str = "ms_ssim"  # ms_ssim, ssim or sscd
    sscd: str | None = None  # SSCD TorchScript file, for metric sscd
    device: str = "cpu"
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are error records, never decoded
    region_mode: str = DEFAULT_REGION_MODE  # masked (the paper's) or pooled

    def __post_init__(self) -> None:
        check_max_pixels(self.max_pixels)


def read_pairs_csv(path: str | Path) -> list[PairSpec]:
    """Pairs from a CSV with columns gen, ref [, gen_mask, ref_mask], relative to its folder."""
    path = Path(path)
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ValueError(
            f"{path}: the pairs CSV is empty; it needs a header gen,ref and one row per pair"
        ) from None
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot read the pairs CSV ({exc})") from None
    missing = {"gen", "ref"} - set(table.columns)
    if missing:
        raise ValueError(
            f"{path}: pairs CSV needs columns 'gen' and 'ref'; missing {sorted(missing)}, found {list(table.columns)}"
        )
    if table.empty:
        raise ValueError(f"{path}: the pairs CSV has a header but no rows; nothing to compare")
    base = path.parent

    def resolve(value: str) -> str | None:
        return str(base / value) if value else None

    return [
        PairSpec(
            resolve(row["gen"]) or "",
            resolve(row["ref"]) or "",
            resolve(row.get("gen_mask", "")),
            resolve(row.get("ref_mask", "")),
        )
        for _, row in table.iterrows()
    ]


class _Loaded:
    """Images and masks of a comparison, loaded once per distinct (image, mask) file pair."""

    def __init__(self, size: int, max_pixels: int):
        self.size, self.max_pixels = size, max_pixels
        self.images: list[np.ndarray] = []
        self.masks: list[np.ndarray | None] = []
        self.index: dict[tuple[str, str | None], int] = {}

    def add(self, path: str, mask_path: str | None) -> int:
        key = (path, mask_path)
        if key not in self.index:
            image = load_image(path, self.size, max_pixels=self.max_pixels)
            mask = None
            if mask_path is not None:
                hw = image_hw(path, self.max_pixels)
                mask = load_mask(mask_path, self.size, image_hw=hw, max_pixels=self.max_pixels)
            self.images.append(image)
            self.masks.append(mask)
            self.index[key] = len(self.images) - 1
        return self.index[key]

    def fill_masks(self, segmenter) -> None:
        todo = [i for i, m in enumerate(self.masks) if m is None]
        if todo:
            segmented = segmenter(np.stack([self.images[i] for i in todo]))
            for i, mask in zip(todo, segmented, strict=True):
                self.masks[i] = mask


def compare_pairs(specs: list[PairSpec], options: CompareOptions, segmenter=None) -> list[dict]:
    """One record per spec, in order: Algorithm 1's scores and label, or an `error`."""
    check_region_mode(options.region_mode, options.metric)
    gens = _Loaded(options.size, options.max_pixels)
    refs = _Loaded(options.size, options.max_pixels)
    rows: list[tuple[int, int] | str] = []
    for spec in specs:
        try:
            rows.append((gens.add(spec.gen, spec.gen_mask), refs.add(spec.ref, spec.ref_mask)))
        except ImageError as exc:
            rows.append(str(exc))
    valid = [r for r in rows if isinstance(r, tuple)]
    by_pair: dict[tuple[int, int], dict] = {}
    if valid:
        if any(m is None for m in gens.masks + refs.masks):
            if segmenter is None:
                raise ValueError("masks are missing for some images and no segmenter was given")
            gens.fill_masks(segmenter)
            refs.fill_masks(segmenter)
        device = torch.device(options.device)

        def tensors(loaded: _Loaded):
            images = torch.from_numpy(np.stack(loaded.images)).to(device)
            return images, torch.from_numpy(np.stack(loaded.masks)).to(device)

        (g, g_fg), (r, r_fg) = tensors(gens), tensors(refs)
        pairs = torch.tensor(sorted(set(valid)), dtype=torch.long)
        metric = load_metric(options.metric, options.sscd, options.device)
        scores = score_pairs(
            g,
            r,
            g_fg,
            r_fg,
            pairs,
            tau=options.tau,
            beta=options.beta,
            metric=metric,
            region_mode=options.region_mode,
        )
        by_pair = {(rec["gen_index"], rec["ref_index"]): rec for rec in scores.records()}
    out = []
    for spec, row in zip(specs, rows, strict=True):
        record = {"gen": spec.gen, "ref": spec.ref}
        if isinstance(row, str):
            record["error"] = row
        else:
            scored = by_pair[row]
            record.update(
                {k: scored[k] for k in ("m_full", "m_fg", "m_bg", "fg_fraction", "branch", "label")}
            )
        out.append(record)
    return out
