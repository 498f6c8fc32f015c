"""Ray actor classes: each hosts one `scanner.stages` stage on the device Ray gave it.

The only things an actor adds to its stage are placement facts Ray alone knows: which GPU
(if any) was assigned and how many CPU threads the actor may use. Everything else is the
stage itself, so what runs on the cluster is exactly what the tests run in-process.
"""

from __future__ import annotations

import dataclasses

import torch

from scanner import stages
from scanner.mitigation.localize import Localize


def _placement(threads: int) -> str:
    import ray

    torch.set_num_threads(max(1, threads))
    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


class LoadActor(stages.LoadImages):
    def __init__(self, size: int, max_pixels: int, threads: int = 1):
        _placement(threads)
        super().__init__(size, max_pixels=max_pixels)


class GenerateActor(stages.Generate):
    def __init__(self, config, out_size: int, threads: int = 1):
        super().__init__(dataclasses.replace(config, device=_placement(threads)), out_size)


class SegmentActor(stages.Segment):
    def __init__(self, config, threads: int = 1):
        super().__init__(dataclasses.replace(config, device=_placement(threads)))


class EmbedActor(stages.Embed):
    def __init__(self, config, threads: int = 1):
        super().__init__(dataclasses.replace(config, device=_placement(threads)))


class MatchActor(stages.Match):
    def __init__(self, threads: int = 1, **kwargs):
        super().__init__(**kwargs, device=_placement(threads))


class LocalizeActor(Localize):
    def __init__(self, config, threads: int = 1):
        super().__init__(dataclasses.replace(config, device=_placement(threads)))
