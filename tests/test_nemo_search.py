"""NeMo's neuron search driven by hand-built score callbacks, every call checked."""

from __future__ import annotations

import numpy as np
import pytest

from scanner.mitigation.search import (
    SearchConfig,
    SearchStep,
    outlier_neurons,
    search_neurons,
    selection_schedule,
)

THRESHOLD = 0.428

# Three layers, means 0 and stds 1, so a neuron's z-score is its activation. Per layer, the
# raw activations rank: layer 0: 1, 0, 2, 3; layer 1: 2, 4, 0, 3, 1, 5; layer 2: 5, 3, 7, 2, ...
ACTS = [
    np.array([0.5, 4.6, 0.2, 0.1]),
    np.array([0.3, 0.1, 3.1, 0.2, 0.4, 0.0]),
    np.array([0.1, 0.2, 0.3, 0.9, 0.05, 4.9, 0.15, 0.25]),
]
MEANS = [np.zeros_like(a) for a in ACTS]
STDS = [np.ones_like(a) for a in ACTS]

# What the schedule selects here (worked out by hand):
# (5.00, 0): nothing; (4.75, 1): z > 4.75 gives (2,5), top-1 adds (0,1), (1,2);
# (4.50, 2): z > 4.5 gives (0,1), (2,5), top-2 adds (0,0), (1,2), (1,4), (2,3).
STEP_1 = {(0, 1), (1, 2), (2, 5)}
STEP_2 = {(0, 1), (0, 0), (1, 2), (1, 4), (2, 5), (2, 3)}


class Recorder:
    """Wraps a score function of the blocked set and keeps every set it was asked about."""

    def __init__(self, fn):
        self.fn = fn
        self.calls: list[frozenset] = []

    def __call__(self, neurons: frozenset) -> float:
        self.calls.append(neurons)
        return self.fn(neurons)


def run(fn, acts=ACTS, means=MEANS, stds=STDS, config=SearchConfig()):
    recorder = Recorder(fn)
    return search_neurons(acts, means, stds, recorder, config), recorder


def test_defaults_are_nemos():
    config = SearchConfig()
    assert (config.threshold, config.theta_start, config.theta_step) == (0.428, 5.0, 0.25)
    assert (config.theta_min, config.k_start) == (1.0, 0)


def test_schedule_lowers_theta_and_raises_k_together_and_never_scores_theta_min():
    pairs = list(selection_schedule(SearchConfig(), max_layer_size=1280))
    assert pairs == [(5.0 - 0.25 * i, i) for i in range(16)]
    assert pairs[-1] == (1.25, 15)


def test_schedule_stops_when_top_k_covers_the_widest_layer():
    # NeMo's `k >= 1280` stop, for a UNet whose widest layer has 6 neurons.
    assert list(selection_schedule(SearchConfig(), max_layer_size=6)) == [
        (5.0, 0),
        (4.75, 1),
        (4.5, 2),
        (4.25, 3),
        (4.0, 4),
        (3.75, 5),
    ]


def test_outliers_add_top_k_by_raw_activation_not_by_z_score():
    acts = [np.array([1.0, 10.0, 3.0, 2.0])]
    means = [np.array([0.0, 9.5, 0.0, 0.0])]
    stds = [np.array([1.0, 1.0, 0.5, 1.0])]  # z = 1, 0.5, 6, 2
    # z > 1.5: channels 2 and 3; top-2 raw: channels 1 (10) and 2 (3), 2 already in.
    assert outlier_neurons(acts, means, stds, theta=1.5, k=2) == ((0, 2), (0, 3), (0, 1))
    # By z-score channel 1 would rank last; k beyond the layer takes every neuron once.
    assert sorted(outlier_neurons(acts, means, stds, theta=9.0, k=9)) == [(0, c) for c in range(4)]


def test_zero_std_makes_any_deviation_an_outlier():
    acts = [np.array([1.0, 2.0, 2.0])]
    means = [np.array([1.0, 1.0, 2.0])]
    stds = [np.array([0.0, 0.0, 0.0])]
    assert outlier_neurons(acts, means, stds, theta=5.0, k=0) == ((0, 1),)


def test_search_stops_at_the_first_pair_reaching_the_threshold_then_refines():
    def score(neurons):  # the prompt is memorized through neuron (2, 3) alone
        return 0.2 if (2, 3) in neurons else 0.9

    result, recorder = run(score)

    assert recorder.calls[:3] == [frozenset(), frozenset(STEP_1), frozenset(STEP_2)]
    assert (result.theta, result.k, result.success) == (4.5, 2, True)
    assert result.initial == frozenset(STEP_2)
    assert result.refined == {(2, 3)}
    assert (result.initial_score, result.refined_score) == (0.2, 0.2)
    assert result.trace == (
        SearchStep("initial", (5.0, 0), 0.9),
        SearchStep("initial", (4.75, 1), 0.9),
        SearchStep("initial", (4.5, 2), 0.2),
        SearchStep("layer", 2, 0.9),  # layers last first; layer 2 holds the culprit
        SearchStep("layer", 1, 0.2),
        SearchStep("layer", 0, 0.2),
        SearchStep("neuron", (2, 5), 0.2),  # NeMo's order: z-outliers, then top-k
        SearchStep("neuron", (2, 3), 0.9),
    )
    assert result.score_calls == len(recorder.calls) == 8


def test_layer_refinement_is_cumulative_and_neuron_refinement_greedy():
    def score(neurons):  # memorized through two neurons in different layers
        return {2: 0.1, 1: 0.6, 0: 0.9}[len(neurons & {(0, 1), (2, 3)})]

    result, recorder = run(score)

    assert result.initial == frozenset(STEP_2)
    assert result.refined == {(0, 1), (2, 3)}
    # Each candidate is the current set less one layer / neuron, earlier removals included.
    refinement = recorder.calls[3:]
    assert refinement == [
        frozenset(STEP_2 - {(2, 5), (2, 3)}),
        frozenset(STEP_2 - {(1, 2), (1, 4)}),  # layer 1 removed: kept out from here on
        frozenset(STEP_2 - {(1, 2), (1, 4), (0, 1), (0, 0)}),
        frozenset({(0, 1), (0, 0), (2, 3)}),  # neuron (2, 5) removed
        frozenset({(0, 1), (0, 0)}),
        frozenset({(0, 0), (2, 3)}),
        frozenset({(0, 1), (2, 3)}),  # neuron (0, 0) removed
    ]
    assert result.score_calls == 10


def test_the_threshold_itself_stops_the_selection_but_does_not_unblock():
    def score(neurons):
        return THRESHOLD if (2, 3) in neurons else 0.9

    result, _ = run(score)

    assert result.success and (result.theta, result.k) == (4.5, 2)
    # Refinement keeps a neuron unblocked only if the score stays strictly below.
    assert result.refined == result.initial == frozenset(STEP_2)
    assert result.refined_score == THRESHOLD


def test_layers_without_blocked_neurons_cost_no_call():
    acts = [a.copy() for a in ACTS]
    acts[2][5] = 5.5  # z > 5: selected at the first pair, alone

    def score(neurons):
        return 0.2 if (2, 5) in neurons else 0.9

    result, _ = run(score, acts=acts)

    assert result.initial == result.refined == {(2, 5)}
    assert (result.theta, result.k) == (5.0, 0)
    assert result.trace == (
        SearchStep("initial", (5.0, 0), 0.2),
        SearchStep("layer", 2, 0.9),
        SearchStep("neuron", (2, 5), 0.9),
    )


def test_nothing_suffices_tries_every_pair_and_flags_failure():
    rng = np.random.default_rng(0)
    acts = [rng.random(4), rng.random(20)]  # widest layer 20 > 16 steps: theta ends it
    means = [np.zeros(4), np.zeros(20)]
    stds = [np.ones(4), np.ones(20)]

    result, recorder = run(lambda neurons: 0.9, acts=acts, means=means, stds=stds)

    initial_pairs = [step.subject for step in result.trace if step.stage == "initial"]
    assert initial_pairs == [(5.0 - 0.25 * i, i) for i in range(16)]
    assert not result.success
    assert (result.theta, result.k) == (1.25, 15)
    # The last set scored: all 4 of layer 0, the top 15 of layer 1 (z = a < 1.25).
    assert result.initial == {(0, c) for c in range(4)} | {
        (1, int(c)) for c in np.argsort(-acts[1])[:15]
    }
    # Refinement runs against the score reached (NeMo); no removal gets strictly below it.
    assert result.refined == result.initial
    assert result.score_calls == len(recorder.calls) == 16 + 2 + 19


def test_failed_search_refines_against_the_score_it_reached():
    def score(neurons):  # (2, 3) helps but not enough; blocking (1, 2) makes things worse
        return (0.5 if (2, 3) in neurons else 0.7) + (0.1 if (1, 2) in neurons else 0.0)

    result, _ = run(score)

    assert not result.success and (result.theta, result.k) == (3.25, 7)  # k reached 8
    assert result.initial_score == pytest.approx(0.6)
    # Everything whose removal keeps the score below the 0.6 reached goes: layers 1 and 0,
    # then every neuron of layer 2 but the helpful one.
    assert result.refined == {(2, 3)}
    assert result.refined_score == 0.5


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_are_rejected(bad):
    with pytest.raises(ValueError, match="must be finite"):
        run(lambda neurons: bad)


def test_non_numeric_scores_are_rejected():
    with pytest.raises(TypeError, match="must return a float"):
        run(lambda neurons: "0.1")


def test_inputs_are_checked():
    with pytest.raises(ValueError, match="same layers"):
        search_neurons(ACTS, MEANS[:2], STDS, lambda n: 0.0)
    with pytest.raises(ValueError, match="layer 1"):
        search_neurons(ACTS, [MEANS[0], np.zeros(5), MEANS[2]], STDS, lambda n: 0.0)
    with pytest.raises(ValueError, match="negative"):
        search_neurons(ACTS, MEANS, [STDS[0], -STDS[1], STDS[2]], lambda n: 0.0)
    with pytest.raises(ValueError, match="theta_step"):
        SearchConfig(theta_step=0.0)
    with pytest.raises(ValueError, match="theta_start"):
        SearchConfig(theta_start=1.0)
