"""The run config: pyproject's declared keys, RunSettings, and their validation."""

from __future__ import annotations

import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from simulations.settings import RunSettings

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_declares_every_key_with_the_settings_default() -> None:
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    defaults = RunSettings().to_run_config()

    assert sorted(declared) == sorted(defaults)
    for key, value in declared.items():
        assert value == defaults[key], key
    assert RunSettings.from_run_config(declared) == RunSettings()


def test_run_config_is_read_and_checked() -> None:
    settings = RunSettings.from_run_config({"strategy": "fedavg", "num-server-rounds": "7"})
    assert settings.strategy == "fedavg" and settings.num_server_rounds == 7
    assert {f.name.replace("_", "-") for f in fields(RunSettings)} == set(settings.to_run_config())
    with pytest.raises(ValueError, match="unknown run-config keys"):
        RunSettings.from_run_config({"num-rounds": 3})
    with pytest.raises(ValueError, match="strategy must be one of"):
        RunSettings.from_run_config({"strategy": "fedprox"})
    with pytest.raises(ValueError, match="results-dir must be absolute"):
        RunSettings(results_dir="relative/path")
    with pytest.raises(ValueError, match="cannot read"):
        RunSettings.from_run_config({"num-server-rounds": "many"})


@pytest.mark.parametrize(
    ("config", "precision"),
    [
        ({"codec": "none"}, "float32"),
        ({"codec": "int8"}, "float16"),
        ({"codec": "none", "fraction-train": 0.1}, "grid"),
        ({"codec": "int8", "fraction-train": 0.5}, "grid"),
        ({"codec": "none", "fraction-train": 0.1, "cmd-coefficients": "float32"}, "float32"),
        ({"codec": "int8", "cmd-coefficients": "grid"}, "grid"),
    ],
)
def test_auto_coefficients_follow_codec_and_sampling(
    config: dict[str, object], precision: str
) -> None:
    # Sampled clients mostly get the whole state once: "auto" sends it compactly then.
    settings = RunSettings.from_run_config(config)
    assert settings.coefficient_precision() == precision
    assert settings.cmd_options().coefficients == precision
