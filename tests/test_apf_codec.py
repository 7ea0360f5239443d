"""APF under a codec through the real apps: replies carry codec blobs of the active entries'
change, nodes that hold the previous version get one coded blob of the public model's update,
and every node still trains on bitwise the model the server sent (checksums)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, Message

from cmd_fl.codec import encode
from cmd_fl.payload import APF_BASE_VERSION, APF_MODEL, APF_MODEL_VERSION, METRICS, MODEL_CHECKSUM
from simulations.client_app import app as client_app
from simulations.server_app import RunOutcome, run
from simulations.settings import RunSettings
from strategies.apf_strategy import APFStrategy
from tests.inprocess_grid import Exchange, InProcessGrid
from tests.test_apf_strategy import BASE, RANDOM
from tests.test_apf_strategy import simulate as simulate_apf
from tests.test_checkpoint import CrashingGrid, Killed

TARGET_ROUND = 3


def simulate(tmp_path: Path, **overrides: Any) -> tuple[RunOutcome, InProcessGrid]:
    return simulate_apf(tmp_path, **{**RANDOM, **overrides})


def _keys(message: Message) -> set[str]:
    return set(message.content.array_records[APF_MODEL])


def _config(exchange: Exchange, key: str) -> int:
    return int(exchange.instruction.content.config_records["config"][key])  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> RunOutcome:
    outcome, _ = simulate(tmp_path_factory.mktemp("plain"), num_server_rounds=8)
    return outcome


@pytest.mark.parametrize("fraction_train", [1.0, 0.5])
def test_int8_codes_both_directions_and_clients_hold_the_servers_model(
    tmp_path: Path, plain: RunOutcome, fraction_train: float
) -> None:
    # Execute
    outcome, grid = simulate(
        tmp_path, codec="int8", fraction_train=fraction_train, num_server_rounds=8
    )

    # Assert: no reply was dropped, and each client trained on bitwise the model sent.
    strategy = outcome.strategy
    assert isinstance(strategy, APFStrategy)
    assert outcome.summary["rejected_replies"]["total"] == 0
    for exchange in grid.exchanges:
        checksum = exchange.reply.content.metric_records[METRICS][MODEL_CHECKSUM]
        assert checksum == strategy.sent_checksums[exchange.server_round]
        assert _keys(exchange.reply) == {"coded", "extras"}
    # Down: a node holding the previous version gets the blob; one further behind (or new)
    # gets float32 values; round 1 is the whole model.
    coded_down = behind = 0
    for exchange in grid.exchanges:
        base = _config(exchange, APF_BASE_VERSION)
        version = _config(exchange, APF_MODEL_VERSION)
        keys = _keys(exchange.instruction)
        if base >= 0 and base == version - 1:
            assert "coded" in keys and "values" not in keys
            coded_down += 1
        else:
            assert "values" in keys and "coded" not in keys
            behind += base >= 0
    assert coded_down > 0
    assert (behind > 0) == (fraction_train < 1.0)
    # The global model keeps full precision: it differs from the public one by less than
    # int8's step, and the run learns about as well as uncoded APF with far fewer bytes up.
    assert strategy.global_flat is not None and strategy.public_flat is not None
    lag = np.abs(strategy.global_flat - strategy.public_flat)
    assert 0 < lag.max() < 0.05
    if fraction_train == 1.0:
        assert outcome.summary["final_accuracy"] > plain.summary["final_accuracy"] - 0.05
        assert outcome.summary["total_bytes_up"] < 0.45 * plain.summary["total_bytes_up"]
        assert outcome.summary["total_bytes_down"] < 0.6 * plain.summary["total_bytes_down"]


def test_an_uncoded_downlink_sends_float_values_and_keeps_one_model(tmp_path: Path) -> None:
    outcome, grid = simulate(tmp_path, codec="int8", codec_downlink=False, num_server_rounds=4)

    strategy = outcome.strategy
    assert isinstance(strategy, APFStrategy)
    assert outcome.summary["rejected_replies"]["total"] == 0
    assert all("coded" not in _keys(e.instruction) for e in grid.exchanges)
    assert all("coded" in _keys(e.reply) for e in grid.exchanges)
    assert strategy.public_flat is strategy.global_flat


def _corrupt(kind: str):  # type: ignore[no-untyped-def]
    def tamper(node: int, server_round: int, reply: Message) -> Message:
        if node != 1000 or server_round != TARGET_ROUND:
            return reply
        record = reply.content.array_records[APF_MODEL]
        blob = record["coded"].numpy().copy()
        length = int.from_bytes(blob[2:6].tobytes(), "little")  # the active entries
        if kind == "truncated":
            record["coded"] = Array(blob[:-3])
        elif kind == "wrong-codec":
            spec = RunSettings(codec="fp16").codec_spec()
            record["coded"] = Array(encode(np.zeros(length, np.float32), spec))
        elif kind == "uncoded":  # well-formed float values, but the run is coded
            del record["coded"]
            record["values"] = Array(np.zeros(length, np.float32))
        elif kind == "both":
            record["values"] = Array(np.zeros(4, np.float32))
        else:
            raise AssertionError(kind)
        return reply

    return tamper


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("truncated", "blob"),
        ("wrong-codec", "codec"),
        ("uncoded", "reply is uncoded"),
        ("both", "unknown ['values']"),
    ],
)
def test_a_malformed_coded_reply_is_dropped_and_leaves_no_trace(
    tmp_path: Path, kind: str, reason: str
) -> None:
    corrupted, _ = simulate(
        tmp_path / "bad", tamper=_corrupt(kind), codec="int8", num_server_rounds=5
    )
    dropped, _ = simulate(
        tmp_path / "dropped",
        failure=lambda node, r: node == 1000 and r == TARGET_ROUND,
        codec="int8",
        num_server_rounds=5,
    )

    rejections = corrupted.summary["rejected_replies"]["replies"]
    assert [(r["round"], r["node_id"]) for r in rejections] == [(TARGET_ROUND, 1000)]
    assert reason in rejections[0]["reason"]
    for key in dropped.final_arrays:
        np.testing.assert_array_equal(
            corrupted.final_arrays[key].numpy(), dropped.final_arrays[key].numpy()
        )


def test_a_resumed_server_continues_bitwise_with_nodes_that_kept_their_state(
    tmp_path: Path,
) -> None:
    # Prepare: the run whole, and killed as it is about to send round 5's messages; the
    # SuperNodes (their residuals and held models) keep running.
    def settings(folder: str, **more: Any) -> RunSettings:
        values = {**BASE, **RANDOM, "codec": "int8", "num_server_rounds": 7, "run_name": "run"}
        return RunSettings(**{**values, **more, "results_dir": str(tmp_path / folder)})

    full_settings = settings("full")
    full = run(InProcessGrid(client_app, 4, full_settings.to_run_config()), full_settings)
    crashed = CrashingGrid(client_app, 4, settings("cut").to_run_config())
    with pytest.raises(Killed):
        run(crashed, settings("cut"))

    # Execute
    resumed_settings = settings("cut", resume=True)
    grid = InProcessGrid(client_app, 4, resumed_settings.to_run_config())
    grid.contexts = crashed.contexts
    resumed = run(grid, resumed_settings)

    # Assert: the first round after the resume sends the public model whole (no node holds a
    # known version), and the run ends bitwise where the uninterrupted one did.
    assert CrashingGrid.crash_round == 5
    assert resumed.summary["rejected_replies"]["total"] == 0
    first = [e for e in grid.exchanges if e.server_round == 5]
    assert first and all(_config(e, APF_BASE_VERSION) == -1 for e in first)
    for key in full.final_arrays:
        np.testing.assert_array_equal(
            resumed.final_arrays[key].numpy(), full.final_arrays[key].numpy(), err_msg=key
        )
