"""Peak memory of a training run on 1x and 10x the data: streaming must not grow with it.

    .venv/bin/python -m bench.memory [--rows 100000]

Trains the real trainer (one process, one epoch) on N and 10·N training rows, evaluating on
the same small day both times, and prints the peak RSS of each run (the trainer and its
input processes together) and their ratio (target: 10x / 1x <= 1.2).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import PROJECT_ROOT, make_table, print_table


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
    return _peak_tree_rss(command, env) / 2**20


def _peak_tree_rss(command: list[str], env: dict[str, str], every_s: float = 0.02) -> int:
    """Run ``command`` and return the peak, over samples every ``every_s``, of the summed RSS
    of it and all its descendants: the trainer, the server of its input processes and the
    input process itself (pages they share are counted in each, so this errs high)."""
    import psutil

    peak = 0
    with subprocess.Popen(
        command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    ) as trainer:
        root = psutil.Process(trainer.pid)
        while trainer.poll() is None:
            total = 0
            for process in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += process.memory_info().rss
            peak = max(peak, total)
            time.sleep(every_s)
        errors = trainer.stderr.read().decode(errors="replace")
    if trainer.returncode:
        raise RuntimeError(f"the trainer failed ({trainer.returncode}):\n{errors[-3000:]}")
    return peak


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
        "peak RSS of one training epoch (1 trainer + its input processes), eval day of 20,000 rows",
        ["training rows", "peak RSS MiB", "vs 1x"],
        [[f"{args.rows * s:,} ({s}x)", f"{rss:,.0f}", f"{rss / base:.2f}"] for s, rss in results],
    )
    ratio = results[1][1] / base
    verdict = "OK" if ratio <= 1.2 else "ABOVE TARGET"
    print(f"\n10x / 1x = {ratio:.2f}  (target <= 1.20: {verdict})")


if __name__ == "__main__":
    main()
