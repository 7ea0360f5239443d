"""Online CMD equals post-hoc CMD on the same snapshots, step by step."""

from __future__ import annotations

import numpy as np
import pytest

from cmd_fl import OnlineCMD, assign_and_fit, posthoc_cmd
from tests.conftest import make_planted


def test_online_equals_batch_fit_after_every_update() -> None:
    p = make_planted(n=3000, t=40, noise=0.05, seed=2)
    # Realistic scale: weights near 0.1 with small moves stress conditioning.
    traj = (0.1 + 0.01 * p.trajectories).astype(np.float32)
    online = OnlineCMD(n_modes=4, warmup=10, n_samples=400, seed=0)

    for t in range(traj.shape[1]):
        online.update(traj[:, t])
        if t < 10:
            assert not online.ready
            continue
        fit = online.fit
        batch = assign_and_fit(traj[:, : t + 1].astype(np.float64), fit.references, fit.modes)
        scale_a = np.abs(batch.a).max()
        scale_b = np.abs(batch.b).max()
        np.testing.assert_allclose(fit.a, batch.a, rtol=1e-9, atol=1e-9 * scale_a)
        np.testing.assert_allclose(fit.b, batch.b, rtol=1e-9, atol=1e-9 * scale_b)
        assert batch.residual is not None and fit.residual is not None
        np.testing.assert_allclose(fit.residual, batch.residual, atol=1e-6)


def test_warmup_fit_is_the_posthoc_fit() -> None:
    p = make_planted(n=800, t=12)
    online = OnlineCMD(n_modes=4, warmup=11, n_samples=300, seed=5)
    for t in range(12):
        online.update(p.trajectories[:, t])
    posthoc = posthoc_cmd(p.trajectories, n_modes=4, n_samples=300, seed=5)

    np.testing.assert_array_equal(online.fit.modes, posthoc.modes)
    np.testing.assert_array_equal(online.fit.references, posthoc.references)
    np.testing.assert_allclose(online.fit.a, posthoc.a, rtol=1e-9, atol=1e-12)


def test_online_state_is_o_n_and_keeps_no_trajectory() -> None:
    n = 5000
    p = make_planted(n=n, t=30)
    online = OnlineCMD(n_modes=4, warmup=5)
    for t in range(30):
        online.update(p.trajectories[:, t])

    per_weight = online.state_bytes() / n
    assert per_weight <= 30  # 29 bytes per weight plus the per-mode history
    assert len(online.reference_history) == 30


def test_online_rejects_bad_snapshots() -> None:
    online = OnlineCMD(n_modes=2, warmup=2)
    with pytest.raises(RuntimeError, match="warming up"):
        _ = online.fit
    online.update(np.zeros(10, dtype=np.float32))
    with pytest.raises(ValueError, match="expected 10"):
        online.update(np.zeros(11, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        online.update(np.full(10, np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="flat"):
        online.update(np.zeros((2, 5), dtype=np.float32))
    with pytest.raises(ValueError, match="warmup"):
        OnlineCMD(n_modes=2, warmup=0)
