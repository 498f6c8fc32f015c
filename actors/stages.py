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
    def __init__(self, config, out_size: int, method_states=None, threads: int = 1):
        config = dataclasses.replace(config, device=_placement(threads))
        super().__init__(config, out_size, method_states)


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


def prepare_method(config, name: str, prompts, prompt_ids, threads: int = 1) -> dict:
    """A mitigation method's once-per-run state, computed on the device Ray gave this task."""
    from scanner.generate import Generator
    from scanner.mitigation.methods import get_method

    generator = Generator(dataclasses.replace(config, device=_placement(threads)))
    return get_method(name).prepare(generator, prompts, prompt_ids)
