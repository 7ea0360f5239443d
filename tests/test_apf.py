"""The APF freezing math (cmd_fl.apf): EMAs, AIMD freeze lengths, threshold halving, random
freezing."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from cmd_fl.apf import AdaptiveFreezing

# A round's change d = before - after of each parameter, as a function of (round, index).
Change = Callable[[int, int], float]


def run_rounds(
    freezing: AdaptiveFreezing, rounds: int, change: Change
) -> tuple[list[list[int]], list[list[int]]]:
    """Drive ``freezing`` for ``rounds`` rounds; return each parameter's active rounds and its
    freeze length after each of them. Every active parameter changes by ``change(r, i)``."""
    n = freezing.n_weights
    active_rounds: list[list[int]] = [[] for _ in range(n)]
    lengths: list[list[int]] = [[] for _ in range(n)]
    value = np.zeros(n)
    for r in range(1, rounds + 1):
        active = freezing.active_mask(r)
        after = value.copy()
        for i in np.flatnonzero(active):
            after[i] = value[i] - change(r, int(i))
        freezing.update(r, value, after)
        for i in np.flatnonzero(active):
            active_rounds[i].append(r)
            lengths[i].append(int(freezing.freeze_length[i]))
        value = after
    return active_rounds, lengths


def reference_apf(
    changes: np.ndarray, alpha: float, threshold: float
) -> tuple[np.ndarray, list[float]]:
    """APF written plainly, one scalar at a time: the active mask of every round and T."""
    rounds, n = changes.shape
    m, a = [0.0] * n, [0.0] * n
    length, next_round = [0] * n, [1] * n
    masks = np.zeros((rounds, n), dtype=bool)
    thresholds = []
    for r in range(1, rounds + 1):
        for i in range(n):
            if next_round[i] != r:
                continue
            masks[r - 1, i] = True
            d = float(changes[r - 1, i])
            m[i] = alpha * m[i] + (1 - alpha) * d
            a[i] = alpha * a[i] + (1 - alpha) * abs(d)
            stable = a[i] > 0 and abs(m[i]) / a[i] < threshold
            length[i] = length[i] + 1 if stable else length[i] // 2
            next_round[i] = r + length[i] + 1
        if sum(nr > r + 1 for nr in next_round) / n > 0.8:
            threshold /= 2
        thresholds.append(threshold)
    return masks, thresholds


def test_always_stable_parameter_is_active_in_rounds_1_3_6_10_15_21() -> None:
    # Prepare: T0 = 2 > |m|/a (at most 1), so any parameter that moves is stable; nine
    # parameters that never move (a = 0: unstable) keep the frozen share at 10 % (T never halves).
    freezing = AdaptiveFreezing(10, alpha=0.99, threshold=2.0)

    # Execute
    active, lengths = run_rounds(freezing, 25, lambda r, i: 0.1 if i == 0 else 0.0)

    # Assert: additive increase, one more frozen round each time.
    assert active[0] == [1, 3, 6, 10, 15, 21]
    assert lengths[0] == [1, 2, 3, 4, 5, 6]
    for i in range(1, 10):
        assert active[i] == list(range(1, 26))  # a = 0 counts as unstable
        assert lengths[i] == [0] * 25
    assert freezing.threshold == 2.0


def test_parameter_that_drifts_never_freezes() -> None:
    # Prepare: defaults; a parameter moving the same way every round has |m| / a = 1 >= T.
    freezing = AdaptiveFreezing(3)

    # Execute
    active, lengths = run_rounds(freezing, 20, lambda r, i: 0.01 * (i + 1))

    # Assert
    assert all(rounds == list(range(1, 21)) for rounds in active)
    assert all(length == [0] * 20 for length in lengths)
    assert freezing.frozen_fraction(21) == 0.0


def test_oscillating_parameter_freezes_and_its_length_halves_when_it_starts_drifting() -> None:
    # Prepare: a short-memory EMA (alpha = 0.5, T = 0.5). Parameter 0 alternates signs from one
    # active round to the next (|m| / a settles between 1/3 and 3/7 < T: stable) until round 20,
    # then drifts (|m| / a near 1: unstable). Nine still parameters keep the frozen share low.
    freezing = AdaptiveFreezing(10, alpha=0.5, threshold=0.5)
    n_changes = [0]

    def change(r: int, i: int) -> float:
        if i != 0:
            return 0.0
        n_changes[0] += 1
        return 1.0 if r >= 20 else 0.05 * (-1) ** (n_changes[0] + 1)

    # Execute
    active, lengths = run_rounds(freezing, 40, change)

    # Assert: unstable once (a fresh EMA has |m| / a = 1), then one more frozen round per active
    # round; drifting, the length halves (2, 1, 0) and the parameter is active every round again.
    assert active[0] == [1, 2, 4, 7, 11, 16, 22, 25, 27, *range(28, 41)]
    assert lengths[0] == [0, 1, 2, 3, 4, 5, 2, 1, 0, *[0] * 13]
    assert freezing.threshold == 0.5


def test_matches_a_plain_scalar_implementation() -> None:
    # Prepare: random signed changes with a drift, so parameters freeze, thaw and T halves.
    rng = np.random.default_rng(3)
    n, rounds = 50, 60
    changes = rng.normal(size=(rounds, n)) * 0.1 + np.linspace(0, 0.05, n)
    expected_masks, expected_thresholds = reference_apf(changes, alpha=0.8, threshold=0.5)
    freezing = AdaptiveFreezing(n, alpha=0.8, threshold=0.5)

    # Execute
    value = np.zeros(n)
    for r in range(1, rounds + 1):
        mask = freezing.active_mask(r)
        np.testing.assert_array_equal(mask, expected_masks[r - 1], err_msg=f"round {r}")
        after = np.where(mask, value - changes[r - 1], value)
        freezing.update(r, value, after)
        value = after
        # Assert
        assert freezing.threshold == expected_thresholds[r - 1]
    assert expected_masks.sum() < 0.8 * expected_masks.size  # it froze something
    assert expected_thresholds[-1] < 0.5  # and halved T


def test_frozen_rounds_are_skipped_not_fed_as_zeros() -> None:
    # Prepare
    freezing = AdaptiveFreezing(10, alpha=0.9, threshold=2.0)
    before = np.zeros(10)
    after = np.full(10, -1.0)
    after[1:] = 0.0

    # Execute: parameter 0 is frozen in round 2; its value moving then must not count.
    freezing.update(1, before, after)
    m, a = freezing.m[0], freezing.a[0]
    freezing.update(2, after, after - 5.0)

    # Assert
    assert not freezing.active_mask(2)[0]
    assert (freezing.m[0], freezing.a[0]) == (m, a)
    np.testing.assert_allclose([m, a], [0.1, 0.1])


@pytest.mark.parametrize(("n_stable", "halves"), [(9, True), (8, False)])
def test_threshold_halves_when_more_than_80_percent_are_frozen(n_stable: int, halves: bool) -> None:
    # Prepare: with T0 = 2, every parameter that moved is stable and frozen for round 2.
    freezing = AdaptiveFreezing(10, threshold=2.0)
    after = np.zeros(10)
    after[:n_stable] = -0.1

    # Execute
    freezing.update(1, np.zeros(10), after)

    # Assert: 90 % frozen halves T; exactly 80 % does not (the rule is "more than").
    assert freezing.frozen_fraction(2) == n_stable / 10
    assert freezing.threshold == (1.0 if halves else 2.0)


def test_threshold_halves_on_consecutive_rounds_and_never_rises() -> None:
    # Prepare: T0 = 8; random freezing with probability 1 keeps everything frozen.
    freezing = AdaptiveFreezing(5, threshold=8.0, random_freeze=True, freeze_probability=1.0)

    # Execute / Assert
    thresholds = []
    for r in range(1, 5):
        freezing.update(r, np.zeros(5), np.zeros(5))
        thresholds.append(freezing.threshold)
    assert thresholds == [4.0, 2.0, 1.0, 0.5]


def test_random_freezing_is_seeded_and_adds_one_round_with_probability_half() -> None:
    # Prepare: drifting parameters (never stable): without random freezing all stay active.
    def schedule(seed: int) -> np.ndarray:
        freezing = AdaptiveFreezing(4000, random_freeze=True, seed=seed, halve_above=1.0)
        value = np.zeros(4000)
        for r in range(1, 4):
            after = np.where(freezing.active_mask(r), value - 0.1, value)
            freezing.update(r, value, after)
            value = after
        return freezing.next_active.copy()

    # Execute
    first, again, other = schedule(7), schedule(7), schedule(8)

    # Assert
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    after_one = AdaptiveFreezing(4000, random_freeze=True, seed=7)
    after_one.update(1, np.zeros(4000), np.full(4000, -0.1))
    delayed = float(np.mean(after_one.next_active == 3))  # else active again in round 2
    assert set(np.unique(after_one.next_active)) == {2, 3}
    assert delayed == pytest.approx(0.5, abs=0.03)


def test_zero_change_is_unstable_and_rounds_must_increase() -> None:
    # Prepare
    freezing = AdaptiveFreezing(3, threshold=2.0)

    # Execute
    stable = freezing.update(1, np.zeros(3), np.zeros(3))

    # Assert: a = 0 counts as unstable, whatever T.
    assert not stable.any()
    assert freezing.active_mask(2).all()
    with pytest.raises(ValueError, match="comes after"):
        freezing.update(1, np.zeros(3), np.zeros(3))
    with pytest.raises(ValueError, match="expected 3 values"):
        freezing.update(2, np.zeros(2), np.zeros(2))


def test_a_round_without_update_leaves_its_active_parameters_active() -> None:
    # Prepare: parameter 0 frozen for round 2, due again in round 3.
    freezing = AdaptiveFreezing(10, threshold=2.0)
    after = np.zeros(10)
    after[0] = -1.0
    freezing.update(1, np.zeros(10), after)
    assert freezing.active_indices(2).tolist() == list(range(1, 10))

    # Execute: round 2 is never updated (no valid replies).
    active_3 = freezing.active_indices(3)

    # Assert
    assert active_3.tolist() == list(range(10))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_weights": -1},
        {"n_weights": 3, "alpha": 1.0},
        {"n_weights": 3, "threshold": 0.0},
        {"n_weights": 3, "freeze_probability": 1.5},
    ],
)
def test_invalid_settings_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AdaptiveFreezing(**kwargs)  # type: ignore[arg-type]


def test_empty_model() -> None:
    freezing = AdaptiveFreezing(0)
    freezing.update(1, np.zeros(0), np.zeros(0))
    assert freezing.frozen_fraction(2) == 0.0
    assert freezing.active_indices(2).size == 0
