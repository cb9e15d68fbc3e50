"""Days of the feature job, end to end: read → transforms → checks → atomic write.

:func:`build_days` is what ``jobs/build_features.py`` calls; :func:`build_day` is the same
for one day. They hold the order of the steps and the reads, while the rules live in
:mod:`features.transforms` and the staging, accounting check and publishing in
:func:`features.publish.stage_and_publish`.

What a day reads, and how often (docs/DATA.md, "Where the time goes"):

- its impressions: the lines counted once (text), then parsed twice (JSON), once for
  attribution (which keeps only the few % of records that clicks name, or that are bad) and
  once for the table;
- the click and conversion folders of its windows: read by one reader per log for the whole
  run (all of the run's days' folders at once) and kept, so a backfill of N days reads each
  folder once, not up to 2 × horizon + 1 times;
- the look-back days' impression ids (ownership of late clicks): from those days' published
  tables where they exist (one Parquet column), parsed from the raw logs otherwise;
- its profile snapshots.

Each step names its Spark jobs (``build <day>: <step>``), in the Spark UI and the event log.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from pyspark import StorageLevel
from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F

from contract.fields import FieldsConfig
from contract.layout import partition_dir
from contract.schema import IMPRESSION_ID, PARTITION
from features import io, publish, stats, transforms
from features.config import FeaturesConfig
from features.publish import InputError, PublishedPartition
from features.raw import count_lines, read_blank_lines, read_log, record_text

__all__ = ["build_day", "build_days"]

KEEP = StorageLevel.MEMORY_AND_DISK


@contextlib.contextmanager
def _step(spark: SparkSession, day: str, name: str) -> Iterator[None]:
    """Name the Spark jobs started inside (``build <day>: <name>``)."""
    spark.sparkContext.setJobDescription(f"build {day}: {name}")
    try:
        yield
    finally:
        spark.sparkContext.setJobDescription(None)  # type: ignore[arg-type]


def _existing(spark: SparkSession, raw: str, log: str, days: list[str]) -> dict[str, str]:
    folders = {d: f"{raw}/{log}/dt={d}" for d in days}
    return {d: p for d, p in folders.items() if io.exists(spark, p)}


def _check_inputs(spark: SparkSession, raw: str, day: str, config: FeaturesConfig) -> None:
    impressions_folder = f"{raw}/impressions/dt={day}"
    if not io.exists(spark, impressions_folder):
        raise InputError(f"no impressions for {day}: {impressions_folder} does not exist")
    for log in config.profiles:
        path = f"{raw}/{log}/dt={day}"
        if not io.exists(spark, path):
            raise InputError(f"no {log} snapshot for {day}: {path} does not exist")


def _event_days(day: str, horizon: int) -> tuple[list[str], list[str]]:
    """The click folder days (``day - h .. day + h``) and conversion folder days
    (``day .. day + h``) that the build of ``day`` reads."""
    return (
        transforms.days_around(day, horizon, horizon),
        transforms.days_around(day, 0, horizon),
    )


class _EventLogs:
    """The click and conversion records of a run's days, read once and kept.

    The folders read are the union of each day's (:func:`_event_days`; for the days
    ``S .. E`` of a run, click folders ``S - h .. E + h`` and conversion folders
    ``S .. E + h``), one reader per log. A day's records are a filter on ``folder_dt`` of the
    kept frames.
    """

    def __init__(self, spark: SparkSession, raw: str, days: list[str], horizon: int):
        self.horizon = horizon
        windows = [_event_days(day, horizon) for day in days]
        click_days = sorted({d for clicks, _ in windows for d in clicks})
        conversion_days = sorted({d for _, conversions in windows for d in conversions})
        self.click_folders = _existing(spark, raw, "clicks", click_days)
        self.conversion_folders = _existing(spark, raw, "conversions", conversion_days)
        with _step(spark, f"{days[0]}..{days[-1]}", "read clicks and conversions"):
            self.clicks = _materialize(read_log(spark, self.click_folders, "clicks").persist(KEEP))
            self.conversions = _materialize(
                read_log(spark, self.conversion_folders, "conversions").persist(KEEP)
            )

    def of(self, day: str) -> tuple[DataFrame, list[str], DataFrame, list[str]]:
        """Day ``day``'s click records, their folders, its conversion records, theirs."""
        click_days, conversion_days = _event_days(day, self.horizon)
        click_folders = sorted(d for d in click_days if d in self.click_folders)
        conversion_folders = sorted(d for d in conversion_days if d in self.conversion_folders)
        clicks = self.clicks.where(F.col("folder_dt").isin(click_folders))
        conversions = self.conversions.where(F.col("folder_dt").isin(conversion_folders))
        return clicks, click_folders, conversions, conversion_folders

    def unpersist(self) -> None:
        self.clicks.unpersist()
        self.conversions.unpersist()


def _lookback(
    spark: SparkSession, raw: str, out: str, day: str, horizon: int
) -> tuple[DataFrame | None, dict[str, str]]:
    """The valid impression ids of the ``horizon`` days before ``day`` (``folder_dt``,
    ``impression_id``), and where each day's came from (``table`` or ``raw``).

    A day whose table is published gives its ``impression_id`` column: the same ids as its
    raw folder's valid records (the table keeps one row per valid id), for the cost of one
    Parquet column instead of a JSON parse. The other days are parsed from their raw folder.
    """
    before = transforms.days_around(day, horizon, 0)[:-1]
    tables = {d: partition_dir(out, d) for d in before}
    tables = {d: p for d, p in tables.items() if io.exists(spark, p)}
    folders = _existing(spark, raw, "impressions", [d for d in before if d not in tables])
    frames = []
    if tables:
        published = (
            spark.read.schema(f"{IMPRESSION_ID} string, {PARTITION} string")
            .option("basePath", out)
            .parquet(*tables.values())
        )
        frames.append(published.select(F.col(PARTITION).alias("folder_dt"), IMPRESSION_ID))
    if folders:
        parsed = read_log(spark, folders, "impressions", blank_lines=False)
        frames.append(transforms.valid_ids(parsed))
    sources = {**dict.fromkeys(tables, "table"), **dict.fromkeys(folders, "raw")}
    if not frames:
        return None, sources
    return frames[0] if len(frames) == 1 else frames[0].unionByName(frames[1]), sources


def build_days(
    spark: SparkSession,
    raw: str,
    out: str,
    days: list[str],
    config: FeaturesConfig,
    fields: FieldsConfig,
    on_day: Callable[[PublishedPartition], None] | None = None,
) -> list[PublishedPartition]:
    """Build, check and publish the feature table of each of ``days``, in order.

    Every day's inputs are checked before any work starts. The click and conversion folders
    are read once for the whole run (see :class:`_EventLogs`); each day is published before
    the next one starts, which then reads its ids as look-back (:func:`_lookback`). The result
    equals one :func:`build_day` per day, run in order (tests/test_feature_job.py checks it).

    Args:
        on_day: called with each day's result once it is published.

    Raises:
        InputError: a day without impressions folder, with an empty one, or without a
            profile snapshot (nothing is built).
        AccountingError: input != output + quarantined + deduplicated for some log of a day,
            or another rule of :func:`features.stats.conservation_problems` fails; that day and
            the days after it are not published (the days before it are).
    """
    if not days:
        return []
    raw, out = raw.rstrip("/"), out.rstrip("/")
    for day in days:
        _check_inputs(spark, raw, day, config)
    events = _EventLogs(spark, raw, days, config.attribution.horizon_days)
    results = []
    try:
        for day in days:
            result = _build(spark, raw, out, day, config, fields, events)
            results.append(result)
            if on_day is not None:
                on_day(result)
    finally:
        events.unpersist()
    return results


def build_day(
    spark: SparkSession, raw: str, out: str, day: str, config: FeaturesConfig, fields: FieldsConfig
) -> PublishedPartition:
    """Build, check and publish the feature table of ``day`` (:func:`build_days` of one day).

    Raises:
        InputError: no impressions folder, an empty one, or a missing profile snapshot.
        AccountingError: as in :func:`build_days`; nothing is published then.
    """
    return build_days(spark, raw, out, [day], config, fields)[0]


def _build(
    spark: SparkSession,
    raw: str,
    out: str,
    day: str,
    config: FeaturesConfig,
    fields: FieldsConfig,
    events: _EventLogs,
) -> PublishedPartition:
    window = config.attribution
    horizon = window.horizon_days
    impressions_folder = f"{raw}/impressions/dt={day}"
    day_folder = {day: impressions_folder}
    with _step(spark, day, "count lines"):
        lines, blank_lines = count_lines(spark, impressions_folder)
    if lines == 0:
        raise InputError(f"no impressions for {day}: {impressions_folder} is empty")

    # The day is parsed twice, once per use (attribution, then the table): keeping one parse
    # in memory for both measured no faster at 2M impressions, for the memory of the whole day.
    impressions = read_log(spark, day_folder, "impressions", blank_lines=False)
    if blank_lines:
        # The JSON reader skips blank lines, which count_lines counted: their text is read
        # back only when there are some, to quarantine it.
        impression_blanks = read_blank_lines(spark, day_folder, "impressions")
        impressions = impressions.unionByName(impression_blanks)
    click_lines, click_folders, conversion_lines, conversion_folders = events.of(day)
    # Only the records attribution and the quarantine need (a few % of the day).
    with _step(spark, day, "impressions named by clicks"):
        narrow = _materialize(transforms.narrow_impressions(impressions, click_lines).persist(KEEP))
    named, quarantined_impressions = transforms.classify_impressions(narrow)

    lookback, lookback_sources = _lookback(spark, raw, out, day, horizon)
    with _step(spark, day, "attribute clicks"):
        clicks = transforms.attribute_clicks(
            click_lines,
            transforms.impression_lookup(named, day, lookback, click_lines),
            day,
            horizon,
            window.click_window_s,
        )
        clicks = _materialize(clicks.persist(KEEP))
    with _step(spark, day, "attribute conversions"):
        conversions = transforms.attribute_conversions(
            conversion_lines, clicks, day, horizon, window.conversion_window_s
        )
        conversions = _materialize(conversions.persist(KEEP))

    # The table. One row group per file: enough files for the rows (the line count bounds
    # them), and at least min_row_groups. The counts of the impressions and the table's stats
    # are observed while it is written (after the shuffle, so each task's values count once),
    # not computed by more passes.
    files = publish.file_count(lines, config.output)
    impression_seen = Observation("impressions")
    for_table = read_log(spark, day_folder, "impressions", blank_lines=False)
    ranked = transforms.rank_impressions(for_table, files).observe(
        impression_seen, *stats.impression_metrics()
    )
    labelled = transforms.label_impressions(
        transforms.deduplicate_impressions(ranked), clicks, conversions
    )
    profiles = {}
    for log, join in config.profiles.items():
        snapshot = spark.read.parquet(f"{raw}/{log}/dt={day}")
        hashed = transforms.hash_profile(snapshot, log, join.key, fields)
        profiles[log] = (F.broadcast(hashed) if join.broadcast else hashed, join.impression_key)
    table_seen = Observation("table")
    table = transforms.encode_features(labelled, profiles, fields).observe(
        table_seen, *stats.table_metrics(fields)
    )

    # The stats are read after the write (observed during it): stage_and_publish calls
    # day_stats then, and publishes nothing unless they pass the accounting check.
    def day_stats() -> dict[str, Any]:
        events_seen = stats.event_log_counts({"clicks": clicks, "conversions": conversions})
        return {
            "dt": day,
            "logs": {
                "impressions": stats.impression_counts(impression_seen.get, lines, blank_lines),
                **events_seen,
            },
            "table": stats.table_stats(table_seen.get, fields),
            "folders_read": {
                "impressions": [day, *sorted(lookback_sources)],
                "clicks": click_folders,
                "conversions": conversion_folders,
            },
            "lookback_from": dict(sorted(lookback_sources.items())),
            "attribution": window.model_dump(),
        }

    try:
        with _step(spark, day, "write and check"):
            return publish.stage_and_publish(
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
    finally:
        for frame in (narrow, clicks, conversions):
            frame.unpersist()


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
