"""One tuning run through the real ServerApp and ClientApp on the in-process grid (no Ray).

Much faster than ``cmd-fl compare`` for exploring CMD's options: the same strategy, client,
wire format and ledger, minus Ray and the SuperLink. Prints the run's progress, then one JSON
line with the final accuracy, bytes and events; the run's folder holds ``summary.json``.

    python -m benchmarks.tune_inprocess cap70 '{"cmd_max_embedded": 0.7}'
    python -m benchmarks.tune_inprocess fedavg80 '{"strategy": "fedavg", "num_server_rounds": 80}'
    python -m benchmarks.tune_inprocess freeze --freeze-embedded   # the control experiment

Overrides are `RunSettings` fields (snake case); defaults: 40 rounds, no checkpoints, results
under ``/tmp/cmd-fl-tune``.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np

from simulations.client_app import app as client_app
from simulations.server_app import run
from simulations.settings import RunSettings
from strategies.cmd_strategy import CMDStrategy
from tests.inprocess_grid import InProcessGrid


def freeze_embedded_weights() -> None:
    """Control experiment: weights an event embeds are frozen at their current value
    (``a = 0``, ``b = w``) instead of following their reference; everything else unchanged."""
    event = CMDStrategy._embedding_event

    def frozen_event(self: CMDStrategy, server_round: int) -> None:
        assert self.state is not None and self.global_flat is not None
        before = self.state.embedded.copy()
        values = self.global_flat.copy()
        event(self, server_round)
        new = np.flatnonzero(self.state.embedded & ~before)
        if new.size:
            self.state.embed(new, np.zeros(new.size, np.float32), values[new])
            self.state.project(self.global_flat)

    CMDStrategy._embedding_event = frozen_event  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one tuning run and print (and return) its outcome."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="run name (its folder under --results-dir)")
    parser.add_argument("overrides", nargs="?", default="{}", help="JSON of RunSettings fields")
    parser.add_argument("--results-dir", default="/tmp/cmd-fl-tune")
    parser.add_argument(
        "--freeze-embedded", action="store_true", help=freeze_embedded_weights.__doc__
    )
    args = parser.parse_args(argv)
    if args.freeze_embedded:
        freeze_embedded_weights()
    base = {
        "num_server_rounds": 40,
        "checkpoint_every": 0,
        "results_dir": args.results_dir,
        "run_name": args.name,
    }
    settings = RunSettings(**{**base, **json.loads(args.overrides)})
    grid = InProcessGrid(client_app, settings.num_partitions, settings.to_run_config())
    started = time.time()
    summary = run(grid, settings).summary
    outcome = {
        "name": args.name,
        "final_accuracy": summary["final_accuracy"],
        "total_mb": (summary["total_bytes_up"] + summary["total_bytes_down"]) / 1e6,
        "wall_s": round(time.time() - started, 1),
        "guard_undone": sum(e["undone"] for e in summary["guard_events"]),
        "refresh_events": summary["refresh_events"],
    }
    print(json.dumps(outcome), flush=True)
    return outcome


if __name__ == "__main__":
    main()
