"""A BiRefNet stand-in for offline tests: the same remote-code loading and output convention.

Its logits are a 1x1 convolution of the normalized input, so a test can predict every output
pixel; the side output before the logits is their negation, so reading the wrong element of
the output list flips the mask.
"""

from torch import nn
from transformers import PretrainedConfig, PreTrainedModel


class TinyBiRefNetConfig(PretrainedConfig):
    model_type = "tiny_birefnet"


class TinyBiRefNet(PreTrainedModel):
    config_class = TinyBiRefNetConfig

    def __init__(self, config: TinyBiRefNetConfig) -> None:
        super().__init__(config)
        self.head = nn.Conv2d(3, 1, kernel_size=1)
        self.post_init()

    def forward(self, x):
        logits = self.head(x)
        return [-logits, logits]  # side outputs coarse to fine, logits last, as BiRefNet in eval
