"""The comparison driver (`simulations.compare`) and its report (`simulations.report`).

Fast tests feed the report synthetic summaries and drive the driver with a stand-in for
``scripts/run_simulation.sh``; one end-to-end test runs the ``quick`` preset through the real
``flwr run`` (Ray simulation) via ``python -m simulations.cli compare`` and checks that the
report's tables equal ``results.json`` and that the savings are those of the runs' ledgers.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cmd_fl.layout import ParameterLayout
from cmd_fl.ledger import ByteLedger
from simulations import compare, report
from simulations.client_app import app as client_app
from simulations.server_app import make_strategy
from simulations.settings import RunSettings
from simulations.task import build_model
from tests.inprocess_grid import InProcessGrid, csv_network_bytes

REPO = Path(__file__).resolve().parents[1]
E2E_TIMEOUT_S = 900  # the quick preset takes 2-3 min on 2 idle cores; this bounds a hung run
PLOT_STEMS = [stem for stem, _ in report.PLOTS]


# ----------------------------------------------------------------------------- helpers


def parse_tables(markdown: str) -> dict[str, dict[str, dict[str, str]]]:
    """``tables[setting][method][header] = cell`` from report.md's per-setting tables."""
    tables: dict[str, dict[str, dict[str, str]]] = {}
    setting = ""
    header: list[str] = []
    for line in markdown.splitlines():
        if line.startswith("## "):
            heading = re.match(r"## Setting `([^`]+)`", line)
            setting, header = (heading.group(1) if heading else ""), []
            if setting:
                tables[setting] = {}
            continue
        if not setting or not line.startswith("|"):
            header = [] if not line.startswith("|") else header
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "method":
            header = cells
        elif header and not set(cells[0]) <= {"-"}:
            method = re.search(r"`([^`]+)`", cells[0])
            assert method, line
            tables[setting][method.group(1)] = dict(zip(header, cells, strict=True))
    return tables


def assert_table_matches_results(results: dict[str, Any], markdown: str) -> int:
    """Every numeric cell equals its aggregate in results.json at the printed precision.

    Returns the number of cells checked.
    """
    tables = parse_tables(markdown)
    assert set(tables) == set(results["aggregates"])
    checked = 0
    for setting, by_method in results["aggregates"].items():
        assert set(tables[setting]) == set(by_method), setting
        for method, agg in by_method.items():
            row = tables[setting][method]
            assert row["runs"] == f"{agg['runs_done']}/{agg['runs_planned']}"
            for column in report.TABLE_COLUMNS:
                cell, value = row[column.header], agg[column.key]
                if value["mean"] is None:
                    assert cell == report.MISSING, (setting, method, column.key)
                    continue
                mean_text, std_text = cell.split(" ± ")
                tolerance = 0.5 * 10.0**-column.digits + 1e-12
                assert abs(float(mean_text) - value["mean"] * column.scale) <= tolerance
                assert abs(float(std_text) - value["std"] * column.scale) <= tolerance
                checked += 1
    return checked


def synthetic_summary(
    config: dict[str, Any],
    accuracy: float,
    up: int,
    down: int,
    wall_s: float = 10.0,
    rounds: int = 3,
) -> dict[str, Any]:
    """A summary.json as the ServerApp writes it, with ``up``/``down`` bytes over ``rounds``."""
    rows = [
        {
            "round": r,
            "accuracy": accuracy * r / rounds,
            "loss": 1.0 / r,
            "bytes_up": up // rounds + (up % rounds if r == rounds else 0),
            "bytes_down": down // rounds + (down % rounds if r == rounds else 0),
            "embedded_fraction": 0.1 * (r - 1),
            "state_version": r,
            "rejected_replies": 0,
            "elapsed_s": wall_s * r / rounds,
        }
        for r in range(1, rounds + 1)
    ]
    return {
        "run_name": config.get("run-name", "x"),
        "strategy": config.get("strategy", "cmd"),
        "config": config,
        "n_weights": 1000,
        "rounds": rows,
        "byte_counting": "network",
        "total_bytes_up": up,
        "total_bytes_down": down,
        "final_accuracy": accuracy,
        "first_state_messages": (
            {"nodes": 2, "max_bytes": up // 7, "mean_bytes": up // 8, "dense_bytes": up // 6}
            if config.get("strategy", "cmd") == "cmd"
            else {"nodes": 0, "max_bytes": 0, "mean_bytes": 0, "dense_bytes": up // 6}
        ),
        "rejected_replies": {"total": 0, "replies": []},
        "guard_events": [],
        "refresh_events": [],
        "wall_time_s": wall_s,
    }


def synthetic_meta(methods: list[str], settings: list[str], seeds: list[int]) -> dict[str, Any]:
    """The comparison description `report.write_report` expects."""
    return {
        "preset": "synthetic",
        "preset_description": "synthetic summaries",
        "supernodes": 2,
        "preset_config": {},
        "settings": {name: compare.SETTINGS[name] for name in settings},
        "methods": {
            name: {"label": compare.METHODS[name].label, "overlay": compare.METHODS[name].overlay}
            for name in methods
        },
        "skipped_methods": {},
        "seeds": seeds,
        "jobs": 1,
        "command": ["cmd-fl", "compare"],
        "interrupted": False,
        "created": "now",
    }


def synthetic_record(
    method: str, seed: int, accuracy: float, up: int, down: int, wall_s: float = 10.0
) -> dict[str, Any]:
    """A finished run's record built from a synthetic summary."""
    name = f"iid-{method}-s{seed}"
    config = {"run-name": name, "strategy": method, "num-server-rounds": 3}
    meta = {
        "run_name": name,
        "setting": "iid",
        "method": method,
        "label": compare.METHODS[method].label,
        "seed": seed,
        "config": config,
        "run_dir": "",
    }
    process = {"process_wall_s": wall_s + 5.0, "returncode": 0, "log": ""}
    return report.run_record(meta, synthetic_summary(config, accuracy, up, down, wall_s), process)


FAKE_RUNNER = """\
import json, os, sys, tomllib
from pathlib import Path

# What the ServerApp records is the full typed config; the driver passes every declared key.
with open(sys.argv[sys.argv.index("--run-config") + 1], "rb") as handle:
    config = tomllib.load(handle)
marker = Path(config["results-dir"]).parent / "launched.txt"
with marker.open("a") as handle:
    handle.write(config["run-name"] + " " + os.environ["FLWR_HOME"] + "\\n")
print("[fake] running", config["run-name"], flush=True)
if config["strategy"] == "{fail}":
    sys.exit(3)
if config["strategy"] == "{hang}":
    import time
    time.sleep(60)
up = {{"fedavg": 1000, "apf": 800, "cmd": 300}}[config["strategy"]]
rounds = [
    {{"round": r, "accuracy": 0.5, "loss": 1.0, "bytes_up": up, "bytes_down": up,
      "embedded_fraction": 0.0, "state_version": 0, "rejected_replies": 0, "elapsed_s": 1.0}}
    for r in range(1, config["num-server-rounds"] + 1)
]
total = up * config["num-server-rounds"]
summary = {{"run_name": config["run-name"], "config": config, "rounds": rounds,
           "total_bytes_up": total, "total_bytes_down": total, "final_accuracy": 0.5,
           "wall_time_s": 1.0, "byte_counting": "network"}}
out = Path(config["results-dir"]) / config["run-name"]
out.mkdir(parents=True, exist_ok=True)
(out / "summary.json").write_text(json.dumps(summary))
"""


def fake_script(tmp_path: Path, fail: str = "", hang: str = "") -> Path:
    """A stand-in for run_simulation.sh that writes a summary (strategy ``fail`` exits 3)."""
    runner = tmp_path / "fake_runner.py"
    runner.write_text(FAKE_RUNNER.format(fail=fail, hang=hang))
    script = tmp_path / "fake_run_simulation.sh"
    script.write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" "{runner}" "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def launched(out: Path) -> list[str]:
    """Run names the fake script was started for."""
    return [name for name, _ in launches(out)]


def launches(out: Path) -> list[tuple[str, str]]:
    """(run name, FLWR_HOME) of every start of the fake script."""
    marker = out / "launched.txt"
    lines = marker.read_text().splitlines() if marker.exists() else []
    return [(line.split()[0], line.split()[1]) for line in lines]


# ----------------------------------------------------------------------------- aggregation


def test_stat_is_mean_and_sample_std() -> None:
    # Prepare / Execute
    three, one, none = report.stat([0.8, 0.9, 1.0]), report.stat([0.7]), report.stat([])
    # Assert
    np.testing.assert_allclose([three["mean"], three["std"]], [0.9, 0.1])
    assert three["n"] == 3
    assert (one["mean"], one["std"], one["n"]) == (0.7, 0.0, 1)
    assert (none["mean"], none["std"], none["n"]) == (None, None, 0)


def test_savings_and_accuracy_are_paired_per_seed() -> None:
    # Prepare: FedAvg totals 400 and 800 bytes; CMD 100 and 320 -> savings 0.75 and 0.6.
    records = [
        synthetic_record("fedavg", 0, 0.90, 200, 200, wall_s=10.0),
        synthetic_record("fedavg", 1, 0.80, 400, 400, wall_s=20.0),
        synthetic_record("cmd", 0, 0.89, 60, 40, wall_s=11.0),
        synthetic_record("cmd", 1, 0.82, 200, 120, wall_s=20.0),
        synthetic_record("cmd", 2, 0.50, 1, 1),  # no FedAvg run for seed 2: not paired
    ]
    # Execute
    agg = report.aggregate(records, ["iid"], ["fedavg", "cmd"])["iid"]
    # Assert
    cmd = agg["cmd"]
    assert cmd["paired_seeds"] == [0, 1]
    np.testing.assert_allclose(cmd["savings_vs_fedavg"]["values"], [0.75, 0.6])
    np.testing.assert_allclose(cmd["savings_vs_fedavg"]["mean"], 0.675)
    np.testing.assert_allclose(cmd["savings_vs_fedavg"]["std"], np.std([0.75, 0.6], ddof=1))
    np.testing.assert_allclose(cmd["accuracy_vs_fedavg_points"]["values"], [-1.0, 2.0])
    np.testing.assert_allclose(cmd["final_accuracy"]["mean"], np.mean([0.89, 0.82, 0.50]))
    np.testing.assert_allclose(cmd["mb_up"]["values"], [60e-6, 200e-6, 1e-6])
    np.testing.assert_allclose(cmd["wall_time_ratio_vs_fedavg"]["values"], [1.1, 1.0])
    np.testing.assert_allclose(agg["fedavg"]["savings_vs_fedavg"]["values"], [0.0, 0.0])
    assert agg["fedavg"]["runs_done"] == 2


def test_curves_average_the_runs_that_reached_each_round() -> None:
    # Prepare
    long = synthetic_record("cmd", 0, 0.9, 300, 300)
    short = synthetic_record("cmd", 1, 0.6, 300, 300)
    short["rounds"] = short["rounds"][:2]
    # Execute
    curve = report.curves([long, short])
    # Assert
    assert curve["round"] == [1, 2, 3]
    np.testing.assert_allclose(curve["accuracy"], [(0.3 + 0.2) / 2, (0.6 + 0.4) / 2, 0.9])
    np.testing.assert_allclose(curve["cumulative_mb"], [200e-6, 400e-6, 600e-6])


def test_accuracy_at_equal_mb_reads_each_runs_ledger() -> None:
    # Prepare: FedAvg sends 200 B a round; CMD 100 B a round (300 B in all, the leanest).
    fedavg = synthetic_record("fedavg", 0, 0.9, 300, 300)
    cmd = synthetic_record("cmd", 0, 0.6, 150, 150)
    # Execute
    agg = report.aggregate([fedavg, cmd], ["iid"], ["fedavg", "cmd"])["iid"]
    # Assert: within CMD's 300 B FedAvg completed its first round only (accuracy 0.3).
    assert agg["cmd"]["budget_mb"] == agg["fedavg"]["budget_mb"] == pytest.approx(300e-6)
    assert agg["fedavg"]["accuracy_at_budget"]["values"] == [pytest.approx(0.3)]
    assert agg["cmd"]["accuracy_at_budget"]["values"] == [pytest.approx(0.6)]
    assert report.accuracy_within(fedavg, 199e-6) is None
    assert report.accuracy_within(fedavg, 1.0) == pytest.approx(0.9)


def test_targets_are_measured_not_hard_coded() -> None:
    # Prepare: CMD sends 30 % of FedAvg's bytes, 0.2 points less accurate, 1.2 x slower;
    # APF sends more and is less accurate.
    records = [
        synthetic_record("fedavg", 0, 0.900, 500, 500, wall_s=10.0),
        synthetic_record("apf", 0, 0.880, 400, 400, wall_s=10.0),
        synthetic_record("cmd", 0, 0.898, 150, 150, wall_s=12.0),
    ]
    meta = synthetic_meta(["fedavg", "apf", "cmd"], ["iid"], [0])
    # Execute
    targets = report.evaluate_targets(
        report.aggregate(records, ["iid"], list(meta["methods"])), meta
    )
    # Assert
    verdicts = {t["target"]: t for t in targets}
    assert verdicts["bytes"]["verdict"] == "PASS"
    np.testing.assert_allclose(verdicts["bytes"]["bytes_ratio"], 0.3)
    assert "30.0 %" in verdicts["bytes"]["line"] and "-0.20 points" in verdicts["bytes"]["line"]
    assert verdicts["trade-off"]["verdict"] == "PASS"
    assert "CMD dominates" in verdicts["trade-off"]["line"]
    assert verdicts["wall time"]["verdict"] == "FAIL"
    assert "1.20 x" in verdicts["wall time"]["line"]


def test_tradeoff_says_where_neither_dominates() -> None:
    records = [
        synthetic_record("fedavg", 0, 0.90, 500, 500),
        synthetic_record("apf", 0, 0.91, 400, 400),
        synthetic_record("cmd", 0, 0.88, 150, 150),  # fewer bytes, 3 points less accurate
    ]
    meta = synthetic_meta(["fedavg", "apf", "cmd"], ["iid"], [0])
    targets = report.evaluate_targets(
        report.aggregate(records, ["iid"], list(meta["methods"])), meta
    )
    by_target = {t["target"]: t for t in targets}
    assert by_target["trade-off"]["verdict"] == "MIXED"
    assert "CMD sends fewer bytes, APF is more accurate" in by_target["trade-off"]["line"]
    assert by_target["bytes"]["verdict"] == "FAIL"  # -3 points


def test_a_preset_sets_its_own_targets() -> None:
    # CMD at 46 % of FedAvg's bytes, 0.9 points lower: fails the default targets (40 %, 0.5
    # points), passes the cross-device preset's (50 %, 1 point).
    records = [
        synthetic_record("fedavg", 0, 0.900, 500, 500),
        synthetic_record("cmd", 0, 0.891, 230, 230),
    ]
    meta = synthetic_meta(["fedavg", "cmd"], ["iid"], [0])
    aggregates = report.aggregate(records, ["iid"], list(meta["methods"]))
    default = {t["target"]: t for t in report.evaluate_targets(aggregates, meta)}
    assert default["bytes"]["verdict"] == "FAIL"
    assert "target <= 40 %" in default["bytes"]["line"]
    meta["targets"] = compare.PRESETS["cross-device"].targets
    own = {t["target"]: t for t in report.evaluate_targets(aggregates, meta)}
    assert own["bytes"]["verdict"] == "PASS"
    assert "target <= 50 %" in own["bytes"]["line"] and "(target >= -1.00)" in own["bytes"]["line"]
    # Synthetic runs climb linearly to their final accuracy over 3 rounds: 2/3 of the gap.
    assert "last 10 rounds -0.60" in own["bytes"]["line"]


def test_targets_skip_without_fedavg() -> None:
    records = [synthetic_record("cmd", 0, 0.9, 150, 150)]
    meta = synthetic_meta(["cmd"], ["iid"], [0])
    targets = report.evaluate_targets(report.aggregate(records, ["iid"], ["cmd"]), meta)
    assert {t["verdict"] for t in targets} == {"SKIP"}


def test_report_files_and_tables_equal_results_json(tmp_path: Path) -> None:
    # Prepare: two seeds, three methods, one failed run.
    records = [
        synthetic_record("fedavg", 0, 0.9012, 123_456, 120_000),
        synthetic_record("fedavg", 1, 0.8876, 123_456, 120_000),
        synthetic_record("apf", 0, 0.8999, 100_000, 110_000),
        synthetic_record("cmd", 0, 0.9050, 40_000, 45_000),
        synthetic_record("cmd", 1, 0.8800, 41_000, 46_000),
    ]
    failed_meta = {**{k: records[2][k] for k in ("setting", "method", "label", "config")}}
    records.append(
        report.failed_record(
            {**failed_meta, "run_name": "iid-apf-s1", "seed": 1, "run_dir": ""}, "exit 1", "x.log"
        )
    )
    meta = synthetic_meta(["fedavg", "apf", "cmd"], ["iid"], [0, 1])
    # Execute
    results = report.write_report(tmp_path, meta, records)
    # Assert
    markdown = (tmp_path / "report.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text()) == results
    # Every cell but the first state message of the two methods without CMD state (n/a).
    assert assert_table_matches_results(results, markdown) == 3 * len(report.TABLE_COLUMNS) - 2
    assert results["failed"] == ["iid-apf-s1"]
    assert "**FAILED**: exit 1" in markdown
    assert "This comparison: settings iid; methods fedavg, apf, cmd; seeds 0 1." in markdown
    assert parse_tables(markdown)["iid"]["apf"]["runs"] == "1/2"
    for stem in PLOT_STEMS:
        assert (tmp_path / f"iid-{stem}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"(iid-{stem}.png)" in markdown
    for target in results["targets"]:
        assert f"**{target['verdict']}** {target['line']}" in markdown


# ----------------------------------------------------------------------------- the driver


def test_plan_gives_every_method_the_same_config_but_its_overlay(tmp_path: Path) -> None:
    plan = compare.make_plan(
        "paper", tmp_path, seeds=[4], methods=["fedavg", "cmd-paper"], rounds=7
    )
    assert [s.run_name for s in plan.runs] == [
        "iid-fedavg-s4",
        "iid-cmd-paper-s4",
        "dirichlet-fedavg-s4",
        "dirichlet-cmd-paper-s4",
    ]
    fedavg, paper = plan.runs[0].config, plan.runs[1].config
    overlay_keys = set(compare.METHODS["cmd-paper"].overlay) | {"run-name"}
    assert {k for k in fedavg if fedavg[k] != paper[k]} <= overlay_keys
    assert paper["cmd-max-embedded"] == 1.0 and paper["cmd-selection"] == "stability"
    assert fedavg["num-server-rounds"] == 7 and fedavg["seed"] == 4
    assert fedavg["results-dir"] == str(tmp_path / "runs")
    assert plan.runs[2].config["partitioning"] == "dirichlet"
    assert plan.runs[2].config["dirichlet-alpha"] == 0.5
    RunSettings.from_run_config(paper)  # a valid config


def test_unknown_method_and_undeclared_keys_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown method 'fedprox'"):
        compare.make_plan("quick", tmp_path, methods=["fedavg", "fedprox"])
    declared = compare.declared_run_config_keys() - {"apf-alpha"}
    with pytest.raises(ValueError, match=r"method 'apf' cannot run here.*apf-alpha"):
        compare.make_plan("quick", tmp_path, methods=["apf"], declared=declared)
    # The quick preset's APF is optional: left out with a note, not an error.
    plan = compare.make_plan("quick", tmp_path, declared=declared)
    assert plan.methods == ["fedavg", "cmd"] and "apf" in plan.skipped_methods


def test_cross_device_preset_samples_10_of_100_clients_for_100_rounds(tmp_path: Path) -> None:
    # Prepare
    plan = compare.make_plan("cross-device", tmp_path)
    settings = [RunSettings.from_run_config(spec.config) for spec in plan.runs]
    fedavg = next(s for s in settings if s.strategy == "fedavg" and s.codec == "none")
    layout = ParameterLayout.from_module(build_model(fedavg.dataset))
    strategy = make_strategy(fedavg, layout, ByteLedger())
    grid = InProcessGrid(client_app, plan.preset.supernodes, fedavg.to_run_config())

    # Execute: the sampling of 20 rounds, as the ServerApp's strategy does it
    sampled = [strategy.sample_train_nodes(grid, r) for r in range(1, 21)]

    # Assert: the plan
    assert plan.preset.supernodes == 100
    assert plan.settings == ["dirichlet"] and plan.seeds == [0, 1]
    assert plan.methods == ["fedavg", "fedavg-int8", "cmd", "cmd-int8"]
    assert [s.run_name for s in plan.runs][:4] == [
        "dirichlet-fedavg-s0",
        "dirichlet-fedavg-int8-s0",
        "dirichlet-cmd-s0",
        "dirichlet-cmd-int8-s0",
    ]
    for s in settings:
        assert (s.dataset, s.train_subset, s.num_partitions) == ("fashion-mnist", 0, 100)
        assert (s.partitioning, s.dirichlet_alpha) == ("dirichlet", 0.5)
        assert (s.num_server_rounds, s.fraction_train) == (100, 0.1)
        # Every method trains with FedAvg's best recipe tried: plain SGD, 3 local epochs.
        assert (s.learning_rate, s.momentum, s.local_epochs) == (0.1, 0.0, 3)
        # A round that waited for more nodes than there are SuperNodes would never start.
        assert s.min_available_nodes == plan.preset.supernodes
    assert {(s.strategy, s.codec) for s in settings} == {
        ("fedavg", "none"),
        ("fedavg", "int8"),
        ("cmd", "none"),
        ("cmd", "int8"),
    }
    # Assert: exactly 10 distinct nodes per round, as the strategy samples them
    assert all(len(ids) == len(set(ids)) == 10 for ids in sampled)
    assert len({tuple(ids) for ids in sampled}) > 1  # a new sample every round


def test_run_config_file_round_trips_through_toml(tmp_path: Path) -> None:
    spec = compare.make_plan("quick", tmp_path / "out", methods=["cmd"]).runs[0]
    path = tmp_path / "run.toml"
    compare.write_run_config(spec, path)
    assert tomllib.loads(path.read_text()) == spec.passed


def test_a_failed_run_does_not_stop_the_others_and_resume_runs_nothing(tmp_path: Path) -> None:
    # Prepare: a stand-in script; APF's run fails.
    out = tmp_path / "out"
    plan = compare.make_plan("quick", out, seeds=[0, 1], methods=["fedavg", "apf", "cmd"])
    stream = (tmp_path / "progress.txt").open("w")
    # Execute
    _, results = compare.compare(plan, script=fake_script(tmp_path, fail="apf"), stream=stream)
    # Assert
    assert launched(out) == [s.run_name for s in plan.runs]
    assert results["failed"] == ["iid-apf-s0", "iid-apf-s1"]
    failed = {r["run_name"]: r for r in results["runs"] if r["status"] != "done"}
    assert failed["iid-apf-s0"]["reason"] == "exit 3"
    assert "[fake] running iid-apf-s0" in (out / "runs" / "iid-apf-s0.log").read_text()
    np.testing.assert_allclose(
        results["aggregates"]["iid"]["cmd"]["savings_vs_fedavg"]["mean"], 0.7
    )
    progress = (tmp_path / "progress.txt").read_text()
    assert progress.count("started") == 6 and progress.count("FAILED (exit 3)") == 2

    # Execute: the same comparison again, with the failing method fixed.
    (out / "launched.txt").unlink()
    second, results2 = compare.compare(plan, script=fake_script(tmp_path), stream=stream)
    # Assert: only the failed runs ran again.
    assert launched(out) == ["iid-apf-s0", "iid-apf-s1"]
    assert second.ran == ["iid-apf-s0", "iid-apf-s1"]
    assert results2["failed"] == []

    # Execute: a third time: everything is done.
    (out / "launched.txt").unlink()
    third, results3 = compare.compare(plan, script=fake_script(tmp_path, fail="cmd"), stream=stream)
    assert launched(out) == [] and third.ran == []
    assert sorted(third.skipped) == sorted(s.run_name for s in plan.runs)
    assert results3["aggregates"] == results2["aggregates"]


def test_a_changed_config_reruns(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = fake_script(tmp_path)
    with (tmp_path / "progress.txt").open("w") as stream:
        compare.compare(
            compare.make_plan("quick", out, methods=["fedavg"]), script=script, stream=stream
        )
        (out / "launched.txt").unlink()
        plan = compare.make_plan("quick", out, methods=["fedavg"], rounds=3)
        outcome, results = compare.compare(plan, script=script, stream=stream)
    assert outcome.ran == ["iid-fedavg-s0"]
    assert len(results["runs"][0]["rounds"]) == 3


def test_a_run_that_counted_wire_bytes_only_reruns(tmp_path: Path) -> None:
    # A summary written before totals counted control bytes has no "byte_counting".
    out = tmp_path / "out"
    script = fake_script(tmp_path)
    plan = compare.make_plan("quick", out, methods=["fedavg"])
    with (tmp_path / "progress.txt").open("w") as stream:
        compare.compare(plan, script=script, stream=stream)
        summary_path = out / "runs" / "iid-fedavg-s0" / "summary.json"
        summary = json.loads(summary_path.read_text())
        del summary["byte_counting"]
        summary_path.write_text(json.dumps(summary))
        (out / "launched.txt").unlink()
        outcome, _ = compare.compare(plan, script=script, stream=stream)
    assert outcome.ran == ["iid-fedavg-s0"]
    progress = (tmp_path / "progress.txt").read_text()
    assert "wire bytes only in its totals (older run): will rerun" in progress


def test_report_only_starts_nothing_and_reports_the_done_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    script = fake_script(tmp_path)
    with (tmp_path / "progress.txt").open("w") as stream:
        compare.compare(
            compare.make_plan("quick", out, methods=["fedavg", "cmd"], seeds=[0]),
            script=script,
            stream=stream,
        )
        (out / "launched.txt").unlink()
        plan = compare.make_plan("quick", out, methods=["fedavg", "cmd"], seeds=[0, 1])
        outcome, results = compare.compare(plan, script=script, stream=stream, report_only=True)
    assert not (out / "launched.txt").exists() and outcome.ran == []
    status = {r["run_name"]: r["status"] for r in results["runs"]}
    assert status == {
        "iid-fedavg-s0": "done",
        "iid-cmd-s0": "done",
        "iid-fedavg-s1": "not run",
        "iid-cmd-s1": "not run",
    }
    assert results["aggregates"]["iid"]["cmd"]["runs_done"] == 1
    assert "2 of 4 runs done" in (out / "report.md").read_text()


def test_only_keys_the_strategy_reads_make_a_run_stale() -> None:
    base = RunSettings().to_run_config()
    fedavg = {**base, "strategy": "fedavg"}
    cmd = {**base, "strategy": "cmd"}
    assert compare.config_mismatch({**fedavg, "cmd-modes": 3}, fedavg) == []
    assert compare.config_mismatch({**fedavg, "seed": 7}, fedavg) == ["seed"]
    assert compare.config_mismatch({**cmd, "cmd-modes": 3}, cmd) == ["cmd-modes"]
    assert compare.config_mismatch({**cmd, "apf-alpha": 0.5}, cmd) == []
    # A key the recorded run did not know yet counts as changed for the strategy reading it.
    old = {k: v for k, v in cmd.items() if k != "cmd-refresh-refit"}
    assert compare.config_mismatch(cmd, old) == ["cmd-refresh-refit"]
    # A codec option matters only to a run with a codec.
    plain = {**cmd, "codec": "none"}
    assert compare.config_mismatch({**plain, "codec-keyframes": False}, plain) == []
    int8 = {**cmd, "codec": "int8"}
    assert compare.config_mismatch({**int8, "codec-keyframes": False}, int8) == ["codec-keyframes"]
    # A report folder copied elsewhere keeps its runs: results-dir is where, not what.
    moved = {**cmd, "results-dir": "/elsewhere/runs", "seed": 3}
    assert compare.config_mismatch(moved, cmd) == ["seed"]


def test_a_hung_run_is_stopped_at_its_timeout(tmp_path: Path) -> None:
    out = tmp_path / "out"
    plan = compare.make_plan("quick", out, methods=["fedavg", "cmd"])
    started = time.monotonic()
    with (tmp_path / "progress.txt").open("w") as stream:
        _, results = compare.compare(
            plan, run_timeout_s=5.0, script=fake_script(tmp_path, hang="fedavg"), stream=stream
        )
    assert time.monotonic() - started < 40
    assert results["failed"] == ["iid-fedavg-s0"], results["runs"]
    assert results["runs"][0]["reason"] == "timed out after 5 s"
    assert results["runs"][1]["status"] == "done"


INTERRUPTIBLE = """\
import signal, sys
from pathlib import Path
from simulations import compare

signal.signal(signal.SIGINT, signal.default_int_handler)
plan = compare.make_plan("quick", Path(sys.argv[1]), methods=["fedavg", "apf", "cmd"])
outcome, _ = compare.compare(plan, script=Path(sys.argv[2]), stream=sys.stdout)
print("interrupted" if outcome.interrupted else "finished", flush=True)
"""


def test_an_interrupt_stops_the_running_run_and_keeps_the_done_ones(tmp_path: Path) -> None:
    # Prepare: CMD's run hangs; the driver runs in its own process.
    out, driver = tmp_path / "out", tmp_path / "driver.py"
    driver.write_text(INTERRUPTIBLE)
    proc = subprocess.Popen(
        [sys.executable, str(driver), str(out), str(fake_script(tmp_path, hang="cmd"))],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # wait until the hanging run has started
        lines.append(line)
        if "iid-cmd-s0: started" in line:
            break
    # Execute: Ctrl-C.
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=60)
    output = "".join(lines) + rest
    # Assert: the report holds the finished runs; the interrupted one reruns next time.
    assert proc.returncode == 0, output
    assert output.rstrip().endswith("interrupted"), output
    results = json.loads((out / "results.json").read_text())
    status = {r["run_name"]: r["status"] for r in results["runs"]}
    assert status == {"iid-fedavg-s0": "done", "iid-apf-s0": "done", "iid-cmd-s0": "interrupted"}
    assert results["meta"]["interrupted"] is True
    assert "interrupted: run the same command again to resume" in (out / "report.md").read_text()
    (out / "launched.txt").unlink()
    plan = compare.make_plan("quick", out, methods=["fedavg", "apf", "cmd"])
    with (tmp_path / "progress.txt").open("w") as stream:
        _, results = compare.compare(plan, script=fake_script(tmp_path), stream=stream)
    assert launched(out) == ["iid-cmd-s0"] and results["failed"] == []


def test_jobs_run_side_by_side_with_their_own_flower_home(tmp_path: Path) -> None:
    out = tmp_path / "out"
    plan = compare.make_plan("quick", out, seeds=[0, 1], methods=["fedavg", "cmd"])
    with (tmp_path / "progress.txt").open("w") as stream:
        outcome, results = compare.compare(
            plan, jobs=3, script=fake_script(tmp_path), stream=stream
        )
    assert sorted(launched(out)) == sorted(s.run_name for s in plan.runs)
    assert results["failed"] == [] and sorted(outcome.ran) == sorted(launched(out))
    homes = {home for _, home in launches(out)}
    assert homes == {str(out / "flwr-home" / f"job{job}") for job in range(3)}
    assert "3 runs at a time" in (out / "report.md").read_text()


# ----------------------------------------------------------------------------- end to end


@dataclass
class QuickComparison:
    """What ``cmd-fl compare --preset quick`` left behind."""

    out: Path
    returncode: int
    output: str
    wall_s: float
    results: dict[str, Any]
    markdown: str


def processes_under(folder: Path) -> list[int]:
    """PIDs of live processes whose FLWR_HOME lies under ``folder``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(e.startswith(f"FLWR_HOME={folder}".encode()) for e in environ):
            found.append(int(proc.name))
    return found


def run_cli(out: Path, *extra: str) -> tuple[int, str, float]:
    """``python -m simulations.cli compare --preset quick --out OUT``; returns status, output, s."""
    started = time.monotonic()
    command = [sys.executable, "-m", "simulations.cli", "compare", "--preset", "quick"]
    proc = subprocess.Popen(
        [*command, "--out", str(out), *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=E2E_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)  # the driver stops its runs in order
        output, _ = proc.communicate(timeout=120)
        output += f"\n[test] timed out after {E2E_TIMEOUT_S} s"
    return proc.returncode, output, time.monotonic() - started


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuickComparison]:
    """One quick-preset comparison through the real engine, shared by the tests below."""
    out = tmp_path_factory.mktemp("compare") / "quick"
    returncode, output, wall_s = run_cli(out)
    sys.stdout.write(f"\n[test] quick comparison took {wall_s:.1f} s\n")
    results = (
        json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    )
    markdown = (out / "report.md").read_text() if (out / "report.md").exists() else ""
    yield QuickComparison(out, returncode, output, wall_s, results, markdown)
    for pid in processes_under(out):  # never leave Ray behind, even if a test failed
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def ledger_totals(path: Path) -> dict[str, int]:
    """Network bytes per direction, summed over a run's ledger.csv."""
    with path.open(newline="") as handle:
        return csv_network_bytes(csv.DictReader(handle))


@pytest.mark.timeout(E2E_TIMEOUT_S + 300)
def test_quick_preset_writes_every_report_file(quick: QuickComparison) -> None:
    assert quick.returncode == 0, quick.output[-4000:]
    plan = compare.make_plan("quick", quick.out)
    assert quick.results["failed"] == []
    for spec in plan.runs:
        assert f"{spec.run_name}: started" in quick.output
        assert re.search(rf"{spec.run_name}: done in \d+ s: accuracy", quick.output)
        run_dir = quick.out / "runs" / spec.run_name
        assert (run_dir / "summary.json").exists() and (run_dir / "ledger.csv").exists()
        assert (
            "[cmd-fl] results written to"
            in (quick.out / "runs" / f"{spec.run_name}.log").read_text()
        )
    for name in ["report.md", "results.json"] + [f"iid-{stem}.png" for stem in PLOT_STEMS]:
        assert (quick.out / name).stat().st_size > 0, name
    assert processes_under(quick.out) == [], "processes outlived the comparison"


def test_quick_preset_tables_equal_results_json(quick: QuickComparison) -> None:
    assert quick.results, quick.output[-4000:]
    assert assert_table_matches_results(quick.results, quick.markdown) > 0
    for target in quick.results["targets"]:
        assert f"**{target['verdict']}** {target['line']}" in quick.markdown
        assert f"{target['verdict']}: {target['line']}" in quick.output


def test_quick_preset_savings_come_from_the_ledgers(quick: QuickComparison) -> None:
    assert quick.results, quick.output[-4000:]
    runs = {r["run_name"]: r for r in quick.results["runs"]}
    totals = {name: ledger_totals(quick.out / "runs" / name / "ledger.csv") for name in runs}
    for name, record in runs.items():
        assert record["total_bytes_up"] == totals[name]["up"] > 0
        assert record["total_bytes_down"] == totals[name]["down"] > 0
        assert [row["round"] for row in record["rounds"]] == list(range(1, 9))
    tables = parse_tables(quick.markdown)
    fedavg = sum(totals["iid-fedavg-s0"].values())
    for method, agg in quick.results["aggregates"]["iid"].items():
        saving = 1.0 - sum(totals[f"iid-{method}-s0"].values()) / fedavg
        np.testing.assert_allclose(agg["savings_vs_fedavg"]["mean"], saving, rtol=0, atol=1e-12)
        cell = tables["iid"][method]["saved vs FedAvg (%)"]
        assert cell == f"{100 * saving:.1f} ± 0.0"
    assert quick.results["aggregates"]["iid"]["cmd"]["savings_vs_fedavg"]["mean"] > 0


def test_quick_preset_resume_runs_nothing(quick: QuickComparison) -> None:
    assert quick.returncode == 0, quick.output[-4000:]
    logs = {p: p.stat().st_mtime_ns for p in (quick.out / "runs").glob("*.log")}
    returncode, output, wall_s = run_cli(quick.out)
    assert returncode == 0, output[-4000:]
    assert "started" not in output
    assert output.count("done earlier, skipped") == len(logs)
    assert {p: p.stat().st_mtime_ns for p in logs} == logs
    assert wall_s < 60
    again = json.loads((quick.out / "results.json").read_text())
    assert again["aggregates"] == quick.results["aggregates"]
