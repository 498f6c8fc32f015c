"""NeMo's neuron search (Hintersdorf et al. 2024) as a pure function of a score callback.

The search only ever asks one question of the model: "how memorized is the prompt with these
neurons blocked?". Taking that question as a callback keeps the algorithm free of torch and
lets tests drive it with hand-built scores; its cost is the number of callback calls, one
UNet call each (see `scanner.mitigation.signal`).

The steps follow NeMo's official code (`3_detect_memorized_neurons.py`,
`utils/activation_detection.py`), including the points where it is more specific than the
paper; docs/mitigation.md lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

Neuron = tuple[int, int]  # (value-layer index, output channel)
ScoreFn = Callable[[frozenset[Neuron]], float]


@dataclass(frozen=True)
class SearchConfig:
    threshold: float = 0.428  # NeMo's ssim_threshold_initial_selection and _refinement
    theta_start: float = 5.0  # NeMo's --initial_theta
    theta_step: float = 0.25  # NeMo's --theta_reduction_per_step
    theta_min: float = 1.0  # NeMo's --min_theta: reaching it ends the selection, unevaluated
    k_start: int = 0  # NeMo's --initial_k; k then grows by 1 per step, as in NeMo

    def __post_init__(self) -> None:
        if not self.theta_step > 0:
            raise ValueError(f"theta_step must be > 0, got {self.theta_step}")
        if not self.theta_start > self.theta_min:
            raise ValueError(
                f"theta_start ({self.theta_start}) must be above theta_min ({self.theta_min})"
            )
        if self.k_start < 0:
            raise ValueError(f"k_start must be >= 0, got {self.k_start}")


class SearchStep(NamedTuple):
    """One score evaluation: what was tried and the score it got."""

    stage: Literal["initial", "layer", "neuron"]
    subject: tuple[float, int] | int | Neuron  # (theta, k) / layer unblocked / neuron unblocked
    score: float


@dataclass(frozen=True)
class NeuronSearchResult:
    initial: frozenset[Neuron]  # the last outlier set the initial selection scored
    refined: frozenset[Neuron]  # what refinement kept of it
    theta: float  # the (theta, k) that produced `initial`
    k: int
    success: bool  # False: no (theta, k) brought the score to the threshold
    initial_score: float
    refined_score: float  # score of `refined` (evaluated during refinement, no extra call)
    score_calls: int  # callback calls = UNet calls
    trace: tuple[SearchStep, ...]


def selection_schedule(config: SearchConfig, max_layer_size: int) -> Iterator[tuple[float, int]]:
    """The (theta, k) pairs of the initial selection, in order.

    theta falls and k rises every step. NeMo's loop stops when theta reaches theta_min (1) or
    k reaches 1280 (SD v1.4's widest layer, where top-k already blocks every neuron); the
    pair that triggers the stop is never scored. So with the defaults the last pair is
    (1.25, 15): 16 pairs. `max_layer_size` generalizes the 1280 to any UNet.
    """
    step = 0
    while True:
        # From the step count, not by repeated subtraction, so no rounding drift hides theta_min.
        theta = config.theta_start - step * config.theta_step
        k = config.k_start + step
        if step > 0 and (theta <= config.theta_min + 1e-9 or k >= max_layer_size):
            return
        yield theta, k
        step += 1


def outlier_neurons(
    acts: Sequence[np.ndarray],
    means: Sequence[np.ndarray],
    stds: Sequence[np.ndarray],
    theta: float,
    k: int,
) -> tuple[Neuron, ...]:
    """Per layer: neurons with |a - mean| / std > theta, then the k largest raw activations.

    The order is NeMo's (z-outliers by channel, then top-k by falling activation, repeats
    dropped); the neuron refinement visits neurons in this order, so it is part of the result.
    Top-k ranks raw activations, not z-scores, exactly as NeMo's code does; a zero std makes
    any deviation an outlier.
    """
    neurons: list[Neuron] = []
    for layer, arrays in enumerate(zip(acts, means, stds, strict=True)):
        a, mean, std = (np.asarray(x, dtype=np.float64) for x in arrays)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.abs(a - mean) / std
        chosen = dict.fromkeys(np.flatnonzero(z > theta).tolist())
        top = np.argsort(-np.abs(a), kind="stable")[: min(k, a.size)]
        chosen.update(dict.fromkeys(top.tolist()))
        neurons.extend((layer, channel) for channel in chosen)
    return tuple(neurons)


def search_neurons(
    acts: Sequence[np.ndarray],
    means: Sequence[np.ndarray],
    stds: Sequence[np.ndarray],
    score: ScoreFn,
    config: SearchConfig = SearchConfig(),
) -> NeuronSearchResult:
    """NeMo's initial selection then refinement for one memorized prompt.

    `acts[l]`, `means[l]`, `stds[l]` are the prompt's activations and the holdout statistics of
    value layer l, shape (C_l,). `score(neurons)` is the memorization score with those neurons
    blocked; lower means less memorized.
    """
    acts, means, stds = _checked_layers(acts, means, stds)
    calls = _CountingScore(score)

    # 1. Initial selection: widen the outlier set until the score falls to the threshold.
    selected: tuple[Neuron, ...] = ()
    theta, k, initial_score = config.theta_start, config.k_start, float("inf")
    for theta, k in selection_schedule(config, max(a.size for a in acts)):
        selected = outlier_neurons(acts, means, stds, theta, k)
        initial_score = calls("initial", (theta, k), selected)
        if initial_score <= config.threshold:
            break
    success = initial_score <= config.threshold
    # NeMo refines a failed selection too, against the score it reached instead of the
    # threshold: refinement then only drops neurons whose removal lowers the score further.
    limit = config.threshold if success else initial_score

    # 2. Refinement by whole layers, last layer first: unblock a layer if the score stays below.
    current, current_score = list(selected), initial_score
    for layer in reversed(range(len(acts))):
        candidate = [n for n in current if n[0] != layer]
        if len(candidate) == len(current):
            continue  # nothing blocked in this layer: NeMo skips it without a call
        candidate_score = calls("layer", layer, candidate)
        if candidate_score < limit:
            current, current_score = candidate, candidate_score

    # 3. Refinement by single neurons, one greedy pass, layers last first.
    for layer in reversed(range(len(acts))):
        for neuron in [n for n in current if n[0] == layer]:
            candidate = [n for n in current if n != neuron]
            candidate_score = calls("neuron", neuron, candidate)
            if candidate_score < limit:
                current, current_score = candidate, candidate_score

    return NeuronSearchResult(
        initial=frozenset(selected),
        refined=frozenset(current),
        theta=theta,
        k=k,
        success=success,
        initial_score=initial_score,
        refined_score=current_score,
        score_calls=len(calls.trace),
        trace=tuple(calls.trace),
    )


class _CountingScore:
    """Calls the score callback, checks its answer and records every call."""

    def __init__(self, score: ScoreFn) -> None:
        self._score = score
        self.trace: list[SearchStep] = []

    def __call__(self, stage, subject, neurons: Sequence[Neuron]) -> float:
        value = self._score(frozenset(neurons))
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
            raise TypeError(f"score callback must return a float, got {type(value).__name__}")
        if not np.isfinite(value):
            raise ValueError(
                f"score callback returned {value} for {len(neurons)} blocked neurons "
                f"({stage} step {subject}); scores must be finite"
            )
        self.trace.append(SearchStep(stage, subject, float(value)))
        return float(value)


def _checked_layers(
    acts: Sequence[np.ndarray], means: Sequence[np.ndarray], stds: Sequence[np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    if not len(acts) == len(means) == len(stds) > 0:
        raise ValueError(
            f"acts, means and stds must list the same layers (at least one); got "
            f"{len(acts)}, {len(means)} and {len(stds)} layers"
        )
    checked = ([], [], [])
    for layer, arrays in enumerate(zip(acts, means, stds, strict=True)):
        arrays = [np.asarray(x, dtype=np.float64) for x in arrays]
        shapes = [x.shape for x in arrays]
        if len(set(shapes)) != 1 or len(shapes[0]) != 1 or shapes[0][0] == 0:
            raise ValueError(
                f"layer {layer}: acts, mean and std must be non-empty 1-D arrays of one length, "
                f"got shapes {shapes}"
            )
        if not all(np.isfinite(x).all() for x in arrays):
            raise ValueError(f"layer {layer}: acts, mean and std must be finite")
        if (arrays[2] < 0).any():
            raise ValueError(f"layer {layer}: std has negative values (min {arrays[2].min()})")
        for store, x in zip(checked, arrays, strict=True):
            store.append(x)
    return checked
