"""Compare a deployed run's byte ledger with the SuperLink's own traffic counter.

    .venv/bin/python scripts/flower_traffic.py --connection NAME --run-id N --results DIR

``DIR`` is the run's results folder (``<results-dir>/<run-name>``, with ``ledger.csv``). The script
asks the SuperLink (``flwr ls NAME --run-id N --format json``, with the connection from
``$FLWR_HOME/config.toml``) for the run's network traffic, writes ``DIR/flower_traffic.json``
with Flower's numbers next to the ledger's, prints both, and exits with status 1 when the
totals, or either direction, differ by more than ``--tolerance`` (default 2 %).

Both sides count by where bytes travel: Flower books each Fleet API request as inbound and each
response as outbound, and the ledger's "up" is the reply objects plus every request, "down" the
instruction objects plus every response. See docs/deployment.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cmd_fl.ledger import ByteLedger

TRAFFIC_FILE = "flower_traffic.json"
DEFAULT_TOLERANCE = 0.02


def flower_run_info(connection: str, run_id: int, flwr: str | None = None) -> dict[str, Any]:
    """The ``flwr ls --run-id N --format json`` entry of one run."""
    command = [flwr or _flwr_executable(), "ls", connection, "--run-id", str(run_id)]
    done = subprocess.run(
        [*command, "--format", "json"], capture_output=True, text=True, timeout=120, check=False
    )
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError as err:
        raise RuntimeError(
            f"{' '.join(command)} gave no JSON (exit {done.returncode}): "
            f"{done.stdout[-2000:]}{done.stderr[-2000:]}"
        ) from err
    runs = answer.get("runs") or []
    if not answer.get("success") or len(runs) != 1:
        raise RuntimeError(f"{' '.join(command)} failed: {answer}")
    return dict(runs[0])


def compare(
    run_info: dict[str, Any], ledger: ByteLedger, tolerance: float = DEFAULT_TOLERANCE
) -> dict[str, Any]:
    """Flower's counter and the ledger's totals side by side (the ``flower_traffic.json`` content).

    Parameters
    ----------
    run_info : dict
        One run's entry of ``flwr ls --format json``.
    ledger : ByteLedger
        The run's ledger.
    tolerance : float
        Largest accepted relative difference of the totals. Default 0.02.

    Returns
    -------
    dict
        ``flower`` (inbound/outbound/total bytes), ``ledger`` (network bytes up and down, their
        wire and control parts, total), ``relative_difference`` (ledger total / Flower total
        - 1), the same per direction, and ``agree`` (every difference within `tolerance`).
    """
    traffic = run_info["network-traffic"]
    flower = {
        "inbound_bytes": int(traffic["inbound-bytes"]),
        "outbound_bytes": int(traffic["outbound-bytes"]),
        "total_bytes": int(traffic["total-bytes"]),
    }
    totals = ledger.totals()
    mine = {"inbound_bytes": totals["bytes_up"], "outbound_bytes": totals["bytes_down"]}
    mine["total_bytes"] = mine["inbound_bytes"] + mine["outbound_bytes"]
    differences = {key: _relative(mine[key], flower[key]) for key in flower}
    return {
        "run_id": str(run_info["run-id"]),
        "status": run_info.get("status"),
        "flower": flower,
        "ledger": {
            "up_bytes": totals["bytes_up"],
            "down_bytes": totals["bytes_down"],
            "wire_up": totals["wire_up"],
            "wire_down": totals["wire_down"],
            "control_up": totals["control_up"],
            "control_down": totals["control_down"],
            "messages_up": totals["messages_up"],
            "messages_down": totals["messages_down"],
            "total_bytes": mine["total_bytes"],
        },
        "relative_difference": differences["total_bytes"],
        "relative_difference_inbound": differences["inbound_bytes"],
        "relative_difference_outbound": differences["outbound_bytes"],
        "tolerance": tolerance,
        "agree": all(abs(d) <= tolerance for d in differences.values()),
        "note": (
            "up = Flower's inbound (reply objects and every Fleet API request), down = outbound "
            "(instruction objects and every response)"
        ),
    }


def _relative(mine: int, flower: int) -> float:
    """``mine / flower - 1`` (1.0 when Flower counted nothing)."""
    return mine / flower - 1.0 if flower else 1.0


def _flwr_executable() -> str:
    beside = Path(sys.executable).parent / "flwr"  # the venv's own flwr
    return str(beside) if beside.exists() else "flwr"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connection", required=True, help="SuperLink connection name")
    parser.add_argument("--run-id", type=int, required=True, help="the run's id")
    parser.add_argument("--results", type=Path, required=True, help="folder with ledger.csv")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE)
    args = parser.parse_args(argv)

    ledger = ByteLedger.from_csv(args.results / "ledger.csv")
    report = compare(flower_run_info(args.connection, args.run_id), ledger, args.tolerance)
    target = args.results / TRAFFIC_FILE
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, target)

    flower, mine = report["flower"], report["ledger"]
    print(f"run {report['run_id']} ({report['status']}), written to {target}")
    print(
        f"  Flower (flwr ls): inbound {flower['inbound_bytes']:,} B, "
        f"outbound {flower['outbound_bytes']:,} B, total {flower['total_bytes']:,} B"
    )
    print(
        f"  ledger: up {mine['up_bytes']:,} B ({mine['wire_up']:,} wire + "
        f"{mine['control_up']:,} control), down {mine['down_bytes']:,} B "
        f"({mine['wire_down']:,} wire + {mine['control_down']:,} control), "
        f"total {mine['total_bytes']:,} B"
    )
    print(
        f"  difference {100 * report['relative_difference']:+.3f} % in total, "
        f"{100 * report['relative_difference_inbound']:+.3f} % up, "
        f"{100 * report['relative_difference_outbound']:+.3f} % down "
        f"(tolerance {100 * args.tolerance:.1f} %): {'agree' if report['agree'] else 'DISAGREE'}"
    )
    return 0 if report["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
