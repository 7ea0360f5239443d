"""Late joiners: a node first contacted at round 80 of 100, and one back after 74 rounds away,
train on bitwise the server's model (or, under an int8 downlink with keyframes, bitwise what the
keyframe the server sent decodes to) with bitwise the server's CMD state.

The real ServerApp and ClientApp run 100 rounds on an in-process grid whose nodes connect and
leave between rounds. Embedding events every other round and refresh probes every ten
(releases and re-fits of ``b``) move the CMD state through dozens of versions before round 80.
The test watches both sides of every message: the server's state and the model it sent when
the round's messages leave, and on the node the model handed to the training loop and the CMD
state left in ``context.state``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Message

import simulations.client_app as client_app_module
import simulations.server_app as server_app_module
from cmd_fl.codec import CodecSpec
from cmd_fl.downlink import CODED_CMD, KEYFRAME_CMD, KEYFRAME_DENSE, decode_keyframe
from cmd_fl.embedding import EmbeddingState
from cmd_fl.layout import ParameterLayout
from cmd_fl.ledger import ByteLedger
from cmd_fl.payload import (
    CMD_MODEL,
    CMD_STATE,
    CONFIG,
    METRICS,
    MODEL_CHECKSUM,
    N_MODES,
    PROBE,
    SERVER_ROUND,
    CMDModel,
    extras_nbytes,
    load_state,
    model_checksum,
)
from cmd_fl.wire import StateDelta, pack_tensors
from simulations.client_app import app as client_app
from simulations.server_app import RunOutcome, run
from simulations.settings import RunSettings
from strategies.cmd_strategy import CMDStrategy
from strategies.metered import MeteredFedAvg
from tests.inprocess_grid import Exchange, InProcessGrid

ROUNDS = 100
WARMUP = 2
REFRESH_EVERY = 10  # probes at rounds 12, 22, ..., 92
JOIN = 80  # LATE's first round, BACK's return
PROBE_JOIN = WARMUP + 8 * REFRESH_EVERY  # 82, a refresh probe: PROBE_LATE's first round
LEFT = 5  # BACK's last round before it leaves

LATE, BACK, PROBE_LATE = 1002, 1003, 1004  # 1000 and 1001 take part in every round
SETTINGS: dict[str, Any] = {
    "dataset": "digits",
    "num_partitions": 5,
    "train_subset": 5 * 32,  # one batch per node: one local step per round
    "batch_size": 32,
    "learning_rate": 0.1,
    "validation_size": 20,  # the guard runs at every event
    "num_server_rounds": ROUNDS,
    "cmd_warmup": WARMUP,
    "cmd_embed_every": 2,
    "cmd_embed_percent": 2.5,  # 32 events up to the 80 % cap: a new version every other round
    "cmd_modes": 4,
    "cmd_samples": 300,
    "cmd_refresh_every": REFRESH_EVERY,
    "checkpoint_every": 0,
}


def connected(node: int, server_round: int) -> bool:
    """Who the SuperLink knows when ``server_round`` starts."""
    if node == LATE:
        return server_round >= JOIN
    if node == PROBE_LATE:
        return server_round >= PROBE_JOIN
    if node == BACK:
        return server_round <= LEFT or server_round >= JOIN
    return True


def _round_of(message: Message) -> int:
    return int(message.content.config_records[CONFIG][SERVER_ROUND])  # type: ignore[arg-type]


@dataclass
class ChurnGrid(InProcessGrid):
    """An in-process grid whose nodes connect and leave between rounds.

    ``is_connected(node, round)`` says which nodes the strategy can sample for a round;
    ``before_round(round)`` runs before the round's first message is delivered and
    ``after_exchange(exchange)`` after each reply came back.
    """

    is_connected: Callable[[int, int], bool] = connected
    before_round: Callable[[int], None] | None = None
    after_exchange: Callable[[Exchange], None] | None = None
    next_round: int = 1

    def get_node_ids(self) -> Iterable[int]:
        return [node for node in self.node_ids if self.is_connected(node, self.next_round)]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids: list[str] = []
        for server_round in sorted({_round_of(m) for m in messages}):
            if self.before_round is not None:
                self.before_round(server_round)
            for message in (m for m in messages if _round_of(m) == server_round):
                ids.extend(super().push_messages([message]))
                if self.after_exchange is not None:
                    self.after_exchange(self.exchanges[-1])
            self.next_round = server_round + 1
        return ids


@dataclass
class ServerView:
    """The server when a round's messages leave: its CMD state and the flat model it sent."""

    state: EmbeddingState | None
    flat: np.ndarray
    extras: np.ndarray


@dataclass
class NodeView:
    """A node after its reply: the model its training loop got, and its stored CMD state."""

    trained_on: np.ndarray
    extras: np.ndarray
    state: EmbeddingState | None


@dataclass
class WatchedRun:
    """A 100-round run and what both sides held in every round."""

    outcome: RunOutcome
    grid: ChurnGrid
    layout: ParameterLayout
    keyframes: bool
    server: dict[int, ServerView] = field(default_factory=dict)
    nodes: dict[tuple[int, int], NodeView] = field(default_factory=dict)

    @property
    def strategy(self) -> CMDStrategy:
        assert isinstance(self.outcome.strategy, CMDStrategy)
        return self.outcome.strategy

    def exchange(self, node: int, server_round: int) -> Exchange:
        (found,) = [
            e for e in self.grid.exchanges if (e.node_id, e.server_round) == (node, server_round)
        ]
        return found

    def delta(self, node: int, server_round: int) -> StateDelta | None:
        """The state delta the node's training message of that round carried, if any."""
        instruction = self.exchange(node, server_round).instruction
        records = instruction.content.array_records
        if CMD_STATE not in records:
            return None
        n_modes = int(instruction.content.config_records[CONFIG][N_MODES])  # type: ignore[arg-type]
        return StateDelta.from_array_record(records[CMD_STATE], self.layout.n_weights, n_modes)


def watched_run(tmp_path: Path, codec: str, keyframes: bool) -> WatchedRun:
    """Run the real apps for 100 rounds under churn, recording both sides of every round."""
    settings = RunSettings(
        **SETTINGS, codec=codec, codec_keyframes=keyframes, results_dir=str(tmp_path)
    )
    grid = ChurnGrid(client_app, settings.num_partitions, settings.to_run_config())
    layout = ParameterLayout.from_module(server_app_module.build_model(settings.dataset))
    strategies: list[CMDStrategy] = []
    handed: list[tuple[np.ndarray, np.ndarray]] = []  # what the app's training loop got

    real_make_strategy = server_app_module.make_strategy
    real_train = client_app_module.train

    def make_strategy(
        settings: RunSettings, layout: ParameterLayout, ledger: ByteLedger
    ) -> MeteredFedAvg:
        strategy = real_make_strategy(settings, layout, ledger)
        assert isinstance(strategy, CMDStrategy)
        strategies.append(strategy)
        return strategy

    def train(model: torch.nn.Module, *args: Any, **kwargs: Any) -> dict[str, float | int]:
        state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        handed.append((layout.flatten_numpy(state), pack_tensors(layout.extra_tensors(state))))
        return real_train(model, *args, **kwargs)

    server: dict[int, ServerView] = {}
    nodes: dict[tuple[int, int], NodeView] = {}

    def before_round(server_round: int) -> None:
        (strategy,) = strategies
        # Under a coded downlink every node is sent the public model (the global model less
        # what the downlink has yet to deliver): as it is, or coded against the one it holds.
        sent = strategy.global_flat if strategy.downlink is None else strategy.downlink.flat
        assert sent is not None
        state = None if strategy.state is None else strategy.state.copy()
        server[server_round] = ServerView(state, sent.copy(), pack_tensors(strategy.global_extras))

    def after_exchange(exchange: Exchange) -> None:
        assert not exchange.reply.has_error(), exchange.reply.error
        (trained_on, extras) = handed.pop()
        assert not handed
        store = grid.contexts[exchange.node_id].state
        nodes[exchange.node_id, exchange.server_round] = NodeView(
            trained_on, extras, load_state(store, "cmd-fl", layout.n_weights)
        )

    grid.before_round, grid.after_exchange = before_round, after_exchange
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server_app_module, "make_strategy", make_strategy)
        patch.setattr(client_app_module, "train", train)
        outcome = run(grid, settings)
    return WatchedRun(outcome, grid, layout, settings.codec_keyframes, server, nodes)


@pytest.fixture(scope="module", params=["none", "int8", "int8-keyframes"])
def churn(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> WatchedRun:
    """One watched run per downlink (float32, int8 deltas, int8 deltas and keyframes), shared
    by the module's tests."""
    codec, _, keyframes = str(request.param).partition("-")
    return watched_run(tmp_path_factory.mktemp(f"late-{request.param}"), codec, bool(keyframes))


def assert_same_state(node: EmbeddingState | None, server: EmbeddingState | None) -> None:
    """Bitwise the same CMD state: version, references, embedded set, a and b, and the modes
    of the references and the embedded weights (a node is never told a free weight's mode)."""
    assert node is not None and server is not None
    assert node.version == server.version
    for name in ("references", "embedded", "frozen_a", "frozen_b"):
        ours, theirs = getattr(node, name), getattr(server, name)
        assert ours.dtype == theirs.dtype, name
        assert ours.tobytes() == theirs.tobytes(), name
    known = np.union1d(server.embedded_indices, server.references)
    assert node.modes.dtype == server.modes.dtype
    assert node.modes[known].tobytes() == server.modes[known].tobytes()


@dataclass
class Keyframe:
    """A node's keyframe of one round: the values it carried, decoded, and the public model's
    values they code (free values then reference values under CMD), and the full flat model
    the node rebuilds from them."""

    decoded: np.ndarray
    exact: np.ndarray
    model: np.ndarray


def keyframe_of(run: WatchedRun, node: int, server_round: int) -> Keyframe | None:
    """The node's keyframe of that round (None: it got none), built from the server's state."""
    records = run.exchange(node, server_round).instruction.content.array_records
    name = next((n for n in (KEYFRAME_CMD, KEYFRAME_DENSE) if n in records), None)
    if name is None:
        return None
    spec = run.strategy.codec
    assert spec is not None
    blob = records[name]["update"].numpy()
    sent = run.server[server_round]
    if name == KEYFRAME_DENSE:
        decoded = decode_keyframe(blob, spec, run.layout.n_weights)
        return Keyframe(decoded, sent.flat, decoded)
    state = sent.state
    assert state is not None
    n_free = state.free_indices.size
    decoded = decode_keyframe(blob, spec, n_free + state.n_modes)
    exact = np.concatenate(state.split(sent.flat))
    return Keyframe(decoded, exact, state.assemble(decoded[:n_free], decoded[n_free:]))


def assert_within_int8_rounding(decoded: np.ndarray, exact: np.ndarray, spec: CodecSpec) -> None:
    """Every decoded value is within half a quantisation step (its block's ``max|x| / 127``)
    of the exact one, as `tests/test_codec.py` bounds int8, and not all are exact (the
    keyframe was really coded)."""
    block, n_blocks = spec.int8_blocks(exact.size)
    padded = np.zeros(n_blocks * block, dtype=np.float32)
    padded[: exact.size] = exact
    scales = np.abs(padded.reshape(n_blocks, block)).max(axis=1) / np.float32(127)
    per_value = np.repeat(scales.astype(np.float64), block)[: exact.size]
    error = np.abs(decoded.astype(np.float64) - exact)
    # Half a quantization step, plus the float32 rounding of the divide and the multiply.
    assert np.all(error <= per_value * (0.5 + 1e-5))
    assert error.max() > 0


def assert_trained_on_the_sent_model(run: WatchedRun, node: int, server_round: int) -> None:
    """The node's training loop got bitwise the model the server sent (and checksummed): the
    public model, or what its keyframe decodes to (within int8's rounding of the public one)."""
    sent, got = run.server[server_round], run.nodes[node, server_round]
    keyframe = keyframe_of(run, node, server_round)
    expected = sent.flat if keyframe is None else keyframe.model
    assert got.trained_on.dtype == expected.dtype == np.float32
    assert got.trained_on.tobytes() == expected.tobytes()
    assert got.extras.tobytes() == sent.extras.tobytes()
    reply = run.exchange(node, server_round).reply
    checksum = reply.content.metric_records[METRICS][MODEL_CHECKSUM]
    assert checksum == model_checksum(expected, sent.extras)
    public = run.strategy.sent_checksums[server_round]
    if keyframe is None:
        assert checksum == public
    else:
        assert checksum != public
        spec = run.strategy.codec
        assert spec is not None and spec.name == "int8"
        assert_within_int8_rounding(keyframe.decoded, keyframe.exact, spec)


# --- the run is what the tests need ----------------------------------------------------------
def test_the_state_moves_through_many_versions_and_every_reply_is_accepted(
    churn: WatchedRun,
) -> None:
    strategy = churn.strategy
    assert churn.outcome.summary["rejected_replies"]["total"] == 0
    state_80 = churn.server[JOIN].state
    assert state_80 is not None and state_80.version > 30
    assert 0.5 < state_80.embedded_fraction <= 0.8
    before = [e for e in strategy.refresh_events if e["round"] < JOIN]
    assert sum(e["released"] for e in before) > 0  # releases ...
    assert sum(e["refit"] for e in before) > 0  # ... and re-fits of b before round 80
    # Nobody trains before it connects, everybody connected trains.
    trained = {(e.node_id, e.server_round) for e in churn.grid.exchanges}
    expected = {
        (node, r)
        for node in churn.grid.node_ids
        for r in range(1, ROUNDS + 1)
        if connected(node, r)
    }
    assert trained == expected


def test_every_node_trains_on_the_servers_model_and_holds_its_state_in_every_round(
    churn: WatchedRun,
) -> None:
    for node, server_round in churn.nodes:
        assert_trained_on_the_sent_model(churn, node, server_round)
        server_state = churn.server[server_round].state
        if server_state is None:  # warm-up: no CMD state on either side
            assert churn.nodes[node, server_round].state is None
        else:
            assert_same_state(churn.nodes[node, server_round].state, server_state)


# --- a node first contacted at round 80 ------------------------------------------------------
@pytest.mark.parametrize(("node", "first"), [(LATE, JOIN), (PROBE_LATE, PROBE_JOIN)])
def test_a_late_joiner_gets_the_full_state_and_the_model_as_it_is(
    churn: WatchedRun, node: int, first: int
) -> None:
    exchange = churn.exchange(node, first)
    assert not exchange.reply.has_error()
    assert min(r for n, r in churn.nodes if n == node) == first  # never contacted before
    # A full state, at the server's version: references and the embedded weights' modes.
    delta = churn.delta(node, first)
    server_state = churn.server[first].state
    assert delta is not None and server_state is not None
    assert delta.is_full and delta.from_version == 0
    assert delta.to_version == server_state.version
    assert delta.references is not None
    assert delta.embed_modes.tobytes() == server_state.modes[delta.embed_indices].tobytes()
    # The model as it is (under int8: the public model, not a delta against one it lacks), or
    # a keyframe of it; a probe round sends it as it is (the probe's values are taken as sent).
    records = exchange.instruction.content.array_records
    probe = exchange.instruction.content.config_records[CONFIG][PROBE]
    model = KEYFRAME_CMD if churn.keyframes and not probe else CMD_MODEL
    assert set(records) == {model, CMD_STATE}
    assert probe == int(first == PROBE_JOIN)  # a probe: it trains and sends every weight
    if probe:
        sent_back = CMDModel.from_record(
            exchange.reply.content.array_records[CMD_MODEL],
            server_state.free_indices.size,
            server_state.n_modes,
            extras_nbytes(churn.layout.extra_specs()),
            n_embedded=server_state.n_embedded,
        )
        assert sent_back.embedded is not None and sent_back.embedded.size > 0
    assert_trained_on_the_sent_model(churn, node, first)
    assert_same_state(churn.nodes[node, first].state, server_state)
    assert not any(r["node_id"] == node for r in churn.strategy.rejections)


def test_a_late_joiner_trains_on_what_the_nodes_that_never_left_decoded(
    churn: WatchedRun,
) -> None:
    veterans = [churn.exchange(1000, JOIN), churn.exchange(1001, JOIN)]
    coded = churn.strategy.downlink is not None
    for exchange in veterans:  # under int8 they decode a delta against the model they hold
        assert (CODED_CMD in exchange.instruction.content.array_records) == coded
    joiner = churn.nodes[LATE, JOIN].trained_on
    for exchange in veterans:
        veteran = churn.nodes[exchange.node_id, JOIN].trained_on
        if churn.keyframes:  # the joiner's keyframe is the veterans' model, rounded
            assert veteran.tobytes() != joiner.tobytes()
            assert np.abs(veteran - joiner).max() < 0.02
        else:
            assert veteran.tobytes() == joiner.tobytes()
    # Its reply proved it holds round 80's model and state: it is sent deltas from then on
    # (keyframes: a keyframe's model is not the public one, so keyframes from then on).
    after = churn.exchange(LATE, JOIN + 1).instruction.content.array_records
    assert (KEYFRAME_CMD in after) == churn.keyframes
    assert (CODED_CMD in after) == (coded and not churn.keyframes)
    delta, state_80 = churn.delta(LATE, JOIN + 1), churn.server[JOIN].state
    assert state_80 is not None
    assert delta is None or (not delta.is_full and delta.from_version == state_80.version)


# --- a node back after 74 rounds away --------------------------------------------------------
def test_a_node_back_after_74_rounds_catches_up_with_one_delta(churn: WatchedRun) -> None:
    held = churn.nodes[BACK, LEFT].state
    server_state = churn.server[JOIN].state
    assert held is not None and server_state is not None
    assert held.n_embedded > 0  # it left holding embedded weights ...
    assert server_state.version - held.version > 30  # ... and many versions behind
    delta = churn.delta(BACK, JOIN)
    assert delta is not None and not delta.is_full
    assert (delta.from_version, delta.to_version) == (held.version, server_state.version)
    # Its old embedded weights were re-fit or released since: the delta covers them.
    changed = np.union1d(
        np.union1d(delta.embed_indices, delta.release_indices), delta.refit_indices
    )
    assert np.isin(held.embedded_indices, changed).all()
    # Under int8 it holds round 5's public model: it is sent the model as it is, or a keyframe.
    records = churn.exchange(BACK, JOIN).instruction.content.array_records
    assert set(records) == {KEYFRAME_CMD if churn.keyframes else CMD_MODEL, CMD_STATE}
    assert_trained_on_the_sent_model(churn, BACK, JOIN)
    assert_same_state(churn.nodes[BACK, JOIN].state, server_state)
    assert not any(r["node_id"] == BACK for r in churn.strategy.rejections)
