"""The promotion gate: does a freshly trained model (the challenger) replace the champion?

    python -m esmm.promotion --model esmm --version 7 --features var/features \\
        --eval-date 2026-01-08 [--config conf/pipeline.yaml]

Both models predict the SAME held-out day (the challenger's own training metrics were taken
on whatever day it was trained for, the champion's on an older one, so those cannot be
compared); their metrics come from :func:`esmm.metrics.evaluate_predictions`. The decision
itself is the pure function :func:`decide` (unit-tested without MLflow); the rest of this
module is the MLflow glue: load the two pyfuncs, predict, decide, record the decision as
tags on the challenger's model version and, when it wins, move the ``champion`` alias.

Exit codes: 0 a decision was made and recorded (promoted OR rejected: both are a normal
outcome of a daily run), 1 MLflow failed, 2 bad arguments or inputs (unknown model version,
missing partition, bad config), one line on stderr.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from contract.config import ConfigError, StrictModel, add_override_argument, load_config

__all__ = [
    "Decision",
    "GateConfig",
    "PipelineConfig",
    "decide",
    "evaluate_model",
    "main",
    "run_gate",
]

PROG = "esmm.promotion"
EXIT_USAGE = 2
EXIT_MLFLOW = 1
# Key of the count of NaN/inf predictions in a metrics mapping (not an evaluate_predictions key).
NAN_PREDICTIONS = "nan_predictions"


class GateConfig(StrictModel):
    """The ``promotion:`` section of ``conf/pipeline.yaml``.

    Attributes:
        metric: the metric that ranks challenger and champion (an evaluate_predictions key).
        higher_is_better: False for losses (``cvr_logloss``).
        min_improvement: the challenger must beat the champion by at least this much (absolute,
            in the metric's units); daily noise of an AUC on one day is of order 0.005.
        min_auc: every metric in ``auc_metrics`` must be above this (0.5 = chance).
        auc_metrics: the AUCs checked against ``min_auc``.
        calibration_bounds: ``[low, high]`` for each metric in ``calibration_metrics`` (mean
            predicted / observed; 1 = calibrated on average).
        calibration_metrics: the calibrations checked against ``calibration_bounds``.
        alias: the registry alias of the model in production.
    """

    metric: str = "cvr_auc"
    higher_is_better: bool = True
    min_improvement: float = Field(default=0.002, ge=0)
    min_auc: float = Field(default=0.5, ge=0, le=1)
    auc_metrics: tuple[str, ...] = ("ctr_auc", "cvr_auc", "ctcvr_auc")
    calibration_bounds: tuple[float, float] = (0.5, 2.0)
    calibration_metrics: tuple[str, ...] = (
        "ctr_calibration",
        "cvr_calibration",
        "ctcvr_calibration",
    )
    alias: str = "champion"

    @model_validator(mode="after")
    def _bounds_ordered(self) -> GateConfig:
        low, high = self.calibration_bounds
        if not 0 <= low <= high:
            raise ValueError(f"calibration_bounds must be 0 <= low <= high, got {low}, {high}")
        return self


class PipelineConfig(StrictModel):
    """``conf/pipeline.yaml``: the gate's settings (validated here) and the DAG's defaults
    (``dag:``, read with plain YAML by the DAG file in the Airflow environment)."""

    promotion: GateConfig = GateConfig()
    dag: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """The outcome of the gate.

    Attributes:
        promote: whether the challenger becomes the champion.
        reason: one human-readable sentence (recorded as a tag).
        metric: the ranking metric's name.
        challenger_value: the challenger's value of ``metric``.
        champion_value: the champion's value; None when there is no champion.
    """

    promote: bool
    reason: str
    metric: str
    challenger_value: float
    champion_value: float | None = None
    failed_checks: tuple[str, ...] = field(default=())

    @property
    def label(self) -> str:
        """``promoted`` or ``rejected`` (the ``decision`` tag)."""
        return "promoted" if self.promote else "rejected"


def sanity_problems(metrics: Mapping[str, float], cfg: GateConfig) -> list[str]:
    """What makes a model unfit to serve, whatever the champion: NaN predictions, an AUC at or
    below ``min_auc``, a calibration outside its bounds; empty when fit."""
    problems = []
    nan_count = metrics.get(NAN_PREDICTIONS, 0)
    if nan_count:
        problems.append(f"{int(nan_count)} NaN/inf predictions")
    for name in cfg.auc_metrics:
        value = metrics.get(name, math.nan)
        if not value > cfg.min_auc:  # NaN fails too
            problems.append(f"{name}={value:.4f} not above {cfg.min_auc}")
    low, high = cfg.calibration_bounds
    for name in cfg.calibration_metrics:
        value = metrics.get(name, math.nan)
        if not low <= value <= high:
            problems.append(f"{name}={value:.4f} outside [{low}, {high}]")
    return problems


def decide(
    challenger: Mapping[str, float], champion: Mapping[str, float] | None, cfg: GateConfig
) -> Decision:
    """The gate: promote only a sane challenger that beats the champion by the margin.

    Args:
        challenger: the challenger's metrics on the evaluation day (``evaluate_predictions``
            keys, plus ``nan_predictions``: the count of non-finite predictions).
        champion: the champion's metrics on the same day; None when there is no champion yet,
            in which case a sane challenger is promoted.
        cfg: the gate settings.

    Returns:
        The :class:`Decision`.

    Example:
        >>> cfg = GateConfig(min_improvement=0.01, calibration_metrics=())
        >>> good = {"ctr_auc": 0.7, "cvr_auc": 0.72, "ctcvr_auc": 0.7}
        >>> decide(good, {**good, "cvr_auc": 0.715}, cfg).promote
        False
    """
    value = float(challenger.get(cfg.metric, math.nan))
    champion_value = None if champion is None else float(champion.get(cfg.metric, math.nan))
    problems = sanity_problems(challenger, cfg)
    if problems:
        return Decision(
            False,
            "failed sanity checks: " + "; ".join(problems),
            cfg.metric,
            value,
            champion_value,
            tuple(problems),
        )
    if champion is None:
        return Decision(True, "no champion yet; first valid model", cfg.metric, value, None)
    if not math.isfinite(champion_value):
        return Decision(
            True, f"champion's {cfg.metric} is not finite", cfg.metric, value, champion_value
        )
    gain = value - champion_value if cfg.higher_is_better else champion_value - value
    if gain >= cfg.min_improvement:
        reason = (
            f"{cfg.metric} {value:.4f} vs champion {champion_value:.4f}: "
            f"better by {gain:.4f} >= margin {cfg.min_improvement}"
        )
        return Decision(True, reason, cfg.metric, value, champion_value)
    reason = (
        f"{cfg.metric} {value:.4f} vs champion {champion_value:.4f}: "
        f"gain {gain:.4f} below margin {cfg.min_improvement}"
    )
    return Decision(False, reason, cfg.metric, value, champion_value)


# ---- the MLflow glue ----------------------------------------------------------------------


class GateInputError(Exception):
    """A user-fixable problem with the gate's inputs (exit code 2)."""


def read_eval_day(features: str, eval_date: str):
    """The evaluation partition as a pandas frame (pyarrow; one day fits in memory)."""
    import pyarrow.parquet as pq

    from contract.dates import parse_partitions
    from esmm.data import DataError, partition_urls

    try:
        (url,) = partition_urls(features, parse_partitions(eval_date, "--eval-date"))
    except (DataError, ValueError) as exc:
        raise GateInputError(str(exc)) from None
    return pq.read_table(url.removeprefix("file://")).to_pandas()


def evaluate_model(model_uri: str, frame) -> dict[str, float]:
    """Load a registered pyfunc, predict ``frame`` (feature rows with labels) and return
    evaluate_predictions' metrics plus ``nan_predictions``."""
    import mlflow.pyfunc
    import numpy as np

    from esmm.metrics import evaluate_predictions

    model = mlflow.pyfunc.load_model(model_uri)
    predictions = model.predict(frame)
    arrays = {name: predictions[name].to_numpy(np.float64) for name in ("pctr", "pcvr", "pctcvr")}
    arrays["click"] = frame["click"].to_numpy(np.float64)
    arrays["conversion"] = frame["conversion"].to_numpy(np.float64)
    metrics = evaluate_predictions(arrays)
    stacked = np.stack([arrays["pctr"], arrays["pcvr"], arrays["pctcvr"]])
    metrics[NAN_PREDICTIONS] = float((~np.isfinite(stacked)).any(axis=0).sum())
    return metrics


def decision_tags(decision: Decision, champion_version: str | None, eval_date: str) -> dict:
    """The model-version tags that record a decision (all values strings)."""

    def text(value: float | None) -> str:
        return "none" if value is None else f"{value:.6f}"

    return {
        "decision": decision.label,
        "decision_reason": decision.reason[:4000],
        "decision_metric": decision.metric,
        "decision_eval_date": eval_date,
        f"challenger_{decision.metric}": text(decision.challenger_value),
        f"champion_{decision.metric}": text(decision.champion_value),
        "champion_version_compared": champion_version or "none",
    }


def run_gate(
    client, name: str, version: str, features: str, eval_date: str, cfg: GateConfig
) -> Decision:
    """Evaluate challenger and champion on ``eval_date``, decide, tag, move the alias.

    Idempotent: re-running for a version that already holds the alias records that and keeps
    it, so a retried DAG task does not demote the model it promoted a minute ago.
    """
    from mlflow.exceptions import MlflowException

    version = str(version)
    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        raise GateInputError(f"model version {name}/{version} not found: {exc.message}") from None
    try:
        # str(): the SQL store answers ints, the REST client strings
        champion_version = str(client.get_model_version_by_alias(name, cfg.alias).version)
    except MlflowException:
        champion_version = None  # no alias yet: the first valid model becomes champion

    frame = read_eval_day(features, eval_date)
    challenger_metrics = evaluate_model(f"models:/{name}/{version}", frame)
    if champion_version == version:
        decision = decide(challenger_metrics, None, cfg)
        decision = Decision(
            decision.promote,
            f"already {cfg.alias}; " + decision.reason,
            decision.metric,
            decision.challenger_value,
            decision.challenger_value,
            decision.failed_checks,
        )
    else:
        champion_metrics = (
            None
            if champion_version is None
            else evaluate_model(f"models:/{name}/{champion_version}", frame)
        )
        decision = decide(challenger_metrics, champion_metrics, cfg)
    for key, value in decision_tags(decision, champion_version, eval_date).items():
        client.set_model_version_tag(name, version, key, value)
    if decision.promote and champion_version != version:
        client.set_registered_model_alias(name, cfg.alias, version)
    return decision


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description="Compare a registered model version (the challenger) with the current "
        "champion on one held-out day; give it the champion alias only if it is sane and "
        "better by the configured margin. The decision is recorded as version tags. "
        "Tracking: MLFLOW_TRACKING_URI.",
    )
    parser.add_argument("--model", required=True, help="registered model name")
    parser.add_argument("--version", required=True, help="the challenger's version")
    parser.add_argument("--features", required=True, help="feature table root")
    parser.add_argument("--eval-date", required=True, help="the held-out day, YYYY-MM-DD")
    parser.add_argument(
        "--config",
        default=str(Path(__file__).resolve().parents[1] / "conf" / "pipeline.yaml"),
        help="pipeline config with the promotion: section (default conf/pipeline.yaml)",
    )
    add_override_argument(
        parser,
        "override a config key, e.g. --set promotion.min_improvement=0.01",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the gate; print the decision as one line."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, PipelineConfig, args.overrides).promotion
    except ConfigError as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        decision = run_gate(
            mlflow.MlflowClient(), args.model, args.version, args.features, args.eval_date, cfg
        )
    except GateInputError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except MlflowException as exc:
        print(f"{PROG}: error: MLflow: {' '.join(exc.message.split())}", file=sys.stderr)
        return EXIT_MLFLOW
    print(f"{PROG}: {args.model}/{args.version}: {decision.label}: {decision.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
