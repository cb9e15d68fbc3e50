"""The trainer end to end (horovodrun, Petastorm, MLflow server, registry) and its failures."""

from __future__ import annotations

import socket
import sys

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.feature_fixtures import LEARNABLE_DAYS
from tests.helpers import free_port, run_command, sqlite_store

pytestmark = pytest.mark.integration

DAYS = LEARNABLE_DAYS


@pytest.fixture
def dataset(learnable_days):
    """The session's three learnable days (tests/conftest.py): root and field list file."""
    return learnable_days


def train_args(root, fields_file, *extra: str) -> list[str]:
    return [
        "--features",
        str(root / "features"),
        "--train-dates",
        f"{DAYS[0]}..{DAYS[1]}",
        "--eval-date",
        DAYS[2],
        "--fields",
        str(fields_file),
        "--no-progress",
        *extra,
    ]


def test_horovodrun_trains_esmm_and_registers_it_on_the_server(dataset, localhost_training):
    """The session's ``horovodrun -np 2`` training (tests/conftest.py, 2 epochs, with the
    oracle) logged its run and registered its model on the MLflow server."""
    root, _ = dataset
    trained = localhost_training
    assert trained.result.returncode == 0, trained.result.output[-4000:]
    client = mlflow.MlflowClient(tracking_uri=trained.tracking_uri)
    experiment = client.get_experiment_by_name(trained.experiment)
    (run,) = client.search_runs([experiment.experiment_id])
    metrics = run.data.metrics
    for name in ("ctr_auc", "cvr_auc", "ctcvr_auc", "entire_space_cvr_auc", "oracle_cvr_auc"):
        assert 0.0 <= metrics[name] <= 1.0, name
    # the fixture's click and conversion depend on ids: a trained model beats chance clearly
    assert metrics["ctr_auc"] > 0.6 and metrics["ctcvr_auc"] > 0.6
    assert len(client.get_metric_history(run.info.run_id, "ctr_auc")) == 2  # one per epoch
    assert run.data.params["model.variant"] == "esmm"
    assert run.data.params["workers"] == "2"
    assert run.data.tags["hosts"].split(",") == [socket.gethostname()] * 2  # each rank's host
    assert run.data.tags["train_dates"] == f"{DAYS[0]}..{DAYS[1]}"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/roc.png", "plots/calibration.png"}

    (version,) = client.search_model_versions(f"name='{trained.registered_model_name}'")
    assert version.run_id == run.info.run_id
    assert float(version.tags["cvr_auc"]) == pytest.approx(metrics["cvr_auc"], abs=1e-6)

    mlflow.set_tracking_uri(trained.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{trained.registered_model_name}/{version.version}")
    rows = pq.read_table(root / "features" / f"dt={DAYS[2]}").slice(0, 50).to_pandas()
    predictions = model.predict(rows)
    assert list(predictions.columns) == ["pctr", "pcvr", "pctcvr"]
    assert len(predictions) == 50
    assert ((predictions >= 0) & (predictions <= 1)).all().all()
    np.testing.assert_allclose(
        predictions["pctcvr"], predictions["pctr"] * predictions["pcvr"], rtol=1e-5
    )
    assert (trained.checkpoint_dir / "last.pt").is_file()


def test_unreachable_tracking_server_fails_before_training(dataset, tmp_path):
    root, fields_file = dataset
    result = run_command(
        [
            sys.executable,
            "-m",
            "esmm.train",
            *train_args(root, fields_file, "--checkpoint-dir", str(tmp_path / "ckpt")),
        ],
        env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"},
        timeout=180,
    )
    assert result.returncode == 1
    assert "cannot be reached" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "ckpt").exists()  # no training step ran


def test_nan_loss_stops_the_run_and_registers_nothing(dataset, tmp_path):
    root, fields_file = dataset
    store = sqlite_store(tmp_path / "mlflow.db")
    result = run_command(
        [
            sys.executable,
            "-m",
            "esmm.train",
            *train_args(
                root,
                fields_file,
                "--checkpoint-dir",
                str(tmp_path / "ckpt"),
                # absurd steps overflow the weights within a couple of steps
                "--set",
                "optim.lr=1e30",
                "--set",
                "optim.sparse_lr=1e30",
                "--set",
                "tracking.registered_model_name=nan-model",
            ),
        ],
        env={"MLFLOW_TRACKING_URI": store},
        timeout=180,
    )
    assert result.returncode == 1
    assert "non-finite loss" in result.stderr
    client = mlflow.MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("esmm").experiment_id])
    assert run.info.status == "FAILED"
    assert client.search_model_versions("name='nan-model'") == []


def test_resume_gives_the_same_model_as_an_uninterrupted_run(dataset, tmp_path):
    root, fields_file = dataset
    # one reader thread and no shuffle buffer: the row order is then fully determined by
    # the seed (with more threads, row groups arrive in a timing-dependent order)
    common = ["--set", "data.reader_workers=1", "--set", "data.shuffle_queue_rows=0"]

    def train(ckpt: str, epochs: int, *extra: str) -> tuple[list, mlflow.MlflowClient]:
        db = tmp_path / (ckpt + ".db")
        store = f"sqlite:///{db}" if db.exists() else sqlite_store(db)
        result = run_command(
            [
                sys.executable,
                "-m",
                "esmm.train",
                *train_args(root, fields_file, "--checkpoint-dir", str(tmp_path / ckpt)),
                *common,
                "--set",
                f"epochs={epochs}",
                "--set",
                "tracking.registered_model_name=null",
                *extra,
            ],
            env={"MLFLOW_TRACKING_URI": store},
            timeout=240,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        client = mlflow.MlflowClient(tracking_uri=store)
        runs = client.search_runs([client.get_experiment_by_name("esmm").experiment_id])
        return runs, client

    uninterrupted, _ = train("full", 2)
    train("resumed", 1)
    resumed, client = train("resumed", 2, "--resume")
    assert len(resumed) == 1  # the resumed run continues the same MLflow run
    full_metrics = uninterrupted[0].data.metrics
    resumed_metrics = resumed[0].data.metrics
    for name in ("ctr_auc", "cvr_auc", "ctcvr_auc"):
        assert resumed_metrics[name] == pytest.approx(full_metrics[name], abs=1e-6), name
    history = client.get_metric_history(resumed[0].info.run_id, "ctr_auc")
    assert sorted(m.step for m in history) == [1, 2]
