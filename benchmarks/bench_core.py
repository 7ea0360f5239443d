"""Benchmark of the CMD core at ResNet-18 size: online update, post-hoc fit, memory, overheads.

Run ``python -m benchmarks.bench_core [--quick] [--out bench.json]`` from the repository root. It
prints the exact command, a table of measurements with their targets (PASS / FAIL, or ``info``
where the spec gives no number), and optionally writes the measurements as JSON.

Trajectories are synthetic: every weight is an affine function of one of ten latent random walks
plus its own small random walk, in float32, so the CMD code does the same work as on a real run.
The SGD step and the projection are measured on the real model (random CIFAR-sized data). Every
timing is wall-clock on the threads torch and numpy pick; other processes on the machine slow
them down (the load average is printed beside the table), so compare runs at similar load.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import RecordDict
from torch import nn

from cmd_fl import (
    EmbeddedProjector,
    EmbeddingState,
    OnlineCMD,
    ParameterLayout,
    posthoc_cmd,
)
from cmd_fl.payload import load_state, save_state
from cmd_fl.posthoc import CHUNK
from simulations.task import FashionMnistCnn, cifar_resnet18

# Targets at N = 11.2 M on a 2-core CPU (the project brief); other rows are for information.
TARGET_UPDATE_S = 0.5
TARGET_POSTHOC_S = 30.0
TARGET_BYTES_PER_WEIGHT = 40.0
# Latent modes of the synthetic trajectories (the fit asks for --modes of them).
SYNTHETIC_MODES = 10
# Untimed SGD steps before timing: the first steps allocate and are several times slower.
WARMUP_STEPS = 2
# Repeats of the direct projection timings (each well under a second).
DIRECT_REPEATS = 10

# model name -> (constructor, input shape of one example)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet18": (lambda: cifar_resnet18(num_classes=10), (3, 32, 32)),
    "fashion-cnn": (lambda: FashionMnistCnn(num_classes=10), (1, 28, 28)),
}


@dataclass
class Row:
    """One line of the result table."""

    name: str
    value: float
    unit: str
    target: str
    verdict: str  # "PASS", "FAIL" or "info"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line (see ``--help``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: the 65,558-weight Fashion-MNIST CNN instead of ResNet-18, fewer repeats",
    )
    parser.add_argument("--model", choices=sorted(MODELS), default=None, help="default resnet18")
    parser.add_argument("--snapshots", type=int, default=21, help="T of the post-hoc fit (21)")
    parser.add_argument("--modes", type=int, default=10, help="M (10)")
    parser.add_argument("--samples", type=int, default=1000, help="K (1000)")
    parser.add_argument("--updates", type=int, default=None, help="online updates timed (8)")
    parser.add_argument("--batch-size", type=int, default=128, help="SGD batch (128)")
    parser.add_argument("--sgd-steps", type=int, default=None, help="SGD steps timed (3)")
    parser.add_argument(
        "--fractions",
        type=str,
        default="0.5,0.8",
        help="embedded shares at which the projection is measured (0.5,0.8)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the measurements as JSON")
    args = parser.parse_args(argv)
    if args.model is None:
        args.model = "fashion-cnn" if args.quick else "resnet18"
    if args.updates is None:
        args.updates = 4 if args.quick else 8
    if args.sgd_steps is None:
        args.sgd_steps = 2 if args.quick else 3
    return args


# --- synthetic trajectories --------------------------------------------------------------------
def synthetic_snapshots(n: int, seed: int) -> Iterator[np.ndarray]:
    """Endless float32 snapshots: ``w0 + a * latent[mode](t) + own random walk``."""
    rng = np.random.default_rng(seed)
    w = (0.05 * rng.standard_normal(n)).astype(np.float32)
    modes = rng.integers(0, SYNTHETIC_MODES, n)
    a = rng.standard_normal(n).astype(np.float32)
    latent = np.zeros(SYNTHETIC_MODES, dtype=np.float32)
    own = np.zeros(n, dtype=np.float32)
    while True:
        yield w + a * latent[modes] + own
        latent += (0.01 * rng.standard_normal(SYNTHETIC_MODES)).astype(np.float32)
        own += 0.001 * rng.standard_normal(n, dtype=np.float32)


# --- measurements ------------------------------------------------------------------------------
def measure_posthoc(
    traj: np.ndarray, n_modes: int, n_samples: int, seed: int, layout: ParameterLayout
) -> tuple[float, float]:
    """Wall and CPU seconds (all threads) of one post-hoc CMD on the whole (N, T) matrix."""
    start, cpu = time.perf_counter(), time.process_time()
    posthoc_cmd(traj, n_modes, n_samples, seed, layout)
    return time.perf_counter() - start, time.process_time() - cpu


def measure_online(
    traj: np.ndarray,
    snapshots: Iterator[np.ndarray],
    args: argparse.Namespace,
    layout: ParameterLayout,
) -> tuple[OnlineCMD, dict[str, Any]]:
    """Warm an OnlineCMD up on ``traj`` (warm-up F = T - 1), then time and trace updates."""
    n, t = traj.shape
    online = OnlineCMD(
        args.modes, warmup=t - 1, n_samples=args.samples, seed=args.seed, layout=layout
    )
    for step in range(t - 1):
        online.update(traj[:, step])
    start = time.perf_counter()
    online.update(traj[:, t - 1])  # ends warm-up: post-hoc CMD plus the first T accumulations
    warmup_finish_s = time.perf_counter() - start
    assert online.ready

    times, cpu_times = [], []
    for _ in range(args.updates + 1):
        snapshot = next(snapshots)
        start, cpu = time.perf_counter(), time.process_time()
        online.update(snapshot)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu)
    update_s = statistics.median(times[1:])  # the first update after warm-up is not counted

    # Transient memory of an update: numpy reports its buffers to tracemalloc. The snapshot is
    # made before tracing starts, so only the update's own temporaries are seen.
    peaks = []
    for _ in range(2):
        snapshot = next(snapshots)
        tracemalloc.start()
        tracemalloc.reset_peak()
        online.update(snapshot)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    transient = float(max(peaks))

    start = time.perf_counter()
    fit = online.fit
    fit_s = time.perf_counter() - start
    fit_bytes = fit.modes.nbytes + fit.a.nbytes + fit.b.nbytes
    fit_bytes += fit.residual.nbytes if fit.residual is not None else 0
    return online, {
        "warmup_finish_s": warmup_finish_s,
        "update_s": update_s,
        "update_times_s": times,
        "update_cpu_s": statistics.median(cpu_times[1:]),
        "state_bytes_per_weight": online.state_bytes() / n,
        "update_transient_bytes_per_weight": transient / n,
        "fit_s": fit_s,
        "fit_output_bytes_per_weight": fit_bytes / n,
    }


def _sgd_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> float:
    start = time.perf_counter()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def embedded_state(
    online: OnlineCMD, flat: np.ndarray, fraction: float, seed: int
) -> EmbeddingState:
    """A state embedding ``fraction`` of the weights, with (a, b) that keep ``flat`` in place.

    The coefficients are random slopes with intercepts ``w - a * w_ref``, so projecting does
    not disturb the model (the synthetic fit's own (a, b) belong to other values).
    """
    assert online.modes is not None and online.references is not None
    state = EmbeddingState(online.modes, online.references)
    rng = np.random.default_rng(seed)
    free = state.free_indices
    chosen = np.sort(rng.choice(free, size=round(fraction * flat.size), replace=False))
    a = (0.1 * rng.standard_normal(chosen.size)).astype(np.float32)
    ref = flat[state.references][state.modes[chosen]]
    state.embed(chosen, a, flat[chosen] - a * ref)
    return state


def measure_projection_direct(
    model: nn.Module, layout: ParameterLayout, online: OnlineCMD, fraction: float, seed: int
) -> tuple[EmbeddedProjector, dict[str, Any]]:
    """Direct cost of ``EmbeddedProjector`` per SGD step at one embedded share.

    ``project_s`` is one re-projection, ``mask_s`` the gradient masking of one backward pass
    (the hooks' ``grad * keep`` on gradient-sized tensors), each the median of repeats; their sum
    is the projector's overhead per step with ``reference_gradient="own"``. ``fold_s`` is what
    ``"mode"`` does instead of the masking (fold the embedded gradients into the references').
    Returns the (not attached, ``"own"``) projector too.
    """
    flat = layout.flatten_numpy(model.state_dict())
    state = embedded_state(online, flat, fraction, seed)
    projector = EmbeddedProjector(model, layout, state, reference_gradient="own")
    projector.project()
    project_s = statistics.median(_timed(projector.project) for _ in range(DIRECT_REPEATS))
    parts = projector._parts  # the hooks' masks: private, but this times exactly their work
    grads = [torch.randn_like(part.param) for part in parts]
    mask_s = statistics.median(
        _timed(lambda: [g * part.keep for g, part in zip(grads, parts, strict=True)])
        for _ in range(DIRECT_REPEATS)
    )
    folding = EmbeddedProjector(model, layout, state, reference_gradient="mode")
    fold_times = []
    for _ in range(DIRECT_REPEATS):
        for param in model.parameters():
            param.grad = torch.randn_like(param)
        fold_times.append(_timed(lambda: folding._mode_gradient(None, (), {})))  # type: ignore[arg-type]
    for param in model.parameters():
        param.grad = None
    # A client reads its stored state (decode and check it) every round, and stores it again in
    # rounds that change it: per round, not per step.
    store = RecordDict()
    save_s = statistics.median(
        _timed(lambda: save_state(store, "state", state)) for _ in range(DIRECT_REPEATS)
    )
    load_s = statistics.median(
        _timed(lambda: load_state(store, "state", state.n_weights)) for _ in range(DIRECT_REPEATS)
    )
    return projector, {
        "fraction": fraction,
        "project_s": project_s,
        "mask_s": mask_s,
        "fold_s": statistics.median(fold_times),
        "state_save_s": save_s,
        "state_load_s": load_s,
    }


def measure_steps(
    plain: nn.Module,
    projected: list[tuple[nn.Module, EmbeddedProjector]],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
) -> tuple[list[float], list[list[float]]]:
    """Seconds of whole SGD steps (momentum 0.9, lr 0.05, as the paper's ResNet-18).

    The plain model and each model with an attached projector take turns, step by step, so that
    load from other processes on the machine hits all of them alike. Untimed warm-up steps come
    first (the first steps allocate and are several times slower).
    """
    models = [plain] + [m for m, _ in projected]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in models]
    for (_, projector), optimizer in zip(projected, optimizers[1:], strict=True):
        projector.attach(optimizer)
    times: list[list[float]] = [[] for _ in models]
    for step in range(WARMUP_STEPS + steps):
        for model, optimizer, record in zip(models, optimizers, times, strict=True):
            seconds = _sgd_step(model, optimizer, x, y)
            if step >= WARMUP_STEPS:
                record.append(seconds)
    for _, projector in projected:
        projector.detach()
    return times[0], times[1:]


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --- report ------------------------------------------------------------------------------------
def _checked(name: str, value: float, unit: str, target: float) -> Row:
    verdict = "PASS" if value <= target else "FAIL"
    return Row(name, value, unit, f"<= {target}", verdict)


def _info(name: str, value: float, unit: str, target: str = "") -> Row:
    return Row(name, value, unit, target, "info")


def build_rows(result: dict[str, Any]) -> list[Row]:
    """The result table: each measurement beside its target."""
    online = result["online"]
    sgd_s = result["sgd_step_s"]
    state_b = online["state_bytes_per_weight"]
    temp_b = online["update_transient_bytes_per_weight"]
    rows = [
        _checked("online update (median)", online["update_s"], "s", TARGET_UPDATE_S),
        _info("  CPU time of an update (all threads)", online["update_cpu_s"], "s"),
        _checked(
            f"post-hoc CMD, T={result['config']['snapshots']}",
            result["posthoc_s"],
            "s",
            TARGET_POSTHOC_S,
        ),
        _info("  CPU time of post-hoc (all threads)", result["posthoc_cpu_s"], "s"),
        _checked(
            "online state + update peak", state_b + temp_b, "B/weight", TARGET_BYTES_PER_WEIGHT
        ),
        _info("  of which persistent state", state_b, "B/weight"),
        _info("  of which update temporaries", temp_b, "B/weight"),
        _info("online warm-up end (post-hoc + sums)", online["warmup_finish_s"], "s"),
        _info("online fit (a, b, residual of all N)", online["fit_s"], "s"),
        _info(f"SGD step (batch {result['config']['batch_size']})", sgd_s, "s"),
        _info("online update / SGD step", online["update_s"] / sgd_s, "ratio", "negligible"),
    ]
    for proj in result["projection"]:
        share = f"{proj['fraction']:.0%} embedded"
        per_step = proj["project_s"] + proj["mask_s"]
        whole = proj["step_with_projector_s"] / sgd_s
        rows += [
            _info(f"projection + grad mask, {share}", per_step, "s"),
            _info(f"  / SGD step, {share}", per_step / sgd_s, "ratio", "docs: 0.11"),
            _info(f"  whole step with projector / SGD step, {share}", whole, "ratio"),
        ]
        if "fold_s" in proj:
            fold = proj["project_s"] + proj["fold_s"]
            rows += [
                _info(f"projection + mode-gradient fold, {share}", fold, "s"),
                _info(f"  / SGD step, {share}", fold / sgd_s, "ratio"),
            ]
        if "state_load_s" in proj:
            rows += [
                _info(f"client state load (per round), {share}", proj["state_load_s"], "s"),
                _info(f"client state save (delta rounds), {share}", proj["state_save_s"], "s"),
            ]
    return rows


def format_table(rows: list[Row]) -> str:
    """Rows as a fixed-width text table."""
    width = max(len(r.name) for r in rows)
    lines = [f"{'measurement':<{width}}  {'value':>10}  {'unit':<9} {'target':<11} verdict"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append(f"{r.name:<{width}}  {r.value:>10.4g}  {r.unit:<9} {r.target:<11} {r.verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, and return (and optionally write) the measurements.

    Parameters
    ----------
    argv : list[str] | None
        Command-line arguments; None reads ``sys.argv``.

    Returns
    -------
    dict
        ``config``, ``machine``, the raw measurements and the ``table`` rows.
    """
    args = parse_args(argv)
    shown = sys.argv[1:] if argv is None else argv
    print("$ python -m benchmarks.bench_core " + shlex.join(shown), flush=True)
    load_before = os.getloadavg()
    torch.manual_seed(args.seed)
    build, input_shape = MODELS[args.model]
    model = build()
    layout = ParameterLayout.from_module(model)
    n = layout.n_weights
    print(
        f"model {args.model}: N = {n:,} weights in {len(layout.modelled)} tensors; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )

    snapshots = synthetic_snapshots(n, args.seed)
    traj = np.empty((n, args.snapshots), dtype=np.float32)
    for t in range(args.snapshots):
        traj[:, t] = next(snapshots)

    posthoc_s, posthoc_cpu_s = measure_posthoc(traj, args.modes, args.samples, args.seed, layout)
    print(f"post-hoc CMD: {posthoc_s:.2f} s ({posthoc_cpu_s:.2f} s CPU)", flush=True)
    online, online_result = measure_online(traj, snapshots, args, layout)
    del traj
    print(f"online update: {online_result['update_s']:.3f} s", flush=True)

    projection = []
    projected = []
    for fraction in (float(f) for f in args.fractions.split(",")):
        twin = copy.deepcopy(model)
        projector, direct = measure_projection_direct(twin, layout, online, fraction, args.seed)
        projection.append(direct)
        projected.append((twin, projector))
        print(f"projection at {fraction:.0%}: {direct}", flush=True)
    x = torch.randn(args.batch_size, *input_shape)
    y = torch.randint(0, 10, (args.batch_size,))
    plain_times, projected_times = measure_steps(model, projected, x, y, args.sgd_steps)
    sgd_s = statistics.median(plain_times)
    print(f"SGD steps: {[round(t, 3) for t in plain_times]} s", flush=True)
    for direct, times in zip(projection, projected_times, strict=True):
        direct["step_with_projector_s"] = statistics.median(times)
        direct["step_with_projector_times_s"] = times
        print(f"  with projector {direct['fraction']:.0%}: {[round(t, 3) for t in times]} s")

    result: dict[str, Any] = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "cpus": os.cpu_count(),
            # Load averages (1, 5, 15 min) before and after: other processes on a 2-core machine
            # slow the 2-thread measurements down, by several times for the small ones.
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "n_weights": n,
        "posthoc_s": posthoc_s,
        "posthoc_cpu_s": posthoc_cpu_s,
        "online": online_result,
        "sgd_step_s": sgd_s,
        "sgd_step_times_s": plain_times,
        "projection": projection,
    }
    rows = build_rows(result)
    result["table"] = [asdict(r) for r in rows]
    print()
    print(format_table(rows))
    print(
        f"load average (1 min) before / after: {load_before[0]:.2f} / "
        f"{result['machine']['loadavg_after'][0]:.2f} on {os.cpu_count()} CPUs"
    )
    if n < 4 * CHUNK:
        print(
            f"note: the targets are for N = 11.2 M. At N = {n:,} (< 4 x the {CHUNK:,}-row chunk) "
            "an update's temporaries are not amortised over the chunks, so B/weight is inflated."
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main()
