"""The environment itself: the stack imports, Horovod runs on Gloo, Spark and MLflow answer."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_whole_stack_imports_in_the_project_environment():
    result = subprocess.run(
        [sys.executable, "-c", "import horovod.torch, petastorm, pyspark, mlflow, torch"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.integration
def test_horovodrun_two_ranks_allreduce_broadcast_and_sparse_step(run_horovod):
    result = run_horovod("tests/scripts/hvd_allreduce.py", np=2, timeout=180)
    assert result.returncode == 0, result.output
    assert sorted(result.ranks) == [0, 1]
    for rank in (0, 1):
        text = result.rank_text(rank)
        # ranks contribute 1 and 2; rank 1 broadcasts 1*10+7
        assert f"rank={rank} size=2 sum=3 bcast=17" in text
    # after one distributed sparse+dense step both ranks hold identical embedding weights
    mine = {r: result.rank_text(r).split("mine=")[1].split()[0] for r in (0, 1)}
    assert mine[0] == mine[1]


def test_local_spark_session_runs_a_job(spark):
    frame = spark.createDataFrame([(1, "a"), (2, "b"), (3, "a")], ["n", "k"])
    counts = {row["k"]: row["count"] for row in frame.groupBy("k").count().collect()}
    assert counts == {"a": 2, "b": 1}
    assert spark.conf.get("spark.sql.session.timeZone") == "UTC"


@pytest.mark.integration
def test_mlflow_server_records_a_run(mlflow_server):
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment_id = client.create_experiment("foundation-check")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "answer", 42.0)
    client.set_terminated(run.info.run_id)
    assert client.get_run(run.info.run_id).data.metrics["answer"] == 42.0
