"""Shared fixtures: planted CMD trajectories."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest


@dataclass
class Planted:
    trajectories: np.ndarray  # (N, T)
    modes: np.ndarray  # (N,) the planted partition
    references: np.ndarray  # (M, T) the planted reference trajectories
    noise: float


def make_planted(
    n: int = 6000, t: int = 30, m: int = 4, noise: float = 0.01, seed: int = 0
) -> Planted:
    """Members are affine functions of M mutually uncorrelated reference trajectories plus noise."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.normal(size=(t, m)))
    references = basis.T * 5.0 + rng.normal(size=(m, 1))
    modes = rng.integers(0, m, n)
    a = rng.normal(size=n)
    b = rng.normal(size=n)
    traj = a[:, None] * references[modes] + b[:, None] + noise * rng.normal(size=(n, t))
    return Planted(traj, modes, references, noise)


@pytest.fixture
def planted() -> Planted:
    return make_planted()
