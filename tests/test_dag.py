"""The daily Airflow DAG: it imports cleanly in the Airflow environment, has the expected
shape, and a day with a champion to beat runs for real (``airflow dags test``) on simulated
logs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from tests.feature_fixtures import small_fields
from tests.helpers import PROJECT_ROOT, VENV_BIN

AIRFLOW_BIN = PROJECT_ROOT / ".airflow-venv" / "bin"
needs_airflow = pytest.mark.skipif(
    not (AIRFLOW_BIN / "airflow").exists(), reason="make airflow-venv has not run"
)

EXPECTED_EDGES = {
    "plan_day": {"wait_for_raw_logs", "plan_training"},
    "wait_for_raw_logs": {"build_features"},
    "build_features": {"plan_training"},
    "plan_training": {"train"},
    "train": {"promote"},
    "promote": {"score"},
    "score": set(),
}


def airflow_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A throw-away Airflow installation (SQLite in ``home``) that sees only our DAG folder."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("AIRFLOW", "VIRTUAL_ENV", "PYTHONPATH"))
    }
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_FOLDER": str(PROJECT_ROOT / "airflow_dags"),
            "PATH": f"{AIRFLOW_BIN}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    env.update(extra or {})
    return env


@needs_airflow
def test_dag_imports_with_the_expected_tasks_and_dependencies(tmp_path):
    script = textwrap.dedent(
        """
        import json, os, sys
        from airflow.dag_processing.dagbag import DagBag
        bag = DagBag(dag_folder=sys.argv[1])
        dag = bag.dags.get("esmm_daily")
        print(json.dumps({
            "errors": {k: str(v) for k, v in bag.import_errors.items()},
            "edges": {t.task_id: sorted(t.downstream_task_ids) for t in dag.tasks} if dag else {},
            "params": sorted(dag.params.keys()) if dag else [],
            "retries": {t.task_id: t.retries for t in dag.tasks} if dag else {},
            "timeouts": {t.task_id: bool(t.execution_timeout) for t in dag.tasks} if dag else {},
            "catchup": dag.catchup if dag else None,
            "schedule": str(dag.schedule) if dag else None,
            "parsed": sorted(os.path.basename(s.file) for s in bag.dagbag_stats),
            "imported": [m for m in ("torch", "pyspark", "horovod", "mlflow") if m in sys.modules],
        }))
        """
    )
    result = subprocess.run(
        [str(AIRFLOW_BIN / "python"), "-c", script, str(PROJECT_ROOT / "airflow_dags")],
        env=airflow_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["errors"] == {}
    # esmm_settings.py (the DAG's logic, no DAG in it) is in .airflowignore: never parsed
    assert report["parsed"] == ["esmm_daily.py"]
    assert report["imported"] == []  # the DAG and contract/ import none of the pipeline's runtime
    assert {k: set(v) for k, v in report["edges"].items()} == EXPECTED_EDGES
    shipped = yaml.safe_load((PROJECT_ROOT / "conf" / "pipeline.yaml").read_text())["dag"]
    for key in ("raw_root", "features_root", "train_window_days", "np", "predictions_root"):
        assert key in report["params"], key
    assert report["catchup"] == shipped["catchup"]
    assert report["schedule"] == shipped["schedule"]
    assert all(r == shipped["retries"] for r in report["retries"].values())
    assert all(report["timeouts"].values())


# The train task's last step reads the trainer's summary JSON with the pipeline venv's python
# (the interpreter the horovodrun workers run) and says which interpreter that was.
TRAINED_WITH = re.compile(r"esmm_daily: MLflow run \S+ registered version (\d+) \(python (\S+)\)")


def interpreters_of_the_work(output: str) -> dict[str, str]:
    """Registered version → the python that ran its train task's steps, from a run's log."""
    return dict(TRAINED_WITH.findall(output))


def migrate_airflow_db(env: dict[str, str]) -> subprocess.Popen:
    """Start ``airflow db migrate`` (a fresh SQLite metadata DB) in the background."""
    return subprocess.Popen(
        [str(AIRFLOW_BIN / "airflow"), "db", "migrate"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@needs_airflow
@pytest.mark.integration
@pytest.mark.timeout(1800)  # about 2 min on an idle 2-core machine; far more when it is shared
def test_a_daily_run_backfills_trains_gates_against_the_champion_and_scores_for_real(
    tmp_path, mlflow_server, raw_logs, spark
):
    """One ``airflow dags test`` of a day that already has a champion and an older feature day:
    every task runs for real (the sensor, a 2-day backfill with spark-submit, horovodrun on
    the sliding window with its newest day choosing the epoch, the gate against the champion,
    spark-submit scoring with the alias). The day before is set up in-process from the
    session's shared logs: its feature partition built on the shared Spark session, and a
    champion registered (an untrained model; the first-model path of the gate is
    tests/test_promotion.py's)."""
    import mlflow

    from jobs import build_features
    from tests.feature_fixtures import register_untrained_model

    work = tmp_path / "work"
    fields = small_fields()
    fields_file = tmp_path / "fields.yaml"
    fields_file.write_text(yaml.safe_dump(fields.model_dump(mode="json")))
    # Parse-time settings for a test: poke the (already complete) raw folders, no retries.
    config = yaml.safe_load((PROJECT_ROOT / "conf" / "pipeline.yaml").read_text())
    config["dag"].update(
        sensor_mode="poke", sensor_poke_seconds=5, sensor_timeout_seconds=60, retries=0
    )
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(config))
    env = airflow_env(
        tmp_path / "airflow",
        {
            "ESMM_PIPELINE_CONFIG": str(config_file),
            "AIRFLOW_CONN_SPARK_DEFAULT": json.dumps({"conn_type": "spark", "host": "local[2]"}),
        },
    )
    # Airflow's metadata DB is migrated while the day before is set up (in this process): the
    # two are independent.
    migrate = migrate_airflow_db(env)
    try:
        # the session's shared logs (read-only: the DAG writes under tmp_path / "work")
        raw = raw_logs("tiny", "2026-01-02", 4, 5)
        build_features.run(
            spark,
            build_features.parse_args(
                [
                    *("--raw", str(raw), "--out", str(work / "features")),
                    *("--date", "2026-01-02", "--fields", str(fields_file)),
                ]
            ),
        )
        previous_uri = mlflow.get_tracking_uri()
        try:
            champion = register_untrained_model(mlflow_server, "esmm-dag", fields, seed=1)
        finally:
            mlflow.set_tracking_uri(previous_uri)
        client = mlflow.MlflowClient(tracking_uri=mlflow_server)
        client.set_registered_model_alias("esmm-dag", "champion", champion)
        migrate_output, _ = migrate.communicate(timeout=300)
    finally:
        if migrate.poll() is None:
            migrate.kill()
            migrate.wait()
    assert migrate.returncode == 0, migrate_output[-3000:]
    params = {
        "raw_root": str(raw),
        "features_root": str(work / "features"),
        "predictions_root": str(work / "predictions"),
        "checkpoint_root": str(work / "checkpoints"),
        "oracle_root": str(raw / "oracle"),
        "fields_config": str(fields_file),
        "tracking_uri": mlflow_server,
        "registered_model_name": "esmm-dag",
        "label_delay_days": 1,
        "train_window_days": 2,
        "np": 2,
        "spark_driver_memory": "2g",
        "train_overrides": ["epochs=1", "data.batch_size=256", "data.shuffle_queue_rows=2000"],
        # the plumbing is under test, not the quality of a model trained for seconds
        "promotion_overrides": ["promotion.min_auc=0.0", "promotion.calibration_bounds=[0.01,100]"],
    }

    # logical 2026-01-05 → day 2026-01-04; rebuild_days=1 backfills 2026-01-03 with it (one
    # spark-submit for both days, its look-back read from the published 2026-01-02)
    started = time.monotonic()
    result = subprocess.run(
        [
            str(AIRFLOW_BIN / "airflow"),
            *("dags", "test", "esmm_daily", "2026-01-05"),
            *("-c", json.dumps({**params, "rebuild_days": 1})),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    print(f"airflow dags test 2026-01-05: {time.monotonic() - started:.0f}s")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    # `dags test` exits 0 even when a task fails; the run's final state says it
    assert "state=failed" not in output and "Marking task as FAILED" not in output, output[-6000:]

    for day in ("2026-01-03", "2026-01-04"):  # the backfill published both, with their stats
        assert (work / "features" / f"dt={day}").is_dir(), day
        assert (work / "features" / "_stats" / f"dt={day}.json").is_file(), day
    # the train task's XCom (the gate's --version) came from the trainer's summary JSON
    summary = json.loads((work / "checkpoints" / "2026-01-04" / "train_summary.json").read_text())
    assert summary["registered_version"] == "2"
    trained = client.get_model_version("esmm-dag", "2")
    assert trained.run_id == summary["run_id"]
    assert trained.tags["decision"] in {"promoted", "rejected"}
    assert trained.tags["champion_version_compared"] == champion
    assert trained.tags["decision_eval_date"] == "2026-01-04"
    # the sliding window (2026-01-02, 2026-01-03): its newest day chooses the kept epoch
    assert trained.tags["train_dates"] == "2026-01-02"
    run = client.get_run(trained.run_id)
    assert run.data.tags["train_dates"] == "2026-01-02"
    assert run.data.tags["valid_date"] == "2026-01-03"
    assert run.data.metrics["kept_epoch"] == 1.0  # of train_overrides' epochs=1
    now = str(client.get_model_version_by_alias("esmm-dag", "champion").version)
    assert now == ("2" if trained.tags["decision"] == "promoted" else champion)

    import pyarrow.parquet as pq

    predictions = pq.read_table(work / "predictions" / "dt=2026-01-04").to_pandas()
    table = pq.read_table(work / "features" / "dt=2026-01-04")
    assert len(predictions) == table.num_rows > 0
    assert set(predictions["model_version"]) == {now}  # scored with the alias after the gate
    # The pipeline venv ran the work, the Airflow venv only scheduled: the train task read
    # its registered version with the pipeline venv's python (the workers' interpreter).
    assert interpreters_of_the_work(output) == {"2": str(VENV_BIN / "python")}, output[-6000:]
