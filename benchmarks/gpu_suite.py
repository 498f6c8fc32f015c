"""One-shot GPU benchmark suite: the figures that matter, in one command of at most ~6 minutes.

    python benchmarks/gpu_suite.py                       # one CUDA GPU: the whole suite
    python benchmarks/gpu_suite.py --smoke --out s.jsonl # the same code at tiny sizes on the CPU
    python benchmarks/gpu_suite.py --sections scoring generate

Sections, in run order (docs/performance.md says what every figure means):
  scoring   the exact Algorithm 1 engine vs pytorch-msssim, 512 px, three regions, fp32 and fp16
            image storage, dense tiles and top-16 sparse pairs: pairs/s and their ratio
  generate  SD v1.4's full-size architecture (random weights, fp16, 512 px, DDIM, SDPA) through
            the project's Generate stage at batch 1, 8 and 16, a plain diffusers call at batch 16
            and the neuron hooks' cost: 10 steps and 1 step timed, per-step and x50 figures
  u2netp    the learned U2-NetP segmenter when the project has that backend (ONNX, with its
            execution provider named), else a "not available" line
  segment   a BiRefNet-size network (Swin-L, 1024 px) through the project's BiRefNet loader
  embed     CLIP ViT-L/14 image embedding (random weights) through the project's CLIP embedder
  stages    generate -> segment -> embed -> match in-process on one GPU, each stage's share
  compile   the same as `generate` at batch 16 with the UNet under torch.compile (last: slowest)

Every figure is one JSON line, printed and appended to $OUT/gpu_suite.jsonl (or --out) the
moment it is measured, then a summary table (also written beside the JSON lines, as
Markdown). Each section runs under a time cap inside the suite's budget; a section that fails
or hits its cap leaves an error line and the next one runs. Nothing here imports Ray:
the GPU machine has none. diffusers, pytorch-msssim, faiss-cpu and the U2-NetP weights travel
as wheels (benchmarks/gpu_wheels.sh).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import get_args

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never wait on a network

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from gpu_harness import Recorder, best_of, device_name, run_sections, timed, version

from scanner.fbmem import DEFAULT_BETA, branches, score_pairs
from scanner.neurons import value_layers
from scanner.scoring import REGION_VARIANTS, EngineConfig

# Modules that need diffusers, transformers or FAISS are imported inside the sections that use
# them, so a missing wheel fails those sections alone, with an error line.

SUITE_VERSION = 1  # bump when a figure changes meaning
SCORING_GOAL = 20_000  # pairs/s on an H100-class GPU (issue 14)


@dataclass(frozen=True)
class Profile:
    """Sizes of one run: the GPU suite's, or the CPU smoke run's tiny ones."""

    device: str
    full: bool  # real-size models: SD v1.4, CLIP ViT-L/14, a BiRefNet-size network
    size: int  # canonical size: scoring, segmentation, embedding and the stages
    gen_size: int  # generation resolution
    steps: int  # denoising steps timed; 1 step is timed too, to split per-step from fixed cost
    batches: tuple[int, ...]  # generation batch sizes; the last is the "batch 16"
    dense: tuple[int, int]  # scoring: generations x references, every pair
    sparse: tuple[int, int, int]  # scoring: generations, references, candidates per generation
    baseline_pairs: int  # pairs pytorch-msssim scores (a subset; its rate is per pair)
    baseline_batch: int  # pairs per pytorch-msssim call
    repeats: int  # timed runs of each scoring figure (best kept) after one warm-up
    seg_images: int  # images per segmenter call
    seg_resolution: int  # the BiRefNet-size network's input side (BiRefNet's: 1024)
    embed_images: int  # images per embedder call
    refs: int  # stages: references in the store
    top_k: int  # stages: prefilter candidates per generation
    compile_backend: str  # torch.compile backend: inductor on the GPU, eager in the smoke run
    budget_s: float  # the whole suite
    caps: dict[str, float]  # per section


GPU = Profile(
    device="cuda",
    full=True,
    size=512,
    gen_size=512,
    steps=10,
    batches=(1, 8, 16),
    dense=(64, 64),
    sparse=(256, 1024, 16),
    baseline_pairs=1024,
    baseline_batch=64,
    repeats=3,
    seg_images=16,
    seg_resolution=1024,
    embed_images=64,
    refs=64,
    top_k=16,
    compile_backend="inductor",
    budget_s=345,
    caps={
        "scoring": 75,
        "generate": 90,
        "u2netp": 30,
        "segment": 45,
        "embed": 40,
        "stages": 75,
        "compile": 150,
    },
)

SMOKE = Profile(
    device="cpu",
    full=False,
    size=192,  # the smallest comfortable size for 5-scale MS-SSIM (161 px minimum)
    gen_size=64,
    steps=2,
    batches=(1, 2),
    dense=(2, 2),
    sparse=(2, 4, 2),
    baseline_pairs=4,
    baseline_batch=4,
    repeats=1,
    seg_images=2,
    seg_resolution=64,
    embed_images=2,
    refs=4,
    top_k=2,
    compile_backend="eager",  # dynamo's tracing without code generation: the same code path
    budget_s=240,
    caps=dict.fromkeys(
        ("scoring", "generate", "u2netp", "segment", "embed", "stages", "compile"), 60
    ),
)


class Context:
    """What the sections share: sizes, the recorder, a work folder, models built once."""

    def __init__(self, profile: Profile, rec: Recorder, work: Path) -> None:
        self.profile = profile
        self.rec = rec
        self.work = work
        self.results: dict[str, dict] = {}  # figures that a later section compares with

    @property
    def cuda(self) -> bool:
        return torch.device(self.profile.device).type == "cuda"

    def peak_reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**20, 1) if self.cuda else None

    def free_memory(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def _built(self, name: str, build: Callable[[Path, bool, str], Path]) -> Path:
        start = time.perf_counter()
        folder = build(self.work / name, self.profile.full, self.profile.device)
        self.rec.emit(
            "models",
            "build",
            f"{name}: random weights, built on the device, saved",
            round(time.perf_counter() - start, 2),
            "s",
            folder_mb=round(sum(f.stat().st_size for f in folder.rglob("*")) / 2**20, 1),
        )
        return folder

    @cached_property
    def sd_dir(self) -> Path:
        from gpu_models import sd_pipeline

        return self._built("sd", sd_pipeline)

    @cached_property
    def clip_dir(self) -> Path:
        from gpu_models import clip_folder

        return self._built("clip", clip_folder)

    @cached_property
    def birefnet_dir(self) -> Path:
        from gpu_models import birefnet_folder

        def build(out: Path, full: bool, device: str) -> Path:
            return birefnet_folder(out, full, device, self.profile.seg_resolution)

        return self._built("birefnet-size", build)

    @cached_property
    def generate_stage(self):
        """The project's Generate stage over the random SD pipeline, loaded once."""
        from gpu_models import parameters

        from scanner.generate import GenerationConfig
        from scanner.stages import Generate

        p = self.profile
        folder = self.sd_dir
        start = time.perf_counter()
        stage = Generate(
            GenerationConfig(
                model=str(folder), size=p.gen_size, device=p.device, batch_size=p.batches[-1]
            ),
            out_size=p.size,
        )
        pipe = stage.generator.pipeline
        processor = next(iter(pipe.unet.attn_processors.values()))
        self.rec.emit(
            "models",
            "load",
            "SD pipeline through GenerationConfig / Generator",
            round(time.perf_counter() - start, 2),
            "s",
            params={
                name: parameters(getattr(pipe, name)) for name in ("unet", "vae", "text_encoder")
            },
            dtype=str(pipe.unet.dtype),
            attention=type(processor).__name__,
            scheduler=type(pipe.scheduler).__name__,
        )
        return stage

    def segmenter_config(self):
        from scanner.segment import SegmenterConfig

        return SegmenterConfig(
            kind="birefnet",
            birefnet_path=str(self.birefnet_dir),
            trust_remote_code=True,  # our own stand-in's code (benchmarks/birefnet_standin.py)
            device=self.profile.device,
            birefnet_resolution=self.profile.seg_resolution,
        )

    def embed_config(self):
        from scanner.embed import EmbedConfig

        return EmbedConfig(
            image_kind="clip",
            clip_path=str(self.clip_dir),
            device=self.profile.device,
            batch_size=self.profile.embed_images,
        )


def synthetic(n: int, size: int, device: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth random images in [0, 1] and rectangular foregrounds over all three branches of
    Algorithm 1 (every 8th a tiny foreground, every 8th one filling the image)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    low = torch.rand(n, 3, size // 16, size // 16, generator=gen, device=device)
    images = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    noise = torch.rand(images.shape, generator=gen, device=device)
    images = images.add_(noise.mul_(0.05)).clamp_(0, 1)
    del noise
    side = size // 3
    top, left = torch.randint(0, size // 2, (2, n, 1, 1), generator=gen, device=device)
    ys = torch.arange(size, device=device).view(1, -1, 1)
    xs = torch.arange(size, device=device).view(1, 1, -1)
    rect = (ys >= top) & (ys < top + side) & (xs >= left) & (xs < left + side)
    kind = (torch.arange(n, device=device) % 8).view(-1, 1, 1)
    tiny = (ys < 4) & (xs < 4)
    masks = torch.where(kind == 0, tiny, torch.where(kind == 1, torch.ones_like(rect), rect))
    return images, masks


def synthetic_numpy(n: int, size: int, seed: int) -> np.ndarray:
    return synthetic(n, size, "cpu", seed)[0].numpy()


# ---------------------------------------------------------------- (a) scoring


def msssim_baseline(msssim, gen, ref, gen_fg, ref_fg, pairs, batch: int) -> torch.Tensor:
    """The three region scores with pytorch-msssim, each pair's variants built on the fly: how
    one would score Algorithm 1 without the engine."""
    branch = branches(gen_fg.flatten(1).float().mean(1), DEFAULT_BETA)
    out = []
    for p0 in range(0, pairs.shape[0], batch):
        gi, ri = pairs[p0 : p0 + batch, 0], pairs[p0 : p0 + batch, 1]
        g_m = gen_fg[gi].unsqueeze(1).to(gen.dtype)
        r_m = ref_fg[ri].unsqueeze(1).to(ref.dtype)
        g_var = torch.stack([gen[gi], gen[gi] * g_m, gen[gi] * (1 - g_m)], dim=1)
        r_var = torch.stack([ref[ri], ref[ri] * r_m, ref[ri] * (1 - r_m)], dim=1)
        variants = REGION_VARIANTS.to(gen.device)[branch[gi]]  # (B, 3 regions, 2)
        rows = torch.arange(len(gi), device=gen.device)
        regions = [
            msssim.ms_ssim(
                g_var[rows, variants[:, k, 0]],
                r_var[rows, variants[:, k, 1]],
                data_range=1.0,
                size_average=False,
            )
            for k in range(3)
        ]
        out.append(torch.stack(regions, dim=1))
    return torch.cat(out)


def section_scoring(ctx: Context) -> None:
    p = ctx.profile
    try:
        import pytorch_msssim as msssim
    except ImportError:
        msssim = None
        ctx.rec.emit(
            "scoring",
            "baseline",
            "pytorch-msssim is not installed: no ratio (carry its wheel: benchmarks/gpu_wheels.sh)",
            None,
            None,
            "missing",
        )
    score_layout(ctx, msssim, "dense", *p.dense, None, seed=0)
    ctx.free_memory()
    score_layout(ctx, msssim, f"sparse top-{p.sparse[2]}", *p.sparse, seed=1)


def score_layout(ctx: Context, msssim, layout: str, n_gen: int, n_ref: int, k, seed: int):
    """pytorch-msssim (when present), then the engine in fp32 and fp16 storage, on one set of
    pairs: all of them (k None), or k distinct random candidates per generation (a prefilter's
    top-k without its locality)."""
    p, dev = ctx.profile, ctx.profile.device
    gen, gen_fg = synthetic(n_gen, p.size, dev, 2 * seed)
    ref, ref_fg = synthetic(n_ref, p.size, dev, 2 * seed + 1)
    if k is None:
        pairs = torch.cartesian_prod(torch.arange(n_gen), torch.arange(n_ref))
    else:
        cand = torch.rand(n_gen, n_ref, generator=torch.Generator().manual_seed(seed))
        cand = cand.topk(k, dim=1).indices
        pairs = torch.stack([torch.arange(n_gen).repeat_interleave(k), cand.flatten()], 1)
    pairs = pairs.to(dev)
    setting = {"size": p.size, "layout": layout, "gens": n_gen, "refs": n_ref, "top_k": k}
    subset = pairs[: p.baseline_pairs]
    expected, base_rate = None, None
    if msssim is not None:
        ctx.peak_reset()
        seconds, expected = best_of(
            lambda: msssim_baseline(msssim, gen, ref, gen_fg, ref_fg, subset, p.baseline_batch),
            dev,
            p.repeats,
        )
        expected = expected.float().cpu().numpy()
        base_rate = len(subset) / seconds
        ctx.rec.emit(
            "scoring",
            "pytorch-msssim",
            f"{p.size} px {layout} {n_gen}x{n_ref}",
            round(base_rate, 2),
            "pairs/s",
            pairs=len(subset),
            seconds=round(seconds, 4),
            batch=p.baseline_batch,
            peak_mem_mb=ctx.peak_mb(),
            pytorch_msssim=version("pytorch-msssim"),
            **setting,
        )
    for storage in ("float32", "float16"):
        engine = EngineConfig(storage=storage)

        def run(pairs: torch.Tensor, engine: EngineConfig = engine):
            return score_pairs(gen, ref, gen_fg, ref_fg, pairs, engine=engine)

        ctx.peak_reset()
        # Warm up on the baseline's subset: an engine far from its goal then costs little.
        seconds, scores = best_of(lambda: run(pairs), dev, p.repeats, warm_up=lambda: run(subset))
        got = np.stack([scores.m_full, scores.m_fg, scores.m_bg], axis=1)[: len(subset)]
        rate = len(pairs) / seconds
        ctx.rec.emit(
            "scoring",
            "engine",
            f"{p.size} px {layout} {n_gen}x{n_ref} {storage}",
            round(rate, 2),
            "pairs/s",
            pairs=len(pairs),
            seconds=round(seconds, 4),
            storage=storage,
            ratio_vs_pytorch_msssim=round(rate / base_rate, 2) if base_rate else None,
            max_abs_diff=float(np.abs(got - expected).max()) if expected is not None else None,
            goal_pairs_per_s=SCORING_GOAL,
            peak_mem_mb=ctx.peak_mb(),
            **setting,
        )


# ---------------------------------------------------------------- (b) generation


def generation_batch(n: int, neurons: list[str] | None = None) -> dict:
    """A Generate stage input of n bundled memorized prompts, as a scan's driver builds it;
    with `neurons`, the rows are NeMo's (the neurons blocked: alpha 0)."""
    from scanner.driver import to_batch
    from scanner.plan import generation_items
    from scanner.prompts import load_prompts

    items = generation_items(load_prompts("memorized", n), 1, 0)
    if neurons is not None:
        items["neurons"], items["method"] = neurons, "nemo"
    return to_batch(items, "gpu-suite")


def per_step_figures(run: Callable[[int], object], steps: int, batch: int, device: str) -> dict:
    """Time `steps` denoising steps and 1 step; split per-step from fixed cost; estimate 50.

    Fixed cost (text encoding, VAE decoding, transfers) is paid once per call, so the 50-step
    estimate is fixed + 50 x per-step rather than 5 x the 10-step time.
    """
    run(2)  # warm-up: kernels chosen, caches filled, a compiled UNet compiled
    one = timed(lambda: run(1), device)
    many = timed(lambda: run(steps), device)
    per_step = max(many - one, 0.0) / (steps - 1)
    fixed = max(many - steps * per_step, 0.0)
    x50 = fixed + 50 * per_step
    return {
        "steps_timed": steps,
        "seconds_1_step": round(one, 4),
        "seconds_steps_timed": round(many, 4),
        "per_step_s": round(per_step, 5),
        "fixed_s": round(fixed, 4),
        "x50_s": round(x50, 3),
        "images_per_s_steps_timed": round(batch / many, 3),
        "images_per_s_x50": round(batch / x50, 4),
    }


def stage_runner(stage, batch: dict, size: int) -> Callable[[int], object]:
    """Runs the Generate stage on `batch` with a given step count (the config is frozen, so
    the loaded generator gets a copy with other steps and batch size: no reload)."""
    generator = stage.generator
    base = generator.config

    def run(steps: int) -> object:
        generator.config = replace(base, steps=steps, batch_size=size)
        return stage(batch)

    return run


def plain_runner(stage, prompts: list[str]) -> Callable[[int], object]:
    """A plain diffusers call of the stage's pipeline, with the stage's size and guidance; the
    pipeline draws its own latents on the device."""
    pipe, config = stage.generator.pipeline, stage.generator.config

    def run(steps: int) -> object:
        return pipe(
            prompt=prompts,
            height=config.size,
            width=config.size,
            num_inference_steps=steps,
            guidance_scale=config.guidance,
            output_type="np",
        )

    return run


def random_neurons(layers, n: int, per_layer: int, seed: int) -> list[str]:
    """Per sample, its own `per_layer` channels in every value layer (NeMo-C's worst case:
    every layer hooked, every sample scaled differently), as the stage's JSON column."""
    rng = np.random.default_rng(seed)
    return [
        json.dumps(
            [
                [layer.index, int(c)]
                for layer in layers
                for c in rng.choice(layer.size, per_layer, replace=False)
            ]
        )
        for _ in range(n)
    ]


def emit_generation(ctx, section: str, figure: str, label: str, batch: int, figures: dict, **more):
    ctx.rec.emit(
        section,
        figure,
        label,
        figures["images_per_s_x50"],
        "images/s (x50 steps)",
        batch=batch,
        gen_size=ctx.profile.gen_size,
        guidance=ctx.generate_stage.generator.config.guidance,
        dtype="float16" if ctx.cuda else "float32",
        peak_mem_mb=ctx.peak_mb(),
        **figures,
        **more,
    )


def section_generate(ctx: Context) -> None:
    p = ctx.profile
    stage = ctx.generate_stage
    for b in p.batches:
        ctx.peak_reset()
        figures = per_step_figures(
            stage_runner(stage, generation_batch(b), b), p.steps, b, p.device
        )
        emit_generation(ctx, "generate", "stage", f"Generate stage, batch {b}", b, figures)
        ctx.results[f"stage-{b}"] = figures
    b = p.batches[-1]
    prompts = generation_batch(b)["prompt"].tolist()
    ctx.peak_reset()
    plain = per_step_figures(plain_runner(stage, prompts), p.steps, b, p.device)
    ctx.results[f"plain-{b}"] = plain
    emit_generation(
        ctx,
        "generate",
        "plain diffusers",
        f"pipeline call, batch {b}",
        b,
        plain,
        stage_over_plain_x50=round(ctx.results[f"stage-{b}"]["x50_s"] / plain["x50_s"], 3),
    )
    per_layer = 10
    layers = value_layers(stage.generator.unet)
    neurons = random_neurons(layers, b, per_layer, seed=0)
    ctx.peak_reset()
    hooked = per_step_figures(
        stage_runner(stage, generation_batch(b, neurons), b), p.steps, b, p.device
    )
    emit_generation(
        ctx,
        "generate",
        "neuron hooks",
        f"Generate stage, batch {b}, per-sample scales on {len(layers)} layers",
        b,
        hooked,
        hooks_over_no_hooks_per_step=round(
            hooked["per_step_s"] / max(ctx.results[f"stage-{b}"]["per_step_s"], 1e-9), 3
        ),
        neurons_per_sample=per_layer * len(layers),
    )


def section_compile(ctx: Context) -> None:
    p = ctx.profile
    stage = ctx.generate_stage
    b = p.batches[-1]
    pipe = stage.generator.pipeline
    eager = pipe.unet
    pipe.unet = torch.compile(eager, backend=p.compile_backend)
    try:
        batch = generation_batch(b)
        run = stage_runner(stage, batch, b)
        first = timed(lambda: run(2), p.device)  # compiles
        runs = (
            ("stage", "stage", run),
            ("plain diffusers", "plain", plain_runner(stage, batch["prompt"].tolist())),
        )
        for figure, eager_key, runner in runs:
            ctx.peak_reset()
            figures = per_step_figures(runner, p.steps, b, p.device)
            eager_figures = ctx.results.get(f"{eager_key}-{b}")
            emit_generation(
                ctx,
                "compile",
                figure,
                f"torch.compile(unet, backend={p.compile_backend}), batch {b}",
                b,
                figures,
                first_call_s=round(first, 2),
                speedup_vs_eager_x50=(
                    round(eager_figures["x50_s"] / figures["x50_s"], 3) if eager_figures else None
                ),
            )
    finally:
        pipe.unet = eager


# ---------------------------------------------------------------- (c) segmentation, embedding


def onnx_providers(obj) -> list[str] | None:
    """The execution providers of the first onnxruntime session found on `obj`."""
    for value in vars(obj).values():
        if hasattr(value, "get_providers"):
            return list(value.get_providers())
    return None


def load_u2netp(device: str):
    """(the project's u2netp segmenter, None), or (None, why it is not available)."""
    from scanner.segment import SegmenterConfig, SegmenterKind, make_segmenter

    if "u2netp" not in get_args(SegmenterKind):
        return None, "scanner.segment has no u2netp backend"
    try:
        return make_segmenter(SegmenterConfig(kind="u2netp", device=device)), None
    except (ImportError, FileNotFoundError, ValueError) as exc:  # the weights' wheel is missing
        return None, str(exc)


def section_u2netp(ctx: Context) -> None:
    """The learned U2-NetP segmenter, if the project has that backend and its weights here."""
    p = ctx.profile
    try:
        import onnxruntime

        available = onnxruntime.get_available_providers()
    except ImportError:
        available = None
    u2netp, reason = load_u2netp(p.device)
    if u2netp is None:
        ctx.rec.emit(
            "u2netp",
            "u2netp",
            f"not available: {reason}"[:200],
            None,
            None,
            "not available",
            onnx_providers_available=available,
        )
        return
    images = synthetic_numpy(p.seg_images, p.size, seed=10)
    seconds, _ = best_of(lambda: u2netp(images), p.device, 1)
    ctx.rec.emit(
        "u2netp",
        "u2netp",
        f"{u2netp.name}, {p.size} px images, batch {p.seg_images}",
        round(p.seg_images / seconds, 2),
        "images/s",
        seconds=round(seconds, 4),
        onnx_providers=onnx_providers(u2netp),
        onnx_providers_available=available,
        onnxruntime=version("onnxruntime"),
    )


def section_segment(ctx: Context) -> None:
    """A BiRefNet-size network through the project's BiRefNet loader and pre/post-processing."""
    from gpu_models import parameters

    from scanner.segment import make_segmenter

    p = ctx.profile
    images = synthetic_numpy(p.seg_images, p.size, seed=10)
    seg = make_segmenter(ctx.segmenter_config())
    ctx.peak_reset()
    seconds, _ = best_of(lambda: seg(images), p.device, 1)
    ctx.rec.emit(
        "segment",
        "birefnet-size",
        f"Swin-L + FPN stand-in at {p.seg_resolution} px, batch {p.seg_images}",
        round(p.seg_images / seconds, 2),
        "images/s",
        seconds=round(seconds, 4),
        params=parameters(seg.model),
        resolution=p.seg_resolution,
        dtype=str(seg.dtype),
        peak_mem_mb=ctx.peak_mb(),
    )


def section_embed(ctx: Context) -> None:
    from gpu_models import parameters
    from transformers import CLIPConfig, CLIPModel

    from scanner.embed import make_image_embedder

    p = ctx.profile
    images = synthetic_numpy(p.embed_images, p.size, seed=11)
    embedder = make_image_embedder(ctx.embed_config())
    ctx.peak_reset()
    seconds, _ = best_of(lambda: embedder(images), p.device, 1)
    config = CLIPConfig.from_pretrained(ctx.clip_dir)
    with torch.device("meta"):  # the image tower's size, without a second copy of the model
        clip = CLIPModel(config)
    ctx.rec.emit(
        "embed",
        "clip",
        f"CLIP {'ViT-L/14' if p.full else 'tiny'} image features, {p.size} px in, "
        f"batch {p.embed_images}",
        round(p.embed_images / seconds, 2),
        "images/s",
        seconds=round(seconds, 4),
        params_image_tower=parameters(clip.vision_model) + parameters(clip.visual_projection),
        input_side=config.vision_config.image_size,
        dtype="float16" if ctx.cuda else "float32",
        peak_mem_mb=ctx.peak_mb(),
    )


# ---------------------------------------------------------------- (d) the stages of a scan


def reference_store(ctx: Context) -> Path:
    """A reference store of synthetic images, built by the project's build_reference with the
    same segmenter and embedder as the scan (a store must match its scan's embedder)."""
    from scanner.images import encode_png
    from scanner.reference import ReferenceConfig, build_reference

    p = ctx.profile
    folder = ctx.work / "refs"
    folder.mkdir(exist_ok=True)
    for i, image in enumerate(synthetic_numpy(p.refs, p.size, seed=12)):
        (folder / f"ref{i:05d}.png").write_bytes(encode_png(image))
    store = ctx.work / "store"
    config = ReferenceConfig(
        size=p.size,
        segmenter=ctx.segmenter_config(),
        embed=ctx.embed_config(),
        batch_size=p.seg_images,
    )
    start = time.perf_counter()
    build_reference(folder, store, config, overwrite=True)
    seconds = time.perf_counter() - start
    ctx.rec.emit(
        "stages",
        "reference store",
        f"build_reference: load, segment, embed, PNG, index; {p.refs} refs",
        round(p.refs / seconds, 2),
        "images/s",
        seconds=round(seconds, 3),
        refs=p.refs,
    )
    return store


def section_stages(ctx: Context) -> None:
    from scanner.stages import Embed, Match, Segment

    p = ctx.profile
    store = reference_store(ctx)
    b = p.batches[-1]
    generate = ctx.generate_stage
    run = stage_runner(generate, generation_batch(b), b)
    gen_figures = per_step_figures(run, p.steps, b, p.device)
    batch = run(p.steps)
    stages = {
        "segment": Segment(ctx.segmenter_config()),
        "embed": Embed(ctx.embed_config()),
        "match": Match(str(store), top_k=p.top_k, device=p.device),
    }
    seconds = {"generate": gen_figures["seconds_steps_timed"]}
    for name, stage in stages.items():
        stage(batch)  # warm-up; the match stage's reference cache fills (held, as in a scan)
        seconds[name] = timed(lambda stage=stage, batch=batch: stage(batch), p.device)
        batch = stage(batch)
    errors = [e for e in batch["error"] if e]
    if errors:
        raise RuntimeError(f"{len(errors)} rows failed in the stages, first: {errors[0]}")
    at_50 = {**seconds, "generate": gen_figures["x50_s"]}
    for name in seconds:
        ctx.rec.emit(
            "stages",
            name,
            f"{name} stage, batch {b}",
            round(b / seconds[name], 3),
            "images/s",
            seconds_per_batch=round(seconds[name], 4),
            share_at_steps_timed=round(seconds[name] / sum(seconds.values()), 4),
            share_at_50_steps=round(at_50[name] / sum(at_50.values()), 4),
            steps_timed=p.steps,
            batch=b,
            top_k=p.top_k if name == "match" else None,
        )
    ctx.rec.emit(
        "stages",
        "scan",
        f"generate -> segment -> embed -> match, batch {b}, 50 steps (estimated)",
        round(b / sum(at_50.values()), 4),
        "images/s",
        seconds_per_batch_at_50_steps=round(sum(at_50.values()), 3),
        gpu_share_at_50_steps={k: round(v / sum(at_50.values()), 4) for k, v in at_50.items()},
    )


SECTIONS: dict[str, Callable[[Context], None]] = {
    "scoring": section_scoring,
    "generate": section_generate,
    "u2netp": section_u2netp,
    "segment": section_segment,
    "embed": section_embed,
    "stages": section_stages,
    "compile": section_compile,
}


# ---------------------------------------------------------------- main


def environment() -> dict:
    packages = (
        "torch",
        "diffusers",
        "transformers",
        "pytorch-msssim",
        "faiss-cpu",
        "onnxruntime",
        "numpy",
    )
    env = {"python": platform.python_version(), "cpu_count": os.cpu_count()}
    env |= {name: version(name) for name in packages}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {
            "gpu_memory_gb": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
            "cudnn": torch.backends.cudnn.version(),
        }
    return env


def quiet_libraries() -> None:
    """No progress bars; diffusers' warnings off (the stand-in's byte-level tokenizer truncates
    every long prompt at 77 tokens, and says so on every call)."""
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            logging = __import__(module, fromlist=["disable_progress_bar"])
        except ImportError:
            continue  # that library is missing: its sections will say so
        logging.disable_progress_bar()
        if module.startswith("diffusers"):
            logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (CI)")
    parser.add_argument(
        "--out",
        type=Path,
        help="JSON lines file to append to (default: $OUT/gpu_suite.jsonl when $OUT is set)",
    )
    parser.add_argument(
        "--sections", nargs="+", choices=list(SECTIONS), help="run only these (default: all)"
    )
    parser.add_argument("--budget", type=float, help="seconds for the whole suite")
    args = parser.parse_args(argv)
    profile = SMOKE if args.smoke else GPU
    if args.budget is not None:
        profile = replace(profile, budget_s=args.budget)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("no CUDA device here: run the CPU smoke mode with --smoke")
    out = args.out or (Path(os.environ["OUT"]) / "gpu_suite.jsonl" if "OUT" in os.environ else None)
    if args.smoke:
        torch.set_num_threads(1)  # tiny models: one thread beats two on shared cores
    torch.manual_seed(0)
    quiet_libraries()
    common = {
        "suite": f"gpu_suite v{SUITE_VERSION}",
        "run": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "smoke": args.smoke,
        "device": device_name(profile.device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    rec = Recorder(out, common)
    rec.emit("environment", "versions", "packages and device", None, None, **environment())
    chosen = {
        name: fn for name, fn in SECTIONS.items() if not args.sections or name in args.sections
    }
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as work:
        ctx = Context(profile, rec, Path(work))
        run_sections(chosen, profile.caps, profile.budget_s, ctx)
    table = rec.summary()
    print("\n" + table)
    if out is not None:
        out.with_name(out.stem + "_summary.md").write_text(table + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
