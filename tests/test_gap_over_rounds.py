"""The long-run gap script: windowed gaps, slope and lost ground from paired summaries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks import gap_over_rounds


def _write_run(folder: Path, accuracies: list[float]) -> Path:
    folder.mkdir(parents=True)
    rounds = [{"round": r + 1, "accuracy": a} for r, a in enumerate(accuracies)]
    (folder / "summary.json").write_text(json.dumps({"rounds": rounds}))
    return folder


def test_gap_reads_lost_ground_and_slope(tmp_path: Path) -> None:
    half = 10
    fedavg = np.linspace(0.70, 0.90, 2 * half)
    # CMD is 1 point behind up to round R, then falls behind by 0.1 more points per round.
    behind = np.where(np.arange(1, 2 * half + 1) <= half, 0.01, 0.01 + 0.001 * np.arange(-9, 11))
    fed_dir = _write_run(tmp_path / "fedavg", list(fedavg))
    cmd_dir = _write_run(tmp_path / "cmd", list(fedavg - behind))

    gap = gap_over_rounds.pair_gap(fed_dir, cmd_dir, half, window=3)

    assert gap.final_half == pytest.approx(-1.0)
    assert gap.final_full == pytest.approx(-2.0)
    assert gap.window_half == pytest.approx(-1.0)
    assert gap.window_full == pytest.approx(-1.9)
    assert gap.lost == pytest.approx(0.9)
    assert gap.slope_per_10 == pytest.approx(-1.0)
    assert gap.slope_se == pytest.approx(0.0, abs=1e-9)  # the late gap lies on its line
    assert gap.lost_se == pytest.approx(0.0, abs=1e-9)


def test_errors_follow_the_scatter_about_the_line(tmp_path: Path) -> None:
    half, window, d = 10, 2, 0.004
    fedavg = np.full(2 * half, 0.85)
    wobble = d * (-1.0) ** np.arange(2 * half)  # +-0.4 points, no trend
    gap = gap_over_rounds.pair_gap(
        _write_run(tmp_path / "fedavg", list(fedavg)),
        _write_run(tmp_path / "cmd", list(fedavg - 0.01 + wobble)),
        half,
        window=window,
    )
    late = np.arange(half, 2 * half + 1)
    gaps = 100 * (-0.01 + wobble[late - 1])
    slope, intercept = np.polyfit(late, gaps, 1)
    scatter = np.sqrt(((gaps - slope * late - intercept) ** 2).sum() / (late.size - 2))
    assert gap.lost_se == pytest.approx(scatter * np.sqrt(2 / window))
    assert gap.slope_se == pytest.approx(10 * scatter / np.sqrt(((late - late.mean()) ** 2).sum()))
    assert 0.3 < scatter < 0.5  # the wobble, not the offset, sets the errors

    mean = gap_over_rounds.mean_gap([gap, gap])
    assert mean.lost_se == pytest.approx(gap.lost_se / np.sqrt(2))
    assert mean.final_full == pytest.approx(gap.final_full)


def test_cli_prints_each_pair_and_the_mean(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pairs = []
    for seed, offset in enumerate([0.01, 0.03]):
        fed = _write_run(tmp_path / f"fedavg{seed}", [0.8] * 10)
        cmd = _write_run(tmp_path / f"cmd{seed}", [0.8 - offset] * 10)
        pairs.append(f"{fed}:{cmd}")

    gaps = gap_over_rounds.main(["--half", "5", *pairs])

    lines = capsys.readouterr().out.splitlines()
    assert [g.final_full for g in gaps] == pytest.approx([-1.0, -3.0])
    assert len(lines) == 3 and lines[-1].startswith("mean of 2: gap at 5 -2.00, at 10 -2.00")


def test_missing_rounds_are_an_error(tmp_path: Path) -> None:
    fed = _write_run(tmp_path / "fedavg", [0.8] * 20)
    cmd = _write_run(tmp_path / "cmd", [0.8] * 15)
    with pytest.raises(ValueError, match="no accuracy for rounds"):
        gap_over_rounds.pair_gap(fed, cmd, half=10)
