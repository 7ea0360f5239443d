"""Coded downlink: training messages carry coded deltas against the model the client holds."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.cmd_client import CMDClient
from cmd_fl.codec import CodecSpec, decode
from cmd_fl.coded import CODED_UPDATE, CodedUpdate, codec_config
from cmd_fl.downlink import (
    CODED_CMD,
    CODED_DENSE,
    KEYFRAME_CMD,
    KEYFRAME_DENSE,
    PUBLIC_BASE,
    PUBLIC_VERSION,
    PublicModel,
    held_public,
    store_public,
)
from cmd_fl.payload import (
    CMD_MODEL,
    CMD_STATE,
    CONFIG,
    DENSE_MODEL,
    METRICS,
    MODEL_CHECKSUM,
    model_checksum,
)
from cmd_fl.wire import WireFormatError
from simulations.client_app import app as client_app
from simulations.server_app import run
from simulations.settings import RunSettings
from tests.inprocess_grid import InProcessGrid
from tests.test_flower_apps import BASE, WARMUP, simulate

INT8 = CodecSpec("int8")


def _identity(values: np.ndarray) -> np.ndarray:
    return values.copy()


def _client_decode(store: RecordDict, blob: np.ndarray, server: PublicModel) -> np.ndarray:
    """What a client does with a coded message: decode against its held model, keep the new."""
    config = server.config()
    held = held_public(store, "public", config, server.n_weights)
    new = CodedUpdate(blob, np.empty(0, np.uint8)).values(server.spec, held)
    store_public(store, "public", config, new)
    return new


@pytest.mark.parametrize("codec", ["fp16", "int8", "topk"])
def test_client_and_server_hold_bitwise_the_same_public_model(codec: str) -> None:
    rng = np.random.default_rng(0)
    server = PublicModel(CodecSpec(codec), 1000)
    store = RecordDict()
    target = rng.normal(size=1000).astype(np.float32)
    assert server.advance(1, target, _identity) is None  # nobody holds a base yet
    assert server.flat is not None
    np.testing.assert_array_equal(server.flat, target)
    store_public(store, "public", server.config(), server.flat)
    for version in range(2, 8):
        target = target + rng.normal(scale=0.01, size=1000).astype(np.float32)
        blob = server.advance(version, target, _identity)
        assert blob is not None
        client = _client_decode(store, blob, server)
        assert client.tobytes() == server.flat.tobytes()
        assert blob.size < 0.55 * 4 * 1000  # fp16 halves, int8 and top-10 % do better


def test_the_server_residual_carries_what_the_downlink_left_out() -> None:
    spec = CodecSpec("topk", topk_fraction=0.25)
    server = PublicModel(spec, 8)
    server.advance(1, np.zeros(8, np.float32), _identity)
    first = np.array([8, 7, 6, 5, 4, 3, 2, 1], np.float32)
    blob = server.advance(2, first, _identity)
    assert blob is not None
    np.testing.assert_array_equal(decode(blob, spec, 8), [8, 7, 0, 0, 0, 0, 0, 0])
    # The global model did not move, but the residual sends 6 and 5 next.
    blob = server.advance(3, first, _identity)
    assert blob is not None
    np.testing.assert_array_equal(decode(blob, spec, 8), [0, 0, 6, 5, 0, 0, 0, 0])
    assert server.flat is not None
    np.testing.assert_array_equal(server.flat, [8, 7, 6, 5, 0, 0, 0, 0])


def test_only_nodes_that_proved_the_base_version_get_the_coded_delta() -> None:
    server = PublicModel(INT8, 4)
    server.advance(1, np.zeros(4, np.float32), _identity)
    server.note_reply(1, proved=True)
    server.note_reply(2, proved=False)
    server.advance(2, np.ones(4, np.float32), _identity)
    assert server.holds_base(1) and not server.holds_base(2) and not server.holds_base(3)
    server.note_reply(3, proved=True)  # node 3 trained on version 2; node 1 missed it
    server.advance(3, np.ones(4, np.float32), _identity)
    assert server.holds_base(3) and not server.holds_base(1)
    with pytest.raises(ValueError, match="not after"):
        server.advance(3, np.ones(4, np.float32), _identity)


def test_a_client_refuses_a_delta_against_a_model_it_does_not_hold() -> None:
    store = RecordDict()
    config = ConfigRecord({PUBLIC_VERSION: 5, PUBLIC_BASE: 4})
    with pytest.raises(ValueError, match="holds no model"):
        held_public(store, "public", config, 3)
    store_public(store, "public", ConfigRecord({PUBLIC_VERSION: 3}), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="holds version 3"):
        held_public(store, "public", config, 3)
    store_public(store, "public", ConfigRecord({PUBLIC_VERSION: 4}), np.zeros(3, np.float32))
    np.testing.assert_array_equal(held_public(store, "public", config, 3), np.zeros(3))
    # Without a coded downlink (no version in the config) nothing is kept.
    plain = RecordDict()
    store_public(plain, "public", ConfigRecord({}), np.zeros(3, np.float32))
    assert "public" not in plain


# --- through the real apps -------------------------------------------------------------------
def _model_kind(message: Message) -> str:
    (name,) = [n for n in message.content.array_records if n != CMD_STATE]
    return name


@pytest.mark.parametrize(("strategy", "refresh_every"), [("fedavg", 0), ("cmd", 0), ("cmd", 2)])
def test_coded_training_messages_reach_every_client_bitwise(
    tmp_path: Path, strategy: str, refresh_every: int
) -> None:
    outcome, grid = simulate(
        tmp_path,
        strategy=strategy,
        codec="int8",
        num_server_rounds=5,
        cmd_refresh_every=refresh_every,
    )
    assert outcome.summary["rejected_replies"]["total"] == 0  # every checksum matched
    if refresh_every:  # probe replies send every value as it is, and fit the reply bound
        probes = [e for e in grid.exchanges if CMD_MODEL in e.reply.content.array_records]
        assert {e.server_round for e in probes} == {WARMUP + 2}
    coded = CODED_DENSE if strategy == "fedavg" else CODED_CMD
    for exchange in grid.exchanges:
        kind = _model_kind(exchange.instruction)
        if exchange.server_round == 1:
            assert kind == DENSE_MODEL  # nobody holds a model yet
        elif strategy == "cmd" and exchange.server_round <= WARMUP:
            assert kind == CODED_DENSE
        else:
            assert kind == coded
    # Under a lossy codec CMD's state deltas carry a and b in float16 (the width byte).
    widths = {
        int(e.instruction.content.array_records[CMD_STATE]["cmd-state"].numpy()[1])
        for e in grid.exchanges
        if CMD_STATE in e.instruction.content.array_records
    }
    assert widths == (set() if strategy == "fedavg" else {2})
    # The server's public model is what the last round's clients rebuilt and trained on.
    public = outcome.strategy.downlink
    assert public is not None and public.flat is not None and public.version == 5
    for node, context in grid.contexts.items():
        held = context.state.array_records["cmd-fl.public"]
        assert held["flat"].numpy().tobytes() == public.flat.tobytes(), node


@pytest.mark.parametrize("strategy", ["fedavg", "cmd"])
@pytest.mark.parametrize("keyframes", [True, False], ids=["keyframes", "float32"])
def test_a_node_that_missed_a_round_gets_a_keyframe_or_the_whole_model(
    tmp_path: Path, strategy: str, keyframes: bool
) -> None:
    outcome, grid = simulate(
        tmp_path,
        strategy=strategy,
        codec="int8",
        codec_keyframes=keyframes,
        num_server_rounds=6,
        failure=lambda node, r: node == 1000 and r == WARMUP + 1,
    )
    rejections = outcome.summary["rejected_replies"]["replies"]
    assert [(r["round"], r["node_id"]) for r in rejections] == [(WARMUP + 1, 1000)]
    kinds = {
        e.server_round: _model_kind(e.instruction) for e in grid.exchanges if e.node_id == 1000
    }
    whole = DENSE_MODEL if strategy == "fedavg" else CMD_MODEL
    coded = CODED_DENSE if strategy == "fedavg" else CODED_CMD
    keyframe = KEYFRAME_DENSE if strategy == "fedavg" else KEYFRAME_CMD
    # It holds the model of round WARMUP, not WARMUP + 1: no delta applies to it.
    if keyframes:
        # A keyframe, about a quarter of float32, trained on as decoded (checksum-checked);
        # what it decoded is not the public model, so it gets keyframes from then on.
        assert kinds[WARMUP + 2] == kinds[WARMUP + 3] == keyframe
        blobs = {
            _model_kind(e.instruction): e.instruction.content.array_records[
                _model_kind(e.instruction)
            ]["update"].numpy()
            for e in grid.exchanges
            if e.server_round == WARMUP + 2
        }
        assert blobs[keyframe].size == blobs[coded].size  # int8 either way, same length
        assert blobs[keyframe].tobytes() != blobs[coded].tobytes()
        held = grid.contexts[1000].state.array_records
        assert "cmd-fl.public" not in held  # it holds no public version
    else:
        assert kinds[WARMUP + 2] == whole
        assert kinds[WARMUP + 3] == coded
    others = {_model_kind(e.instruction) for e in grid.exchanges if e.server_round == WARMUP + 2}
    assert others == {keyframe if keyframes else whole, coded}
    assert outcome.summary["rejected_replies"]["total"] == 1  # every later checksum matched


class ForgetfulGrid(InProcessGrid):
    """Node 1001's state is wiped before round 3's messages reach it (a SuperNode restarted)."""

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        if any(int(m.content.config_records[CONFIG]["server-round"]) == 3 for m in messages):  # type: ignore[arg-type]
            self.contexts[1001].state = RecordDict()
        return super().push_messages(messages)


@pytest.mark.parametrize("keyframes", [True, False], ids=["keyframe", "float32"])
def test_a_client_that_lost_its_model_says_so_and_is_sent_a_keyframe_or_the_model(
    tmp_path: Path, keyframes: bool
) -> None:
    values = {
        **BASE,
        "strategy": "fedavg",
        "codec": "int8",
        "codec_keyframes": keyframes,
        "num_server_rounds": 4,
    }
    settings = RunSettings(**{**values, "results_dir": str(tmp_path)})
    grid = ForgetfulGrid(client_app, settings.num_partitions, settings.to_run_config())
    outcome = run(grid, settings)
    rejections = outcome.summary["rejected_replies"]["replies"]
    assert [(r["round"], r["node_id"]) for r in rejections] == [(3, 1001)]
    assert "holds no model" in rejections[0]["reason"]
    round_4 = next(e for e in grid.exchanges if e.server_round == 4 and e.node_id == 1001)
    assert _model_kind(round_4.instruction) == (KEYFRAME_DENSE if keyframes else DENSE_MODEL)
    assert not round_4.reply.has_error()
    assert outcome.summary["rejected_replies"]["total"] == 1


def test_the_uplink_base_is_the_public_model_not_the_global_one(tmp_path: Path) -> None:
    outcome, grid = simulate(
        tmp_path, strategy="fedavg", codec="topk", codec_topk_fraction=0.05, num_server_rounds=3
    )
    strategy = outcome.strategy
    # With 5 % top-k the public model lags the global one, so the two are told apart.
    assert strategy.downlink is not None and strategy.downlink.flat is not None
    assert strategy._global is not None
    global_flat = strategy.layout.flatten_numpy({k: a.numpy() for k, a in strategy._global.items()})
    assert not np.array_equal(global_flat, strategy.downlink.flat)
    assert outcome.summary["rejected_replies"]["total"] == 0
    replies = {tuple(e.reply.content.array_records) for e in grid.exchanges}
    assert replies == {(CODED_UPDATE,)}


class CrashingGrid(InProcessGrid):
    """The server dies when it sends round 4's messages; the nodes keep their state."""

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if any(int(m.content.config_records[CONFIG]["server-round"]) == 4 for m in messages):  # type: ignore[arg-type]
            raise RuntimeError("server killed")
        return super().send_and_receive(messages, timeout=timeout)


@pytest.mark.parametrize("strategy", ["fedavg", "cmd"])
def test_a_resumed_server_continues_bitwise_with_nodes_that_kept_their_state(
    tmp_path: Path, strategy: str
) -> None:
    values = {**BASE, "strategy": strategy, "codec": "int8", "num_server_rounds": 6}
    values["run_name"] = "run"

    def settings(where: str, **more: object) -> RunSettings:
        return RunSettings(**{**values, **more, "results_dir": str(tmp_path / where)})

    full_settings = settings("full")
    full = run(InProcessGrid(client_app, 4, full_settings.to_run_config()), full_settings)
    cut_settings = settings("cut")
    crashed = CrashingGrid(client_app, 4, cut_settings.to_run_config())
    with pytest.raises(RuntimeError, match="killed"):
        run(crashed, cut_settings)
    resumed_settings = settings("cut", resume=True)
    grid = InProcessGrid(client_app, 4, resumed_settings.to_run_config())
    grid.contexts = crashed.contexts  # the SuperNodes kept running
    resumed = run(grid, resumed_settings)

    assert resumed.summary["rejected_replies"]["total"] == 0
    first = {_model_kind(e.instruction) for e in grid.exchanges if e.server_round == 4}
    assert first == {DENSE_MODEL if strategy == "fedavg" else CMD_MODEL}  # nobody proved a base
    for key in full.final_arrays:
        np.testing.assert_array_equal(
            resumed.final_arrays[key].numpy(), full.final_arrays[key].numpy(), err_msg=key
        )


# --- a malformed downlink is refused by the client -------------------------------------------
def _client() -> tuple[CMDClient, Context]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))

    def train(module: torch.nn.Module, hook: object) -> dict[str, float]:
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.01)
        return {"num-examples": 4}

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    return CMDClient(model, train), context


def _config(version: int, base: int) -> ConfigRecord:
    return ConfigRecord(
        {**codec_config(INT8), PUBLIC_VERSION: version, PUBLIC_BASE: base, "server-round": 1}
    )


def test_a_malformed_coded_model_is_refused_and_the_held_model_kept() -> None:
    client, context = _client()
    dense = ArrayRecord(client.model.state_dict())
    first = Message(
        RecordDict({DENSE_MODEL: dense, CONFIG: _config(1, 0)}), dst_node_id=1, message_type="train"
    )
    client.train(first, context)
    held = context.state.array_records["cmd-fl.public"]["flat"].numpy().copy()
    n = held.size
    extras_bytes = 2 * 4 * 2 + 8  # BatchNorm: running mean and var (float32), count (int64)
    good = PublicModel(INT8, n)
    good.advance(1, held, _identity)
    blob = good.advance(2, held + np.float32(0.5), _identity)
    assert blob is not None

    bad_blobs = {
        "truncated": blob[:-1],
        "wrong length": np.concatenate([blob, np.zeros(1, np.uint8)]),
        "nan scale": blob.copy(),
    }
    bad_blobs["nan scale"][14:18] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
    for name, bad in bad_blobs.items():
        record = ArrayRecord(
            {"update": Array(bad), "extras": Array(np.zeros(extras_bytes, np.uint8))}
        )
        message = Message(
            RecordDict({CODED_DENSE: record, CONFIG: _config(2, 1)}),
            dst_node_id=1,
            message_type="train",
        )
        with pytest.raises(WireFormatError):
            client.train(message, context)
        kept = context.state.array_records["cmd-fl.public"]["flat"].numpy()
        assert kept.tobytes() == held.tobytes(), name

    # The well-formed blob is taken, and the client trains on exactly the server's model.
    record = CodedUpdate(blob, np.zeros(extras_bytes, np.uint8)).to_record()
    message = Message(
        RecordDict({CODED_DENSE: record, CONFIG: _config(2, 1)}),
        dst_node_id=1,
        message_type="train",
    )
    reply = client.train(message, context)
    assert good.flat is not None
    extras = np.zeros(extras_bytes, np.uint8)
    assert reply.content.metric_records[METRICS][MODEL_CHECKSUM] == model_checksum(
        good.flat, extras
    )
