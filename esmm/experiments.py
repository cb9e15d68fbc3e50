"""The paper's comparison and its open questions, on simulated data with ground truth.

    python -m esmm.experiments paper-table --config conf/experiment.yaml [--quick]
    python -m esmm.experiments all --config conf/experiment.yaml

Sub-commands (each writes a table as markdown + CSV, a plot where one helps, and logs them as
artifacts of one MLflow parent run whose children are the trainings):

  paper-table    every variant x every seed on one time-split dataset: the paper's Table 2
                 (CVR AUC on clicked impressions, CTCVR AUC, mean ± std, gain over BASE) plus
                 what the paper could not measure: CVR AUC on the entire impression space
                 against counterfactual labels, the oracle's AUCs (the ceiling) and pCVR's
                 Inherent Estimation Bias (mean pCVR / mean true pCVR, ESCM²), overall and by
                 pCTR decile;
  task-weights   ESMM with other (CTR, CVR, CTCVR) loss weights (open question 1);
  stop-gradient  ESMM with the CTCVR gradient into both towers, the CVR tower or the CTR tower
                 (open question 2);
  ranking        how the methods rank by the paper's clicked-only CVR AUC vs the entire-space
                 CVR AUC (open question 3), from the paper-table runs;
  bias-sweep     BASE and ESMM on datasets simulated with increasing selection bias: how the
                 ESMM - BASE gap moves with the bias (plot);
  all            the five above, under one MLflow parent run, plus report.md.

Every training is the production trainer, launched as ``horovodrun -np N python -m
esmm.train`` on the feature job's Parquet output; the data are made by ``spark-submit
jobs/generate_logs.py`` and ``jobs/build_features.py``. Datasets and finished trainings are
cached under the work dir by a key of everything that determines them, so an interrupted
run resumes where it stopped and sub-commands share the trainings they have in common
(``--fresh`` ignores the cache).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field

from contract import commands
from contract.config import ConfigError, StrictModel, add_override_argument, load_config
from esmm.losses import TaskWeights
from esmm.model import Variant

EXIT_USAGE = 2
PAPER_VARIANTS = ("base", "aman", "oversampling", "unbias", "division", "esmm_ns", "esmm")


# ---- configuration ---------------------------------------------------------------------------


class DataSpec(StrictModel):
    """One simulated dataset, split by time: the first ``train_days`` train, the rest evaluate.

    Attributes:
        preset: simulator preset (``conf/simulator.yaml``).
        impressions_per_day: overrides the preset's volume (null: the preset's).
        selection_bias: the simulator's sample-selection-bias knob (0..1, docs/DATA.md).
        seed: simulator seed (the same data for every training seed).
    """

    preset: str = "demo"
    start_date: date = date(2026, 1, 1)
    train_days: int = Field(default=3, ge=1)
    eval_days: int = Field(default=1, ge=1)
    impressions_per_day: int | None = Field(default=None, ge=100)
    selection_bias: float = Field(default=0.5, ge=0.0, le=1.0)
    seed: int = 7

    def days(self) -> list[str]:
        return [
            (self.start_date + timedelta(days=i)).isoformat()
            for i in range(self.train_days + self.eval_days)
        ]

    def key(self) -> str:
        volume = self.impressions_per_day or "preset"
        return (
            f"{self.preset}-n{volume}-bias{self.selection_bias:g}-seed{self.seed}"
            f"-{self.start_date.isoformat()}-{self.train_days}+{self.eval_days}d"
        )


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
        extra = [str(item) for item in raw.get("quick") or []]
    return load_config(path, ExperimentConfig, [*extra, *overrides])


# ---- runs: what to train, and training it ------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """One training: variant and seed on a dataset, with extra trainer overrides."""

    label: str
    variant: str
    seed: int
    data: DataSpec
    overrides: tuple[str, ...] = ()

    def key(self) -> str:
        payload = json.dumps(
            [self.variant, self.seed, self.data.key(), sorted(self.overrides)], sort_keys=True
        )
        digest = hashlib.sha1(payload.encode()).hexdigest()[:10]
        return f"{self.variant}-s{self.seed}-{digest}"


@dataclass
class RunResult:
    spec: RunSpec
    run_id: str
    metrics: dict[str, float]
    seconds: float
    cached: bool = False


@dataclass
class Context:
    """Where things go and how commands run, for one invocation."""

    cfg: ExperimentConfig
    workdir: Path
    tracking_uri: str
    experiment_id: str
    fresh: bool = False
    launched: int = 0
    reused: int = 0
    datasets: dict[str, DatasetPaths] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return commands.pipeline_env(self.tracking_uri)


@dataclass(frozen=True)
class DatasetPaths:
    raw: Path
    features: Path
    train_dates: str
    eval_dates: str


def prepare_dataset(ctx: Context, spec: DataSpec) -> DatasetPaths:
    """Simulate and build the feature tables of ``spec`` once (cached by its key)."""
    key = spec.key()
    if key in ctx.datasets:
        return ctx.datasets[key]
    root = ctx.workdir / "data" / key
    days = spec.days()
    paths = DatasetPaths(
        raw=root / "raw",
        features=root / "features",
        train_dates=f"{days[0]}..{days[spec.train_days - 1]}",
        eval_dates=(
            days[spec.train_days] if spec.eval_days == 1 else f"{days[spec.train_days]}..{days[-1]}"
        ),
    )
    ready = root / "READY"
    if ctx.fresh or not ready.is_file():
        shutil.rmtree(root, ignore_errors=True)
        sets = [f"presets.{spec.preset}.funnel.selection_bias={spec.selection_bias}"]
        if spec.impressions_per_day:
            sets.append(f"presets.{spec.preset}.impressions_per_day={spec.impressions_per_day}")
        # One day more of raw logs than of features: the last day's late events land in D+1.
        simulate = commands.spark_job(
            commands.BIN,
            "generate_logs",
            commands.generate_logs_args(
                paths.raw, days[0], len(days) + 1, spec.preset, spec.seed, sets
            ),
        )
        build = commands.spark_job(
            commands.BIN,
            "build_features",
            commands.build_features_args(paths.raw, paths.features, days[0], days[-1]),
        )
        logs = ctx.workdir / "logs"
        print(f"dataset {key}: simulating {len(days) + 1} days", file=sys.stderr, flush=True)
        commands.run_step(f"simulate {key}", simulate, ctx.env, log=logs / f"{key}-simulate.log")
        print(f"dataset {key}: building {len(days)} feature days", file=sys.stderr, flush=True)
        commands.run_step(f"features {key}", build, ctx.env, log=logs / f"{key}-features.log")
        ready.write_text(json.dumps(spec.model_dump(mode="json"), indent=1))
    ctx.datasets[key] = paths
    return paths


def train(ctx: Context, spec: RunSpec, parent_run_id: str) -> RunResult:
    """One training through the production trainer (horovodrun), or its cached result."""
    runs = ctx.workdir / "runs"
    summary_path = runs / f"{spec.key()}.json"
    if summary_path.is_file() and not ctx.fresh:
        summary = json.loads(summary_path.read_text())
        ctx.reused += 1
        return RunResult(spec, summary["run_id"], _metrics(summary), summary["seconds"], True)
    data = prepare_dataset(ctx, spec.data)
    checkpoints = ctx.workdir / "checkpoints" / spec.key()
    overrides = [
        f"seed={spec.seed}",
        f"model.variant={spec.variant}",
        "tracking.log_model=false",
        "tracking.registered_model_name=null",
        f"tracking.experiment={ctx.cfg.experiment}",
        f"tracking.parent_run_id={parent_run_id}",
        *ctx.cfg.train_overrides,
        *spec.overrides,
    ]
    command = commands.trainer(
        commands.BIN,
        ctx.cfg.np,
        commands.train_args(
            ctx.cfg.train_config,
            data.features,
            data.train_dates,
            data.eval_dates,
            oracle=data.raw / "oracle",
            checkpoint_dir=checkpoints,
            run_name=f"{spec.label} seed {spec.seed}",
            summary_json=summary_path.with_suffix(".trainer.json"),
            no_progress=True,
            sets=overrides,
        ),
    )
    seconds = commands.run_step(
        f"train {spec.label} seed {spec.seed}",
        command,
        ctx.env,
        log=ctx.workdir / "logs" / f"{spec.key()}.log",
        echo=False,
    )
    summary = json.loads(summary_path.with_suffix(".trainer.json").read_text())
    summary.update(
        seconds=seconds, spec={"label": spec.label, "variant": spec.variant, "seed": spec.seed}
    )
    summary_path.write_text(json.dumps(summary, indent=1, sort_keys=True))
    summary_path.with_suffix(".trainer.json").unlink()
    shutil.rmtree(checkpoints, ignore_errors=True)  # a finished run needs no resume point
    ctx.launched += 1
    return RunResult(spec, summary["run_id"], _metrics(summary), seconds)


def _metrics(summary: dict) -> dict[str, float]:
    return {k: (math.nan if v is None else float(v)) for k, v in summary["metrics"].items()}


def train_all(ctx: Context, specs: Sequence[RunSpec], parent_run_id: str) -> list[RunResult]:
    """Train ``specs`` in order with a progress bar and one line per finished run."""
    from tqdm import tqdm

    results = []
    with tqdm(total=len(specs), desc="trainings", unit="run", file=sys.stderr) as bar:
        for spec in specs:
            result = train(ctx, spec, parent_run_id)
            results.append(result)
            m = result.metrics
            bar.write(
                f"{spec.label:<28} seed {spec.seed:<3} cvr_auc={m.get('cvr_auc', math.nan):.4f} "
                f"ctcvr_auc={m.get('ctcvr_auc', math.nan):.4f} "
                f"es_cvr_auc={m.get('entire_space_cvr_auc', math.nan):.4f} "
                + ("(cached)" if result.cached else f"({result.seconds:.0f}s)"),
                file=sys.stderr,
            )
            bar.update(1)
    return results


# ---- tables ----------------------------------------------------------------------------------


@dataclass
class Table:
    """A result table: rows of cells, written as markdown and CSV."""

    name: str
    title: str
    header: list[str]
    rows: list[list[str]]
    csv_header: list[str]
    csv_rows: list[list[Any]]
    notes: list[str] = field(default_factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(self.header) + " |")
        lines.append("|" + "|".join(" --- " for _ in self.header) + "|")
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        if self.notes:
            lines.append("")
            lines += self.notes
        return "\n".join(lines) + "\n"

    def write(self, out_dir: Path) -> list[Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        md, csv_path = out_dir / f"{self.name}.md", out_dir / f"{self.name}.csv"
        md.write_text(self.markdown())
        with csv_path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.csv_header)
            writer.writerows(self.csv_rows)
        return [md, csv_path]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (NaN std for one value)."""
    array = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if array.size == 0:
        return math.nan, math.nan
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return float(array.mean()), std


def fmt_auc(mean: float, std: float) -> str:
    """An AUC in points as the paper prints it: ``68.56 ± 0.37``."""
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.2f}" + ("" if math.isnan(std) else f" ± {100 * std:.2f}")


def fmt_ratio(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")


def fmt_gain(value: float, base: float) -> str:
    if math.isnan(value) or math.isnan(base):
        return "n/a"
    return f"{100 * (value - base):+.2f}"


def group(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    """Results by label, in first-seen order."""
    grouped: dict[str, list[RunResult]] = {}
    for result in results:
        grouped.setdefault(result.spec.label, []).append(result)
    return grouped


def stat(results: Sequence[RunResult], metric: str) -> tuple[float, float]:
    return mean_std([r.metrics.get(metric, math.nan) for r in results])


COMPARED = (
    ("cvr_auc", "CVR AUC (clicked)"),
    ("ctcvr_auc", "CTCVR AUC"),
    ("entire_space_cvr_auc", "CVR AUC (entire space)"),
)
CSV_METRICS = (
    "ctr_auc",
    "cvr_auc",
    "ctcvr_auc",
    "entire_space_cvr_auc",
    "cvr_ieb",
    "cvr_ieb_clicked",
    "cvr_ieb_vs_counterfactual",
    "cvr_logloss",
    "ctcvr_logloss",
)
ORACLE = (
    ("cvr_auc", "oracle_cvr_auc"),
    ("ctcvr_auc", "oracle_ctcvr_auc"),
    ("entire_space_cvr_auc", "oracle_entire_space_cvr_auc"),
)


def comparison_table(
    name: str,
    title: str,
    label_header: str,
    results: Sequence[RunResult],
    reference: str | None,
    notes: Sequence[str] = (),
) -> Table:
    """Mean ± std over seeds of the compared AUCs and the IEB, gains over ``reference``,
    and the oracle's ceilings as the last row."""
    grouped = group(results)
    ref = grouped.get(reference) if reference else None
    header = [label_header, "seeds"]
    for _, title_ in COMPARED:
        header.append(title_)
        if ref:
            header.append(f"gain vs {reference}")
    header.append("pCVR IEB (mean pCVR / true)")
    rows, csv_rows = [], []
    for label, group_results in grouped.items():
        row = [label, str(len(group_results))]
        for metric, _ in COMPARED:
            mean, std = stat(group_results, metric)
            row.append(fmt_auc(mean, std))
            if ref:
                row.append(fmt_gain(mean, stat(ref, metric)[0]))
        row.append(fmt_ratio(*stat(group_results, "cvr_ieb")))
        rows.append(row)
        csv_row: list[Any] = [label, len(group_results)]
        for metric in CSV_METRICS:
            csv_row.extend(stat(group_results, metric))
        csv_row.append(" ".join(r.run_id for r in group_results))
        csv_rows.append(csv_row)
    everything = list(results)
    oracle_row = ["oracle (true pCTR, pCVR)", "-"]
    for metric, oracle_metric in ORACLE:
        oracle_row.append(fmt_auc(stat(everything, oracle_metric)[0], math.nan))
        if ref:
            oracle_row.append(fmt_gain(stat(everything, oracle_metric)[0], stat(ref, metric)[0]))
    oracle_row.append("1.000")
    rows.append(oracle_row)
    csv_header = [label_header, "seeds"]
    for metric in CSV_METRICS:
        csv_header += [f"{metric}_mean", f"{metric}_std"]
    csv_header.append("mlflow_run_ids")
    return Table(name, title, header, rows, csv_header, csv_rows, list(notes))


def ieb_decile_table(results: Sequence[RunResult]) -> Table:
    """pCVR / true pCVR within deciles of the model's pCTR (where does the IEB live?)."""
    grouped = group(results)
    deciles = range(1, 11)
    header = ["model", *[f"d{d}" for d in deciles]]
    rows, csv_rows = [], []
    for label, group_results in grouped.items():
        means = [stat(group_results, f"cvr_ieb_ctr_decile_{d}")[0] for d in deciles]
        rows.append([label, *["n/a" if math.isnan(m) else f"{m:.2f}" for m in means]])
        csv_rows.append([label, *means])
    return Table(
        "ieb_by_ctr_decile",
        "pCVR estimation bias by decile of the model's pCTR (mean over seeds; 1.00 = unbiased)",
        header,
        rows,
        header,
        csv_rows,
        ["d1 = the tenth of impressions with the lowest model pCTR, d10 the highest."],
    )


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-a between two score lists (1 = same order, -1 = reversed)."""
    pairs = list(itertools.combinations(range(len(a)), 2))
    if not pairs:
        return math.nan
    score = sum(np.sign(a[i] - a[j]) * np.sign(b[i] - b[j]) for i, j in pairs)
    return float(score / len(pairs))


def ranking_table(results: Sequence[RunResult]) -> Table:
    """Methods ranked by clicked-only CVR AUC (the paper's test) and by entire-space CVR AUC."""
    grouped = group(results)
    labels = list(grouped)
    clicked = [stat(grouped[label], "cvr_auc")[0] for label in labels]
    entire = [stat(grouped[label], "entire_space_cvr_auc")[0] for label in labels]
    ctcvr = [stat(grouped[label], "ctcvr_auc")[0] for label in labels]

    def ranks(values: list[float]) -> list[int]:
        order = sorted(range(len(values)), key=lambda i: -values[i])
        result = [0] * len(values)
        for position, index in enumerate(order, start=1):
            result[index] = position
        return result

    rank_clicked, rank_entire, rank_ctcvr = ranks(clicked), ranks(entire), ranks(ctcvr)
    order = sorted(range(len(labels)), key=lambda i: rank_entire[i])
    header = [
        "model",
        "CVR AUC (entire space)",
        "rank (entire space)",
        "CVR AUC (clicked)",
        "rank (clicked)",
        "rank (CTCVR AUC)",
        "rank shift",
    ]
    rows, csv_rows = [], []
    for i in order:
        shift = rank_clicked[i] - rank_entire[i]
        rows.append(
            [
                labels[i],
                fmt_auc(*stat(grouped[labels[i]], "entire_space_cvr_auc")),
                str(rank_entire[i]),
                fmt_auc(*stat(grouped[labels[i]], "cvr_auc")),
                str(rank_clicked[i]),
                str(rank_ctcvr[i]),
                f"{shift:+d}" if shift else "0",
            ]
        )
        csv_rows.append(
            [labels[i], entire[i], rank_entire[i], clicked[i], rank_clicked[i], rank_ctcvr[i]]
        )
    notes = [
        f"Kendall's tau between the clicked-only and the entire-space ranking: "
        f"{kendall_tau(clicked, entire):.2f}; between the CTCVR-AUC and the entire-space "
        f"ranking: {kendall_tau(ctcvr, entire):.2f} (1 = same order).",
        "rank shift = rank by clicked-only CVR AUC minus rank by entire-space CVR AUC "
        "(positive: the paper's protocol under-rates the method).",
    ]
    csv_header = [
        "model",
        "entire_space_cvr_auc",
        "rank_entire_space",
        "cvr_auc_clicked",
        "rank_clicked",
        "rank_ctcvr",
    ]
    return Table(
        "ranking",
        "Ranking of methods: clicked-only vs entire-space CVR AUC",
        header,
        rows,
        csv_header,
        csv_rows,
        notes,
    )


def bias_sweep_table(results_by_bias: dict[float, list[RunResult]], variants: list[str]) -> Table:
    """Per bias value: each variant's CVR AUCs and the last variant's gap over the first."""
    first, last = variants[0], variants[-1]
    header = ["selection bias"]
    for _metric, title in (COMPARED[0], COMPARED[2]):
        header += [f"{v} {title}" for v in variants] + [f"{last} − {first} ({title}, points)"]
    header.append(f"{last} − {first} (CTCVR AUC, points)")
    rows, csv_rows = [], []
    for bias, results in sorted(results_by_bias.items()):
        grouped = group(results)
        row, csv_row = [f"{bias:g}"], [bias]
        for metric in ("cvr_auc", "entire_space_cvr_auc", "ctcvr_auc"):
            if metric != "ctcvr_auc":
                for variant in variants:
                    row.append(fmt_auc(*stat(grouped.get(variant, []), metric)))
            gap, err = gap_with_error(grouped.get(first, []), grouped.get(last, []), metric)
            row.append(f"{100 * gap:+.2f} ± {100 * err:.2f}" if not math.isnan(gap) else "n/a")
            csv_row += [gap, err]
        rows.append(row)
        csv_rows.append(csv_row)
    csv_header = ["selection_bias"]
    for metric in ("cvr_auc", "entire_space_cvr_auc", "ctcvr_auc"):
        csv_header += [f"gap_{metric}", f"gap_{metric}_stderr"]
    return Table(
        "bias_sweep",
        f"{last} vs {first} as the simulator's selection bias grows",
        header,
        rows,
        csv_header,
        csv_rows,
        ["gap ± its standard error (sqrt(s_a²/n_a + s_b²/n_b) over seeds)."],
    )


def gap_with_error(
    base: Sequence[RunResult], other: Sequence[RunResult], metric: str
) -> tuple[float, float]:
    """mean(other) - mean(base) and the standard error of that difference."""
    if not base or not other:
        return math.nan, math.nan
    m_base, s_base = stat(base, metric)
    m_other, s_other = stat(other, metric)
    var = 0.0
    for std, n in ((s_base, len(base)), (s_other, len(other))):
        var += (std**2 / n) if not math.isnan(std) else 0.0
    return m_other - m_base, math.sqrt(var)


# ---- plots -----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_comparison(results: Sequence[RunResult], path: Path, title: str) -> Path:
    """Grouped bars: mean ± std of the compared AUCs per model, oracle ceilings dashed."""
    plt = _pyplot()
    grouped = group(results)
    labels = list(grouped)
    x = np.arange(len(labels))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(labels)), 4.2))
    for k, ((metric, name), (_, oracle)) in enumerate(zip(COMPARED, ORACLE, strict=True)):
        means = [100 * stat(grouped[label], metric)[0] for label in labels]
        stds = [100 * np.nan_to_num(stat(grouped[label], metric)[1]) for label in labels]
        bars = ax.bar(x + (k - 1) * width, means, width, yerr=stds, capsize=3, label=name)
        ceiling = 100 * stat(list(results), oracle)[0]
        if not math.isnan(ceiling):
            ax.axhline(ceiling, ls="--", lw=1, color=bars.patches[0].get_facecolor())
    finite = [
        100 * stat(grouped[label], metric)[0]
        for label in labels
        for metric, _ in COMPARED
        if not math.isnan(stat(grouped[label], metric)[0])
    ]
    ceilings = [100 * stat(list(results), oracle)[0] for _, oracle in ORACLE]
    tops = [v for v in [*finite, *ceilings] if not math.isnan(v)]
    if finite:
        ax.set_ylim(min(finite) - 3, max(tops) + 2)
    ax.set_xticks(x, labels, rotation=20)
    ax.set_ylabel("AUC (points), mean ± std over seeds")
    ax.set_title(title + "\n(dashed: oracle ceilings)")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ieb_deciles(results: Sequence[RunResult], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    deciles = np.arange(1, 11)
    for label, group_results in group(results).items():
        means = [stat(group_results, f"cvr_ieb_ctr_decile_{d}")[0] for d in deciles]
        ax.plot(deciles, means, marker="o", label=label)
    ax.axhline(1.0, color="k", lw=1, ls="--")
    ax.set_xlabel("decile of the model's pCTR (1 = lowest)")
    ax.set_ylabel("mean pCVR / mean true pCVR")
    ax.set_title("Where pCVR's estimation bias lives")
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bias_sweep(table: Table, variants: list[str], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    biases = [row[0] for row in table.csv_rows]
    for k, (_metric, name) in enumerate(
        (
            ("cvr_auc", "CVR AUC (clicked)"),
            ("entire_space_cvr_auc", "CVR AUC (entire space)"),
            ("ctcvr_auc", "CTCVR AUC"),
        )
    ):
        gaps = [100 * row[1 + 2 * k] for row in table.csv_rows]
        errs = [100 * row[2 + 2 * k] for row in table.csv_rows]
        ax.errorbar(biases, gaps, yerr=errs, marker="o", capsize=3, label=name)
    ax.axhline(0.0, color="k", lw=1)
    ax.set_xlabel("simulator selection_bias")
    ax.set_ylabel(f"{variants[-1]} − {variants[0]} (AUC points)")
    ax.set_title(f"{variants[-1]}'s gain over {variants[0]} as selection bias grows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the sub-commands --------------------------------------------------------------------------


@dataclass
class Outcome:
    """What a sub-command produced."""

    tables: list[Table]
    files: list[Path]
    runs: list[RunResult]


def paper_specs(cfg: ExperimentConfig) -> list[RunSpec]:
    return [
        RunSpec(variant, variant, seed, cfg.data)
        for variant in cfg.paper_table.variants
        for seed in cfg.seeds
    ]


def cmd_paper_table(ctx: Context, parent: str, out: Path) -> Outcome:
    results = train_all(ctx, paper_specs(ctx.cfg), parent)
    data = ctx.cfg.data
    table = comparison_table(
        "paper_table",
        "CVR and CTCVR AUC by method (paper's Table 2 protocol, plus the entire space)",
        "model",
        results,
        reference="base" if "base" in ctx.cfg.paper_table.variants else None,
        notes=[
            f"Data: simulator preset `{data.preset}`, selection_bias {data.selection_bias:g}, "
            f"train on {data.train_days} day(s), evaluate on the next {data.eval_days}. "
            f"AUCs in points, mean ± sample std over seeds {ctx.cfg.seeds}; "
            "gains are differences of means in points.",
            "CVR AUC (clicked) is the paper's protocol; CVR AUC (entire space) scores pCVR "
            "on every test impression against its counterfactual conversion label; pCVR IEB "
            "is mean pCVR / mean true pCVR over all test impressions (1 = unbiased).",
        ],
    )
    deciles = ieb_decile_table(results)
    files = table.write(out) + deciles.write(out)
    files.append(plot_comparison(results, out / "paper_table.png", "ESMM family on simulated data"))
    files.append(plot_ieb_deciles(results, out / "ieb_by_ctr_decile.png"))
    return Outcome([table, deciles], files, results)


def cmd_task_weights(ctx: Context, parent: str, out: Path) -> Outcome:
    cfg = ctx.cfg
    specs = []
    for weights in cfg.task_weights.settings:
        label = f"({weights.ctr:g}, {weights.cvr:g}, {weights.ctcvr:g})"
        sets = (
            f"loss.task_weights.ctr={weights.ctr}",
            f"loss.task_weights.cvr={weights.cvr}",
            f"loss.task_weights.ctcvr={weights.ctcvr}",
        )
        # the paper's weights are the trainer's defaults: the same run as paper-table's esmm
        default = weights == TaskWeights()
        for seed in cfg.seeds_for(cfg.task_weights.seeds):
            specs.append(RunSpec(label, "esmm", seed, cfg.data, () if default else sets))
    results = train_all(ctx, specs, parent)
    table = comparison_table(
        "task_weights",
        "ESMM with other task weights (CTR, CVR, CTCVR); the CVR loss is on clicked only",
        "weights (ctr, cvr, ctcvr)",
        results,
        reference="(1, 0, 1)"
        if any(w == TaskWeights() for w in cfg.task_weights.settings)
        else None,
        notes=["(1, 0, 1) is the paper's ESMM; gains are against it."],
    )
    files = table.write(out)
    files.append(plot_comparison(results, out / "task_weights.png", "ESMM task weights"))
    return Outcome([table], files, results)


def cmd_stop_gradient(ctx: Context, parent: str, out: Path) -> Outcome:
    cfg = ctx.cfg
    specs = []
    for setting in cfg.stop_gradient.settings:
        label = f"CTCVR grad into {setting}"
        sets = () if setting == "both" else (f"loss.ctcvr_grad_into={setting}",)
        for seed in cfg.seeds_for(cfg.stop_gradient.seeds):
            specs.append(RunSpec(label, "esmm", seed, cfg.data, sets))
    results = train_all(ctx, specs, parent)
    table = comparison_table(
        "stop_gradient",
        "Which tower the CTCVR loss trains (the other tower's output is detached in pCTCVR)",
        "setting",
        results,
        reference="CTCVR grad into both" if "both" in cfg.stop_gradient.settings else None,
        notes=["'both' is the paper's ESMM; gains are against it."],
    )
    files = table.write(out)
    files.append(plot_comparison(results, out / "stop_gradient.png", "ESMM stop-gradient"))
    return Outcome([table], files, results)


def cmd_ranking(ctx: Context, parent: str, out: Path) -> Outcome:
    results = train_all(ctx, paper_specs(ctx.cfg), parent)
    table = ranking_table(results)
    return Outcome([table], table.write(out), results)


def cmd_bias_sweep(ctx: Context, parent: str, out: Path) -> Outcome:
    cfg = ctx.cfg
    by_bias: dict[float, list[RunResult]] = {}
    for bias in cfg.bias_sweep.values:
        data = cfg.data.model_copy(update={"selection_bias": bias})
        specs = [
            RunSpec(variant, variant, seed, data)
            for variant in cfg.bias_sweep.variants
            for seed in cfg.seeds_for(cfg.bias_sweep.seeds)
        ]
        by_bias[bias] = train_all(ctx, specs, parent)
    table = bias_sweep_table(by_bias, list(cfg.bias_sweep.variants))
    files = table.write(out)
    files.append(plot_bias_sweep(table, list(cfg.bias_sweep.variants), out / "bias_sweep.png"))
    return Outcome([table], files, [r for rs in by_bias.values() for r in rs])


COMMANDS: dict[str, Callable[[Context, str, Path], Outcome]] = {
    "paper-table": cmd_paper_table,
    "task-weights": cmd_task_weights,
    "stop-gradient": cmd_stop_gradient,
    "ranking": cmd_ranking,
    "bias-sweep": cmd_bias_sweep,
}


# ---- MLflow parent runs and the driver ---------------------------------------------------------


def _client(tracking_uri: str):
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.MlflowClient(tracking_uri)


def open_parent(ctx: Context, name: str, parent: str | None, params: dict[str, str]) -> str:
    client = _client(ctx.tracking_uri)
    tags = {"esmm.experiment_command": name}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run = client.create_run(ctx.experiment_id, run_name=name, tags=tags)
    items = sorted(params.items())
    for start in range(0, len(items), 100):
        from mlflow.entities import Param

        client.log_batch(
            run.info.run_id, params=[Param(k, v) for k, v in items[start : start + 100]]
        )
    return run.info.run_id


def close_parent(ctx: Context, run_id: str, outcome: Outcome | None, seconds: float) -> None:
    client = _client(ctx.tracking_uri)
    if outcome is not None:
        for path in outcome.files:
            client.log_artifact(run_id, str(path))
        client.log_metric(run_id, "trainings", len(outcome.runs))
        client.log_metric(run_id, "wall_clock_s", seconds)
    client.set_terminated(run_id, status="FINISHED" if outcome is not None else "FAILED")


def resolve_context(cfg: ExperimentConfig, fresh: bool) -> Context:
    from esmm.tracking import check_reachable, default_artifact_location

    workdir = Path(cfg.workdir)
    if not workdir.is_absolute():
        workdir = commands.PROJECT_ROOT / workdir
    workdir.mkdir(parents=True, exist_ok=True)
    uri = (
        os.environ.get("MLFLOW_TRACKING_URI")
        or cfg.tracking_uri
        or f"sqlite:///{workdir / 'mlflow' / 'mlflow.db'}"
    )
    check_reachable(uri)
    client = _client(uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment(
            cfg.experiment, artifact_location=default_artifact_location(uri)
        )
    )
    return Context(cfg, workdir, uri, experiment_id, fresh=fresh)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m esmm.experiments",
        description=__doc__.split("\n\n")[0] + " Each training is horovodrun + esmm.train.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n\n")[2:3]),
    )
    parser.add_argument("command", choices=[*COMMANDS, "all"], help="what to run")
    parser.add_argument("--config", default="conf/experiment.yaml", help="experiment YAML")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="apply the config's 'quick' overrides (fewer seeds, smaller data): minutes",
    )
    parser.add_argument("--fresh", action="store_true", help="ignore cached datasets and trainings")
    add_override_argument(
        parser,
        "override an experiment-config key, e.g. --set seeds=[1,2] (repeatable)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from esmm.tracking import TrackingError, flatten

    try:
        cfg = load_experiment_config(args.config, args.quick, args.overrides)
        ctx = resolve_context(cfg, args.fresh)
    except (ConfigError, TrackingError) as exc:
        print(f"esmm.experiments: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    commands = list(COMMANDS) if args.command == "all" else [args.command]
    params = flatten(cfg.model_dump(mode="json"))
    params["command"] = args.command
    params["quick"] = str(args.quick)
    started = time.monotonic()
    top = open_parent(ctx, args.command, None, params) if args.command == "all" else None
    outcomes: dict[str, Outcome] = {}
    for name in commands:
        run_id = open_parent(ctx, name, top, {} if top else params)
        out = ctx.workdir / "results" / name.replace("-", "_")
        t0 = time.monotonic()
        try:
            outcome = COMMANDS[name](ctx, run_id, out)
        except commands.StepFailed as exc:
            close_parent(ctx, run_id, None, time.monotonic() - t0)
            if top:
                close_parent(ctx, top, None, time.monotonic() - started)
            print(f"esmm.experiments: {name}: {exc}", file=sys.stderr)
            return 1
        close_parent(ctx, run_id, outcome, time.monotonic() - t0)
        outcomes[name] = outcome
        for table in outcome.tables:
            print("\n" + table.markdown())
        print(f"{name}: results in {out} (MLflow run {run_id})", file=sys.stderr)
    elapsed = time.monotonic() - started
    command_line = "python -m esmm.experiments " + " ".join(argv if argv else sys.argv[1:])
    report = write_report(ctx, outcomes, command_line, elapsed)
    if top:
        close_parent(ctx, top, Outcome([], [report], []), elapsed)
    print(
        f"\n{args.command}: {ctx.launched} trainings run, {ctx.reused} reused from the cache, "
        f"{elapsed / 60:.1f} min. Report: {report}\nMLflow: {ctx.tracking_uri} "
        f"(experiment '{cfg.experiment}')",
        file=sys.stderr,
    )
    return 0


def write_report(ctx: Context, outcomes: dict[str, Outcome], command: str, seconds: float) -> Path:
    """All tables of this invocation in one markdown file, with the command and runtime."""
    lines = [
        "# Experiment report",
        "",
        f"Command: `{command}`  ",
        f"Wall clock: {seconds / 60:.1f} min ({ctx.launched} trainings run, "
        f"{ctx.reused} reused from the cache), {ctx.cfg.np} Horovod workers.",
        "",
    ]
    for name, outcome in outcomes.items():
        lines.append(f"## {name}\n")
        lines += [table.markdown() for table in outcome.tables]
        lines += [
            f"![{p.stem}]({p.relative_to(ctx.workdir / 'results')})"
            for p in outcome.files
            if p.suffix == ".png"
        ]
        lines.append("")
    path = ctx.workdir / "results" / "report.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    sys.exit(main())
