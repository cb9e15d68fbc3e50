"""Batch scoring of a feature-table day with a registered MLflow model.

``jobs/score.py`` calls, in order:

1. :func:`resolve_model` (MlflowClient only): ``models:/NAME@ALIAS`` or ``models:/NAME/V`` →
   a pinned version, so a promotion during the job cannot switch models half-way;
2. :func:`schema_mismatches` (pyarrow, Parquet footer only): the day's columns against the
   model signature's inputs;
3. :func:`score_day` (Spark): the model's own pyfunc as a batched Arrow UDF
   (``mlflow.pyfunc.spark_udf``), so scoring uses exactly the input handling of training;
   the day is staged and renamed into ``<out>/dt=D`` (:func:`features.io.publish`).

Steps 1-2 run before any Spark work, so a wrong alias or a table the model cannot read ends in
one line, not a JVM stack trace.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from contract import schema

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame, SparkSession

__all__ = [
    "OUTPUT_COLUMNS",
    "ResolvedModel",
    "ScoringInputError",
    "parse_model_uri",
    "resolve_model",
    "schema_mismatches",
    "score_day",
]

PREDICTIONS = ("pctr", "pcvr", "pctcvr")
OUTPUT_COLUMNS = (schema.IMPRESSION_ID, *PREDICTIONS, "model_name", "model_version")
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class ScoringInputError(Exception):
    """The model or the table cannot be used as given (exit code 2)."""


@dataclass(frozen=True)
class ResolvedModel:
    """A registered model version pinned for one scoring job.

    Attributes:
        name: registered model name.
        version: the version (an alias is resolved to it once, at the start).
        requested: the URI the user gave.
    """

    name: str
    version: str
    requested: str

    @property
    def uri(self) -> str:
        """``models:/NAME/VERSION``."""
        return f"models:/{self.name}/{self.version}"


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` → (NAME, ALIAS, None); ``models:/NAME/V`` → (NAME, None, V)."""
    match = _MODEL_URI.match(uri)
    if not match:
        raise ScoringInputError(
            f"--model '{uri}' is not a registry URI: expected models:/NAME@ALIAS or models:/NAME/V"
        )
    return match["name"], match["alias"], match["version"]


def resolve_model(client, uri: str) -> ResolvedModel:
    """Pin ``uri`` to a version with the registry; ScoringInputError if it does not exist."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(uri)
    try:
        if alias is not None:
            version = client.get_model_version_by_alias(name, alias).version
        else:
            client.get_model_version(name, version)
    except MlflowException as exc:
        what = f"alias '{alias}'" if alias is not None else f"version {version}"
        raise ScoringInputError(
            f"model {uri}: registered model '{name}' has no {what} "
            f"({' '.join(exc.message.split())[:200]})"
        ) from None
    return ResolvedModel(name=name, version=str(version), requested=uri)


def _arrow_type_name(dtype: pa.DataType) -> str:
    """pyarrow type → the MLflow type name it is read as (``long``, ``array<long>``, ...)."""
    import pyarrow as pa

    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        return f"array<{_arrow_type_name(dtype.value_type)}>"
    names = {
        pa.int64(): "long",
        pa.int32(): "integer",
        pa.float64(): "double",
        pa.float32(): "float",
        pa.string(): "string",
        pa.large_string(): "string",
        pa.bool_(): "boolean",
    }
    return names.get(dtype, str(dtype))


def _signature_type_name(col_type) -> str:
    from mlflow.types.schema import Array

    if isinstance(col_type, Array):
        return f"array<{_signature_type_name(col_type.dtype)}>"
    return getattr(col_type, "name", str(col_type))


# Safe widenings MLflow's schema enforcement applies itself (no information is lost).
_WIDENS_TO = {"integer": {"long"}, "float": {"double"}, "array<integer>": {"array<long>"}}


def schema_mismatches(table_schema: pa.Schema, signature) -> list[str]:
    """Differences between a day's Parquet schema and the model signature's inputs.

    Args:
        table_schema: the schema of the day's files (``pyarrow.parquet.read_schema``).
        signature: the logged model's ``ModelSignature``.

    Returns:
        One message per input column that is missing or of an incompatible type; extra table
        columns (labels, impression_id) are fine. Empty when the model can read the table.
    """
    if signature is None or signature.inputs is None:
        return ["the model has no signature; log it with one to score feature tables"]
    problems = []
    for spec in signature.inputs.inputs:
        if spec.name not in table_schema.names:
            problems.append(f"column '{spec.name}' is missing")
            continue
        have = _arrow_type_name(table_schema.field(spec.name).type)
        want = _signature_type_name(spec.type)
        if have != want and want not in _WIDENS_TO.get(have, set()):
            problems.append(f"column '{spec.name}' is {have}, the model expects {want}")
    return problems


def day_schema(features: str, day: str) -> pa.Schema:
    """The Parquet schema of a local feature day, from one file's footer (no data read)."""
    from pathlib import Path

    import pyarrow.parquet as pq

    folder = Path(features) / f"{schema.PARTITION}={day}"
    files = sorted(
        p for p in folder.glob("*.parquet") if not p.name.startswith(("_", "."))
    ) or sorted(p for p in folder.rglob("*.parquet") if not p.name.startswith(("_", ".")))
    if not files:
        raise ScoringInputError(f"no feature table for {day}: no Parquet files in {folder}")
    return pq.read_schema(files[0])


def predict_frame(spark: SparkSession, features: str, day: str, model: ResolvedModel) -> DataFrame:
    """The day's impressions with the model's ``pctr``, ``pcvr``, ``pctcvr`` (a lazy frame).

    ``spark_udf`` ships the model to the executors and calls its pyfunc on Arrow batches of
    ``spark.sql.execution.arrow.maxRecordsPerBatch`` rows: one Python call per batch, never
    per row. The model's own signature names the input columns.
    """
    import mlflow.pyfunc
    from pyspark.sql import functions as F

    table = spark.read.parquet(f"{features.rstrip('/')}/{schema.PARTITION}={day}")
    predict = mlflow.pyfunc.spark_udf(
        spark,
        model.uri,
        result_type=", ".join(f"{name} double" for name in PREDICTIONS),
        env_manager="local",
    )
    scored = table.withColumn("_prediction", predict())
    return scored.select(
        schema.IMPRESSION_ID,
        *(F.col(f"_prediction.{name}").alias(name) for name in PREDICTIONS),
        F.lit(model.name).alias("model_name"),
        F.lit(model.version).alias("model_version"),
    )


def score_day(
    spark: SparkSession, features: str, day: str, model: ResolvedModel, out: str
) -> tuple[str, int]:
    """Score ``day`` and publish ``<out>/dt=<day>`` atomically (replacing an earlier run).

    Returns:
        The published path and its row count.
    """
    from features import io

    out = out.rstrip("/")
    run = f"{out}/_tmp/{day}-{uuid.uuid4().hex[:8]}"
    predict_frame(spark, features, day, model).write.mode("error").parquet(f"{run}/table")
    rows = spark.read.parquet(f"{run}/table").count()
    final = f"{out}/{schema.PARTITION}={day}"
    io.publish(spark, f"{run}/table", final, f"{run}/old-table")
    io.delete(spark, run)
    return final, rows
