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
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from contract.config import StrictModel, load_config
from esmm.losses import TaskWeights
from esmm.model import Variant

__all__ = [
    "PAPER_VARIANTS",
    "BiasSweepConfig",
    "CeilingConfig",
    "DataSpec",
    "ExperimentConfig",
    "MapConfig",
    "MemorisationConfig",
    "MemorisationSetting",
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
    # a row of torch-rechub's ESMM (experiments/reference.py) on the same data and protocol
    torch_rechub: bool = False
    # diagnostics of where the two differ: torch-rechub's ESMM with the project's learning
    # rates in its dense Adam, and with the project's optimizers (SparseAdam + Adam)
    torch_rechub_project_lr: bool = False
    torch_rechub_project_optim: bool = False
    # --set of esmm.train for the project's trainings of the table (a setting chosen by
    # `spread` or `memorisation`): a run's own overrides, so theirs with the same sets are
    # reused; torch-rechub's rows are its own trainer's and do not take them
    overrides: list[str] = Field(default_factory=list)


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


class MapConfig(StrictModel):
    """The map of when ESMM helps: every ``variant − reference`` gap over a grid of
    selection-bias values × sparsity levels (names in ``datasets``)."""

    biases: list[float] = Field(min_length=1)
    levels: list[str] = Field(min_length=1, description="dataset names, densest first")
    variants: list[Variant] = Field(default_factory=lambda: ["base", "esmm", "escm2_dr"])
    reference: Variant = "base"
    seeds: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _reference_is_trained(self) -> MapConfig:
        if self.reference not in self.variants:
            raise ValueError(f"reference '{self.reference}' is not one of variants")
        if len(self.variants) < 2:
            raise ValueError("needs the reference and at least one other variant")
        return self


class MemorisationSetting(StrictModel):
    """One remedy: a label and the trainer overrides (``--set``) that turn it on."""

    label: str
    sets: list[str] = Field(default_factory=list)


class MemorisationConfig(StrictModel):
    """Remedies of id memorisation compared on the validation day only (the kept epoch's
    ``kept_valid_*`` metrics); the first setting is the reference (the current defaults)."""

    settings: list[MemorisationSetting] = Field(min_length=2)
    variants: list[Variant] = Field(default_factory=lambda: ["base", "esmm"])
    datasets: list[str] = Field(
        default_factory=list, description="dataset names; empty = the experiment's data"
    )
    seeds: int | None = Field(default=None, ge=1)


class SpreadConfig(MemorisationConfig):
    """Settings that might make a training steadier from seed to seed, compared on the
    validation day only (the spread over seeds of the kept epoch's ``kept_valid_*`` metrics,
    the entire-space CVR AUC's first); the first setting is the reference (the defaults)."""

    variants: list[Variant] = Field(default_factory=lambda: ["base", "esmm", "escm2_dr"])


class CeilingConfig(StrictModel):
    """The learnable ceiling: the same training on ``factor`` × the impressions a day (the
    same preset, population and days), against the oracle's AUCs."""

    dataset: str | None = Field(default=None, description="a name in datasets; null = data")
    factor: int = Field(default=10, ge=2)
    variants: list[Variant] = Field(default_factory=lambda: ["esmm"])
    seeds: int | None = Field(default=None, ge=1)


class ReferenceAblationConfig(StrictModel):
    """torch-rechub's ESMM with one of its defaults at a time replaced by the project's
    (experiments/reference.py ``CHANGES``), beside its defaults and the project's ESMM."""

    dataset: str | None = Field(default=None, description="a name in datasets; null = data")
    changes: list[Literal["no-batchnorm", "init-0.01", "sum-pooling", "no-embedding-decay"]] = (
        Field(min_length=1)
    )
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
    # Named datasets: each a partial DataSpec laid over ``data`` (e.g. {preset: sparse}).
    datasets: dict[str, dict[str, Any]] = Field(default_factory=dict)
    map: MapConfig | None = None
    memorisation: MemorisationConfig | None = None
    spread: SpreadConfig | None = None
    ceiling: CeilingConfig | None = None
    reference_ablation: ReferenceAblationConfig | None = None
    quick: list[str] = Field(default_factory=list)

    def seeds_for(self, count: int | None) -> list[int]:
        return self.seeds if count is None else self.seeds[:count]

    def dataset(self, name: str) -> DataSpec:
        """The dataset ``name``: ``data`` with that entry's keys replaced.

        Example:
            >>> cfg = ExperimentConfig(seeds=[1], task_weights={"settings": [{}]},
            ...     bias_sweep={"values": [0, 1]}, datasets={"sparse": {"preset": "sparse"}})
            >>> cfg.dataset("sparse").preset, cfg.dataset("sparse").train_days
            ('sparse', 3)
        """
        if name not in self.datasets:
            known = ", ".join(sorted(self.datasets)) or "none"
            raise KeyError(f"no dataset '{name}' in datasets (known: {known})")
        return DataSpec.model_validate({**self.data.model_dump(), **self.datasets[name]})

    @field_validator("datasets")
    @classmethod
    def _datasets_are_data_specs(
        cls, datasets: dict[str, dict[str, Any]], info: ValidationInfo
    ) -> dict[str, dict[str, Any]]:
        data = info.data.get("data") or DataSpec()
        for name, fields in datasets.items():
            try:
                DataSpec.model_validate({**data.model_dump(), **fields})
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
                )
                raise ValueError(f"{name}: {problems}") from None
        return datasets

    @model_validator(mode="after")
    def _named_datasets_exist(self) -> ExperimentConfig:
        named = [*(self.map.levels if self.map else [])]
        named += self.memorisation.datasets if self.memorisation else []
        named += self.spread.datasets if self.spread else []
        named += [self.ceiling.dataset] if self.ceiling and self.ceiling.dataset else []
        ablation = self.reference_ablation
        named += [ablation.dataset] if ablation and ablation.dataset else []
        unknown = sorted({name for name in named if name not in self.datasets})
        if unknown:
            raise ValueError(
                f"unknown dataset(s) {', '.join(unknown)}; known: "
                + (", ".join(sorted(self.datasets)) or "none")
            )
        return self


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
