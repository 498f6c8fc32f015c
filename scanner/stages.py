"""The scan's stages: each maps a batch (dict of numpy columns) to a batch, without Ray.

generate | load  ->  segment  ->  embed  ->  match

The same classes run in-process (`scanner.scan`) and as Ray actors (`actors/`). A batch
carries an `error` column: a stage that cannot process a row records why (as JSON with
the stage, error type and message) and later stages pass the row through untouched, so the
driver can write it to the `errors` table instead of losing it. Pixels travel as uint8
(B, 3, S, S), the exact content of the PNG the tables store, so every score can be
recomputed from the tables.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from scanner.defaults import DEFAULT_REGION_MODE
from scanner.fbmem import (
    DEFAULT_BETA,
    DEFAULT_MATCH_BY,
    DEFAULT_TAU,
    check_region_mode,
    load_metric,
    score_pairs,
    select_matches,
)
from scanner.images import (
    DEFAULT_MAX_PIXELS,
    MIN_SIDE,
    ImageError,
    canonical,
    encode_png,
    image_hw,
    load_image,
    load_mask,
)

Batch = dict[str, np.ndarray]


def error_json(stage: str, exc: BaseException) -> str:
    return json.dumps({"stage": stage, "error_type": type(exc).__name__, "message": str(exc)})


def ok_rows(batch: Batch) -> np.ndarray:
    return np.flatnonzero(batch["error"] == "")


def to_uint8(images: np.ndarray) -> np.ndarray:
    return (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)


def to_float(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255.0


class LoadImages:
    """Reads image files (column `source`) at the canonical size: the replay of a scan.

    A row may also name a known foreground mask (column `mask`, "" for none): it is loaded with
    the image, `mask_given` marks it, and the segment stage keeps it. Files over `max_pixels`
    are error rows, refused from their header before any pixel is decoded.
    """

    def __init__(self, size: int, min_side: int = MIN_SIDE, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.size, self.min_side, self.max_pixels = size, min_side, max_pixels

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["source"])
        images = np.zeros((n, 3, self.size, self.size), dtype=np.uint8)
        masks = np.zeros((n, self.size, self.size), dtype=bool)
        given = np.zeros(n, dtype=bool)
        errors = batch["error"].copy()
        mask_sources = batch.get("mask", np.full(n, "", dtype=object))
        for i in ok_rows(batch):
            try:
                source = str(batch["source"][i])
                image = load_image(source, self.size, self.min_side, self.max_pixels)
                images[i] = to_uint8(image)
                if mask_sources[i]:
                    hw = image_hw(source, self.max_pixels)
                    masks[i] = load_mask(
                        str(mask_sources[i]), self.size, hw, max_pixels=self.max_pixels
                    )
                    given[i] = True
            except ImageError as exc:
                errors[i] = error_json("load", exc)
        return {**batch, "image": images, "fg_mask": masks, "mask_given": given, "error": errors}


class Generate:
    """Generates each row's image with the diffusion model under the row's mitigation method.

    Rows carry `method` (a name of `scanner.mitigation.methods`) and `neurons` (JSON list of
    [layer, channel] the method scales for the row's prompt, "" for none), so one batch can mix
    methods: each method generates its own rows. `method_states` maps a method that prepares
    (Wanda) to the .npz file of its once-per-run state.
    """

    def __init__(self, config, out_size: int, method_states: dict[str, str] | None = None):
        from scanner.generate import Generator
        from scanner.neurons import value_layers

        self.generator = Generator(config)
        self.layers = value_layers(self.generator.unet)  # where the `neurons` rows point
        self.size = out_size  # the reference store's canonical size
        self.states = {
            name: dict(np.load(path, allow_pickle=False))
            for name, path in (method_states or {}).items()
        }

    def _images(self, batch: Batch, rows: np.ndarray) -> np.ndarray:
        from scanner.mitigation.base import GenerationRows
        from scanner.mitigation.methods import get_method

        name = str(batch["method"][rows[0]])
        neurons = [json.loads(batch["neurons"][i]) if batch["neurons"][i] else [] for i in rows]
        out = get_method(name).generate(
            self.generator,
            GenerationRows(
                prompts=[str(batch["prompt"][i]) for i in rows],
                prompt_ids=batch["prompt_id"][rows].tolist(),
                gen_idxs=batch["gen_idx"][rows].tolist(),
                neurons=[[(int(layer), int(c)) for layer, c in n] for n in neurons],
            ),
            self.states.get(name),
        )
        if out.shape[-1] != self.size:
            out = np.stack(
                [canonical(im.transpose(1, 2, 0), self.size).transpose(2, 0, 1) for im in out]
            )
        return to_uint8(out)

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["prompt"])
        images = np.zeros((n, 3, self.size, self.size), dtype=np.uint8)
        errors = batch["error"].copy()
        rows = ok_rows(batch)
        methods = batch["method"][rows].astype(str)
        for name in dict.fromkeys(methods):  # each method once, in order of first appearance
            chosen = rows[methods == name]
            try:
                images[chosen] = self._images(batch, chosen)
            except (ValueError, TypeError, RuntimeError) as exc:
                for i in chosen:
                    errors[i] = error_json("generate", exc)
        return {**batch, "image": images, "error": errors}


class Segment:
    """Foreground masks and fractions (Algorithm 1's S_f and p); masks given with the images
    (`mask_given`, see LoadImages) are kept."""

    def __init__(self, config):
        from scanner.segment import make_segmenter

        self.segmenter = make_segmenter(config)

    def __call__(self, batch: Batch) -> Batch:
        images = batch["image"]
        given = batch.get("mask_given", np.zeros(len(images), dtype=bool))
        masks = (
            batch["fg_mask"].copy()
            if given.any()
            else np.zeros((len(images), *images.shape[2:]), dtype=bool)
        )
        errors = batch["error"].copy()
        rows = np.setdiff1d(ok_rows(batch), np.flatnonzero(given))
        if len(rows):
            masks[rows] = self.segmenter(to_float(images[rows]))
        return {
            **batch,
            "fg_mask": masks,
            "fg_fraction": masks.reshape(len(masks), -1).mean(1),
            "error": errors,
        }


class Embed:
    """Prefilter embeddings (L2-normalized float32)."""

    def __init__(self, config):
        from scanner.embed import make_image_embedder

        self.embedder = make_image_embedder(config)

    def __call__(self, batch: Batch) -> Batch:
        images = batch["image"]
        out = np.zeros((len(images), self.embedder.dim), dtype=np.float32)
        rows = ok_rows(batch)
        if len(rows):
            out[rows] = self.embedder(to_float(images[rows]))
        return {**batch, "embedding": out}


class Match:
    """Prefilter top-k candidates, score them exactly with Algorithm 1, pick the match.

    Adds `label`, `ref_id`, `m_full`, `m_fg`, `m_bg` (of the one match, chosen by `match_by`:
    see `scanner.fbmem.select_matches`), `matches` (JSON list
    of every scored candidate) and the PNG bytes of image and mask for the tables.
    """

    def __init__(
        self,
        reference: str,
        top_k: int = 16,
        tau: float = DEFAULT_TAU,
        beta: float = DEFAULT_BETA,
        metric: str = "ms_ssim",
        device: str = "cpu",
        cache_size: int = 4096,
        sscd: str | None = None,
        match_by: str = DEFAULT_MATCH_BY,
        region_mode: str = DEFAULT_REGION_MODE,
    ):
        from scanner.reference import ReferenceStore

        check_region_mode(region_mode, metric)

        self.refs = ReferenceStore(reference, device=device)
        if len(self.refs) == 0:
            raise ValueError(
                f"reference store {reference} holds no references (see its errors table); nothing to match against"
            )
        self.top_k, self.tau, self.beta, self.match_by = top_k, tau, beta, match_by
        self.region_mode = region_mode
        self.metric = load_metric(metric, sscd, device)
        self.device = torch.device(device)
        self._load = lru_cache(maxsize=cache_size)(self.refs.load)

    def _candidates(
        self, rows: np.ndarray, embeddings: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        k = self.top_k if self.top_k > 0 else len(self.refs)
        return self.refs.index.search(embeddings[rows], k)

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["image"])
        out: dict[str, Any] = {
            "label": np.full(n, "", dtype=object),
            "ref_id": np.full(n, "", dtype=object),
            "m_full": np.full(n, np.nan, dtype=np.float32),
            "m_fg": np.full(n, np.nan, dtype=np.float32),
            "m_bg": np.full(n, np.nan, dtype=np.float32),
            "matches": np.full(n, "[]", dtype=object),
            "image_png": np.full(n, b"", dtype=object),
            "fg_mask_png": np.full(n, b"", dtype=object),
        }
        rows = ok_rows(batch)
        for i in rows:
            out["image_png"][i] = encode_png(to_float(batch["image"][i]))
            out["fg_mask_png"][i] = encode_png(batch["fg_mask"][i])
        if len(rows) == 0:
            return {**batch, **out}
        scores, cand = self._candidates(rows, batch["embedding"])
        unique = np.unique(cand[cand >= 0])
        ref_images, ref_masks = zip(*(self._load(int(r)) for r in unique))
        slot = {int(r): j for j, r in enumerate(unique)}
        pairs = [(g, slot[int(r)]) for g, cands in enumerate(cand) for r in cands if r >= 0]
        result = score_pairs(
            torch.from_numpy(to_float(batch["image"][rows])).to(self.device),
            torch.stack(ref_images).to(self.device),
            torch.from_numpy(batch["fg_mask"][rows]).to(self.device),
            torch.stack(ref_masks).to(self.device),
            torch.tensor(pairs, dtype=torch.long).view(-1, 2),
            tau=self.tau,
            beta=self.beta,
            metric=self.metric,
            region_mode=self.region_mode,
        )
        chosen = select_matches(result, self.match_by)
        per_gen: dict[int, list[dict]] = {}
        for p, (g, j) in enumerate(result.pairs):
            ref_row = int(unique[j])
            rank = int(np.flatnonzero(cand[g] == ref_row)[0])
            per_gen.setdefault(int(g), []).append(
                {
                    "ref_id": self.refs.ref_ids[ref_row],
                    "prefilter_rank": rank,
                    "prefilter_score": float(scores[g, rank]),
                    "m_full": float(result.m_full[p]),
                    "m_fg": float(result.m_fg[p]),
                    "m_bg": float(result.m_bg[p]),
                    "branch": str(result.branch[p]),
                    "label": str(result.label[p]),
                }
            )
        for g, i in enumerate(rows):
            p = chosen[g]
            out["label"][i] = str(result.label[p])
            out["ref_id"][i] = self.refs.ref_ids[int(unique[result.pairs[p, 1]])]
            out["m_full"][i], out["m_fg"][i], out["m_bg"][i] = (
                result.m_full[p],
                result.m_fg[p],
                result.m_bg[p],
            )
            out["matches"][i] = json.dumps(per_gen[g])
        return {**batch, **out}
