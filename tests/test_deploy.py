"""The ways users scale out, run for real on this machine: horovodrun across two hosts over
ssh, and the Spark jobs on a standalone cluster with the code shipped as ``--py-files``.

Each test says what it proves in its docstring; docs/OPERATIONS.md has the user's side of both.
"""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from contract import commands
from features import stats
from tests import hosts as test_hosts
from tests.cluster import application, cluster_env, node_python, standalone_cluster
from tests.feature_fixtures import learnable_train_args, register_untrained_model, small_fields
from tests.helpers import (
    SHORT_LIVED_JVM_OPTIONS,
    VENV_BIN,
    built_partition,
    project_env,
    start_mlflow_server,
)

pytestmark = pytest.mark.integration

MLFLOW_PORT = 5000  # nothing else listens in the launcher's namespace


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    """Two test hosts (network namespaces with an sshd each) and a launcher (tests/hosts.py)."""
    reason = test_hosts.unavailable()
    if reason:
        pytest.skip(f"no test hosts for the multi-host horovodrun test: {reason}")
    with test_hosts.host_network(tmp_path_factory.mktemp("hosts")) as net:
        yield net


def test_horovodrun_over_ssh_on_two_hosts_trains_as_on_one_host(
    network, learnable_days, localhost_training, tmp_path
):
    """``horovodrun -np 2 -H hostA:1,hostB:1`` from a launcher, over ssh (the test's key and
    port), Gloo on the hosts' ``eth0``, against an MLflow server in the launcher's namespace
    that both hosts reach at 10.77.0.1: rank 0 runs in hostA's namespace and rank 1 in hostB's
    (the run's ``hosts`` tag holds each rank's host name), the model is registered, and the
    metrics equal those of the same training with ``-H localhost:2`` (the session's
    ``localhost_training``, tests/conftest.py: the same data, options and seed)."""
    import mlflow

    net = network
    root, fields_file = learnable_days
    summary = tmp_path / "two-hosts.json"
    options = [
        *("--ssh-port", str(net.ssh_port), "--ssh-identity-file", str(net.identity)),
        *("--network-interface", net.interface),
    ]
    args = learnable_train_args(
        root,
        fields_file,
        *("--checkpoint-dir", str(tmp_path / "ckpt"), "--run-name", "two-hosts"),
        *("--summary-json", str(summary)),
        *("--set", "tracking.experiment=multi-host"),
        *("--set", "tracking.registered_model_name=two-hosts"),
    )
    command = commands.trainer(VENV_BIN, 2, args, hosts="hostA:1,hostB:1", options=options)
    server_root = tmp_path / "mlflow"
    with start_mlflow_server(
        server_root,
        host=net.launcher_address,
        port=MLFLOW_PORT,
        prefix=net.command(net.launcher, []),
        answers=net.answers,
    ) as uri:
        done = net.run(
            command, env=project_env({"MLFLOW_TRACKING_URI": uri}), timeout=420, cwd=tmp_path
        )
    (tmp_path / "two-hosts.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    two_hosts = json.loads(summary.read_text())

    # The server is gone; its SQLite store holds what both hosts sent it.
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{server_root / 'mlflow.db'}")
    run = client.get_run(two_hosts["run_id"])
    assert run.data.tags["hosts"] == "hostA,hostB"  # rank 0 on hostA, rank 1 on hostB
    assert run.data.params["workers"] == "2"
    (version,) = client.search_model_versions("name='two-hosts'")
    assert version.run_id == two_hosts["run_id"]
    assert str(two_hosts["registered_version"]) == str(version.version)

    assert localhost_training.result.returncode == 0, localhost_training.result.output[-4000:]
    on_one_host = mlflow.MlflowClient(tracking_uri=localhost_training.tracking_uri)
    experiment = on_one_host.get_experiment_by_name(localhost_training.experiment)
    (local,) = on_one_host.search_runs([experiment.experiment_id])
    assert local.data.tags["hosts"].split(",") == [socket.gethostname()] * 2
    assert run.data.metrics["ctr_auc"] > 0.6  # it learnt: the fixture's labels depend on ids
    for name in ("ctr_auc", "cvr_auc", "ctcvr_auc", "ctr_logloss", "ctcvr_logloss"):
        assert run.data.metrics[name] == pytest.approx(local.data.metrics[name], abs=1e-6), name


# ---- a Spark standalone cluster ----------------------------------------------------------

RAW_ARGS = ("tiny", "2026-01-02", 4, 5)  # raw_logs(): the same simulation, made in-process
DAY = "2026-01-03"  # built and scored on the cluster: it has a day before and days after


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A master and two one-core workers on 127.0.0.1, shared by this module's Spark tests."""
    with standalone_cluster(tmp_path_factory.mktemp("spark-cluster")) as running:
        yield running


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """``make dist`` + the entry scripts and configs outside the checkout, with the deployment's
    own field list (small id spaces, so the model the scoring test registers is small), and a
    node python without the project."""
    root = tmp_path_factory.mktemp("deployment")
    app, python = application(root), node_python(root)
    isolated = subprocess.run(
        [str(python), "-c", "import features; print(features.__file__)"],
        cwd=root,
        env=cluster_env(root),
        capture_output=True,
        text=True,
    )
    assert "No module named 'features'" in isolated.stderr, isolated.stdout  # only --py-files
    fields = small_fields()
    (app.folder / "conf" / "fields.yaml").write_text(yaml.safe_dump(fields.model_dump(mode="json")))
    return app, python, fields


def submit(cluster, deployment, job: str, args: list[str], cwd, env=None):
    """``spark-submit --master spark://... --py-files <zip> <app>/jobs/<job>.py ARGS`` from
    ``cwd``, driver and executors on the node python."""
    app, python, _ = deployment
    command = [
        *commands.spark_submit(VENV_BIN, cluster.master_url, driver_memory="2g"),
        # a user's executor JVM options reach the executors (features.spark keeps them); this
        # one is the tests' short-lived-JVM setting (tests/conftest.py)
        *("--conf", f"spark.executor.extraJavaOptions={SHORT_LIVED_JVM_OPTIONS}"),
        *("--py-files", str(app.py_files)),
        app.job(job),
        *args,
    ]
    environment = {
        **cluster_env(cwd),
        "PYSPARK_PYTHON": str(python),
        "PYSPARK_DRIVER_PYTHON": str(python),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    done = subprocess.run(
        command, cwd=cwd, env=environment, capture_output=True, text=True, timeout=600
    )
    (cwd / f"{job}.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
    return done


def _executor_logs(cluster, app_id: str) -> list[list[Path]]:
    """Each worker's executor logs of ``app_id``."""
    return [sorted((work / app_id).glob("*/stderr")) for work in cluster.work_dirs]


def _executor_commands(cluster, app_id: str) -> list[str]:
    """The java command line of each executor of ``app_id`` (the first line of its log)."""
    return [
        log.read_text().splitlines()[0] for logs in _executor_logs(cluster, app_id) for log in logs
    ]


def _app_ids(cluster) -> set[str]:
    return {app["id"] for app in cluster.state()["completedapps"]}


def _tasks_by_worker(cluster, app_id: str) -> list[int]:
    """How many tasks each worker's executors ran for ``app_id`` (their logs)."""
    return [
        sum(log.read_text().count("Running task") for log in logs)
        for logs in _executor_logs(cluster, app_id)
    ]


@pytest.fixture(scope="module")
def cluster_days(cluster, deployment, tmp_path_factory):
    """The tiny simulation and its feature build, each one spark-submit to the cluster; the
    folder, and each job's application id."""
    root = tmp_path_factory.mktemp("on-cluster")
    preset, start, days, seed = RAW_ARGS
    apps = {}
    before = _app_ids(cluster)
    submit(
        cluster,
        deployment,
        "generate_logs",
        [
            *("--preset", preset, "--start-date", start, "--days", str(days)),
            *("--seed", str(seed), "--out", str(root / "raw")),
        ],
        root,
    )
    (apps["generate_logs"],) = _app_ids(cluster) - before
    before = _app_ids(cluster)
    submit(
        cluster,
        deployment,
        "build_features",
        [
            *("--raw", str(root / "raw"), "--out", str(root / "features")),
            *("--date", DAY),
        ],
        root,
    )
    (apps["build_features"],) = _app_ids(cluster) - before
    return root, apps


def _lines(folder) -> list[str]:
    return sorted(
        line for path in sorted(folder.rglob("part-*")) for line in path.read_text().splitlines()
    )


def test_the_jobs_run_on_a_standalone_cluster_from_the_shipped_zip_as_they_run_locally(
    cluster, deployment, cluster_days, raw_logs, spark, tmp_path
):
    """``make dist``'s zip as ``--py-files``, the entry scripts outside the checkout, driver and
    executors on a python that cannot import the project: the simulation and the feature build
    run on the two workers (each ran tasks of each job), the day's accounting holds, and the raw
    logs and the table equal, row for row, the same made with ``local[2]``."""
    from jobs import build_features

    app, _, _ = deployment
    root, apps = cluster_days
    for job, app_id in apps.items():
        per_worker = _tasks_by_worker(cluster, app_id)
        assert all(tasks > 0 for tasks in per_worker), (job, per_worker)
        for command in _executor_commands(cluster, app_id):
            assert f'"{SHORT_LIVED_JVM_OPTIONS}"' in command, (job, command)

    local_raw = raw_logs(*RAW_ARGS)
    for log in ("impressions", "clicks", "conversions"):
        assert _lines(root / "raw" / log) == _lines(local_raw / log), log

    local = tmp_path / "local-features"
    build_features.run(
        spark,
        build_features.parse_args(
            [
                *("--raw", str(local_raw), "--out", str(local)),
                *("--date", DAY),
                *("--fields", str(app.folder / "conf" / "fields.yaml")),
            ]
        ),
    )
    rows, day_stats, records, _ = built_partition(root / "features", DAY)
    want_rows, want_stats, want_records, _ = built_partition(local, DAY)
    assert stats.conservation_problems(day_stats) == []
    assert len(rows) > 2000 and rows.equals(want_rows)
    assert day_stats == want_stats and records == want_records


def test_the_batch_scorer_runs_on_the_cluster_and_answers_as_the_model(
    cluster, deployment, cluster_days, mlflow_server
):
    """``jobs/score.py`` on the cluster with a registered model (served to the executors by
    ``mlflow.pyfunc.spark_udf`` from a real MLflow server): one row per impression of the day,
    pCTCVR = pCTR x pCVR, and the scores of the model's own pyfunc on the same rows."""
    import mlflow
    import numpy as np
    import pyarrow.dataset as ds

    _, _, fields = deployment
    root, _ = cluster_days
    version = register_untrained_model(mlflow_server, "on-cluster", fields, seed=4)
    day = DAY
    before = _app_ids(cluster)
    submit(
        cluster,
        deployment,
        "score",
        commands.score_args(
            root / "features", day, f"models:/on-cluster/{version}", root / "predictions"
        ),
        root,
        env={"MLFLOW_TRACKING_URI": mlflow_server},
    )
    (app_id,) = _app_ids(cluster) - before
    assert sum(_tasks_by_worker(cluster, app_id)) > 0

    table = ds.dataset(str(root / "features" / f"dt={day}"), format="parquet").to_table()
    scored = (
        ds.dataset(str(root / "predictions" / f"dt={day}"), format="parquet")
        .to_table()
        .to_pandas()
        .sort_values("impression_id")
        .reset_index(drop=True)
    )
    assert len(scored) == table.num_rows
    rows = table.to_pandas().sort_values("impression_id").reset_index(drop=True)
    assert scored["impression_id"].tolist() == rows["impression_id"].tolist()
    np.testing.assert_allclose(scored["pctcvr"], scored["pctr"] * scored["pcvr"], rtol=1e-5)
    mlflow.set_tracking_uri(mlflow_server)
    model = mlflow.pyfunc.load_model(f"models:/on-cluster/{version}")
    expected = model.predict(rows)
    for column in ("pctr", "pcvr", "pctcvr"):
        np.testing.assert_allclose(scored[column], expected[column], rtol=1e-5, atol=1e-7)
