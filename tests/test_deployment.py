"""End to end through a real deployment on loopback: SuperLink, SuperNodes, TLS, ``flwr ls``.

One SuperLink and two SuperNodes run as separate processes, each with its own FLWR_HOME,
working directory and free port, exactly as docs/deployment.md starts them on separate machines,
over TLS with certificates that ``scripts/make_certs.sh`` makes for the test. Node 0 trains on
partition 0 of 2 of digits (``partition-id``); node 1 on the same examples as partition 1, but
from its own ``.npz`` file (``data-path``). Two runs go through ``flwr run . <connection>``:

1. a clean CMD run (4 rounds, warm-up 2): results written, CMD replies smaller than round 1's
   dense ones, and the summary's totals (network bytes) equal, within 2 % in each direction, to
   the SuperLink's own traffic counter (``flwr ls --run-id N --format json``, compared by
   ``scripts/flower_traffic.py``, which writes ``flower_traffic.json`` next to
   ``summary.json``); the same for a plain FedAvg run and an int8-coded run;
2. a crash: node 1's process tree is killed while it trains in round 3, and a new SuperNode
   with its data joins. The run goes on (``min-train-nodes=1 min-available-nodes=1``): round 3
   is averaged from node 0's reply once the SuperLink declares node 1 unavailable (no heartbeat
   for 2 x 30 s at most), and the newcomer gets the full CMD state in round 4.

Every process is stopped by PID at the end, on failure too (module fixture, try/finally).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Error, Message, Metadata
from flwr.app.message.message import make_message
from flwr.common.constant import SUPERLINK_NODE_ID

from cmd_fl.ledger import ByteLedger
from simulations.data import DIGITS_MEAN, DIGITS_STD
from simulations.federation import client_dataset
from simulations.settings import RunSettings

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CONNECTION = "cmd-fl-test"
NUM_ROUNDS = 4
WARMUP = 2
CRASH_ROUND = 3  # the first CMD round: node 1 holds a state version when it dies
RUN_TIMEOUT_S = 360  # about 1.5 min on 2 idle cores; bounds a hung run
CRASH_RUN_TIMEOUT_S = 480  # plus up to 60 s until the SuperLink declares the node unavailable
START_TIMEOUT_S = 90
TRAFFIC_TOLERANCE = 0.02
MARKER_VARIABLE = "CMD_FL_DEPLOYMENT_TEST"
RUN_CONFIG = (  # float32 messages; the coded run below adds codec='int8' (the default)
    f"dataset='digits' num-server-rounds={NUM_ROUNDS} cmd-warmup={WARMUP} cmd-embed-every=1 "
    f"learning-rate=0.1 num-partitions=2 codec='none'"
)


# --------------------------------------------------------------------------- processes


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # the command name may hold spaces
    return fields[0], int(fields[1])


def running(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has exited: it only waits to be reaped)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, children first."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children[stat[1]].append(int(entry.name))
    found, queue = [], list(children[pid])
    while queue:
        child = queue.pop(0)
        found.append(child)
        queue.extend(children[child])
    return found


def marked_processes(marker: str) -> list[int]:
    """Running processes whose environment carries this test's marker (all that it started)."""
    tag = f"{MARKER_VARIABLE}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if tag in (entry / "environ").read_bytes().split(b"\0") and running(int(entry.name)):
                found.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return found


def kill_pids(pids: list[int], sig: signal.Signals) -> None:
    """Send ``sig`` to every pid that still runs."""
    for pid in pids:
        if running(pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def wait_until(condition: Any, timeout_s: float, what: str, step_s: float = 0.2) -> None:
    """Poll ``condition()`` until true; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(step_s)


@dataclass
class SuperNode:
    """One started SuperNode."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    node_id: int


class Deployment:
    """A SuperLink and SuperNodes on loopback, each as if on its own machine."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.marker = uuid.uuid4().hex
        self.port = free_port()
        self.certs = root / "certs"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.flwr_home = root / "flwr-cli"  # where `flwr` (the user's laptop) keeps connections

    def environment(self, flwr_home: Path) -> dict[str, str]:
        """Environment of one machine's Flower processes."""
        env = dict(os.environ)
        env.update(
            {
                "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
                "FLWR_HOME": str(flwr_home),
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "PYTHONUNBUFFERED": "1",
                MARKER_VARIABLE: self.marker,
            }
        )
        return env

    def spawn(self, name: str, command: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
        """Start ``command`` in ``root/name`` (its working directory and FLWR_HOME)."""
        workdir = self.root / name
        workdir.mkdir(parents=True, exist_ok=True)
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command,
                cwd=workdir,
                env=self.environment(workdir),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process, log

    def start(self) -> None:
        """Certificates, the SuperLink, and the `flwr` connection."""
        subprocess.run(
            ["bash", str(REPO / "scripts" / "make_certs.sh"), str(self.certs)],
            check=True,
            capture_output=True,
            timeout=60,
        )
        process, log = self.spawn(
            "superlink",
            [
                str(VENV_BIN / "flower-superlink"),
                "--ssl-ca-certfile",
                str(self.certs / "ca.crt"),
                "--ssl-certfile",
                str(self.certs / "server.crt"),
                "--ssl-keyfile",
                str(self.certs / "server.key"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            ],
        )

        def listening() -> bool:
            if process.poll() is not None:
                pytest.fail(f"SuperLink exited:\n{log.read_text()[-3000:]}")
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, START_TIMEOUT_S, "the SuperLink to listen")
        self.flwr_home.mkdir(exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n'
        )

    def start_supernode(self, name: str, node_config: str) -> SuperNode:
        """Start a SuperNode and wait until the SuperLink has given it a node id."""
        process, log = self.spawn(
            name,
            [
                str(VENV_BIN / "flower-supernode"),
                "--root-certificates",
                str(self.certs / "ca.crt"),
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--port",
                str(free_port()),
                "--node-config",
                node_config,
            ],
        )
        found: list[int] = []

        def registered() -> bool:
            if process.poll() is not None:
                pytest.fail(f"SuperNode {name} exited:\n{log.read_text()[-3000:]}")
            match = re.search(r"SuperNode ID: (\d+)", log.read_text(errors="replace"))
            if match:
                found.append(int(match.group(1)))
            return bool(found)

        wait_until(registered, START_TIMEOUT_S, f"SuperNode {name} to register")
        return SuperNode(name, process, log, found[0])

    def crash(self, node: SuperNode) -> None:
        """Kill a SuperNode's whole process tree at once, as a machine that loses power."""
        victims = [node.process.pid, *descendants(node.process.pid)]
        kill_pids(victims, signal.SIGKILL)
        node.process.wait(timeout=30)

    def flwr_run(self, run_config: str, log: Path) -> subprocess.Popen[bytes]:
        """Submit a run with ``flwr run <app> <connection> --stream`` (its output to ``log``)."""
        workdir = self.root / "flwr-cli-cwd"
        workdir.mkdir(exist_ok=True)
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    str(VENV_BIN / "flwr"),
                    "run",
                    str(REPO),
                    CONNECTION,
                    "--stream",
                    "--run-config",
                    run_config,
                ],
                cwd=workdir,
                env=self.environment(self.flwr_home),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def flower_traffic(self, run_id: int, results: Path) -> subprocess.CompletedProcess[str]:
        """Run ``scripts/flower_traffic.py``: writes ``results/flower_traffic.json``."""
        return subprocess.run(
            [
                sys.executable,
                str(REPO / "scripts" / "flower_traffic.py"),
                "--connection",
                CONNECTION,
                "--run-id",
                str(run_id),
                "--results",
                str(results),
                "--tolerance",
                str(TRAFFIC_TOLERANCE),
            ],
            cwd=self.root,
            env=self.environment(self.flwr_home),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def close(self) -> list[str]:
        """Stop every process this deployment started, by PID; return any that survived."""
        roots = [p.pid for p in self.processes if p.poll() is None]
        tree = [pid for root in roots for pid in descendants(root)]
        kill_pids(roots, signal.SIGTERM)  # a SuperLink stops its SuperExec and apps itself
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(running(pid) for pid in roots + tree):
            time.sleep(0.2)
        kill_pids(roots + tree + marked_processes(self.marker), signal.SIGKILL)
        for process in self.processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.5)
        left = marked_processes(self.marker)
        kill_pids(left, signal.SIGKILL)
        return [Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ") for pid in left]


# --------------------------------------------------------------------------- runs


@dataclass
class DeployedRun:
    """What one deployed run left behind."""

    run_id: int
    returncode: int
    output: str
    summary: dict[str, Any]
    ledger: list[dict[str, str]]
    traffic: dict[str, Any]
    traffic_output: str
    wall_s: float


@dataclass
class Federation:
    """The running deployment and its two SuperNodes."""

    deployment: Deployment
    nodes: list[SuperNode]
    results: Path
    node_1_config: str


def node_1_data(path: Path) -> None:
    """Partition 1 of 2 of the run's digits split, as the node's own ``.npz`` file.

    Digits' built-in inputs are intensities in [0, 1] with no standardisation, so the node's
    loader gives back exactly the tensors of partition 1.
    """
    settings = RunSettings.from_run_config({"dataset": "digits", "num-partitions": 2})
    part = client_dataset(settings, 1, 2)
    intensities = part.x.numpy()[:, 0] * DIGITS_STD + DIGITS_MEAN  # (N, H, W) float in [0, 1]
    np.savez(path, x=intensities, y=part.y.numpy())


@pytest.fixture(scope="module")
def federation(request: pytest.FixtureRequest) -> Iterator[Federation]:
    """A TLS SuperLink with two SuperNodes; every process stopped at the end.

    Its folder is not under pytest's basetemp: a pytest session started meanwhile (by anyone)
    prunes older basetemps, and the processes' working directories with them. It is removed at
    the end, unless a test failed or ``CMD_FL_KEEP_DEPLOYMENT=1``: then its logs stay.
    """
    root = Path(tempfile.mkdtemp(prefix="cmd-fl-deployment-"))
    deployment = Deployment(root)
    failed_before = request.session.testsfailed
    try:
        deployment.start()
        data = root / "node-1-data.npz"
        node_1_data(data)
        node_1_config = f"data-path='{data}'"
        nodes = [
            deployment.start_supernode("node-0", "partition-id=0 num-partitions=2"),
            deployment.start_supernode("node-1", node_1_config),
        ]
        yield Federation(deployment, nodes, root / "results", node_1_config)
    finally:
        leftover = deployment.close()
        keep = request.session.testsfailed > failed_before
        if keep or os.environ.get("CMD_FL_KEEP_DEPLOYMENT") == "1":
            sys.stdout.write(f"\n[test] deployment folder kept: {root}\n")
        else:
            shutil.rmtree(root, ignore_errors=True)
        assert leftover == [], f"processes outlived the deployment: {leftover}"


def run_id_of(output: str) -> int:
    """The run id ``flwr run`` printed."""
    match = re.search(r"Successfully started run (\d+)", output)
    assert match, f"no run id in the output:\n{output[-3000:]}"
    return int(match.group(1))


def finish_run(
    federation: Federation,
    process: subprocess.Popen[bytes],
    log: Path,
    run_name: str,
    timeout_s: float,
    started: float,
) -> DeployedRun:
    """Wait for a submitted run, then collect its results and Flower's traffic counter."""
    try:
        returncode = process.wait(timeout=max(1.0, started + timeout_s - time.monotonic()))
    except subprocess.TimeoutExpired:
        kill_pids([process.pid, *descendants(process.pid)], signal.SIGKILL)
        process.wait()
        pytest.fail(f"run {run_name} timed out after {timeout_s} s:\n{log.read_text()[-4000:]}")
    wall_s = time.monotonic() - started
    output = log.read_text(errors="replace")
    run_id = run_id_of(output)
    out_dir = federation.results / run_name
    summary_path, ledger_path = out_dir / "summary.json", out_dir / "ledger.csv"
    assert summary_path.exists(), f"no results (exit {returncode}):\n{output[-4000:]}"
    summary = json.loads(summary_path.read_text())
    with ledger_path.open(newline="") as handle:
        ledger = list(csv.DictReader(handle))
    checked = federation.deployment.flower_traffic(run_id, out_dir)
    traffic_path = out_dir / "flower_traffic.json"
    assert traffic_path.exists(), checked.stdout + checked.stderr
    traffic = json.loads(traffic_path.read_text())
    sys.stdout.write(f"\n[test] {run_name}: {wall_s:.1f} s\n{checked.stdout}")
    return DeployedRun(run_id, returncode, output, summary, ledger, traffic, checked.stdout, wall_s)


@pytest.fixture(scope="module")
def tls_run(federation: Federation) -> DeployedRun:
    """A clean CMD run over TLS on both SuperNodes."""
    log = federation.deployment.root / "run-tls.log"
    config = f"{RUN_CONFIG} results-dir='{federation.results}' run-name='deploy-tls'"
    started = time.monotonic()
    process = federation.deployment.flwr_run(config, log)
    return finish_run(federation, process, log, "deploy-tls", RUN_TIMEOUT_S, started)


def train_rows(
    ledger: list[dict[str, str]], direction: str, server_round: int
) -> list[dict[str, str]]:
    """Training messages of one direction and round."""
    return [
        row
        for row in ledger
        if (row["phase"], row["direction"], int(row["round"])) == ("train", direction, server_round)
    ]


def up_rows(ledger: list[dict[str, str]], server_round: int) -> list[dict[str, str]]:
    """Training replies of one round."""
    return train_rows(ledger, "up", server_round)


def down_bytes(ledger: list[dict[str, str]], server_round: int) -> dict[int, int]:
    """Wire bytes of each node's training instruction in one round."""
    rows = train_rows(ledger, "down", server_round)
    return {int(row["node_id"]): int(row["wire_bytes"]) for row in rows}


# --------------------------------------------------------------------------- the clean run


def test_tls_run_completes_and_writes_results(tls_run: DeployedRun) -> None:
    assert tls_run.returncode == 0, tls_run.output[-4000:]
    assert tls_run.summary["strategy"] == "cmd"
    assert [row["round"] for row in tls_run.summary["rounds"]] == list(range(1, NUM_ROUNDS + 1))
    assert tls_run.summary["rejected_replies"]["total"] == 0, tls_run.summary["rejected_replies"]
    for server_round in range(1, NUM_ROUNDS + 1):
        assert f"[cmd-fl] round {server_round}/{NUM_ROUNDS}: accuracy" in tls_run.output
        assert len(up_rows(tls_run.ledger, server_round)) == 2  # both nodes, every round
    assert tls_run.traffic["status"] == "finished:completed"


def test_both_kinds_of_node_data_train(tls_run: DeployedRun, federation: Federation) -> None:
    # Node 1 reads its own .npz (data-path); its replies count as many examples as partition 1.
    node_ids = {int(row["node_id"]) for row in up_rows(tls_run.ledger, 1)}
    assert node_ids == {node.node_id for node in federation.nodes}
    assert tls_run.summary["final_accuracy"] > 0.15  # chance is 0.1; 4 short rounds reach ~0.2


def test_cmd_rounds_send_fewer_bytes_than_dense_round_1(tls_run: DeployedRun) -> None:
    rows = {row["round"]: row for row in tls_run.summary["rounds"]}
    assert all(rows[r]["embedded_fraction"] == 0.0 for r in range(1, WARMUP + 1))
    assert rows[NUM_ROUNDS]["embedded_fraction"] > 0.0
    dense_up = rows[1]["bytes_up"]
    for server_round in range(WARMUP + 1, NUM_ROUNDS + 1):
        assert rows[server_round]["bytes_up"] < dense_up, rows
    assert rows[NUM_ROUNDS]["bytes_up"] < rows[WARMUP + 1]["bytes_up"]  # more embedded, less sent
    assert "% saved vs dense rounds" in tls_run.output


def assert_ledger_matches_flower(run: DeployedRun) -> None:
    """The summary's totals are the ledger's network bytes, and Flower's counter agrees."""
    traffic, ledger = run.traffic, run.traffic["ledger"]
    # scripts/flower_traffic.py read ledger.csv: its totals are the summary's.
    assert run.summary["byte_counting"] == "network"
    assert ledger["up_bytes"] == run.summary["total_bytes_up"]
    assert ledger["down_bytes"] == run.summary["total_bytes_down"]
    assert ledger["up_bytes"] == ledger["wire_up"] + ledger["control_up"]
    assert ledger["control_up"] > 0 and ledger["control_down"] > 0
    assert traffic["flower"]["total_bytes"] > 0
    # Within 2 % in total and in each direction (Flower's inbound = up, outbound = down).
    for key in ("", "_inbound", "_outbound"):
        assert abs(traffic[f"relative_difference{key}"]) <= TRAFFIC_TOLERANCE, run.traffic_output
    assert traffic["agree"] is True


def test_ledger_matches_flowers_traffic_counter_for_cmd(tls_run: DeployedRun) -> None:
    assert_ledger_matches_flower(tls_run)


def test_ledger_matches_flowers_traffic_counter_for_fedavg(federation: Federation) -> None:
    log = federation.deployment.root / "run-fedavg.log"
    config = (
        f"{RUN_CONFIG} strategy='fedavg' results-dir='{federation.results}' "
        "run-name='deploy-fedavg'"
    )
    started = time.monotonic()
    process = federation.deployment.flwr_run(config, log)
    run = finish_run(federation, process, log, "deploy-fedavg", RUN_TIMEOUT_S, started)

    assert run.returncode == 0, run.output[-4000:]
    assert run.summary["strategy"] == "fedavg"
    assert run.summary["rejected_replies"]["total"] == 0, run.summary["rejected_replies"]
    assert_ledger_matches_flower(run)


# --------------------------------------------------------------------------- a coded run


def test_a_coded_run_keeps_both_nodes_in_step_over_tls(federation: Federation) -> None:
    # int8 both ways: each SuperNode keeps the model it was sent in context.state and decodes
    # the next round's delta against it; any mismatch would be a rejected checksum.
    log = federation.deployment.root / "run-int8.log"
    coded = RUN_CONFIG.replace("codec='none'", "codec='int8'")
    config = f"{coded} results-dir='{federation.results}' run-name='deploy-int8'"
    started = time.monotonic()
    process = federation.deployment.flwr_run(config, log)
    run = finish_run(federation, process, log, "deploy-int8", RUN_TIMEOUT_S, started)

    assert run.returncode == 0, run.output[-4000:]
    assert run.summary["rejected_replies"]["total"] == 0, run.summary["rejected_replies"]
    first, second = down_bytes(run.ledger, 1), down_bytes(run.ledger, 2)
    assert set(first) == set(second) == {node.node_id for node in federation.nodes}
    # Round 1 sends the model as it is; round 2 (still warm-up) its int8 delta.
    for node, size in second.items():
        assert size < 0.45 * first[node], (first, second)
    assert run.summary["final_accuracy"] > 0.15
    assert_ledger_matches_flower(run)


# --------------------------------------------------------------------------- the crash


def test_a_crashed_node_does_not_stop_the_run_and_a_new_node_is_resynced(
    federation: Federation,
) -> None:
    deployment = federation.deployment
    survivor, victim = federation.nodes
    log = deployment.root / "run-crash.log"
    config = (
        f"{RUN_CONFIG} min-train-nodes=1 min-available-nodes=1 "
        f"results-dir='{federation.results}' run-name='deploy-crash'"
    )
    already = victim.log.read_text(errors="replace").count("Start `flwr-clientapp` process")
    started = time.monotonic()
    process = deployment.flwr_run(config, log)

    def training_in_crash_round() -> bool:
        if process.poll() is not None:
            pytest.fail(f"the run ended before the crash:\n{log.read_text()[-4000:]}")
        count = victim.log.read_text(errors="replace").count("Start `flwr-clientapp` process")
        return count - already >= CRASH_ROUND

    wait_until(training_in_crash_round, CRASH_RUN_TIMEOUT_S, "the victim to train in round 3")
    deployment.crash(victim)
    newcomer = deployment.start_supernode("node-1-restarted", federation.node_1_config)
    run = finish_run(federation, process, log, "deploy-crash", CRASH_RUN_TIMEOUT_S, started)

    summary, ledger = run.summary, run.ledger
    assert [row["round"] for row in summary["rounds"]] == list(range(1, NUM_ROUNDS + 1))
    # Round 3: the victim's reply never came; the SuperLink answered for it with an error
    # (NODE_UNAVAILABLE), which is rejected; the survivor's reply was averaged.
    rejected = summary["rejected_replies"]["replies"]
    assert [r["round"] for r in rejected] == [CRASH_ROUND], rejected
    replies = up_rows(ledger, CRASH_ROUND)
    assert len(replies) == 2
    accepted = [row for row in replies if int(row["payload_bytes"]) > 0]
    assert [int(row["node_id"]) for row in accepted] == [survivor.node_id]
    unavailable = [row for row in replies if int(row["payload_bytes"]) == 0]
    assert int(unavailable[0]["wire_bytes"]) == 0  # made by the SuperLink: never crossed
    # Round 4: the newcomer never held a CMD state, so its instruction carries the full state;
    # the survivor's carries at most the latest event's delta. Both replies are accepted.
    last = down_bytes(ledger, NUM_ROUNDS)
    assert set(last) == {survivor.node_id, newcomer.node_id}, last
    assert last[newcomer.node_id] > last[survivor.node_id], last
    assert all(int(row["payload_bytes"]) > 0 for row in up_rows(ledger, NUM_ROUNDS))
    assert all(int(row["node_id"]) != victim.node_id for row in up_rows(ledger, NUM_ROUNDS))
    # The counter still agrees: the instruction the victim pulled counts on both sides.
    assert abs(run.traffic["relative_difference"]) <= TRAFFIC_TOLERANCE, run.traffic_output


# --------------------------------------------------------------------------- no deployment


def _reply(src_node_id: int, error: Error) -> Message:
    """An error reply as the grid receives it (message id = object id)."""
    metadata = Metadata(
        run_id=1234,
        message_id="",
        src_node_id=src_node_id,
        dst_node_id=SUPERLINK_NODE_ID,
        reply_to_message_id="f" * 64,
        group_id="",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    reply = make_message(metadata=metadata, error=error)
    reply.metadata.__dict__["_message_id"] = reply.object_id
    return reply


def test_a_reply_the_superlink_made_itself_costs_no_bytes() -> None:
    # What the SuperLink returns for a node that stopped sending heartbeats (NODE_UNAVAILABLE).
    ledger = ByteLedger()
    made_by_superlink = _reply(SUPERLINK_NODE_ID, Error(code=1, reason="Node Unavailable"))
    row = ledger.record_message(3, "train", "up", SUPERLINK_NODE_ID, made_by_superlink)
    assert (row.payload_bytes, row.wire_bytes, row.control_bytes) == (0, 0, 0)
    # A node's own error reply did cross the network.
    from_node = _reply(42, Error(code=2, reason="ClientApp raised"))
    row = ledger.record_message(3, "train", "up", 42, from_node)
    assert row.payload_bytes == 0 and row.wire_bytes > 0 and row.control_bytes > 0
