"""The whole pipeline end to end on one machine with the embedded defaults (``make demo``).

    python -m esmm.demo --workdir var/demo

1. ``spark-submit jobs/generate_logs.py``: simulated raw logs (with dirt) + oracle;
2. ``spark-submit jobs/build_features.py``: the date-partitioned feature table, stats,
   quarantine;
3. ``horovodrun -np 2 --gloo python -m esmm.train``: ESMM trained on the first days,
   evaluated on the last, logged to MLflow (SQLite store in the work dir) and registered.

Each step is the same command a user runs by hand; the demo prints each one before running it.
"""

from __future__ import annotations

import argparse
import sys
from datetime import timedelta
from pathlib import Path

from contract import commands
from contract.config import add_override_argument
from contract.dates import DateError, day_range, parse_day

BIN = commands.BIN


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m esmm.demo",
        description="Run simulator → feature job → Horovod training → MLflow on this machine.",
    )
    parser.add_argument("--workdir", default="var/demo", help="where every output goes")
    parser.add_argument("--start-date", default="2026-01-01", help="first simulated day")
    parser.add_argument(
        "--days",
        type=int,
        default=4,
        help="feature days: all but the last train, the last evaluates",
    )
    parser.add_argument("--preset", default="demo", help="simulator preset (conf/simulator.yaml)")
    parser.add_argument("--np", type=int, default=2, help="Horovod workers")
    parser.add_argument("--seed", type=int, default=7, help="simulator seed")
    parser.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI (default: a SQLite store in the work dir)",
    )
    add_override_argument(
        parser,
        "training config override, passed to esmm.train (repeatable)",
    )
    args = parser.parse_args(argv)
    if args.days < 2:
        parser.error("--days must be at least 2 (train days + one evaluation day)")
    try:
        args.start_date = parse_day(args.start_date, "--start-date")
    except DateError as exc:
        parser.error(str(exc))
    return args


def run_step(title: str, command: list[str], env: dict[str, str]) -> float:
    """Run one pipeline step in the foreground; exit with its status if it fails."""
    try:
        return commands.run_step(title, command, env)
    except commands.StepFailed as exc:
        print(f"\nesmm.demo: {exc}", file=sys.stderr)
        sys.exit(exc.returncode)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir).resolve()
    raw, features = workdir / "raw", workdir / "features"
    store = workdir / "mlflow" / "mlflow.db"
    store.parent.mkdir(parents=True, exist_ok=True)
    days = day_range(args.start_date, args.start_date + timedelta(days=args.days - 1))

    tracking_uri = args.tracking_uri or f"sqlite:///{store}"
    env = commands.pipeline_env(tracking_uri)
    timings = {}
    # One day more of logs than of features: day D's late clicks/conversions land in D+1.
    simulate = commands.generate_logs_args(
        raw, days[0], args.days + 1, preset=args.preset, seed=args.seed
    )
    timings["simulate"] = run_step(
        "simulate raw logs", commands.spark_job(BIN, "generate_logs", simulate), env
    )
    build = commands.build_features_args(raw, features, days[0], days[-1])
    timings["features"] = run_step(
        "build feature tables", commands.spark_job(BIN, "build_features", build), env
    )
    train = commands.train_args(
        "conf/train.yaml",
        features,
        f"{days[0]}..{days[-2]}",
        days[-1],
        oracle=raw / "oracle",
        checkpoint_dir=workdir / "checkpoints",
        run_name="demo",
        sets=args.overrides,
    )
    timings["train"] = run_step(
        f"train ESMM with horovodrun -np {args.np}", commands.trainer(BIN, args.np, train), env
    )
    print(
        "\n=== demo finished in {:.0f}s ({})".format(
            sum(timings.values()), ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())
        )
    )
    print(f"raw logs + oracle:  {raw}")
    print(
        f"feature tables:     {features}/dt=YYYY-MM-DD/  (stats: {features}/_stats/, "
        f"quarantine: {features}/_quarantine/)"
    )
    print(f"checkpoints:        {workdir / 'checkpoints'}")
    print(f"MLflow tracking:    {tracking_uri}  (experiment 'esmm', run name 'demo')")
    if tracking_uri.startswith("sqlite:///"):
        print(
            f"Open MLflow:        {BIN / 'mlflow'} ui --backend-store-uri {tracking_uri} "
            "--port 5000   (then http://127.0.0.1:5000)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
