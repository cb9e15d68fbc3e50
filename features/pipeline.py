"""One day of the feature job, end to end: read → transforms → checks → atomic write.

:func:`build_day` is what ``jobs/build_features.py`` calls for each day; it holds the
order of the steps and the reads, while the rules live in :mod:`features.transforms` and the
staging, accounting check and publishing in :func:`features.publish.stage_and_publish`.
"""

from __future__ import annotations

from typing import Any

from pyspark import StorageLevel
from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from contract.fields import FieldsConfig
from contract.schema import IMPRESSION_ID
from features import io, publish, stats, transforms
from features.config import FeaturesConfig
from features.publish import InputError, PublishedPartition
from features.raw import count_lines, read_log, record_text

__all__ = ["build_day"]

LOGS = ("impressions", "clicks", "conversions")


def _existing(spark: SparkSession, raw: str, log: str, days: list[str]) -> dict[str, str]:
    folders = {d: f"{raw}/{log}/dt={d}" for d in days}
    return {d: p for d, p in folders.items() if io.exists(spark, p)}


def build_day(
    spark: SparkSession, raw: str, out: str, day: str, config: FeaturesConfig, fields: FieldsConfig
) -> PublishedPartition:
    """Build, check and publish the feature table of ``day``.

    Raises:
        InputError: no impressions folder, an empty one, or a missing profile snapshot.
        AccountingError: input != output + quarantined + deduplicated for some log, or
            another rule of :func:`features.stats.conservation_problems` fails (nothing is
            published then).
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

    lines, blank_lines = count_lines(spark, impressions_folder)
    if lines == 0:
        raise InputError(f"no impressions for {day}: {impressions_folder} is empty")

    keep = StorageLevel.MEMORY_AND_DISK
    day_folder = {day: impressions_folder}
    # Blank lines, which the JSON reader skips, were counted above: pass 1 reads their text
    # back (to quarantine it) only when there are some, and the table's pass skips them.
    impressions = read_log(spark, day_folder, "impressions", blank_lines=blank_lines > 0)
    for_table = read_log(spark, day_folder, "impressions", blank_lines=False)
    click_folders = _existing(spark, raw, "clicks", transforms.days_around(day, horizon, horizon))
    # Filled now: left lazy, pass 1's broadcast jobs would each parse the click files.
    click_lines = _materialize(read_log(spark, click_folders, "clicks").persist(keep))
    # Pass 1 over the day: only the records attribution and the quarantine need (a few %).
    narrow = _materialize(transforms.narrow_impressions(impressions, click_lines).persist(keep))
    named, quarantined_impressions = transforms.classify_impressions(narrow)

    before = transforms.days_around(day, horizon, 0)[:-1]
    lookback_folders = _existing(spark, raw, "impressions", before)
    lookback = None
    if lookback_folders:
        lookback = read_log(spark, lookback_folders, "impressions").select(
            "folder_dt", IMPRESSION_ID, "ts", "malformed"
        )
    clicks = transforms.attribute_clicks(
        click_lines,
        transforms.impression_lookup(named, day, lookback, click_lines),
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

    # Pass 2 over the day: the table. One row group per file: enough files for the rows (the
    # line count bounds them), and at least min_row_groups. The counts of the impressions and
    # the table's stats are observed while it is written (after the shuffle, so each task's
    # values count once), not computed by more passes.
    files = publish.file_count(lines, config.output)
    impression_seen = Observation("impressions")
    ranked = transforms.rank_impressions(for_table, files).observe(
        impression_seen, *stats.impression_metrics()
    )
    labelled = transforms.label_impressions(
        transforms.deduplicate_impressions(ranked), clicks, conversions
    )
    profiles = {}
    for log, join in config.profiles.items():
        snapshot = spark.read.parquet(profile_paths[log])
        hashed = transforms.hash_profile(snapshot, log, join.key, fields)
        profiles[log] = (F.broadcast(hashed) if join.broadcast else hashed, join.impression_key)
    table_seen = Observation("table")
    table = transforms.encode_features(labelled, profiles, fields).observe(
        table_seen, *stats.table_metrics(fields)
    )

    # The stats are read after the write (observed during it): stage_and_publish calls
    # day_stats then, and publishes nothing unless they pass the accounting check.
    def day_stats() -> dict[str, Any]:
        return {
            "dt": day,
            "logs": {
                "impressions": stats.impression_counts(impression_seen.get, lines, blank_lines),
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

    result = publish.stage_and_publish(
        spark,
        out,
        day,
        table,
        _quarantine(quarantined_impressions, clicks, conversions),
        day_stats,
        fields,
        config.output,
        table_outputs=stats.DAILY_TABLE_OUTPUTS,
    )
    for frame in (narrow, click_lines, clicks, conversions):
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
