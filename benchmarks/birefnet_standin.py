"""A BiRefNet-size segmenter with random weights, loaded the way BiRefNet is.

BiRefNet (the paper's segmenter) ships its modeling code with its weights, and the project
loads it through transformers' remote-code path (`scanner.segment.BiRefNetSegmenter`). Its
weights cannot be downloaded here, so the GPU suite copies this file into a model folder,
names it in config.json's `auto_map`, and loads that folder through the same segmenter: the
project's pre- and post-processing run for real around a network of BiRefNet's size class.

The network: a Swin-L backbone (BiRefNet's default, `swin_v1_l`, 195 M parameters) at the
input resolution (1024 px), and a light feature-pyramid decoder. BiRefNet's own decoder is
heavier (about 220 M parameters in all), so this is a lower bound on its cost. Outputs follow
BiRefNet's convention in eval mode: a list of side outputs, coarse to fine, logits last.
"""

import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, SwinBackbone, SwinConfig

STAGES = ["stage1", "stage2", "stage3", "stage4"]


class StandInConfig(PretrainedConfig):
    model_type = "birefnet_standin"

    def __init__(
        self,
        embed_dim: int = 192,  # Swin-L
        depths: tuple = (2, 2, 18, 2),  # Swin-L
        num_heads: tuple = (6, 12, 24, 48),  # Swin-L
        window_size: int = 12,  # Swin-L at 384 px, as BiRefNet's backbone
        image_size: int = 1024,  # BiRefNet's input size
        decoder_channels: int = 256,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.embed_dim = embed_dim
        self.depths = list(depths)
        self.num_heads = list(num_heads)
        self.window_size = window_size
        self.image_size = image_size
        self.decoder_channels = decoder_channels


class StandIn(PreTrainedModel):
    config_class = StandInConfig

    def __init__(self, config: StandInConfig) -> None:
        super().__init__(config)
        self.backbone = SwinBackbone(
            SwinConfig(
                embed_dim=config.embed_dim,
                depths=config.depths,
                num_heads=config.num_heads,
                window_size=config.window_size,
                image_size=config.image_size,
                out_features=STAGES,
            )
        )
        width = config.decoder_channels
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in self.backbone.channels)
        self.smooth = nn.ModuleList(
            nn.Conv2d(width, width, 3, padding=1) for _ in self.backbone.channels
        )
        self.side = nn.ModuleList(nn.Conv2d(width, 1, 1) for _ in self.backbone.channels)
        self.post_init()

    def forward(self, x):
        maps = self.backbone(x).feature_maps  # strides 4, 8, 16, 32
        top = None
        outputs = []
        for level in reversed(range(len(maps))):
            lateral = self.lateral[level](maps[level])
            if top is not None:
                lateral = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="bilinear")
            top = F.gelu(self.smooth[level](lateral))
            outputs.append(self.side[level](top))
        logits = F.interpolate(outputs[-1], size=x.shape[-2:], mode="bilinear")
        return [*outputs[:-1], logits]
