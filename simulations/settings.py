"""The run configuration of the Flower apps: one typed, validated place for every key."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from cmd_fl.codec import CODECS, CodecSpec
from cmd_fl.embedding import SELECTION_RULES, EmbeddingSchedule
from cmd_fl.torch_projection import REFERENCE_GRADIENTS
from strategies.cmd_strategy import COEFFICIENT_PRECISIONS, CMDOptions
from strategies.sampling import SAMPLE_BY

STRATEGIES = ("fedavg", "cmd", "apf")
PARTITIONINGS = ("iid", "dirichlet")
PROJECTIONS = ("step", "round")


@dataclass(frozen=True)
class RunSettings:
    """Every run-config key of ``[tool.flwr.app.config]``, in snake case.

    The defaults are the README's main job: a CMD simulation on Fashion-MNIST (20,000 training
    images over 10 IID clients, a 65,558-weight CNN) that finishes in a few minutes on 2 CPU
    cores. CMD's schedule (F = 5, L = 1, P = 10 %, M = 10, at most 80 % embedded) is the one the
    study in ``shared/docs/cmd-method.md`` measured to keep FedAvg's accuracy over 40 rounds.
    """

    strategy: str = "cmd"
    num_server_rounds: int = 20
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    min_available_nodes: int = 2
    sample_by: str = "data"  # "data": the same seed draws the same partitions in every run
    fraction_evaluate: float = 0.0  # server-side evaluation: no model travels for it
    local_epochs: int = 1
    learning_rate: float = 0.05
    momentum: float = 0.0
    batch_size: int = 32
    seed: int = 0
    dataset: str = "fashion-mnist"
    data_root: str = ""  # "" = $CMD_FL_DATA or ~/.cache/cmd-fl/data
    train_subset: int = 20000  # training images shared by all partitions; 0 = the whole set
    partitioning: str = "iid"
    dirichlet_alpha: float = 0.5
    num_partitions: int = 10
    cmd_modes: int = 10
    cmd_samples: int = 1000
    cmd_warmup: int = 5
    cmd_embed_every: int = 1
    cmd_embed_percent: float = 10.0
    cmd_embed_relative: bool = False
    cmd_max_embedded: float = 0.8
    cmd_projection: str = "step"
    cmd_reference_gradient: str = "mode"  # "own": the paper's (a reference's own gradient)
    apf_alpha: float = 0.99  # APF's EMA factor, as the authors' code (freezes little in 40 rounds)
    apf_threshold: float = 0.05  # APF's initial stability threshold T0
    apf_random_freeze: bool = False  # "APF + random freezing" (the aggressive variant)
    cmd_selection: str = "stability+fit"
    cmd_max_abs_a: float = 10.0  # 0 = no bound
    cmd_reference_std_ratio: float = 0.25
    cmd_guard_margin: float = 0.02
    cmd_guard_pause: int = 5
    cmd_refresh_every: int = 20  # 0 = no refresh
    cmd_refresh_tolerance: float = 0.25
    cmd_refresh_refit: bool = True  # probes also re-fit b of the weights that stay embedded
    cmd_refresh_refill: bool = False  # events may embed others in released weights' place
    cmd_coefficients: str = "auto"  # a, b precision: auto | float32 | float16 | grid
    codec: str = "int8"  # update codec: "none" | "fp16" | "int8" | "topk" (measured: int8)
    codec_downlink: bool = True  # the codec also codes training messages (deltas vs clients' model)
    codec_keyframes: bool = True  # a node without the base gets the model coded, not float32
    codec_block_size: int = 256  # int8: values per scale; 0 = one scale per vector
    codec_topk_fraction: float = 0.1  # topk: share of the update's entries sent
    codec_error_feedback: bool = True  # what a lossy codec did not send joins the next update
    validation_size: int = 1000  # server-side validation split, at most 10 % of the data; 0 = none
    min_valid_replies: int = 1
    round_timeout: float = 600.0  # seconds a round waits for replies; late ones are dropped
    max_num_examples: int = 0  # 0 = no bound
    checkpoint_every: int = 1  # rounds between checkpoints; 0 = none
    resume: bool = False  # continue <results-dir>/<run-name>/ from its checkpoint
    results_dir: str = ""  # absolute; "" = $CMD_FL_RESULTS or ~/cmd-fl-results
    run_name: str = ""  # "" = <strategy>-<dataset>-<partitioning>-s<seed>-<time>

    def __post_init__(self) -> None:
        checks = [
            (self.strategy in STRATEGIES, f"strategy must be one of {STRATEGIES}"),
            (self.partitioning in PARTITIONINGS, f"partitioning must be one of {PARTITIONINGS}"),
            (self.cmd_projection in PROJECTIONS, f"cmd-projection must be one of {PROJECTIONS}"),
            (
                self.cmd_reference_gradient in REFERENCE_GRADIENTS,
                f"cmd-reference-gradient must be one of {REFERENCE_GRADIENTS}",
            ),
            (self.sample_by in SAMPLE_BY, f"sample-by must be one of {SAMPLE_BY}"),
            (self.num_server_rounds >= 1, "num-server-rounds must be >= 1"),
            (0.0 < self.fraction_train <= 1.0, "fraction-train must be in (0, 1]"),
            (0.0 <= self.fraction_evaluate <= 1.0, "fraction-evaluate must be in [0, 1]"),
            (self.local_epochs >= 1, "local-epochs must be >= 1"),
            (self.batch_size >= 1, "batch-size must be >= 1"),
            (self.learning_rate > 0, "learning-rate must be > 0"),
            (self.num_partitions >= 1, "num-partitions must be >= 1"),
            (self.dirichlet_alpha > 0, "dirichlet-alpha must be > 0"),
            (1 <= self.cmd_modes <= 255, "cmd-modes must be in [1, 255]"),
            (self.train_subset >= 0, "train-subset must be >= 0"),
            (0.0 <= self.apf_alpha < 1.0, "apf-alpha must be in [0, 1)"),
            (self.apf_threshold > 0, "apf-threshold must be > 0"),
            (self.validation_size >= 0, "validation-size must be >= 0"),
            (self.codec in CODECS, f"codec must be one of {CODECS}"),
            (
                self.cmd_coefficients in ("auto", *COEFFICIENT_PRECISIONS),
                f"cmd-coefficients must be 'auto' or one of {COEFFICIENT_PRECISIONS}",
            ),
            (self.codec_block_size >= 0, "codec-block-size must be >= 0"),
            (0.0 < self.codec_topk_fraction <= 1.0, "codec-topk-fraction must be in (0, 1]"),
            (
                self.cmd_selection in SELECTION_RULES,
                f"cmd-selection must be one of {SELECTION_RULES}",
            ),
            (
                not self.results_dir or os.path.isabs(self.results_dir),
                "results-dir must be absolute",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"bad run config: {message}")
        self.schedule()  # validates the CMD schedule keys

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> RunSettings:
        """Settings from Flower's ``context.run_config`` (kebab-case keys); unknown keys fail."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ValueError(f"unknown run-config keys: {unknown}; known: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            field = known[key]
            kind = type(getattr(cls, field.name))
            try:
                if kind is bool and isinstance(value, str):
                    values[field.name] = value.lower() in ("1", "true", "yes")
                else:
                    values[field.name] = kind(value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"run-config key {key!r}: cannot read {value!r}: {err}") from err
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        """The kebab-case run config these settings come from."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def schedule(self) -> EmbeddingSchedule:
        """The CMD embedding schedule."""
        return EmbeddingSchedule(
            warmup=self.cmd_warmup,
            every=self.cmd_embed_every,
            percent=self.cmd_embed_percent,
            relative=self.cmd_embed_relative,
            max_fraction=self.cmd_max_embedded,
        )

    def codec_spec(self) -> CodecSpec:
        """The codec of the run (``codec`` and its ``codec-*`` keys)."""
        return CodecSpec(
            name=self.codec,
            block_size=self.codec_block_size,
            topk_fraction=self.codec_topk_fraction,
            error_feedback=self.codec_error_feedback,
        )

    def coefficient_precision(self) -> str:
        """`CMDOptions.coefficients`: ``cmd-coefficients``, where "auto" means "grid" when
        clients are sampled (``fraction-train < 1``: nearly every client then receives the whole
        state once, and only the grid keeps that message under one dense model without a
        codec), else float16 under a lossy codec (it needs no float32 a, b) and float32
        otherwise."""
        if self.cmd_coefficients != "auto":
            return self.cmd_coefficients
        if self.fraction_train < 1.0:
            return "grid"
        return "float32" if self.codec == "none" else "float16"

    def cmd_options(self) -> CMDOptions:
        """The CMD strategy's safety options."""
        return CMDOptions(
            selection_rule=self.cmd_selection,
            max_abs_a=self.cmd_max_abs_a or None,
            reference_std_ratio=self.cmd_reference_std_ratio,
            guard_margin=self.cmd_guard_margin,
            guard_pause=self.cmd_guard_pause,
            refresh_every=self.cmd_refresh_every,
            refresh_tolerance=self.cmd_refresh_tolerance,
            refresh_refit=self.cmd_refresh_refit,
            refresh_refill=self.cmd_refresh_refill,
            coefficients=self.coefficient_precision(),
        )

    def results_root(self) -> Path:
        """Absolute folder under which each run writes its own folder."""
        if self.results_dir:
            return Path(self.results_dir)
        default = os.environ.get("CMD_FL_RESULTS", str(Path.home() / "cmd-fl-results"))
        return Path(default).expanduser().absolute()
