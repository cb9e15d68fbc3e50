"""Online serving latency and batch scoring throughput of a registered ESMM model.

Registers an ESMM pyfunc with the shipped field list (production-sized id spaces; untrained
weights cost the same to evaluate), serves it with ``mlflow models serve --env-manager local``
(the command of docs/OPERATIONS.md) on 127.0.0.1 and times, after a warm-up:

- p50 / p99 latency of ``POST /invocations`` with 1 and with 100 feature rows;
- the same rows through the loaded pyfunc in this process (no HTTP, no JSON): the baseline,
  so the table's ratios show what the server adds;
- rows/s of the batch scorer (``spark-submit jobs/score.py``, whole job, JVM start included)
  over a day of ``--batch-rows`` rows, against the served rows/s at 100 rows a request.

    PYTHONPATH=. .venv/bin/python bench/serving.py --requests 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import make_table, print_table, shipped_fields  # noqa: E402
from contract import commands  # noqa: E402
from tests.feature_fixtures import register_untrained_model  # noqa: E402
from tests.helpers import VENV_BIN, post_json, run_command, start_model_server  # noqa: E402

MODEL = "models:/bench@champion"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="timed requests per size")
    parser.add_argument("--batch-rows", type=int, default=200_000, help="rows the scorer scores")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()

    import mlflow
    import pyarrow.parquet as pq

    from tests.test_score import feature_records

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-serving-"))
    fields = shipped_fields()
    (day,) = make_table(work / "features", args.batch_rows)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    version = register_untrained_model(uri, "bench", fields)
    mlflow.MlflowClient(tracking_uri=uri).set_registered_model_alias("bench", "champion", version)
    frame = pq.read_table(work / "features" / f"dt={day}").slice(0, 1000).to_pandas()
    records = feature_records(frame, fields)

    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(MODEL)
    sizes = (1, 100)
    rows = []
    with start_model_server(MODEL, uri, work / "server") as url:
        for size in sizes:
            bodies = [
                {"dataframe_records": records[(i * size) % 900 : (i * size) % 900 + size]}
                for i in range(args.requests)
            ]
            for body in bodies[:10]:  # warm-up
                post_json(f"{url}/invocations", body)
            served = []
            for body in bodies:
                began = time.perf_counter()
                status, answer = post_json(f"{url}/invocations", body)
                served.append(time.perf_counter() - began)
                if status != 200:
                    raise SystemExit(f"the server answered {status}: {answer}")
            local = []
            for body in bodies:
                batch = frame.iloc[: len(body["dataframe_records"])]
                began = time.perf_counter()
                model.predict(batch)
                local.append(time.perf_counter() - began)
            p50, p99 = percentile(served, 50), percentile(served, 99)
            rows.append(
                [
                    size,
                    f"{1000 * p50:.1f}",
                    f"{1000 * p99:.1f}",
                    f"{1000 * statistics.median(local):.1f}",
                    f"{p50 / statistics.median(local):.1f}x",
                    f"{size / statistics.mean(served):,.0f}",
                ]
            )
    served_rows_per_s = 100 / statistics.mean(served)
    print_table(
        f"Online: mlflow models serve, {args.requests} requests per size (ms)",
        ["rows/request", "p50", "p99", "in-process p50", "p50 vs in-process", "rows/s"],
        rows,
    )

    command = commands.spark_job(
        VENV_BIN,
        "score",
        commands.score_args(work / "features", day, MODEL, work / "predictions"),
    )
    began = time.perf_counter()
    result = run_command(command, env={"MLFLOW_TRACKING_URI": uri}, timeout=1800)
    seconds = time.perf_counter() - began
    if result.returncode != 0:
        raise SystemExit(f"the batch scorer failed:\n{result.stderr[-3000:]}")
    batch_rows_per_s = args.batch_rows / seconds
    print_table(
        "Batch: spark-submit jobs/score.py (whole job, JVM start included)",
        ["rows", "seconds", "rows/s", "vs served at 100 rows/request"],
        [
            [
                args.batch_rows,
                f"{seconds:.1f}",
                f"{batch_rows_per_s:,.0f}",
                f"{batch_rows_per_s / served_rows_per_s:.1f}x",
            ]
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
