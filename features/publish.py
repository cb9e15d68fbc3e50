"""Stage, check and publish one partition of a feature table: the one path of both jobs.

The daily build (:func:`features.pipeline.build_day`) and the Ali-CCP ingest
(:func:`features.aliccp.ingest_split`) each compute a table, a quarantine and their stats,
then hand them to :func:`stage_and_publish`, which does, in this order:

1. check the table DataFrame's schema against the contract (:mod:`contract.schema`), from the
   plan alone (no Spark job): a mismatch raises :class:`~contract.schema.SchemaError` and
   nothing is written;
2. write the table into the run's staging folder (:func:`contract.layout.staging_dir`), in
   the layout the caller gave the DataFrame, one row group per file;
3. produce the stats (a callable is invoked only now, so it can read the ``Observation``s of the
   write) and check them with :func:`features.stats.conservation_problems`: a violation
   deletes the staging folder and raises :class:`AccountingError`, nothing is published;
4. write the quarantine (partitioned by ``log``, in as many files as its records need at
   ``rows_per_row_group`` each) and the stats file into the staging folder;
5. publish atomically with :func:`features.io.publish_partition`: quarantine, stats, and the
   table last, so a ``dt=P`` folder only appears once its stats and quarantine exist.
"""

from __future__ import annotations

import contextlib
import json
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.pandas.types import to_arrow_schema

from contract.fields import FieldsConfig
from contract.layout import partition_dir, staging_dir
from contract.schema import SchemaError, check_table_schema
from features import io
from features.config import OutputConfig
from features.stats import conservation_problems

__all__ = [
    "AccountingError",
    "InputError",
    "PublishedPartition",
    "file_count",
    "stage_and_publish",
]


class InputError(Exception):
    """The raw inputs of a partition are missing or empty (a user error: exit code 2)."""


class AccountingError(Exception):
    """Input records are not all accounted for: the partition is not published (exit 1).

    ``partition`` names the partition that failed, when known.
    """

    def __init__(self, message: str, partition: str | None = None):
        super().__init__(message)
        self.partition = partition


@dataclass(frozen=True)
class PublishedPartition:
    """What the build of one partition ``dt=<partition>`` published, and its stats."""

    partition: str
    table_path: str
    quarantine_path: str
    stats_path: str
    stats: dict[str, Any]


def file_count(rows: int, output: OutputConfig) -> int:
    """Files (= row groups) of a partition of ``rows`` rows: enough for ``rows_per_row_group``
    each, and at least ``min_row_groups`` so that every Horovod rank gets whole ones."""
    return max(output.min_row_groups, math.ceil(rows / output.rows_per_row_group))


def stage_and_publish(
    spark: SparkSession,
    root: str,
    partition: str,
    table: DataFrame,
    quarantine: DataFrame,
    stats: Callable[[], dict[str, Any]] | Mapping[str, Any],
    fields: FieldsConfig,
    output: OutputConfig,
    *,
    table_outputs: Mapping[str, str],
) -> PublishedPartition:
    """Stage ``table``, check the accounting, then publish ``root/dt=<partition>`` atomically.

    Args:
        spark: the session.
        root: the feature table's root (any filesystem Hadoop knows).
        partition: the partition name (a day or a split).
        table: the rows, laid out as they are to be written (one file per partition of the
            DataFrame, at most ``output.rows_per_row_group`` rows each).
        quarantine: the rejected records, with a ``log`` column (the quarantine's partitions).
        stats: the partition's stats, or a callable that returns them, invoked once after the
            table is written (so it may read the ``Observation``s of the write).
        fields: the field list the table must follow.
        output: row group size and Parquet block size.
        table_outputs: ``{log: table count}`` for :func:`features.stats.conservation_problems`.

    Returns:
        Where the partition, its quarantine and its stats were published, and the stats.

    Raises:
        SchemaError: the table's schema is not the contract's (nothing is written).
        AccountingError: the stats violate a conservation rule (nothing is published, the
            staging folder is deleted).
    """
    root = root.rstrip("/")
    where = f"the table for {partition_dir(root, partition)}"
    try:
        schema = to_arrow_schema(table.schema)
    except TypeError as exc:  # a Spark type with no Arrow equivalent
        raise SchemaError(f"{where} cannot be converted to Arrow: {exc}") from None
    try:
        check_table_schema(schema, fields, where)
    except SchemaError as exc:
        raise SchemaError(f"{exc}; nothing is published") from None

    run = staging_dir(root, f"{partition}-{uuid.uuid4().hex[:8]}")
    try:
        (
            table.write.option("maxRecordsPerFile", output.rows_per_row_group)
            .option("parquet.block.size", output.parquet_block_size_bytes)
            .mode("overwrite")
            .parquet(f"{run}/table")
        )
        partition_stats = dict(stats() if callable(stats) else stats)
        problems = conservation_problems(partition_stats, table_outputs)
        if problems:
            raise AccountingError(f"{partition}: " + "; ".join(problems), partition)
        # The stats know how many records the quarantine holds: files sized like the table's,
        # not one (mostly empty) file per task of the frames it unions.
        held = sum(counts["quarantined"] for counts in partition_stats["logs"].values())
        files = max(1, math.ceil(held / output.rows_per_row_group))
        quarantine.coalesce(files).write.mode("overwrite").partitionBy("log").parquet(
            f"{run}/quarantine"
        )
        text = json.dumps(partition_stats, indent=2, sort_keys=True)
        io.write_text(spark, f"{run}/stats.json", text)
    except BaseException:
        # Nothing was published yet: the staging folder only holds this run's files.
        with contextlib.suppress(Exception):
            io.delete(spark, run)
        raise

    paths = io.publish_partition(spark, run, root, partition)
    return PublishedPartition(
        partition=partition,
        table_path=paths.table,
        quarantine_path=paths.quarantine,
        stats_path=paths.stats,
        stats=partition_stats,
    )
