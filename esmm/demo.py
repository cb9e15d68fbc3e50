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
from datetime import date, timedelta
from pathlib import Path

from contract.config import add_override_argument
from esmm import launch

BIN = launch.BIN


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
    return args


def run_step(title: str, command: list[str], env: dict[str, str]) -> float:
    """Run one pipeline step in the foreground; exit with its status if it fails."""
    try:
        return launch.run_step(title, command, env)
    except launch.StepFailed as exc:
        print(f"\nesmm.demo: {exc}", file=sys.stderr)
        sys.exit(exc.returncode)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir).resolve()
    raw, features = workdir / "raw", workdir / "features"
    store = workdir / "mlflow" / "mlflow.db"
    store.parent.mkdir(parents=True, exist_ok=True)
    start = date.fromisoformat(args.start_date)
    days = [(start + timedelta(days=i)).isoformat() for i in range(args.days)]

    tracking_uri = args.tracking_uri or f"sqlite:///{store}"
    env = launch.pipeline_env(tracking_uri)
    spark_submit = launch.spark_submit()
    timings = {}
    # One day more of logs than of features: day D's late clicks/conversions land in D+1.
    timings["simulate"] = run_step(
        "simulate raw logs",
        [
            *spark_submit,
            "jobs/generate_logs.py",
            "--preset",
            args.preset,
            "--start-date",
            days[0],
            "--days",
            str(args.days + 1),
            "--seed",
            str(args.seed),
            "--out",
            str(raw),
        ],
        env,
    )
    timings["features"] = run_step(
        "build feature tables",
        [
            *spark_submit,
            "jobs/build_features.py",
            "--raw",
            str(raw),
            "--out",
            str(features),
            "--start-date",
            days[0],
            "--end-date",
            days[-1],
        ],
        env,
    )
    timings["train"] = run_step(
        f"train ESMM with horovodrun -np {args.np}",
        [
            *launch.horovodrun(args.np),
            "-m",
            "esmm.train",
            "--config",
            "conf/train.yaml",
            "--features",
            str(features),
            "--train-dates",
            f"{days[0]}..{days[-2]}",
            "--eval-date",
            days[-1],
            "--oracle",
            str(raw / "oracle"),
            "--checkpoint-dir",
            str(workdir / "checkpoints"),
            "--run-name",
            "demo",
            *launch.set_args(args.overrides),
        ],
        env,
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
