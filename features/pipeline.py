"""One day of the feature job, end to end: read → transforms → checks → atomic write.

:func:`build_day` is what ``jobs/build_features.py`` calls for each day; it holds the
order of the steps and the I/O, while the rules live in :mod:`features.transforms`.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from esmm.config import FieldsConfig
from esmm.schema import IMPRESSION_ID
from features import io, stats, transforms
from features.config import FeaturesConfig
from features.raw import LOG_SCHEMAS, parse_lines, read_lines

__all__ = ["AccountingError", "DayResult", "InputError", "build_day"]

LOGS = ("impressions", "clicks", "conversions")


class InputError(Exception):
    """The raw inputs of a day are missing or empty (a user error: exit code 2)."""


class AccountingError(Exception):
    """Input records are not all accounted for: the day is not published."""


@dataclass(frozen=True)
class DayResult:
    """What one day's build wrote."""

    day: str
    table_path: str
    quarantine_path: str
    stats_path: str
    stats: dict[str, Any]


def _existing(spark: SparkSession, raw: str, log: str, days: list[str]) -> dict[str, str]:
    folders = {d: f"{raw}/{log}/dt={d}" for d in days}
    return {d: p for d, p in folders.items() if io.exists(spark, p)}


def build_day(
    spark: SparkSession, raw: str, out: str, day: str, config: FeaturesConfig, fields: FieldsConfig
) -> DayResult:
    """Build, check and publish the feature table of ``day``.

    Raises:
        InputError: no impressions folder, an empty one, or a missing profile snapshot.
        AccountingError: input != output + quarantined + deduplicated for some log (nothing
            is published then).
    """
    raw, out = raw.rstrip("/"), out.rstrip("/")
    window = config.attribution
    horizon = window.horizon_days
    impressions_folder = f"{raw}/impressions/dt={day}"
    if not io.exists(spark, impressions_folder):
        raise InputError(f"no impressions for {day}: {impressions_folder} does not exist")
    profile_paths = {log: f"{raw}/{log}/dt={day}" for log in config.profiles}
    for log, path in profile_paths.items():
        if not io.exists(spark, path):
            raise InputError(f"no {log} snapshot for {day}: {path} does not exist")

    keep = StorageLevel.MEMORY_AND_DISK
    parsed = parse_lines(read_lines(spark, {day: impressions_folder}), LOG_SCHEMAS["impressions"])
    # Only quarantined lines need their raw text later: keeping it for every row would make
    # the cached day several times bigger.
    impressions = parsed.withColumn(
        "raw",
        F.when(
            F.col("malformed") | F.col(IMPRESSION_ID).isNull() | F.col("ts").isNull(), F.col("raw")
        ),
    ).persist(keep)
    valid, quarantined_impressions = transforms.classify_impressions(impressions)
    valid = valid.persist(keep)
    impression_counts = stats.impression_counts(impressions, valid, quarantined_impressions)
    if impression_counts["input"] == 0:
        raise InputError(f"no impressions for {day}: {impressions_folder} is empty")

    before = transforms.days_around(day, horizon, 0)[:-1]
    lookback_folders = _existing(spark, raw, "impressions", before)
    lookback = None
    if lookback_folders:
        lookback = parse_lines(read_lines(spark, lookback_folders), LOG_SCHEMAS["impressions"])
    days_of_impressions = transforms.impression_days(valid, day, lookback)

    click_folders = _existing(spark, raw, "clicks", transforms.days_around(day, horizon, horizon))
    clicks = transforms.attribute_clicks(
        parse_lines(read_lines(spark, click_folders), LOG_SCHEMAS["clicks"]),
        days_of_impressions,
        valid,
        day,
        horizon,
        window.click_window_s,
    ).persist(keep)
    conversion_folders = _existing(
        spark, raw, "conversions", transforms.days_around(day, 0, horizon)
    )
    conversions = transforms.attribute_conversions(
        parse_lines(read_lines(spark, conversion_folders), LOG_SCHEMAS["conversions"]),
        clicks,
        day,
        horizon,
        window.conversion_window_s,
    ).persist(keep)

    labelled = transforms.label_impressions(valid, clicks, conversions)
    profiles = {
        log: (
            transforms.hash_profile(spark.read.parquet(profile_paths[log]), log, join.key, fields),
            join.impression_key,
        )
        for log, join in config.profiles.items()
    }
    table = transforms.encode_features(labelled, profiles, fields)

    # The table is computed once, while it is written to the run's staging folder; its stats
    # are read back from the (columnar) staged files, and nothing is published before the
    # accounting check passes.
    run = f"{out}/_tmp/{day}-{uuid.uuid4().hex[:8]}"
    files = max(
        config.output.min_row_groups,
        math.ceil(impression_counts["output"] / config.output.rows_per_row_group),
    )
    (
        table.repartition(files, IMPRESSION_ID)
        .sortWithinPartitions(IMPRESSION_ID)
        .write.option("maxRecordsPerFile", config.output.rows_per_row_group)
        .option("parquet.block.size", config.output.parquet_block_size_bytes)
        .mode("overwrite")
        .parquet(f"{run}/table")
    )
    staged = spark.read.parquet(f"{run}/table")

    day_stats: dict[str, Any] = {
        "dt": day,
        "logs": {
            "impressions": impression_counts,
            "clicks": stats.event_log_counts(clicks),
            "conversions": stats.event_log_counts(conversions),
        },
        "table": stats.table_stats(staged, fields),
        "folders_read": {
            "impressions": [day, *sorted(lookback_folders)],
            "clicks": sorted(click_folders),
            "conversions": sorted(conversion_folders),
        },
        "attribution": window.model_dump(),
    }
    problems = stats.conservation_problems(day_stats)
    if problems:
        io.delete(spark, run)
        raise AccountingError(f"{day}: " + "; ".join(problems))
    _quarantine(quarantined_impressions, clicks, conversions).write.mode("overwrite").partitionBy(
        "log"
    ).parquet(f"{run}/quarantine")
    io.write_text(spark, f"{run}/stats.json", json.dumps(day_stats, indent=2, sort_keys=True))

    paths = io.publish_partition(spark, run, out, day)
    result = DayResult(
        day=day,
        table_path=paths.table,
        quarantine_path=paths.quarantine,
        stats_path=paths.stats,
        stats=day_stats,
    )
    for frame in (impressions, valid, clicks, conversions):
        frame.unpersist()
    return result


def _quarantine(impressions: DataFrame, clicks: DataFrame, conversions: DataFrame) -> DataFrame:
    """Every quarantined record of the day: ``log``, ``reason``, ``folder_dt``, ``raw``."""
    columns = ["reason", "folder_dt", "raw"]
    parts = [
        impressions.select(F.lit("impressions").alias("log"), *columns),
        clicks.where(F.col("owned") & (F.col("status") == transforms.QUARANTINED)).select(
            F.lit("clicks").alias("log"), *columns
        ),
        conversions.where(F.col("owned") & (F.col("status") == transforms.QUARANTINED)).select(
            F.lit("conversions").alias("log"), *columns
        ),
    ]
    return parts[0].unionByName(parts[1]).unionByName(parts[2])
