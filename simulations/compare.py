"""The comparison driver: FedAvg, APF and CMD through the real Flower simulation engine.

Every run is one ``scripts/run_simulation.sh`` invocation (a real ``flwr run`` on a Ray
simulation) with the full run config of its setting, method and seed; methods differ only by
their overlay in `METHODS`, so data, partitioning, seed and rounds are identical across them.
Runs land in ``<out>/runs/<setting>-<method>-s<seed>/`` (``summary.json``, ``ledger.csv``) with
their log and run config beside them; a run whose summary exists (with the same config) is not
rerun, so an interrupted comparison resumes where it stopped. `simulations.report` turns the
runs into ``report.md``, ``results.json`` and plots.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from cmd_fl.ledger import BYTE_COUNTING
from simulations import report
from simulations.settings import STRATEGIES, RunSettings

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "run_simulation.sh"
PREFIX = "[cmd-fl compare]"
STOP_GRACE_S = 30.0  # the script needs a few seconds to stop its SuperLink and Ray


@dataclass(frozen=True)
class Method:
    """A named run-config overlay.

    Parameters
    ----------
    label : str
        How tables and plots name it.
    overlay : dict[str, Any]
        Run-config keys (kebab case) set on top of the preset's config.
    """

    label: str
    overlay: dict[str, Any]


# Every method the driver knows. An overlay sets only what differs from the preset's shared
# config, so every method of a comparison sees the same data, partitions, seed and rounds.
METHODS: dict[str, Method] = {
    # The dense baseline: every saving is measured against it, paired per seed.
    "fedavg": Method("FedAvg", {"strategy": "fedavg", "codec": "none"}),
    # APF as in shared/docs/apf.md: alpha = 0.99 and T0 = 0.05, the authors' code closest to the
    # ICDCS paper (with alpha = 0.99 a 40-round run freezes little: reported as measured).
    "apf": Method(
        "APF",
        {
            "strategy": "apf",
            "apf-alpha": 0.99,
            "apf-threshold": 0.05,
            "apf-random-freeze": False,
            "codec": "none",
        },
    ),
    # Our stand-in for the aggressive variants (APF#, APF++, A-APF), whose definitions were not
    # available: each parameter gets one extra frozen round with probability 0.5.
    "apf-random": Method(
        "APF + random freezing",
        {
            "strategy": "apf",
            "apf-alpha": 0.99,
            "apf-threshold": 0.05,
            "apf-random-freeze": True,
            "codec": "none",
        },
    ),
    # CMD with this project's defaults (RunSettings): stability+fit selection, |a| <= 10,
    # references with enough variance, at most 80 % embedded, guard and refresh on.
    "cmd": Method("CMD", {"strategy": "cmd", "codec": "none"}),
    # The paper's rule: embed the most stable weights, no cap, no bound on |a|, no reference
    # variance floor, no refresh, references on their own gradient (cmd-method.md measured
    # such runs collapsing).
    "cmd-paper": Method(
        "CMD (paper's rule)",
        {
            "strategy": "cmd",
            "cmd-selection": "stability",
            "cmd-max-abs-a": 0.0,
            "cmd-reference-std-ratio": 0.0,
            "cmd-max-embedded": 1.0,
            "cmd-refresh-every": 0,
            "cmd-reference-gradient": "own",
            "codec": "none",
        },
    ),
    # CMD with the reference code's projection: clients train every weight and the embedded
    # ones are re-projected at the round boundary instead of after every local step.
    "cmd-round": Method(
        "CMD (round projection)", {"strategy": "cmd", "cmd-projection": "round", "codec": "none"}
    ),
    # What a Flower user would try first: FedAvg's updates through a codec (both directions,
    # with error feedback); and the same codecs on what CMD sends.
    "fedavg-fp16": Method("FedAvg + fp16", {"strategy": "fedavg", "codec": "fp16"}),
    "fedavg-int8": Method("FedAvg + int8", {"strategy": "fedavg", "codec": "int8"}),
    "fedavg-topk": Method("FedAvg + top-10 %", {"strategy": "fedavg", "codec": "topk"}),
    "apf-int8": Method(
        "APF + int8",
        {
            "strategy": "apf",
            "apf-alpha": 0.99,
            "apf-threshold": 0.05,
            "apf-random-freeze": False,
            "codec": "int8",
        },
    ),
    "cmd-int8": Method("CMD + int8", {"strategy": "cmd", "codec": "int8"}),
    "cmd-topk": Method("CMD + top-10 %", {"strategy": "cmd", "codec": "topk"}),
    # The compact state (cmd-coefficients = grid: one-byte a, float16 b), for clients that
    # get the whole state rarely (cross-device); alone and under int8.
    "cmd-grid": Method(
        "CMD, one-byte a", {"strategy": "cmd", "cmd-coefficients": "grid", "codec": "none"}
    ),
    "cmd-int8-grid": Method(
        "CMD + int8, one-byte a", {"strategy": "cmd", "codec": "int8", "cmd-coefficients": "grid"}
    ),
}

# Data settings: how the training set is split over the clients.
SETTINGS: dict[str, dict[str, Any]] = {
    "iid": {"partitioning": "iid"},
    "dirichlet": {"partitioning": "dirichlet", "dirichlet-alpha": 0.5},
}


@dataclass(frozen=True)
class Preset:
    """A comparison: the shared run config and the default settings, seeds and methods.

    Parameters
    ----------
    name : str
        The ``--preset`` value.
    description : str
        One line for ``--help`` and the report.
    supernodes : int
        Simulated SuperNodes, one client (partition) each.
    config : dict[str, Any]
        Run-config keys shared by every run (on top of RunSettings' defaults).
    settings : tuple[str, ...]
        Default data settings (keys of `SETTINGS`).
    seeds : tuple[int, ...]
        Default seeds.
    methods : tuple[str, ...]
        Default methods (keys of `METHODS`).
    optional_methods : tuple[str, ...]
        Default methods dropped, with a note, when this checkout cannot run them yet.
    targets : dict[str, float]
        The report's targets where they differ from `report.DEFAULT_TARGETS`.
    """

    name: str
    description: str
    supernodes: int
    config: dict[str, Any]
    settings: tuple[str, ...]
    seeds: tuple[int, ...]
    methods: tuple[str, ...]
    optional_methods: tuple[str, ...] = ()
    targets: dict[str, float] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    # For CI: 4538-weight CNN on sklearn's digits, about 40 s per run on 2 idle cores (mostly
    # Ray and SuperLink start-up). Momentum and 3 local epochs make 8 rounds reach ~0.85.
    "quick": Preset(
        name="quick",
        description="digits, 4 clients, 8 rounds, warm-up 2, 1 seed (CI smoke comparison)",
        supernodes=4,
        config={
            "dataset": "digits",
            "num-partitions": 4,
            "num-server-rounds": 8,
            "train-subset": 0,
            "validation-size": 140,
            "learning-rate": 0.05,
            "momentum": 0.9,
            "local-epochs": 3,
            "cmd-warmup": 2,
            "cmd-samples": 500,
        },
        settings=("iid",),
        seeds=(0,),
        methods=("fedavg", "apf", "cmd"),
        optional_methods=("apf",),
    ),
    # The setting of cmd-method.md's study: Fashion-MNIST, 20,000 training images, 10 clients,
    # the 65,558-weight CNN, plain SGD, 1 local epoch, 40 rounds.
    "paper": Preset(
        name="paper",
        description="fashion-mnist, 10 clients, iid and dirichlet(0.5), 40 rounds, 3 seeds",
        supernodes=10,
        config={
            "dataset": "fashion-mnist",
            "num-partitions": 10,
            "num-server-rounds": 40,
            "train-subset": 20000,
            "learning-rate": 0.05,
            "momentum": 0.0,
            "local-epochs": 1,
        },
        settings=("iid", "dirichlet"),
        seeds=(0, 1, 2),
        methods=("fedavg", "apf", "apf-random", "cmd", "cmd-paper", "cmd-round"),
    ),
    # ResNet-18 on CIFAR-10 with the paper's recipe (SGD momentum 0.9, lr 0.05, batch 128,
    # F = 20, M = 10, K = 1000). Needs the CIFAR-10 python batches under data-root and hours.
    "cifar10": Preset(
        name="cifar10",
        description="cifar10 ResNet-18, 10 clients, 100 rounds, warm-up 20 (needs the data)",
        supernodes=10,
        config={
            "dataset": "cifar10",
            "num-partitions": 10,
            "num-server-rounds": 100,
            "train-subset": 0,
            "learning-rate": 0.05,
            "momentum": 0.9,
            "batch-size": 128,
            "local-epochs": 1,
            "cmd-warmup": 20,
            "cmd-embed-every": 2,
            "cmd-modes": 10,
            "cmd-samples": 1000,
        },
        settings=("iid",),
        seeds=(0,),
        methods=("fedavg", "apf", "cmd"),
    ),
    # Cross-device: the whole Fashion-MNIST training set over 100 clients with Dirichlet(0.5)
    # label skew, exactly 10 sampled per round (fraction 0.1 of 100, at least 10, and every
    # round waits for all 100 to be connected so the fraction is always taken of 100).
    # Client training: plain SGD as in `paper`, tuned for FedAvg; CMD's schedule is chosen for
    # 100 rounds of noisy, partially sampled global models (see the comments on the keys).
    "cross-device": Preset(
        name="cross-device",
        description=(
            "fashion-mnist (all 60,000), 100 clients, dirichlet(0.5), 10 per round, "
            "100 rounds, 2 seeds"
        ),
        supernodes=100,
        config={
            "dataset": "fashion-mnist",
            "num-partitions": 100,
            "num-server-rounds": 100,
            "train-subset": 0,
            "fraction-train": 0.1,
            "min-train-nodes": 10,
            "min-available-nodes": 100,
            # FedAvg's best recipe of those tried (plain SGD at 0.05 or 0.1 with 1, 3 or 5 local
            # epochs, or momentum 0.9 at 0.01 or 0.02 with 1; docs/experiments.md, "A tuned FedAvg
            # baseline"). With the `paper` preset's 0.05 and 1 epoch, FedAvg was still climbing at
            # round 100 (0.85).
            "learning-rate": 0.1,
            "momentum": 0.0,
            "local-epochs": 3,
            # Each global step averages 10 of 100 skewed clients, so trajectories are noisier
            # than in `paper`: twice its warm-up (cmd-method.md: 6 snapshots gave noisy modes).
            "cmd-warmup": 10,
            # Stability is judged over 2 rounds, not 1; the cap is reached by round 24 of 100.
            "cmd-embed-every": 2,
            # 75 % embedded at most, not 80: with 1 local epoch, each 5 points of the cap cost
            # about 0.3 points of accuracy for 3 points of saving (docs/experiments.md).
            "cmd-max-embedded": 0.75,
            # Refresh probes still release drifted weights, but do not re-fit the offsets b of
            # the others: a re-fit must reach every one of the 100 clients (about 200 kB each),
            # not only the 10 sampled ones; it cost 10 % of FedAvg's bytes here (seed 0).
            "cmd-refresh-refit": False,
            # Nearly every client gets the whole state once: one-byte a and float16 b (3 bytes
            # a weight instead of 8) keep that first message under one dense model (docs/
            # experiments.md, "Cheap state for clients seen rarely").
            "cmd-coefficients": "grid",
            # Embed the weights whose coefficients moved least, without the fit-residual rank
            # of the default rule: with 10 of 100 skewed clients a round, well-fitted weights
            # are often the ones that still learn (docs/experiments.md, "What CMD's accuracy
            # costs cross-device").
            "cmd-selection": "stability",
        },
        settings=("dirichlet",),
        seeds=(0, 1),
        methods=("fedavg", "fedavg-int8", "cmd", "cmd-int8"),
        # Issue 15: at least 50 % saved at most 1 point below FedAvg.
        targets={"max_bytes_ratio": 0.5, "max_accuracy_drop_points": 1.0},
    ),
}


@dataclass(frozen=True)
class RunSpec:
    """One planned run.

    Parameters
    ----------
    run_name : str
        ``<setting>-<method>-s<seed>``: the folder under ``<out>/runs``.
    setting, method : str
        Keys of `SETTINGS` and `METHODS`.
    seed : int
        The run's seed (model initialisation, partitions, sampling).
    config : dict[str, Any]
        The full resolved run config (every RunSettings key, kebab case).
    passed : dict[str, Any]
        What goes to ``flwr run --run-config``: every key pyproject.toml declares.
    """

    run_name: str
    setting: str
    method: str
    seed: int
    config: dict[str, Any]
    passed: dict[str, Any]


@dataclass
class Plan:
    """Everything a comparison runs, and where.

    Parameters
    ----------
    preset : Preset
        The preset the plan came from.
    out : Path
        The report folder (absolute).
    settings, methods : list[str]
        Keys of `SETTINGS` and `METHODS`, in report order.
    seeds : list[int]
        Seeds, paired across methods.
    runs : list[RunSpec]
        Ordered setting, then seed, then method: each finished seed can be compared at once.
    skipped_methods : dict[str, str]
        Optional methods left out, and why.
    """

    preset: Preset
    out: Path
    settings: list[str]
    methods: list[str]
    seeds: list[int]
    runs: list[RunSpec]
    skipped_methods: dict[str, str] = field(default_factory=dict)

    @property
    def runs_dir(self) -> Path:
        """``<out>/runs``: the results-dir of every run."""
        return self.out / "runs"


def declared_run_config_keys(pyproject: Path = REPO / "pyproject.toml") -> set[str]:
    """Run-config keys pyproject.toml declares (Flower rejects overrides of any other key)."""
    with pyproject.open("rb") as handle:
        data = tomllib.load(handle)
    return set(data.get("tool", {}).get("flwr", {}).get("app", {}).get("config", {}))


def method_problem(name: str, declared: set[str]) -> str | None:
    """Why this checkout cannot run method ``name`` (None if it can)."""
    if name not in METHODS:
        return f"unknown method {name!r}; known: {', '.join(METHODS)}"
    overlay = METHODS[name].overlay
    if overlay["strategy"] not in STRATEGIES:
        return f"strategy {overlay['strategy']!r} is not in this checkout ({STRATEGIES})"
    undeclared = sorted(set(overlay) - declared)
    if undeclared:
        return (
            f"pyproject.toml's [tool.flwr.app.config] does not declare {undeclared}, "
            "so Flower would reject the run config"
        )
    return None


def resolve_config(
    preset: Preset, setting: str, method: str, seed: int, overrides: dict[str, Any]
) -> dict[str, Any]:
    """The full run config of one run, validated and typed by RunSettings.

    Later layers win: RunSettings' defaults, the preset, the setting, the method, ``overrides``
    (``--rounds``, results-dir), then seed and run-name.
    """
    merged: dict[str, Any] = {
        **preset.config,
        **SETTINGS[setting],
        **METHODS[method].overlay,
        **overrides,
        "seed": seed,
        "run-name": f"{setting}-{method}-s{seed}",
    }
    return RunSettings.from_run_config(merged).to_run_config()


def make_plan(
    preset_name: str,
    out: Path,
    seeds: Sequence[int] | None = None,
    methods: Sequence[str] | None = None,
    settings: Sequence[str] | None = None,
    rounds: int | None = None,
    declared: set[str] | None = None,
) -> Plan:
    """Resolve a preset and the command line's choices into the runs to do.

    Parameters
    ----------
    preset_name : str
        A key of `PRESETS`.
    out : Path
        The report folder; made absolute.
    seeds, methods, settings : sequences, optional
        Override the preset's defaults. Methods asked for explicitly must be runnable here;
        the preset's optional ones are dropped with a note when they are not.
    rounds : int, optional
        Override ``num-server-rounds``.
    declared : set[str], optional
        The run-config keys Flower accepts; default: pyproject.toml's.

    Raises
    ------
    ValueError
        For an unknown preset, setting or method, a method this checkout cannot run, or a run
        config RunSettings rejects.
    """
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; known: {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    declared = declared_run_config_keys() if declared is None else declared
    chosen_settings = list(settings or preset.settings)
    for name in chosen_settings:
        if name not in SETTINGS:
            raise ValueError(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
    skipped: dict[str, str] = {}
    chosen_methods: list[str] = []
    for name in dict.fromkeys(methods or preset.methods):  # unique, in order
        if name not in METHODS:
            raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
        problem = method_problem(name, declared)
        if problem is None:
            chosen_methods.append(name)
        elif methods is None and name in preset.optional_methods:
            skipped[name] = problem
        else:
            raise ValueError(f"method {name!r} cannot run here: {problem}")
    chosen_seeds = list(dict.fromkeys(preset.seeds if seeds is None else seeds))
    if not chosen_seeds or not chosen_methods or not chosen_settings:
        raise ValueError("a comparison needs at least one seed, method and setting")
    out = out.expanduser().absolute()
    overrides: dict[str, Any] = {"results-dir": str(out / "runs")}
    if rounds is not None:
        overrides["num-server-rounds"] = rounds
    runs = []
    for setting in chosen_settings:
        for seed in chosen_seeds:
            for method in chosen_methods:
                config = resolve_config(preset, setting, method, seed, overrides)
                explicit = {**preset.config, **SETTINGS[setting], **METHODS[method].overlay}
                undeclared = sorted(set(explicit) - declared)
                if undeclared:
                    raise ValueError(
                        f"preset {preset.name!r} sets {undeclared}, which pyproject.toml's "
                        "[tool.flwr.app.config] does not declare"
                    )
                passed = {k: v for k, v in config.items() if k in declared}
                runs.append(RunSpec(config["run-name"], setting, method, seed, config, passed))
    return Plan(preset, out, chosen_settings, chosen_methods, chosen_seeds, runs, skipped)


def check_data(plan: Plan) -> None:
    """Load every data set the plan uses once, here, so that missing data fails before any run.

    Raises
    ------
    FileNotFoundError or ImportError
        With the data loader's instructions (where to put the files, what to install).
    """
    from simulations.data import load_dataset

    for dataset, root in sorted({(s.config["dataset"], s.config["data-root"]) for s in plan.runs}):
        load_dataset(dataset, root or None)


def toml_value(value: Any) -> str:
    """A run-config value as TOML (bool, int, float or string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"run-config value {value} is not finite")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"run-config value {value!r} of type {type(value).__name__}")


def write_run_config(spec: RunSpec, path: Path) -> None:
    """The run's ``--run-config`` TOML file (also a record of what was asked for)."""
    lines = [f"# {spec.run_name}: run config passed to flwr run"]
    lines += [f"{key} = {toml_value(value)}" for key, value in sorted(spec.passed.items())]
    path.write_text("\n".join(lines) + "\n")


# Run-config keys read only by one strategy: a run of another strategy does not depend on them.
STRATEGY_KEY_PREFIXES = {"cmd": "cmd-", "apf": "apf-"}
# Where a run writes, not what it computes: a report folder that was moved or copied keeps its runs.
LOCATION_KEYS = ("results-dir",)


def config_mismatch(requested: dict[str, Any], recorded: dict[str, Any]) -> list[str]:
    """Keys whose value in a run's ``summary.json`` differs from the requested config.

    Keys that only another strategy reads (``cmd-*`` for a FedAvg or APF run, ``apf-*`` for
    the others) are ignored, so a new CMD option does not make finished baselines rerun; so
    are the ``codec-*`` options of a run without a codec, and ``results-dir`` (the summary was
    found where the plan looks, wherever the run wrote it).
    """
    ignored = tuple(
        prefix
        for strategy, prefix in STRATEGY_KEY_PREFIXES.items()
        if strategy != requested.get("strategy")
    )
    if requested.get("codec", "none") == "none":
        ignored += ("codec-",)
    return sorted(
        key
        for key, value in requested.items()
        if recorded.get(key) != value and not key.startswith(ignored) and key not in LOCATION_KEYS
    )


def load_summary(path: Path) -> dict[str, Any] | None:
    """A run's ``summary.json`` (None if missing or unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class ActiveRun:
    """A run whose script is running."""

    spec: RunSpec
    index: int
    process: subprocess.Popen[bytes]
    log: Path
    started: float
    job: int


@dataclass
class Progress:
    """Prints one line per run event, with an ETA from the runs finished so far."""

    total: int
    stream: TextIO
    durations: list[float] = field(default_factory=list)
    remaining: int = 0
    jobs: int = 1

    def line(self, index: int, spec: RunSpec, text: str) -> None:
        """Print ``[i/n] run-name: text``."""
        width = len(str(self.total))
        self.say(f"{PREFIX} [{index:>{width}}/{self.total}] {spec.run_name}: {text}")

    def say(self, text: str) -> None:
        """Print a line; a closed output (the caller went away) must not stop the runs."""
        try:
            print(text, file=self.stream, flush=True)
        except (OSError, ValueError):
            pass

    def eta(self) -> str:
        """Estimated time left, from the mean duration of the runs finished here."""
        if not self.durations or self.remaining <= 0:
            return ""
        mean = sum(self.durations) / len(self.durations)
        left = mean * math.ceil(self.remaining / self.jobs)
        return f" | {self.remaining} left, ETA {format_duration(left)}"


def format_duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``42s``."""
    whole = round(seconds)
    if whole >= 3600:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    if whole >= 60:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole}s"


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    children = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (field 2) may hold spaces: the parent PID follows its ")".
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat_file.parent.name))
    return children


def stop_run_script(process: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> None:
    """Stop a run's script so that its own clean-up stops the SuperLink and Ray under it.

    ``flwr run`` (a client that streams the run's logs) and the script get SIGTERM; the
    script's trap runs once the ``flwr run`` pipeline has ended and stops the SuperLink with
    everything below it. Signalling the whole process group at once would kill the SuperLink
    before the script can find its descendants (Ray). Only if the script lingers past
    ``grace_s`` does its process group get SIGTERM, then SIGKILL.
    """
    if process.poll() is not None:
        return
    for child in child_pids(process.pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(part.endswith(b"/flwr") for part in argv[:2]):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGTERM)
    steps = (
        (lambda: os.kill(process.pid, signal.SIGTERM), grace_s),
        (lambda: os.killpg(process.pid, signal.SIGTERM), 10.0),
        (lambda: os.killpg(process.pid, signal.SIGKILL), 5.0),
    )
    for send, wait_s in steps:
        if process.poll() is not None:
            return
        try:
            send()
            process.wait(timeout=wait_s)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT inside the block (a no-op outside the main thread)."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def processes_with_flwr_home(flwr_home: Path) -> list[int]:
    """PIDs of live processes started with this FLWR_HOME (empty without Linux ``/proc``).

    SuperLink, SuperExec, the simulation and Ray's daemons and actors all inherit the
    environment of the script that started them, and every job slot has its own FLWR_HOME.
    """
    marker = f"FLWR_HOME={flwr_home}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # gone, or not ours to read
            continue
    return [pid for pid in found if pid != os.getpid()]


def sweep_leftovers(flwr_home: Path, grace_s: float = 10.0) -> int:
    """Wait up to ``grace_s`` for a finished run's processes to exit, then kill the rest.

    Returns how many had to be killed (Ray's agents can outlive an interrupted run).
    """
    deadline = time.monotonic() + grace_s
    while (left := processes_with_flwr_home(flwr_home)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(left)


@dataclass
class Outcome:
    """What a comparison did: run records (for the report) and whether it was interrupted."""

    records: list[dict[str, Any]]
    interrupted: bool
    ran: list[str]
    skipped: list[str]


def run_comparison(
    plan: Plan,
    jobs: int = 1,
    force: bool = False,
    run_timeout_s: float = 0.0,
    script: Path = SCRIPT,
    stream: TextIO | None = None,
    report_only: bool = False,
) -> Outcome:
    """Run every planned run not done yet, ``jobs`` at a time, and collect the records.

    Parameters
    ----------
    plan : Plan
        From `make_plan`.
    jobs : int
        Runs at a time. Default 1: wall times are only comparable without contention.
    force : bool
        Rerun runs whose summary already exists.
    run_timeout_s : float
        Stop a run after this many seconds (0: no limit).
    script : Path
        The script that runs one simulation (``scripts/run_simulation.sh``).
    stream : TextIO, optional
        Where progress lines go (default: standard output).
    report_only : bool
        Start nothing: collect the runs already done (the others are ``not run``).

    Returns
    -------
    Outcome
        A record per planned run: ``done``, ``failed`` or ``not run`` (after an interrupt, or
        with `report_only`).
        A KeyboardInterrupt stops the running scripts and returns with ``interrupted`` set;
        the runs already done stay on disk.
    """
    if jobs < 1:
        raise ValueError("jobs must be >= 1")
    if not script.exists():
        raise FileNotFoundError(f"{script} not found: the driver runs from a source checkout")
    plan.runs_dir.mkdir(parents=True, exist_ok=True)
    records: dict[str, dict[str, Any]] = {}
    pending: list[tuple[int, RunSpec]] = []
    skipped: list[str] = []
    progress = Progress(len(plan.runs), stream or sys.stdout, jobs=jobs)
    for index, spec in enumerate(plan.runs, start=1):
        summary = load_summary(plan.runs_dir / spec.run_name / "summary.json")
        if summary is not None and not force:
            mismatch = config_mismatch(spec.config, summary.get("config", {}))
            stale = summary.get("byte_counting") != BYTE_COUNTING
            if not mismatch and not stale:
                record = report.run_record(spec_meta(spec, plan), summary, read_sidecar(plan, spec))
                records[spec.run_name] = record
                skipped.append(spec.run_name)
                progress.line(index, spec, f"done earlier, skipped ({describe_done(record)})")
                continue
            if mismatch:
                progress.line(index, spec, f"config changed ({', '.join(mismatch)}): will rerun")
            else:
                progress.line(index, spec, "wire bytes only in its totals (older run): will rerun")
        if report_only:
            progress.line(index, spec, "not run (report only)")
            continue
        pending.append((index, spec))
    progress.remaining = len(pending)

    active: list[ActiveRun] = []
    ran: list[str] = []
    interrupted = False
    free_jobs = list(range(jobs))

    def finish(run: ActiveRun, timed_out: bool) -> None:
        ended = time.monotonic()
        active.remove(run)
        free_jobs.append(run.job)
        killed = sweep_leftovers(job_flwr_home(plan, run.job))
        record = finish_run(plan, run, ended - run.started, timed_out, run_timeout_s)
        records[run.spec.run_name] = record
        ran.append(run.spec.run_name)
        progress.durations.append(ended - run.started)
        progress.remaining -= 1
        if record["status"] == "done":
            text = f"done in {record['process_wall_s']:.0f} s: {describe_done(record)}"
        else:
            text = f"FAILED ({record['reason']}); log {record['log']}"
        if killed:
            text += f" (killed {killed} leftover processes)"
        progress.line(run.index, run.spec, text + progress.eta())

    try:
        while pending or active:
            while pending and free_jobs:
                index, spec = pending.pop(0)
                active.append(start_run(plan, spec, index, free_jobs.pop(0), script))
                progress.line(index, spec, f"started (log {log_path(plan, spec)})")
            for run in list(active):
                elapsed = time.monotonic() - run.started
                timed_out = run_timeout_s > 0 and elapsed > run_timeout_s
                if run.process.poll() is None and not timed_out:
                    continue
                if timed_out:
                    stop_run_script(run.process)
                finish(run, timed_out)
            time.sleep(0.2)
    except BaseException as err:
        # Stop what runs before anything else (even printing) can fail; a second Ctrl-C must
        # not cut the clean-up short.
        with sigint_ignored():
            for run in active:
                stop_run_script(run.process)
                sweep_leftovers(job_flwr_home(plan, run.job))
                records[run.spec.run_name] = report.failed_record(
                    spec_meta(run.spec, plan),
                    "stopped by an interrupt",
                    str(log_path(plan, run.spec)),
                    status="interrupted",
                )
        if not isinstance(err, KeyboardInterrupt):
            raise
        interrupted = True
        progress.say(f"{PREFIX} interrupted: stopped {len(active)} running run(s)")
    for spec in plan.runs:
        if spec.run_name not in records:
            records[spec.run_name] = report.failed_record(
                spec_meta(spec, plan), "not run", "", status="not run"
            )
    ordered = [records[spec.run_name] for spec in plan.runs]
    return Outcome(ordered, interrupted, ran, skipped)


def spec_meta(spec: RunSpec, plan: Plan) -> dict[str, Any]:
    """The identifying part of a run's record."""
    return {
        "run_name": spec.run_name,
        "setting": spec.setting,
        "method": spec.method,
        "label": METHODS[spec.method].label,
        "seed": spec.seed,
        "config": spec.config,
        "run_dir": str(plan.runs_dir / spec.run_name),
    }


def job_flwr_home(plan: Plan, job: int) -> Path:
    """The FLWR_HOME of a job slot: concurrent runs never share Flower's connection config."""
    return plan.out / "flwr-home" / f"job{job}"


def log_path(plan: Plan, spec: RunSpec) -> Path:
    """``<out>/runs/<run-name>.log``."""
    return plan.runs_dir / f"{spec.run_name}.log"


def sidecar_path(plan: Plan, spec: RunSpec) -> Path:
    """``<out>/runs/<run-name>.process.json``: what the driver measured about the process."""
    return plan.runs_dir / f"{spec.run_name}.process.json"


def read_sidecar(plan: Plan, spec: RunSpec) -> dict[str, Any]:
    """The driver's record of a run's process (empty if it has none)."""
    path = sidecar_path(plan, spec)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def start_run(plan: Plan, spec: RunSpec, index: int, job: int, script: Path) -> ActiveRun:
    """Start ``script`` for one run in its own session, its output going to the run's log."""
    config_path = plan.runs_dir / f"{spec.run_name}.toml"
    write_run_config(spec, config_path)
    # A rerun (forced, or after a config change) must never leave the old results looking new.
    sidecar_path(plan, spec).unlink(missing_ok=True)
    (plan.runs_dir / spec.run_name / "summary.json").unlink(missing_ok=True)
    env = dict(os.environ)
    env.pop("CMD_FL_SUPERLINK_PORT", None)  # each run picks a free port
    env.update(
        CMD_FL_SUPERNODES=str(plan.preset.supernodes),
        FLWR_HOME=str(job_flwr_home(plan, job)),
        PYTHONUNBUFFERED="1",
    )
    log = log_path(plan, spec)
    with log.open("wb") as handle:
        header = f"$ bash {script} --run-config {config_path}\n"
        handle.write(header.encode())
        handle.flush()
        process = subprocess.Popen(
            ["bash", str(script), "--run-config", str(config_path)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
            start_new_session=True,  # Ctrl-C reaches the driver, which stops the run in order
        )
    return ActiveRun(spec, index, process, log, time.monotonic(), job)


def finish_run(
    plan: Plan, run: ActiveRun, process_wall_s: float, timed_out: bool, timeout_s: float
) -> dict[str, Any]:
    """The record of a run whose script has exited (or was stopped)."""
    spec = run.spec
    process_wall_s = round(process_wall_s, 3)
    returncode = run.process.wait()
    sidecar = {"returncode": returncode, "process_wall_s": process_wall_s, "log": str(run.log)}
    meta = spec_meta(spec, plan)
    summary = load_summary(plan.runs_dir / spec.run_name / "summary.json")
    reason = ""
    if timed_out:
        reason = f"timed out after {timeout_s:.0f} s"
    elif returncode != 0:
        reason = f"exit {returncode}"
    elif summary is None:
        reason = "no summary.json"
    else:
        mismatch = config_mismatch(spec.config, summary.get("config", {}))
        if mismatch:
            reason = f"the app ran another config: {', '.join(mismatch)}"
    if reason:
        if summary is not None:  # keep it, but never mistake it for a finished run on resume
            os.replace(
                plan.runs_dir / spec.run_name / "summary.json",
                plan.runs_dir / spec.run_name / "summary.failed.json",
            )
        return report.failed_record(meta, reason, str(run.log), returncode=returncode)
    assert summary is not None
    sidecar_path(plan, spec).write_text(json.dumps(sidecar, indent=2))
    return report.run_record(meta, summary, sidecar)


def describe_done(record: dict[str, Any]) -> str:
    """``accuracy 0.8712, 0.61 MB up, 0.60 MB down``."""
    return (
        f"accuracy {record['final_accuracy']:.4f}, {record['total_bytes_up'] / 1e6:.3f} MB up, "
        f"{record['total_bytes_down'] / 1e6:.3f} MB down"
    )


def compare(
    plan: Plan,
    jobs: int = 1,
    force: bool = False,
    run_timeout_s: float = 0.0,
    command: Iterable[str] = (),
    script: Path = SCRIPT,
    stream: TextIO | None = None,
    report_only: bool = False,
) -> tuple[Outcome, dict[str, Any]]:
    """Run a plan, then write its report folder (also after an interrupt).

    Parameters
    ----------
    plan : Plan
        From `make_plan`.
    jobs, force, run_timeout_s, script, stream, report_only
        As in `run_comparison`.
    command : iterable of str
        The command line, recorded in the report.

    Returns
    -------
    tuple[Outcome, dict]
        The outcome and the content of ``results.json``.
    """
    started = time.time()
    outcome = run_comparison(plan, jobs, force, run_timeout_s, script, stream, report_only)
    meta = {
        "preset": plan.preset.name,
        "preset_description": plan.preset.description,
        "supernodes": plan.preset.supernodes,
        "preset_config": plan.preset.config,
        "targets": {**report.DEFAULT_TARGETS, **plan.preset.targets},
        "settings": {name: SETTINGS[name] for name in plan.settings},
        "methods": {
            name: {"label": METHODS[name].label, "overlay": METHODS[name].overlay}
            for name in plan.methods
        },
        "skipped_methods": plan.skipped_methods,
        "seeds": plan.seeds,
        "jobs": jobs,
        "command": list(command),
        "interrupted": outcome.interrupted,
        "ran": outcome.ran,
        "resumed": outcome.skipped,
        "driver_wall_s": round(time.time() - started, 3),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    results = report.write_report(plan.out, meta, outcome.records)
    return outcome, results
