"""The Flower ClientApp: a partition of the data set, the task's model, under CMD or FedAvg."""

from __future__ import annotations

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.apf_client import APFClient
from clients.cmd_client import CMDClient, OptimizerHook, Projection
from cmd_fl.payload import APF_MODEL, ASK, CONFIG, DATA_KEY
from simulations.node_data import node_data_key, node_dataset
from simulations.settings import RunSettings
from simulations.task import build_model, evaluate, train

app = ClientApp()


@app.train()
def train_handler(msg: Message, context: Context) -> Message:
    """Train this node's model on its data, under CMD when the server runs it."""
    settings = RunSettings.from_run_config(dict(context.run_config))
    # The node's own data (--node-config data-path=...) or its partition of a built-in set.
    data, data_seed = node_dataset(settings, context.node_config)
    server_round = int(str(msg.content.config_records["config"]["server-round"]))
    torch.set_num_threads(1)  # one simulated client per CPU core

    def train_fn(model: torch.nn.Module, hook: OptimizerHook | None) -> dict[str, float]:
        result = train(
            model,
            data,
            epochs=settings.local_epochs,
            batch_size=settings.batch_size,
            lr=settings.learning_rate,
            seed=settings.seed * 1_000_003 + server_round * 1009 + data_seed,
            momentum=settings.momentum,
            optimizer_hook=hook,
        )
        return {"num-examples": int(result["num_examples"]), "train-loss": float(result["loss"])}

    model = build_model(settings.dataset)
    if APF_MODEL in msg.content.array_records:
        return APFClient(model, train_fn).train(msg, context)
    projection: Projection = "round" if settings.cmd_projection == "round" else "step"
    client = CMDClient(
        model, train_fn, projection=projection, reference_gradient=settings.cmd_reference_gradient
    )
    return client.train(msg, context)


@app.evaluate()
def evaluate_handler(msg: Message, context: Context) -> Message:
    """Evaluate the global model on this node's data (only when ``fraction-evaluate > 0``)."""
    settings = RunSettings.from_run_config(dict(context.run_config))
    data, _ = node_dataset(settings, context.node_config)
    torch.set_num_threads(1)

    def evaluate_fn(model: torch.nn.Module) -> dict[str, float]:
        result = evaluate(model, data)
        return {
            "num-examples": int(result["num_examples"]),
            "accuracy": float(result["accuracy"]),
            "loss": float(result["loss"]),
        }

    def no_training(model: torch.nn.Module, hook: OptimizerHook | None) -> dict[str, float]:
        raise RuntimeError("an evaluation handler does not train")

    # Dense messages (FedAvg, APF, CMD's warm-up) and CMD's compact ones alike.
    return CMDClient(build_model(settings.dataset), no_training).evaluate(msg, evaluate_fn, context)


@app.query()
def query_handler(msg: Message, context: Context) -> Message:
    """Answer the server's one question: which data this node trains on (``sample-by=data``)."""
    asked = msg.content.config_records[CONFIG].get(ASK) if CONFIG in msg.content else None
    if asked != DATA_KEY:
        raise ValueError(f"unknown query {asked!r}: this ClientApp answers {ASK}={DATA_KEY!r}")
    key = node_data_key(context.node_config)
    return Message(RecordDict({DATA_KEY: MetricRecord({DATA_KEY: key})}), reply_to=msg)
