"""Sampling by data: the same seed trains the same partitions whatever ids the nodes got."""

from __future__ import annotations

import dataclasses
import logging
import random
import zlib
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, MetricRecord, RecordDict

from cmd_fl.layout import ParameterLayout
from cmd_fl.ledger import ByteLedger
from cmd_fl.payload import DATA_KEY
from simulations.client_app import app as client_app
from simulations.server_app import make_strategy, run
from simulations.settings import RunSettings
from simulations.task import build_model
from strategies.sampling import NodeSampler, data_key_answer, data_key_query
from tests.inprocess_grid import InProcessGrid

NODES = 40
ROUNDS = 6


def settings(strategy: str, sample_by: str, fraction: float = 0.1) -> RunSettings:
    return RunSettings(
        strategy=strategy,
        dataset="digits",
        num_partitions=NODES,
        fraction_train=fraction,
        min_train_nodes=1,
        min_available_nodes=NODES,
        sample_by=sample_by,
    )


def drawn_partitions(
    run: RunSettings, node_ids: list[int], ledger: ByteLedger | None = None
) -> list[list[int]]:
    """The partitions each round trains, as the ServerApp's strategy samples them."""
    ledger = ByteLedger() if ledger is None else ledger
    strategy = make_strategy(run, ParameterLayout.from_module(build_model(run.dataset)), ledger)
    grid = InProcessGrid(client_app, NODES, run.to_run_config(), node_ids=node_ids)
    partition = {node: i for i, node in enumerate(node_ids)}
    drawn = []
    for server_round in range(1, ROUNDS + 1):
        # Flower's transfers draw from the global RNG as often as timing wants (retry jitter).
        for _ in range(random.randrange(5)):
            random.random()
        nodes = strategy.sample_train_nodes(grid, server_round)
        drawn.append(sorted(partition[node] for node in nodes))
    return drawn


def shuffled_ids(seed: int) -> list[int]:
    return random.Random(seed).sample(range(1, 2**40), NODES)


def test_fedavg_and_cmd_train_the_same_partitions_whatever_the_node_ids() -> None:
    # Prepare: two starts of the same federation, with new random node ids each (as a SuperLink)
    first, second = shuffled_ids(1), shuffled_ids(2)

    # Execute
    fedavg = drawn_partitions(settings("fedavg", "data"), first)
    cmd = drawn_partitions(settings("cmd", "data"), second)
    by_node_id = drawn_partitions(settings("cmd", "node-id"), second)

    # Assert: paired by data; Flower's draw over node ids is not
    assert fedavg == cmd
    assert all(len(p) == NODES // 10 for p in fedavg)
    assert len({tuple(p) for p in fedavg}) > 1  # still a new draw every round
    assert by_node_id != fedavg


def test_each_node_is_asked_once_and_the_query_is_metered() -> None:
    # Prepare
    ledger = ByteLedger()

    # Execute
    drawn_partitions(settings("fedavg", "data"), shuffled_ids(3), ledger)

    # Assert: one query and one answer per node, in round 1 only, in the totals
    rows = [row for row in ledger if row.phase == "query"]
    assert sorted(r.direction for r in rows) == ["down"] * NODES + ["up"] * NODES
    assert {r.round for r in rows} == {1} and {r.kind for r in rows} == {DATA_KEY}
    assert len({r.node_id for r in rows}) == NODES
    assert all(r.wire_bytes > 0 and r.control_bytes > 0 for r in rows)
    query = ledger.totals(phase="query")
    assert 0 < query["bytes_up"] + query["bytes_down"] <= ledger.total_bytes()


def test_a_round_that_takes_every_node_asks_nothing() -> None:
    ledger = ByteLedger()
    drawn_partitions(settings("cmd", "data", fraction=1.0), shuffled_ids(4), ledger)
    assert len(ledger) == 0


def test_nodes_without_a_valid_key_are_drawn_last_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Prepare: node 0 answers garbage, node 1 fails, the others answer
    run = settings("fedavg", "data")
    ids = shuffled_ids(5)

    def tamper(node: int, server_round: int, reply: Message) -> Message:
        if node != ids[0]:
            return reply
        return Message(RecordDict({DATA_KEY: MetricRecord({DATA_KEY: -3})}), reply_to=reply)

    grid = InProcessGrid(
        client_app,
        NODES,
        run.to_run_config(),
        node_ids=ids,
        tamper=tamper,
        failure=lambda node, server_round: node == ids[1],
    )
    sampler = NodeSampler(ByteLedger(), "data")

    # Execute
    with caplog.at_level(logging.WARNING, logger="flwr.cmd_fl"):
        order = sampler.data_order(grid, 1, list(reversed(ids)))

    # Assert
    assert order[:-2] == ids[2:]  # by partition
    assert order[-2:] == sorted(ids[:2])  # no key: after the others, by node id
    assert sampler.data_keys[ids[0]] is None and sampler.data_keys[ids[1]] is None
    assert "2 of 40 nodes gave no data key" in caplog.text


def test_the_client_answers_its_partition_or_the_checksum_of_its_data_path() -> None:
    def ask(node_config: dict[str, bool | float | int | str]) -> int | None:
        context = Context(1, 7, node_config, RecordDict(), {})
        query = data_key_query(3, 7)
        query.metadata.__dict__["_message_id"] = "q"
        return data_key_answer(client_app(query, context))

    assert ask({"partition-id": 17, "num-partitions": 40}) == 17
    assert ask({"data-path": "/data/node.npz"}) == zlib.crc32(b"/data/node.npz")


@pytest.mark.parametrize("value", [-1, 2**32, 1.5, "7", True])
def test_a_malformed_answer_gives_no_key(value: object) -> None:
    query = data_key_query(1, 5)
    query.metadata.__dict__["_message_id"] = "q"
    record = MetricRecord({DATA_KEY: 0})
    record.__dict__["_data"] = {DATA_KEY: value}  # past MetricRecord's own type checks
    reply = Message(RecordDict({DATA_KEY: record}), reply_to=query)
    assert data_key_answer(reply) is None


def test_sample_by_is_validated() -> None:
    with pytest.raises(ValueError, match="sample-by must be one of"):
        RunSettings(sample_by="random")
    with pytest.raises(ValueError, match="sample_by must be one of"):
        NodeSampler(ByteLedger(), "partition")


def test_the_grid_carries_one_answered_query_per_node() -> None:
    run = settings("fedavg", "data")
    grid = InProcessGrid(client_app, NODES, run.to_run_config(), node_ids=shuffled_ids(6))
    strategy = make_strategy(
        run, ParameterLayout.from_module(build_model(run.dataset)), ByteLedger()
    )
    for server_round in (1, 2, 3):
        strategy.sample_train_nodes(grid, server_round)
    assert sorted(q.node_id for q in grid.queries) == sorted(grid.node_ids)
    assert all(data_key_answer(q.reply) is not None for q in grid.queries)


def test_fedavg_and_cmd_warm_up_runs_are_the_same_run_on_reshuffled_node_ids(
    tmp_path: Path,
) -> None:
    # Prepare: CMD's first rounds are FedAvg (warm-up); node ids differ between the two starts
    def simulate(strategy: str, ids_seed: int) -> list[dict[str, Any]]:
        config = dataclasses.replace(
            settings(strategy, "data"),
            num_server_rounds=4,
            cmd_warmup=5,
            checkpoint_every=0,
            results_dir=str(tmp_path),
            run_name=strategy,
        )
        grid = InProcessGrid(
            client_app, NODES, config.to_run_config(), node_ids=shuffled_ids(ids_seed)
        )
        return list(run(grid, config).summary["rounds"])

    # Execute
    fedavg, cmd = simulate("fedavg", 7), simulate("cmd", 8)

    # Assert: the same data trained, so the same models, round by round
    assert [r["trained_data_keys"] for r in fedavg] == [r["trained_data_keys"] for r in cmd]
    assert all(len(r["trained_data_keys"]) == NODES // 10 for r in fedavg)
    assert [r["accuracy"] for r in fedavg] == [r["accuracy"] for r in cmd]
