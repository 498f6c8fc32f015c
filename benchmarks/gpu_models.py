"""Random-weight models of the real sizes, saved where the project's loaders read them.

A network's cost per image depends on its architecture, not on its weights, and no weights
can be downloaded where the suite is prepared. So the GPU suite builds each model from its
published configuration with random weights on the device, saves it with `save_pretrained`,
and loads it back through the project's own loading code (generate, segment, embed): what is
timed is the project's path around a network of the real size. `full=False` builds the same
structures at a few channels for the CPU smoke run.

Full sizes (parameter counts checked in tests/test_gpu_suite.py): SD v1.4's UNet 859.5 M, VAE
83.7 M and CLIP ViT-L/14 text encoder 123.1 M; CLIP ViT-L/14 427.6 M (both towers, as the
project's embedder loads a CLIPModel); a BiRefNet-size segmenter (see birefnet_standin.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import (
    AutoConfig,
    AutoModelForImageSegmentation,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)

from scanner.tiny_sd import build_tiny_pipeline

STANDIN = Path(__file__).with_name("birefnet_standin.py")

# CLIP ViT-L/14's text tower: SD v1's text encoder, and the text half of the CLIP embedder.
CLIP_L14_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)
CLIP_L14_VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    hidden_act="quick_gelu",
)
TINY_TEXT = dict(
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=77,
    bos_token_id=0,  # inside the tiny vocabulary (CLIP's defaults are 49406 / 49407)
    eos_token_id=1,
    pad_token_id=1,
)
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
)
TINY_SWIN = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4)


def model_dtype(device: str) -> torch.dtype:
    """fp16 on CUDA, as the project runs every model there; fp32 on the CPU."""
    return torch.float16 if torch.device(device).type == "cuda" else torch.float32


def parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sd_v1_components(device: str, **token_ids: int) -> dict[str, torch.nn.Module]:
    """SD v1.4's UNet, VAE and text encoder at full size, random weights, built on `device`.

    `token_ids` (bos/eos/pad_token_id) go to the text encoder's config: its tokenizer's.
    """
    with torch.device(device):
        return {
            "unet": UNet2DConditionModel(cross_attention_dim=768, sample_size=64),  # SD v1
            "vae": AutoencoderKL(
                block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                latent_channels=4,
                layers_per_block=2,
                sample_size=512,
            ),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT, **token_ids)),
        }


def sd_pipeline(out: Path, full: bool, device: str) -> Path:
    """A random-weight SD v1.x pipeline folder: SD v1.4's size, or the project's tiny one.

    The full pipeline takes the tiny one's byte-level tokenizer (SD's vocabulary cannot be
    downloaded; every prompt is padded to 77 tokens either way, so the compute is SD's) and its
    scheduler (SD v1's noise schedule).
    """
    if not full:
        return build_tiny_pipeline(out)
    tiny = build_tiny_pipeline(out.with_name(out.name + "-tiny"))
    tokenizer = CLIPTokenizer.from_pretrained(tiny / "tokenizer")
    parts = sd_v1_components(
        device,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    pipeline = StableDiffusionPipeline(
        **parts,
        tokenizer=tokenizer,
        scheduler=DDIMScheduler.from_pretrained(tiny / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.to(dtype=model_dtype(device))
    pipeline.save_pretrained(out)
    return out


def clip_folder(out: Path, full: bool, device: str) -> Path:
    """A CLIPModel folder (ViT-L/14 or tiny) with its image processor, as `ClipImageEmbedder` loads."""
    vision = CLIP_L14_VISION if full else TINY_VISION
    config = CLIPConfig(
        text_config=CLIP_L14_TEXT if full else TINY_TEXT,
        vision_config=vision,
        projection_dim=768 if full else 16,
    )
    with torch.device(device):
        model = CLIPModel(config)
    model.to(model_dtype(device)).save_pretrained(out)
    side = vision["image_size"]
    CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    ).save_pretrained(out)
    return out


def birefnet_folder(out: Path, full: bool, device: str, resolution: int) -> Path:
    """A remote-code model folder like BiRefNet's, holding the stand-in network."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(STANDIN, out / STANDIN.name)
    auto_map = {
        "AutoConfig": f"{STANDIN.stem}.StandInConfig",
        "AutoModelForImageSegmentation": f"{STANDIN.stem}.StandIn",
    }
    shape = {} if full else TINY_SWIN
    config = {"model_type": "birefnet_standin", "auto_map": auto_map, "image_size": resolution}
    (out / "config.json").write_text(json.dumps({**config, **shape}))
    loaded = AutoConfig.from_pretrained(out, trust_remote_code=True)  # our own file, beside
    with torch.device(device):
        model = AutoModelForImageSegmentation.from_config(loaded, trust_remote_code=True)
    model.to(model_dtype(device)).save_pretrained(out)
    return out
