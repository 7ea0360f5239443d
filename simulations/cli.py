"""The ``cmd-fl`` console script: ``cmd-fl compare --preset quick`` and friends."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from simulations import compare
from simulations.settings import RunSettings

EXIT_FAILED_RUNS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cmd-fl``."""
    parser = argparse.ArgumentParser(
        prog="cmd-fl",
        description=(
            "Communication-efficient federated learning with CMD on Flower. The main job is "
            "`bash scripts/run_simulation.sh` (one `flwr run`); this command drives comparisons."
        ),
        epilog="example:\n  cmd-fl compare --preset quick --out /tmp/quick",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    presets = "; ".join(f"{p.name}: {p.description}" for p in compare.PRESETS.values())
    run = commands.add_parser(
        "compare",
        help="run FedAvg, APF and CMD through Flower's simulation engine and write a report",
        description=(
            "Run every method of a preset through scripts/run_simulation.sh (a real `flwr run`) "
            "with identical config and seeds, then write report.md, results.json and plots to "
            "--out. Runs already done there are not rerun, so an interrupted comparison "
            f"resumes. Presets: {presets}."
        ),
        epilog=(
            "outputs (in --out): report.md (accuracy, MB up and down, savings vs FedAvg per "
            "setting), results.json, PNG plots, and runs/<run>/summary.json + ledger.csv\n"
            "example:\n  cmd-fl compare --preset paper --methods fedavg cmd --seeds 0 1 2 "
            "--out /tmp/paper"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--preset", choices=list(compare.PRESETS), default="quick")
    run.add_argument("--seeds", type=int, nargs="+", help="default: the preset's")
    run.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help=f"default: the preset's; known: {', '.join(compare.METHODS)}",
    )
    run.add_argument(
        "--settings",
        nargs="+",
        metavar="SETTING",
        help=f"default: the preset's; known: {', '.join(compare.SETTINGS)}",
    )
    run.add_argument("--rounds", type=int, help="num-server-rounds (default: the preset's)")
    run.add_argument(
        "--out", type=Path, help="report folder (default: reports/<preset> in the current folder)"
    )
    run.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at a time (default 1; more skews the wall-time comparison)",
    )
    run.add_argument("--force", action="store_true", help="rerun runs that are already done")
    run.add_argument(
        "--run-timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="stop a run that takes longer (default 0: no limit)",
    )
    run.add_argument(
        "--report-only",
        action="store_true",
        help="start no run: write the report from the runs already done (e.g. seeds that differ "
        "per method)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="print the planned runs (config keys that differ from the defaults) only",
    )
    return parser


def _interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_compare(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``cmd-fl compare``: returns the exit status."""
    out = args.out if args.out is not None else Path("reports") / args.preset
    try:
        plan = compare.make_plan(
            args.preset, out, args.seeds, args.methods, args.settings, args.rounds
        )
    except ValueError as err:
        print(f"cmd-fl compare: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    for name, why in plan.skipped_methods.items():
        print(f"{compare.PREFIX} method {name!r} left out: {why}")
    print(
        f"{compare.PREFIX} preset {plan.preset.name}: {len(plan.runs)} runs "
        f"({', '.join(plan.settings)} x {', '.join(plan.methods)} x seeds "
        f"{' '.join(map(str, plan.seeds))}) into {plan.out}",
        flush=True,
    )
    if args.dry_run:
        defaults = RunSettings().to_run_config()
        for spec in plan.runs:
            changed = {k: v for k, v in spec.config.items() if defaults.get(k) != v}
            config = " ".join(f"{k}={v!r}" for k, v in sorted(changed.items()))
            print(f"{spec.run_name}: {config}")
        return 0
    # Ctrl-C and SIGTERM stop the running runs in order and still write the report; a shell
    # starts background jobs with SIGINT ignored, so install Python's handler explicitly.
    try:
        compare.check_data(plan)
    except (FileNotFoundError, ImportError) as err:
        print(f"cmd-fl compare: error: the data is not there: {err}", file=sys.stderr)
        return EXIT_USAGE
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)
    outcome, results = compare.compare(
        plan,
        jobs=args.jobs,
        force=args.force,
        run_timeout_s=args.run_timeout,
        command=["cmd-fl", *argv],
        report_only=args.report_only,
    )
    print(f"{compare.PREFIX} targets:")
    for target in results["targets"]:
        print(f"  {target['verdict']}: {target['line']}")
    print(f"{compare.PREFIX} report: {plan.out / 'report.md'}")
    if results["failed"]:
        print(f"{compare.PREFIX} failed or not run: {', '.join(results['failed'])}")
    if outcome.interrupted:
        return EXIT_INTERRUPTED
    if args.report_only:
        return 0
    return EXIT_FAILED_RUNS if results["failed"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cmd-fl`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        return run_compare(args, argv)
    return EXIT_USAGE  # pragma: no cover - argparse requires a command


if __name__ == "__main__":
    sys.exit(main())
