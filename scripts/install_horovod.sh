#!/usr/bin/env bash
# Build Horovod 0.28.1 from the PyPI sdist against the torch already installed in the target
# virtual environment, and cache the wheel so later installs take seconds.
#
# Why a script and not a pin in pyproject.toml: Horovod 0.28.1 (the last release) asks CMake for
# C++14, but torch >= 2.1 headers need C++17 (fixed on horovod master by PR 3998, never
# released). We patch the two CMAKE_CXX_STANDARD lines and build with --no-build-isolation so
# Horovod's torch extension compiles against the torch in this environment.
#
# Usage: scripts/install_horovod.sh [PYTHON]          (default: .venv/bin/python)
# Environment:
#   HOROVOD_WHEEL_CACHE  where built wheels are kept (default: ~/.cache/esmm-pipeline/wheels)
#   HOROVOD_GPU=1        also build NCCL GPU operations (needs CUDA + NCCL, see README)
#   HOROVOD_WITH_MPI=1   also build the MPI controller (needs an MPI implementation)
#   CMAKE                the cmake binary to use (default: the system cmake; PyPI's cmake 4.x
#                        rejects gloo's old cmake_minimum_required)
#   CXX                  the C++ compiler (default g++; needs C++17)
set -euo pipefail

PY="${1:-.venv/bin/python}"
HOROVOD_VERSION=0.28.1
CACHE="${HOROVOD_WHEEL_CACHE:-$HOME/.cache/esmm-pipeline/wheels}"

die() { echo "install_horovod: ERROR: $*" >&2; exit 1; }

[ -x "$PY" ] || die "python '$PY' not found; create the virtual environment first (make venv)."

if "$PY" -c "import horovod.torch, horovod; assert horovod.__version__ == '$HOROVOD_VERSION'" 2>/dev/null; then
  echo "install_horovod: horovod $HOROVOD_VERSION already importable in $PY"
  exit 0
fi

TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__)" 2>/dev/null) \
  || die "torch is not installed in $PY; install the project first (pip install -e .)."
PYTAG=$("$PY" -c "import sys; print(f'cp{sys.version_info[0]}{sys.version_info[1]}')")
VARIANT="gloo"
[ "${HOROVOD_GPU:-0}" = "1" ] && VARIANT="${VARIANT}-nccl"
[ "${HOROVOD_WITH_MPI:-0}" = "1" ] && VARIANT="${VARIANT}-mpi"
# A wheel built against one torch does not load against another: key the cache on torch too.
KEY="horovod-${HOROVOD_VERSION}-torch${TORCH_VERSION//+/_}-${PYTAG}-${VARIANT}"
WHEEL_DIR="$CACHE/$KEY"

if ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
  echo "install_horovod: installing cached wheel from $WHEEL_DIR"
  "$PY" -m pip install --no-deps --force-reinstall -q "$WHEEL_DIR"/horovod-*.whl
  "$PY" -m pip install -q cloudpickle psutil pyyaml packaging cffi
  exit 0
fi

# Prerequisites, checked up front so a missing tool is one line, not a CMake log.
CMAKE=$(PYTHON="$PY" "$(dirname "$0")/check_prereqs.sh" build) || exit 1

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
echo "install_horovod: building horovod $HOROVOD_VERSION ($VARIANT) against torch $TORCH_VERSION; takes about 3 minutes on 2 cores"
"$PY" -m pip download -q --no-deps --no-binary :all: -d "$WORK" "horovod==$HOROVOD_VERSION" \
  || die "could not download the horovod $HOROVOD_VERSION sdist from the package index."
tar -xzf "$WORK"/horovod-"$HOROVOD_VERSION".tar.gz -C "$WORK"
SRC="$WORK/horovod-$HOROVOD_VERSION"
sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"
grep -q 'CMAKE_CXX_STANDARD 17' "$SRC/horovod/torch/CMakeLists.txt" \
  || die "the C++17 patch did not apply: horovod/torch/CMakeLists.txt changed upstream."

export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1
if [ "${HOROVOD_GPU:-0}" = "1" ]; then
  export HOROVOD_GPU_OPERATIONS=NCCL
else
  export HOROVOD_CPU_OPERATIONS=GLOO
fi
if [ "${HOROVOD_WITH_MPI:-0}" = "1" ]; then export HOROVOD_WITH_MPI=1; else export HOROVOD_WITHOUT_MPI=1; fi
export PATH="$(dirname "$CMAKE"):$PATH"
export MAKEFLAGS="-j$(nproc)"

"$PY" -m pip install -q wheel
LOG="$WORK/build.log"
if ! "$PY" -m pip wheel --no-build-isolation --no-deps -w "$WORK/dist" "$SRC" >"$LOG" 2>&1; then
  echo "install_horovod: build failed; the last lines of the build log:" >&2
  grep -E "error|Error|ERROR" "$LOG" | tail -15 >&2 || true
  tail -15 "$LOG" >&2
  mkdir -p "$CACHE" && cp "$LOG" "$CACHE/last-failed-build.log"
  die "horovod build failed (full log: $CACHE/last-failed-build.log)"
fi
mkdir -p "$WHEEL_DIR"
cp "$WORK"/dist/horovod-*.whl "$WHEEL_DIR/"
"$PY" -m pip install --no-deps --force-reinstall -q "$WHEEL_DIR"/horovod-*.whl
"$PY" -m pip install -q cloudpickle psutil pyyaml packaging cffi
echo "install_horovod: built and cached $(ls "$WHEEL_DIR")"
