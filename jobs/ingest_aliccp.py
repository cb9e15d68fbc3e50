"""Ingest the Ali-CCP dataset (the ESMM paper's) into the feature table, one partition per split.

Example (local, from the folder holding the four unpacked .csv files):

    PYSPARK_PYTHON=.venv/bin/python PYTHONPATH=. .venv/bin/spark-submit --driver-memory 8g \\
        jobs/ingest_aliccp.py --input ~/aliccp --out var/aliccp/features

Reads ``sample_skeleton_{train,test}.csv`` and ``common_features_{train,test}.csv`` and writes
``<out>/dt=train/`` and ``<out>/dt=test/`` (Parquet, the schema of contract/schema.py),
``<out>/_quarantine/dt=<split>/log=<file>/`` and ``<out>/_stats/dt=<split>.json``, each
replaced atomically. Exit codes: 0 ok, 1 accounting check failed (that split is not
published), 2 bad arguments or inputs. See docs/ALICCP.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # plain local runs; a cluster ships the code via --py-files
    sys.path.insert(0, str(PROJECT_ROOT))

from contract.config import ConfigError, load_config  # noqa: E402
from contract.fields import FieldsConfig  # noqa: E402
from features.cli import UsageError, die, is_local_path, local_dir_exists, local_path  # noqa: E402

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
    parser.add_argument("--shuffle-partitions", type=int, default=None, help="Spark shuffle parts")
    parser.add_argument("--master", default=None, help="Spark master when not set by spark-submit")
    return parser.parse_args(argv)


def _check_inputs(args: argparse.Namespace, splits: list[str]) -> None:
    from features.aliccp import SPLITS, field_id, raw_file

    unknown = [s for s in splits if s not in SPLITS]
    if not splits or unknown:
        raise UsageError(f"--splits must name some of {', '.join(SPLITS)}, got '{args.splits}'")
    if args.rows_per_row_group < 1 or args.min_row_groups < 1:
        raise UsageError("--rows-per-row-group and --min-row-groups must be at least 1")
    fields = load_config(args.fields, FieldsConfig)
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


def main(argv: list[str] | None = None) -> int:
    """Validate everything that can be checked before Spark starts, then ingest each split."""
    args = parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    try:
        _check_inputs(args, splits)
        fields = load_config(args.fields, FieldsConfig)
    except (UsageError, ConfigError) as exc:
        die(PROG, str(exc))

    from features.aliccp import AccountingError, ingest_split, raw_file
    from features.io import exists
    from features.spark import get_spark

    spark = get_spark(
        "esmm-ingest-aliccp",
        master=args.master or "local[*]",
        shuffle_partitions=args.shuffle_partitions,
    )
    for key, value in SKEW_SETTINGS.items():
        spark.conf.set(key, value)
    missing = [
        raw_file(args.input, log, s)
        for s in splits
        for log in LOGS
        if not exists(spark, raw_file(args.input, log, s))
    ]
    if missing:  # remote inputs are only checked here
        spark.stop()
        die(PROG, f"missing raw file(s): {', '.join(missing)}")
    for split in splits:
        began = time.perf_counter()
        try:
            result = ingest_split(
                spark,
                args.input,
                args.out,
                split,
                fields,
                rows_per_row_group=args.rows_per_row_group,
                min_row_groups=args.min_row_groups,
            )
        except AccountingError as exc:
            spark.stop()
            die(PROG, f"accounting check failed, {exc}; nothing published for {split}", code=1)
        table = result.stats["table"]
        counts = "; ".join(
            f"{log} in={c['input']} out={c['output']} quarantined={c['quarantined']} "
            f"{c['quarantined_by']} dedup={c['deduplicated']}"
            for log, c in result.stats["logs"].items()
        )
        print(
            f"{PROG}: {split}: {table['rows']} rows (CTR {table['ctr']:.4f}, "
            f"CVR {table['cvr']:.4f}) → {result.table_path}; {counts}; "
            f"stats {result.stats_path}; {time.perf_counter() - began:.1f}s"
        )
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
