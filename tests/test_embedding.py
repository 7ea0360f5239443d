"""Embedded CMD: schedule arithmetic, the cap, the shared state and event selection."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cmd_fl import (
    CMDFit,
    EmbeddingSchedule,
    EmbeddingSelector,
    EmbeddingState,
    OnlineCMD,
    embedding_event,
    posthoc_cmd,
)
from tests.conftest import make_planted


@pytest.mark.parametrize("cap", [1.0, 0.8, 0.35])
def test_absolute_schedule_matches_formula(cap: float) -> None:
    n, m = 1000, 10
    schedule = EmbeddingSchedule(warmup=20, every=10, percent=10.0, max_fraction=cap)
    for step in range(0, 151):
        events = max(0, (step - 20) // 10)
        expected = min(events * math.ceil(0.1 * n), math.floor(cap * n), n - m)
        assert schedule.embedded_count(step, n, m) == expected
    # The paper's default: everything but the references is embedded from step 120 on.
    if cap == 1.0:
        assert schedule.embedded_count(119, n, m) == 900
        assert schedule.embedded_count(120, n, m) == n - m


def test_relative_schedule_compounds() -> None:
    schedule = EmbeddingSchedule(warmup=5, every=5, percent=50.0, relative=True, max_fraction=1.0)
    # 100 candidates: 50, then 25, then 13 (ceil of 12.5).
    assert [schedule.embedded_count(s, 104, 4) for s in (10, 15, 20)] == [50, 75, 88]


def test_events_happen_every_l_steps_after_warmup() -> None:
    schedule = EmbeddingSchedule(warmup=20, every=10)
    assert [t for t in range(60) if schedule.is_event(t)] == [30, 40, 50]


def test_bad_schedule_raises() -> None:
    with pytest.raises(ValueError, match="percent"):
        EmbeddingSchedule(percent=150)
    with pytest.raises(ValueError, match="every"):
        EmbeddingSchedule(every=0)
    with pytest.raises(ValueError, match="max_fraction"):
        EmbeddingSchedule(max_fraction=1.5)


def _run_events(schedule: EmbeddingSchedule, steps: int) -> tuple[EmbeddingState, list[float]]:
    p = make_planted(n=2000, t=steps + 1, noise=0.05, seed=4)
    online = OnlineCMD(n_modes=4, warmup=schedule.warmup, n_samples=300)
    state: EmbeddingState | None = None
    selector: EmbeddingSelector | None = None
    fractions = []
    for t in range(steps + 1):
        online.update(p.trajectories[:, t])
        if t == schedule.warmup:
            fit = online.fit
            state = EmbeddingState(fit.modes, fit.references)
            selector = EmbeddingSelector(schedule, fit)
        if state is not None and selector is not None and schedule.is_event(t):
            embedding_event(selector, online.fit, state)
        if state is not None:
            fractions.append(state.embedded_fraction)
    assert state is not None
    return state, fractions


def test_events_follow_schedule_and_never_embed_references() -> None:
    schedule = EmbeddingSchedule(warmup=5, every=2, percent=10.0, max_fraction=1.0)
    state, fractions = _run_events(schedule, steps=40)

    expected = [
        schedule.embedded_count(t, state.n_weights, state.n_modes) / state.n_weights
        for t in range(5, 41)
    ]
    np.testing.assert_allclose(fractions, expected)
    assert not state.embedded[state.references].any()
    assert state.n_embedded == state.n_weights - state.n_modes


def test_cap_is_never_exceeded() -> None:
    schedule = EmbeddingSchedule(warmup=5, every=1, percent=25.0, max_fraction=0.6)
    _, fractions = _run_events(schedule, steps=30)
    assert max(fractions) == pytest.approx(0.6)
    assert all(f <= 0.6 for f in fractions)


def test_selection_picks_the_most_stable_weights() -> None:
    p = make_planted(n=500, t=12)
    fit = posthoc_cmd(p.trajectories, n_modes=4)
    schedule = EmbeddingSchedule(warmup=11, every=1, percent=10.0)
    state = EmbeddingState(fit.modes, fit.references)
    selector = EmbeddingSelector(schedule, fit)
    moved = fit.a.copy()
    moved += np.linspace(0, 1, 500)  # weight i's coefficient moves by i / 499
    later = type(fit)(fit.modes, fit.references, moved, fit.b.copy())

    chosen = embedding_event(selector, later, state)

    free = np.setdiff1d(np.arange(500), fit.references)
    assert chosen.tolist() == free[:50].tolist()
    assert state.version == 2
    np.testing.assert_array_equal(state.frozen_a[chosen], moved[chosen].astype(np.float32))


def test_assemble_split_and_project_agree_bitwise() -> None:
    p = make_planted(n=300, t=8)
    fit = posthoc_cmd(p.trajectories, n_modes=3)
    state = EmbeddingState(fit.modes, fit.references)
    rng = np.random.default_rng(0)
    chosen = np.setdiff1d(rng.choice(300, 120, replace=False), fit.references)
    state.embed(chosen, fit.a[chosen], fit.b[chosen])
    weights = p.trajectories[:, -1].astype(np.float32)

    free, refs = state.split(weights)
    full = state.assemble(free, refs)
    projected = weights.copy()
    state.project(projected)

    assert free.size == 300 - chosen.size - state.n_modes
    np.testing.assert_array_equal(full, projected)
    expected = state.frozen_a[chosen] * refs[state.modes[chosen]] + state.frozen_b[chosen]
    np.testing.assert_array_equal(full[chosen], expected)
    np.testing.assert_array_equal(full[state.free_indices], weights[state.free_indices])


def test_state_rejects_bad_changes() -> None:
    state = EmbeddingState(np.array([0, 1, 0, 1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="never embedded"):
        state.embed(np.array([1]), np.ones(1), np.zeros(1))
    with pytest.raises(ValueError, match="finite"):
        state.embed(np.array([2]), np.array([np.nan]), np.zeros(1))
    with pytest.raises(ValueError, match="own mode"):
        EmbeddingState(np.array([1, 1, 0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="free vector"):
        state.assemble(np.zeros(5), np.zeros(2))
    state.embed(np.array([2]), np.array([2.0]), np.array([1.0]))
    state.release(np.array([2]))
    assert state.n_embedded == 0 and state.free_indices.tolist() == [2, 3]


def _fit_with(a: np.ndarray, b: np.ndarray, residual: np.ndarray) -> CMDFit:
    modes = np.zeros(a.size, dtype=np.int64)
    return CMDFit(modes, np.array([0]), a, b, residual)


def test_stability_plus_fit_prefers_well_fitted_weights() -> None:
    n = 1001
    rng = np.random.default_rng(0)
    start = _fit_with(np.ones(n), np.zeros(n), np.zeros(n))
    later = _fit_with(1 + rng.uniform(0, 1, n), np.zeros(n), rng.uniform(0, 1, n))
    later.a[0], later.residual[0] = 1.0, 0.0  # type: ignore[index]  # the reference
    schedule = EmbeddingSchedule(warmup=1, every=1, percent=40.0)

    def select(rule: str) -> np.ndarray:
        state = EmbeddingState(np.zeros(n, dtype=np.int64), np.array([0]))
        return EmbeddingSelector(schedule, start, rule=rule).select(later, state)

    paper, fit_aware = select("stability"), select("stability+fit")
    delta = later.a - 1.0
    assert later.residual is not None
    # The paper's rule takes the most stable weights whatever their fit ...
    assert delta[paper].max() < delta[fit_aware].max()
    assert later.residual[paper].mean() > 0.4
    # ... the fit-aware rule trades a little stability for much better fits.
    assert later.residual[fit_aware].mean() < 0.75 * later.residual[paper].mean()
    assert delta[fit_aware].mean() < 0.5


def test_bounds_keep_hypersensitive_and_badly_fitted_weights_free() -> None:
    n = 50
    a = np.ones(n)
    a[10:20] = 50.0  # hypersensitive to the reference
    residual = np.zeros(n)
    residual[20:30] = 0.8
    fit = _fit_with(a, np.zeros(n), residual)
    schedule = EmbeddingSchedule(warmup=1, every=1, percent=100.0, max_fraction=1.0)
    selector = EmbeddingSelector(schedule, fit, max_abs_a=10.0, max_residual=0.5)

    chosen = selector.select(fit, EmbeddingState(np.zeros(n, dtype=np.int64), np.array([0])))

    assert not set(chosen.tolist()) & set(range(10, 30))
    assert len(chosen) == n - 1 - 20


def test_reference_std_ratio_avoids_near_constant_references() -> None:
    rng = np.random.default_rng(0)
    base = np.cumsum(rng.normal(size=30))
    # One cluster: many members with healthy scale, and a near-constant copy that correlates best.
    members = [k * base + rng.normal(scale=0.5, size=30) for k in np.linspace(0.5, 2.0, 40)]
    tiny = 1e-4 * base
    traj = np.stack([tiny, *members])

    paper = posthoc_cmd(traj, n_modes=1, n_samples=41)
    safe = posthoc_cmd(traj, n_modes=1, n_samples=41, reference_std_ratio=0.25)

    assert paper.references.tolist() == [0]
    assert safe.references.tolist() != [0]
    assert np.abs(safe.a).max() < np.abs(paper.a).max() / 100
