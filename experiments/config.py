"""The experiment config (``conf/experiment.yaml``): datasets, the per-experiment settings
and ``--quick``.

:class:`ExperimentConfig` is the file's schema; :func:`load_experiment_config` reads it with
its ``quick`` overrides when asked, then the command line's ``--set`` overrides, through the
project's one loader (:func:`contract.config.load_config`), so every problem is one
:class:`contract.config.ConfigError` naming the file and the key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field

from contract.config import StrictModel, load_config
from esmm.losses import TaskWeights
from esmm.model import Variant

__all__ = [
    "PAPER_VARIANTS",
    "BiasSweepConfig",
    "DataSpec",
    "ExperimentConfig",
    "PaperTableConfig",
    "StopGradientConfig",
    "TaskWeightsConfig",
    "load_experiment_config",
]

PAPER_VARIANTS = ("base", "aman", "oversampling", "unbias", "division", "esmm_ns", "esmm")


class DataSpec(StrictModel):
    """One dataset, split by time: the first ``train_days`` train, the next ``valid_days``
    choose each run's epoch (esmm/selection.py), the last ``eval_days`` are the test days
    that the reported metrics come from.

    By default the dataset is simulated and its feature tables built by the pipeline's own
    jobs. With ``features`` set, the days are read from an existing feature table instead
    (your own data, or tables built before), and nothing is simulated.

    Attributes:
        preset: simulator preset (``conf/simulator.yaml``).
        impressions_per_day: overrides the preset's volume (null: the preset's).
        selection_bias: the simulator's sample-selection-bias knob (0..1, docs/DATA.md).
        seed: simulator seed (the same data for every training seed).
        features: an existing feature table root (path or URL) holding the days; null =
            simulate. The simulator settings above are then ignored.
        oracle: the simulator's oracle root for the entire-space metrics; null = none (a
            simulated dataset always has one).
    """

    preset: str = "demo"
    start_date: date = date(2026, 1, 1)
    train_days: int = Field(default=3, ge=1)
    valid_days: int = Field(default=1, ge=0)
    eval_days: int = Field(default=1, ge=1)
    impressions_per_day: int | None = Field(default=None, ge=100)
    selection_bias: float = Field(default=0.5, ge=0.0, le=1.0)
    seed: int = 7
    features: str | None = None
    oracle: str | None = None

    def days(self) -> list[str]:
        return [
            (self.start_date + timedelta(days=i)).isoformat()
            for i in range(self.train_days + self.valid_days + self.eval_days)
        ]

    def key(self) -> str:
        split = (
            f"{self.start_date.isoformat()}-{self.train_days}+{self.valid_days}+{self.eval_days}d"
        )
        if self.features is not None:
            # A table given by path: its location (and oracle) name it, not simulator knobs.
            source = hashlib.sha256(f"{self.features}|{self.oracle}".encode()).hexdigest()[:12]
            return f"table-{source}-{split}"
        volume = self.impressions_per_day or "preset"
        return f"{self.preset}-n{volume}-bias{self.selection_bias:g}-seed{self.seed}-{split}"


class PaperTableConfig(StrictModel):
    variants: list[Variant] = Field(default_factory=lambda: [*PAPER_VARIANTS])


class TaskWeightsConfig(StrictModel):
    settings: list[TaskWeights] = Field(min_length=1)
    seeds: int | None = Field(default=None, ge=1, description="first N seeds; null = all")


class StopGradientConfig(StrictModel):
    settings: list[Literal["both", "cvr", "ctr"]] = Field(default_factory=lambda: ["both"])
    seeds: int | None = Field(default=None, ge=1)


class BiasSweepConfig(StrictModel):
    values: list[float] = Field(min_length=2)
    variants: list[Variant] = Field(default_factory=lambda: ["base", "esmm"])
    seeds: int | None = Field(default=None, ge=1)


class ExperimentConfig(StrictModel):
    """``conf/experiment.yaml``. ``quick`` holds overrides of this file that ``--quick``
    applies (fewer seeds, smaller data); command-line ``--set`` overrides come last."""

    workdir: str = "var/experiments"
    # Each finished training's summary (its metrics, what determined it, its dataset key):
    # the cache that lets a run resume, and the results as data. null = <workdir>/runs; a
    # folder under docs/results/ keeps them in the repository (a few KB a training).
    results_dir: str | None = None
    train_config: str = "conf/train.yaml"
    np: int = Field(default=2, ge=1)
    seeds: list[int] = Field(min_length=1)
    tracking_uri: str | None = None
    experiment: str = "esmm-experiments"
    train_overrides: list[str] = Field(default_factory=list)
    data: DataSpec = Field(default_factory=DataSpec)
    paper_table: PaperTableConfig = Field(default_factory=PaperTableConfig)
    task_weights: TaskWeightsConfig
    stop_gradient: StopGradientConfig = Field(default_factory=StopGradientConfig)
    bias_sweep: BiasSweepConfig
    quick: list[str] = Field(default_factory=list)

    def seeds_for(self, count: int | None) -> list[int]:
        return self.seeds if count is None else self.seeds[:count]


def load_experiment_config(
    path: str | Path, quick: bool, overrides: Sequence[str]
) -> ExperimentConfig:
    """The config file, with its ``quick`` overrides when asked, then ``overrides``."""
    extra: list[str] = []
    if quick:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError):
            raw = {}  # load_config below reports the problem with the file
        quick_sets = raw.get("quick") if isinstance(raw, dict) else None
        extra = [str(item) for item in quick_sets or []]
    return load_config(path, ExperimentConfig, [*extra, *overrides])
