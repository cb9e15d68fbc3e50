"""One day of the feature job, end to end: read → transforms → checks → atomic write.

:func:`build_day` is what ``jobs/build_features.py`` calls for each day; it holds the
order of the steps and the I/O, while the rules live in :mod:`features.transforms`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from esmm.config import FieldsConfig
from esmm.schema import IMPRESSION_ID
from features import io, stats, transforms
from features.config import FeaturesConfig
from features.raw import count_lines, read_blank_lines, read_log, record_text

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
    impressions_folder = f"{raw}/impressions/dt={day}"
    if not io.exists(spark, impressions_folder):
        raise InputError(f"no impressions for {day}: {impressions_folder} does not exist")
    profile_paths = {log: f"{raw}/{log}/dt={day}" for log in config.profiles}
    for log, path in profile_paths.items():
        if not io.exists(spark, path):
            raise InputError(f"no {log} snapshot for {day}: {path} does not exist")

    with _stable_splits(spark):
        return _build_day(spark, raw, out, day, config, fields, profile_paths)


@contextmanager
def _stable_splits(spark: SparkSession) -> Iterator[None]:
    """Keep the day's input splits the same in every pass of the build.

    ``_row`` numbers each record by its input split, and both parses of the day must number
    the same record alike. Spark sizes splits from the cluster's current parallelism, which
    dynamic allocation may change between two passes; this pins it for the build (unless the
    user has set ``spark.sql.files.minPartitionNum``). The id checksum check would catch a
    mismatch, but it could only fail the day, not fix it.
    """
    key = "spark.sql.files.minPartitionNum"
    if spark.conf.get(key, None) is not None:
        yield
        return
    spark.conf.set(key, str(spark.sparkContext.defaultParallelism))
    try:
        yield
    finally:
        spark.conf.unset(key)


def _build_day(
    spark: SparkSession,
    raw: str,
    out: str,
    day: str,
    config: FeaturesConfig,
    fields: FieldsConfig,
    profile_paths: dict[str, str],
) -> DayResult:
    window = config.attribution
    horizon = window.horizon_days
    impressions_folder = f"{raw}/impressions/dt={day}"
    lines, blank_lines = count_lines(spark, impressions_folder)
    if lines == 0:
        raise InputError(f"no impressions for {day}: {impressions_folder} is empty")

    keep = StorageLevel.MEMORY_AND_DISK
    click_folders = _existing(spark, raw, "clicks", transforms.days_around(day, horizon, horizon))
    click_lines = _materialize(read_log(spark, click_folders, "clicks").persist(keep))

    # The day is parsed twice: once here, kept slim (ids, times, reasons, the quarantine's
    # text), for attribution, the deduplication and the counts; once for the table. Keeping the
    # whole parsed day costs more than parsing it again. Blank lines, which the JSON reader
    # skips, were counted above; their text is read back only when there are some.
    day_folder = {day: impressions_folder}
    tagged = transforms.tag_impressions(
        read_log(spark, day_folder, "impressions", blank_lines=False)
    )
    slim = _materialize(transforms.slim_impressions(tagged).persist(keep))
    repeats = _materialize(transforms.find_repeats(slim).persist(keep))
    numbered = transforms.number_copies(slim, repeats)
    impression_metrics = numbered.agg(*stats.impression_metrics()).first().asDict()
    quarantined_impressions = slim.where(F.col("reason").isNotNull()).select(
        "folder_dt", "raw", "reason"
    )
    if blank_lines:
        blank = read_blank_lines(spark, day_folder, "impressions")
        quarantined_impressions = quarantined_impressions.unionByName(
            transforms.classify_impressions(blank)[1]
        )

    before = transforms.days_around(day, horizon, 0)[:-1]
    lookback_folders = _existing(spark, raw, "impressions", before)
    lookback = None
    if lookback_folders:
        lookback = read_log(spark, lookback_folders, "impressions").select(
            "folder_dt", IMPRESSION_ID, "ts", "malformed"
        )
    valid_impressions = slim.where(F.col("reason").isNull())
    clicks = transforms.attribute_clicks(
        click_lines,
        transforms.impression_lookup(valid_impressions, day, lookback, click_lines),
        day,
        horizon,
        window.click_window_s,
    )
    clicks = _materialize(clicks.persist(keep))
    conversion_folders = _existing(
        spark, raw, "conversions", transforms.days_around(day, 0, horizon)
    )
    conversions = transforms.attribute_conversions(
        read_log(spark, conversion_folders, "conversions"),
        clicks,
        day,
        horizon,
        window.conversion_window_s,
    )
    conversions = _materialize(conversions.persist(keep))

    # The table, in the parsed records' order: no shuffle of the day. Files of at most
    # rows_per_row_group rows (one row group each), and at least min_row_groups of them
    # (every input split writes ceil(its rows / cap) files, and the caps sum to >= lines / cap).
    # The table's stats are observed while it is written, not computed by another pass.
    cap = max(1, min(config.output.rows_per_row_group, lines // config.output.min_row_groups))
    labelled = transforms.label_impressions(
        transforms.deduplicate_impressions(transforms.number_copies(tagged, repeats)),
        clicks,
        conversions,
    )
    profiles = {}
    for log, join in config.profiles.items():
        snapshot = spark.read.parquet(profile_paths[log])
        hashed = transforms.hash_profile(snapshot, log, join.key, fields)
        profiles[log] = (F.broadcast(hashed) if join.broadcast else hashed, join.impression_key)
    table_seen = Observation("table")
    table = transforms.encode_features(labelled, profiles, fields).observe(
        table_seen, *stats.table_metrics(fields), stats.id_checksum().alias("id_checksum")
    )

    # Nothing is published before the accounting check passes: the table goes to the run's
    # staging folder first.
    run = f"{out}/_tmp/{day}-{uuid.uuid4().hex[:8]}"
    (
        table.write.option("maxRecordsPerFile", cap)
        .option("parquet.block.size", config.output.parquet_block_size_bytes)
        .mode("overwrite")
        .parquet(f"{run}/table")
    )

    day_stats: dict[str, Any] = {
        "dt": day,
        "logs": {
            "impressions": stats.impression_counts(impression_metrics, lines, blank_lines),
            "clicks": stats.event_log_counts(clicks),
            "conversions": stats.event_log_counts(conversions),
        },
        "table": stats.table_stats(table_seen.get, fields),
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
    for frame in (slim, repeats, click_lines, clicks, conversions):
        frame.unpersist()
    return result


def _materialize(frame: DataFrame) -> DataFrame:
    """Fill a persisted frame's cache now. Left lazy, the table's write would compute it in
    several broadcast jobs at once, each one reading the day again."""
    frame.count()
    return frame


def _quarantine(impressions: DataFrame, clicks: DataFrame, conversions: DataFrame) -> DataFrame:
    """Every quarantined record of the day: ``log``, ``reason``, ``folder_dt``, ``raw``."""
    quarantined = F.col("owned") & (F.col("status") == transforms.QUARANTINED)
    parts = [
        impressions.select(F.lit("impressions").alias("log"), "reason", "folder_dt", "raw"),
        *[
            frame.where(quarantined).select(
                F.lit(log).alias("log"), "reason", "folder_dt", record_text(log).alias("raw")
            )
            for log, frame in (("clicks", clicks), ("conversions", conversions))
        ],
    ]
    return parts[0].unionByName(parts[1]).unionByName(parts[2])
