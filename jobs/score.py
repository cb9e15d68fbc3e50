"""Score every impression of one feature-table day with a registered MLflow model.

Example (local):

    MLFLOW_TRACKING_URI=sqlite:///$PWD/var/mlflow/mlflow.db PYSPARK_PYTHON=.venv/bin/python \\
    PYTHONPATH=. .venv/bin/spark-submit jobs/score.py --features var/features \\
        --date 2026-01-08 --model models:/esmm@champion --out var/predictions

Writes ``<out>/dt=D/`` (Parquet: impression_id, pctr, pcvr, pctcvr, model_name,
model_version), replaced atomically, so a re-run of a day is safe. The alias is resolved to a
version once, before Spark starts; a missing model or alias, or a table whose columns do not
match the model's signature, ends in one line on stderr and exit code 2 without any Spark
work. Tracking server: ``MLFLOW_TRACKING_URI`` (or ``--tracking-uri``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # plain local runs; a cluster ships the code via --py-files
    sys.path.insert(0, str(PROJECT_ROOT))

from contract.dates import DateError, parse_day  # noqa: E402
from features.cli import (  # noqa: E402
    UsageError,
    die,
    is_local_path,
    local_dir_exists,
    local_path,
)

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from features.scoring import ResolvedModel

PROG = "score.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--help`` explains every option."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Score one day of the feature table with a registered model (pCTR, pCVR, "
        "pCTCVR per impression) and write <out>/dt=D/ atomically.",
    )
    parser.add_argument("--features", required=True, help="feature table root")
    parser.add_argument("--date", required=True, help="the day to score, YYYY-MM-DD")
    parser.add_argument(
        "--model", required=True, help="models:/NAME@ALIAS (e.g. @champion) or models:/NAME/V"
    )
    parser.add_argument("--out", required=True, help="predictions table root; writes <out>/dt=D/")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default MLFLOW_TRACKING_URI)")
    parser.add_argument(
        "--batch-rows",
        type=int,
        default=10_000,
        help="rows per Arrow batch handed to the model (spark.sql.execution.arrow.*)",
    )
    parser.add_argument("--master", default=None, help="Spark master when not set by spark-submit")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Plan:
    """The validated inputs of a run: the day and the model version it is pinned to."""

    day: str
    model: ResolvedModel


@dataclass(frozen=True)
class Result:
    """What a run wrote."""

    day: str
    model: ResolvedModel
    path: str
    rows: int


def check_args(args: argparse.Namespace) -> Plan:
    """Pin the model with the registry and check the table against its signature, without
    Spark; UsageError for anything the user can fix, MlflowException for the registry."""
    import mlflow

    from features.scoring import ScoringInputError, day_schema, resolve_model, schema_mismatches

    if args.tracking_uri:
        mlflow.set_tracking_uri(args.tracking_uri)
    try:
        day = parse_day(args.date, "--date").isoformat()
        if is_local_path(args.features) and not local_dir_exists(f"{args.features}/dt={day}"):
            raise UsageError(f"no feature table for {day}: {args.features}/dt={day} is missing")
        model = resolve_model(mlflow.MlflowClient(), args.model)
    except (DateError, ScoringInputError) as exc:
        raise UsageError(str(exc)) from None
    if is_local_path(args.features):
        signature = mlflow.models.get_model_info(model.uri).signature
        problems = schema_mismatches(day_schema(local_path(args.features), day), signature)
        if problems:
            raise UsageError(
                f"{args.features}/dt={day} does not match the signature of {model.uri}: "
                + "; ".join(problems)
            )
    return Plan(day=day, model=model)


def run(spark: SparkSession, args: argparse.Namespace, plan: Plan | None = None) -> Result:
    """Score the day of ``args`` with ``spark`` and publish its predictions atomically.

    ``plan`` is :func:`check_args`' result when the caller has it already. The session's
    Arrow batch size is ``--batch-rows`` while it scores, restored afterwards.
    """
    from features.scoring import score_day

    plan = plan or check_args(args)
    key = "spark.sql.execution.arrow.maxRecordsPerBatch"
    previous = spark.conf.get(key)
    spark.conf.set(key, str(args.batch_rows))
    try:
        path, rows = score_day(spark, args.features, plan.day, plan.model, args.out)
    finally:
        spark.conf.set(key, previous)
    return Result(day=plan.day, model=plan.model, path=path, rows=rows)


def main(argv: list[str] | None = None) -> int:
    """Check the model and the table without Spark, then score the day."""
    args = parse_args(argv)
    import mlflow

    try:
        plan = check_args(args)
    except UsageError as exc:
        die(PROG, str(exc))
    except mlflow.exceptions.MlflowException as exc:
        die(PROG, f"MLflow: {exc.message}", code=1)

    from features.spark import get_spark

    began = time.perf_counter()
    spark = get_spark("esmm-score", master=args.master or "local[*]")
    try:
        result = run(spark, args, plan)
    finally:
        spark.stop()
    print(
        f"{PROG}: {result.day}: {result.rows} impressions scored with {result.model.uri} "
        f"(from {result.model.requested}) → {result.path}; {time.perf_counter() - began:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
