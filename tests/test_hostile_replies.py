"""Property-based: no malformed, hostile or duplicated reply ever touches the model."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message
from flwr.common.constant import ErrorCode
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cmd_fl.checkpoint import load_checkpoint
from cmd_fl.layout import ParameterLayout
from cmd_fl.ledger import ByteLedger
from cmd_fl.payload import CMD_MODEL, METRICS
from simulations.client_app import app as client_app
from simulations.server_app import CHECKPOINT_FILE, make_strategy, run
from simulations.settings import RunSettings
from simulations.task import build_model
from strategies.cmd_strategy import CMDStrategy
from tests.inprocess_grid import InProcessGrid, transmit
from tests.test_flower_apps import BASE, WARMUP

ROUNDS = WARMUP + 2
NEXT = ROUNDS + 1
TRIED: Counter[str] = Counter()
REJECTED: Counter[str] = Counter()
CORRUPTED: Counter[str] = Counter()


@dataclass
class World:
    """A CMD run stopped after ROUNDS, and honest replies for round NEXT."""

    settings: RunSettings
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]
    grid: InProcessGrid
    honest: list[Message]
    global_arrays: ArrayRecord

    def strategy(self) -> CMDStrategy:
        """A fresh strategy restored to the end of ROUNDS, with round NEXT configured."""
        layout = ParameterLayout.from_module(build_model(self.settings.dataset))
        strategy = make_strategy(self.settings, layout, ByteLedger())
        assert isinstance(strategy, CMDStrategy)
        strategy.restore(self.arrays, self.meta)
        strategy.configure_train(NEXT, self.global_arrays, ConfigRecord(), self.grid)
        return strategy


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    tmp = tmp_path_factory.mktemp("hostile")
    values = {**BASE, "num_server_rounds": ROUNDS, "run_name": "r", "max_num_examples": 5000}
    settings = RunSettings(**{**values, "results_dir": str(tmp)})
    grid = InProcessGrid(client_app, settings.num_partitions, settings.to_run_config())
    outcome = run(grid, settings)
    arrays, meta = load_checkpoint(outcome.out_dir / CHECKPOINT_FILE)
    world = World(settings, arrays, meta, grid, [], outcome.final_arrays)
    messages = world.strategy().configure_train(NEXT, world.global_arrays, ConfigRecord(), grid)
    world.honest = list(grid.send_and_receive(messages))
    assert len(world.honest) == settings.num_partitions
    return world


def _aggregate(world: World, replies: list[Message]) -> tuple[CMDStrategy, ArrayRecord | None]:
    strategy = world.strategy()
    arrays, _ = strategy.aggregate_train(NEXT, [transmit(r) for r in replies])
    return strategy, arrays


Mutation = Callable[[Message, np.random.Generator], Message]


def _set_free(reply: Message, values: np.ndarray) -> Message:
    reply.content.array_records[CMD_MODEL]["free"] = Array(values)
    return reply


def _free(reply: Message) -> np.ndarray:
    return reply.content.array_records[CMD_MODEL]["free"].numpy().copy()


def _poke(value: float) -> Mutation:
    def mutate(reply: Message, rng: np.random.Generator) -> Message:
        free = _free(reply)
        free[rng.integers(free.size)] = value
        return _set_free(reply, free)

    return mutate


def _metric(key: str, value: Callable[[Any], Any]) -> Mutation:
    def mutate(reply: Message, rng: np.random.Generator) -> Message:
        metrics = reply.content.metric_records[METRICS]
        metrics[key] = value(metrics[key])
        return reply

    return mutate


def _drop_key(reply: Message, rng: np.random.Generator) -> Message:
    del reply.content.array_records[CMD_MODEL]["refs"]
    return reply


def _add_key(reply: Message, rng: np.random.Generator) -> Message:
    reply.content.array_records[CMD_MODEL]["bonus"] = Array(rng.normal(size=4).astype(np.float32))
    return reply


def _error(reply: Message, rng: np.random.Generator) -> Message:
    error = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "boom"), reply_to=reply)
    error.metadata.__dict__["_src_node_id"] = reply.metadata.src_node_id
    return error


MUTATIONS: dict[str, Mutation] = {
    "truncated": lambda r, g: _set_free(r, _free(r)[: int(g.integers(_free(r).size))]),
    "extended": lambda r, g: _set_free(r, np.concatenate([_free(r), np.ones(3, np.float32)])),
    "float64": lambda r, g: _set_free(r, _free(r).astype(np.float64)),
    "float16": lambda r, g: _set_free(r, _free(r).astype(np.float16)),
    "int32": lambda r, g: _set_free(r, _free(r).astype(np.int32)),
    "2-d": lambda r, g: _set_free(r, _free(r)[: (_free(r).size // 2) * 2].reshape(2, -1)),
    "nan": _poke(float("nan")),
    "inf": _poke(float("inf")),
    "huge": _poke(3e30),
    "missing-key": _drop_key,
    "extra-key": _add_key,
    "stale-version": _metric("state-version", lambda v: int(v) - 1),
    "future-version": _metric("state-version", lambda v: int(v) + 7),
    "zero-examples": _metric("num-examples", lambda v: 0),
    "negative-examples": _metric("num-examples", lambda v: -int(v)),
    "too-many-examples": _metric("num-examples", lambda v: 10**9),
    "wrong-checksum": _metric("model-checksum", lambda v: int(v) ^ 0x5A5A),
    "error-reply": _error,
}


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    kind=st.sampled_from([*MUTATIONS, "duplicate", "stranger"]),
    victim=st.integers(0, 3),
    seed=st.integers(0, 2**31),
)
def test_hostile_reply_never_touches_the_model(
    world: World, kind: str, victim: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    honest = world.honest
    TRIED[kind] += 1
    node = honest[victim].metadata.src_node_id
    if kind == "duplicate":
        replies = [*honest, honest[victim]]  # a node replying twice loses both replies
        expected_replies = [r for i, r in enumerate(honest) if i != victim]
    elif kind == "stranger":
        bad = transmit(honest[victim])
        bad.metadata.__dict__["_src_node_id"] = 999_999  # never sampled
        replies, expected_replies, node = [*honest, bad], honest, 999_999
    else:
        bad = MUTATIONS[kind](transmit(honest[victim]), rng)
        replies = [r for i, r in enumerate(honest) if i != victim] + [bad]
        expected_replies = [r for i, r in enumerate(honest) if i != victim]

    strategy, arrays = _aggregate(world, replies)
    reference, expected = _aggregate(world, expected_replies)

    rejected = [r for r in strategy.rejections if r["round"] == NEXT and r["node_id"] == node]
    assert rejected, f"{kind} was not rejected"
    REJECTED[kind] += 1
    assert arrays is not None and expected is not None
    for key in expected:
        got, want = arrays[key].numpy(), expected[key].numpy()
        if not np.array_equal(got, want):
            CORRUPTED[kind] += 1
        np.testing.assert_array_equal(got, want, err_msg=f"{kind}: {key}")
        assert np.isfinite(got).all()
    assert strategy.global_flat is not None and reference.global_flat is not None
    np.testing.assert_array_equal(strategy.global_flat, reference.global_flat)


def test_a_lone_hostile_reply_keeps_the_previous_model(world: World) -> None:
    bad = MUTATIONS["nan"](transmit(world.honest[0]), np.random.default_rng(0))
    strategy = world.strategy()
    before = None if strategy.global_flat is None else strategy.global_flat.copy()

    arrays, metrics = strategy.aggregate_train(NEXT, [bad])

    assert arrays is None and metrics is None
    assert strategy.global_flat is not None and before is not None
    np.testing.assert_array_equal(strategy.global_flat, before)


@pytest.mark.parametrize(
    ("kind", "in_step"),
    [
        ("nan-loss", True),
        ("nan", True),
        ("huge", True),
        ("wrong-checksum", False),
        ("stale-version", False),
        ("error-reply", False),
    ],
)
def test_only_a_reply_out_of_step_costs_its_node_a_full_state(
    world: World, kind: str, in_step: bool
) -> None:
    victim = world.honest[0]
    node = victim.metadata.src_node_id
    if kind == "nan-loss":
        bad = _metric("train-loss", lambda v: float("nan"))(
            transmit(victim), np.random.default_rng()
        )
    else:
        bad = MUTATIONS[kind](transmit(victim), np.random.default_rng(0))
    strategy = world.strategy()
    assert strategy.state is not None
    version = strategy.state.version  # the round's (an event after it may raise it)
    strategy.node_versions[node] = version - 1  # known from an earlier round

    strategy.aggregate_train(NEXT, [bad, *map(transmit, world.honest[1:])])

    assert [r["node_id"] for r in strategy.rejections if r["round"] == NEXT] == [node]
    if in_step:  # trained on this round's exact model: no state to send next round
        assert strategy.node_versions[node] == version
    else:  # out of step: a full state next round
        assert node not in strategy.node_versions
    for other in world.honest[1:]:
        assert strategy.node_versions[other.metadata.src_node_id] == version


def teardown_module() -> None:
    """Write the counts for the README's reliability table when asked to."""
    target = os.environ.get("CMD_FL_RELIABILITY_JSON")
    if target:
        Path(target).write_text(
            json.dumps({"tried": TRIED, "rejected": REJECTED, "corrupted": CORRUPTED}, indent=2)
        )
