"""The strategies' round loop logs what Flower's own strategies log, plus the bytes per round."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_flower_apps import simulate


@pytest.fixture
def flower_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Capture the "flwr" logger's INFO records (it propagates to caplog's root handler)."""
    flwr_logger = logging.getLogger("flwr")
    propagate = flwr_logger.propagate
    flwr_logger.propagate = True
    caplog.set_level(logging.INFO, logger="flwr")
    try:
        yield caplog
    finally:
        flwr_logger.propagate = propagate


@pytest.mark.parametrize("strategy", ["fedavg", "cmd"])
def test_round_loop_logs_metrics_bytes_and_the_final_result(
    tmp_path: Path, flower_log: pytest.LogCaptureFixture, strategy: str
) -> None:
    outcome, _ = simulate(tmp_path, strategy=strategy, num_server_rounds=3, fraction_evaluate=0.5)
    lines = [record.getMessage() for record in flower_log.records]
    text = "\n".join(lines)

    name = type(outcome.strategy).__name__
    assert f"Starting {name} strategy:" in text
    assert "Fraction: train (1.00)" in text  # Flower's own summary of the sampling
    for server_round in (1, 2, 3):
        assert f"[ROUND {server_round}/3]" in text
    # Train and client-evaluation metrics of every round, as Flower prints them.
    assert text.count("└──> Aggregated MetricRecord:") == 6
    assert text.count("Global evaluation") == 3
    assert "Strategy execution finished in" in text and "Final results:" in text

    # The byte lines are the ledger's numbers.
    ledger = outcome.strategy.ledger
    byte_lines = [line for line in lines if "Bytes (network):" in line]
    assert len(byte_lines) == 3
    for server_round, line in enumerate(byte_lines, start=1):
        match = re.search(r"([\d.]+) MB down, ([\d.]+) MB up in round (\d+); ([\d.]+) MB", line)
        assert match is not None, line
        totals = ledger.round_totals(server_round)
        assert int(match.group(3)) == server_round
        assert float(match.group(1)) == pytest.approx(totals["bytes_down"] / 1e6, abs=5e-4)
        assert float(match.group(2)) == pytest.approx(totals["bytes_up"] / 1e6, abs=5e-4)
    assert match is not None
    assert float(match.group(4)) == pytest.approx(ledger.total_bytes() / 1e6, abs=5e-4)
