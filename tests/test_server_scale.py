"""The server-scale benchmark runs end to end on a small model (its numbers are not checked)."""

from __future__ import annotations

import pytest

from benchmarks import server_scale


def test_every_method_aggregates_every_lazy_reply(capsys: pytest.CaptureFixture[str]) -> None:
    # Execute: two rounds (the second codes the int8 downlink), two sizes, every method
    results = server_scale.main(
        ["--model", "fashion-cnn", "--replies", "2", "5", "--rounds", "2", "--trace"]
    )

    # Assert
    assert [(r.method, r.replies) for r in results] == [
        (method, n) for method in server_scale.METHODS for n in (2, 5) for _ in range(2)
    ]
    assert all(r.accepted == r.replies for r in results)
    assert all(r.traced_peak_bytes > 0 and r.aggregate_s > 0 for r in results)
    printed = capsys.readouterr().out
    assert printed.startswith("$ python -m benchmarks.server_scale --model fashion-cnn")
    assert len([line for line in printed.splitlines() if line.startswith("fedavg-int8")]) == 4


def test_the_profile_splits_aggregate_train_into_its_steps() -> None:
    (result,) = server_scale.main(
        ["--model", "fashion-cnn", "--replies", "4", "--methods", "cmd", "--profile"]
    )
    assert result.shares is not None
    assert set(result.shares) >= {"metering", "parsing", "adding", "online CMD"}
    assert all(share > 0 for share in result.shares.values())
    assert sum(result.shares.values()) <= 1.0
