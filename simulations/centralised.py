"""Centralised driver: SGD's last iterate beside the online-CMD model and embedded-CMD training.

Run ``python -m simulations.centralised`` (defaults below; ``--help`` lists the options). The time
unit is the epoch: snapshot 0 is the initial model, snapshot t the model after epoch t. Two runs
start from the same initial model and see the same batches in the same order (so they are the
same run until the first embedding event):

(a) plain SGD with an :class:`~cmd_fl.OnlineCMD` beside it. After the warm-up (epoch ``F``) every
    epoch evaluates both the last iterate and the CMD model ``a * w_ref(t) + b`` of the current
    fit (buffers, if any, from the current model);
(b) embedded-CMD training: its own OnlineCMD on its own snapshots; at events (epochs
    ``F + k L``) the most stable weights are embedded (:func:`~cmd_fl.embedding_event`) and kept on
    the CMD model through training by :class:`~cmd_fl.EmbeddedProjector` (gradients masked,
    re-projected after every optimizer step). The event runs after the epoch's snapshot, and the
    newly embedded weights snap onto the CMD model before the epoch is evaluated.

Each epoch prints a progress line; the end prints a table and writes a JSON (config, per-epoch
rows, finals) with ``--out``.

Defaults (a few minutes on 2 CPU cores): Fashion-MNIST, a seeded 5,120-image subset of the
training set, the full test set, 20 epochs of plain SGD (batch 64, lr 0.05), F = 8, L = 2,
P = 10 % of all weights per event, M = 10 modes, K = 1000 samples, a cap of 80 % embedded, one
torch thread: events at epochs 10, 12, ..., 20 reach 60 % embedded at the end.
``--dataset digits`` (scikit-learn's 8x8 digits) is the fast variant for tests.

``simulations.task.train`` builds a new optimizer per call, so with ``--momentum`` > 0 the
momentum buffers restart at every epoch; the default is plain SGD. It also ends each epoch with
the remainder batch, and that last step is what every snapshot and last iterate sees: with 5,000
images and batch 64 it is an 8-image step at full learning rate, which threw the last iterate's
test accuracy from 84 % to 65-68 % in some epochs (train loss smooth; measured). The default subset
is therefore a multiple of the batch size.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cmd_fl import (
    EmbeddedProjector,
    EmbeddingSchedule,
    EmbeddingSelector,
    EmbeddingState,
    OnlineCMD,
    ParameterLayout,
    embedding_event,
)
from cmd_fl.posthoc import CMDFit
from simulations.data import DATASETS, ArrayDataset, load_dataset
from simulations.task import build_model, evaluate, train


@dataclass(frozen=True)
class CentralisedConfig:
    """Hyper-parameters of the centralised experiment.

    Parameters
    ----------
    dataset : str
        ``"fashion-mnist"`` (default) or ``"digits"`` (fast, for tests); ``"cifar10"`` works too
        but is slow on a CPU.
    epochs : int
        Epochs of each run (default 20).
    warmup : int
        F: snapshots 0..F feed the post-hoc CMD of the warm-up (default 8; the docs found
        F = 5 noisy).
    every : int
        L: epochs between embedding events (default 2).
    percent : float
        P: percent of the weights embedded per event (default 10).
    relative : bool
        P counts the not yet embedded weights instead of all of them (default False).
    modes : int
        M: the largest number of modes (default 10).
    max_embedded : float
        Cap on the embedded share (default 0.8; the docs saw collapse from 0.9 up).
    samples : int
        K: weights sampled for clustering (default 1000).
    train_subset : int | None
        Train on a seeded random subset of this many training examples; None or 0 uses all
        (default 5,120: a few minutes, and 80 full batches of 64, see the module docstring).
    batch_size : int
        SGD batch (default 64).
    lr : float
        SGD learning rate (default 0.05).
    momentum : float
        SGD momentum (default 0.0; restarts every epoch, see the module docstring).
    seed : int
        Seed of the initial model, the subset, the batch order and the CMD sampling (default 0).
    data_root : str | None
        Data folder (default: ``simulations.data.default_data_root()``).
    """

    dataset: str = "fashion-mnist"
    epochs: int = 20
    warmup: int = 8
    every: int = 2
    percent: float = 10.0
    relative: bool = False
    modes: int = 10
    max_embedded: float = 0.8
    samples: int = 1000
    train_subset: int | None = 5_120
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.0
    seed: int = 0
    data_root: str | None = None

    def __post_init__(self) -> None:
        """Check the run is long enough to have a CMD model."""
        if self.epochs <= self.warmup:
            raise ValueError(
                f"epochs ({self.epochs}) must exceed the warm-up ({self.warmup}): the CMD model "
                "exists only after snapshot F"
            )

    @property
    def schedule(self) -> EmbeddingSchedule:
        """The embedding schedule these hyper-parameters define."""
        return EmbeddingSchedule(
            warmup=self.warmup,
            every=self.every,
            percent=self.percent,
            relative=self.relative,
            max_fraction=self.max_embedded,
        )


@dataclass
class EmbeddedRun:
    """What embedded-CMD training leaves behind.

    Attributes
    ----------
    model : nn.Module
        The final model (embedded weights on the CMD model).
    layout : ParameterLayout
        Its layout.
    state : EmbeddingState | None
        The embedding state (None if the run ended before the warm-up did).
    online : OnlineCMD
        The online CMD of the run's snapshots.
    """

    model: nn.Module
    layout: ParameterLayout
    state: EmbeddingState | None
    online: OnlineCMD


@dataclass
class CentralisedResult:
    """Rows of both runs and what they leave behind.

    Attributes
    ----------
    config : CentralisedConfig
        The hyper-parameters.
    rows : list[dict]
        One row per epoch (1..epochs), see :func:`run_experiment`.
    sgd_model : nn.Module
        Run (a)'s last iterate.
    sgd_fit : CMDFit
        Run (a)'s final online-CMD fit.
    embedded : EmbeddedRun
        Run (b).
    wall_s : dict[str, float]
        Seconds per run.
    """

    config: CentralisedConfig
    rows: list[dict[str, Any]]
    sgd_model: nn.Module
    sgd_fit: CMDFit
    embedded: EmbeddedRun
    wall_s: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The JSON document: ``config``, ``model``, ``rows``, ``final``, ``wall_s``."""
        layout = self.embedded.layout
        last = self.rows[-1]
        fractions = [row["embedded_fraction"] for row in self.rows]
        return {
            "config": asdict(self.config),
            "model": {
                "n_weights": layout.n_weights,
                "n_tensors": len(layout.modelled),
                "sgd_run_modes": self.sgd_fit.n_modes,
                "sgd_run_references": self.sgd_fit.references.tolist(),
                "embedded_run_modes": (
                    None if self.embedded.state is None else self.embedded.state.n_modes
                ),
            },
            "rows": self.rows,
            "final": {
                "sgd_accuracy": last["sgd_accuracy"],
                "cmd_accuracy": last["cmd_accuracy"],
                "embedded_accuracy": last["embedded_accuracy"],
                "embedded_fraction": last["embedded_fraction"],
                "mean_embedded_fraction": float(np.mean(fractions)),
                "cmd_minus_sgd": last["cmd_accuracy"] - last["sgd_accuracy"],
                "embedded_minus_sgd": last["embedded_accuracy"] - last["sgd_accuracy"],
            },
            "wall_s": self.wall_s,
        }


# --- the two runs ------------------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of one epoch's batch order: the same in both runs, different per epoch."""
    return int(np.random.default_rng([seed, epoch]).integers(2**31))


def cmd_model(model: nn.Module, layout: ParameterLayout, fit: CMDFit) -> nn.Module:
    """A copy of ``model`` with its weights replaced by the CMD model ``a * w_ref + b``.

    The reference values are the current model's; buffers (extras) are the current model's.
    """
    flat = layout.flatten_numpy(model.state_dict())
    weights = fit.reconstruct(flat[fit.references]).astype(flat.dtype)
    twin = copy.deepcopy(model)
    layout.load_into(twin, weights, layout.extra_tensors(model.state_dict()))
    return twin


def _train_epoch(
    model: nn.Module,
    train_set: ArrayDataset,
    config: CentralisedConfig,
    epoch: int,
    projector: EmbeddedProjector | None = None,
) -> float:
    """One epoch of SGD, with the projector's hooks on when given; returns the training loss."""

    def attach(optimizer: torch.optim.Optimizer) -> None:
        assert projector is not None
        projector.attach(optimizer)

    stats = train(
        model,
        train_set,
        epochs=1,
        batch_size=config.batch_size,
        lr=config.lr,
        seed=epoch_seed(config.seed, epoch),
        momentum=config.momentum,
        optimizer_hook=None if projector is None else attach,
    )
    if projector is not None:
        projector.detach()
    return float(stats["loss"])


def _new_online(config: CentralisedConfig, layout: ParameterLayout) -> OnlineCMD:
    return OnlineCMD(
        n_modes=config.modes,
        warmup=config.warmup,
        n_samples=config.samples,
        seed=config.seed,
        layout=layout,
    )


def run_sgd(
    config: CentralisedConfig,
    train_set: ArrayDataset,
    test_set: ArrayDataset,
    log: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], nn.Module, CMDFit]:
    """Run (a): plain SGD with online CMD beside it.

    Parameters
    ----------
    config : CentralisedConfig
        The hyper-parameters.
    train_set, test_set : ArrayDataset
        Training data and the evaluation data.
    log : callable, optional
        Receives one progress line per epoch.

    Returns
    -------
    rows : list[dict]
        Per epoch: ``epoch``, ``sgd_train_loss``, ``sgd_loss``, ``sgd_accuracy``, and after the
        warm-up ``cmd_loss``, ``cmd_accuracy``, ``cmd_mean_residual`` (None before).
    model : nn.Module
        The last iterate.
    fit : CMDFit
        The final online-CMD fit.
    """
    model = build_model(config.dataset, config.seed)
    layout = ParameterLayout.from_module(model)
    online = _new_online(config, layout)
    online.update(layout.flatten_numpy(model.state_dict()))
    rows = []
    for epoch in range(1, config.epochs + 1):
        train_loss = _train_epoch(model, train_set, config, epoch)
        online.update(layout.flatten_numpy(model.state_dict()))
        sgd = evaluate(model, test_set)
        row: dict[str, Any] = {
            "epoch": epoch,
            "sgd_train_loss": train_loss,
            "sgd_loss": sgd["loss"],
            "sgd_accuracy": sgd["accuracy"],
            "cmd_loss": None,
            "cmd_accuracy": None,
            "cmd_mean_residual": None,
        }
        if online.ready:
            fit = online.fit
            cmd = evaluate(cmd_model(model, layout, fit), test_set)
            assert fit.residual is not None
            row.update(
                cmd_loss=cmd["loss"],
                cmd_accuracy=cmd["accuracy"],
                cmd_mean_residual=float(fit.residual.mean()),
            )
        rows.append(row)
        if log is not None:
            log(
                f"(a) epoch {epoch:>3}/{config.epochs}  SGD {_pct(row['sgd_accuracy'])} %  "
                f"CMD {_pct(row['cmd_accuracy'])} %"
            )
    return rows, model, online.fit


def run_embedded(
    config: CentralisedConfig,
    train_set: ArrayDataset,
    test_set: ArrayDataset,
    log: Callable[[str], None] | None = None,
) -> tuple[list[dict[str, Any]], EmbeddedRun]:
    """Run (b): embedded-CMD training.

    Parameters
    ----------
    config : CentralisedConfig
        The hyper-parameters.
    train_set, test_set : ArrayDataset
        Training data and the evaluation data.
    log : callable, optional
        Receives one progress line per epoch.

    Returns
    -------
    rows : list[dict]
        Per epoch: ``epoch``, ``embedded_train_loss``, ``embedded_loss``, ``embedded_accuracy``,
        ``embedded_fraction`` (after this epoch's event), ``newly_embedded``, ``event``.
    run : EmbeddedRun
        The final model, its layout, embedding state and online CMD.
    """
    schedule = config.schedule
    model = build_model(config.dataset, config.seed)
    layout = ParameterLayout.from_module(model)
    online = _new_online(config, layout)
    online.update(layout.flatten_numpy(model.state_dict()))
    state: EmbeddingState | None = None
    selector: EmbeddingSelector | None = None
    projector: EmbeddedProjector | None = None
    rows = []
    for epoch in range(1, config.epochs + 1):
        train_loss = _train_epoch(model, train_set, config, epoch, projector)
        online.update(layout.flatten_numpy(model.state_dict()))
        newly = 0
        event = False
        if online.ready and state is None:  # the end of the warm-up: modes are fixed now
            fit = online.fit
            state = EmbeddingState(fit.modes, fit.references)
            selector = EmbeddingSelector(schedule, fit)
        elif state is not None and selector is not None and schedule.is_event(epoch):
            event = True
            newly = int(embedding_event(selector, online.fit, state).size)
            if newly:
                projector = EmbeddedProjector(model, layout, state)
                projector.project()  # the new members snap onto the CMD model now
        result = evaluate(model, test_set)
        row = {
            "epoch": epoch,
            "embedded_train_loss": train_loss,
            "embedded_loss": result["loss"],
            "embedded_accuracy": result["accuracy"],
            "embedded_fraction": 0.0 if state is None else state.embedded_fraction,
            "newly_embedded": newly,
            "event": event,
        }
        rows.append(row)
        if log is not None:
            log(
                f"(b) epoch {epoch:>3}/{config.epochs}  embedded-CMD run "
                f"{_pct(row['embedded_accuracy'])} %  "
                f"({100 * row['embedded_fraction']:.1f} % of the weights embedded)"
                + (f"  event: +{newly}" if event else "")
            )
    return rows, EmbeddedRun(model=model, layout=layout, state=state, online=online)


def load_data(config: CentralisedConfig) -> tuple[ArrayDataset, ArrayDataset]:
    """Train set (the seeded subset, if any) and the full test set."""
    train_set, test_set = load_dataset(config.dataset, config.data_root)
    if config.train_subset and config.train_subset < len(train_set):
        rng = np.random.default_rng(config.seed)
        chosen = np.sort(rng.choice(len(train_set), size=config.train_subset, replace=False))
        train_set = train_set.subset(chosen)
    return train_set, test_set


def run_experiment(config: CentralisedConfig, verbose: bool = True) -> CentralisedResult:
    """Both runs on the same data, merged into one row per epoch.

    Parameters
    ----------
    config : CentralisedConfig
        The hyper-parameters.
    verbose : bool
        Print a progress line per epoch (default True).

    Returns
    -------
    CentralisedResult
        Rows hold run (a)'s keys (``sgd_*``, ``cmd_*``) and run (b)'s (``embedded_*``,
        ``newly_embedded``, ``event``) under ``epoch``.
    """
    log = _print if verbose else None
    train_set, test_set = load_data(config)
    remainder = len(train_set) % config.batch_size
    if log is not None and 0 < remainder < config.batch_size // 4:
        log(
            f"note: every epoch ends with a {remainder}-example batch, a noisy last step before "
            "each snapshot (see the module docstring)"
        )
    start = time.perf_counter()
    sgd_rows, sgd_model, sgd_fit = run_sgd(config, train_set, test_set, log)
    sgd_s = time.perf_counter() - start
    if log is not None:
        log(f"run (a), SGD with online CMD: {sgd_s:.1f} s")
    start = time.perf_counter()
    emb_rows, embedded = run_embedded(config, train_set, test_set, log)
    emb_s = time.perf_counter() - start
    if log is not None:
        log(f"run (b), embedded CMD: {emb_s:.1f} s")
    rows = [{**a, **b} for a, b in zip(sgd_rows, emb_rows, strict=True)]
    return CentralisedResult(
        config=config,
        rows=rows,
        sgd_model=sgd_model,
        sgd_fit=sgd_fit,
        embedded=embedded,
        wall_s={"sgd_run": sgd_s, "embedded_run": emb_s},
    )


# --- output ------------------------------------------------------------------------------------
def _print(line: str) -> None:
    print(line, flush=True)


def _pct(value: float | None) -> str:
    return "     -" if value is None else f"{100 * value:6.2f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The per-epoch table: test accuracy (%) of the three models and the embedded share."""
    lines = [
        "| epoch | SGD last iterate | online-CMD model | embedded-CMD run | embedded share |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        mark = " *" if row["event"] else ""
        lines.append(
            f"| {row['epoch']} | {_pct(row['sgd_accuracy'])} | {_pct(row['cmd_accuracy'])} | "
            f"{_pct(row['embedded_accuracy'])} | {100 * row['embedded_fraction']:.1f} %{mark} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> tuple[CentralisedConfig, dict[str, Any]]:
    """The config and the run options (``out``, ``quiet``, ``threads``) from the command line."""
    d = CentralisedConfig()
    parser = argparse.ArgumentParser(
        prog="python -m simulations.centralised", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--dataset", choices=DATASETS, default=d.dataset)
    parser.add_argument("--epochs", type=int, default=d.epochs, help=f"({d.epochs})")
    parser.add_argument("--warmup", type=int, default=d.warmup, help=f"F ({d.warmup})")
    parser.add_argument("--every", type=int, default=d.every, help=f"L ({d.every})")
    parser.add_argument("--percent", type=float, default=d.percent, help=f"P ({d.percent})")
    parser.add_argument("--relative", action="store_true", help="P of the not yet embedded")
    parser.add_argument("--modes", type=int, default=d.modes, help=f"M ({d.modes})")
    parser.add_argument(
        "--max-embedded", type=float, default=d.max_embedded, help=f"cap ({d.max_embedded})"
    )
    parser.add_argument("--samples", type=int, default=d.samples, help=f"K ({d.samples})")
    parser.add_argument(
        "--train-subset",
        type=int,
        default=d.train_subset,
        help=f"training examples used, 0 for all ({d.train_subset})",
    )
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help=f"({d.batch_size})")
    parser.add_argument("--lr", type=float, default=d.lr, help=f"({d.lr})")
    parser.add_argument("--momentum", type=float, default=d.momentum, help=f"({d.momentum})")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"({d.seed})")
    parser.add_argument("--data-root", type=str, default=None, help="data folder")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress, table or summary")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads, 0 for torch's default (1: the small CNNs gain little from "
        "more, and lose many times over when other processes share the cores)",
    )
    args = vars(parser.parse_args(argv))
    options = {key: args.pop(key) for key in ("out", "quiet", "threads")}
    return CentralisedConfig(**args), options


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the experiment from command-line arguments, print the table, write the JSON.

    Parameters
    ----------
    argv : list[str] | None
        Arguments (see ``--help``); None reads ``sys.argv``.

    Returns
    -------
    dict
        The JSON document: ``config``, ``model``, ``rows``, ``final``, ``wall_s``, and ``run``
        (the arguments and the torch thread count).
    """
    shown = sys.argv[1:] if argv is None else argv
    config, options = parse_args(argv)
    out: Path | None = options["out"]
    verbose = not options["quiet"]
    if verbose:
        print("$ python -m simulations.centralised " + shlex.join(shown), flush=True)
    threads = torch.get_num_threads()
    if options["threads"] > 0:
        torch.set_num_threads(options["threads"])
    try:
        result = run_experiment(config, verbose=verbose)
    finally:
        torch.set_num_threads(threads)
    document = result.to_json()
    document["run"] = {"argv": list(shown), "torch_threads": options["threads"] or threads}
    final = document["final"]
    if verbose:
        print()
        print(format_table(result.rows))
        print(
            f"\nfinal test accuracy: SGD last iterate {_pct(final['sgd_accuracy'])} %, "
            f"online-CMD model {_pct(final['cmd_accuracy'])} %, "
            f"embedded-CMD run {_pct(final['embedded_accuracy'])} % with "
            f"{100 * final['embedded_fraction']:.1f} % of the weights embedded "
            f"({100 * final['mean_embedded_fraction']:.1f} % on average over the epochs)"
        )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(document, indent=2))
        if verbose:
            print(f"wrote {out}")
    return document


if __name__ == "__main__":
    main()
