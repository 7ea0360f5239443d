"""How a run splits the training set: validation split, partitions, and the defaults on every
built-in data set."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from simulations.federation import MAX_VALIDATION_FRACTION, federated_split
from simulations.settings import RunSettings
from tests.test_flower_apps import simulate

DIGITS_TRAIN_SIZE = 1437


def test_validation_split_is_capped_at_a_share_of_a_small_data_set(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = RunSettings(dataset="digits", num_partitions=4)  # validation-size 1000 by default
    with caplog.at_level(logging.WARNING, logger="flwr.cmd_fl"):
        split = federated_split(settings)

    held_out = int(MAX_VALIDATION_FRACTION * DIGITS_TRAIN_SIZE)
    assert split.validation.size == held_out
    assert sum(part.size for part in split.partitions) == DIGITS_TRAIN_SIZE - held_out
    every = np.concatenate([split.validation, *split.partitions])
    assert np.unique(every).size == every.size  # disjoint
    assert any("validation-size 1000" in r.getMessage() for r in caplog.records)


def test_a_validation_size_within_the_cap_is_kept_exactly() -> None:
    split = federated_split(RunSettings(dataset="digits", num_partitions=4, validation_size=100))
    assert split.validation.size == 100


@pytest.mark.parametrize(
    "overrides",
    [
        {"num_partitions": 100, "batch_size": 32},  # 12 or 13 examples each
        {"num_partitions": 4, "batch_size": 400},
    ],
)
def test_a_partition_smaller_than_a_batch_is_refused_with_the_fix(overrides: dict) -> None:
    settings = RunSettings(dataset="digits", **overrides)
    with pytest.raises(ValueError, match=r"fewer than one batch.*num-partitions.*batch-size"):
        federated_split(settings)


def test_fedavg_learns_digits_with_the_default_settings(tmp_path: Path) -> None:
    # The run, which reached 0.12 before: every key but these at its default.
    outcome, _ = simulate(
        tmp_path,
        base={},
        strategy="fedavg",
        dataset="digits",
        num_partitions=4,
        num_server_rounds=8,
        seed=2,
    )
    accuracies = [row["accuracy"] for row in outcome.summary["rounds"]]
    assert outcome.summary["final_accuracy"] > 0.8, accuracies
    assert outcome.summary["rejected_replies"]["total"] == 0
