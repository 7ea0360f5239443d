"""`cmd-fl --help` and each subcommand's help say what it does, what it writes, and an example."""

from __future__ import annotations

import argparse

from simulations.cli import build_parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices)


def test_top_level_help_names_the_main_job_and_an_example() -> None:
    text = build_parser().format_help()
    assert "scripts/run_simulation.sh" in text
    assert "example:\n  cmd-fl " in text


def test_every_subcommand_help_has_outputs_and_a_runnable_example() -> None:
    parser = build_parser()
    subcommands = _subcommands(parser)
    assert subcommands
    for name, sub in subcommands.items():
        text = sub.format_help()
        assert "outputs" in text, name
        example = text.split("example:\n", 1)[1].strip().splitlines()[0]
        assert example.startswith(f"cmd-fl {name} "), name
        parser.parse_args(example.split()[1:])  # the example's arguments parse
