"""Feature-job throughput against a bare Spark read+write of the same day.

Simulates one day (``--impressions``, default 2M, ``demo`` preset otherwise), then times
(a) a bare read of the impressions JSON with a fixed schema + Parquet write — the floor any
job over this data pays — and (b) the full feature job for that day (parse, quarantine,
dedup, attribution joins, profile joins, hashing, stats, atomic write). Prints impressions/s
for both and the ratio full/bare (goal: ≤ 3×). Ratios, not seconds: these machines are noisy.

Both sides are warmed up once, then timed back to back for ``--rounds`` rounds; the ratio is
the median of the per-round ratios. Each round also times the job's floor: one parse of the
day as the job parses it, and a write of the finished table's schema (the table read back
and written again). The job parses the day twice, so 2 parses + 1 table write is what it
cannot go below, whatever its joins cost.

    PYTHONPATH=. .venv/bin/python bench/features.py --impressions 2000000
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pyspark.sql import functions as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contract.config import load_config  # noqa: E402
from contract.fields import FieldsConfig  # noqa: E402
from features.config import FeaturesConfig, SimulatorConfig  # noqa: E402
from features.pipeline import build_day  # noqa: E402
from features.raw import IMPRESSION_SCHEMA, read_log  # noqa: E402
from features.simulator import simulate  # noqa: E402
from features.spark import get_spark  # noqa: E402

DAY = dt.date(2024, 1, 1)


def main() -> int:
    """Simulate, time the bare baseline and the full job, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=2_000_000, help="impressions in the day")
    parser.add_argument("--preset", default="demo", help="simulator preset for everything else")
    parser.add_argument("--master", default="local[2]", help="Spark master (default local[2])")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--driver-memory", default="4g", help="local driver memory (default 4g)")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse the raw day already in --work-dir"
    )
    parser.add_argument(
        "--rounds", type=int, default=2, help="timed rounds after the warm-up (default 2)"
    )
    args = parser.parse_args()
    # The local JVM reads its heap size at launch: the default 1g would make both sides spill.
    os.environ.setdefault(
        "PYSPARK_SUBMIT_ARGS", f"--driver-memory {args.driver_memory} pyspark-shell"
    )

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-features-"))
    raw, out = work / "raw", work / "features"
    spark = get_spark("bench-features", master=args.master, shuffle_partitions=8)
    preset = load_config(
        ROOT / "conf/simulator.yaml",
        SimulatorConfig,
        [f"presets.{args.preset}.impressions_per_day={args.impressions}"],
    ).preset(args.preset)
    began = time.perf_counter()
    if not (args.reuse and (raw / "items").is_dir()):
        logs = simulate(spark, preset, DAY, 1, seed=0)
        for name in ("impressions", "clicks", "conversions"):
            getattr(logs, name).write.mode("overwrite").partitionBy("dt").text(str(raw / name))
        for name in ("users", "items"):
            getattr(logs, name).write.mode("overwrite").partitionBy("dt").parquet(str(raw / name))
    simulate_s = time.perf_counter() - began

    day = DAY.isoformat()
    impressions_dir = str(raw / "impressions" / f"dt={day}")

    def bare() -> float:
        start = time.perf_counter()
        frame = spark.read.schema(IMPRESSION_SCHEMA).json(impressions_dir)
        frame.write.mode("overwrite").parquet(str(work / "bare"))
        return time.perf_counter() - start

    def full() -> tuple[float, int]:
        start = time.perf_counter()
        result = build_day(spark, str(raw), str(out), day, config, fields)
        return time.perf_counter() - start, result.stats["logs"]["impressions"]["input"]

    def parse() -> float:
        """One parse of the day as the job does it (every column, malformed lines kept)."""
        start = time.perf_counter()
        parsed = read_log(spark, {day: impressions_dir}, "impressions", blank_lines=False)
        parsed.agg(F.count(F.lit(1)), F.sum(F.xxhash64(*parsed.columns))).first()
        return time.perf_counter() - start

    def table_write() -> float:
        """Writing the job's output schema alone: the finished table read and written again."""
        start = time.perf_counter()
        table = spark.read.parquet(str(out / f"dt={day}"))
        table.write.mode("overwrite").parquet(str(work / "table-copy"))
        return time.perf_counter() - start

    config = load_config(ROOT / "conf/features.yaml", FeaturesConfig)
    fields = load_config(ROOT / "conf/fields.yaml", FieldsConfig)
    # Warm-up: one run of each side first, so that neither pays the JVM's JIT compilation and
    # the file cache in its timed runs (the full job touches many more code paths than the
    # bare one, so an unwarmed full run would be charged for compiling them). Then each round
    # times both sides back to back; the ratio is the median of the per-round ratios.
    bare()
    full()
    table_write()
    rounds = []
    for _ in range(args.rounds):
        bare_s = bare()
        full_s, lines = full()
        rounds.append((bare_s, full_s, parse(), table_write()))
    ratios = sorted(r[1] / r[0] for r in rounds)
    ratio = statistics.median(ratios)
    bare_s, full_s, parse_s, write_s = (statistics.median(r[i] for r in rounds) for i in range(4))
    rows = [
        ("bare read JSON + write Parquet", bare_s),
        ("full feature job", full_s),
        ("floor: one parse of the day", parse_s),
        ("floor: write the table alone", write_s),
    ]
    print(f"\n{lines:,} impression lines (simulated in {simulate_s:.1f}s), master {args.master}")
    step = f"step (median of {args.rounds} rounds)"
    print(f"{step:34} {'seconds':>8} {'impressions/s':>14}")
    for name, seconds in rows:
        print(f"{name:34} {seconds:8.1f} {lines / seconds:14,.0f}")
    spread = f"rounds {ratios[0]:.2f}-{ratios[-1]:.2f}"
    print(f"{'ratio full / bare (median)':34} {ratio:8.2f}x   {spread}   (goal <= 3x)")
    # The job cannot cost less than parsing the day twice (attribution needs the day before the
    # table can be labelled) and writing the table's schema (two 8-wide array columns).
    floor = (2 * parse_s + write_s) / bare_s
    print(f"{'floor (2 parses + table write)':34} {floor:8.2f}x   of the bare job")
    spark.stop()
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
