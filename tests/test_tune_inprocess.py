"""The in-process tuning script and its control experiment (frozen instead of embedded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import tune_inprocess
from cmd_fl.payload import METRICS
from strategies.cmd_strategy import CMDStrategy
from tests.test_flower_apps import BASE, simulate


def test_frozen_control_freezes_at_the_current_value_and_stays_in_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(CMDStrategy, "_embedding_event", CMDStrategy._embedding_event)
    tune_inprocess.freeze_embedded_weights()
    outcome, grid = simulate(tmp_path, num_server_rounds=6)
    strategy = outcome.strategy
    assert isinstance(strategy, CMDStrategy) and strategy.state is not None
    embedded = strategy.state.embedded_indices
    assert embedded.size > 0
    assert not strategy.state.frozen_a[embedded].any()
    assert strategy.global_flat is not None
    np.testing.assert_array_equal(strategy.global_flat[embedded], strategy.state.frozen_b[embedded])
    for exchange in grid.exchanges:
        client_view = exchange.reply.content.metric_records[METRICS]["model-checksum"]
        assert client_view == strategy.sent_checksums[exchange.server_round]


def test_main_runs_and_reports_from_the_summary(tmp_path: Path) -> None:
    overrides = json.dumps({**BASE, "num_server_rounds": 3})
    outcome = tune_inprocess.main(["smoke", overrides, "--results-dir", str(tmp_path)])
    summary = json.loads((tmp_path / "smoke" / "summary.json").read_text())
    assert len(summary["rounds"]) == 3
    assert outcome["final_accuracy"] == summary["final_accuracy"]
    total = summary["total_bytes_up"] + summary["total_bytes_down"]
    assert outcome["total_mb"] == pytest.approx(total / 1e6)
