"""`make demo`'s driver end to end on the tiny preset: simulator → feature job → horovodrun
training on the feature job's own output → a registered model on a real MLflow server."""

from __future__ import annotations

import sys

import mlflow
import pytest

from tests.helpers import run_command

pytestmark = pytest.mark.integration


def test_demo_trains_on_feature_job_output_and_registers_the_model(tmp_path, mlflow_server):
    workdir = tmp_path / "demo"
    result = run_command(
        [
            sys.executable,
            "-m",
            "esmm.demo",
            "--workdir",
            str(workdir),
            "--preset",
            "tiny",
            "--days",
            "3",
            "--tracking-uri",
            mlflow_server,
            "--set",
            "epochs=1",
            "--set",
            "tracking.experiment=demo-it",
            "--set",
            "tracking.registered_model_name=esmm-demo-it",
        ],
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for day in ("2026-01-01", "2026-01-02", "2026-01-03"):
        assert (workdir / "features" / f"dt={day}").is_dir()
        assert (workdir / "features" / "_stats" / f"dt={day}.json").is_file()
    assert "CVR AUC (entire space, counterfactual)" in result.stdout
    assert "=== demo finished" in result.stdout
    assert str(workdir / "features") in result.stdout

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("demo-it").experiment_id])
    assert run.data.tags["train_dates"] == "2026-01-01..2026-01-02"
    assert "entire_space_cvr_auc" in run.data.metrics
    stats = {a.path for a in client.list_artifacts(run.info.run_id, "train_partition_stats")}
    assert stats == {
        "train_partition_stats/dt=2026-01-01.json",
        "train_partition_stats/dt=2026-01-02.json",
    }
    (version,) = client.search_model_versions("name='esmm-demo-it'")
    assert version.run_id == run.info.run_id
