"""The feature job against the job a user would write by hand, and a bare JSON → Parquet pass.

Simulates ``--days`` days of ``--impressions`` impressions (``demo`` preset otherwise), then
times, on the same session and data:

- **bare**: each day's impressions JSON read with a fixed schema and written as Parquet, the
  floor of any job over this data;
- **hand-written**: :func:`hand_written`, what a user would write without the project: the
  three JSON logs with their schemas, ``dropDuplicates`` on the event ids, the first click
  per impression in its window (a window function), the conversions of those clicks,
  broadcast joins of the user and item profiles, ``pmod(xxhash64(v), buckets - 1) + 1`` per
  field and per bag element, a Parquet write. No quarantine, no stats, no late-event
  ownership, no atomic publish;
- **project**: :func:`features.pipeline.build_days` over the days (one run), and with
  ``--days`` > 1 also one :func:`~features.pipeline.build_day` per day (N runs).

Every side runs once to warm up, then ``--rounds`` rounds time them back to back; each ratio
is the median of the per-round ratios (these machines are noisy: ratios, not seconds). The
per-step breakdown of the project's last round comes from the Spark event log (its jobs are
named ``build <day>: <step>``); "outside Spark jobs" is the driver's own time (planning, file
listing, Python).

    PYTHONPATH=. .venv/bin/python bench/features.py --impressions 2000000 --rounds 3
    PYTHONPATH=. .venv/bin/python bench/features.py --impressions 150000 --days 4 --rounds 3
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from pyspark.sql import DataFrame, SparkSession, Window
from pyspark.sql import functions as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contract.config import load_config  # noqa: E402
from contract.fields import FieldsConfig, FieldSpec  # noqa: E402
from features import io  # noqa: E402
from features.config import FeaturesConfig, SimulatorConfig  # noqa: E402
from features.pipeline import build_day, build_days  # noqa: E402
from features.raw import CLICK_SCHEMA, CONVERSION_SCHEMA, IMPRESSION_SCHEMA  # noqa: E402
from features.simulator import simulate  # noqa: E402
from features.spark import get_spark  # noqa: E402
from features.transforms import days_around  # noqa: E402

FIRST_DAY = dt.date(2024, 1, 1)


def _hash(value, spec: FieldSpec):
    return F.when(value.isNull(), F.lit(0).cast("long")).otherwise(
        (F.pmod(F.xxhash64(value.cast("string")), F.lit(spec.num_buckets - 1)) + 1).cast("long")
    )


def _encode(spec: FieldSpec, value):
    if spec.kind == "single":
        return _hash(value, spec)
    size = spec.max_len or 1
    ids = F.transform(F.slice(value, 1, size), lambda v: _hash(v, spec))
    ids = F.coalesce(ids, F.array().cast("array<bigint>"))
    return F.concat(ids, F.array_repeat(F.lit(0).cast("long"), F.lit(size) - F.size(ids)))


def hand_written(
    spark: SparkSession,
    raw: str,
    out: str,
    day: str,
    fields: FieldsConfig,
    config: FeaturesConfig,
) -> None:
    """The feature table of ``day`` as a user would write it by hand (see the module doc).

    Clicks and conversions are read from the day's folder and the ``horizon`` folders after
    it (late arrivals), as the project's job does."""
    window = config.attribution
    later = days_around(day, 0, window.horizon_days)

    def read(log: str, schema, days: list[str]) -> DataFrame:
        paths = [f"{raw}/{log}/dt={d}" for d in days if io.exists(spark, f"{raw}/{log}/dt={d}")]
        return spark.read.schema(schema).json(paths)

    impressions = read("impressions", IMPRESSION_SCHEMA, [day]).dropDuplicates(["impression_id"])
    clicks = read("clicks", CLICK_SCHEMA, later).dropDuplicates(["click_id"])
    conversions = read("conversions", CONVERSION_SCHEMA, later).dropDuplicates(["conversion_id"])
    shown = impressions.select("impression_id", F.col("ts").alias("imp_ts"))
    in_window = clicks.join(shown, "impression_id").where(
        (F.col("ts") >= F.col("imp_ts")) & (F.col("ts") - F.col("imp_ts") <= window.click_window_s)
    )
    first = Window.partitionBy("impression_id").orderBy("ts", "click_id")
    clicked = (
        in_window.withColumn("n", F.row_number().over(first))
        .where(F.col("n") == 1)
        .select("impression_id", "click_id", F.col("ts").alias("click_ts"))
    )
    converted = (
        conversions.join(clicked, "click_id")
        .where(
            (F.col("ts") >= F.col("click_ts"))
            & (F.col("ts") - F.col("click_ts") <= window.conversion_window_s)
        )
        .select("impression_id")
        .distinct()
        .withColumn("conversion", F.lit(1))
    )
    labels = clicked.select("impression_id", F.lit(1).alias("click")).join(
        converted, "impression_id", "left"
    )
    table = impressions.join(labels, "impression_id", "left").fillna(0, ["click", "conversion"])

    def source(spec: FieldSpec) -> tuple[str, str]:
        log, _, column = spec.source.partition(".")
        return log, column

    columns = []
    for log, key in (("users", "user_id"), ("items", "item_id")):
        specs = [s for s in fields.fields if source(s)[0] == log]
        profile = spark.read.parquet(f"{raw}/{log}/dt={day}").select(
            F.col(key).alias(f"_{log}_key"),
            *[_encode(s, F.col(source(s)[1])).alias(f"_f_{s.name}") for s in specs],
        )
        table = table.join(F.broadcast(profile), F.col(key) == F.col(f"_{log}_key"), "left")
    for spec in fields.fields:
        log, column = source(spec)
        if log == "impressions":
            columns.append(_encode(spec, F.col(column)).alias(spec.name))
        else:  # a user or item not in its snapshot gets id 0, as in the project's table
            missing = F.array_repeat(F.lit(0).cast("long"), spec.max_len or 1)
            zero = missing if spec.kind == "multi" else F.lit(0).cast("long")
            columns.append(F.coalesce(F.col(f"_f_{spec.name}"), zero).alias(spec.name))
    table = table.select(
        "impression_id", F.col("click").cast("int"), F.col("conversion").cast("int"), *columns
    )
    table.write.mode("overwrite").parquet(out)


def _union_s(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by ``(start_ms, end_ms)`` intervals (a broadcast job overlaps others)."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered / 1000


def _breakdown(event_dir: Path, window_ms: tuple[float, float]) -> dict[str, tuple[int, float]]:
    """``{step: (jobs, seconds)}`` of the project's jobs submitted within ``window_ms``; a
    step's seconds are the wall time its jobs cover (concurrent jobs count once)."""
    jobs: dict[int, list] = {}
    for log in event_dir.iterdir():
        for line in log.open(encoding="utf-8"):
            event = json.loads(line)
            kind = event["Event"]
            if kind == "SparkListenerJobStart":
                description = (event.get("Properties") or {}).get("spark.job.description") or ""
                jobs[event["Job ID"]] = [description, event["Submission Time"], None]
            elif kind == "SparkListenerJobEnd" and event["Job ID"] in jobs:
                jobs[event["Job ID"]][2] = event["Completion Time"]
    steps: dict[str, list] = collections.defaultdict(list)
    for description, start, end in jobs.values():
        if not window_ms[0] <= start <= window_ms[1] or end is None:
            continue
        if description.startswith("build "):
            steps[description.split(": ", 1)[-1]].append((start, end))
    breakdown = {step: (len(spans), _union_s(spans)) for step, spans in steps.items()}
    everything = [span for spans in steps.values() for span in spans]
    breakdown["all steps"] = (len(everything), _union_s(everything))
    return breakdown


def main() -> int:
    """Simulate, warm up, time the rounds, print the table and the breakdown."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impressions", type=int, default=2_000_000, help="impressions a day")
    parser.add_argument("--days", type=int, default=1, help="days built (default 1)")
    parser.add_argument("--preset", default="demo", help="simulator preset for everything else")
    parser.add_argument("--master", default="local[2]", help="Spark master (default local[2])")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--driver-memory", default="4g", help="local driver memory (default 4g)")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse the raw days already in --work-dir"
    )
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument(
        "--conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a Spark setting for the session, e.g. spark.sql.adaptive.enabled=false (repeatable)",
    )
    args = parser.parse_args()
    extra = dict(item.split("=", 1) for item in args.conf)
    # The local JVM reads its heap size at launch: the default 1g would make both sides spill.
    os.environ.setdefault(
        "PYSPARK_SUBMIT_ARGS", f"--driver-memory {args.driver_memory} pyspark-shell"
    )

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-features-"))
    raw, out, events = work / "raw", work / "features", work / "events"
    shutil.rmtree(events, ignore_errors=True)
    events.mkdir(parents=True)
    spark = get_spark(
        "bench-features",
        master=args.master,
        conf={
            "spark.eventLog.enabled": "true",
            "spark.eventLog.dir": str(events),
            "spark.ui.showConsoleProgress": "false",
            **extra,
        },
    )
    preset = load_config(
        ROOT / "conf/simulator.yaml",
        SimulatorConfig,
        [f"presets.{args.preset}.impressions_per_day={args.impressions}"],
    ).preset(args.preset)
    began = time.perf_counter()
    if not (args.reuse and (raw / "items").is_dir()):
        # One day more than built: the last day's late clicks and conversions land in it.
        logs = simulate(spark, preset, FIRST_DAY, args.days + 1, seed=0)
        for name in ("impressions", "clicks", "conversions"):
            getattr(logs, name).write.mode("overwrite").partitionBy("dt").text(str(raw / name))
        for name in ("users", "items"):
            getattr(logs, name).write.mode("overwrite").partitionBy("dt").parquet(str(raw / name))
    simulate_s = time.perf_counter() - began
    days = [(FIRST_DAY + dt.timedelta(days=d)).isoformat() for d in range(args.days)]
    config = load_config(ROOT / "conf/features.yaml", FeaturesConfig)
    fields = load_config(ROOT / "conf/fields.yaml", FieldsConfig)
    spark.conf.set("spark.sql.shuffle.partitions", str(config.shuffle_partitions))

    def timed(run) -> float:
        start = time.perf_counter()
        run()
        return time.perf_counter() - start

    def bare() -> None:
        for day in days:
            frame = spark.read.schema(IMPRESSION_SCHEMA).json(
                str(raw / "impressions" / f"dt={day}")
            )
            frame.write.mode("overwrite").parquet(str(work / "bare" / day))

    def by_hand() -> None:
        for day in days:
            hand_written(spark, str(raw), str(work / "by-hand" / day), day, fields, config)

    def project() -> None:
        shutil.rmtree(out, ignore_errors=True)
        build_days(spark, str(raw), str(out), days, config, fields)

    def project_day_by_day() -> None:
        shutil.rmtree(out, ignore_errors=True)
        for day in days:
            build_day(spark, str(raw), str(out), day, config, fields)

    sides = {"bare": bare, "hand-written": by_hand, "project": project}
    if len(days) > 1:
        sides["project, one run per day"] = project_day_by_day
    for run in sides.values():  # warm-up: JIT and file cache, for every side
        run()
    rounds: list[dict[str, float]] = []
    last_project_ms = (0.0, 0.0)
    for _ in range(args.rounds):
        times = {}
        for name, run in sides.items():
            start_ms = time.time() * 1000
            times[name] = timed(run)
            if name == "project":
                last_project_ms = (start_ms, time.time() * 1000)
        rounds.append(times)
    lines = json.loads((out / "_stats" / f"dt={days[0]}.json").read_text())["logs"]
    spark.stop()  # flushes the event log

    impressions = lines["impressions"]["input"] * len(days)
    print(
        f"\n{len(days)} day(s), ~{impressions:,} impression lines in all "
        f"(simulated in {simulate_s:.1f}s), master {args.master}, median of {args.rounds} rounds"
    )
    print(f"{'side':28} {'seconds':>8} {'/ hand-written':>15} {'/ bare':>8}   rounds / hand")
    for name in sides:
        seconds = statistics.median(r[name] for r in rounds)
        to_hand = sorted(r[name] / r["hand-written"] for r in rounds)
        to_bare = statistics.median(r[name] / r["bare"] for r in rounds)
        spread = f"{to_hand[0]:.2f}-{to_hand[-1]:.2f}"
        print(
            f"{name:28} {seconds:8.1f} {statistics.median(to_hand):14.2f}x "
            f"{to_bare:7.2f}x   {spread}"
        )
    steps = _breakdown(events, last_project_ms)
    total = rounds[-1]["project"]
    print(f"\nproject, last round ({total:.1f}s), by step (Spark jobs named build <day>: <step>)")
    print(f"{'step':36} {'jobs':>5} {'seconds':>8}")
    in_jobs = steps.pop("all steps", (0, 0.0))
    for step, (n, seconds) in sorted(steps.items(), key=lambda kv: -kv[1][1]):
        print(f"{step:36} {n:5d} {seconds:8.1f}")
    print(f"{'all steps':36} {in_jobs[0]:5d} {in_jobs[1]:8.1f}")
    print(f"{'outside Spark jobs (driver)':36} {'':5} {total - in_jobs[1]:8.1f}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
