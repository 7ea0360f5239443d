"""The real ServerApp and ClientApp, driven through an in-process Grid (no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, Message

from cmd_fl.ledger import message_wire_bytes
from cmd_fl.payload import CMD_MODEL, CMD_STATE, DENSE_MODEL, METRICS
from cmd_fl.wire import StateDelta
from simulations.client_app import app as client_app
from simulations.server_app import RunOutcome, run
from simulations.settings import RunSettings
from strategies.cmd_strategy import CMDStrategy
from tests.inprocess_grid import Failure, InProcessGrid, Tamper, network_bytes

WARMUP = 2
# Uncoded (float32) messages: these tests read the protocol's values as they travel; the
# codecs, the default included, have their own tests (test_codec_runs, test_downlink).
BASE: dict[str, Any] = {
    "codec": "none",
    "dataset": "digits",
    "num_partitions": 4,
    "num_server_rounds": 7,
    "cmd_warmup": WARMUP,
    "cmd_embed_every": 1,
    "cmd_embed_percent": 20.0,
    "cmd_modes": 4,
    "cmd_samples": 500,
    "train_subset": 0,
    "learning_rate": 0.1,
    "validation_size": 140,
}


def simulate(
    tmp_path: Path,
    tamper: Tamper | None = None,
    failure: Failure | None = None,
    base: dict[str, Any] | None = None,
    **overrides: Any,
) -> tuple[RunOutcome, InProcessGrid]:
    """Run the real apps on an in-process grid with ``base`` (default BASE) and overrides."""
    values = {**(BASE if base is None else base), **overrides}
    settings = RunSettings(**{**values, "results_dir": str(tmp_path)})
    grid = InProcessGrid(
        client_app, settings.num_partitions, settings.to_run_config(), tamper, failure
    )
    return run(grid, settings), grid


def _free_length(message: Message) -> int:
    return int(message.content.array_records[CMD_MODEL]["free"].shape[0])


@pytest.mark.parametrize("projection", ["step", "round"])
def test_nothing_embedded_crosses_the_wire(tmp_path: Path, projection: str) -> None:
    outcome, grid = simulate(tmp_path, cmd_projection=projection)
    strategy = outcome.strategy
    assert isinstance(strategy, CMDStrategy) and strategy.state is not None
    n, m = strategy.layout.n_weights, strategy.state.n_modes
    rows = {row["round"]: row for row in outcome.summary["rounds"]}

    cmd_rounds = 0
    for exchange in grid.exchanges:
        if exchange.server_round <= WARMUP:
            assert DENSE_MODEL in exchange.instruction.content.array_records
            continue
        cmd_rounds += 1
        embedded = round(rows[exchange.server_round - 1]["embedded_fraction"] * n)
        assert _free_length(exchange.instruction) == n - embedded - m
        assert _free_length(exchange.reply) == n - embedded - m
    assert cmd_rounds == 4 * (7 - WARMUP)
    assert rows[7]["embedded_fraction"] == pytest.approx(0.8, abs=1 / n)
    assert outcome.summary["rejected_replies"]["total"] == 0
    assert outcome.summary["final_accuracy"] > 0.3  # 10 classes: chance is 0.1


@pytest.mark.parametrize("fraction_train", [1.0, 0.5])
def test_client_and_server_models_are_bitwise_identical(
    tmp_path: Path, fraction_train: float
) -> None:
    outcome, grid = simulate(tmp_path, fraction_train=fraction_train, num_server_rounds=9)
    strategy = outcome.strategy

    for exchange in grid.exchanges:
        client_view = exchange.reply.content.metric_records[METRICS]["model-checksum"]
        assert client_view == strategy.sent_checksums[exchange.server_round]
    assert outcome.summary["rejected_replies"]["total"] == 0
    if fraction_train < 1.0:
        # Some node skipped rounds and was brought up to date by a multi-version delta.
        catch_ups = []
        for exchange in grid.exchanges:
            if CMD_STATE in exchange.instruction.content.array_records:
                delta = StateDelta.from_array_record(
                    exchange.instruction.content.array_records[CMD_STATE],
                    strategy.layout.n_weights,
                    4,
                )
                if delta.from_version > 0 and delta.to_version - delta.from_version > 1:
                    catch_ups.append(delta)
        assert catch_ups


def test_disabled_schedule_gives_fedavg_exactly(tmp_path: Path) -> None:
    cmd, _ = simulate(tmp_path / "cmd", strategy="cmd", cmd_warmup=50, num_server_rounds=4)
    fedavg, _ = simulate(tmp_path / "fedavg", strategy="fedavg", num_server_rounds=4)

    assert list(cmd.final_arrays) == list(fedavg.final_arrays)
    for key in fedavg.final_arrays:
        np.testing.assert_array_equal(
            cmd.final_arrays[key].numpy(), fedavg.final_arrays[key].numpy(), err_msg=key
        )
    assert [r["accuracy"] for r in cmd.summary["rounds"]] == [
        r["accuracy"] for r in fedavg.summary["rounds"]
    ]


@pytest.mark.parametrize("strategy", ["cmd", "fedavg"])
def test_ledger_totals_are_the_measured_messages(tmp_path: Path, strategy: str) -> None:
    outcome, grid = simulate(tmp_path, strategy=strategy, num_server_rounds=5)

    # Totals are network bytes: the objects of each message plus its Fleet API request (up)
    # and response (down), whatever the message's direction.
    measured = network_bytes(grid.exchanges)
    summary = outcome.summary
    assert (summary["total_bytes_down"], summary["total_bytes_up"]) == (
        measured["down"],
        measured["up"],
    )
    assert (summary["total_wire_down"], summary["total_wire_up"]) == (
        measured["wire_down"],
        measured["wire_up"],
    )
    assert summary["total_bytes_up"] > summary["total_wire_up"]
    per_round = [r["bytes_down"] + r["bytes_up"] for r in summary["rounds"]]
    assert sum(per_round) == measured["down"] + measured["up"]
    # CMD state travels down after the warm-up, and is part of the wire bytes.
    state = sum(r["state_bytes"] for r in summary["rounds"])
    assert state == summary["total_state_bytes"]
    assert (state > 0) == (strategy == "cmd")


def test_fedavg_round_is_a_dense_model_per_message_plus_envelope(tmp_path: Path) -> None:
    outcome, grid = simulate(tmp_path, strategy="fedavg", num_server_rounds=2)
    model_bytes = sum(
        int(np.prod(arr.shape)) * arr.numpy().itemsize for arr in outcome.final_arrays.values()
    )

    envelopes = []
    for exchange in grid.exchanges:
        for message, direction in ((exchange.instruction, "down"), (exchange.reply, "up")):
            envelope = message_wire_bytes(message, direction) - model_bytes  # type: ignore[arg-type]
            assert 0 < envelope < 4096
            envelopes.append(envelope)
    downs = envelopes[0::2]
    assert len(set(downs)) == 1  # every downlink message is the same model and config


def _replace_free(reply: Message, values: np.ndarray) -> Message:
    reply.content.array_records[CMD_MODEL]["free"] = Array(values)
    return reply


def _corrupt(kind: str) -> Tamper:
    target_round = WARMUP + 2

    def tamper(node: int, server_round: int, reply: Message) -> Message:
        if node != 1000 or server_round != target_round:
            return reply
        free = reply.content.array_records[CMD_MODEL]["free"].numpy()
        metrics = reply.content.metric_records[METRICS]
        if kind == "wrong-length":
            return _replace_free(reply, free[:-1])
        if kind == "nan":
            free = free.copy()
            free[3] = np.nan
            return _replace_free(reply, free)
        if kind == "wrong-dtype":
            return _replace_free(reply, free.astype(np.float64))
        if kind == "stale-version":
            metrics["state-version"] = int(metrics["state-version"]) - 1  # type: ignore[arg-type]
            return reply
        if kind == "unknown-key":
            reply.content.array_records[CMD_MODEL]["extra"] = Array(np.zeros(3, np.float32))
            return reply
        if kind == "checksum":
            metrics["model-checksum"] = int(metrics["model-checksum"]) ^ 1  # type: ignore[arg-type]
            return reply
        if kind == "zero-examples":
            metrics["num-examples"] = 0
            return reply
        raise AssertionError(kind)

    return tamper


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("wrong-length", "elements, expected"),
        ("nan", "non-finite"),
        ("wrong-dtype", "dtype"),
        ("stale-version", "state version"),
        ("unknown-key", "unknown ['extra']"),
        ("checksum", "different model"),
        ("zero-examples", "num-examples"),
    ],
)
def test_malformed_reply_is_dropped_and_leaves_no_trace(
    tmp_path: Path, kind: str, reason: str
) -> None:
    corrupted, _ = simulate(tmp_path / "bad", tamper=_corrupt(kind), num_server_rounds=5)
    target = WARMUP + 2
    # The same run where that node's reply never arrived: the model must be bitwise the same.
    dropped, _ = simulate(
        tmp_path / "dropped",
        failure=lambda node, r: node == 1000 and r == target,
        num_server_rounds=5,
    )

    rejections = corrupted.summary["rejected_replies"]["replies"]
    assert [(r["round"], r["node_id"]) for r in rejections] == [(target, 1000)]
    assert reason in rejections[0]["reason"]
    for key in dropped.final_arrays:
        np.testing.assert_array_equal(
            corrupted.final_arrays[key].numpy(), dropped.final_arrays[key].numpy()
        )
    assert all(np.isfinite(a.numpy()).all() for a in corrupted.final_arrays.values())


def test_a_third_of_the_clients_failing_at_random_changes_nothing_else(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    failures = {(1000 + node, r) for node in range(6) for r in range(1, 10) if rng.random() < 1 / 3}

    outcome, grid = simulate(
        tmp_path,
        failure=lambda node, r: (node, r) in failures,
        num_partitions=6,
        num_server_rounds=9,
    )
    strategy = outcome.strategy

    assert [r["round"] for r in outcome.summary["rounds"]] == list(range(1, 10))
    rejected = {(r["node_id"], r["round"]) for r in outcome.summary["rejected_replies"]["replies"]}
    assert rejected == failures
    answered = [e for e in grid.exchanges if (e.node_id, e.server_round) not in failures]
    for exchange in answered:
        client_view = exchange.reply.content.metric_records[METRICS]["model-checksum"]
        assert client_view == strategy.sent_checksums[exchange.server_round]
    assert outcome.summary["final_accuracy"] > 0.3


def test_client_evaluation_sends_what_cmd_sends_for_training(tmp_path: Path) -> None:
    # Execute: the real apps with client-side evaluation on every node every round
    outcome, grid = simulate(tmp_path, fraction_evaluate=1.0, num_server_rounds=5)
    strategy = outcome.strategy
    assert isinstance(strategy, CMDStrategy) and strategy.state is not None
    evaluations = [e for e in grid.exchanges if e.instruction.metadata.message_type == "evaluate"]
    trainings = {
        (e.server_round, e.node_id): e
        for e in grid.exchanges
        if e.instruction.metadata.message_type == "train"
    }
    # Assert: after the warm-up evaluation carries the compact CMD model, not the dense one,
    # and costs no more than that round's next training message to the same node
    assert len(evaluations) == 4 * 5
    for exchange in evaluations:
        records = exchange.instruction.content.array_records
        if exchange.server_round < WARMUP:  # CMD starts after round WARMUP's aggregation
            assert DENSE_MODEL in records
            continue
        if exchange.server_round > WARMUP:
            assert DENSE_MODEL not in records and CMD_MODEL in records
        assert METRICS in exchange.reply.content.metric_records, exchange.reply.error
        following = trainings.get((exchange.server_round + 1, exchange.node_id))
        if following is not None and CMD_STATE not in following.instruction.content.array_records:
            assert (
                message_wire_bytes(exchange.instruction)
                <= message_wire_bytes(following.instruction) + 64
            )
    # ... and both directions of evaluation are in the ledger
    ledger_phases = {(row.phase, row.direction) for row in strategy.ledger.rows}
    assert {("evaluate", "down"), ("evaluate", "up")} <= ledger_phases
    assert outcome.summary["rejected_replies"]["total"] == 0


def test_the_cifar10_preset_resnet18_runs_under_cmd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a tiny CIFAR-10 python-format folder, read by torchvision's own code (its md5
    # check reduced to "file exists": these files cannot match the real batches' sums)
    import torchvision

    from simulations.compare import PRESETS
    from tests.test_data import write_tiny_cifar10

    write_tiny_cifar10(tmp_path / "data", n_train=48, n_test=16)
    real_check = torchvision.datasets.cifar.check_integrity
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda f, md5=None: real_check(f, None)
    )
    preset = RunSettings.from_run_config(PRESETS["cifar10"].config)
    values = {
        name: getattr(preset, name)
        for name in ("dataset", "learning_rate", "momentum", "cmd_modes", "cmd_samples")
    }
    # Execute: ResNet-18 (BatchNorm everywhere) for 3 rounds, CMD from round 2
    outcome, _ = simulate(
        tmp_path,
        base={**values, "data_root": str(tmp_path / "data"), "train_subset": 0},
        num_partitions=2,
        num_server_rounds=3,
        batch_size=8,
        cmd_warmup=1,
        cmd_embed_every=1,
        validation_size=0,
    )
    # Assert: every reply was averaged, CMD embedded weights, BatchNorm's counter advanced
    assert outcome.summary["rejected_replies"]["total"] == 0
    assert outcome.summary["rounds"][-1]["embedded_fraction"] > 0
    final = outcome.strategy.global_arrays() if isinstance(outcome.strategy, CMDStrategy) else None
    assert final is not None
    tracked = final["bn1.num_batches_tracked"].numpy()
    assert tracked.shape == () and tracked.dtype == np.int64 and int(tracked) == 3 * 3
