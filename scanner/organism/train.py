"""Training the organism: the VAE first, its latents cached, then the UNet on them.

The standard latent-diffusion recipe, sized for 2 CPU cores:
1. the VAE learns to reconstruct the training images (L1 + SSIM on random crops, KL weight 0:
   only reconstruction matters, and posterior sampling noise would slow it down);
2. every training image is encoded once (posterior mean); the latents' std sets
   `vae.config.scaling_factor` (SD's 0.18215 belongs to SD's VAE, not this one);
3. the UNet learns the noise-prediction objective on those latents, conditioned on the frozen
   text encoder's states of each caption, with about 10% empty captions so that classifier-free
   guidance (and DetectMem, Wanda and NeMo, which read the unconditional branch) work.

Every random draw comes from generators seeded by `TrainConfig.seed`; steps, not wall time,
bound each phase, so a rerun on the same machine with the same thread count gives the same model.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from scanner.organism.design import Design, DesignConfig, make_design, resample
from scanner.organism.inputs import caption_table
from scanner.organism.model import ArchitectureConfig, Components
from scanner.similarity import SSIMSpec, blur, gaussian_window

Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainConfig:
    design: DesignConfig = field(default_factory=DesignConfig)
    arch: ArchitectureConfig = field(default_factory=ArchitectureConfig)
    vae_steps: int = 1200
    vae_batch: int = 16
    vae_crop: int = 64  # the VAE is convolutional: crops train it 4x cheaper than whole images
    vae_lr: float = 3e-3
    vae_ssim_weight: float = 0.5  # SSIM in the loss: the scan judges reconstructions by MS-SSIM
    unet_steps: int = 2200
    unet_batch: int = 16
    unet_lr: float = 1e-3
    empty_caption_rate: float = 0.1
    check_size: int = 256  # the scan's canonical size: reconstructions are judged there
    seed: int = 0
    threads: int = 2

    def __post_init__(self) -> None:
        for name in ("vae_steps", "vae_batch", "vae_crop", "unet_steps", "unet_batch", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.check_size < 161:  # 5-scale MS-SSIM with 11-tap windows (scanner.similarity)
            raise ValueError(f"check_size must be >= 161 px, got {self.check_size}")
        if self.vae_crop > self.arch.size:
            raise ValueError(f"vae_crop {self.vae_crop} exceeds the image size {self.arch.size}")


def _lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 0."""
    return peak * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / total))


def ssim_loss(a: torch.Tensor, b: torch.Tensor, levels: int = 2) -> torch.Tensor:
    """1 - mean SSIM over `levels` dyadic scales, differentiable (images in [-1, 1]); the
    scanner's own Gaussian filter (banded products on CPUs, cheaper than a convolution)."""
    spec = SSIMSpec()
    window = gaussian_window(spec, a.dtype, a.device)
    c1, c2 = (spec.k1 * 2) ** 2, (spec.k2 * 2) ** 2
    values = []
    for level in range(levels):
        if level:
            a, b = F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)
        a, b = a.contiguous(), b.contiguous()
        mu_a, mu_b = blur(a, window), blur(b, window)
        var_a, var_b = blur(a * a, window) - mu_a**2, blur(b * b, window) - mu_b**2
        cov = blur(a * b, window) - mu_a * mu_b
        ssim = (
            (2 * mu_a * mu_b + c1)
            * (2 * cov + c2)
            / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        )
        values.append(ssim.mean())
    return 1 - torch.stack(values).mean()


def train_vae(components: Components, images: torch.Tensor, config: TrainConfig, log: Log) -> None:
    from tqdm import tqdm

    vae = components.vae.to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    rng = torch.Generator().manual_seed(config.seed)
    side, crop = images.shape[-1], config.vae_crop
    bar = tqdm(range(config.vae_steps), desc="vae", unit="step", mininterval=2.0)
    for step in bar:
        rows = torch.randint(len(images), (config.vae_batch,), generator=rng)
        top, left = torch.randint(0, side - crop + 1, (2,), generator=rng).tolist()
        batch = images[rows, :, top : top + crop, left : left + crop] * 2 - 1
        batch = batch.contiguous(memory_format=torch.channels_last)
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, config.vae_steps, config.vae_lr)
        out = vae.decode(vae.encode(batch).latent_dist.mode()).sample
        loss = (out - batch).abs().mean() + config.vae_ssim_weight * ssim_loss(out, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    vae.eval()


@torch.no_grad()
def encode(components: Components, images: torch.Tensor, batch: int = 32) -> torch.Tensor:
    vae = components.vae
    return torch.cat(
        [
            vae.encode(images[i : i + batch] * 2 - 1).latent_dist.mode()
            for i in range(0, len(images), batch)
        ]
    )


@torch.no_grad()
def decode(components: Components, latents: torch.Tensor, batch: int = 32) -> torch.Tensor:
    vae = components.vae
    out = torch.cat(
        [vae.decode(latents[i : i + batch]).sample for i in range(0, len(latents), batch)]
    )
    return ((out + 1) / 2).clamp(0, 1)


def reconstruction_report(images: np.ndarray, recon: np.ndarray, size: int) -> np.ndarray:
    """Per image, MS-SSIM of the reconstruction at the scan's canonical size (both resampled
    by the scanner's own resampler, as generations and references are)."""
    from scanner.similarity import ms_ssim

    a = torch.from_numpy(resample(images, size))
    b = torch.from_numpy(resample(recon, size))
    return ms_ssim(a, b, data_range=1.0).numpy()


@torch.no_grad()
def caption_states(components: Components, captions: list[str]) -> torch.Tensor:
    from scanner.mitigation.signal import text_embeddings

    return text_embeddings(components.tokenizer, components.text_encoder, captions)


def train_unet(
    components: Components,
    latents: torch.Tensor,
    entries: torch.Tensor,
    states: torch.Tensor,
    empty_state: torch.Tensor,
    config: TrainConfig,
) -> list[float]:
    """Noise prediction on cached latents. `entries` (E,) maps each training-set entry to its
    image row (verbatim images appear many times); entry e's caption state is states[e]."""
    from tqdm import tqdm

    unet = components.unet.train()
    scheduler = components.scheduler
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.unet_lr, weight_decay=0.0)
    rng = torch.Generator().manual_seed(config.seed + 1)
    alphas = scheduler.alphas_cumprod
    losses = []
    bar = tqdm(range(config.unet_steps), desc="unet", unit="step", mininterval=2.0)
    for step in bar:
        pick = torch.randint(len(entries), (config.unet_batch,), generator=rng)
        x0 = latents[entries[pick]]
        cond = states[pick].clone()
        drop = torch.rand(config.unet_batch, generator=rng) < config.empty_caption_rate
        cond[drop] = empty_state
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (config.unet_batch,), generator=rng
        )
        noise = torch.randn(x0.shape, generator=rng)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, config.unet_steps, config.unet_lr, warmup=200)
        pred = unet(noisy, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-200:]):.4f}")
    bar.close()
    unet.eval()
    return losses


def training_entries(design: Design) -> tuple[list[int], list[str]]:
    """The training set as (image row, caption) entries: verbatim images repeated."""
    rows, captions = [], []
    for row, image in enumerate(design.images):
        rows += [row] * image.copies
        captions += [image.caption] * image.copies
    return rows, captions


def train_organism(
    out: str | Path, config: TrainConfig = TrainConfig(), log: Log = print, command: str = ""
) -> dict:
    """Train the organism from scratch into `out` (a diffusers pipeline folder + recipe.json,
    which records `command`, the command line that made it)."""
    out = Path(out)
    torch.set_num_threads(config.threads)
    started = time.time()
    design = make_design(config.design)
    pixels, _ = design.render()
    images = torch.from_numpy(pixels)
    components = Components.initial(config.arch)
    log(
        f"training set: {len(design.images)} images, {sum(i.copies for i in design.images)} entries"
    )

    t0 = time.perf_counter()
    train_vae(components, images, config, log)
    vae_seconds = time.perf_counter() - t0
    latents = encode(components, images)
    recon = decode(components, latents).numpy()
    scores = reconstruction_report(pixels, recon, config.check_size)
    scale = float(1.0 / latents.std())
    components.vae.register_to_config(scaling_factor=scale)
    log(
        f"vae: {vae_seconds:.0f} s; reconstruction MS-SSIM at {config.check_size} px: "
        f"min {scores.min():.3f}, median {np.median(scores):.3f}, "
        f"{int((scores >= 0.9).sum())}/{len(scores)} >= 0.9; scaling_factor {scale:.4f}"
    )

    rows, captions = training_entries(design)
    unique = sorted(set(captions))
    unique_states = caption_states(components, [*unique, ""])
    index = {c: i for i, c in enumerate(unique)}
    states = unique_states[[index[c] for c in captions]]
    t0 = time.perf_counter()
    losses = train_unet(
        components, latents * scale, torch.tensor(rows), states, unique_states[-1], config
    )
    unet_seconds = time.perf_counter() - t0

    # Half precision on disk keeps the weights under the repository's 20 MB; the scanner loads
    # them back in its own dtype (float32 on CPU), so nothing downstream sees float16.
    components.pipeline().to(dtype=torch.float16).save_pretrained(out)
    caption_table(design).to_csv(out / "captions.csv", index=False)
    recipe = {
        "command": command,
        "config": asdict(config),
        "model": components.describe(),
        "seconds": {
            "vae": round(vae_seconds, 1),
            "unet": round(unet_seconds, 1),
            "total": round(time.time() - started, 1),
        },
        "threads": config.threads,
        "images": len(design.images),
        "vae_scaling_factor": scale,
        "reconstruction_ms_ssim": {
            image.image_id: round(float(s), 4) for image, s in zip(design.images, scores)
        },
        "unet_loss_last_500": float(np.mean(losses[-500:])),
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2))
    return recipe
