"""Offline stand-ins for Stable Diffusion v1.x: a tiny random-weight pipeline and the real UNet shape.

No weights can be downloaded where the scanner is built and tested, yet the generation and
mitigation code must run through diffusers' real loading path and find SD v1's modules by
structure. The tiny pipeline keeps SD v1.x's module layout (three cross-attention down blocks,
one plain down block, a cross-attention mid block, an 8x VAE, a CLIP text encoder with a
77-token context) at a few channels each, so it saves to 13 MB and takes about 0.2 s per denoising
step for 8 images of 64 px on one CPU thread. Its images are noise-like: it proves the plumbing,
never the model's behaviour.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

TINY_SIZE = 64  # pixels; the 8x VAE gives SD v1's latent grid at 1/8 of that (8 x 8)
_TEXT_DIM = 32  # text-encoder width = the UNet's cross-attention dimension
_CONTEXT = 77  # SD v1's CLIP context length: prompts are padded to it

_BOS, _EOS = "<|startoftext|>", "<|endoftext|>"


def byte_tokenizer(context: int = _CONTEXT) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is every byte, alone and word-final, so any prompt
    tokenizes without merges and without a vocabulary file."""
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [_BOS, _EOS]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=context)


def _tiny_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=TINY_SIZE // 8,
        block_out_channels=(32, 64, 64, 64),  # SD v1: (320, 640, 1280, 1280)
        layers_per_block=1,  # SD v1: 2
        cross_attention_dim=_TEXT_DIM,  # SD v1: 768
        attention_head_dim=4,  # SD v1: 8 heads
        # down/up/mid block types left at the defaults, which are SD v1's
    )


def _tiny_vae() -> AutoencoderKL:
    four = ("DownEncoderBlock2D",) * 4
    return AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),  # four blocks = SD v1's 8x downsampling
        down_block_types=four,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        sample_size=TINY_SIZE,
    )


def _tiny_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=_CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,  # SD v1's tokenizer pads with <|endoftext|>
    )
    return CLIPTextModel(config)


def sd_v1_scheduler() -> DDIMScheduler:
    # SD v1's noise schedule (scaled_linear, 0.00085..0.012 over 1000 steps).
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_tiny_pipeline(out_dir: str | PathLike, seed: int = 0) -> Path:
    """Save a seeded random-weight SD v1.x-shaped pipeline to `out_dir` and return that path.

    The same seed gives bit-identical weights; the global torch RNG is left as it was.
    """
    out = Path(out_dir)
    tokenizer = byte_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = _tiny_unet()
        vae = _tiny_vae()
        text_encoder = _tiny_text_encoder(tokenizer)
    pipeline = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=sd_v1_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(out)
    return out


def sd_v1_unet_on_meta() -> UNet2DConditionModel:
    """SD v1.x's UNet architecture without weights (meta tensors), for checks of its structure."""
    with torch.device("meta"):
        return UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
