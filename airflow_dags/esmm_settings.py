"""The logic of the ``esmm_daily`` DAG, without Airflow: settings, days, paths, command lines.

``airflow_dags/esmm_daily.py`` only wires these functions into tasks; everything here is
plain Python (PyYAML and the project's :mod:`contract` package, which imports neither torch
nor pyspark), so ``tests/test_dag_settings.py`` tests it from the pipeline venv in
milliseconds, and Airflow's DAG processor can import it.

Importing :mod:`contract`: Airflow puts the DAG folder (``airflow_dags/``) on ``sys.path``,
not the project, so this module appends the project root to ``sys.path`` before it imports
``contract``. The root is the folder above the real location of this file (a symlinked DAG
folder or file resolves to the checkout), or ``$ESMM_PROJECT_ROOT`` when the files were
copied elsewhere. It is appended, not prepended, so nothing of the project can shadow a
package of the Airflow environment.

The command lines of the jobs, the trainer and the gate come from
:mod:`contract.commands`; the functions that build them take a mapping of settings whose
values are either real (a resolved ``plan_day`` XCom) or Jinja expressions
(:data:`TEMPLATES`, for operator arguments fixed when the DAG is parsed).

This file is in ``airflow_dags/.airflowignore``: it defines no DAG, so the DAG processor
does not parse it on its own. Run as a script (``python esmm_settings.py registered-version
SUMMARY_JSON``), it prints the model version the trainer registered (the ``train`` task's
last step).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(
    os.environ.get("ESMM_PROJECT_ROOT") or Path(__file__).resolve().parents[1]
).resolve()
if str(PROJECT_ROOT) not in sys.path:
    sys.path.append(str(PROJECT_ROOT))

from contract import commands  # noqa: E402
from contract.config import ConfigError, parse_overrides  # noqa: E402
from contract.dates import day_range, parse_day  # noqa: E402
from contract.layout import partition_dir  # noqa: E402

DAG_ID = "esmm_daily"
CONFIG_FILE = Path(os.environ.get("ESMM_PIPELINE_CONFIG", PROJECT_ROOT / "conf/pipeline.yaml"))
# Logs the feature job reads for a day it builds: the event logs (their label folders after
# the day too) and the profile snapshots of the day itself.
EVENT_LOGS = ("impressions", "clicks", "conversions")
PROFILE_LOGS = ("users", "items")
# Settings fixed when the DAG is parsed (not per run, not in the Variable).
PARSE_TIME_KEYS = frozenset(
    {
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
)
# Settings that are paths: resolved against project_root unless absolute or a URL.
PATH_KEYS = (
    "pipeline_venv",
    "raw_root",
    "features_root",
    "predictions_root",
    "checkpoint_root",
    "oracle_root",
    "train_config",
    "fields_config",
)
# esmm.promotion's GateConfig.alias default, for a promotion: section without one.
DEFAULT_ALIAS = "champion"
SUMMARY_FILE = "train_summary.json"


# ---- conf/pipeline.yaml ------------------------------------------------------------------


def read_config(path: Path = CONFIG_FILE) -> dict[str, Any]:
    """conf/pipeline.yaml as a dict; a clear error if it cannot be read."""
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise RuntimeError(f"{DAG_ID}: cannot read {path}: {exc}") from None
    if not isinstance(config, dict):
        raise RuntimeError(f"{DAG_ID}: {path} is not a mapping")
    return config


def load_defaults(path: Path = CONFIG_FILE) -> dict[str, Any]:
    """The ``dag:`` section of conf/pipeline.yaml; a clear error if it is missing."""
    section = read_config(path).get("dag")
    if not isinstance(section, dict):
        raise RuntimeError(f"{DAG_ID}: {path} has no 'dag:' mapping")
    return section


def load_promotion(path: Path = CONFIG_FILE) -> dict[str, Any]:
    """The ``promotion:`` section of the same file (``{}`` when absent: the gate's defaults)."""
    section = read_config(path).get("promotion") or {}
    if not isinstance(section, dict):
        raise RuntimeError(f"{DAG_ID}: {path}: 'promotion:' is not a mapping")
    return section


def run_settings(defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The per-run settings (the DAG's params): every ``dag:`` key but the parse-time ones."""
    return {k: v for k, v in defaults.items() if k not in PARSE_TIME_KEYS}


# ---- settings of one run -----------------------------------------------------------------


def merge_settings(
    defaults: Mapping[str, Any], variable: Mapping[str, Any], params: Mapping[str, Any]
) -> dict[str, Any]:
    """conf/pipeline.yaml < Variable ``esmm_daily`` < params that differ from the YAML default.

    A param equal to its YAML default is taken as "not set for this run", so the Variable can
    still change it for every run. A Variable key that is not a per-run setting is an error.
    """
    if not isinstance(variable, Mapping):
        raise ValueError(
            f"Variable {DAG_ID} must be a JSON object, got {type(variable).__name__}: {variable!r}"
        )
    unknown = sorted(set(variable) - set(defaults))
    if unknown:
        fixed = [k for k in unknown if k in PARSE_TIME_KEYS]
        hint = (
            f"; {fixed} are fixed when the DAG is parsed: set them in conf/pipeline.yaml"
            if fixed
            else ""
        )
        raise ValueError(
            f"Variable {DAG_ID}: unknown keys {unknown}; known: {sorted(defaults)}{hint}"
        )
    merged = {**defaults, **variable}
    for key, value in params.items():
        if key in defaults and value != defaults[key]:
            merged[key] = value
    return merged


def gate_alias(promotion: Mapping[str, Any], overrides: Sequence[str] = ()) -> str:
    """The alias the gate moves: ``promotion.alias`` of the YAML, unless one of the gate's
    ``--set`` overrides (``promotion_overrides``) sets ``promotion.alias=...``."""
    alias = promotion.get("alias", DEFAULT_ALIAS)
    try:
        override = parse_overrides(overrides).get("promotion")
    except ConfigError as exc:
        raise ValueError(f"{DAG_ID}: promotion_overrides: {exc}") from None
    if isinstance(override, Mapping) and "alias" in override:
        alias = override["alias"]
    if alias is None or not str(alias).strip():
        raise ValueError(f"{DAG_ID}: promotion.alias is empty")
    return str(alias).strip()


def _is_url(value: str) -> bool:
    return "://" in value


def resolve_paths(
    settings: Mapping[str, Any],
    logical_date: date,
    promotion: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: Path = CONFIG_FILE,
) -> dict[str, Any]:
    """Absolute paths, the day D and derived values: everything a task needs.

    Args:
        settings: the merged settings (:func:`merge_settings`).
        logical_date: the run's logical date; D = logical_date - ``label_delay_days``.
        promotion: the ``promotion:`` section of ``config_file`` (the gate reads the same
            file), for the alias that is scored.
        environ: where ``MLFLOW_TRACKING_URI`` is looked up (default ``os.environ``).
        config_file: the pipeline config, passed to the gate as ``--config``.
    """
    environ = os.environ if environ is None else environ
    root = Path(settings["project_root"] or PROJECT_ROOT).resolve()

    def absolute(value: str | None) -> str | None:
        if value is None or _is_url(str(value)):
            return value
        return str((root / value).resolve())

    for key in ("label_delay_days", "rebuild_days"):
        if int(settings[key]) < 0:
            raise ValueError(f"{DAG_ID}: {key} must be >= 0, got {settings[key]}")
    if int(settings["train_window_days"]) < 1:
        raise ValueError(
            f"{DAG_ID}: train_window_days must be >= 1, got {settings['train_window_days']}"
        )
    resolved = dict(settings)
    resolved["project_root"] = str(root)
    for key in PATH_KEYS:
        resolved[key] = absolute(settings[key])
    day = logical_date - timedelta(days=int(settings["label_delay_days"]))
    resolved["day"] = day.isoformat()
    resolved["first_build_day"] = (day - timedelta(days=int(settings["rebuild_days"]))).isoformat()
    resolved["bin"] = f"{resolved['pipeline_venv']}/bin"
    resolved["tracking_uri"] = (
        settings["tracking_uri"]
        or environ.get("MLFLOW_TRACKING_URI")
        or f"sqlite:///{root / 'var' / 'mlflow' / 'mlflow.db'}"
    )
    resolved["pipeline_config"] = str(Path(config_file).resolve())
    resolved["alias"] = gate_alias(promotion or {}, settings["promotion_overrides"])
    resolved["model_uri"] = f"models:/{settings['registered_model_name']}@{resolved['alias']}"
    resolved["checkpoint_dir"] = f"{resolved['checkpoint_root']}/{resolved['day']}"
    resolved["train_summary"] = f"{resolved['checkpoint_dir']}/{SUMMARY_FILE}"
    resolved["run_name"] = f"{DAG_ID}-{resolved['day']}"
    return resolved


# ---- days --------------------------------------------------------------------------------


def raw_folders(settings: Mapping[str, Any]) -> list[str]:
    """The raw folders the run needs before it builds: the event logs of every built day up
    to D + ``label_delay_days`` (the last label folders) and the profiles of every built day."""
    raw = str(settings["raw_root"]).rstrip("/")
    first = parse_day(settings["first_build_day"], "first_build_day")
    day = parse_day(settings["day"], "day")
    last = day + timedelta(days=int(settings["label_delay_days"]))
    events = [
        partition_dir(f"{raw}/{log}", d) for d in day_range(first, last) for log in EVENT_LOGS
    ]
    profiles = [
        partition_dir(f"{raw}/{log}", d) for d in day_range(first, day) for log in PROFILE_LOGS
    ]
    return events + profiles


def training_window(
    settings: Mapping[str, Any], exists: Callable[[str], bool] = os.path.isdir
) -> list[str]:
    """The up to ``train_window_days`` days before D whose feature partition exists, oldest
    first; a clear error when none does."""
    day = parse_day(settings["day"], "day")
    window = int(settings["train_window_days"])
    candidates = day_range(day - timedelta(days=window), day - timedelta(days=1))
    features = settings["features_root"]
    available = [d for d in candidates if exists(partition_dir(features, d))]
    if not available:
        raise ValueError(
            f"{DAG_ID}: no feature days to train on in {candidates[0]} .. {candidates[-1]} "
            f"(the {window} days before {day}) in {features}: run with rebuild_days >= 1 once "
            "(backfill) or build them with jobs/build_features.py"
        )
    return available


def split_window(settings: Mapping[str, Any], window: Sequence[str]) -> tuple[list, list]:
    """``(train days, validation days)``: the newest ``valid_days`` days of the window choose
    the epoch the run keeps (``--valid-date``, esmm/selection.py) and are not trained on. A
    window too short to spare them trains on every day and keeps the last epoch."""
    valid_days = int(settings["valid_days"])
    if valid_days < 0:
        raise ValueError(f"{DAG_ID}: valid_days must be >= 0, got {valid_days}")
    if valid_days == 0 or len(window) <= valid_days:
        return list(window), []
    return list(window[:-valid_days]), list(window[-valid_days:])


# ---- the tasks' environment and command lines --------------------------------------------


class _Templates(Mapping[str, str]):
    """``TEMPLATES[key]``: the Jinja expression of the resolved setting ``key`` (``plan_day``'s
    XCom), for operator arguments fixed when the DAG is parsed."""

    def __getitem__(self, key: str) -> str:
        return "{{ ti.xcom_pull(task_ids='plan_day')['" + key + "'] }}"

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


TEMPLATES: Mapping[str, str] = _Templates()


def pipeline_env(settings: Mapping[str, Any], path: str | None = None) -> dict[str, str]:
    """The environment of every step: the pipeline venv first on PATH, the project importable,
    the run's MLflow tracking URI, one OpenMP thread per process."""
    path = os.environ.get("PATH", "/usr/bin:/bin") if path is None else path
    return {
        "PATH": f"{settings['bin']}{os.pathsep}{path}",
        "PYTHONPATH": settings["project_root"],
        "PYSPARK_PYTHON": f"{settings['bin']}/python",
        "MLFLOW_TRACKING_URI": settings["tracking_uri"],
        "OMP_NUM_THREADS": "1",
    }


def spark_conf(settings: Mapping[str, Any]) -> dict[str, str]:
    """The Spark conf of both Spark jobs (the master comes from the Spark connection)."""
    return {
        "spark.driver.memory": settings["spark_driver_memory"],
        "spark.executor.memory": settings["spark_executor_memory"],
        "spark.ui.showConsoleProgress": "false",
    }


def features_job(settings: Mapping[str, Any]) -> tuple[str, list[str]]:
    """``(application, application_args)`` of ``jobs/build_features.py`` for the days
    ``first_build_day .. day``."""
    args = commands.build_features_args(
        raw=settings["raw_root"],
        out=settings["features_root"],
        start_date=settings["first_build_day"],
        end_date=settings["day"],
        fields=settings["fields_config"],
    )
    return commands.job_script("build_features", settings["project_root"]), args


def score_job(settings: Mapping[str, Any]) -> tuple[str, list[str]]:
    """``(application, application_args)`` of ``jobs/score.py``: D with the alias's model."""
    args = commands.score_args(
        features=settings["features_root"],
        date=settings["day"],
        model=settings["model_uri"],
        out=settings["predictions_root"],
    )
    return commands.job_script("score", settings["project_root"]), args


def train_command(
    settings: Mapping[str, Any], train_dates: Sequence[str], valid_dates: Sequence[str] = ()
) -> list[str]:
    """``horovodrun ... python -m esmm.train ...`` on ``train_dates``, the epoch chosen on
    ``valid_dates`` (when any), evaluated on D; the trainer writes its summary (run id,
    registered version) to ``train_summary``."""
    args = commands.train_args(
        config=settings["train_config"],
        fields=settings["fields_config"],
        features=settings["features_root"],
        train_dates=",".join(train_dates),
        valid_date=",".join(valid_dates) or None,
        eval_date=settings["day"],
        oracle=settings["oracle_root"] or None,
        checkpoint_dir=settings["checkpoint_dir"],
        run_name=settings["run_name"],
        summary_json=settings["train_summary"],
        no_progress=True,
        sets=[
            f"tracking.registered_model_name={settings['registered_model_name']}",
            *settings["train_overrides"],
        ],
    )
    return commands.trainer(
        settings["bin"],
        settings["np"],
        args,
        hosts=settings["hosts"],
        options=settings["horovodrun_options"],
    )


def train_script(
    settings: Mapping[str, Any], train_dates: Sequence[str], valid_dates: Sequence[str] = ()
) -> str:
    """The ``train`` task's bash script: drop a previous attempt's summary, train, then print
    the registered version from the summary as the last line (the task's XCom); the task
    fails when the trainer fails or registered nothing."""
    summary = settings["train_summary"]
    read_version = [f"{settings['bin']}/python", str(Path(__file__).resolve())]
    return "\n".join(
        [
            "set -euo pipefail",
            f"cd {shlex.quote(settings['project_root'])}",
            f"rm -f {shlex.quote(summary)}",
            shlex.join(train_command(settings, train_dates, valid_dates)),
            shlex.join([*read_version, "registered-version", summary]),
        ]
    )


def gate_command(settings: Mapping[str, Any], version: str) -> list[str]:
    """``python -m esmm.promotion ...``: ``version`` against the alias's model on D, with the
    same pipeline config (and thus the same alias) the DAG read."""
    args = commands.promotion_args(
        model=settings["registered_model_name"],
        version=version,
        features=settings["features_root"],
        eval_date=settings["day"],
        config=settings["pipeline_config"],
        sets=settings["promotion_overrides"],
    )
    return commands.gate(settings["bin"], args)


def gate_script(settings: Mapping[str, Any], version: str | None) -> str:
    """The ``promote`` task's bash script."""
    if not version or not str(version).strip():
        raise ValueError(f"{DAG_ID}: the train task returned no model version")
    command = gate_command(settings, str(version).strip())
    return f"cd {shlex.quote(settings['project_root'])} && {shlex.join(command)}"


def jinja_literal(text: str) -> str:
    """``text`` wrapped so that Jinja renders it unchanged (a ``@task.bash`` command is
    rendered once more after the function returns it)."""
    return "{% raw %}" + text + "{% endraw %}"


# ---- the trainer's summary ---------------------------------------------------------------


class SummaryError(RuntimeError):
    """The trainer's summary JSON is missing, unreadable or names no registered version."""


def registered_version(summary: str | Path) -> tuple[str, str | None]:
    """``(registered_version, run_id)`` from the summary JSON that ``esmm.train
    --summary-json`` writes; :class:`SummaryError` when no version was registered."""
    path = Path(summary)
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise SummaryError(f"esmm.train wrote no summary at {path}") from None
    except (OSError, ValueError) as exc:
        raise SummaryError(f"cannot read the trainer's summary {path}: {exc}") from None
    version = payload.get("registered_version") if isinstance(payload, dict) else None
    if version is None or not str(version).strip():
        raise SummaryError(
            f"esmm.train registered no model version (summary {path}: registered_version is "
            f"{json.dumps(version)}; is tracking.registered_model_name empty?)"
        )
    return str(version).strip(), payload.get("run_id")


def main(argv: Sequence[str] | None = None) -> int:
    """``registered-version SUMMARY_JSON``: print the version (stdout, last line), or exit 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != "registered-version":
        print(f"usage: {Path(__file__).name} registered-version SUMMARY_JSON", file=sys.stderr)
        return 2
    try:
        version, run_id = registered_version(argv[1])
    except SummaryError as exc:
        print(f"{DAG_ID}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    # The interpreter that read the summary is the pipeline venv's (the same bin/ as the
    # horovodrun workers); tests/test_dag.py checks it.
    print(
        f"{DAG_ID}: MLflow run {run_id} registered version {version} (python {sys.executable})",
        file=sys.stderr,
        flush=True,
    )
    print(version, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
