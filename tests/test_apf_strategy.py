"""The APF baseline through the real ServerApp and ClientApp on an in-process Grid (no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from clients.apf_client import APFClient, FrozenEntryReset
from clients.cmd_client import OptimizerHook
from cmd_fl.layout import ParameterLayout
from cmd_fl.ledger import message_payload_bytes
from cmd_fl.payload import (
    APF_BASE_VERSION,
    APF_MASK_ID,
    APF_MODEL,
    APF_MODEL_VERSION,
    CONFIG,
    METRICS,
    MODEL_CHECKSUM,
    SERVER_ROUND,
    APFModel,
    model_checksum,
)
from cmd_fl.wire import decode_index_set, encode_index_set
from simulations.client_app import app as client_app
from simulations.data import load_dataset
from simulations.server_app import RunOutcome, run
from simulations.settings import RunSettings
from simulations.task import build_model, train
from strategies.apf_strategy import APFStrategy
from tests.inprocess_grid import Exchange, Failure, InProcessGrid, Tamper, network_bytes
from tests.test_checkpoint import CrashingGrid, Killed
from tests.test_flower_apps import simulate as run_apps

# Random freezing keeps about half of the parameters frozen from round 2 and changes the mask
# every round; the short-memory EMA (alpha = 0.5) freezes by the APF rule alone (about 8 % by
# round 9 on digits). Both keep these runs short.
RANDOM: dict[str, Any] = {"apf_random_freeze": True}
SHORT_ALPHA: dict[str, Any] = {"apf_alpha": 0.5, "apf_threshold": 0.5}
BASE: dict[str, Any] = {  # float32 messages (APF under a codec: test_apf_codec)
    "strategy": "apf",
    "codec": "none",
    "dataset": "digits",
    "num_partitions": 4,
    "num_server_rounds": 6,
    "train_subset": 0,
    "learning_rate": 0.1,
}


def simulate(
    tmp_path: Path,
    tamper: Tamper | None = None,
    failure: Failure | None = None,
    **overrides: Any,
) -> tuple[RunOutcome, InProcessGrid]:
    return run_apps(tmp_path, tamper, failure, base=BASE, **overrides)


def _part(message: Message, key: str) -> np.ndarray | None:
    record = message.content.array_records[APF_MODEL]
    return record[key].numpy() if key in record else None


def _config(exchange: Exchange, key: str) -> int:
    return int(exchange.instruction.content.config_records["config"][key])  # type: ignore[arg-type]


@pytest.mark.parametrize("apf", [RANDOM, SHORT_ALPHA], ids=["random-freezing", "short-alpha"])
def test_frozen_parameters_never_cross_the_wire(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, apf: dict[str, Any]
) -> None:
    # Prepare: record what the server holds before and after each aggregation.
    rounds: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    apply_average = APFStrategy.apply_average

    def spy(self: APFStrategy, server_round: int, averaged: list[np.ndarray]) -> ArrayRecord:
        assert self.global_flat is not None
        before, active = self.global_flat.copy(), self.active.copy()
        arrays = apply_average(self, server_round, averaged)
        rounds[server_round] = (active, before, self.global_flat.copy())
        return arrays

    monkeypatch.setattr(APFStrategy, "apply_average", spy)

    # Execute
    outcome, grid = simulate(tmp_path, num_server_rounds=8 if apf is SHORT_ALPHA else 6, **apf)

    # Assert
    strategy = outcome.strategy
    assert isinstance(strategy, APFStrategy)
    n = strategy.layout.n_weights
    info = strategy.round_info
    for exchange in grid.exchanges:
        r = exchange.server_round
        active, before, after = rounds[r]
        # Uplink: exactly the round's active entries, every round; apart from them a reply is
        # a few hundred bytes (npy headers, keys, metrics), well inside the strategy's bound.
        uplink = _part(exchange.reply, "values")
        assert uplink is not None and uplink.size == active.size == info[r]["n_active"]
        overhead = message_payload_bytes(exchange.reply.content) - 4 * active.size
        assert 0 < overhead < 1024
        # Downlink: every node took part last round, so it gets the values changed in it (all
        # of them in round 1), implied by its mask (no sync set); the mask only when it changed.
        downlink = _part(exchange.instruction, "values")
        assert downlink is not None
        assert downlink.size == (n if r == 1 else rounds[r - 1][0].size)
        assert _part(exchange.instruction, "sync") is None
        mask = _part(exchange.instruction, "mask")
        if mask is not None:
            np.testing.assert_array_equal(decode_index_set(mask, n), active)
        mask_changed = r == 1 or info[r]["mask_id"] != info[r - 1]["mask_id"]
        assert (mask is not None) == mask_changed
    for r, (active, before, after) in rounds.items():
        frozen = np.ones(n, dtype=bool)
        frozen[active] = False
        np.testing.assert_array_equal(after[frozen], before[frozen], err_msg=f"round {r}")
        assert not np.array_equal(after[active], before[active])
    last = max(rounds)
    expected_frozen = 0.4 if apf is RANDOM else 0.03
    assert min(info[r]["frozen_fraction"] for r in range(2, last)) > expected_frozen
    assert len({info[r]["mask_id"] for r in info}) > 3  # the mask changed several times
    assert outcome.summary["rejected_replies"]["total"] == 0


@pytest.mark.parametrize("fraction_train", [1.0, 0.5])
def test_client_and_server_models_are_bitwise_identical(
    tmp_path: Path, fraction_train: float
) -> None:
    # Execute
    outcome, grid = simulate(tmp_path, fraction_train=fraction_train, num_server_rounds=8, **RANDOM)

    # Assert: every client rebuilt bitwise the model the server sent (checksums).
    strategy = outcome.strategy
    for exchange in grid.exchanges:
        client_view = exchange.reply.content.metric_records[METRICS][MODEL_CHECKSUM]
        assert client_view == strategy.sent_checksums[exchange.server_round]
        assert exchange.reply.content.metric_records[METRICS][APF_MASK_ID] == _config(
            exchange, APF_MASK_ID
        )
    assert outcome.summary["rejected_replies"]["total"] == 0
    if fraction_train < 1.0:
        # Some node skipped aggregated rounds and caught up: the values changed meanwhile
        # travelled with an explicit sync set, and its model still matched bitwise.
        catch_ups = [
            e
            for e in grid.exchanges
            if 0 <= _config(e, APF_BASE_VERSION) < _config(e, APF_MODEL_VERSION) - 1
        ]
        synced = [e for e in catch_ups if _part(e.instruction, "sync") is not None]
        assert synced  # (when the node's own mask covers every change, no set is needed)
        for exchange in synced:
            sync, values = (
                _part(exchange.instruction, "sync"),
                _part(exchange.instruction, "values"),
            )
            assert sync is not None and values is not None
            assert values.size == decode_index_set(sync, strategy.layout.n_weights).size


def test_ledger_totals_are_the_measured_messages(tmp_path: Path) -> None:
    # Execute
    outcome, grid = simulate(tmp_path, num_server_rounds=4, **RANDOM)

    # Assert
    measured = network_bytes(grid.exchanges)
    assert outcome.summary["total_bytes_down"] == measured["down"]
    assert outcome.summary["total_bytes_up"] == measured["up"]
    per_round = [r["bytes_down"] + r["bytes_up"] for r in outcome.summary["rounds"]]
    assert sum(per_round) == measured["down"] + measured["up"]


def test_random_freezing_sends_fewer_bytes_than_fedavg(tmp_path: Path) -> None:
    # Execute
    apf, _ = simulate(tmp_path / "apf", num_server_rounds=4, **RANDOM)
    fedavg, _ = simulate(tmp_path / "fedavg", strategy="fedavg", num_server_rounds=4)

    # Assert: about half the values travel from round 2 (up) and 3 (down) on.
    def total(outcome: RunOutcome) -> int:
        return int(outcome.summary["total_bytes_up"] + outcome.summary["total_bytes_down"])

    assert total(apf) < 0.85 * total(fedavg)


def test_a_client_that_lost_its_state_is_rejected_then_resynchronised(tmp_path: Path) -> None:
    # Prepare: node 1000's stored model vanishes before round 3 (say, a re-installed device).
    grid_ref: list[InProcessGrid] = []

    def lose_state(node: int, server_round: int) -> bool:
        if node == 1000 and server_round == 3:
            grid_ref[0].contexts[node].state = RecordDict()
        return False

    settings = RunSettings(
        **{**BASE, **RANDOM, "num_server_rounds": 5, "results_dir": str(tmp_path)}
    )
    grid = InProcessGrid(client_app, 4, settings.to_run_config(), failure=lose_state)
    grid_ref.append(grid)

    # Execute
    outcome = run(grid, settings)

    # Assert: its round-3 reply is an error, dropped; round 4 sends it the whole model.
    rejections = outcome.summary["rejected_replies"]["replies"]
    assert [(r["round"], r["node_id"]) for r in rejections] == [(3, 1000)]
    assert "the client holds None" in rejections[0]["reason"]
    (resync,) = [e for e in grid.exchanges if e.node_id == 1000 and e.server_round == 4]
    assert _config(resync, APF_BASE_VERSION) == -1
    values = _part(resync.instruction, "values")
    assert values is not None and values.size == outcome.strategy.layout.n_weights
    metrics = resync.reply.content.metric_records[METRICS]
    assert metrics[MODEL_CHECKSUM] == outcome.strategy.sent_checksums[4]


def test_kill_and_resume_gives_the_same_final_model(tmp_path: Path) -> None:
    # Prepare: the same run whole, and killed when it is about to send round 5's messages.
    def settings(folder: str, **overrides: Any) -> RunSettings:
        values = {**BASE, **RANDOM, "num_server_rounds": 7, "fraction_train": 0.5}
        return RunSettings(
            **{**values, "run_name": "run", "results_dir": str(tmp_path / folder), **overrides}
        )

    def start(config: RunSettings, grid_class: type[InProcessGrid] = InProcessGrid) -> RunOutcome:
        return run(grid_class(client_app, 4, config.to_run_config()), config)

    full = start(settings("full"))
    with pytest.raises(Killed):
        start(settings("cut"), CrashingGrid)

    # Execute: a new server (new client contexts too) continues from the checkpoint.
    resumed = start(settings("cut", resume=True))

    # Assert: bitwise the same model, masks and frozen shares as the uninterrupted run.
    assert CrashingGrid.crash_round == 5
    for key in full.final_arrays:
        np.testing.assert_array_equal(
            resumed.final_arrays[key].numpy(), full.final_arrays[key].numpy(), err_msg=key
        )
    assert [r["embedded_fraction"] for r in resumed.summary["rounds"]] == [
        r["embedded_fraction"] for r in full.summary["rounds"]
    ]
    assert resumed.summary["rejected_replies"]["total"] == 0


TARGET_ROUND = 3


def _corrupt(kind: str) -> Tamper:
    def tamper(node: int, server_round: int, reply: Message) -> Message:
        if node != 1000 or server_round != TARGET_ROUND:
            return reply
        record = reply.content.array_records[APF_MODEL]
        values = record["values"].numpy()
        metrics = reply.content.metric_records[METRICS]
        if kind == "wrong-length":
            record["values"] = Array(values[:-1])
        elif kind == "nan":
            values = values.copy()
            values[3] = np.nan
            record["values"] = Array(values)
        elif kind == "wrong-dtype":
            record["values"] = Array(values.astype(np.float64))
        elif kind == "stale-mask":
            metrics[APF_MASK_ID] = int(metrics[APF_MASK_ID]) - 1  # type: ignore[arg-type]
        elif kind == "unknown-key":
            record["mask"] = Array(np.zeros(3, np.uint8))
        elif kind == "checksum":
            metrics[MODEL_CHECKSUM] = int(metrics[MODEL_CHECKSUM]) ^ 1  # type: ignore[arg-type]
        elif kind == "zero-examples":
            metrics["num-examples"] = 0
        else:
            raise AssertionError(kind)
        return reply

    return tamper


@pytest.fixture(scope="module")
def dropped(tmp_path_factory: pytest.TempPathFactory) -> RunOutcome:
    """The run in which node 1000's reply of the target round never arrived."""
    outcome, _ = simulate(
        tmp_path_factory.mktemp("dropped"),
        failure=lambda node, r: node == 1000 and r == TARGET_ROUND,
        num_server_rounds=5,
        **RANDOM,
    )
    return outcome


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("wrong-length", "elements, expected"),
        ("nan", "non-finite"),
        ("wrong-dtype", "dtype"),
        ("stale-mask", "trained with mask"),
        ("unknown-key", "unknown ['mask']"),
        ("checksum", "different model"),
        ("zero-examples", "num-examples"),
    ],
)
def test_malformed_reply_is_dropped_and_leaves_no_trace(
    tmp_path: Path, dropped: RunOutcome, kind: str, reason: str
) -> None:
    # Execute
    corrupted, _ = simulate(tmp_path, tamper=_corrupt(kind), num_server_rounds=5, **RANDOM)

    # Assert: rejected with its reason; the model is bitwise the one without that reply.
    rejections = corrupted.summary["rejected_replies"]["replies"]
    assert [(r["round"], r["node_id"]) for r in rejections] == [(TARGET_ROUND, 1000)]
    assert reason in rejections[0]["reason"]
    assert dropped.summary["rejected_replies"]["total"] == 1  # the failed node's error reply
    for key in dropped.final_arrays:
        np.testing.assert_array_equal(
            corrupted.final_arrays[key].numpy(), dropped.final_arrays[key].numpy()
        )
    assert all(np.isfinite(a.numpy()).all() for a in corrupted.final_arrays.values())


def test_frozen_entries_are_reset_after_every_optimizer_step() -> None:
    # Prepare: momentum and weight decay would move every entry; half are frozen.
    torch.manual_seed(0)
    model = build_model("digits", seed=0)
    with torch.no_grad():  # no entry at exactly 0 (zero biases would not move under decay)
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    layout = ParameterLayout.from_module(model)
    synced = layout.flatten_numpy(model.state_dict()).copy()
    frozen = np.random.default_rng(0).random(layout.n_weights) < 0.5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.1)
    reset = FrozenEntryReset(model, layout, frozen, synced).attach(optimizer)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))

    # Execute / Assert: after each step, frozen entries are bitwise their synced values.
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        assert all(p.grad is not None for p in model.parameters())  # gradients still computed
        optimizer.step()
        flat = layout.flatten_numpy(model.state_dict())
        np.testing.assert_array_equal(flat[frozen], synced[frozen])
        assert np.all(flat[~frozen] != synced[~frozen])
    reset.detach()
    optimizer.step()
    assert not np.array_equal(layout.flatten_numpy(model.state_dict())[frozen], synced[frozen])


def _train_message(config: dict[str, int], model: APFModel) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    content = RecordDict(
        {APF_MODEL: model.to_record(), CONFIG: ConfigRecord({SERVER_ROUND: 1, **config})}
    )
    message = Message(content, dst_node_id=1000, message_type=MessageType.TRAIN)
    message.metadata.__dict__["_message_id"] = "m1"
    return message


def test_client_trains_with_frozen_entries_held_and_sends_only_active_values() -> None:
    # Prepare: a full model and a mask freezing every other entry; a training function that
    # records the model after every optimizer step (its hook runs after the client's).
    model = build_model("digits", seed=0)
    layout = ParameterLayout.from_module(model)
    n = layout.n_weights
    flat = np.random.default_rng(1).normal(size=n).astype(np.float32) * 0.1
    active = np.arange(0, n, 2)
    frozen = np.ones(n, dtype=bool)
    frozen[active] = False
    data = load_dataset("digits")[0].subset(np.arange(64))
    after_steps: list[np.ndarray] = []

    def train_fn(module: torch.nn.Module, hook: OptimizerHook | None) -> dict[str, float]:
        def record(optimizer: torch.optim.Optimizer) -> None:
            assert hook is not None
            hook(optimizer)
            optimizer.register_step_post_hook(
                lambda *_: after_steps.append(layout.flatten_numpy(module.state_dict()))
            )

        result = train(module, data, 1, 16, lr=0.5, seed=0, momentum=0.9, optimizer_hook=record)
        return {"num-examples": int(result["num_examples"])}

    message = _train_message(
        {APF_BASE_VERSION: -1, APF_MODEL_VERSION: 0, APF_MASK_ID: 7},
        APFModel(flat, np.zeros(0, np.uint8), mask=encode_index_set(active, n)),
    )
    context = Context(1, 1000, {}, RecordDict(), {})

    # Execute
    reply = APFClient(model, train_fn).train(message, context)

    # Assert: frozen entries held after each of the 4 steps; only active values travel back.
    assert len(after_steps) == 4
    for values in after_steps:
        np.testing.assert_array_equal(values[frozen], flat[frozen])
        assert np.any(values[active] != flat[active])
    sent = reply.content.array_records[APF_MODEL]["values"].numpy()
    np.testing.assert_array_equal(sent, after_steps[-1][active])
    metrics = reply.content.metric_records[METRICS]
    assert metrics[APF_MASK_ID] == 7
    assert metrics[MODEL_CHECKSUM] == model_checksum(flat, b"")
    assert context.state.config_records["apf-fl.meta"][APF_MASK_ID] == 7
