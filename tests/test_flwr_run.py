"""End to end through the real ``flwr run``: Ray simulation, managed SuperLink, results on disk.

One CMD run on digits (4 SuperNodes, 6 rounds, warm-up 2, an embedding event every round) goes
through ``scripts/run_simulation.sh``, the README's command, with its own FLWR_HOME, SuperLink
port and working directory. Flower reports a run whose ClientApps raised as completed with exit
code 0, so the tests read what the ServerApp wrote: ``summary.json`` and ``ledger.csv``.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from simulations.settings import RunSettings
from tests.inprocess_grid import csv_network_bytes

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "run_simulation.sh"

NUM_SUPERNODES = 4
NUM_ROUNDS = 6
WARMUP = 2
RUN_NAME = "e2e-digits"
RUN_TIMEOUT_S = 240  # the run takes about 40 s on 2 idle cores; this bounds a hung run
CHANCE_ACCURACY = 0.1  # ten classes; the run reaches about 0.9


@dataclass
class FlowerRun:
    """What one ``flwr run`` left behind."""

    returncode: int
    output: str
    summary: dict[str, Any]
    ledger: list[dict[str, str]]
    leftover_processes: list[str]
    wall_s: float


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def processes_of(flwr_home: Path) -> dict[int, str]:
    """PID -> command line of every live process started under this FLWR_HOME.

    SuperLink, SuperExec, the simulation, Ray's daemons and actors all inherit the environment
    of the script that started them, so the unique FLWR_HOME marks exactly this run's processes.
    """
    marker = f"FLWR_HOME={flwr_home}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if marker in (proc / "environ").read_bytes().split(b"\0"):
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found[int(proc.name)] = cmdline.strip()
        except OSError:  # gone, or not ours to read
            continue
    return found


def stop_processes_of(flwr_home: Path, grace_s: float) -> list[str]:
    """Wait up to ``grace_s`` for this run's processes to exit, then kill the rest.

    Returns the command lines of those that had to be killed.
    """
    deadline = time.monotonic() + grace_s
    while (left := processes_of(flwr_home)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return sorted(left.values())


def run_script(
    tmp: Path, run_config: str, env_extra: dict[str, str] | None = None
) -> tuple[int, str, list[str], float]:
    """Run ``scripts/run_simulation.sh`` once with its own FLWR_HOME, port and working directory.

    Returns the exit code, the output, the command lines of processes left behind (killed)
    and the wall time.
    """
    flwr_home, cwd = tmp / "flwr-home", tmp / "cwd"
    for folder in (flwr_home, cwd):
        folder.mkdir()
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        CMD_FL_SUPERLINK_PORT=str(free_port()),
        CMD_FL_SUPERNODES=str(NUM_SUPERNODES),
        CMD_FL_CLIENT_CPUS="1",
        CMD_FL_BIN=str(Path(sys.executable).parent),  # this environment's flwr
    )
    env.update(env_extra or {})
    started = time.monotonic()
    # A new session: on a timeout the whole tree can be signalled without touching pytest.
    proc = subprocess.Popen(
        ["bash", str(SCRIPT), "--run-config", run_config],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the script's trap stops its SuperLink
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        output += f"\n[test] flwr run timed out after {RUN_TIMEOUT_S} s"
    finally:
        if proc.poll() is None:  # interrupted: Ctrl-C, pytest-timeout
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        # Ray actors may take a moment to notice their driver is gone.
        leftover = stop_processes_of(flwr_home, grace_s=15)
    return proc.returncode, output, leftover, time.monotonic() - started


def run_simulation(tmp: Path) -> FlowerRun:
    """Run the app once through ``scripts/run_simulation.sh`` and collect its results."""
    results = tmp / "results"
    results.mkdir()
    run_config = (
        f"dataset='digits' num-server-rounds={NUM_ROUNDS} cmd-warmup={WARMUP} "
        f"cmd-embed-every=1 results-dir='{results}' run-name='{RUN_NAME}'"
    )  # every other key at its default: the defaults must learn on digits
    returncode, output, leftover, wall_s = run_script(tmp, run_config)

    out_dir = results / RUN_NAME
    summary_path, ledger_path = out_dir / "summary.json", out_dir / "ledger.csv"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    ledger: list[dict[str, str]] = []
    if ledger_path.exists():
        with ledger_path.open(newline="") as handle:
            ledger = list(csv.DictReader(handle))
    return FlowerRun(returncode, output, summary, ledger, leftover, wall_s)


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowerRun]:
    """One end-to-end run shared by the tests of this module."""
    run = run_simulation(tmp_path_factory.mktemp("flwr-run"))
    sys.stdout.write(f"\n[test] flwr run took {run.wall_s:.1f} s\n")
    yield run


def describe_output(returncode: int, output: str) -> str:
    """The end of a run's output, for assertion messages."""
    return f"exit code {returncode}; output tail:\n{output[-4000:]}"


def describe(run: FlowerRun) -> str:
    """The end of the run's output, for assertion messages."""
    return describe_output(run.returncode, run.output)


def results(run: FlowerRun) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """The run's summary and ledger rows; fails with the run's output if either is missing."""
    assert run.summary, f"no summary.json; {describe(run)}"
    assert run.ledger, f"no ledger.csv rows; {describe(run)}"
    return run.summary, run.ledger


def uplink_bytes_per_message(
    ledger: list[dict[str, str]], direction: str = "up"
) -> dict[int, float]:
    """Mean wire bytes of the training replies (``direction="down"``: instructions), per round."""
    per_round: dict[int, list[int]] = defaultdict(list)
    for row in ledger:
        if row["phase"] == "train" and row["direction"] == direction:
            per_round[int(row["round"])].append(int(row["wire_bytes"]))
    return {r: sum(sizes) / len(sizes) for r, sizes in sorted(per_round.items())}


def downlink_bytes_per_message(ledger: list[dict[str, str]]) -> dict[int, float]:
    """Mean wire bytes of the training instructions, per round."""
    return uplink_bytes_per_message(ledger, "down")


def test_pyproject_declares_every_run_setting_with_its_default() -> None:
    # Flower accepts `--run-config` overrides only for keys declared in pyproject.toml.
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    expected = RunSettings().to_run_config()
    assert config == expected
    for key, value in expected.items():
        assert type(config[key]) is type(value), key


def test_run_completes_and_writes_results(flower_run: FlowerRun) -> None:
    assert flower_run.returncode == 0, describe(flower_run)
    summary, _ = results(flower_run)
    assert f"[cmd-fl] round {NUM_ROUNDS}/{NUM_ROUNDS}: accuracy" in flower_run.output
    assert summary["strategy"] == "cmd"
    assert [row["round"] for row in summary["rounds"]] == list(range(1, NUM_ROUNDS + 1))


def test_every_process_is_stopped(flower_run: FlowerRun) -> None:
    assert flower_run.leftover_processes == [], "processes outlived the run"


def test_every_client_replies_every_round(flower_run: FlowerRun) -> None:
    summary, ledger = results(flower_run)
    assert summary["rejected_replies"]["total"] == 0, summary["rejected_replies"]
    assert all(row["rejected_replies"] == 0 for row in summary["rounds"])
    replies: dict[int, int] = defaultdict(int)
    for row in ledger:
        if row["phase"] == "train" and row["direction"] == "up":
            replies[int(row["round"])] += 1
    assert replies == dict.fromkeys(range(1, NUM_ROUNDS + 1), NUM_SUPERNODES)


def test_model_learns(flower_run: FlowerRun) -> None:
    summary, _ = results(flower_run)
    accuracy = summary["final_accuracy"]
    assert accuracy is not None
    assert accuracy > 5 * CHANCE_ACCURACY, describe(flower_run)


def test_weights_are_embedded_after_warmup(flower_run: FlowerRun) -> None:
    rows = results(flower_run)[0]["rounds"]
    assert all(row["embedded_fraction"] == 0.0 for row in rows[:WARMUP])
    assert all(row["embedded_fraction"] > 0.0 for row in rows[WARMUP:]), rows


def test_summary_totals_equal_the_ledger(flower_run: FlowerRun) -> None:
    summary, ledger = results(flower_run)
    totals = csv_network_bytes(ledger)
    rounds = {int(row["round"]) for row in ledger}
    per_round = {
        r: csv_network_bytes(row for row in ledger if int(row["round"]) == r) for r in rounds
    }
    assert summary["total_bytes_up"] == totals["up"] > 0
    assert summary["total_bytes_down"] == totals["down"] > 0
    for row in summary["rounds"]:
        assert row["bytes_up"] == per_round[row["round"]]["up"]
        assert row["bytes_down"] == per_round[row["round"]]["down"]


def test_cmd_replies_are_smaller_than_dense_ones(flower_run: FlowerRun) -> None:
    # The default codec (int8) codes every reply, warm-up included; the first CMD reply has
    # nothing embedded yet (a few bytes more: the state version), then each is smaller.
    assert flower_run.summary["config"]["codec"] == "int8"
    per_message = uplink_bytes_per_message(results(flower_run)[1])
    dense = per_message[1]
    float32_model = downlink_bytes_per_message(results(flower_run)[1])[1]
    assert dense < 0.3 * float32_model
    cmd_rounds = [r for r in per_message if r > WARMUP]
    assert cmd_rounds == list(range(WARMUP + 1, NUM_ROUNDS + 1))
    assert per_message[WARMUP + 1] < dense + 64
    for r in cmd_rounds[1:]:
        assert per_message[r] < dense, (r, per_message)
