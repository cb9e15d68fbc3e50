"""The daily ESMM DAG: raw logs → features → Horovod training → promotion gate → scoring.

One run per logical date ``ds`` works on the day ``D = ds - label_delay_days``: the newest
day whose labels are final (a click or conversion of day D may arrive up to
``label_delay_days`` folders later, see conf/features.yaml). The run

1. ``plan_day``: merges the settings (conf/pipeline.yaml ``dag:`` < Airflow Variable
   ``esmm_daily`` < this run's params) and resolves every path;
2. ``wait_for_raw_logs``: waits until the raw folders of D .. D + label_delay_days exist;
3. ``build_features``: ``spark-submit jobs/build_features.py`` for D (and ``rebuild_days``
   before it), through the Spark provider's SparkSubmitOperator;
4. ``plan_training``: the sliding window of up to ``train_window_days`` feature days before D
   that exist;
5. ``train``: ``horovodrun ... python -m esmm.train`` on the window, evaluated on D; the
   model is registered in MLflow (the task's XCom is the new version);
6. ``promote``: ``python -m esmm.promotion``: the new version becomes ``champion`` only if it
   beats the champion on D (the decision is tagged on the version);
7. ``score``: ``spark-submit jobs/score.py`` writes D's predictions with the champion.

This file runs in the Airflow environment and imports nothing of the pipeline (no torch,
pyspark, horovod): every step runs the pipeline environment's own binaries. Every step is
idempotent (each writes a day atomically or registers a new version), so a failed day is
re-run by clearing its tasks.
"""

from __future__ import annotations

import os
import shlex
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from airflow.providers.apache.spark.operators.spark_submit import SparkSubmitOperator
from airflow.providers.standard.operators.bash import BashOperator
from airflow.sdk import DAG, Param, Variable, get_current_context, task

DAG_ID = "esmm_daily"
# The project root is the folder above airflow_dags/ unless a setting says otherwise, so the
# DAG works wherever the project is checked out.
DEFAULT_PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_FILE = Path(
    os.environ.get("ESMM_PIPELINE_CONFIG", DEFAULT_PROJECT_ROOT / "conf/pipeline.yaml")
)
# Logs the feature job needs for day D (profiles only on D itself) and the label logs whose
# folders after D must exist before D's labels are final.
EVENT_LOGS = ("impressions", "clicks", "conversions")
PROFILE_LOGS = ("users", "items")
# Settings fixed when the DAG is parsed (not per run).
PARSE_TIME_KEYS = {
    "schedule",
    "start_date",
    "catchup",
    "retries",
    "retry_delay_minutes",
    "sensor_poke_seconds",
    "sensor_timeout_seconds",
    "timeout_minutes",
    "spark_conn_id",
    "sensor_mode",
}


def load_defaults(path: Path = CONFIG_FILE) -> dict[str, Any]:
    """The ``dag:`` section of conf/pipeline.yaml; a clear error if it is missing."""
    try:
        section = (yaml.safe_load(path.read_text()) or {}).get("dag")
    except (OSError, yaml.YAMLError) as exc:
        raise RuntimeError(f"{DAG_ID}: cannot read {path}: {exc}") from None
    if not isinstance(section, dict):
        raise RuntimeError(f"{DAG_ID}: {path} has no 'dag:' mapping")
    return section


DEFAULTS = load_defaults()
RUN_SETTINGS = {k: v for k, v in DEFAULTS.items() if k not in PARSE_TIME_KEYS}


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


def setting(key: str) -> str:
    """A Jinja expression for one resolved setting (``plan_day``'s XCom)."""
    return "{{ ti.xcom_pull(task_ids='plan_day')['" + key + "'] }}"


def merge_settings(
    defaults: dict[str, Any], variable: dict[str, Any], params: dict[str, Any]
) -> dict[str, Any]:
    """conf/pipeline.yaml < Variable ``esmm_daily`` < params that differ from the YAML default.

    A param equal to its YAML default is taken as "not set for this run", so the Variable can
    still change it for every run.
    """
    unknown = sorted(set(variable) - set(defaults))
    if unknown:
        raise ValueError(f"Variable esmm_daily: unknown keys {unknown}; known: {sorted(defaults)}")
    merged = {**defaults, **variable}
    for key, value in params.items():
        if key in defaults and value != defaults[key]:
            merged[key] = value
    return merged


def resolve_paths(settings: dict[str, Any], logical_date: date) -> dict[str, Any]:
    """Absolute paths, the day D and derived values; everything a task template needs."""
    root = Path(settings["project_root"] or DEFAULT_PROJECT_ROOT).resolve()

    def absolute(value: str | None) -> str | None:
        return None if value is None else str((root / value).resolve())

    resolved = dict(settings)
    resolved["project_root"] = str(root)
    for key in (
        "pipeline_venv",
        "raw_root",
        "features_root",
        "predictions_root",
        "checkpoint_root",
        "oracle_root",
        "train_config",
        "fields_config",
    ):
        resolved[key] = absolute(settings[key])
    day = logical_date - timedelta(days=int(settings["label_delay_days"]))
    resolved["day"] = day.isoformat()
    resolved["first_build_day"] = (day - timedelta(days=int(settings["rebuild_days"]))).isoformat()
    resolved["bin"] = str(Path(resolved["pipeline_venv"]) / "bin")
    resolved["tracking_uri"] = (
        settings["tracking_uri"]
        or os.environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{root / 'var' / 'mlflow' / 'mlflow.db'}"
    )
    resolved["model_uri"] = f"models:/{settings['registered_model_name']}@champion"
    return resolved


def pipeline_env() -> dict[str, str]:
    """Environment of every pipeline step: its venv first on PATH, the project importable."""
    return {
        "PATH": setting("bin") + ":" + os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": setting("project_root"),
        "PYSPARK_PYTHON": setting("bin") + "/python",
        "MLFLOW_TRACKING_URI": setting("tracking_uri"),
        "OMP_NUM_THREADS": "1",
    }


default_args = {
    "retries": int(DEFAULTS["retries"]),
    "retry_delay": timedelta(minutes=float(DEFAULTS["retry_delay_minutes"])),
}
timeouts = {k: timedelta(minutes=float(v)) for k, v in DEFAULTS["timeout_minutes"].items()}

with DAG(
    dag_id=DAG_ID,
    description="ESMM: features → horovodrun training → promotion gate → batch scoring",
    schedule=DEFAULTS["schedule"],
    start_date=datetime.fromisoformat(str(DEFAULTS["start_date"])),
    catchup=bool(DEFAULTS["catchup"]),
    max_active_runs=1,  # runs share the registry's champion alias: one day after the other
    default_args=default_args,
    params={key: _param(value) for key, value in RUN_SETTINGS.items()},
    tags=["esmm"],
    doc_md=__doc__,
) as dag:

    @task(execution_timeout=timedelta(minutes=5))
    def plan_day() -> dict[str, Any]:
        """Resolve the settings of this run (see :func:`merge_settings`)."""
        context = get_current_context()
        variable = Variable.get(DAG_ID, default={}, deserialize_json=True)
        merged = merge_settings(RUN_SETTINGS, variable, dict(context["params"]))
        resolved = resolve_paths(merged, context["logical_date"].date())
        print(f"{DAG_ID}: day {resolved['day']}, settings {resolved}")
        return resolved

    @task.sensor(
        poke_interval=float(DEFAULTS["sensor_poke_seconds"]),
        timeout=float(DEFAULTS["sensor_timeout_seconds"]),
        mode=str(DEFAULTS["sensor_mode"]),
        execution_timeout=timedelta(seconds=float(DEFAULTS["sensor_timeout_seconds"])),
    )
    def wait_for_raw_logs(settings: dict[str, Any]) -> bool:
        """True once every raw folder the day's labels depend on exists."""
        raw = Path(settings["raw_root"])
        first = date.fromisoformat(settings["first_build_day"])
        day = date.fromisoformat(settings["day"])
        last = day + timedelta(days=int(settings["label_delay_days"]))
        needed = [
            raw / log / f"dt={(first + timedelta(days=i)).isoformat()}"
            for i in range((last - first).days + 1)
            for log in EVENT_LOGS
        ] + [raw / log / f"dt={day.isoformat()}" for log in PROFILE_LOGS]
        missing = [str(p) for p in needed if not p.is_dir()]
        if missing:
            print(f"{DAG_ID}: waiting for {len(missing)} raw folders, e.g. {missing[0]}")
        return not missing

    spark_conf = {
        "spark.driver.memory": setting("spark_driver_memory"),
        "spark.executor.memory": setting("spark_executor_memory"),
        "spark.ui.showConsoleProgress": "false",
    }

    build_features = SparkSubmitOperator(
        task_id="build_features",
        conn_id=str(DEFAULTS["spark_conn_id"]),
        spark_binary="spark-submit",  # found on the pipeline venv's PATH (env_vars)
        application=setting("project_root") + "/jobs/build_features.py",
        application_args=[
            "--raw",
            setting("raw_root"),
            "--out",
            setting("features_root"),
            "--start-date",
            setting("first_build_day"),
            "--end-date",
            setting("day"),
            "--fields",
            setting("fields_config"),
        ],
        conf=spark_conf,
        env_vars=pipeline_env(),
        name="esmm-build-features",
        execution_timeout=timeouts["features"],
    )

    @task(execution_timeout=timedelta(minutes=5))
    def plan_training(settings: dict[str, Any]) -> dict[str, str]:
        """The training window (feature days before D that exist) and the shell arguments."""
        day = date.fromisoformat(settings["day"])
        features = Path(settings["features_root"])
        window = [
            (day - timedelta(days=i)).isoformat()
            for i in range(int(settings["train_window_days"]), 0, -1)
        ]
        available = [d for d in window if (features / f"dt={d}").is_dir()]
        if not available:
            raise ValueError(
                f"no feature days to train on before {day} in {features}: run with "
                f"rebuild_days >= 1 once (backfill) or build them with jobs/build_features.py"
            )
        train_args = [
            "--config",
            settings["train_config"],
            "--fields",
            settings["fields_config"],
            "--features",
            settings["features_root"],
            "--train-dates",
            ",".join(available),
            "--eval-date",
            settings["day"],
            "--checkpoint-dir",
            f"{settings['checkpoint_root']}/{settings['day']}",
            "--run-name",
            f"{DAG_ID}-{settings['day']}",
            "--no-progress",
            "--set",
            f"tracking.registered_model_name={settings['registered_model_name']}",
        ]
        if settings["oracle_root"]:
            train_args += ["--oracle", settings["oracle_root"]]
        for override in settings["train_overrides"]:
            train_args += ["--set", override]
        promotion_args = [
            "--model",
            settings["registered_model_name"],
            "--features",
            settings["features_root"],
            "--eval-date",
            settings["day"],
        ]
        for override in settings["promotion_overrides"]:
            promotion_args += ["--set", override]
        print(f"{DAG_ID}: training on {available}, evaluating on {day}")
        return {
            "train_args": shlex.join(train_args),
            "promotion_args": shlex.join(promotion_args),
        }

    plan = "ti.xcom_pull(task_ids='plan_training')"
    # The trainer prints "Registered:   models:/NAME/V"; the last line echoed becomes the XCom
    # that the gate reads. A new version per attempt, so a retry never reuses a half-run.
    train = BashOperator(
        task_id="train",
        bash_command=(
            "set -euo pipefail\n"
            f'cd "{setting("project_root")}"\n'
            'log="$(mktemp)"\n'
            f'"{setting("bin")}/horovodrun" -np {setting("np")} -H {setting("hosts")} --gloo '
            f'"{setting("bin")}/python" -m esmm.train {{{{ {plan}["train_args"] }}}} '
            '2>&1 | tee "$log"\n'
            'version="$(grep -o \'Registered: *models:/[^ ]*\' "$log" | tail -1 '
            "| sed 's#.*/##')\"\n"
            'rm -f "$log"\n'
            'if [ -z "$version" ]; then\n'
            '  echo "esmm.train registered no model version" >&2; exit 1\n'
            "fi\n"
            'echo "$version"\n'
        ),
        env=pipeline_env(),
        append_env=True,
        execution_timeout=timeouts["train"],
    )

    promote = BashOperator(
        task_id="promote",
        bash_command=(
            f'cd "{setting("project_root")}" && "{setting("bin")}/python" -m esmm.promotion '
            "--version {{ ti.xcom_pull(task_ids='train') }} "
            f'{{{{ {plan}["promotion_args"] }}}}'
        ),
        env=pipeline_env(),
        append_env=True,
        execution_timeout=timeouts["promote"],
    )

    score = SparkSubmitOperator(
        task_id="score",
        conn_id=str(DEFAULTS["spark_conn_id"]),
        spark_binary="spark-submit",
        application=setting("project_root") + "/jobs/score.py",
        application_args=[
            "--features",
            setting("features_root"),
            "--date",
            setting("day"),
            "--model",
            setting("model_uri"),
            "--out",
            setting("predictions_root"),
        ],
        conf=spark_conf,
        env_vars=pipeline_env(),
        name="esmm-score",
        execution_timeout=timeouts["score"],
    )

    settings = plan_day()
    training_plan = plan_training(settings)
    wait_for_raw_logs(settings) >> build_features >> training_plan
    training_plan >> train >> promote >> score
