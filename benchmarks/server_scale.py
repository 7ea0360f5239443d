"""Server time and memory per round at scale: N simulated replies on the ResNet-18 layout.

Run ``python -m benchmarks.server_scale [--replies 100 1000] [--methods fedavg cmd]`` from the
repository root. For each method and each N it runs the server's side of training rounds with
the real strategy methods on real Flower messages: ``configure_train`` (sampling, one metered
message per node) and ``aggregate_train`` (metering, validation, averaging, the new global
model) over N replies. It prints the exact command and, per round, the time of each step and
the peak memory of the round per weight of the model.

Replies are built on demand (`LazyReplies`) from a small pool of distinct payloads, so they are
never all in memory at once and the peak is the server's own. Each reply gets fresh Flower
``Array`` objects over the pool's bytes (Flower hashes and meters it as a reply that crossed
the network) and metrics of its own, so no two replies have the same content. A real Flower
Grid returns a round's replies as one list: on top of what is measured here, a real server
holds every reply's bytes until the round ends.

Methods (``--methods``):

- ``fedavg``: MeteredFedAvg, float32 replies (the whole model, one Array per tensor);
- ``fedavg-int8``: MeteredFedAvg with the ``int8`` codec on both directions; round 1 sends the
  dense model (no node holds the public model yet), later rounds the coded delta;
- ``cmd``: CMDStrategy after embedding (``--embedded`` of the weights, default 0.8), every node
  holding the current state: replies carry the free weights, the references and the extras.
  The online CMD is warmed up on synthetic snapshots first (post-hoc CMD on 11.2 M weights).

Memory, per weight of the model, the larger of the round's two steps: ``traced B/w`` is the
peak of Python's and numpy's allocations made in the step (tracemalloc, only with ``--trace``:
it about doubles the time; torch's own allocations are not traced), ``rss B/w`` the rise of the
process's peak resident set in the step (Linux VmHWM, reset at its start) over its resident set
at its start; ``peak rss MB`` is the process's peak resident set itself (Python, torch, the
model, the strategy's state and the pool of payloads included). Timings are wall-clock; other
processes on the machine slow them down (the load average is printed).
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import gc
import logging
import os
import platform
import pstats
import shlex
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from torch import nn

from cmd_fl.codec import CodecSpec, encode
from cmd_fl.coded import CODED_UPDATE, CodedUpdate
from cmd_fl.embedding import EmbeddingSchedule, EmbeddingState
from cmd_fl.layout import ParameterLayout
from cmd_fl.ledger import ByteLedger
from cmd_fl.online import OnlineCMD
from cmd_fl.payload import (
    CMD_MODEL,
    DENSE_MODEL,
    METRICS,
    MODEL_CHECKSUM,
    NUM_EXAMPLES,
    STATE_VERSION,
    CMDModel,
)
from cmd_fl.sync import EmbeddingHistory
from cmd_fl.wire import pack_tensors
from simulations.task import FashionMnistCnn, cifar_resnet18
from strategies.aggregation import RunningAverage
from strategies.cmd_strategy import CMDOptions, CMDStrategy
from strategies.metered import MeteredFedAvg

METHODS = ("fedavg", "fedavg-int8", "cmd")
MODELS: dict[str, Callable[[], nn.Module]] = {
    "resnet18": lambda: cifar_resnet18(num_classes=10),
    "fashion-cnn": lambda: FashionMnistCnn(num_classes=10),
}
# Distinct payloads replies are built from: enough that consecutive replies differ.
POOL = 4
# Size of a client's change to the model in a round (float32 noise, relative to weights ~0.05).
STEP = 1e-3
# Online CMD warm-up of the cmd method: snapshots 0..F on which post-hoc CMD runs.
CMD_WARMUP = 2


class NodeGrid(Grid):
    """A Grid that only lists its nodes: all that ``configure_train`` asks of it.

    It sets the task identity a ServerApp runs under (Flower's runtime sets it), which every
    new `Message` reads.
    """

    def __init__(self, node_ids: list[int], run_id: int = 1) -> None:
        self.node_ids = node_ids
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 1

    def get_node_ids(self) -> Iterable[int]:
        """The connected nodes."""
        return list(self.node_ids)

    def set_run(self, run: Run) -> None:
        """Not used."""
        raise NotImplementedError

    @property
    def run(self) -> Run:
        """Not used."""
        raise NotImplementedError

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Not used."""
        raise NotImplementedError

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Not used."""
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Not used."""
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Not used."""
        raise NotImplementedError


def pushed(messages: Iterable[Message]) -> list[Message]:
    """The messages with their ids set as Flower's Grid sets them when it pushes them."""
    out = list(messages)
    for message in out:
        message.metadata.__dict__["_message_id"] = message.object_id
    return out


def fresh_record(record: ArrayRecord) -> ArrayRecord:
    """New Array objects over the same bytes: no copy, but Flower computes their ids anew."""
    return ArrayRecord(
        {
            key: Array(dtype=arr.dtype, shape=tuple(arr.shape), stype=arr.stype, data=arr.data)
            for key, arr in record.items()
        }
    )


class LazyReplies(Sequence[Message]):
    """One reply per instruction, built when it is read, from a small pool of payloads.

    Reply ``i`` answers ``instructions[i]`` with the array records of ``pool[i % len(pool)]``
    (fresh Array objects, `fresh_record`) and the metrics ``metrics(i)``.
    """

    def __init__(
        self,
        instructions: list[Message],
        pool: list[dict[str, ArrayRecord]],
        metrics: Callable[[int], MetricRecord],
    ) -> None:
        self.instructions = instructions
        self.pool = pool
        self.metrics = metrics
        self.built = 0  # replies built so far (a reply read twice is built twice)

    def __len__(self) -> int:
        return len(self.instructions)

    @overload
    def __getitem__(self, index: int) -> Message: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Message]: ...

    def __getitem__(self, index: int | slice) -> Message | Sequence[Message]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        index %= len(self)
        payload = self.pool[index % len(self.pool)]
        content = RecordDict({name: fresh_record(record) for name, record in payload.items()})
        content[METRICS] = self.metrics(index)
        self.built += 1
        return Message(content, reply_to=self.instructions[index])


@dataclass
class RoundResult:
    """What one measured round gives."""

    method: str
    replies: int
    server_round: int
    configure_s: float
    aggregate_s: float
    traced_peak_bytes: int
    rss_rise_bytes: int | None
    rss_peak_bytes: int | None
    accepted: int
    shares: dict[str, float] | None = None  # step -> share of aggregate_train's time

    @property
    def total_s(self) -> float:
        """Seconds of the whole round (configure + aggregate)."""
        return self.configure_s + self.aggregate_s

    def row(self, n_weights: int, traced: bool) -> str:
        """The round as one line of the printed table (memory per weight of the model)."""

        def per_weight(value: int | None) -> str:
            return "-" if value is None else f"{value / n_weights:.1f}"

        peak = "-" if self.rss_peak_bytes is None else f"{self.rss_peak_bytes / 1e6:.0f}"
        return (
            f"{self.method:<12} {self.replies:>5} {self.server_round:>5} {self.configure_s:>11.2f} "
            f"{self.aggregate_s:>11.2f} {1000 * self.total_s / self.replies:>8.1f} "
            f"{per_weight(self.traced_peak_bytes) if traced else '-':>10} "
            f"{per_weight(self.rss_rise_bytes):>8} {peak:>11}"
        )

    def profile_row(self) -> str:
        """The shares of aggregate_train's time, or "" without ``--profile``."""
        if self.shares is None:
            return ""
        parts = ", ".join(f"{step} {100 * share:.1f} %" for step, share in self.shares.items())
        return f"  aggregate_train: {parts}"


def _rss_bytes(field: str) -> int | None:
    """``VmRSS`` or ``VmHWM`` of this process in bytes (None where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> None:
    """Hand freed heap memory back to the system (glibc), then reset VmHWM to the current
    resident set (Linux >= 4.0): memory an earlier round freed but kept would hide a rise."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def perturbed(rng: np.random.Generator, values: np.ndarray) -> np.ndarray:
    """``values`` as a client might send them back after training: floats moved a little,
    integer buffers (BatchNorm's ``num_batches_tracked``) counted on."""
    if values.dtype.kind == "f":
        noise = rng.standard_normal(values.shape, dtype=np.float32) * np.float32(STEP)
        return (values + noise).astype(values.dtype)
    return np.array(values + 1, dtype=values.dtype)  # a 0-d array stays an array


class Setup:
    """One method's strategy on the model, and the pool of payloads its replies come from."""

    def __init__(
        self, method: str, layout: ParameterLayout, arrays: ArrayRecord, args: argparse.Namespace
    ) -> None:
        self.method = method
        self.layout = layout
        self.arrays = arrays
        self.args = args
        self.rng = np.random.default_rng(args.seed)
        self.state: dict[str, np.ndarray] = {key: arr.numpy() for key, arr in arrays.items()}

    def strategy(self, nodes: list[int]) -> MeteredFedAvg:
        """A fresh strategy for ``nodes`` (every one sampled every round)."""
        common: dict[str, Any] = {
            "min_train_nodes": len(nodes),
            "min_available_nodes": len(nodes),
        }
        if self.method == "fedavg":
            return MeteredFedAvg(self.layout, ByteLedger(), **common)
        if self.method == "fedavg-int8":
            return MeteredFedAvg(self.layout, ByteLedger(), codec=CodecSpec("int8"), **common)
        return self._cmd_strategy(nodes, common)

    def _cmd_strategy(self, nodes: list[int], common: dict[str, Any]) -> CMDStrategy:
        """CMD after its warm-up and embedding: the state as bench_core builds it (random
        slopes, intercepts that keep the model in place), every node holding it."""
        schedule = EmbeddingSchedule(warmup=CMD_WARMUP, every=10**6)  # no event in the rounds
        options = CMDOptions(refresh_every=0)  # no refresh probe either
        strategy = CMDStrategy(self.layout, ByteLedger(), schedule, options=options, **common)
        strategy.set_global(self.arrays)
        assert strategy.global_flat is not None
        flat = strategy.global_flat
        for _ in range(CMD_WARMUP + 1):
            strategy.online.update(perturbed(self.rng, flat))
        assert strategy.online.modes is not None and strategy.online.references is not None
        state = EmbeddingState(strategy.online.modes, strategy.online.references, version=1)
        free = state.free_indices
        chosen = np.sort(
            self.rng.choice(free, size=round(self.args.embedded * flat.size), replace=False)
        )
        a = (0.1 * self.rng.standard_normal(chosen.size)).astype(np.float32)
        state.embed(chosen, a, flat[chosen] - a * flat[state.references][state.modes[chosen]])
        state.project(flat)
        strategy.state = state
        strategy.history = EmbeddingHistory(state)
        strategy.node_versions = {node: state.version for node in nodes}
        return strategy

    def pool(self, strategy: MeteredFedAvg) -> list[dict[str, ArrayRecord]]:
        """``POOL`` distinct reply payloads for the round just configured."""
        pool = []
        for _ in range(POOL):
            trained = {key: perturbed(self.rng, value) for key, value in self.state.items()}
            extras = pack_tensors(self.layout.extra_tensors(trained))
            if isinstance(strategy, CMDStrategy):
                assert strategy.state is not None
                free, refs = strategy.state.split(self.layout.flatten_numpy(trained))
                pool.append({CMD_MODEL: CMDModel(free, refs, extras).to_record()})
            elif strategy.codec is not None:
                # Coded against the public model the nodes were sent (the coded downlink's).
                assert strategy.downlink is not None and strategy.downlink.flat is not None
                update = self.layout.flatten_numpy(trained) - strategy.downlink.flat
                blob = encode(update.astype(np.float32), strategy.codec)
                pool.append({CODED_UPDATE: CodedUpdate(blob, extras).to_record()})
            else:
                record = ArrayRecord({key: Array(value) for key, value in trained.items()})
                pool.append({DENSE_MODEL: record})
        return pool


class PhasePeak:
    """Peak memory of one phase of a round above what the process held when it started."""

    def __init__(self, trace: bool, collect: bool = True) -> None:
        self.trace = trace
        self.collect = collect
        self.traced = 0
        self.rss_rise: int | None = None
        self.rss_peak: int | None = None

    def __enter__(self) -> PhasePeak:
        if self.collect:  # the last round's garbage (a full collection takes ~0.3 s here)
            gc.collect()
        _reset_peak_rss()
        self._rss_start = _rss_bytes("VmRSS")
        if self.trace:
            tracemalloc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.trace:
            self.traced = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        self.rss_peak = _rss_bytes("VmHWM")
        if self.rss_peak is not None and self._rss_start is not None:
            self.rss_rise = self.rss_peak - self._rss_start


def _code_key(function: Callable[..., object]) -> tuple[str, int, str]:
    """How cProfile names a Python function."""
    code = function.__code__
    return code.co_filename, code.co_firstlineno, code.co_name


def aggregate_shares(stats: pstats.Stats, strategy: MeteredFedAvg) -> dict[str, float]:
    """The share of ``aggregate_train``'s time (cumulative, profiled) spent in each step it
    calls: metering, parsing and validating, the magnitude check, adding into the running
    average, building the new model, the online CMD update, and building the lazy replies
    (the benchmark's stand-in for the Grid's reception)."""
    table: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]
    top = _code_key(type(strategy).aggregate_train)
    parents = {top, _code_key(MeteredFedAvg.aggregate_train)}
    steps: dict[str, list[Callable[..., object]]] = {
        "metering": [ByteLedger.record_message],
        "parsing": [type(strategy).parse_train_reply, MeteredFedAvg.parse_train_reply],
        "magnitudes": [MeteredFedAvg._check_magnitudes],
        "adding": [RunningAverage.add],
        "new model": [RunningAverage.result, type(strategy).apply_average],
        "online CMD": [OnlineCMD.update],
        "building replies": [LazyReplies.__getitem__],
    }
    total = table[top][3] if top in table else 0.0
    shares = {}
    for step, functions in steps.items():
        seconds = 0.0
        for key in {_code_key(f) for f in functions}:
            callers = table.get(key, (0, 0, 0.0, 0.0, {}))[4]
            seconds += sum(v[3] for caller, v in callers.items() if caller in parents)
        shares[step] = seconds / total if total else 0.0
    return shares


def run_round(
    setup: Setup,
    strategy: MeteredFedAvg,
    grid: NodeGrid,
    server_round: int,
    trace: bool,
    profile: bool = False,
) -> RoundResult:
    """Configure one round, answer it with ``len(grid.node_ids)`` lazy replies, aggregate them.

    Memory is measured in each of the two server steps; building the pool in between is the
    benchmark's work and is not counted. With ``profile``, aggregate_train runs under cProfile
    (its times then include the profiler's overhead) and the result has its steps' shares.
    """
    with PhasePeak(trace) as configure_peak:
        start = time.perf_counter()
        messages = strategy.configure_train(server_round, setup.arrays, ConfigRecord(), grid)
        instructions = pushed(messages)
        configure_s = time.perf_counter() - start
    pool = setup.pool(strategy)
    checksum = strategy.sent_checksums[server_round]
    cmd_state = strategy.state if isinstance(strategy, CMDStrategy) else None

    def metrics(index: int) -> MetricRecord:
        values: dict[str, int | float | list[int] | list[float]] = {
            NUM_EXAMPLES: 50 + index % 101,  # clients of different sizes
            MODEL_CHECKSUM: checksum,
            "train-loss": 1.0 + index / len(instructions),
        }
        if cmd_state is not None:
            values[STATE_VERSION] = cmd_state.version
        return MetricRecord(values)

    replies = LazyReplies(instructions, pool, metrics)
    profiler = cProfile.Profile() if profile else None
    with PhasePeak(trace, collect=False) as aggregate_peak:
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        arrays, train_metrics = strategy.aggregate_train(server_round, replies)
        if profiler is not None:
            profiler.disable()
        aggregate_s = time.perf_counter() - start
    shares = None if profiler is None else aggregate_shares(pstats.Stats(profiler), strategy)
    if arrays is None or train_metrics is None:
        raise RuntimeError(f"round {server_round} kept the previous model: {strategy.rejections}")
    setup.arrays = arrays
    setup.state = {key: arr.numpy() for key, arr in arrays.items()}
    phases = (configure_peak, aggregate_peak)
    rises = [p.rss_rise for p in phases if p.rss_rise is not None]
    peaks = [p.rss_peak for p in phases if p.rss_peak is not None]
    return RoundResult(
        setup.method,
        len(instructions),
        server_round,
        configure_s,
        aggregate_s,
        max(configure_peak.traced, aggregate_peak.traced),
        max(rises) if rises else None,
        max(peaks) if peaks else None,
        int(train_metrics["num-replies"]),  # type: ignore[arg-type]
        shares,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="resnet18")
    parser.add_argument(
        "--replies", type=int, nargs="+", default=[100, 1000], help="N per run (100 1000)"
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--rounds", type=int, default=1, help="rounds measured per run (1)")
    parser.add_argument("--embedded", type=float, default=0.8, help="cmd: embedded share (0.8)")
    parser.add_argument(
        "--trace",
        action="store_true",
        help="also trace allocations (tracemalloc; it about doubles the time per reply)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print the share of aggregate_train's time per step (cProfile; slower)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[RoundResult]:
    """Run the benchmark, print one line per round and return the measurements."""
    args = parse_args(argv)
    logging.getLogger("flwr").setLevel(logging.ERROR)  # FedAvg's and the rounds' info lines
    shown = sys.argv[1:] if argv is None else argv
    print(" ".join(["$ python -m benchmarks.server_scale", *map(shlex.quote, shown)]))
    model = MODELS[args.model]()
    layout = ParameterLayout.from_module(model)
    arrays = ArrayRecord(
        {key: Array(value.detach().numpy().copy()) for key, value in model.state_dict().items()}
    )
    del model
    n = layout.n_weights
    print(
        f"model {args.model}: {n:,} weights, {len(layout.extras)} extras; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'method':<12} {'N':>5} {'round':>5} {'configure s':>11} {'aggregate s':>11} "
        f"{'ms/reply':>8} {'traced B/w':>10} {'rss B/w':>8} {'peak rss MB':>11}"
    )
    results = []
    for method in args.methods:
        for n_replies in args.replies:
            nodes = list(range(1, n_replies + 1))
            setup = Setup(method, layout, arrays, args)
            strategy = setup.strategy(nodes)
            grid = NodeGrid(nodes)
            first = CMD_WARMUP + 1 if method == "cmd" else 1
            for server_round in range(first, first + args.rounds):
                result = run_round(setup, strategy, grid, server_round, args.trace, args.profile)
                results.append(result)
                if result.accepted != n_replies:
                    raise RuntimeError(f"rejected replies: {strategy.rejections}")
                print(result.row(n, args.trace), flush=True)
                if result.shares is not None:
                    print(result.profile_row(), flush=True)
            del strategy, setup, grid
    return results


if __name__ == "__main__":
    main()
