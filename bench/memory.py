"""Peak memory of a training run on 1x and 10x the data: streaming must not grow with it.

    .venv/bin/python -m bench.memory [--rows 100000]

Trains the real trainer (one process, one epoch) on N and 10·N training rows, evaluating on
the same small day both times, and prints the peak RSS of each run and their ratio
(target: 10x / 1x <= 1.2).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import PROJECT_ROOT, make_table, print_table

# Runs the trainer as a child and prints the child's peak RSS (ru_maxrss is in KiB on Linux).
_MEASURE = (
    "import resource, subprocess, sys; "
    "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def peak_rss_mib(features: Path, train_day: str, eval_day: str, workdir: Path) -> float:
    command = [
        sys.executable,
        "-m",
        "esmm.train",
        "--features",
        str(features),
        "--train-dates",
        train_day,
        "--eval-date",
        eval_day,
        "--no-progress",
        "--checkpoint-dir",
        str(workdir / "ckpt"),
        "--set",
        "epochs=1",
        "--set",
        "tracking.log_model=false",
        "--set",
        "tracking.registered_model_name=null",
    ]
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
        "PYTHONPATH": str(PROJECT_ROOT),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, *command],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="training rows at 1x")
    args = parser.parse_args()
    results = []
    for scale in (1, 10):
        with tempfile.TemporaryDirectory(prefix=f"bench-mem-{scale}x-") as tmp:
            root = Path(tmp)
            train_root, eval_root = root / "train", root / "eval"
            (train_day,) = make_table(train_root, args.rows * scale, seed=1)
            (eval_day,) = make_table(eval_root, 20_000, seed=2)
            # one table root holding both partitions
            target = train_root / f"dt={eval_day.replace('03-01', '03-02')}"
            (eval_root / f"dt={eval_day}").rename(target)
            results.append((scale, peak_rss_mib(train_root, train_day, target.name[3:], root)))
    base = results[0][1]
    print_table(
        "peak RSS of one training epoch (1 process), eval day fixed at 20,000 rows",
        ["training rows", "peak RSS MiB", "vs 1x"],
        [[f"{args.rows * s:,} ({s}x)", f"{rss:,.0f}", f"{rss / base:.2f}"] for s, rss in results],
    )
    ratio = results[1][1] / base
    verdict = "OK" if ratio <= 1.2 else "ABOVE TARGET"
    print(f"\n10x / 1x = {ratio:.2f}  (target <= 1.20: {verdict})")


if __name__ == "__main__":
    main()
