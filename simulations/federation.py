"""How a run splits the training set: a server-side validation split and the client partitions.

Both apps call this with the same run config, so the server's validation examples are never in
any client's partition (and the test split is never used for decisions).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from simulations.data import ArrayDataset, load_dataset, partition_indices
from simulations.settings import RunSettings


@dataclass(frozen=True)
class FederatedSplit:
    """Training-set indices of the validation split and of every partition."""

    validation: np.ndarray
    partitions: tuple[np.ndarray, ...]


@functools.lru_cache(maxsize=4)
def _split(
    dataset: str,
    root: str,
    validation_size: int,
    train_subset: int,
    num_partitions: int,
    partitioning: str,
    alpha: float,
    seed: int,
) -> FederatedSplit:
    train_set, _ = load_dataset(dataset, root or None)
    labels = train_set.y.numpy()
    order = np.random.default_rng(seed).permutation(labels.size)
    if validation_size >= labels.size:
        raise ValueError(f"validation-size {validation_size} leaves no training data")
    validation = np.sort(order[:validation_size])
    rest = order[validation_size:]
    if 0 < train_subset < rest.size:
        rest = rest[:train_subset]
    pool = np.sort(rest)
    parts = partition_indices(labels[pool], num_partitions, partitioning, alpha, seed)
    return FederatedSplit(validation, tuple(pool[part] for part in parts))


def federated_split(settings: RunSettings, num_partitions: int | None = None) -> FederatedSplit:
    """The run's split (cached per process)."""
    return _split(
        settings.dataset,
        settings.data_root,
        settings.validation_size,
        settings.train_subset,
        num_partitions or settings.num_partitions,
        settings.partitioning,
        settings.dirichlet_alpha,
        settings.seed,
    )


def client_dataset(settings: RunSettings, partition_id: int, num_partitions: int) -> ArrayDataset:
    """A node's training data."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    train_set, _ = load_dataset(settings.dataset, settings.data_root or None)
    return train_set.subset(federated_split(settings, num_partitions).partitions[partition_id])


def validation_dataset(settings: RunSettings) -> ArrayDataset:
    """The server's validation split (empty when validation-size is 0)."""
    train_set, _ = load_dataset(settings.dataset, settings.data_root or None)
    return train_set.subset(federated_split(settings).validation)
