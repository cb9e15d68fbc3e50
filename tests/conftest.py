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
  once per set of arguments for the whole test run (its xdist workers share it, see
  :func:`built_once`). Treat it as read-only.
- ``built_features``: ``built_features(raw, start_date, end_date)`` → the root of a feature
  table built from ``raw`` by ``jobs/build_features.py``'s ``run`` on the shared session, with
  the shipped configs, once per set of arguments for the whole run, as ``raw_logs``. Treat it
  as read-only; copy it to change it.
- ``learnable_days``: ``(root, fields_file)`` of three small feature days written with pyarrow
  (:func:`tests.feature_fixtures.write_learnable_days`), for the trainer's tests. Read-only.
- ``localhost_training``: one ``horovodrun -np 2 -H localhost:2`` ESMM training on
  ``learnable_days`` (2 epochs, registered as ``esmm-it`` on ``mlflow_server``), shared by the
  trainer's end-to-end test and the multi-host test, which compares its metrics with it.

``make test`` runs the suite on three pytest-xdist workers (``-n 3``, the Makefile's
``TEST_WORKERS``). They are handed whole
groups of tests (:func:`pytest_xdist_make_scheduler`), so that nothing expensive is built
twice: one group per test file (a module's fixtures are built once), files that share an
expensive session fixture share a group (:data:`SHARED_GROUPS`), and the longest groups go
first (:data:`LONGEST_FIRST`). What the workers share across groups (``raw_logs``,
``built_features``) is built once for the run, by whichever worker needs it first, and the
run has one MLflow server (:class:`SharedMlflowServer`). A plain
``pytest`` (no ``-n``) runs in collection order, in one process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from tests.helpers import (  # noqa: E402
    SHORT_LIVED_JVM_OPTIONS,
    HorovodResult,
    free_port,
    run_horovodrun,
    start_mlflow_server,
    wait_until_answering,
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


# Files whose tests need another file's expensive session fixture run in that file's group:
# test_train.py's end-to-end test and test_deploy.py's two-host test share localhost_training.
SHARED_GROUPS = {"tests/test_train.py": "tests/test_deploy.py"}
# The groups that take longest (a quiet serial run's --durations, their fixtures included),
# longest first; every other group follows in collection order. Only the order changes.
LONGEST_FIRST = (
    "tests/test_deploy.py",  # the cluster, two hosts, the shared training, test_train.py's
    "tests/test_dag.py",  # one `airflow dags test` day
    "tests/test_demo.py",  # `esmm.demo`: two spark-submits and a training
    "tests/test_experiments.py",  # the quick paper table: the shared logs and two trainings
    "tests/test_feature_job.py",
    "tests/test_aliccp.py",
)


def xdist_group_of(nodeid: str) -> str:
    """The xdist group of a test (its node id): its file's, or :data:`SHARED_GROUPS`'."""
    path = nodeid.split("::", 1)[0]
    return SHARED_GROUPS.get(path, path)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Under ``pytest -n N``: hand out whole groups (:func:`xdist_group_of`), in collection
    order (:func:`pytest_collection_modifyitems` puts the longest first), each to the first
    idle worker. A module's fixtures are then built by one worker, once."""
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group_of(nodeid)

    config.option.loadscopereorder = False  # keep the collection order, longest first
    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On xdist workers, put the longest groups (:data:`LONGEST_FIRST`) first."""
    if not hasattr(config, "workerinput"):  # a plain run keeps its collection order
        return
    rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
    # a stable sort: within a group (and a file) the collection order stays
    items.sort(key=lambda item: rank.get(xdist_group_of(item.nodeid), len(rank)))


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


class SharedMlflowServer:
    """One ``mlflow server`` for all xdist workers of a run, started by the controller in a
    thread (so the workers start meanwhile) and stopped when the run ends. A worker's
    ``mlflow_server`` waits until it answers."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mlflow-server-"))
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mlflow-server", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # a server that fails to start: the workers' wait names its log
        with (
            contextlib.suppress(RuntimeError),
            start_mlflow_server(self.root, port=self.port, timeout=300),
        ):
            self._stop.wait()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)


_SHARED_SERVER = pytest.StashKey[SharedMlflowServer]()


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """xdist's controller, before each worker starts: hand it the run's MLflow server."""
    config = node.config
    if _SHARED_SERVER not in config.stash:
        config.stash[_SHARED_SERVER] = SharedMlflowServer()
    server = config.stash[_SHARED_SERVER]
    node.workerinput["mlflow_server_uri"] = server.uri
    node.workerinput["mlflow_server_log"] = str(server.root / "server.log")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SHARED_SERVER in config.stash:
        config.stash[_SHARED_SERVER].stop()


@pytest.fixture(scope="session")
def mlflow_server(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[str]:
    """A real MLflow tracking + registry server on 127.0.0.1; yields its URI. Under xdist,
    the run's one server (:class:`SharedMlflowServer`), as a plain run has one."""
    workerinput = getattr(request.config, "workerinput", {})
    shared = workerinput.get("mlflow_server_uri")
    if shared:
        what = f"the run's mlflow server (its log: {workerinput['mlflow_server_log']})"
        wait_until_answering(f"{shared}/health", what, timeout=300)
        yield shared
        return
    root = tmp_path_factory.mktemp("mlflow-server")
    with start_mlflow_server(root) as uri:
        yield uri


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build) -> Path:
    """The folder ``name`` of this test run, made by ``build(folder)`` once for all its xdist
    workers: the first that asks builds it under a file lock, the others wait and read it."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's base is a child of the run's
        root = root.parent
    folder = root / "shared" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{folder}.lock"):
        if not (folder.parent / f"{name}.done").exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed part-way
            folder.mkdir()
            build(folder)
            (folder.parent / f"{name}.done").touch()
    return folder


@pytest.fixture(scope="session")
def raw_logs(spark, tmp_path_factory) -> Callable[..., Path]:
    """Simulated raw logs shared by the session (see the module docstring)."""
    from jobs import generate_logs

    def make(
        preset: str = "tiny", start_date: str = "2026-01-02", days: int = 4, seed: int = 5
    ) -> Path:
        def simulate(out: Path) -> None:
            args = generate_logs.parse_args(
                [
                    *("--preset", preset, "--start-date", start_date),
                    *("--days", str(days), "--seed", str(seed), "--out", str(out)),
                ]
            )
            generate_logs.run(spark, args)

        name = f"raw-{preset}-{start_date}-{days}d-seed{seed}"
        return built_once(tmp_path_factory, name, simulate)

    return make


@pytest.fixture(scope="session")
def built_features(spark, tmp_path_factory) -> Callable[..., Path]:
    """Feature tables built from shared raw logs (see the module docstring)."""
    from jobs import build_features

    def make(raw: Path, start_date: str, end_date: str) -> Path:
        def build(out: Path) -> None:
            args = build_features.parse_args(
                [
                    *("--raw", str(raw), "--out", str(out)),
                    *("--start-date", start_date, "--end-date", end_date),
                ]
            )
            build_features.run(spark, args)

        name = f"features-of-{raw.name}-{start_date}-{end_date}"
        return built_once(tmp_path_factory, name, build)

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
