"""Checkpoint and resume: a killed run continues to bitwise the same model, losing no rows."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message

from cmd_fl.checkpoint import load_checkpoint, save_checkpoint
from simulations.client_app import app as client_app
from simulations.server_app import CHECKPOINT_FILE, RunOutcome, run
from simulations.settings import RunSettings
from tests.inprocess_grid import InProcessGrid
from tests.test_flower_apps import BASE, WARMUP

ROUNDS = 8
CRASH_ROUND = WARMUP + 3  # after two embedding events


class Killed(RuntimeError):
    """The server process dies."""


class CrashingGrid(InProcessGrid):
    """Dies when asked to send the messages of ``crash_round``."""

    crash_round = CRASH_ROUND

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        rounds = {int(m.content.config_records["config"]["server-round"]) for m in messages}  # type: ignore[arg-type]
        if self.crash_round in rounds:
            raise Killed(f"server killed in round {self.crash_round}")
        return super().send_and_receive(messages, timeout=timeout)


def _settings(tmp_path: Path, **overrides: Any) -> RunSettings:
    values = {**BASE, "num_server_rounds": ROUNDS, "run_name": "run", **overrides}
    return RunSettings(**{**values, "results_dir": str(tmp_path)})


def _run(settings: RunSettings, grid_class: type[InProcessGrid] = InProcessGrid) -> RunOutcome:
    grid = grid_class(client_app, settings.num_partitions, settings.to_run_config())
    return run(grid, settings)


def _ledger_rows(outcome: RunOutcome, upto: int) -> list[tuple[int, str, str, int]]:
    return sorted(
        (r.round, r.phase, r.direction, r.wire_bytes) for r in outcome.ledger if r.round <= upto
    )


@pytest.mark.parametrize("fraction_train", [1.0, 0.5])
def test_kill_and_resume_gives_the_same_final_model(tmp_path: Path, fraction_train: float) -> None:
    full = _run(_settings(tmp_path / "full", fraction_train=fraction_train))

    cut = _settings(tmp_path / "cut", fraction_train=fraction_train)
    with pytest.raises(Killed):
        _run(cut, CrashingGrid)
    checkpoint = tmp_path / "cut" / "run" / CHECKPOINT_FILE
    assert load_checkpoint(checkpoint)[1]["round"] == CRASH_ROUND - 1
    resumed = _run(_settings(tmp_path / "cut", fraction_train=fraction_train, resume=True))

    assert list(resumed.final_arrays) == list(full.final_arrays)
    for key in full.final_arrays:
        np.testing.assert_array_equal(
            resumed.final_arrays[key].numpy(), full.final_arrays[key].numpy(), err_msg=key
        )
    # No round is lost from the results, and nothing before the crash changed.
    assert [r["round"] for r in resumed.summary["rounds"]] == list(range(1, ROUNDS + 1))
    for before, after in zip(full.summary["rounds"], resumed.summary["rounds"], strict=True):
        assert before["accuracy"] == after["accuracy"]
        assert before["embedded_fraction"] == after["embedded_fraction"]
    assert _ledger_rows(resumed, CRASH_ROUND - 1) == _ledger_rows(full, CRASH_ROUND - 1)
    assert {r.round for r in resumed.ledger} == set(range(1, ROUNDS + 1))
    assert resumed.summary["rejected_replies"]["total"] == 0


def test_resume_refuses_another_config_or_a_missing_checkpoint(tmp_path: Path) -> None:
    _run(_settings(tmp_path, num_server_rounds=3))
    with pytest.raises(ValueError, match="learning-rate"):
        _run(_settings(tmp_path, num_server_rounds=3, resume=True, learning_rate=0.2))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        _run(_settings(tmp_path, run_name="other", resume=True))


def test_checkpoint_file_is_atomic_and_pickle_free(tmp_path: Path) -> None:
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"a": np.arange(3)}, {"round": 1})
    save_checkpoint(path, {"a": np.arange(4)}, {"round": 2})
    arrays, meta = load_checkpoint(path)
    assert meta == {"round": 2} and arrays["a"].tolist() == [0, 1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary left behind
    with pytest.raises(ValueError, match="no pickle"):
        save_checkpoint(path, {"bad": np.array([object()])}, {})
