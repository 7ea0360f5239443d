"""End-to-end tests of the centralised driver on the 8x8 digits (a few seconds per run)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from cmd_fl import ParameterLayout
from simulations.centralised import (
    CentralisedConfig,
    CentralisedResult,
    cmd_model,
    main,
    run_experiment,
)

# Events at epochs 4..9 embed 20 % each until the 80 % cap stops them at epoch 7.
CONFIG = CentralisedConfig(
    dataset="digits",
    epochs=9,
    warmup=3,
    every=1,
    percent=20.0,
    modes=4,
    max_embedded=0.8,
    samples=300,
    train_subset=None,
    batch_size=32,
    lr=0.1,
    seed=0,
)
ROW_KEYS = {
    "epoch",
    "sgd_train_loss",
    "sgd_loss",
    "sgd_accuracy",
    "cmd_loss",
    "cmd_accuracy",
    "cmd_mean_residual",
    "embedded_train_loss",
    "embedded_loss",
    "embedded_accuracy",
    "embedded_fraction",
    "newly_embedded",
    "event",
}


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run faster (and alike) on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def experiment(one_thread: None) -> CentralisedResult:
    """Both runs of CONFIG, once for the module."""
    return run_experiment(CONFIG, verbose=False)


def test_json_document_structure(experiment: CentralisedResult) -> None:
    # Execute
    document = json.loads(json.dumps(experiment.to_json()))

    # Assert
    assert set(document) == {"config", "model", "rows", "final", "wall_s"}
    assert document["config"]["dataset"] == "digits"
    assert document["config"]["max_embedded"] == 0.8
    assert document["model"]["n_weights"] == 4538
    rows = document["rows"]
    assert [row["epoch"] for row in rows] == list(range(1, CONFIG.epochs + 1))
    for row in rows:
        assert set(row) == ROW_KEYS
        # The CMD model exists from the end of the warm-up (snapshot F) on.
        assert (row["cmd_accuracy"] is None) == (row["epoch"] < CONFIG.warmup)
    final = document["final"]
    assert final["sgd_accuracy"] == rows[-1]["sgd_accuracy"]
    assert final["cmd_accuracy"] == rows[-1]["cmd_accuracy"]
    assert final["embedded_fraction"] == rows[-1]["embedded_fraction"]
    np.testing.assert_allclose(
        final["mean_embedded_fraction"], np.mean([r["embedded_fraction"] for r in rows])
    )


def test_models_learn_well_above_chance(experiment: CentralisedResult) -> None:
    final = experiment.to_json()["final"]
    # Ten classes: chance is 0.1. All three models reach 90 % or so on this setting.
    assert final["sgd_accuracy"] > 0.7
    assert final["cmd_accuracy"] > 0.7
    assert final["embedded_accuracy"] > 0.7
    fit = experiment.sgd_fit
    assert fit.n_modes >= 2
    assert fit.residual is not None and fit.residual.mean() < 0.9


def test_embedded_fraction_follows_the_schedule(experiment: CentralisedResult) -> None:
    # Prepare
    schedule = CONFIG.schedule
    state = experiment.embedded.state
    assert state is not None
    n, m = state.n_weights, state.n_modes

    # Assert
    previous = 0
    for row in experiment.rows:
        expected = schedule.embedded_count(row["epoch"], n, m)
        assert row["embedded_fraction"] == expected / n
        assert row["newly_embedded"] == expected - previous
        assert row["event"] == schedule.is_event(row["epoch"])
        previous = expected
    assert state.n_embedded == schedule.cap_count(n, m)  # the cap stopped the last events
    assert experiment.rows[-1]["newly_embedded"] == 0


def test_final_embedded_weights_lie_on_the_cmd_model(experiment: CentralisedResult) -> None:
    # Prepare
    run = experiment.embedded
    state = run.state
    assert state is not None
    flat = run.layout.flatten_numpy(run.model.state_dict())
    emb = state.embedded_indices
    references = flat[state.references]

    # Execute: a * w_ref + b in float32, multiply then add, as the shared state defines it
    expected = state.frozen_a[emb] * references[state.modes[emb]] + state.frozen_b[emb]

    # Assert
    np.testing.assert_array_equal(flat[emb], expected)
    assert not np.isin(state.references, emb).any()
    # They moved with their references since they were frozen: not a constant snapshot.
    assert not np.array_equal(flat[emb], state.frozen_b[emb])


def test_runs_agree_until_the_first_event(experiment: CentralisedResult) -> None:
    first_event = CONFIG.warmup + CONFIG.every
    for row in experiment.rows:
        if row["epoch"] < first_event:
            # Same init, same batches, nothing embedded: the same model.
            assert row["embedded_accuracy"] == row["sgd_accuracy"]
            assert row["embedded_loss"] == row["sgd_loss"]
        if row["epoch"] <= first_event:
            assert row["embedded_train_loss"] == row["sgd_train_loss"]


def test_cmd_model_is_the_fit_of_the_current_references(experiment: CentralisedResult) -> None:
    # Prepare
    model, fit = experiment.sgd_model, experiment.sgd_fit
    layout = ParameterLayout.from_module(model)
    flat = layout.flatten_numpy(model.state_dict())

    # Execute
    twin = cmd_model(model, layout, fit)

    # Assert
    weights = layout.flatten_numpy(twin.state_dict())
    expected = fit.reconstruct(flat[fit.references]).astype(np.float32)
    np.testing.assert_array_equal(weights, expected)
    np.testing.assert_array_equal(weights[fit.references], flat[fit.references])
    np.testing.assert_array_equal(layout.flatten_numpy(model.state_dict()), flat)  # untouched


def test_main_writes_the_json(tmp_path: Path, one_thread: None) -> None:
    # Prepare
    out = tmp_path / "results.json"
    argv = ["--dataset", "digits", "--epochs", "4", "--warmup", "2", "--every", "1"]
    argv += ["--percent", "30", "--modes", "3", "--samples", "200", "--seed", "1"]
    argv += ["--train-subset", "600", "--quiet", "--out", str(out)]

    # Execute
    document = main(argv)

    # Assert
    assert json.loads(out.read_text()) == json.loads(json.dumps(document))
    assert document["config"]["train_subset"] == 600
    assert document["config"]["seed"] == 1
    assert [r["embedded_fraction"] for r in document["rows"]] == pytest.approx(
        [0.0, 0.0, 0.3, 0.6], abs=1e-3
    )
    assert document["run"]["argv"] == argv


def test_config_needs_epochs_beyond_the_warmup() -> None:
    with pytest.raises(ValueError, match="warm-up"):
        CentralisedConfig(epochs=5, warmup=5)
