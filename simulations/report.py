"""The comparison report: aggregates over seeds, targets, ``report.md``, ``results.json``, plots.

Everything here reads run records (a run's ``summary.json`` plus what the driver knows about it)
and needs no Flower: tests feed it synthetic summaries. Bytes are what the ledgers measured
crossing the network, wire and control bytes (``summary.json`` totals); savings and accuracy
differences are paired per seed with the FedAvg run of the same setting and seed, then averaged
over seeds. The Pareto front (final accuracy against total MB) and its CMD + codec vs FedAvg +
codec comparisons use the methods' means over seeds instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BASELINE = "fedavg"
MB = 1e6
# The targets of the comparison (issue "comparison driver"); a preset may set its own
# (`compare.Preset.targets`, in ``meta["targets"]``).
DEFAULT_TARGETS = {
    "max_bytes_ratio": 0.40,  # CMD's total bytes at most 40 % of FedAvg's ...
    "max_accuracy_drop_points": 0.5,  # ... with final accuracy at most 0.5 points below
    "max_wall_time_ratio": 1.10,  # CMD's wall time at most 1.10 x FedAvg's
}
# The Pareto target (issue "Pareto front"): CMD + a codec at equal or better mean accuracy
# with at most 0.6 x the mean total bytes of FedAvg + the same codec.
PARETO_MAX_BYTES_RATIO = 0.60
# Codecs paired as ``fedavg-<codec>`` vs ``cmd-<codec>``; "none" pairs plain FedAvg and CMD.
PARETO_CODECS = ("none", "fp16", "int8", "topk")
PARETO_PLOT = ("pareto", "final accuracy vs total MB, Pareto front over method means")
PARETO_TIE = 1e-9  # accuracy differences (points) and byte-ratio excesses this small count as 0


@dataclass(frozen=True)
class Column:
    """A numeric column of the per-setting table: ``mean ± std`` of an aggregate.

    Parameters
    ----------
    header : str
        The column's header in report.md.
    key : str
        The aggregate's key in ``results.json``.
    scale : float
        Displayed value = stored value x scale (fractions shown as percent).
    digits : int
        Decimals shown.
    """

    header: str
    key: str
    scale: float
    digits: int


TABLE_COLUMNS: tuple[Column, ...] = (
    Column("final accuracy", "final_accuracy", 1.0, 4),
    Column("vs FedAvg (points)", "accuracy_vs_fedavg_points", 1.0, 2),
    Column("MB up", "mb_up", 1.0, 3),
    Column("MB down", "mb_down", 1.0, 3),
    Column("saved vs FedAvg (%)", "savings_vs_fedavg", 100.0, 1),
    Column("last 10 rounds vs FedAvg (points)", "last10_vs_fedavg_points", 1.0, 2),
    Column("CMD state (% of MB)", "state_share", 100.0, 1),
    Column("largest first state message (x dense)", "first_state_message_ratio", 1.0, 3),
    Column("accuracy at equal MB", "accuracy_at_budget", 1.0, 4),
    Column("server wall time (s)", "wall_time_s", 1.0, 1),
    Column("process wall time (s)", "process_wall_s", 1.0, 1),
    Column("rounds 2..R (s)", "rounds_time_s", 1.0, 2),
)
TABLE_HEADER = "| method | runs | " + " | ".join(c.header for c in TABLE_COLUMNS) + " |"
MISSING = "n/a"

PLOTS = (  # (file stem, title)
    ("accuracy", "accuracy vs round"),
    ("accuracy-vs-mb", "accuracy vs cumulative MB"),
    ("bytes-per-round", "MB per round"),
    ("embedded", "embedded (CMD) / frozen (APF) share per round"),
)
PLOT_AXES = {  # file stem -> (x label, y label)
    "accuracy": ("round", "test accuracy (mean ± std over seeds)"),
    "accuracy-vs-mb": ("cumulative MB (up + down)", "test accuracy"),
    "bytes-per-round": ("round", "MB per round (up + down)"),
    "embedded": ("round", "embedded / frozen weights (%)"),
}


# ----------------------------------------------------------------------------- run records


def run_record(
    meta: dict[str, Any], summary: dict[str, Any], process: dict[str, Any]
) -> dict[str, Any]:
    """The record of a finished run.

    Parameters
    ----------
    meta : dict
        ``run_name``, ``setting``, ``method``, ``label``, ``seed``, ``config``, ``run_dir``.
    summary : dict
        The run's ``summary.json``.
    process : dict
        The driver's measurements: ``process_wall_s``, ``returncode``, ``log`` (may be empty
        for a run done by an older driver).
    """
    return {
        **meta,
        "status": "done",
        "reason": "",
        "log": process.get("log", ""),
        "returncode": process.get("returncode", 0),
        "final_accuracy": summary["final_accuracy"],
        "total_bytes_up": int(summary["total_bytes_up"]),
        "total_bytes_down": int(summary["total_bytes_down"]),
        "total_state_bytes": int(summary.get("total_state_bytes", 0)),
        "first_state_messages": summary.get("first_state_messages", {}),
        "wall_time_s": float(summary["wall_time_s"]),
        "process_wall_s": process.get("process_wall_s"),
        "rounds_time_s": rounds_time(summary["rounds"]),
        "n_weights": summary.get("n_weights"),
        "guard_events": len(summary.get("guard_events", [])),
        "refresh_events": len(summary.get("refresh_events", [])),
        "rejected_replies": summary.get("rejected_replies", {}).get("total", 0),
        "rounds": summary["rounds"],
    }


def rounds_time(rows: list[dict[str, Any]]) -> float | None:
    """Seconds from the end of round 1 to the end of the last round (None below 2 rounds).

    Round 1 also pays for starting Ray and its actors, which dominates short runs; this is the
    steady per-round cost that the methods themselves add.
    """
    if len(rows) < 2 or "elapsed_s" not in rows[0]:
        return None
    return float(rows[-1]["elapsed_s"]) - float(rows[0]["elapsed_s"])


def failed_record(
    meta: dict[str, Any],
    reason: str,
    log: str,
    returncode: int | None = None,
    status: str = "failed",
) -> dict[str, Any]:
    """The record of a run that failed (or was not run: ``status="not run"``)."""
    return {**meta, "status": status, "reason": reason, "log": log, "returncode": returncode}


# ----------------------------------------------------------------------------- aggregation


def stat(values: Sequence[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof = 1; 0 for one value) of ``values``.

    Returns ``{"mean", "std", "n", "values"}``; mean and std are None when there are no values.
    """
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "n": int(array.size), "values": list(values)}


def _last10(record: dict[str, Any]) -> float:
    """Mean test accuracy over a run's last 10 rounds (all of them in a shorter run): the
    final round alone moves by points from round to round when few clients train a round."""
    return float(np.mean([row["accuracy"] for row in record["rounds"][-10:]]))


def _total_bytes(record: dict[str, Any]) -> int:
    return int(record["total_bytes_up"]) + int(record["total_bytes_down"])


def aggregate_method(
    runs: list[dict[str, Any]], baseline: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    """The aggregates of one method in one setting.

    Parameters
    ----------
    runs : list of dict
        The method's finished run records (one per seed).
    baseline : dict[int, dict]
        The finished FedAvg records of the same setting, by seed.

    Returns
    -------
    dict
        A `stat` per quantity. ``savings_vs_fedavg`` (a fraction) is
        ``1 - (up + down) / (fedavg_up + fedavg_down)`` and ``accuracy_vs_fedavg_points`` is
        ``100 (accuracy - fedavg_accuracy)``, both paired per seed over the seeds that have both
        runs; the wall-time ratios likewise.
    """
    paired = [(run, baseline[run["seed"]]) for run in runs if run["seed"] in baseline]

    def present(key: str) -> list[float]:
        return [r[key] for r in runs if r.get(key) is not None]

    def ratios(key: str) -> list[float]:
        return [r[key] / b[key] for r, b in paired if r.get(key) is not None and b.get(key)]

    return {
        "seeds": [run["seed"] for run in runs],
        "paired_seeds": [run["seed"] for run, _ in paired],
        "final_accuracy": stat([run["final_accuracy"] for run in runs]),
        "accuracy_vs_fedavg_points": stat(
            [100.0 * (run["final_accuracy"] - base["final_accuracy"]) for run, base in paired]
        ),
        "last10_vs_fedavg_points": stat(
            [100.0 * (_last10(run) - _last10(base)) for run, base in paired]
        ),
        "mb_up": stat([run["total_bytes_up"] / MB for run in runs]),
        "mb_down": stat([run["total_bytes_down"] / MB for run in runs]),
        "mb_total": stat([_total_bytes(run) / MB for run in runs]),
        "state_share": stat(
            [
                run.get("total_state_bytes", 0) / _total_bytes(run)
                for run in runs
                if _total_bytes(run)
            ]
        ),
        "savings_vs_fedavg": stat(
            [1.0 - _total_bytes(run) / _total_bytes(base) for run, base in paired]
        ),
        "first_state_message_ratio": stat(
            [
                first["max_bytes"] / first["dense_bytes"]
                for first in (run.get("first_state_messages") or {} for run in runs)
                if first.get("nodes") and first.get("dense_bytes")
            ]
        ),
        "wall_time_s": stat(present("wall_time_s")),
        "process_wall_s": stat(present("process_wall_s")),
        "rounds_time_s": stat(present("rounds_time_s")),
        "wall_time_ratio_vs_fedavg": stat(ratios("wall_time_s")),
        "process_wall_ratio_vs_fedavg": stat(ratios("process_wall_s")),
        "rounds_time_ratio_vs_fedavg": stat(ratios("rounds_time_s")),
    }


def accuracy_within(run: dict[str, Any], budget_mb: float) -> float | None:
    """Accuracy of the last round of ``run`` whose cumulative bytes (up + down) fit in
    ``budget_mb``; None if even the first round does not."""
    accuracy, cumulative = None, 0.0
    for row in run["rounds"]:
        cumulative += (row["bytes_up"] + row["bytes_down"]) / MB
        if cumulative > budget_mb * (1 + 1e-9):
            break
        accuracy = row["accuracy"]
    return accuracy


def curves(runs: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per-round means over seeds: accuracy (and its std), cumulative MB, MB, embedded share.

    A round counts the runs that reached it.
    """
    n_rounds = max((len(run["rounds"]) for run in runs), default=0)
    out: dict[str, list[float]] = {
        k: [] for k in ("round", "accuracy", "accuracy_std", "cumulative_mb", "mb", "embedded")
    }
    cumulative = [
        np.cumsum([(row["bytes_up"] + row["bytes_down"]) / MB for row in run["rounds"]])
        for run in runs
    ]
    for i in range(n_rounds):
        present = [
            (run, cum) for run, cum in zip(runs, cumulative, strict=True) if len(run["rounds"]) > i
        ]
        rows = [run["rounds"][i] for run, _ in present]
        accuracy = np.array([row["accuracy"] for row in rows], dtype=np.float64)
        out["round"].append(int(rows[0]["round"]))
        out["accuracy"].append(float(accuracy.mean()))
        out["accuracy_std"].append(float(accuracy.std(ddof=1)) if accuracy.size > 1 else 0.0)
        out["cumulative_mb"].append(float(np.mean([cum[i] for _, cum in present])))
        out["mb"].append(float(np.mean([(r["bytes_up"] + r["bytes_down"]) / MB for r in rows])))
        out["embedded"].append(float(np.mean([r["embedded_fraction"] for r in rows])))
    return out


def aggregate(
    records: list[dict[str, Any]], settings: Sequence[str], methods: Sequence[str]
) -> dict[str, dict[str, dict[str, Any]]]:
    """``aggregates[setting][method]``: `aggregate_method` plus run counts and curves."""
    result: dict[str, dict[str, dict[str, Any]]] = {}
    for setting in settings:
        in_setting = [r for r in records if r["setting"] == setting]
        baseline = {
            r["seed"]: r for r in in_setting if r["method"] == BASELINE and r["status"] == "done"
        }
        result[setting] = {}
        for method in methods:
            planned = [r for r in in_setting if r["method"] == method]
            done = sorted((r for r in planned if r["status"] == "done"), key=lambda r: r["seed"])
            result[setting][method] = {
                "runs_done": len(done),
                "runs_planned": len(planned),
                **aggregate_method(done, baseline),
                "curves": curves(done),
            }
        # The trade-off at one byte budget: the leanest method's mean total, and what every
        # method's runs had reached within it (read from their per-round ledgers).
        totals = [
            agg["mb_total"]["mean"]
            for agg in result[setting].values()
            if agg["mb_total"]["mean"] is not None
        ]
        budget = min(totals) if totals else None
        for method in methods:
            done = [r for r in in_setting if r["method"] == method and r["status"] == "done"]
            reached = [] if budget is None else [accuracy_within(r, budget) for r in done]
            result[setting][method]["budget_mb"] = budget
            result[setting][method]["accuracy_at_budget"] = stat(
                [a for a in reached if a is not None]
            )
    return result


# ----------------------------------------------------------------------------- targets


def _strategy(meta: dict[str, Any], method: str) -> str:
    return str(meta["methods"][method]["overlay"].get("strategy", ""))


def _mean(aggregates: dict[str, Any], key: str) -> float | None:
    value = aggregates[key]["mean"]
    return None if value is None else float(value)


def evaluate_targets(
    aggregates: dict[str, dict[str, dict[str, Any]]], meta: dict[str, Any]
) -> list[dict[str, Any]]:
    """The targets, measured per setting and CMD method.

    Returns a list of ``{"setting", "target", "method", "verdict", "line", ...numbers}``;
    verdict is PASS or FAIL, MIXED for a trade-off where neither method dominates, and SKIP
    when the runs needed are missing.
    """
    limits = {**DEFAULT_TARGETS, **meta.get("targets", {})}
    max_bytes, max_drop = limits["max_bytes_ratio"], limits["max_accuracy_drop_points"]
    max_wall = limits["max_wall_time_ratio"]
    methods = list(meta["methods"])
    cmd_methods = [m for m in methods if _strategy(meta, m) == "cmd"]
    apf_methods = [m for m in methods if _strategy(meta, m) == "apf"]
    label = {m: meta["methods"][m]["label"] for m in methods}
    found: list[dict[str, Any]] = []
    for setting, by_method in aggregates.items():
        has_baseline = BASELINE in by_method and by_method[BASELINE]["runs_done"] > 0
        for cmd in cmd_methods:
            agg = by_method[cmd]
            name = f"{setting} / {label[cmd]}, bytes"
            saving = _mean(agg, "savings_vs_fedavg")
            drop = _mean(agg, "accuracy_vs_fedavg_points")
            last10 = _mean(agg, "last10_vs_fedavg_points")
            n = agg["savings_vs_fedavg"]["n"]
            if not has_baseline or saving is None or drop is None:
                found.append(_skip(setting, "bytes", cmd, f"{name}: no paired FedAvg runs"))
            else:
                ratio = 1.0 - saving
                ok = ratio <= max_bytes and drop >= -max_drop
                also = "" if last10 is None else f", last 10 rounds {last10:+.2f}"
                found.append(
                    {
                        "setting": setting,
                        "target": "bytes",
                        "method": cmd,
                        "verdict": "PASS" if ok else "FAIL",
                        "bytes_ratio": ratio,
                        "accuracy_vs_fedavg_points": drop,
                        "line": (
                            f"{name}: total bytes {100 * ratio:.1f} % of FedAvg's (target <= "
                            f"{100 * max_bytes:.0f} %), final accuracy {drop:+.2f} points "
                            f"vs FedAvg (target >= {-max_drop:.2f}){also}; mean over "
                            f"{n} seed(s)"
                        ),
                    }
                )
            for apf in apf_methods:
                found.append(_tradeoff(setting, cmd, apf, by_method, label))
            wall = _mean(agg, "wall_time_ratio_vs_fedavg")
            name = f"{setting} / {label[cmd]}, wall time"
            if not has_baseline or wall is None:
                found.append(_skip(setting, "wall time", cmd, f"{name}: no paired FedAvg runs"))
            else:
                process = _mean(agg, "process_wall_ratio_vs_fedavg")
                steady = _mean(agg, "rounds_time_ratio_vs_fedavg")
                extra = "" if process is None else f"; whole process {process:.2f} x"
                extra += "" if steady is None else f"; rounds 2..R {steady:.2f} x"
                found.append(
                    {
                        "setting": setting,
                        "target": "wall time",
                        "method": cmd,
                        "verdict": "PASS" if wall <= max_wall else "FAIL",
                        "wall_time_ratio": wall,
                        "process_wall_ratio": process,
                        "rounds_time_ratio": steady,
                        "line": (
                            f"{name}: server wall time {wall:.2f} x FedAvg's (target <= "
                            f"{max_wall:.2f} x){extra}; mean of per-seed ratios"
                        ),
                    }
                )
    return found


def _skip(setting: str, target: str, method: str, line: str) -> dict[str, Any]:
    return {"setting": setting, "target": target, "method": method, "verdict": "SKIP", "line": line}


def _tradeoff(
    setting: str,
    cmd: str,
    apf: str,
    by_method: dict[str, dict[str, Any]],
    label: dict[str, str],
) -> dict[str, Any]:
    """CMD against an APF variant on final accuracy and total MB (means over seeds)."""
    name = f"{setting} / {label[cmd]} vs {label[apf]}, trade-off"
    c_acc, c_mb = _mean(by_method[cmd], "final_accuracy"), _mean(by_method[cmd], "mb_total")
    a_acc, a_mb = _mean(by_method[apf], "final_accuracy"), _mean(by_method[apf], "mb_total")
    if c_acc is None or c_mb is None or a_acc is None or a_mb is None:
        return _skip(setting, "trade-off", cmd, f"{name}: runs missing")
    numbers = (
        f"accuracy {c_acc:.4f} vs {a_acc:.4f}, total {c_mb:.3f} MB vs {a_mb:.3f} MB "
        f"({100 * (1 - c_mb / a_mb):+.1f} % fewer bytes for CMD)"
    )
    c_budget = _mean(by_method[cmd], "accuracy_at_budget")
    a_budget = _mean(by_method[apf], "accuracy_at_budget")
    if c_budget is not None and a_budget is not None:
        numbers += (
            f"; within {by_method[cmd]['budget_mb']:.3f} MB: accuracy {c_budget:.4f} vs "
            f"{a_budget:.4f}"
        )
    cmd_better = c_acc >= a_acc and c_mb <= a_mb and (c_acc > a_acc or c_mb < a_mb)
    apf_better = a_acc >= c_acc and a_mb <= c_mb and (a_acc > c_acc or a_mb < c_mb)
    if cmd_better:
        verdict, text = "PASS", "CMD dominates (at least as accurate with fewer bytes)"
    elif apf_better:
        verdict, text = "FAIL", "APF dominates (at least as accurate with fewer bytes)"
    elif c_mb < a_mb:
        verdict, text = "MIXED", "neither dominates: CMD sends fewer bytes, APF is more accurate"
    elif c_mb > a_mb:
        verdict, text = "MIXED", "neither dominates: APF sends fewer bytes, CMD is more accurate"
    else:
        verdict, text = "MIXED", "a tie"
    return {
        "setting": setting,
        "target": "trade-off",
        "method": cmd,
        "versus": apf,
        "verdict": verdict,
        "line": f"{name}: {text}; {numbers}",
    }


# ----------------------------------------------------------------------------- Pareto front


def method_means(by_method: dict[str, dict[str, Any]]) -> dict[str, tuple[float, float]]:
    """``method -> (mean total MB, mean final accuracy)`` of the methods with finished runs."""
    means: dict[str, tuple[float, float]] = {}
    for method, agg in by_method.items():
        mb, accuracy = _mean(agg, "mb_total"), _mean(agg, "final_accuracy")
        if mb is not None and accuracy is not None:
            means[method] = (mb, accuracy)
    return means


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """The names whose ``(MB, accuracy)`` no other point dominates, by MB ascending.

    A point dominates another when it sends no more MB at no lower accuracy and is strictly
    better in one of the two; equal points are both on the front.
    """

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] <= b[0] and a[1] >= b[1] and (a[0] < b[0] or a[1] > b[1])

    front = [
        name
        for name, point in points.items()
        if not any(dominates(other, point) for o, other in points.items() if o != name)
    ]
    return sorted(front, key=lambda name: (points[name][0], -points[name][1]))


def codec_pairs(methods: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(codec, fedavg method, cmd method)`` for every codec of `PARETO_CODECS` with both."""
    pairs = []
    for codec in PARETO_CODECS:
        suffix = "" if codec == "none" else f"-{codec}"
        fedavg, cmd = f"{BASELINE}{suffix}", f"cmd{suffix}"
        if fedavg in methods and cmd in methods:
            pairs.append((codec, fedavg, cmd))
    return pairs


def mb_to_reach(curve: dict[str, list[float]], accuracy: float) -> float | None:
    """Cumulative MB of the first round whose mean accuracy is at least ``accuracy`` (None if
    no round reaches it)."""
    for reached, mb in zip(curve["accuracy"], curve["cumulative_mb"], strict=True):
        if reached >= accuracy - 1e-12:
            return mb
    return None


def _codec_pair(
    codec: str,
    fedavg: str,
    cmd: str,
    means: dict[str, tuple[float, float]],
    label: dict[str, str],
    fedavg_curve: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """CMD + codec against FedAvg + codec on mean total MB and mean final accuracy, and on
    the MB FedAvg + codec had sent when its mean accuracy first reached CMD + codec's final
    one (``fedavg_mb_at_cmd_accuracy``; the run-long comparison at equal accuracy)."""
    found: dict[str, Any] = {"codec": codec, "fedavg": fedavg, "cmd": cmd}
    if cmd not in means or fedavg not in means:
        missing = " and ".join(label[m] for m in (cmd, fedavg) if m not in means)
        return {
            **found,
            **dict.fromkeys(("cmd_mb", "fedavg_mb", "cmd_accuracy", "fedavg_accuracy")),
            "bytes_ratio": None,
            "accuracy_diff_points": None,
            "fedavg_mb_at_cmd_accuracy": None,
            "bytes_ratio_at_equal_accuracy": None,
            "target_met": None,
            "line": f"{label[cmd]} vs {label[fedavg]}: no finished runs of {missing}",
        }
    (c_mb, c_acc), (f_mb, f_acc) = means[cmd], means[fedavg]
    ratio = c_mb / f_mb
    diff = 100.0 * (c_acc - f_acc)
    equal_accuracy = diff >= -PARETO_TIE
    few_bytes = ratio <= PARETO_MAX_BYTES_RATIO + PARETO_TIE
    problems = []
    if not equal_accuracy:
        problems.append(f"not at equal accuracy: {diff:.2f} points")
    if not few_bytes:
        problems.append(f"{ratio:.2f} x the bytes is above {PARETO_MAX_BYTES_RATIO:.2f} x")
    verdict = "target met" if not problems else "target not met: " + "; ".join(problems)
    reach = None if fedavg_curve is None else mb_to_reach(fedavg_curve, c_acc)
    equal = None if reach is None else c_mb / reach
    if reach is None:
        reach_line = f"{label[fedavg]}'s mean curve never reaches {100 * c_acc:.2f} %"
    else:
        reach_line = (
            f"{label[fedavg]} first reaches {100 * c_acc:.2f} % after {reach:.3f} MB: "
            f"{equal:.2f} x the bytes at equal accuracy"
        )
    return {
        **found,
        "cmd_mb": c_mb,
        "fedavg_mb": f_mb,
        "cmd_accuracy": c_acc,
        "fedavg_accuracy": f_acc,
        "bytes_ratio": ratio,
        "accuracy_diff_points": diff,
        "fedavg_mb_at_cmd_accuracy": reach,
        "bytes_ratio_at_equal_accuracy": equal,
        "target_met": equal_accuracy and few_bytes,
        "line": (
            f"{label[cmd]}: {c_mb:.3f} MB at {100 * c_acc:.2f} % vs {label[fedavg]}: "
            f"{f_mb:.3f} MB at {100 * f_acc:.2f} %: {ratio:.2f} x the bytes, "
            f"{diff:+.2f} points; {verdict}. {reach_line}"
        ),
    }


def evaluate_pareto(
    aggregates: dict[str, dict[str, dict[str, Any]]], meta: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Per setting: each method's means, the Pareto front over them, and the codec pairs.

    Returns ``{setting: {"methods": {method: {"label", "runs", "mb_total", "final_accuracy",
    "on_front"}}, "front": [methods by MB ascending], "pairs": [...], "max_bytes_ratio"}}``.
    ``mb_total`` is the mean over seeds of all bytes both ways (`_total_bytes`), accuracy the
    mean final accuracy; a pair's ``bytes_ratio`` is CMD's mean MB over FedAvg's and
    ``accuracy_diff_points`` ``100 (CMD's mean accuracy - FedAvg's)``. ``target_met``
    (None when a method of the pair has no finished run) is accuracy at least FedAvg's with
    ``bytes_ratio <= PARETO_MAX_BYTES_RATIO``.
    """
    label = {m: meta["methods"][m]["label"] for m in meta["methods"]}
    found: dict[str, dict[str, Any]] = {}
    for setting, by_method in aggregates.items():
        means = method_means(by_method)
        front = pareto_front(means)
        found[setting] = {
            "methods": {
                method: {
                    "label": label[method],
                    "runs": agg["runs_done"],
                    "mb_total": means[method][0] if method in means else None,
                    "final_accuracy": means[method][1] if method in means else None,
                    "on_front": (method in front) if method in means else None,
                }
                for method, agg in by_method.items()
            },
            "front": front,
            "pairs": [
                _codec_pair(codec, fedavg, cmd, means, label, by_method[fedavg].get("curves"))
                for codec, fedavg, cmd in codec_pairs(list(by_method))
            ],
            "max_bytes_ratio": PARETO_MAX_BYTES_RATIO,
        }
    return found


# ----------------------------------------------------------------------------- markdown


def format_stat(value: dict[str, Any], column: Column) -> str:
    """``mean ± std`` at the column's scale and precision (``n/a`` when there is none)."""
    if value["mean"] is None:
        return MISSING
    mean, std = value["mean"] * column.scale, value["std"] * column.scale
    return f"{mean:.{column.digits}f} ± {std:.{column.digits}f}"


def setting_table(aggregates: dict[str, dict[str, Any]], meta: dict[str, Any]) -> list[str]:
    """The markdown table of one setting: a row per method."""
    lines = [TABLE_HEADER, "|" + "---|" * (2 + len(TABLE_COLUMNS))]
    for method, agg in aggregates.items():
        cells = [
            f"{meta['methods'][method]['label']} (`{method}`)",
            f"{agg['runs_done']}/{agg['runs_planned']}",
        ]
        cells += [format_stat(agg[column.key], column) for column in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _budget_note(by_method: dict[str, dict[str, Any]]) -> list[str]:
    budget = next((agg["budget_mb"] for agg in by_method.values()), None)
    if budget is None:
        return []
    return [
        f"Accuracy at equal MB: each run's test accuracy at its last round within {budget:.3f} "
        "MB of total traffic (the leanest method's mean total here), read from its per-round "
        "ledger; a run whose first round already exceeds it has none.",
        "",
    ]


def _scope(meta: dict[str, Any]) -> str:
    """What this comparison ran of its preset (``--settings``, ``--methods``, ``--seeds``)."""
    return (
        f"settings {', '.join(meta['settings'])}; methods {', '.join(meta['methods'])}; "
        f"seeds {' '.join(str(seed) for seed in meta['seeds'])}"
    )


def pareto_section(results: dict[str, Any]) -> list[str]:
    """The "Pareto front" section of report.md: per setting, the means, the front, the pairs."""
    pareto = results.get("pareto", {})
    if not pareto:
        return []
    lines = [
        "",
        "## Pareto front",
        "",
        "Final accuracy against total MB (every byte both ways), means over seeds. A method is "
        "on the front when no other method sends no more MB at no lower accuracy (and is "
        "better in one). Target: CMD + a codec at equal or better accuracy with at most "
        f"{PARETO_MAX_BYTES_RATIO:.2f} x the bytes of FedAvg + the same codec (no codec: plain "
        "CMD vs FedAvg).",
    ]
    for setting, found in pareto.items():
        lines += [
            "",
            f"### `{setting}`",
            "",
            "| method | runs | mean total MB | mean final accuracy (%) | on the front |",
            "|---|---|---|---|---|",
        ]
        for method, row in found["methods"].items():
            if row["mb_total"] is None:
                cells = [MISSING, MISSING, MISSING]
            else:
                on_front = "**yes**" if row["on_front"] else "no"
                cells = [f"{row['mb_total']:.3f}", f"{100 * row['final_accuracy']:.2f}", on_front]
            lines.append(
                f"| {row['label']} (`{method}`) | {row['runs']} | " + " | ".join(cells) + " |"
            )
        lines.append("")
        if found["pairs"]:
            lines += [f"- {pair['line']}" for pair in found["pairs"]]
        else:
            lines.append("- no codec pair (`fedavg[-codec]` with `cmd[-codec]`) in this setting")
        path = f"{setting}-{PARETO_PLOT[0]}.png"
        if path in results["plots"]:
            lines += ["", f"![{setting}: {PARETO_PLOT[1]}]({path})"]
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    """The content of ``report.md``."""
    meta = results["meta"]
    records = results["runs"]
    done = [r for r in records if r["status"] == "done"]
    problems = [r for r in records if r["status"] != "done"]
    lines = [
        f"# cmd-fl comparison: `{meta['preset']}` preset",
        "",
        f"{meta['preset_description']}. This comparison: {_scope(meta)}. "
        f"{len(done)} of {len(records)} runs done"
        + (" (interrupted: run the same command again to resume)" if meta["interrupted"] else "")
        + f". Created {meta['created']}.",
        "",
        f"Command: `{' '.join(meta['command']) or 'cmd-fl compare'}`",
        "",
        "Every run is one `scripts/run_simulation.sh` invocation: a real `flwr run` on a Ray "
        f"simulation with {meta['supernodes']} SuperNodes, the same data, partitions, seed and "
        "rounds for every method. Bytes are what crossed the network for every message, its "
        "objects and its Fleet API requests and responses (each run's `ledger.csv`; up = "
        "clients to server). Savings and accuracy differences are paired per "
        "seed with FedAvg: saving = 1 - (up + down) / (FedAvg up + FedAvg down). Cells are "
        "mean ± sample std over seeds (± 0 for one seed). Server wall time is the ServerApp's "
        "(`summary.json` wall_time_s); process wall time is the whole `flwr run` with SuperLink "
        "and Ray start-up; rounds 2..R is the ServerApp's time after round 1, which alone pays "
        "for starting Ray's actors (the methods' own per-round cost)"
        + (f", with {meta['jobs']} runs at a time (contention)" if meta["jobs"] > 1 else "")
        + ".",
        "",
        "## Targets",
        "",
    ]
    if results["targets"]:
        lines += [f"- **{t['verdict']}** {t['line']}" for t in results["targets"]]
    else:
        lines.append("- no CMD method in this comparison")
    for setting, by_method in results["aggregates"].items():
        rounds = sorted(
            {r["config"]["num-server-rounds"] for r in records if r["setting"] == setting}
        )
        seeds = sorted({r["seed"] for r in records if r["setting"] == setting})
        overlay = ", ".join(f"{k}={v}" for k, v in meta["settings"][setting].items())
        lines += [
            "",
            f"## Setting `{setting}`",
            "",
            f"{overlay}; {', '.join(map(str, rounds))} rounds; seeds {', '.join(map(str, seeds))}.",
            "",
            *setting_table(by_method, meta),
            "",
            *_budget_note(by_method),
        ]
        for stem, title in PLOTS:
            path = f"{setting}-{stem}.png"
            if path in results["plots"]:
                lines.append(f"![{setting}: {title}]({path})")
    lines += pareto_section(results)
    lines += ["", "## Runs", ""]
    lines += [
        "| run | status | final accuracy | MB up | MB down | server s | process s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in done:
        process = r.get("process_wall_s")
        lines.append(
            f"| `{r['run_name']}` | done | {r['final_accuracy']:.4f} | "
            f"{r['total_bytes_up'] / MB:.3f} | {r['total_bytes_down'] / MB:.3f} | "
            f"{r['wall_time_s']:.1f} | {MISSING if process is None else f'{process:.1f}'} |"
        )
    for r in problems:
        lines.append(
            f"| `{r['run_name']}` | **{r['status'].upper()}**: {r['reason']} | "
            f"{MISSING} | {MISSING} | {MISSING} | {MISSING} | {MISSING} |"
        )
    if problems:
        lines += ["", "Failed or missing runs (logs):", ""]
        lines += [f"- `{r['run_name']}`: {r['reason']} {r['log']}".rstrip() for r in problems]
    lines += ["", "## Methods", "", "| method | label | run-config overlay |", "|---|---|---|"]
    for name, method in meta["methods"].items():
        overlay = " ".join(f"{k}={json.dumps(v)}" for k, v in method["overlay"].items())
        lines.append(f"| `{name}` | {method['label']} | `{overlay}` |")
    for name, why in meta["skipped_methods"].items():
        lines.append(f"| `{name}` | not run | {why} |")
    lines += [
        "",
        "## Shared run config",
        "",
        "The preset's keys on top of `RunSettings`' defaults; every run's full config is in "
        "`results.json` and `runs/<run>.toml`.",
        "",
        "```json",
        json.dumps(meta["preset_config"], indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def write_plots(
    out: Path, aggregates: dict[str, dict[str, dict[str, Any]]], meta: dict[str, Any]
) -> list[str]:
    """One PNG per plot type and setting; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []
    for setting, by_method in aggregates.items():
        drawn = {m: agg["curves"] for m, agg in by_method.items() if agg["curves"]["round"]}
        if not drawn:
            continue
        for stem, title in PLOTS:
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
            for method, curve in drawn.items():
                name = meta["methods"][method]["label"]
                if stem == "accuracy":
                    mean, std = np.array(curve["accuracy"]), np.array(curve["accuracy_std"])
                    ax.plot(curve["round"], mean, marker=".", label=name)
                    ax.fill_between(curve["round"], mean - std, mean + std, alpha=0.2)
                elif stem == "accuracy-vs-mb":
                    ax.plot(curve["cumulative_mb"], curve["accuracy"], marker=".", label=name)
                elif stem == "bytes-per-round":
                    ax.plot(curve["round"], curve["mb"], marker=".", label=name)
                else:
                    share = [100 * e for e in curve["embedded"]]
                    ax.plot(curve["round"], share, marker=".", label=name)
            xlabel, ylabel = PLOT_AXES[stem]
            ax.set(xlabel=xlabel, ylabel=ylabel)
            if stem == "bytes-per-round":
                ax.set_ylim(bottom=0)
            elif stem == "embedded":
                ax.set_ylim(0, 100)
            ax.set_title(f"{meta['preset']} / {setting}: {title}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
            fig.tight_layout()
            file_name = f"{setting}-{stem}.png"
            fig.savefig(out / file_name, dpi=110)
            plt.close(fig)
            written.append(file_name)
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        _draw_pareto(ax, by_method, list(drawn), meta)
        ax.set_title(f"{meta['preset']} / {setting}: Pareto front")
        fig.tight_layout()
        file_name = f"{setting}-{PARETO_PLOT[0]}.png"
        fig.savefig(out / file_name, dpi=110)
        plt.close(fig)
        written.append(file_name)
    return written


def _draw_pareto(
    ax: Any, by_method: dict[str, dict[str, Any]], drawn: list[str], meta: dict[str, Any]
) -> None:
    """Final accuracy vs total MB: every run (light), each method's mean (labelled), the front.

    Colours follow the other plots (the colour cycle over the methods with finished runs).
    """
    means = method_means(by_method)
    for index, method in enumerate(drawn):
        if method not in means:
            continue
        agg, colour = by_method[method], f"C{index % 10}"
        name = meta["methods"][method]["label"]
        ax.scatter(
            agg["mb_total"]["values"],
            agg["final_accuracy"]["values"],
            color=colour,
            alpha=0.35,
            s=18,
            linewidths=0,
        )
        mb, accuracy = means[method]
        ax.scatter([mb], [accuracy], color=colour, s=70, edgecolors="black", label=name, zorder=3)
        ax.annotate(
            name, (mb, accuracy), textcoords="offset points", xytext=(6, 4), fontsize="x-small"
        )
    front = pareto_front(means)
    if front:
        xs, ys = [means[m][0] for m in front], [means[m][1] for m in front]
        ax.step(xs, ys, where="post", color="black", alpha=0.6, linewidth=1.2, zorder=2)
        ax.plot([], [], color="black", alpha=0.6, label="Pareto front (means)")
    totals = [mb for mb, _ in means.values()]
    if totals and min(totals) > 0 and max(totals) / min(totals) >= 10:
        ax.set_xscale("log")
    ax.margins(x=0.12, y=0.08)  # room for the labels of the outermost means
    ax.set(xlabel="total MB (up + down)", ylabel="final test accuracy (runs light, means large)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


# ----------------------------------------------------------------------------- the folder


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file, so that an interrupt never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_results(meta: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """The content of ``results.json`` (without the plot list)."""
    aggregates = aggregate(records, list(meta["settings"]), list(meta["methods"]))
    return {
        "meta": meta,
        "runs": records,
        "failed": [r["run_name"] for r in records if r["status"] != "done"],
        "aggregates": aggregates,
        "targets": evaluate_targets(aggregates, meta),
        "pareto": evaluate_pareto(aggregates, meta),
        "plots": [],
    }


def write_report(out: Path, meta: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Write ``results.json``, ``report.md`` and the plots into ``out``; return the results.

    Parameters
    ----------
    out : Path
        The report folder.
    meta : dict
        The comparison's description: ``preset``, ``preset_description``, ``supernodes``,
        ``preset_config``, ``settings`` (name -> overlay), ``methods`` (name -> label and
        overlay), ``skipped_methods``, ``seeds``, ``jobs``, ``command``, ``interrupted``,
        ``created``.
    records : list of dict
        One `run_record` or `failed_record` per planned run.
    """
    out.mkdir(parents=True, exist_ok=True)
    results = build_results(meta, records)
    results["plots"] = write_plots(out, results["aggregates"], meta)
    _write_atomic(out / "results.json", json.dumps(results, indent=2))
    _write_atomic(out / "report.md", render_markdown(results))
    return results
