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
import datetime as dt
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # plain local runs; a cluster ships the code via --py-files
    sys.path.insert(0, str(PROJECT_ROOT))

from contract.config import ConfigError, add_override_argument, load_config  # noqa: E402
from contract.dates import DateError, parse_day  # noqa: E402
from features.cli import UsageError, die  # noqa: E402
from features.config import SimulatorConfig, SimulatorPreset  # noqa: E402

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

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


@dataclass(frozen=True)
class Plan:
    """The validated inputs of a run."""

    start: dt.date
    days: int
    preset: SimulatorPreset
    out: str


@dataclass(frozen=True)
class Result:
    """What a run wrote: the output root and the oracle's rates over all days."""

    out: str
    impressions: int
    ctr: float
    cvr_given_click: float
    entire_space_cvr: float


def check_args(args: argparse.Namespace) -> Plan:
    """Everything that can be checked before Spark starts; UsageError otherwise."""
    try:
        start = parse_day(args.start_date, "--start-date")
        if args.days < 1:
            raise UsageError(f"--days must be >= 1, got {args.days}")
        config = load_config(args.config, SimulatorConfig, args.overrides)
        preset = config.preset(args.preset)
    except (DateError, ConfigError) as exc:
        raise UsageError(str(exc)) from None
    except KeyError as exc:
        raise UsageError(str(exc).strip("'\"")) from None
    return Plan(start=start, days=args.days, preset=preset, out=args.out.rstrip("/"))


def run(spark: SparkSession, args: argparse.Namespace, plan: Plan | None = None) -> Result:
    """Simulate the days of ``args`` with ``spark`` and write every log, snapshot and oracle
    (``plan`` is :func:`check_args`' result when the caller has it already)."""
    from features.simulator import simulate

    plan = plan or check_args(args)
    logs = simulate(
        spark, plan.preset, plan.start, plan.days, args.seed, partitions=args.partitions
    )
    for name in ("impressions", "clicks", "conversions"):
        getattr(logs, name).write.mode("overwrite").partitionBy("dt").text(f"{plan.out}/{name}")
    for name in ("users", "items", "oracle"):
        getattr(logs, name).write.mode("overwrite").partitionBy("dt").parquet(f"{plan.out}/{name}")
    oracle = spark.read.parquet(f"{plan.out}/oracle")
    rates = oracle.agg({"click": "avg", "conversion_if_clicked": "avg", "*": "count"}).first()
    clicked = oracle.where("click = 1").agg({"conversion_if_clicked": "avg"}).first()[0]
    return Result(
        out=plan.out,
        impressions=rates["count(1)"],
        ctr=rates["avg(click)"],
        cvr_given_click=clicked or 0.0,
        entire_space_cvr=rates["avg(conversion_if_clicked)"],
    )


def main(argv: list[str] | None = None) -> int:
    """Validate the arguments, simulate, write, print a summary."""
    args = parse_args(argv)
    try:
        plan = check_args(args)
    except UsageError as exc:
        die(PROG, str(exc))

    from features.spark import get_spark

    began = time.perf_counter()
    spark = get_spark("esmm-generate-logs", master=args.master or "local[*]", shuffle_partitions=8)
    try:
        result = run(spark, args, plan)
    finally:
        spark.stop()
    print(
        f"{PROG}: preset={args.preset} seed={args.seed} days={args.days} from {plan.start}: "
        f"{result.impressions} impressions, CTR={result.ctr:.4f}, "
        f"CVR|click={result.cvr_given_click:.4f}, "
        f"entire-space CVR={result.entire_space_cvr:.4f} "
        f"→ {result.out}/{{impressions,clicks,conversions,users,items,oracle}}/dt=… "
        f"in {time.perf_counter() - began:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
