"""Build the ESMM feature table of one day (or a range of days) from the raw logs.

Example (local):

    PYSPARK_PYTHON=.venv/bin/python PYTHONPATH=. .venv/bin/spark-submit --driver-memory 4g \\
        jobs/build_features.py --raw var/raw --out var/features --date 2024-01-01

For each day D it reads D's impressions, the click / conversion folders the attribution
windows need, and D's user / item snapshots, and writes ``<out>/dt=D/`` (Parquet, the schema
of contract/schema.py), ``<out>/_quarantine/dt=D/log=<log>/`` and ``<out>/_stats/dt=D.json``,
each replaced atomically. Exit codes: 0 ok, 1 accounting check failed (nothing published for
that day), 2 bad arguments or inputs. See docs/DATA.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # plain local runs; a cluster ships the code via --py-files
    sys.path.insert(0, str(PROJECT_ROOT))

from contract.config import ConfigError, add_override_argument, load_config  # noqa: E402
from contract.dates import DateError, day_range, parse_day  # noqa: E402
from contract.fields import FieldsConfig  # noqa: E402
from features.cli import UsageError, die, is_local_path, local_dir_exists  # noqa: E402
from features.config import FeaturesConfig  # noqa: E402

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from features.publish import PublishedPartition

PROG = "build_features.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--help`` explains every option."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Turn a day of raw impression/click/conversion logs and profile snapshots "
        "into the ESMM feature table (one row per impression, click/conversion labels, hashed "
        "ids), with a quarantine of bad records and a stats file that accounts for every "
        "input record. Give --date for one day or --start-date/--end-date for a backfill: one "
        "run builds its days in order and reads each click and conversion folder once for all "
        "of them, so prefer it to one run per day.",
    )
    parser.add_argument("--raw", required=True, help="raw logs root (generate_logs.py --out)")
    parser.add_argument("--out", required=True, help="feature table root; writes <out>/dt=D/")
    parser.add_argument("--date", help="the day to build, YYYY-MM-DD")
    parser.add_argument("--start-date", help="first day of a backfill, YYYY-MM-DD")
    parser.add_argument("--end-date", help="last day of a backfill (inclusive), YYYY-MM-DD")
    parser.add_argument(
        "--config",
        default=str(PROJECT_ROOT / "conf/features.yaml"),
        help="feature job config (default conf/features.yaml)",
    )
    parser.add_argument(
        "--fields",
        default=str(PROJECT_ROOT / "conf/fields.yaml"),
        help="field list (default conf/fields.yaml)",
    )
    add_override_argument(
        parser,
        "override a key of --config, e.g. output.rows_per_row_group=50000",
    )
    parser.add_argument("--master", default=None, help="Spark master when not set by spark-submit")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Plan:
    """The validated inputs of a run."""

    days: list[str]
    config: FeaturesConfig
    fields: FieldsConfig


def _days(args: argparse.Namespace) -> list[str]:
    if args.date and (args.start_date or args.end_date):
        raise UsageError("give either --date or --start-date/--end-date, not both")
    if args.date:
        return [parse_day(args.date, "--date").isoformat()]
    if not (args.start_date and args.end_date):
        raise UsageError("give --date, or both --start-date and --end-date")
    start = parse_day(args.start_date, "--start-date")
    end = parse_day(args.end_date, "--end-date")
    if end < start:
        raise UsageError(f"--end-date {end} is before --start-date {start}")
    return day_range(start, end)


def check_args(args: argparse.Namespace) -> Plan:
    """Everything that can be checked before Spark starts; UsageError otherwise."""
    try:
        days = _days(args)
        config = load_config(args.config, FeaturesConfig, args.overrides)
        fields = load_config(args.fields, FieldsConfig)
    except (DateError, ConfigError) as exc:
        raise UsageError(str(exc)) from None
    if is_local_path(args.raw):
        if not local_dir_exists(args.raw):
            raise UsageError(f"--raw {args.raw} is not a directory")
        for day in days:
            if not local_dir_exists(f"{args.raw}/impressions/dt={day}"):
                raise UsageError(
                    f"no impressions for {day}: {args.raw}/impressions/dt={day} does not exist"
                )
    return Plan(days=days, config=config, fields=fields)


def run(
    spark: SparkSession,
    args: argparse.Namespace,
    plan: Plan | None = None,
    on_day: Callable[[PublishedPartition, float], None] | None = None,
) -> list[PublishedPartition]:
    """Build, check and publish every day of ``args`` with ``spark``, in order.

    ``plan`` is :func:`check_args`' result when the caller has it already;
    ``on_day(result, seconds)`` is called after each day is published. The session's
    shuffle partitions are the config's while the days build, and restored afterwards.

    Raises:
        UsageError: bad arguments, or inputs that are missing or empty.
        AccountingError: a day does not account for every input record; that day and the
            days after it are not published (the days before it are).
    """
    from features.pipeline import build_days
    from features.publish import InputError

    plan = plan or check_args(args)
    previous = spark.conf.get("spark.sql.shuffle.partitions")
    spark.conf.set("spark.sql.shuffle.partitions", str(plan.config.shuffle_partitions))
    began = time.perf_counter()

    def published(result: PublishedPartition) -> None:
        nonlocal began
        if on_day is not None:
            on_day(result, time.perf_counter() - began)
        began = time.perf_counter()

    try:
        return build_days(
            spark, args.raw, args.out, plan.days, plan.config, plan.fields, on_day=published
        )
    except InputError as exc:
        raise UsageError(str(exc)) from None
    finally:
        spark.conf.set("spark.sql.shuffle.partitions", previous)


def summary_line(result: PublishedPartition, seconds: float) -> str:
    """One line per built day: rows, label rates, counts per log and where it went."""
    logs, table = result.stats["logs"], result.stats["table"]
    counts = ", ".join(
        f"{log} in={c['input']} out={c['output']} quarantined={c['quarantined']} "
        f"dedup={c['deduplicated']}"
        for log, c in logs.items()
    )
    return (
        f"{PROG}: {result.partition}: {table['rows']} rows (CTR {table['ctr']:.4f}, "
        f"CVR {table['cvr']:.4f}, CTCVR {table['ctcvr']:.5f}) → {result.table_path}; {counts}; "
        f"quarantine {result.quarantine_path}; stats {result.stats_path}; {seconds:.1f}s"
    )


def main(argv: list[str] | None = None) -> int:
    """Validate everything that can be checked before Spark starts, then build each day."""
    args = parse_args(argv)
    try:
        plan = check_args(args)
    except UsageError as exc:
        die(PROG, str(exc))

    from features.publish import AccountingError
    from features.spark import get_spark

    spark = get_spark(
        "esmm-build-features",
        master=args.master or "local[*]",
        shuffle_partitions=plan.config.shuffle_partitions,
    )
    try:
        run(spark, args, plan, on_day=lambda result, seconds: print(summary_line(result, seconds)))
    except UsageError as exc:
        spark.stop()
        die(PROG, str(exc))
    except AccountingError as exc:
        spark.stop()
        die(PROG, f"accounting check failed, {exc}; nothing published for that day", code=1)
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
