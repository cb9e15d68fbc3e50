"""MLflow tracking of a training run: what rank 0 logs at the start of a run."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from contract import layout
from esmm.tracking import RunTracker, TrackingConfig
from tests.feature_fixtures import small_fields
from tests.helpers import sqlite_store


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_training_partitions_stats_are_logged_for_paths_and_urls(tmp_path, as_url):
    from esmm.train import TrainConfig

    features = tmp_path / "features"
    for day in ("2026-01-01", "2026-01-02"):
        stats_file = tmp_path / layout.partition_paths(str(features), day).stats
        stats_file.parent.mkdir(parents=True, exist_ok=True)
        stats_file.write_text(json.dumps({"dt": day, "table": {"rows": 7}}))
    root = f"file://{features}" if as_url else str(features)
    tracking = TrackingConfig(
        tracking_uri=sqlite_store(tmp_path / "mlflow.db"), experiment="tracking-tests"
    )
    tracker = RunTracker.open(tracking, run_name="stats")
    try:
        tracker.log_start(
            TrainConfig(tracking=tracking),
            small_fields(),
            workers=1,
            train_dates="2026-01-01..2026-01-02",
            eval_date="2026-01-03",
            features=root,
            train_rows=14,
            resumed_from_epoch=None,
        )
    finally:
        tracker.finish()
    client = mlflow.MlflowClient(tracking_uri=tracker.tracking_uri)
    logged = {a.path for a in client.list_artifacts(tracker.run_id, "train_partition_stats")}
    assert logged == {
        "train_partition_stats/dt=2026-01-01.json",
        "train_partition_stats/dt=2026-01-02.json",
    }
    local = mlflow.artifacts.download_artifacts(
        run_id=tracker.run_id,
        artifact_path="train_partition_stats/dt=2026-01-02.json",
        tracking_uri=tracker.tracking_uri,
        dst_path=str(tmp_path / "download"),
    )
    assert json.loads(Path(local).read_text()) == {"dt": "2026-01-02", "table": {"rows": 7}}
