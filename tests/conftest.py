"""Fixtures every test uses: a local SparkSession, horovodrun, a real MLflow server.

- ``spark``: one session-scoped ``local[2]`` SparkSession (UI off, 4 shuffle partitions,
  quiet logs), built by the same :func:`features.spark.get_spark` the jobs use.
- ``small_data_spark``: the same session tuned for a handful of rows, per module
  (``pytestmark = pytest.mark.usefixtures("small_data_spark")``).
- ``run_horovod``: runs ``horovodrun -np 2 --gloo`` on a script and returns each rank's
  output (see :mod:`tests.helpers`).
- ``mlflow_server``: a real ``mlflow server`` on 127.0.0.1 over SQLite in a temp dir, started
  once per session and stopped at the end; yields its tracking URI.
- ``raw_logs``: ``raw_logs(preset="tiny", start_date="2026-01-02", days=4, seed=5)`` → the root
  of simulated raw logs, made by ``jobs/generate_logs.py``'s ``run`` on the shared session,
  once per set of arguments for the whole test session. Treat it as read-only.
- ``built_features``: ``built_features(raw, start_date, end_date)`` → the root of a feature
  table built from ``raw`` by ``jobs/build_features.py``'s ``run`` on the shared session, with
  the shipped configs, once per set of arguments. Treat it as read-only; copy it to change it.
- ``learnable_days``: ``(root, fields_file)`` of three small feature days written with pyarrow
  (:func:`tests.feature_fixtures.write_learnable_days`), for the trainer's tests. Read-only.
- ``localhost_training``: one ``horovodrun -np 2 -H localhost:2`` ESMM training on
  ``learnable_days`` (2 epochs, registered as ``esmm-it`` on ``mlflow_server``), shared by the
  trainer's end-to-end test and the multi-host test, which compares its metrics with it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from tests.helpers import (  # noqa: E402
    SHORT_LIVED_JVM_OPTIONS,
    HorovodResult,
    run_horovodrun,
    start_mlflow_server,
)

# Spark and torch each default to all cores; on 2-core CI, keep torch from oversubscribing.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Spark's Python workers (pandas UDFs, mlflow's spark_udf) must run the project's interpreter.
os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
# The tests' JVMs live seconds on a few thousand rows: the optimising JIT (C2) spends more
# CPU compiling than it saves. C1 only: 15 s → 9 s of CPU for a one-row spark-submit, 54 s →
# 33 s for a tiny day's build (docs/OPERATIONS.md "Tests"); results are the same.
# spark-submit, the session's launcher and spark-class's daemons (the test cluster) read
# these; subprocesses inherit them.
for _variable in ("SPARK_SUBMIT_OPTS", "SPARK_DAEMON_JAVA_OPTS"):
    os.environ.setdefault(_variable, SHORT_LIVED_JVM_OPTIONS)


@pytest.fixture(scope="session")
def spark():
    """A local SparkSession shared by the whole test session."""
    from features.spark import get_spark

    session = get_spark("esmm-tests", master="local[2]", shuffle_partitions=4)
    yield session
    session.stop()


@pytest.fixture(scope="module")
def small_data_spark(spark):
    """``spark`` tuned for a handful of rows (one shuffle partition, no whole-stage code
    generation), restored after the module; use with ``pytest.mark.usefixtures``."""
    settings = {"spark.sql.shuffle.partitions": "1", "spark.sql.codegen.wholeStage": "false"}
    previous = {k: spark.conf.get(k) for k in settings}
    for k, v in settings.items():
        spark.conf.set(k, v)
    yield spark
    for k, v in previous.items():
        spark.conf.set(k, v)


@pytest.fixture(scope="session")
def run_horovod() -> Callable[..., HorovodResult]:
    """``run_horovod(script, *args, np=2, env=None, timeout=300)`` → per-rank output."""
    return run_horovodrun


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real MLflow tracking + registry server on 127.0.0.1; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    with start_mlflow_server(root) as uri:
        yield uri


@pytest.fixture(scope="session")
def raw_logs(spark, tmp_path_factory) -> Callable[..., Path]:
    """Simulated raw logs shared by the session (see the module docstring)."""
    from jobs import generate_logs

    made: dict[tuple, Path] = {}

    def make(
        preset: str = "tiny", start_date: str = "2026-01-02", days: int = 4, seed: int = 5
    ) -> Path:
        key = (preset, start_date, days, seed)
        if key not in made:
            out = tmp_path_factory.mktemp(f"raw-{preset}-{start_date}-{days}d-seed{seed}")
            args = generate_logs.parse_args(
                [
                    *("--preset", preset, "--start-date", start_date),
                    *("--days", str(days), "--seed", str(seed), "--out", str(out)),
                ]
            )
            generate_logs.run(spark, args)
            made[key] = out
        return made[key]

    return make


@pytest.fixture(scope="session")
def built_features(spark, tmp_path_factory) -> Callable[..., Path]:
    """Feature tables built from shared raw logs (see the module docstring)."""
    from jobs import build_features

    built: dict[tuple, Path] = {}

    def make(raw: Path, start_date: str, end_date: str) -> Path:
        key = (str(raw), start_date, end_date)
        if key not in built:
            out = tmp_path_factory.mktemp(f"features-{start_date}-{end_date}")
            args = build_features.parse_args(
                [
                    *("--raw", str(raw), "--out", str(out)),
                    *("--start-date", start_date, "--end-date", end_date),
                ]
            )
            build_features.run(spark, args)
            built[key] = out
        return built[key]

    return make


@pytest.fixture(scope="session")
def learnable_days(tmp_path_factory) -> tuple[Path, Path]:
    """Three days of a learnable feature table with an oracle, and the field list file."""
    from tests.feature_fixtures import write_learnable_days

    root = tmp_path_factory.mktemp("learnable-days")
    return root, write_learnable_days(root)


@dataclass(frozen=True)
class LocalTraining:
    """What :func:`localhost_training` ran and where: its output, checkpoint folder, the
    tracking server and the MLflow experiment and registered model names."""

    result: HorovodResult
    checkpoint_dir: Path
    tracking_uri: str
    experiment: str = "it-train"
    registered_model_name: str = "esmm-it"


@pytest.fixture(scope="session")
def localhost_training(learnable_days, mlflow_server, tmp_path_factory) -> LocalTraining:
    """``horovodrun -np 2 -H localhost:2 python -m esmm.train`` on ``learnable_days``, once."""
    from tests.feature_fixtures import learnable_train_args

    root, fields_file = learnable_days
    checkpoints = tmp_path_factory.mktemp("localhost-training") / "ckpt"
    result = run_horovodrun(
        "esmm.train",
        *learnable_train_args(
            root,
            fields_file,
            *("--checkpoint-dir", str(checkpoints)),
            *("--set", f"tracking.experiment={LocalTraining.experiment}"),
            *("--set", f"tracking.registered_model_name={LocalTraining.registered_model_name}"),
        ),
        module=True,
        np=2,
        env={"MLFLOW_TRACKING_URI": mlflow_server},
        timeout=420,
    )
    return LocalTraining(result, checkpoints, mlflow_server)
