"""What a client's first CMD message costs, against one dense model, for each state precision.

    .venv/bin/python benchmarks/first_message.py RUN_DIR [RUN_DIR ...]

``RUN_DIR`` is a CMD run's results folder (``<results-dir>/<run-name>`` with ``checkpoint.npz``,
e.g. a ``cmd-fl compare`` run under ``<out>/runs/``). The script restores the run's server from
its last checkpoint, exactly as ``resume=true`` would, and builds the training message that a
node holding no state receives: the free weights and references in float32 plus the full CMD
state. It measures that real Flower message (network bytes, as the ledger counts them: wire
plus control; and the state's share) and a FedAvg message of the same model, and prints their
ratio. It then re-encodes the same state as ``cmd-coefficients`` would have left it: float16
``a`` and ``b``, and ``a`` on the one-byte grid (``b`` moved so that each weight keeps its
value at the checkpoint's references). The embedded set, modes and references are the run's.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common import MessageType
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from cmd_fl.checkpoint import load_checkpoint
from cmd_fl.embedding import EmbeddingState
from cmd_fl.layout import ParameterLayout
from cmd_fl.ledger import ByteLedger
from cmd_fl.payload import CONFIG, DENSE_MODEL
from cmd_fl.wire import A_GRID_STEP, snap_to_a_grid
from simulations.server_app import CHECKPOINT_FILE, make_strategy
from simulations.settings import RunSettings
from simulations.task import build_model
from strategies.cmd_strategy import COEFFICIENT_PRECISIONS, CMDStrategy

NEW_NODE = 4242  # a node id the run never saw
RUN_ID = 8_346_523_987_123_456_789  # a 64-bit run id, as the SuperLink makes them


def restored_strategy(run_dir: Path) -> tuple[CMDStrategy, RunSettings]:
    """The run's CMD server as its last checkpoint left it."""
    arrays, meta = load_checkpoint(run_dir / CHECKPOINT_FILE)
    settings = RunSettings.from_run_config(dict(meta["config"]))
    if settings.strategy != "cmd":
        raise SystemExit(f"{run_dir}: a {settings.strategy} run, not CMD")
    layout = ParameterLayout.from_module(build_model(settings.dataset))
    strategy = make_strategy(settings, layout, ByteLedger())
    assert isinstance(strategy, CMDStrategy)
    strategy.restore(arrays, meta)
    if strategy.state is None or strategy.global_flat is None:
        raise SystemExit(f"{run_dir}: the checkpoint is from before the CMD phase")
    return strategy, settings


def first_message_bytes(strategy: CMDStrategy) -> tuple[int, int]:
    """Network and state bytes of the training message to a node that holds no state."""
    assert strategy.global_flat is not None
    config = ConfigRecord({"server-round": 1})
    message = strategy._cmd_messages(config, [NEW_NODE], MessageType.TRAIN, strategy.global_flat)
    return _measure(message[0])


def dense_message_bytes(strategy: CMDStrategy) -> int:
    """Network bytes of a FedAvg training message with the same model."""
    assert strategy.global_flat is not None
    state = strategy.layout.state_dict(strategy.global_flat, strategy.global_extras)
    content = RecordDict(
        {DENSE_MODEL: ArrayRecord(state), CONFIG: ConfigRecord({"server-round": 1})}
    )
    message = Message(content=content, message_type=MessageType.TRAIN, dst_node_id=NEW_NODE)
    return _measure(message)[0]


def _measure(message: Message) -> tuple[int, int]:
    """(wire + control bytes, state bytes) of an instruction, as the ledger measures it."""
    row = ByteLedger().record_message(1, "train", "down", NEW_NODE, message)
    return row.wire_bytes + row.control_bytes, row.state_bytes


def recoded(state: EmbeddingState, references: np.ndarray, precision: str) -> None:
    """Re-embed the embedded weights in ``precision``, as `EmbeddingState.embed` does it."""
    emb = state.embedded_indices
    state.round_coefficients = precision == "float16"
    state.a_on_grid = precision == "grid"
    state.embed(emb, state.frozen_a[emb].copy(), state.frozen_b[emb].copy(), references)


def report(run_dir: Path) -> None:
    """Print the table for one run."""
    strategy, settings = restored_strategy(run_dir)
    state = strategy.state
    assert state is not None and strategy.global_flat is not None
    references = strategy.global_flat[state.references]
    dense = dense_message_bytes(strategy)
    emb = state.embedded_indices
    on_grid = snap_to_a_grid(state.frozen_a[emb]) / np.float32(A_GRID_STEP)
    print(
        f"{run_dir.name}: N = {state.n_weights:,}, M = {state.n_modes}, "
        f"{100 * state.embedded_fraction:.1f} % embedded, state version {state.version}, "
        f"cmd-coefficients {settings.coefficient_precision()!r}; "
        f"|a| <= 3.97 (on the grid): {100 * np.mean(np.abs(on_grid) <= 127):.1f} %"
    )
    print(f"  dense FedAvg message: {dense:,} B")
    # Only coarser precisions than the run's: rounded coefficients cannot be refined again.
    precisions = COEFFICIENT_PRECISIONS  # finest first
    coarser = precisions[precisions.index(settings.coefficient_precision()) + 1 :]
    for precision in ("as run", *coarser):
        if precision != "as run":
            recoded(state, references, precision)
        total, state_bytes = first_message_bytes(strategy)
        print(
            f"  first CMD message, {precision:>7}: {total:,} B = {total / dense:.2f} x dense "
            f"(state {state_bytes:,} B, {100 * state_bytes / total:.0f} %)"
        )


@contextmanager
def task_identity() -> Iterator[None]:
    """Set what a ServerApp's Grid sets before it builds messages (a 64-bit run id, the
    SuperLink's node id), so that messages built outside a run measure as a run's do."""
    names = ("_run_id", "_node_id", "_task_id")
    saved = [getattr(TaskIdentity, name) for name in names]  # None where unset
    for name, value in zip(names, (RUN_ID, SUPERLINK_NODE_ID, 1), strict=True):
        setattr(TaskIdentity, name, value)
    try:
        yield
    finally:
        for name, value in zip(names, saved, strict=True):
            setattr(TaskIdentity, name, value)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="CMD run folders")
    args = parser.parse_args(argv)
    with task_identity():
        for run_dir in args.run_dirs:
            report(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
