"""The daily ESMM DAG: raw logs → features → Horovod training → promotion gate → scoring.

One run per logical date ``ds`` works on the day ``D = ds - label_delay_days``: the newest
day whose labels are final (a click or conversion of day D may arrive up to
``label_delay_days`` folders later, see conf/features.yaml). The run

1. ``plan_day``: merges the settings (conf/pipeline.yaml ``dag:`` < Airflow Variable
   ``esmm_daily`` < this run's params) and resolves every path, and the alias to score
   (``promotion.alias`` of the same file, or a ``promotion.alias=`` in ``promotion_overrides``);
2. ``wait_for_raw_logs``: waits until the raw folders of the built days .. D +
   label_delay_days exist;
3. ``build_features``: ``spark-submit jobs/build_features.py`` for D (and ``rebuild_days``
   before it), through the Spark provider's SparkSubmitOperator;
4. ``plan_training``: the sliding window of up to ``train_window_days`` feature days before D
   that exist, and the trainer's command line;
5. ``train``: ``horovodrun ... python -m esmm.train --summary-json ...`` on the window,
   evaluated on D; the model is registered in MLflow and the task's XCom is the version read
   from the trainer's summary JSON (the task fails if none was registered);
6. ``promote``: ``python -m esmm.promotion``: the new version gets the alias only if it beats
   the alias's current model on D (the decision is tagged on the version);
7. ``score``: ``spark-submit jobs/score.py`` writes D's predictions with the alias's model.

This file runs in the Airflow environment and imports nothing of the pipeline's runtime (no
torch, pyspark, horovod): the logic and the command lines are in ``esmm_settings.py`` (next
to this file, built with the project's ``contract.commands``), and every step runs the
pipeline environment's own binaries. Every step is idempotent (each writes a day atomically
or registers a new version), so a failed day is re-run by clearing its tasks.
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Param, Variable, get_current_context, task

# esmm_settings.py lives next to the real file (also when this one is a symlink in another
# dags_folder or the folder is a subfolder of it); it puts the project root on sys.path.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
import esmm_settings as s

DEFAULTS = s.load_defaults()
RUN_SETTINGS = s.run_settings(DEFAULTS)
T = s.TEMPLATES  # T["day"]: the Jinja expression of plan_day's resolved "day"


def _param(value: Any) -> Param:
    """A DAG param whose default and JSON type follow the YAML default."""
    if isinstance(value, bool):
        kind: Any = "boolean"
    elif isinstance(value, int):
        kind = "integer"
    elif isinstance(value, list):
        kind = "array"
    else:
        kind = ["null", "string"]
    return Param(value, type=kind)


default_args = {
    "retries": int(DEFAULTS["retries"]),
    "retry_delay": timedelta(minutes=float(DEFAULTS["retry_delay_minutes"])),
}
timeouts = {k: timedelta(minutes=float(v)) for k, v in DEFAULTS["timeout_minutes"].items()}
env = s.pipeline_env(T)

with DAG(
    dag_id=s.DAG_ID,
    description="ESMM: features → horovodrun training → promotion gate → batch scoring",
    schedule=DEFAULTS["schedule"],
    start_date=datetime.fromisoformat(str(DEFAULTS["start_date"])),
    catchup=bool(DEFAULTS["catchup"]),
    max_active_runs=1,  # runs share the registry's alias: one day after the other
    default_args=default_args,
    params={key: _param(value) for key, value in RUN_SETTINGS.items()},
    tags=["esmm"],
    doc_md=__doc__,
) as dag:

    @task(execution_timeout=timedelta(minutes=5))
    def plan_day() -> dict[str, Any]:
        """Resolve the settings of this run (see ``esmm_settings.merge_settings``)."""
        context = get_current_context()
        variable = Variable.get(s.DAG_ID, default={}, deserialize_json=True)
        merged = s.merge_settings(RUN_SETTINGS, variable, dict(context["params"]))
        resolved = s.resolve_paths(
            merged, context["logical_date"].date(), promotion=s.load_promotion()
        )
        print(f"{s.DAG_ID}: day {resolved['day']}, settings {resolved}")
        return resolved

    @task.sensor(
        poke_interval=float(DEFAULTS["sensor_poke_seconds"]),
        timeout=float(DEFAULTS["sensor_timeout_seconds"]),
        mode=str(DEFAULTS["sensor_mode"]),
        execution_timeout=timedelta(seconds=float(DEFAULTS["sensor_timeout_seconds"])),
    )
    def wait_for_raw_logs(settings: dict[str, Any]) -> bool:
        """True once every raw folder the built days and their labels depend on exists."""
        missing = [p for p in s.raw_folders(settings) if not Path(p).is_dir()]
        if missing:
            print(f"{s.DAG_ID}: waiting for {len(missing)} raw folders, e.g. {missing[0]}")
        return not missing

    features_app, features_args = s.features_job(T)
    build_features = SparkSubmitOperator(
        task_id="build_features",
        conn_id=str(DEFAULTS["spark_conn_id"]),
        spark_binary="spark-submit",  # found on the pipeline venv's PATH (env_vars)
        application=features_app,
        application_args=features_args,
        conf=s.spark_conf(T),
        env_vars=env,
        name="esmm-build-features",
        execution_timeout=timeouts["features"],
    )

    @task(execution_timeout=timedelta(minutes=5))
    def plan_training(settings: dict[str, Any]) -> dict[str, Any]:
        """The training window (feature days before D that exist), the validation days taken
        from its end, and the train script."""
        train_days, valid_days = s.split_window(settings, s.training_window(settings))
        print(
            f"{s.DAG_ID}: training on {train_days}, choosing the epoch on {valid_days or 'none'}"
            f", evaluating on {settings['day']}"
        )
        return {
            "train_dates": train_days,
            "valid_dates": valid_days,
            "train_script": s.train_script(settings, train_days, valid_days),
        }

    # A new version per attempt, so a retry never reuses a half-run. The script's last line
    # (the XCom the gate reads) is the version from the trainer's summary JSON.
    train = BashOperator(
        task_id="train",
        bash_command="{{ ti.xcom_pull(task_ids='plan_training')['train_script'] }}",
        env=env,
        append_env=True,
        execution_timeout=timeouts["train"],
    )

    @task.bash(env=env, append_env=True, execution_timeout=timeouts["promote"])
    def promote() -> str:
        """``python -m esmm.promotion`` on the version the train task registered."""
        ti = get_current_context()["ti"]
        script = s.gate_script(ti.xcom_pull(task_ids="plan_day"), ti.xcom_pull(task_ids="train"))
        return s.jinja_literal(script)

    score_app, score_args = s.score_job(T)
    score = SparkSubmitOperator(
        task_id="score",
        conn_id=str(DEFAULTS["spark_conn_id"]),
        spark_binary="spark-submit",
        application=score_app,
        application_args=score_args,
        conf=s.spark_conf(T),
        env_vars=env,
        name="esmm-score",
        execution_timeout=timeouts["score"],
    )

    settings = plan_day()
    training_plan = plan_training(settings)
    wait_for_raw_logs(settings) >> build_features >> training_plan
    training_plan >> train >> promote() >> score
