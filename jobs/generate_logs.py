"""Write synthetic raw logs, profile snapshots and the oracle table (the funnel simulator).

Example (local):

    PYSPARK_PYTHON=.venv/bin/python PYTHONPATH=. .venv/bin/spark-submit --driver-memory 4g \\
        jobs/generate_logs.py --preset demo --start-date 2024-01-01 --days 4 --out var/raw

Writes under ``--out``, one ``dt=YYYY-MM-DD`` folder per day: ``impressions/``, ``clicks/``,
``conversions/`` (JSON lines; late events land in the following days' folders),
``users/`` and ``items/`` (Parquet profile snapshots) and ``oracle/`` (Parquet ground truth:
impression_id, pctr, pcvr, click, conversion_if_clicked). See docs/DATA.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # plain local runs; a cluster ships the code via --py-files
    sys.path.insert(0, str(PROJECT_ROOT))

from contract.config import ConfigError, add_override_argument, load_config  # noqa: E402
from contract.dates import DateError, parse_day  # noqa: E402
from features.cli import UsageError, die  # noqa: E402
from features.config import SimulatorConfig  # noqa: E402

PROG = "generate_logs.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--help`` explains every option."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Simulate an impression → click → conversion funnel with known truth and "
        "write raw JSON-lines logs, Parquet profile snapshots and an oracle table per day.",
    )
    parser.add_argument("--start-date", required=True, help="first day, YYYY-MM-DD")
    parser.add_argument("--days", type=int, default=1, help="number of days (default 1)")
    parser.add_argument("--out", required=True, help="output root (local path or URI)")
    parser.add_argument("--preset", default="demo", help="preset of --config (tiny, demo, aliccp)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--config",
        default=str(PROJECT_ROOT / "conf/simulator.yaml"),
        help="simulator config (default conf/simulator.yaml)",
    )
    add_override_argument(
        parser,
        "override a config key, e.g. presets.demo.funnel.selection_bias=0.9",
    )
    parser.add_argument(
        "--partitions",
        type=int,
        default=None,
        help="Spark partitions of the generated range (output does not depend on it)",
    )
    parser.add_argument("--master", default=None, help="Spark master when not set by spark-submit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Validate the arguments, simulate, write, print a summary."""
    args = parse_args(argv)
    try:
        start = parse_day(args.start_date, "--start-date")
        if args.days < 1:
            raise UsageError(f"--days must be >= 1, got {args.days}")
        config = load_config(args.config, SimulatorConfig, args.overrides)
        preset = config.preset(args.preset)
    except (UsageError, DateError, ConfigError, KeyError) as exc:
        die(PROG, str(exc).strip("'\""))

    from features.simulator import simulate
    from features.spark import get_spark

    began = time.perf_counter()
    spark = get_spark("esmm-generate-logs", master=args.master or "local[*]", shuffle_partitions=8)
    logs = simulate(spark, preset, start, args.days, args.seed, partitions=args.partitions)
    out = args.out.rstrip("/")
    for name in ("impressions", "clicks", "conversions"):
        getattr(logs, name).write.mode("overwrite").partitionBy("dt").text(f"{out}/{name}")
    for name in ("users", "items", "oracle"):
        getattr(logs, name).write.mode("overwrite").partitionBy("dt").parquet(f"{out}/{name}")
    oracle = spark.read.parquet(f"{out}/oracle")
    rates = oracle.agg({"click": "avg", "conversion_if_clicked": "avg", "*": "count"}).first()
    clicked = oracle.where("click = 1").agg({"conversion_if_clicked": "avg"}).first()[0]
    print(
        f"{PROG}: preset={args.preset} seed={args.seed} days={args.days} from {start}: "
        f"{rates['count(1)']} impressions, CTR={rates['avg(click)']:.4f}, "
        f"CVR|click={clicked or 0.0:.4f}, "
        f"entire-space CVR={rates['avg(conversion_if_clicked)']:.4f} "
        f"→ {out}/{{impressions,clicks,conversions,users,items,oracle}}/dt=… "
        f"in {time.perf_counter() - began:.1f}s"
    )
    spark.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
