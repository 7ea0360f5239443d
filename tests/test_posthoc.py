"""Post-hoc CMD: planted modes, references, fit, and bad input."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from cmd_fl import assign_and_fit, posthoc_cmd, sample_weights
from cmd_fl.posthoc import abs_correlation, cluster_modes
from tests.conftest import Planted, make_planted


def test_planted_partition_is_recovered(planted: Planted) -> None:
    fit = posthoc_cmd(planted.trajectories, n_modes=4, n_samples=500, seed=1)

    assert adjusted_rand_score(planted.modes, fit.modes) >= 0.95
    error = fit.reconstruct(planted.trajectories[fit.references]) - planted.trajectories
    # Noise level: the residual is no larger than the planted noise (plus the references' own).
    assert np.sqrt(np.mean(error**2)) < 1.5 * planted.noise


def test_references_fit_themselves_exactly(planted: Planted) -> None:
    fit = posthoc_cmd(planted.trajectories, n_modes=4)

    np.testing.assert_array_equal(fit.a[fit.references], 1.0)
    np.testing.assert_array_equal(fit.b[fit.references], 0.0)
    np.testing.assert_array_equal(fit.modes[fit.references], np.arange(fit.n_modes))


def test_modes_are_numbered_by_size(planted: Planted) -> None:
    fit = posthoc_cmd(planted.trajectories, n_modes=4)

    sizes = np.bincount(fit.modes, minlength=fit.n_modes)
    assert list(sizes) == sorted(sizes, reverse=True)


def test_fit_matches_closed_form_least_squares(planted: Planted) -> None:
    fit = posthoc_cmd(planted.trajectories, n_modes=4)

    for i in [0, 17, 999, 5999]:
        ref = planted.trajectories[fit.references[fit.modes[i]]]
        design = np.stack([ref, np.ones_like(ref)], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, planted.trajectories[i], rcond=None)
        np.testing.assert_allclose([fit.a[i], fit.b[i]], [a, b], rtol=1e-9, atol=1e-9)


def test_reconstruct_shapes_and_torch_input(planted: Planted) -> None:
    fit = posthoc_cmd(torch.from_numpy(planted.trajectories), n_modes=4)

    refs = planted.trajectories[fit.references]
    assert fit.reconstruct(refs).shape == planted.trajectories.shape
    np.testing.assert_allclose(fit.reconstruct(refs[:, 3]), fit.reconstruct(refs)[:, 3])
    with pytest.raises(ValueError, match="reference values"):
        fit.reconstruct(np.zeros(fit.n_modes + 1))


def test_constant_weights_go_to_mode_zero_and_keep_their_value() -> None:
    p = make_planted(n=500)
    traj = p.trajectories.copy()
    traj[10] = 0.25
    fit = posthoc_cmd(traj, n_modes=4)

    assert fit.modes[10] == 0
    assert fit.a[10] == pytest.approx(0.0)
    assert fit.b[10] == pytest.approx(0.25)


def test_constant_reference_gets_pseudo_inverse_solution() -> None:
    traj = np.zeros((3, 5))
    traj[1] = np.arange(5.0)
    fit = assign_and_fit(traj, np.array([0]))  # weight 0, the reference, is constant

    assert np.isfinite(fit.a).all()
    assert fit.a[1] == 0.0
    np.testing.assert_allclose(fit.b[1], 2.0)  # a = 0, b = mean


def test_sampling_is_layer_balanced_and_seeded() -> None:
    sizes = [10, 100_000, 50]
    sample = sample_weights(sum(sizes), 300, sizes, seed=3)

    assert sample.size == 300 and np.unique(sample).size == 300
    per_tensor = np.histogram(sample, bins=np.cumsum([0, *sizes]))[0]
    assert per_tensor[0] == 10  # capped at the tensor's size
    assert per_tensor[2] >= 50  # every tensor gets at least K / (2 * #tensors)
    np.testing.assert_array_equal(sample, sample_weights(sum(sizes), 300, sizes, seed=3))
    assert not np.array_equal(sample, sample_weights(sum(sizes), 300, sizes, seed=4))


def test_sampling_falls_back_to_uniform_with_many_tensors() -> None:
    sizes = [5] * 100
    sample = sample_weights(500, 20, sizes, seed=0)
    assert sample.size == 20 and np.unique(sample).size == 20


def test_abs_correlation_handles_constant_rows() -> None:
    rows = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [5.0, 5.0, 5.0]])
    corr = abs_correlation(rows)

    np.testing.assert_allclose(corr[0, 1], 1.0)
    assert corr[2].tolist() == [0.0, 0.0, 0.0]


def test_cluster_modes_cuts_to_at_most_m() -> None:
    corr = abs_correlation(make_planted(n=300).trajectories)
    labels = cluster_modes(corr, 2)
    assert set(labels.tolist()) <= {0, 1}


@pytest.mark.parametrize(
    ("trajectories", "kwargs", "message"),
    [
        (np.zeros(5), {"n_modes": 1}, "2-d"),
        (np.zeros((5, 1)), {"n_modes": 1}, "at least 2 snapshots"),
        (np.full((5, 3), np.nan), {"n_modes": 1}, "NaN"),
        (np.array([[0.0, np.inf], [1.0, 2.0]]), {"n_modes": 1}, "NaN or Inf"),
        (np.ones((20, 3)), {"n_modes": 11, "n_samples": 10}, "exceeds the number of sampled"),
        (np.ones((20, 3)), {"n_modes": 0}, "n_modes"),
        (np.ones((0, 3)), {"n_modes": 1}, "N = 0"),
    ],
)
def test_bad_input_raises_clear_errors(
    trajectories: np.ndarray, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        posthoc_cmd(trajectories, **kwargs)
