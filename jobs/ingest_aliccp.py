"""Ingest the Ali-CCP dataset (the ESMM paper's) into the feature table, one partition per split.

Example (local, from the folder holding the four unpacked .csv files):

    PYSPARK_PYTHON=.venv/bin/python PYTHONPATH=. .venv/bin/spark-submit --driver-memory 8g \\
        jobs/ingest_aliccp.py --input ~/aliccp --out var/aliccp/features

Reads ``sample_skeleton_{train,test}.csv`` and ``common_features_{train,test}.csv`` and writes
``<out>/dt=train/`` and ``<out>/dt=test/`` (Parquet, the schema of contract/schema.py),
``<out>/_quarantine/dt=<split>/log=<file>/`` and ``<out>/_stats/dt=<split>.json``, each
replaced atomically. Exit codes: 0 ok, 1 accounting check failed (that split is not
published), 2 bad arguments or inputs. See docs/ALICCP.md.

In-process (tests, notebooks): ``run(spark, parse_args([...]))`` ingests with a session the
caller owns and returns the published splits; :func:`main` is the command line around it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # plain local runs; a cluster ships the code via --py-files
    sys.path.insert(0, str(PROJECT_ROOT))

from contract.config import ConfigError, load_config  # noqa: E402
from contract.dates import DateError, parse_partitions  # noqa: E402
from contract.fields import FieldsConfig  # noqa: E402
from features.cli import UsageError, die, is_local_path, local_dir_exists, local_path  # noqa: E402
from features.config import OutputConfig  # noqa: E402

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from features.publish import PublishedPartition

PROG = "ingest_aliccp.py"
LOGS = ("sample_skeleton", "common_features")

# The common-feature join is skewed: a few common_feature_index values (heavy users) are
# shared by very many skeleton lines. Adaptive query execution splits an oversized
# skeleton-side shuffle partition into pieces, each joined with a copy of the matching
# common-feature partition (a left outer join may split its left side).
SKEW_SETTINGS = {
    "spark.sql.adaptive.enabled": "true",
    "spark.sql.adaptive.skewJoin.enabled": "true",
    "spark.sql.adaptive.skewJoin.skewedPartitionFactor": "4",
    "spark.sql.adaptive.skewJoin.skewedPartitionThresholdInBytes": "64MB",
    "spark.sql.adaptive.advisoryPartitionSizeInBytes": "64MB",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--help`` explains every option."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Turn the raw Ali-CCP files (sample skeleton + common features, train and "
        "test) into the ESMM feature table, partitions dt=train and dt=test, with a quarantine "
        "of bad lines and a stats file per split that accounts for every input line.",
    )
    parser.add_argument("--input", required=True, help="folder with the four raw .csv files")
    parser.add_argument("--out", required=True, help="feature table root; writes <out>/dt=SPLIT/")
    parser.add_argument(
        "--fields",
        default=str(PROJECT_ROOT / "conf/fields_aliccp.yaml"),
        help="field list (default conf/fields_aliccp.yaml)",
    )
    parser.add_argument(
        "--splits", default="train,test", help="splits to ingest, comma-separated (train,test)"
    )
    parser.add_argument(
        "--rows-per-row-group",
        type=int,
        default=100_000,
        help="rows per Parquet file / row group (Petastorm shards by row groups)",
    )
    parser.add_argument(
        "--min-row-groups",
        type=int,
        default=4,
        help="row groups per split at least, so that 2+ Horovod ranks each get some",
    )
    parser.add_argument(
        "--shuffle-partitions",
        type=int,
        default=None,
        help="spark.sql.shuffle.partitions while ingesting (default: the session's)",
    )
    parser.add_argument("--master", default=None, help="Spark master when not set by spark-submit")
    return parser.parse_args(argv)


@dataclass(frozen=True)
class Plan:
    """The validated inputs of a run."""

    input: str
    out: str
    splits: tuple[str, ...]
    fields: FieldsConfig
    output: OutputConfig


def check_args(args: argparse.Namespace) -> Plan:
    """Everything that can be checked before Spark starts; UsageError otherwise."""
    from features.aliccp import SPLITS, field_id, raw_file

    bad_splits = UsageError(f"--splits must name some of {', '.join(SPLITS)}, got '{args.splits}'")
    try:
        splits = tuple(parse_partitions(args.splits, "--splits"))
    except DateError:
        raise bad_splits from None
    if any(s not in SPLITS for s in splits):
        raise bad_splits
    if args.rows_per_row_group < 1 or args.min_row_groups < 1:
        raise UsageError("--rows-per-row-group and --min-row-groups must be at least 1")
    output = OutputConfig(
        rows_per_row_group=args.rows_per_row_group, min_row_groups=args.min_row_groups
    )
    if args.shuffle_partitions is not None and args.shuffle_partitions < 1:
        raise UsageError("--shuffle-partitions must be at least 1")
    try:
        fields = load_config(args.fields, FieldsConfig)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    for spec in fields.fields:
        try:
            field_id(spec)
        except ValueError as exc:
            raise UsageError(f"{args.fields}: {exc}") from None
    if is_local_path(args.input):
        if not local_dir_exists(args.input):
            raise UsageError(f"--input {args.input} is not a directory")
        missing = [
            raw_file(args.input, log, split)
            for split in splits
            for log in LOGS
            if not os.path.exists(local_path(raw_file(args.input, log, split)))
        ]
        if missing:
            raise UsageError(f"missing raw file(s): {', '.join(missing)}")
    return Plan(input=args.input, out=args.out, splits=splits, fields=fields, output=output)


def run(
    spark: SparkSession,
    args: argparse.Namespace,
    plan: Plan | None = None,
    on_split: Callable[[PublishedPartition, float], None] | None = None,
) -> list[PublishedPartition]:
    """Ingest, check and publish every split of ``args`` with ``spark``, in order.

    ``plan`` is :func:`check_args`' result when the caller has it already;
    ``on_split(result, seconds)`` is called after each split is published. The session's
    :data:`SKEW_SETTINGS` (and ``--shuffle-partitions`` when given) hold while the splits are
    ingested; the previous values are restored afterwards.

    Raises:
        UsageError: bad arguments, or a raw file that is missing (remote inputs are only
            checked here).
        AccountingError: a split does not account for every input line; that split and the
            splits after it are not published (the ones before it are).
    """
    from features.aliccp import ingest_split, raw_file
    from features.io import exists

    plan = plan or check_args(args)
    missing = [
        raw_file(plan.input, log, split)
        for split in plan.splits
        for log in LOGS
        if not exists(spark, raw_file(plan.input, log, split))
    ]
    if missing:
        raise UsageError(f"missing raw file(s): {', '.join(missing)}")
    settings = dict(SKEW_SETTINGS)
    if args.shuffle_partitions is not None:
        settings["spark.sql.shuffle.partitions"] = str(args.shuffle_partitions)
    previous = {key: spark.conf.get(key, None) for key in settings}
    results = []
    try:
        for key, value in settings.items():
            spark.conf.set(key, value)
        for split in plan.splits:
            began = time.perf_counter()
            result = ingest_split(spark, plan.input, plan.out, split, plan.fields, plan.output)
            results.append(result)
            if on_split is not None:
                on_split(result, time.perf_counter() - began)
    finally:
        for key, value in previous.items():
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)
    return results


def summary_line(result: PublishedPartition, seconds: float) -> str:
    """One line per ingested split: rows, label rates, counts per file and where it went."""
    table = result.stats["table"]
    counts = "; ".join(
        f"{log} in={c['input']} out={c['output']} quarantined={c['quarantined']} "
        f"{c['quarantined_by']} dedup={c['deduplicated']}"
        for log, c in result.stats["logs"].items()
    )
    return (
        f"{PROG}: {result.partition}: {table['rows']} rows (CTR {table['ctr']:.4f}, "
        f"CVR {table['cvr']:.4f}) → {result.table_path}; {counts}; "
        f"stats {result.stats_path}; {seconds:.1f}s"
    )


def main(argv: list[str] | None = None) -> int:
    """Validate everything that can be checked before Spark starts, then ingest each split."""
    args = parse_args(argv)
    try:
        plan = check_args(args)
    except UsageError as exc:
        die(PROG, str(exc))

    from features.publish import AccountingError
    from features.spark import get_spark

    spark = get_spark(
        "esmm-ingest-aliccp",
        master=args.master or "local[*]",
        shuffle_partitions=args.shuffle_partitions,
    )

    def report(result: PublishedPartition, seconds: float) -> None:
        print(summary_line(result, seconds), flush=True)

    try:
        run(spark, args, plan, on_split=report)
    except UsageError as exc:
        die(PROG, str(exc))
    except AccountingError as exc:
        split = exc.partition or "that split"
        die(PROG, f"accounting check failed, {exc}; nothing published for {split}", code=1)
    finally:
        spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
