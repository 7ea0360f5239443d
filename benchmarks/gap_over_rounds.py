"""Does CMD lose ground against FedAvg as a run gets longer? Paired runs, per-round accuracy.

Each pair is a FedAvg run and a CMD run with the same settings and seed (their folders'
``summary.json``). A run of 2R rounds holds the R-round run as its first R rounds (nothing
depends on the run's length), so one long pair answers both. Final-round accuracy moves by
0.2-0.3 points from round to round, so besides the gap at rounds R and 2R the script prints the
gap averaged over each run's last ``window`` rounds and the least-squares slope of the per-round
gap over rounds R..2R, each with a standard error from the scatter of the per-round gap about
that line (rounds are treated as independent, so under label skew, where neighbouring rounds
move together, the errors are optimistic):

    python -m benchmarks.gap_over_rounds --half 40 \\
        /tmp/t/fedavg80:/tmp/t/cmd80 /tmp/t/fedavg80s1:/tmp/t/cmd80s1

Prints one line per pair, then the mean over pairs, and writes nothing.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class PairGap:
    """CMD minus FedAvg accuracy, in points, for one pair of runs."""

    name: str
    final_half: float  # at round R
    final_full: float  # at round 2R
    window_half: float  # mean over rounds R-window+1..R
    window_full: float  # mean over rounds 2R-window+1..2R
    slope_per_10: float  # of the per-round gap over rounds R..2R, points per 10 rounds
    lost_se: float  # standard error of ``lost``
    slope_se: float  # standard error of ``slope_per_10``

    @property
    def lost(self) -> float:
        """Points CMD fell further behind from R to 2R (windowed; > 0 is lost ground)."""
        return self.window_half - self.window_full


def round_accuracies(run_dir: Path) -> dict[int, float]:
    """Accuracy per round from a run folder's ``summary.json`` (rounds without one skipped)."""
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    return {
        int(row["round"]): float(row["accuracy"])
        for row in summary["rounds"]
        if row.get("accuracy") is not None
    }


def pair_gap(fedavg_dir: Path, cmd_dir: Path, half: int, window: int = 5) -> PairGap:
    """The gaps of one pair; both runs must have every round 1..2*half."""
    if half < window or window < 1:
        raise ValueError(f"need 1 <= window <= half, got window={window}, half={half}")
    fedavg, cmd = round_accuracies(fedavg_dir), round_accuracies(cmd_dir)
    rounds = np.arange(1, 2 * half + 1)
    missing = [int(r) for r in rounds if r not in fedavg or r not in cmd]
    if missing:
        raise ValueError(f"{cmd_dir} / {fedavg_dir}: no accuracy for rounds {missing[:5]}...")
    gap = 100 * np.array([cmd[int(r)] - fedavg[int(r)] for r in rounds])
    late = rounds[half - 1 :]  # rounds R..2R
    slope, intercept = np.polyfit(late, gap[half - 1 :], 1)
    residuals = gap[half - 1 :] - (slope * late + intercept)
    scatter = float(np.sqrt(residuals @ residuals / (late.size - 2)))
    spread = float(np.sqrt(((late - late.mean()) ** 2).sum()))
    return PairGap(
        name=Path(cmd_dir).name,
        final_half=float(gap[half - 1]),
        final_full=float(gap[-1]),
        window_half=float(gap[half - window : half].mean()),
        window_full=float(gap[-window:].mean()),
        slope_per_10=10 * float(slope),
        lost_se=scatter * float(np.sqrt(2 / window)),
        slope_se=10 * scatter / spread,
    )


def format_gap(gap: PairGap, half: int, window: int) -> str:
    """One line for a pair (or the mean)."""
    return (
        f"{gap.name}: gap at {half} {gap.final_half:+.2f}, at {2 * half} {gap.final_full:+.2f} | "
        f"last {window} rounds {gap.window_half:+.2f} -> {gap.window_full:+.2f} "
        f"(lost {gap.lost:+.2f} +- {gap.lost_se:.2f}) | "
        f"slope {gap.slope_per_10:+.3f} +- {gap.slope_se:.3f} points / 10 rounds"
    )


def mean_gap(gaps: list[PairGap]) -> PairGap:
    """The pairs' mean, field by field; the errors become the standard errors of the means."""
    means = {}
    for key in (f.name for f in fields(PairGap) if f.name != "name"):
        values = np.array([getattr(g, key) for g in gaps])
        if key.endswith("_se"):  # independent pairs: the error of a mean of k values
            means[key] = float(np.sqrt((values**2).sum()) / values.size)
        else:
            means[key] = float(values.mean())
    return PairGap(name=f"mean of {len(gaps)}", **means)


def main(argv: list[str] | None = None) -> list[PairGap]:
    """Print the gap lines for the pairs given as ``FEDAVG_DIR:CMD_DIR``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", help="FEDAVG_RUN_DIR:CMD_RUN_DIR")
    parser.add_argument("--half", type=int, default=40, help="R: the shorter run's rounds")
    parser.add_argument("--window", type=int, default=5)
    args = parser.parse_args(argv)
    gaps = []
    for pair in args.pairs:
        fedavg_dir, sep, cmd_dir = pair.partition(":")
        if not sep:
            parser.error(f"pair {pair!r} is not FEDAVG_DIR:CMD_DIR")
        gaps.append(pair_gap(Path(fedavg_dir), Path(cmd_dir), args.half, args.window))
    for gap in [*gaps, mean_gap(gaps)] if len(gaps) > 1 else gaps:
        print(format_gap(gap, args.half, args.window))
    return gaps


if __name__ == "__main__":
    main()
