"""Codecs through the real apps: FedAvg and CMD replies carry codec blobs of their updates, and
training messages (unless ``codec-downlink = false``) coded deltas against the client's model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from clients.cmd_client import CMDClient
from cmd_fl.codec import CodecSpec, compress, decode, encode
from cmd_fl.coded import CODED_UPDATE, CodedUpdate, codec_config, encode_update
from cmd_fl.embedding import EmbeddingState
from cmd_fl.layout import ParameterLayout
from cmd_fl.payload import (
    CMD_MODEL,
    CMD_STATE,
    CONFIG,
    DENSE_MODEL,
    N_MODES,
    NUM_EXAMPLES,
    PROBE,
    SERVER_ROUND,
    STATE_VERSION,
    CMDModel,
)
from cmd_fl.sync import full_state
from simulations.settings import RunSettings
from tests.test_flower_apps import WARMUP, simulate


def _uplink_bytes(outcome) -> int:  # type: ignore[no-untyped-def]
    return int(outcome.summary["total_bytes_up"])


@pytest.mark.parametrize("strategy", ["fedavg", "cmd"])
def test_int8_replies_are_coded_smaller_and_the_model_still_learns(
    tmp_path: Path, strategy: str
) -> None:
    plain, _ = simulate(tmp_path / "plain", strategy=strategy)
    coded, grid = simulate(tmp_path / "int8", strategy=strategy, codec="int8")
    uplink_only, _ = simulate(
        tmp_path / "up", strategy=strategy, codec="int8", codec_downlink=False
    )

    for outcome in (coded, uplink_only):
        assert outcome.summary["rejected_replies"]["total"] == 0
        assert outcome.summary["final_accuracy"] > plain.summary["final_accuracy"] - 0.05
        assert outcome.summary["final_accuracy"] > 0.8
        # int8 sends about a quarter of float32's bytes up.
        assert _uplink_bytes(outcome) < 0.45 * _uplink_bytes(plain)
    kinds = {tuple(e.reply.content.array_records) for e in grid.exchanges}
    assert kinds == {(CODED_UPDATE,)}  # every training reply, warm-up included
    # Down too, unless the downlink is left float32 (round 1 sends the model as it is, and
    # CMD's state deltas travel as they are).
    down_ratio = coded.summary["total_bytes_down"] / plain.summary["total_bytes_down"]
    assert down_ratio < {"fedavg": 0.45, "cmd": 0.65}[strategy]
    # Uplink only: FedAvg's instructions are unchanged; CMD's are a little smaller, since under
    # a lossy codec its state deltas carry the coefficients in float16. (Network bytes down also
    # hold the push responses, which list the replies' objects: fewer for a coded reply.)
    up_only_ratio = uplink_only.summary["total_wire_down"] / plain.summary["total_wire_down"]
    if strategy == "fedavg":
        assert up_only_ratio == pytest.approx(1.0, abs=0.01)
    else:
        assert 0.8 < up_only_ratio < 0.99


def test_the_server_averages_exactly_what_the_blobs_decode_to(tmp_path: Path) -> None:
    outcome, grid = simulate(
        tmp_path, strategy="fedavg", codec="topk", codec_downlink=False, num_server_rounds=2
    )
    layout = outcome.strategy.layout
    spec = RunSettings(codec="topk").codec_spec()
    round_1 = [e for e in grid.exchanges if e.server_round == 1]
    sent = layout.flatten_numpy(
        {k: a.numpy() for k, a in round_1[0].instruction.content.array_records[DENSE_MODEL].items()}
    )
    trained, weights = [], []
    for exchange in round_1:
        coded = CodedUpdate.from_record(exchange.reply.content.array_records[CODED_UPDATE], 0)
        trained.append(sent + decode(coded.update, spec, sent.size))
        metrics = exchange.reply.content.metric_records["metrics"]
        weights.append(float(metrics[NUM_EXAMPLES]))  # type: ignore[arg-type]
    expected = np.average(np.stack(trained).astype(np.float64), axis=0, weights=weights)

    round_2 = next(e for e in grid.exchanges if e.server_round == 2)
    model_2 = round_2.instruction.content.array_records[DENSE_MODEL]
    got = layout.flatten_numpy({k: a.numpy() for k, a in model_2.items()})
    np.testing.assert_allclose(got, expected.astype(np.float32), rtol=0, atol=1e-6)
    # topk at 10 %: most of each round-1 update never reached the server.
    assert np.mean(trained[0] == sent) > 0.85


def test_error_feedback_carries_what_was_not_sent_into_the_next_update() -> None:
    spec = CodecSpec("topk", topk_fraction=0.25)
    store = RecordDict()
    received = np.zeros(8, np.float32)
    first = np.array([8, 7, 6, 5, 4, 3, 2, 1], np.float32)
    blob_1 = encode_update(store, "node", spec, received, first)
    np.testing.assert_array_equal(decode(blob_1, spec, 8), [8, 7, 0, 0, 0, 0, 0, 0])
    # The second update is small, but the residual (6, 5, 4, ...) makes 6 and 5 go next.
    second = np.full(8, 0.5, np.float32)
    blob_2 = encode_update(store, "node", spec, received, second)
    np.testing.assert_array_equal(decode(blob_2, spec, 8), [0, 0, 6.5, 5.5, 0, 0, 0, 0])
    residual = store.array_records["node"]["residual"].numpy()
    np.testing.assert_array_equal(residual, [0.5, 0.5, 0, 0, 4.5, 3.5, 2.5, 1.5])
    # Without error feedback nothing is carried.
    plain = RecordDict()
    off = CodecSpec("topk", topk_fraction=0.25, error_feedback=False)
    encode_update(plain, "node", off, received, first)
    blob = encode_update(plain, "node", off, received, second)
    np.testing.assert_array_equal(decode(blob, off, 8), [0.5, 0.5, 0, 0, 0, 0, 0, 0])


def test_a_residual_is_added_only_to_the_values_it_was_kept_for() -> None:
    spec = CodecSpec("topk", topk_fraction=0.25)
    store = RecordDict()
    zeros = np.zeros(4, np.float32)
    first = np.array([8, 7, 6, 5], np.float32)
    cmd_order = np.array([1, 2, 3, 0])  # the same weights, another order
    encode_update(store, "node", spec, zeros, first)  # the whole model: residual (0, 7, 6, 5)
    # The same four values in another order: the residual would land on the wrong weights.
    blob = encode_update(store, "node", spec, zeros, zeros, positions=cmd_order)
    np.testing.assert_array_equal(decode(blob, spec, 4), [0, 0, 0, 0])
    # Kept for the same positions: added (the new residual is the old one, 7 sent).
    encode_update(store, "node", spec, zeros, first, positions=cmd_order)  # residual (0, 7, 6, 5)
    blob = encode_update(store, "node", spec, zeros, zeros, positions=cmd_order)
    np.testing.assert_array_equal(decode(blob, spec, 4), [0, 7, 0, 0])
    # Other positions (an embedding event), or the whole model again: dropped.
    blob = encode_update(store, "node", spec, zeros, zeros, positions=np.array([1, 2, 3, 4]))
    np.testing.assert_array_equal(decode(blob, spec, 4), [0, 0, 0, 0])


def test_the_first_cmd_reply_does_not_add_the_warm_up_residual_to_other_weights() -> None:
    # Prepare: a client that answered a dense (warm-up) message under int8, then CMD's first
    # state: nothing embedded, so as many values travel as there are weights, in another order.
    spec = CodecSpec("int8")
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)  # 28 weights
    layout = ParameterLayout.from_module(model)
    noise = torch.Generator().manual_seed(1)
    trained: list[np.ndarray] = []

    def train_fn(module: torch.nn.Module, hook: object) -> dict[str, float]:
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=noise))
        trained.append(layout.flatten_numpy(module.state_dict()))
        return {NUM_EXAMPLES: 4}

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    client = CMDClient(model, train_fn)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    config = ConfigRecord({**codec_config(spec), SERVER_ROUND: 1})
    dense = RecordDict({DENSE_MODEL: ArrayRecord(model.state_dict()), CONFIG: config})
    client.train(Message(dense, dst_node_id=1, message_type=MessageType.TRAIN), context)
    warm_up_residual = context.state.array_records["cmd-fl.residual"]["residual"].numpy().copy()
    assert np.abs(warm_up_residual).max() > 0

    n = layout.n_weights
    references = np.array([0, 13, 26])
    state = EmbeddingState(np.arange(n) % 3, references)
    sent = trained[-1]
    free, refs = state.split(sent)
    config = ConfigRecord(
        {**codec_config(spec), SERVER_ROUND: 2, STATE_VERSION: 1, N_MODES: 3, PROBE: 0}
    )
    cmd = RecordDict(
        {
            CMD_MODEL: CMDModel(free, refs, np.empty(0, np.uint8)).to_record(),
            CMD_STATE: full_state(state).to_array_record(n, 3),
            CONFIG: config,
        }
    )
    # Execute
    reply = client.train(Message(cmd, dst_node_id=1, message_type=MessageType.TRAIN), context)
    # Assert: the warm-up residual, kept in flat-model order, is not added in CMD's order
    blob = CodedUpdate.from_record(reply.content.array_records[CODED_UPDATE], 0).update
    positions = np.concatenate([state.free_indices, references])
    update = np.subtract(trained[-1][positions], sent[positions], dtype=np.float32)
    assert not np.array_equal(positions, np.arange(n))
    assert blob.tobytes() == compress(update, spec).blob.tobytes()
    assert blob.tobytes() != compress(update, spec, warm_up_residual).blob.tobytes()


def _corrupt_blob(kind: str):  # type: ignore[no-untyped-def]
    def tamper(node: int, server_round: int, reply: Message) -> Message:
        if node != 1000 or server_round != WARMUP + 2:
            return reply
        record = reply.content.array_records[CODED_UPDATE]
        blob = record["update"].numpy().copy()
        if kind == "truncated":
            blob = blob[:-3]
        elif kind == "wrong-codec":
            spec = RunSettings(codec="fp16").codec_spec()
            length = int.from_bytes(blob[2:6].tobytes(), "little")
            blob = encode(np.zeros(length, np.float32), spec)
        elif kind == "nan-scale":
            blob[14:18] = np.frombuffer(np.float32(np.nan).tobytes(), np.uint8)
        reply.content.array_records[CODED_UPDATE] = ArrayRecord({"update": Array(blob)})
        return reply

    return tamper


@pytest.mark.parametrize(
    ("kind", "reason"),
    [("truncated", "blob"), ("wrong-codec", "codec"), ("nan-scale", "scale")],
)
def test_a_malformed_coded_reply_is_dropped_and_leaves_no_trace(
    tmp_path: Path, kind: str, reason: str
) -> None:
    # Without keyframes the next round sends node 1000 the model as it is in both runs (a
    # keyframe would go to the failed node only, and change what it trains on).
    corrupted, _ = simulate(
        tmp_path / "bad",
        tamper=_corrupt_blob(kind),
        codec="int8",
        codec_keyframes=False,
        num_server_rounds=5,
    )
    dropped, _ = simulate(
        tmp_path / "dropped",
        failure=lambda node, r: node == 1000 and r == WARMUP + 2,
        codec="int8",
        codec_keyframes=False,
        num_server_rounds=5,
    )
    rejections = corrupted.summary["rejected_replies"]["replies"]
    assert [(r["round"], r["node_id"]) for r in rejections] == [(WARMUP + 2, 1000)]
    assert reason in rejections[0]["reason"].lower()
    for key in dropped.final_arrays:
        np.testing.assert_array_equal(
            corrupted.final_arrays[key].numpy(), dropped.final_arrays[key].numpy()
        )


def test_probe_rounds_and_uncoded_runs_send_the_model_as_it_is(tmp_path: Path) -> None:
    _, grid = simulate(tmp_path, strategy="cmd", num_server_rounds=4)
    kinds = {tuple(e.reply.content.array_records) for e in grid.exchanges}
    assert kinds == {(DENSE_MODEL,), (CMD_MODEL,)}


def test_codec_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="codec must be one of"):
        RunSettings(codec="int4")
    with pytest.raises(ValueError, match="codec-topk-fraction"):
        RunSettings(codec="topk", codec_topk_fraction=0.0)
