"""The Flower ServerApp: FedAvg or CMD on a task, every byte metered, results written to disk."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from cmd_fl.checkpoint import load_checkpoint, prefixed, save_checkpoint, unprefixed
from cmd_fl.layout import ParameterLayout
from cmd_fl.ledger import BYTE_COUNTING, ByteLedger, saved_fraction
from simulations.data import load_dataset
from simulations.federation import validation_dataset
from simulations.settings import RunSettings
from simulations.task import build_model, evaluate
from strategies.apf_strategy import APFStrategy
from strategies.cmd_strategy import CMDStrategy, ValidateFn
from strategies.metered import MeteredFedAvg

app = ServerApp()

CHECKPOINT_FILE = "checkpoint.npz"


def make_validate_fn(settings: RunSettings, layout: ParameterLayout) -> ValidateFn | None:
    """Accuracy of a flat model on the server's validation split (None without one)."""
    if settings.validation_size == 0:
        return None
    validation = validation_dataset(settings)
    model = build_model(settings.dataset)

    def validate(flat: np.ndarray, extras: list[np.ndarray]) -> float:
        layout.load_into(model, flat, extras)
        return float(evaluate(model, validation)["accuracy"])

    return validate


def make_strategy(
    settings: RunSettings, layout: ParameterLayout, ledger: ByteLedger
) -> MeteredFedAvg:
    """The strategy the run config names, with its sampling and validation settings."""
    common: dict[str, Any] = {
        "fraction_train": settings.fraction_train,
        "min_train_nodes": settings.min_train_nodes,
        "min_available_nodes": settings.min_available_nodes,
        "sample_by": settings.sample_by,
        "sample_seed": settings.seed,
        "fraction_evaluate": settings.fraction_evaluate,
        "min_valid_replies": settings.min_valid_replies,
        "max_num_examples": settings.max_num_examples or None,
        "codec": settings.codec_spec(),
        "code_downlink": settings.codec_downlink,
        "keyframes": settings.codec_keyframes,
    }
    if settings.strategy == "fedavg":
        return MeteredFedAvg(layout, ledger, **common)
    if settings.strategy == "apf":
        return APFStrategy(
            layout,
            ledger,
            alpha=settings.apf_alpha,
            threshold=settings.apf_threshold,
            random_freeze=settings.apf_random_freeze,
            seed=settings.seed,
            **common,
        )
    return CMDStrategy(
        layout,
        ledger,
        settings.schedule(),
        n_modes=settings.cmd_modes,
        n_samples=settings.cmd_samples,
        seed=settings.seed,
        options=settings.cmd_options(),
        validate_fn=make_validate_fn(settings, layout),
        **common,
    )


class RunRecorder:
    """Evaluates the global model on the server after every round, prints progress, and keeps
    the per-round rows of ``summary.json``."""

    def __init__(
        self,
        settings: RunSettings,
        strategy: MeteredFedAvg,
        ledger: ByteLedger,
        model: torch.nn.Module,
    ) -> None:
        self.settings = settings
        self.strategy = strategy
        self.ledger = ledger
        self.model = model
        _, self.test_set = load_dataset(settings.dataset, settings.data_root or None)
        self.rows: list[dict[str, Any]] = []
        self.started = time.time()

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Flower's ``evaluate_fn``: test accuracy of the global model, plus progress output."""
        self.model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        metrics = evaluate(self.model, self.test_set)
        accuracy, loss = float(metrics["accuracy"]), float(metrics["loss"])
        if server_round == 0:
            print(f"[cmd-fl] round 0: initial accuracy {accuracy:.4f}", flush=True)
            return MetricRecord({"accuracy": accuracy, "loss": loss})
        totals = self.ledger.round_totals(server_round)
        info = self.strategy.round_info.get(server_round, {})
        row = {
            "round": server_round,
            "accuracy": accuracy,
            "loss": loss,
            "bytes_up": totals["bytes_up"],
            "bytes_down": totals["bytes_down"],
            "wire_up": totals["wire_up"],
            "wire_down": totals["wire_down"],
            "state_bytes": totals["state_down"],
            "embedded_fraction": float(info.get("embedded_fraction", 0.0)),
            "state_version": int(info.get("state_version", 0)),
            "rejected_replies": sum(
                1 for r in self.strategy.rejections if r["round"] == server_round
            ),
            "elapsed_s": round(time.time() - self.started, 3),
            # Which data trained (sample-by = "data"): equal across runs of one seed.
            "trained_data_keys": self.strategy.trained_data_keys(server_round),
        }
        self.rows.append(row)
        self._print_progress(row)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    def _print_progress(self, row: dict[str, Any]) -> None:
        # Round 1 sends every node the float32 model under every method and codec; a float32
        # reply is about as large (FedAvg: within 0.5 %), so two of it make one dense round.
        dense_round = 2 * self.rows[0]["bytes_down"]
        spent = sum(r["bytes_up"] + r["bytes_down"] for r in self.rows)
        saved = saved_fraction(spent, dense_round * len(self.rows))
        print(
            f"[cmd-fl] round {row['round']}/{self.settings.num_server_rounds}: "
            f"accuracy {row['accuracy']:.4f} | this round {row['bytes_down'] / 1e6:.3f} MB down, "
            f"{row['bytes_up'] / 1e6:.3f} MB up | total {spent / 1e6:.2f} MB, "
            f"{100 * saved:.1f} % saved vs dense rounds | "
            f"embedded {100 * row['embedded_fraction']:.1f} %",
            flush=True,
        )


@dataclass
class RunOutcome:
    """What a run leaves behind (the summary is also on disk)."""

    summary: dict[str, Any]
    strategy: MeteredFedAvg
    ledger: ByteLedger
    out_dir: Path
    final_arrays: ArrayRecord


def run(grid: Grid, settings: RunSettings) -> RunOutcome:
    """Run one experiment on ``grid`` (or resume it from its checkpoint) and write its results."""
    started = time.time()
    run_name = settings.run_name or (
        f"{settings.strategy}-{settings.dataset}-{settings.partitioning}-s{settings.seed}-"
        f"{time.strftime('%Y%m%d-%H%M%S')}"
    )
    out_dir = settings.results_root() / run_name
    checkpoint_path = out_dir / CHECKPOINT_FILE
    model = build_model(settings.dataset, seed=settings.seed)
    layout = ParameterLayout.from_module(model)
    ledger = ByteLedger()
    strategy = make_strategy(settings, layout, ledger)
    recorder = RunRecorder(settings, strategy, ledger, build_model(settings.dataset))
    initial_arrays = ArrayRecord(model.state_dict())
    first_round, earlier_time = 1, 0.0
    if settings.resume:
        initial_arrays, first_round, earlier_time = restore_run(
            checkpoint_path, settings, strategy, recorder
        )
    print(
        f"[cmd-fl] {settings.strategy} on {settings.dataset}: {layout.n_weights} CMD weights, "
        f"rounds {first_round}..{settings.num_server_rounds}",
        flush=True,
    )

    def after_round(server_round: int, arrays: ArrayRecord) -> None:
        every = settings.checkpoint_every
        if every and (server_round % every == 0 or server_round == settings.num_server_rounds):
            elapsed = earlier_time + time.time() - started
            save_run_checkpoint(
                checkpoint_path, settings, strategy, recorder, arrays, server_round, elapsed
            )

    result = strategy.start(
        grid=grid,
        initial_arrays=initial_arrays,
        num_rounds=settings.num_server_rounds,
        timeout=settings.round_timeout,
        evaluate_fn=recorder.evaluate,
        first_round=first_round,
        after_round=after_round,
    )
    wall_time = earlier_time + time.time() - started
    summary = build_summary(run_name, settings, strategy, ledger, recorder.rows, wall_time)
    write_results(out_dir, summary, ledger)
    print(f"[cmd-fl] results written to {out_dir}", flush=True)
    return RunOutcome(summary, strategy, ledger, out_dir, result.arrays)


# Keys that may differ between a run and its resumption.
_RESUMABLE_KEYS = {"resume", "num-server-rounds", "checkpoint-every"}


def save_run_checkpoint(
    path: Path,
    settings: RunSettings,
    strategy: MeteredFedAvg,
    recorder: RunRecorder,
    arrays: ArrayRecord,
    server_round: int,
    elapsed: float,
) -> None:
    """Write everything needed to resume after ``server_round`` (atomically, no pickle)."""
    state_arrays, meta = strategy.checkpoint()
    state_arrays.update(prefixed("global", {k: v.numpy() for k, v in arrays.items()}))
    meta.update(
        {
            "round": server_round,
            "config": settings.to_run_config(),
            "global_keys": list(arrays.keys()),
            "rows": recorder.rows,
            "elapsed_s": elapsed,
        }
    )
    save_checkpoint(path, state_arrays, meta)


def restore_run(
    path: Path, settings: RunSettings, strategy: MeteredFedAvg, recorder: RunRecorder
) -> tuple[ArrayRecord, int, float]:
    """Load a checkpoint into a fresh strategy; returns (global model, next round, time so far).

    Raises
    ------
    FileNotFoundError
        If there is no checkpoint for this run name.
    ValueError
        If the checkpoint was made with a different run config.
    """
    if not path.exists():
        raise FileNotFoundError(
            f"resume=true but there is no checkpoint at {path} (set run-name and results-dir "
            "to those of the interrupted run)"
        )
    arrays, meta = load_checkpoint(path)
    saved = {k: v for k, v in meta["config"].items() if k not in _RESUMABLE_KEYS}
    current = {k: v for k, v in settings.to_run_config().items() if k not in _RESUMABLE_KEYS}
    changed = sorted(k for k in current if saved.get(k) != current[k])
    if changed:
        raise ValueError(f"cannot resume: run config differs from the checkpoint's in {changed}")
    strategy.restore(arrays, meta)
    recorder.rows = list(meta["rows"])
    model = unprefixed("global", arrays)
    global_arrays = ArrayRecord({key: Array(model[key]) for key in meta["global_keys"]})
    print(f"[cmd-fl] resumed from {path} after round {meta['round']}", flush=True)
    return global_arrays, int(meta["round"]) + 1, float(meta["elapsed_s"])


def build_summary(
    run_name: str,
    settings: RunSettings,
    strategy: MeteredFedAvg,
    ledger: ByteLedger,
    rows: list[dict[str, Any]],
    wall_time_s: float,
) -> dict[str, Any]:
    """The content of ``summary.json``."""
    totals = ledger.totals()
    return {
        "run_name": run_name,
        "strategy": settings.strategy,
        "config": settings.to_run_config(),
        "n_weights": strategy.layout.n_weights,
        "rounds": rows,
        "byte_counting": BYTE_COUNTING,
        "total_bytes_up": totals["bytes_up"],
        "total_bytes_down": totals["bytes_down"],
        "total_wire_up": totals["wire_up"],
        "total_wire_down": totals["wire_down"],
        "total_control_up": totals["control_up"],
        "total_control_down": totals["control_down"],
        "total_state_bytes": totals["state_down"],
        "first_state_messages": ledger.first_state_messages(),
        "total_payload_up": totals["payload_up"],
        "total_payload_down": totals["payload_down"],
        "final_accuracy": rows[-1]["accuracy"] if rows else None,
        "rejected_replies": {"total": len(strategy.rejections), "replies": strategy.rejections},
        "guard_events": getattr(strategy, "guard_events", []),
        "refresh_events": getattr(strategy, "refresh_events", []),
        "wall_time_s": round(wall_time_s, 3),
    }


def write_results(out_dir: Path, summary: dict[str, Any], ledger: ByteLedger) -> None:
    """Write ``summary.json`` and ``ledger.csv`` atomically into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ledger.to_csv(out_dir / "ledger.csv")
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".json.tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(summary, handle, indent=2)
    os.replace(tmp, out_dir / "summary.json")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: read the run config and run."""
    run(grid, RunSettings.from_run_config(dict(context.run_config)))
