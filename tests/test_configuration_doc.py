"""docs/configuration.md lists every run-config key with its true default."""

from __future__ import annotations

import re
from pathlib import Path

from simulations.settings import RunSettings

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
ROW = re.compile(r"^\| `([a-z0-9-]+)` \| `([^`]*)` \|", re.MULTILINE)


def _toml_literal(value: object) -> str:
    """A default as pyproject.toml writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def test_configuration_doc_lists_every_key_with_its_default() -> None:
    # Prepare
    rows = dict(ROW.findall(DOC.read_text()))
    expected = {key: _toml_literal(value) for key, value in RunSettings().to_run_config().items()}
    # Assert: no key missing or stale, every default the one RunSettings uses
    assert sorted(rows) == sorted(expected)
    assert {k: v for k, v in rows.items() if v != expected[k]} == {}
