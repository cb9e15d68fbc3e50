#!/usr/bin/env bash
# Create the Airflow virtual environment (.airflow-venv): Airflow's pins are not the pipeline's
# (it brings its own SQLAlchemy, protobuf, ...), so it lives apart and its DAG calls the
# pipeline's own environment for the work. Idempotent.
#
# Usage: scripts/setup_airflow.sh [VENV_DIR]   (default: .airflow-venv)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${1:-.airflow-venv}"
PYTHON="${PYTHON:-python3.11}"
AIRFLOW_VERSION=3.3.2
# pip warns about every local index folder that lacks a package; drop only those lines
# (sed, unlike grep -v, exits 0 on empty input, so pipefail still reports pip's own failure).
quiet_pip() { sed '/is ignored: it is neither a file nor a directory/d'; }
die() { echo "setup_airflow: ERROR: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found. Install Python 3.11 or set PYTHON."
if [ -x "$VENV/bin/airflow" ] && "$VENV/bin/python" -c "import airflow, sys; sys.exit(airflow.__version__ != '$AIRFLOW_VERSION')" 2>/dev/null \
   && "$VENV/bin/python" -c "import airflow.providers.apache.spark" 2>/dev/null; then
  echo "setup_airflow: apache-airflow $AIRFLOW_VERSION already in $VENV"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "setup_airflow: installing apache-airflow $AIRFLOW_VERSION and the Spark provider into $VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip>=24" 2>&1 | quiet_pip
"$VENV/bin/python" -m pip install -q "apache-airflow==$AIRFLOW_VERSION" "apache-airflow-providers-apache-spark" "pyyaml>=6" 2>&1 | quiet_pip
"$VENV/bin/python" -c "import airflow, airflow.providers.apache.spark; print('setup_airflow: ok: airflow', airflow.__version__)" \
  || die "Airflow did not install into $VENV."
