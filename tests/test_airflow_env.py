"""The separate Airflow environment that the DAG runs in (its pins are not the pipeline's)."""

from __future__ import annotations

import subprocess

import pytest

from tests.helpers import PROJECT_ROOT

AIRFLOW_PYTHON = PROJECT_ROOT / ".airflow-venv" / "bin" / "python"


@pytest.mark.skipif(not AIRFLOW_PYTHON.exists(), reason="make airflow-venv has not run")
def test_airflow_env_has_airflow_3_and_the_spark_provider_apart_from_the_pipeline():
    result = subprocess.run(
        [
            str(AIRFLOW_PYTHON),
            "-c",
            "import airflow, airflow.providers.apache.spark.operators.spark_submit as s; "
            "import importlib.util as u; "
            "print(airflow.__version__, u.find_spec('torch') is None, "
            "u.find_spec('horovod') is None)",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    version, no_torch, no_horovod = result.stdout.split()
    assert version.startswith("3.")
    # the DAG calls the pipeline's own environment for the work; Airflow's stays light
    assert (no_torch, no_horovod) == ("True", "True")
