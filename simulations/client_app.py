"""The Flower ClientApp: a partition of the data set, the task's model, under CMD or FedAvg."""

from __future__ import annotations

import functools

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.cmd_client import CMDClient, OptimizerHook, Projection
from simulations.data import ArrayDataset, load_dataset, partition_indices
from simulations.settings import RunSettings
from simulations.task import build_model, train

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _partitions(
    dataset: str,
    root: str,
    train_subset: int,
    num_partitions: int,
    partitioning: str,
    alpha: float,
    seed: int,
) -> tuple[np.ndarray, ...]:
    """Training-set indices of every partition (a seeded subset first, if asked)."""
    train_set, _ = load_dataset(dataset, root or None)
    labels = train_set.y.numpy()
    pool = np.arange(labels.size)
    if 0 < train_subset < labels.size:
        pool = np.sort(np.random.default_rng(seed).permutation(labels.size)[:train_subset])
    parts = partition_indices(labels[pool], num_partitions, partitioning, alpha, seed)
    return tuple(pool[part] for part in parts)


def client_dataset(settings: RunSettings, partition_id: int, num_partitions: int) -> ArrayDataset:
    """This node's training data."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    parts = _partitions(
        settings.dataset,
        settings.data_root,
        settings.train_subset,
        num_partitions,
        settings.partitioning,
        settings.dirichlet_alpha,
        settings.seed,
    )
    train_set, _ = load_dataset(settings.dataset, settings.data_root or None)
    return train_set.subset(parts[partition_id])


def _node_partition(context: Context, settings: RunSettings) -> tuple[int, int]:
    config = context.node_config
    if "partition-id" not in config:
        raise ValueError("node config lacks 'partition-id' (set it with --node-config)")
    num = int(str(config.get("num-partitions", settings.num_partitions)))
    return int(str(config["partition-id"])), num


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train this node's model on its partition, under CMD when the server runs it."""
    settings = RunSettings.from_run_config(dict(context.run_config))
    partition_id, num_partitions = _node_partition(context, settings)
    data = client_dataset(settings, partition_id, num_partitions)
    server_round = int(str(msg.content.config_records["config"]["server-round"]))
    torch.set_num_threads(1)  # one simulated client per CPU core

    def train_fn(model: torch.nn.Module, hook: OptimizerHook | None) -> dict[str, float]:
        result = train(
            model,
            data,
            epochs=settings.local_epochs,
            batch_size=settings.batch_size,
            lr=settings.learning_rate,
            seed=settings.seed * 1_000_003 + server_round * 1009 + partition_id,
            momentum=settings.momentum,
            optimizer_hook=hook,
        )
        return {"num-examples": int(result["num_examples"]), "train-loss": float(result["loss"])}

    model = build_model(settings.dataset)
    projection: Projection = "round" if settings.cmd_projection == "round" else "step"
    client = CMDClient(model, train_fn, projection=projection)
    return client.train(msg, context)
