"""The organism's architecture: Stable Diffusion v1.x's classes at a size 2 CPU cores can train.

The same diffusers and transformers classes as SD v1.x, so the organism loads through the code
path a user's `--model PATH` takes and NeMo finds its value neurons by structure:
`UNet2DConditionModel` with cross-attention (`attn2.to_v`) in its down and mid blocks,
`AutoencoderKL` with SD's 8x downsampling, a `CLIPTextModel` with the byte-level tokenizer of
`scanner.tiny_sd`, and a DDIM scheduler with SD v1's noise schedule.

Sizes follow what was measured on a 2-core CPU (NOTES, ISSUE-NOTES): 128 px images give 16 x 16
latents; attention only at the two coarser UNet levels (full-resolution attention is 4x slower);
the VAE keeps more latent channels than SD's 4 because it must reconstruct every training image
at MS-SSIM >= 0.9 after a few minutes of training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from scanner.organism.design import TRAIN_SIZE
from scanner.tiny_sd import byte_tokenizer, sd_v1_scheduler

CONTEXT = 77  # SD v1's text context: prompts are padded to it


@dataclass(frozen=True)
class ArchitectureConfig:
    size: int = TRAIN_SIZE  # generated image side; latents are size / 8
    latent_channels: int = 16  # SD v1: 4; more channels make the small VAE reconstruct sooner
    vae_channels: tuple[int, ...] = (32, 32, 64, 64)  # four blocks = SD's 8x downsampling
    unet_channels: tuple[int, ...] = (64, 128, 128)  # SD v1: (320, 640, 1280, 1280)
    unet_layers_per_block: int = 1  # SD v1: 2
    attention_heads: int = 4
    text_width: int = 64  # = the UNet's cross-attention dimension (SD v1: 768)
    text_layers: int = 2  # SD v1's CLIP ViT-L/14 text tower: 12
    seed: int = 0  # initial weights


def make_vae(arch: ArchitectureConfig) -> AutoencoderKL:
    blocks = len(arch.vae_channels)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=arch.vae_channels,
        layers_per_block=1,
        latent_channels=arch.latent_channels,
        norm_num_groups=8,
        sample_size=arch.size,
        mid_block_add_attention=False,  # attention at 16 x 16 buys nothing for reconstruction
    )


def make_unet(arch: ArchitectureConfig) -> UNet2DConditionModel:
    levels = len(arch.unet_channels)
    return UNet2DConditionModel(
        sample_size=arch.size // 8,
        in_channels=arch.latent_channels,
        out_channels=arch.latent_channels,
        block_out_channels=arch.unet_channels,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + ("UpBlock2D",),
        layers_per_block=arch.unet_layers_per_block,
        cross_attention_dim=arch.text_width,
        attention_head_dim=arch.attention_heads,  # diffusers' SD v1 naming: the number of heads
        norm_num_groups=16,
    )


def make_text_encoder(arch: ArchitectureConfig, tokenizer: CLIPTokenizer) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=arch.text_width,
            intermediate_size=2 * arch.text_width,
            num_hidden_layers=arch.text_layers,
            num_attention_heads=4,
            max_position_embeddings=CONTEXT,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


@dataclass
class Components:
    """The organism's modules, seeded; the VAE and UNet are trained, the text encoder is not."""

    arch: ArchitectureConfig
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: DDIMScheduler

    @classmethod
    def initial(cls, arch: ArchitectureConfig) -> Components:
        tokenizer = byte_tokenizer(CONTEXT)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(arch.seed)
            text_encoder = make_text_encoder(arch, tokenizer)
            vae = make_vae(arch)
            unet = make_unet(arch)
        text_encoder.requires_grad_(False)
        return cls(arch, vae, unet, text_encoder, tokenizer, sd_v1_scheduler())

    def pipeline(self) -> StableDiffusionPipeline:
        return StableDiffusionPipeline(
            unet=self.unet,
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def describe(self) -> dict:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {
            "architecture": asdict(self.arch),
            "parameters": {
                "unet": count(self.unet),
                "vae": count(self.vae),
                "text_encoder": count(self.text_encoder),
            },
        }
