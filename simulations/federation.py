"""How a run splits the training set: a server-side validation split and the client partitions.

Both apps call this with the same run config, so the server's validation examples are never in
any client's partition (and the test split is never used for decisions).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np

from simulations.data import ArrayDataset, load_dataset, partition_indices
from simulations.settings import RunSettings

logger = logging.getLogger("flwr.cmd_fl")

# The validation split never takes more than this share of the training set, so a default meant
# for Fashion-MNIST (1,000 of 60,000) does not take most of a small data set (digits: 1,437).
MAX_VALIDATION_FRACTION = 0.1


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
    held_out = min(validation_size, int(MAX_VALIDATION_FRACTION * labels.size))
    if held_out < validation_size:
        logger.warning(
            "validation-size %d is more than %d%% of the %d training examples of %r: "
            "the validation split holds %d",
            validation_size,
            round(100 * MAX_VALIDATION_FRACTION),
            labels.size,
            dataset,
            held_out,
        )
    validation = np.sort(order[:held_out])
    rest = order[held_out:]
    if 0 < train_subset < rest.size:
        rest = rest[:train_subset]
    pool = np.sort(rest)
    parts = partition_indices(labels[pool], num_partitions, partitioning, alpha, seed)
    return FederatedSplit(validation, tuple(pool[part] for part in parts))


def federated_split(settings: RunSettings, num_partitions: int | None = None) -> FederatedSplit:
    """The run's split (cached per process).

    The validation split is ``validation-size`` examples, at most ``MAX_VALIDATION_FRACTION`` of
    the training set. Raises ``ValueError`` when a partition would hold fewer examples than one
    batch, with the settings that would fix it.
    """
    split = _split(
        settings.dataset,
        settings.data_root,
        settings.validation_size,
        settings.train_subset,
        num_partitions or settings.num_partitions,
        settings.partitioning,
        settings.dirichlet_alpha,
        settings.seed,
    )
    sizes = [part.size for part in split.partitions]
    smallest = min(sizes)
    if smallest < settings.batch_size:
        raise ValueError(
            f"partition {sizes.index(smallest)} of {len(sizes)} would hold {smallest} training "
            f"examples, fewer than one batch (batch-size {settings.batch_size}) of "
            f"{settings.dataset!r}: use fewer partitions (num-partitions), a smaller batch-size, "
            f"a larger train-subset, a smaller validation-size, or a larger dirichlet-alpha"
        )
    return split


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
