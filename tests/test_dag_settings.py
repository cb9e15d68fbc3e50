"""The DAG's logic (``airflow_dags/esmm_settings.py``) without Airflow: settings precedence,
days, paths, the raw folders a day waits for, the training window and the command lines."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest
import yaml

from airflow_dags import esmm_settings as s
from tests.helpers import PROJECT_ROOT, VENV_BIN

SHIPPED = PROJECT_ROOT / "conf" / "pipeline.yaml"


@pytest.fixture
def defaults() -> dict:
    """The shipped per-run settings (the DAG's params)."""
    return s.run_settings(s.load_defaults(SHIPPED))


def resolve(settings: dict, logical: str = "2026-01-10", **kwargs) -> dict:
    kwargs.setdefault("promotion", {"alias": "champion"})
    kwargs.setdefault("environ", {})
    return s.resolve_paths(settings, date.fromisoformat(logical), **kwargs)


# ---- conf/pipeline.yaml --------------------------------------------------------------------


def test_load_defaults_reads_the_dag_section_and_fails_clearly(tmp_path):
    assert s.load_defaults(SHIPPED)["registered_model_name"] == "esmm"
    with pytest.raises(RuntimeError, match=r"cannot read .*missing\.yaml"):
        s.load_defaults(tmp_path / "missing.yaml")
    no_dag = tmp_path / "no_dag.yaml"
    no_dag.write_text("promotion: {alias: prod}\n")
    with pytest.raises(RuntimeError, match="has no 'dag:' mapping"):
        s.load_defaults(no_dag)
    assert s.load_promotion(no_dag) == {"alias": "prod"}


def test_run_settings_leave_the_parse_time_keys_out(defaults):
    assert not set(defaults) & s.PARSE_TIME_KEYS
    assert {"raw_root", "np", "train_window_days", "promotion_overrides"} <= set(defaults)


# ---- precedence --------------------------------------------------------------------------


def test_merge_precedence_is_yaml_then_variable_then_params_that_differ():
    defaults = {"np": 2, "hosts": "localhost:2", "rebuild_days": 0, "raw_root": "raw"}
    variable = {"np": 8, "hosts": "h1:4,h2:4"}
    # np equals its YAML default in the params: "not set for this run", the Variable wins;
    # hosts and rebuild_days differ from the default: the run's params win.
    params = {"np": 2, "hosts": "h3:8", "rebuild_days": 3, "raw_root": "raw"}
    merged = s.merge_settings(defaults, variable, params)
    assert merged == {"np": 8, "hosts": "h3:8", "rebuild_days": 3, "raw_root": "raw"}
    assert s.merge_settings(defaults, {}, {}) == defaults
    assert s.merge_settings(defaults, variable, {})["np"] == 8


def test_unknown_variable_keys_are_rejected_with_the_known_ones():
    with pytest.raises(ValueError) as error:
        s.merge_settings({"np": 2, "hosts": "h"}, {"np": 4, "nmp": 4, "typo": 1}, {})
    message = str(error.value)
    assert "Variable esmm_daily: unknown keys ['nmp', 'typo']" in message
    assert "known: ['hosts', 'np']" in message


def test_a_parse_time_key_in_the_variable_says_where_it_belongs():
    with pytest.raises(ValueError, match=r"\['retries'\] are fixed when the DAG is parsed"):
        s.merge_settings({"np": 2}, {"retries": 5}, {})


def test_the_variable_must_be_a_json_object():
    with pytest.raises(ValueError, match="must be a JSON object, got list"):
        s.merge_settings({"np": 2}, ["np"], {})


# ---- resolved settings -------------------------------------------------------------------


def test_paths_resolve_against_project_root(defaults, tmp_path):
    settings = {
        **defaults,
        "project_root": str(tmp_path),
        "features_root": "/data/features",
        "predictions_root": "hdfs:///esmm/predictions",
    }
    resolved = resolve(settings)
    assert resolved["project_root"] == str(tmp_path.resolve())
    assert resolved["raw_root"] == str(tmp_path.resolve() / "var/pipeline/raw")
    assert resolved["train_config"] == str(tmp_path.resolve() / "conf/train.yaml")
    assert resolved["bin"] == str(tmp_path.resolve() / ".venv/bin")
    assert resolved["features_root"] == "/data/features"  # absolute: kept
    assert resolved["predictions_root"] == "hdfs:///esmm/predictions"  # a URL: kept
    assert resolved["oracle_root"] is None  # null: none
    assert resolved["checkpoint_dir"] == f"{resolved['checkpoint_root']}/{resolved['day']}"
    assert resolved["train_summary"] == f"{resolved['checkpoint_dir']}/train_summary.json"
    # project_root null = the folder above airflow_dags/
    assert resolve(defaults)["project_root"] == str(PROJECT_ROOT.resolve())


def test_day_is_the_logical_date_minus_label_delay_days(defaults):
    assert resolve({**defaults, "label_delay_days": 3}, "2026-03-01")["day"] == "2026-02-26"
    assert resolve({**defaults, "label_delay_days": 0}, "2026-03-01")["day"] == "2026-03-01"
    assert resolve(defaults)["run_name"] == f"esmm_daily-{resolve(defaults)['day']}"


def test_the_first_build_day_goes_back_rebuild_days(defaults):
    settings = {**defaults, "label_delay_days": 1}
    assert resolve({**settings, "rebuild_days": 0}, "2026-01-04")["first_build_day"] == "2026-01-03"
    assert resolve({**settings, "rebuild_days": 6}, "2026-01-04")["first_build_day"] == "2025-12-28"


@pytest.mark.parametrize(
    ("key", "value"), [("label_delay_days", -1), ("rebuild_days", -2), ("train_window_days", 0)]
)
def test_impossible_day_counts_are_rejected(defaults, key, value):
    with pytest.raises(ValueError, match=key):
        resolve({**defaults, key: value})


def test_tracking_uri_precedence_setting_then_worker_env_then_local_sqlite(defaults):
    environ = {"MLFLOW_TRACKING_URI": "http://from-env:5000"}
    setting = {**defaults, "tracking_uri": "https://mlflow.internal"}
    assert resolve(setting, environ=environ)["tracking_uri"] == "https://mlflow.internal"
    assert resolve(defaults, environ=environ)["tracking_uri"] == "http://from-env:5000"
    expected = f"sqlite:///{PROJECT_ROOT.resolve() / 'var/mlflow/mlflow.db'}"
    assert resolve(defaults, environ={})["tracking_uri"] == expected


def test_the_model_uri_takes_the_alias_from_the_config(defaults, tmp_path):
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"dag": {}, "promotion": {"alias": "production"}}))
    resolved = resolve(
        {**defaults, "registered_model_name": "m"},
        promotion=s.load_promotion(config),
        config_file=config,
    )
    assert resolved["model_uri"] == "models:/m@production"
    assert resolved["pipeline_config"] == str(config.resolve())  # the gate reads the same file
    # the shipped file's alias; the gate's default when the section has none
    shipped_alias = yaml.safe_load(SHIPPED.read_text())["promotion"]["alias"]
    assert resolve(defaults, promotion=s.load_promotion(SHIPPED))["alias"] == shipped_alias
    assert resolve(defaults, promotion={})["model_uri"] == "models:/esmm@champion"


def test_a_promotion_override_of_the_alias_wins_over_the_file(defaults):
    overrides = ["promotion.min_auc=0.0", "promotion.alias=canary"]
    resolved = resolve({**defaults, "promotion_overrides": overrides}, promotion={"alias": "prod"})
    assert resolved["model_uri"] == "models:/esmm@canary"
    assert s.gate_alias({"alias": "prod"}, ["promotion.min_auc=0.0"]) == "prod"
    with pytest.raises(ValueError, match="promotion_overrides: override 'alias' is not of the"):
        s.gate_alias({}, ["alias"])
    with pytest.raises(ValueError, match=r"promotion\.alias is empty"):
        s.gate_alias({}, ["promotion.alias="])


# ---- days --------------------------------------------------------------------------------


def test_the_raw_folders_a_day_waits_for(defaults):
    resolved = resolve(
        {**defaults, "raw_root": "/raw", "label_delay_days": 2, "rebuild_days": 0}, "2026-01-05"
    )
    assert s.raw_folders(resolved) == [
        *(f"/raw/{log}/dt={d}" for d in ("2026-01-03", "2026-01-04", "2026-01-05")
          for log in ("impressions", "clicks", "conversions")),
        "/raw/users/dt=2026-01-03",
        "/raw/items/dt=2026-01-03",
    ]  # fmt: skip


def test_a_rebuild_waits_for_the_profiles_of_every_built_day(defaults):
    resolved = resolve(
        {**defaults, "raw_root": "/raw", "label_delay_days": 1, "rebuild_days": 1}, "2026-01-04"
    )
    folders = s.raw_folders(resolved)
    assert [f for f in folders if "/users/" in f] == [
        "/raw/users/dt=2026-01-02",
        "/raw/users/dt=2026-01-03",
    ]
    assert "/raw/clicks/dt=2026-01-04" in folders  # D + label_delay_days
    assert "/raw/clicks/dt=2026-01-05" not in folders
    assert len(folders) == len(set(folders)) == 3 * 3 + 2 * 2


def test_the_newest_days_of_the_window_choose_the_epoch_when_it_can_spare_them(resolved):
    window = ["2026-01-05", "2026-01-06", "2026-01-07"]
    assert s.split_window({**resolved, "valid_days": 1}, window) == (window[:2], window[2:])
    assert s.split_window({**resolved, "valid_days": 2}, window) == (window[:1], window[1:])
    assert s.split_window({**resolved, "valid_days": 0}, window) == (window, [])
    assert s.split_window({**resolved, "valid_days": 3}, window) == (window, [])  # too short
    with pytest.raises(ValueError, match="valid_days must be >= 0"):
        s.split_window({**resolved, "valid_days": -1}, window)
    command = s.train_command(resolved, window[:2], window[2:])
    assert command[command.index("--valid-date") + 1] == "2026-01-07"
    assert "--valid-date" not in s.train_command(resolved, window)


def test_the_training_window_is_clipped_to_the_days_that_exist(defaults):
    resolved = resolve(
        {**defaults, "features_root": "/f", "label_delay_days": 0, "train_window_days": 3},
        "2026-01-10",
    )
    present = {"/f/dt=2026-01-07", "/f/dt=2026-01-09", "/f/dt=2026-01-10", "/f/dt=2026-01-01"}
    assert s.training_window(resolved, present.__contains__) == ["2026-01-07", "2026-01-09"]
    everything = resolve({**resolved, "train_window_days": 2})
    assert s.training_window(everything, lambda path: True) == ["2026-01-08", "2026-01-09"]


def test_no_feature_day_in_the_window_is_a_clear_error(defaults, tmp_path):
    resolved = resolve(
        {**defaults, "features_root": str(tmp_path), "label_delay_days": 0, "train_window_days": 2},
        "2026-01-10",
    )
    (tmp_path / "dt=2026-01-10").mkdir()  # D itself is not a training day
    with pytest.raises(ValueError) as error:
        s.training_window(resolved)
    message = str(error.value)
    assert "no feature days to train on in 2026-01-08 .. 2026-01-09" in message
    assert str(tmp_path) in message and "rebuild_days >= 1" in message
    (tmp_path / "dt=2026-01-08").mkdir()
    assert s.training_window(resolved) == ["2026-01-08"]  # os.path.isdir by default


# ---- command lines -----------------------------------------------------------------------


@pytest.fixture
def resolved(defaults) -> dict:
    settings = {
        **defaults,
        "project_root": "/p",
        "raw_root": "/raw",
        "features_root": "/feat",
        "predictions_root": "/pred",
        "checkpoint_root": "/ckpt",
        "fields_config": "/fields.yaml",
        "registered_model_name": "esmm-x",
        "label_delay_days": 1,
        "rebuild_days": 1,
        "np": 4,
        "hosts": "h1:2,h2:2",
        "train_overrides": ["epochs=1"],
        "promotion_overrides": ["promotion.min_auc=0.0"],
    }
    return resolve(settings, "2026-01-04", config_file=Path("/p/conf/pipeline.yaml"))


def test_the_feature_and_scoring_jobs_use_the_contract_command_lines(resolved):
    application, args = s.features_job(resolved)
    assert application == "/p/jobs/build_features.py"
    assert args == [
        *("--raw", "/raw", "--out", "/feat"),
        *("--start-date", "2026-01-02", "--end-date", "2026-01-03", "--fields", "/fields.yaml"),
    ]
    application, args = s.score_job(resolved)
    assert application == "/p/jobs/score.py"
    assert args == [
        *("--features", "/feat", "--date", "2026-01-03"),
        *("--model", "models:/esmm-x@champion", "--out", "/pred"),
    ]
    assert s.spark_conf(resolved)["spark.driver.memory"] == resolved["spark_driver_memory"]


def test_operator_arguments_fixed_at_parse_time_are_jinja_expressions():
    application, args = s.features_job(s.TEMPLATES)
    assert application == "{{ ti.xcom_pull(task_ids='plan_day')['project_root'] }}" + (
        "/jobs/build_features.py"
    )
    assert args[args.index("--end-date") + 1] == "{{ ti.xcom_pull(task_ids='plan_day')['day'] }}"
    env = s.pipeline_env(s.TEMPLATES, path="/usr/bin")
    assert env["PATH"] == "{{ ti.xcom_pull(task_ids='plan_day')['bin'] }}:/usr/bin"
    assert env["OMP_NUM_THREADS"] == "1"


def test_the_trainer_command_line(resolved):
    command = s.train_command(resolved, ["2026-01-01", "2026-01-02"])
    assert command[:9] == [
        *("/p/.venv/bin/horovodrun", "-np", "4", "-H", "h1:2,h2:2", "--gloo"),
        *("/p/.venv/bin/python", "-m", "esmm.train"),
    ]
    options = command[9:]

    def value(flag: str) -> str:
        return options[options.index(flag) + 1]

    assert value("--train-dates") == "2026-01-01,2026-01-02"
    assert value("--eval-date") == "2026-01-03"
    assert value("--checkpoint-dir") == "/ckpt/2026-01-03"
    assert value("--summary-json") == "/ckpt/2026-01-03/train_summary.json"
    assert value("--run-name") == "esmm_daily-2026-01-03"
    assert "--no-progress" in options and "--oracle" not in options
    sets = [options[i + 1] for i, o in enumerate(options) if o == "--set"]
    assert sets == ["tracking.registered_model_name=esmm-x", "epochs=1"]  # overrides last
    with_oracle = s.train_command({**resolved, "oracle_root": "/raw/oracle"}, ["2026-01-02"])
    assert with_oracle[with_oracle.index("--oracle") + 1] == "/raw/oracle"


def test_the_train_script_removes_the_old_summary_trains_then_reads_the_version(resolved):
    lines = s.train_script(resolved, ["2026-01-02"]).splitlines()
    assert lines[:3] == ["set -euo pipefail", "cd /p", "rm -f /ckpt/2026-01-03/train_summary.json"]
    assert lines[3].startswith("/p/.venv/bin/horovodrun ")
    assert lines[4] == (
        f"/p/.venv/bin/python {Path(s.__file__).resolve()} registered-version "
        "/ckpt/2026-01-03/train_summary.json"
    )


def test_the_gate_command_line(resolved):
    command = s.gate_command(resolved, "7")
    assert command == [
        *("/p/.venv/bin/python", "-m", "esmm.promotion", "--model", "esmm-x", "--version", "7"),
        *("--features", "/feat", "--eval-date", "2026-01-03"),
        *("--config", "/p/conf/pipeline.yaml", "--set", "promotion.min_auc=0.0"),
    ]
    assert s.gate_script(resolved, "7\n").startswith("cd /p && /p/.venv/bin/python -m esmm")
    with pytest.raises(ValueError, match="returned no model version"):
        s.gate_script(resolved, None)


def test_a_bash_task_command_survives_jinja_rendering_unchanged():
    jinja2 = pytest.importorskip("jinja2")
    text = "echo '{{ not a template }}' {# nor a comment #} {% if %}"
    assert jinja2.Template(s.jinja_literal(text)).render() == text


# ---- the trainer's summary ---------------------------------------------------------------


def write_summary(path: Path, version: str | None) -> Path:
    path.write_text(json.dumps({"run_id": "r1", "registered_version": version, "metrics": {}}))
    return path


def test_the_registered_version_is_read_from_the_summary(tmp_path, capsys):
    summary = write_summary(tmp_path / "summary.json", "12")
    assert s.registered_version(summary) == ("12", "r1")
    assert s.main(["registered-version", str(summary)]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == "12"  # the last line: the task's XCom
    assert f"registered version 12 (python {sys.executable})" in err


def test_no_registered_version_fails_with_a_clear_message(tmp_path, capsys):
    summary = write_summary(tmp_path / "summary.json", None)
    with pytest.raises(s.SummaryError, match="registered no model version"):
        s.registered_version(summary)
    assert s.main(["registered-version", str(summary)]) == 1
    assert "esmm.train registered no model version" in capsys.readouterr().err
    with pytest.raises(s.SummaryError, match="wrote no summary at"):
        s.registered_version(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(s.SummaryError, match="cannot read"):
        s.registered_version(tmp_path / "bad.json")
    assert s.main(["something-else"]) == 2


def test_the_module_imports_neither_airflow_nor_torch_nor_pyspark():
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import esmm_settings; "
        "print([m for m in ('airflow', 'torch', 'pyspark', 'horovod', 'mlflow') "
        "if m in sys.modules])"
    )
    result = subprocess.run(
        [str(VENV_BIN / "python"), "-c", script, str(PROJECT_ROOT / "airflow_dags")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_airflow_does_not_parse_the_settings_module_as_a_dag():
    ignored = (PROJECT_ROOT / "airflow_dags" / ".airflowignore").read_text().split()
    assert "esmm_settings.py" in ignored
