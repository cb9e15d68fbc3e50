#!/usr/bin/env bash
# Create (or update) the project's virtual environment: pinned pipeline dependencies, the project
# in editable mode, and Horovod built by scripts/install_horovod.sh. Idempotent: a second run
# with an unchanged pyproject.toml finds everything in place and takes seconds.
#
# Usage: scripts/setup_env.sh [VENV_DIR]     (default: .venv)
# Environment: PYTHON (default: python3.11), the interpreter the venv is made from.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${1:-.venv}"
PYTHON="${PYTHON:-python3.11}"
# pip warns about every local index folder that lacks a package; drop only those lines
# (sed, unlike grep -v, exits 0 on empty input, so pipefail still reports pip's own failure).
quiet_pip() { sed '/is ignored: it is neither a file nor a directory/d'; }
die() { echo "setup_env: ERROR: $*" >&2; exit 1; }

PYTHON="$PYTHON" scripts/check_prereqs.sh runtime || exit 1

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup_env: creating $VENV"
  "$PYTHON" -m venv "$VENV" || die "could not create a venv with $PYTHON (apt-get install python3-venv?)"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade "pip>=24" 2>&1 | quiet_pip

echo "setup_env: installing the pinned pipeline dependencies and the project (pip install -e .[dev,reference])"
# Torch first and alone, pinned: with it in place pip never reaches for a CUDA build.
"$PY" -m pip install -q "torch==2.13.0" 2>&1 | quiet_pip
"$PY" -m pip install -q -e ".[dev,reference]" 2>&1 | quiet_pip
"$PY" -c "import torch, pyspark, pyarrow, petastorm, mlflow" \
  || die "the pipeline dependencies did not install; rerun with 'pip install -e .[dev,reference]' to see why."

scripts/install_horovod.sh "$PY"

"$PY" -c "import horovod.torch, petastorm, pyspark, mlflow, torch; print('setup_env: ok: torch', torch.__version__, '| pyspark', pyspark.__version__, '| petastorm', petastorm.__version__, '| mlflow', mlflow.__version__)"
