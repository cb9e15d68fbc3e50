#!/usr/bin/env bash
# One-shot check on a lent GPU machine (no network): the GPU input-vs-compute ratio and the
# CPU ratio on 2 pinned cores (the CI machine's size). Under 7 minutes on a 16-core H200 host.
#
# Needs the wheels of bench/device_wheels.py in .whl/ (carried along: they are git-ignored):
#     .venv/bin/python -m bench.device_wheels          # here, once
#     bash bench/device_check.sh [PYTHON]              # there, in the repo root (default python3)
# Parts: install the wheels into $SITE (/tmp/site), versions + nvidia-smi, bench/gpu.sh,
# bench.training in process on 2 cores with CUDA hidden. A failing part is reported and the
# next one runs; the exit status is 1 if any part failed. Output also goes to
# $OUT/device_check.log when $OUT is set.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${1:-python3}"
SITE="${SITE:-/tmp/site}"
if [ -n "${OUT:-}" ]; then
  exec > >(tee -a "$OUT/device_check.log") 2>&1
fi
FAILED=()

part() {
  local name=$1 started=$SECONDS rc
  shift
  echo
  echo "=== $name ($(date +%T))"
  "$@"
  rc=$?
  echo "=== $name: rc=$rc, $((SECONDS - started)) s"
  [ "$rc" -eq 0 ] || FAILED+=("$name (rc=$rc)")
  return 0
}

install_wheels() {
  ls .whl/*.whl >/dev/null || return 1
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || return 1
  # Python 3.12 has no distutils; petastorm.hdfs imports distutils.version.LooseVersion at
  # import time. setuptools' shim provides it where setuptools is installed; else a stand-in.
  if ! PYTHONPATH="$SITE" "$PY" -c "import distutils.version" 2>/dev/null; then
    echo "no distutils here: writing a LooseVersion stand-in into $SITE/distutils"
    mkdir -p "$SITE/distutils"
    : >"$SITE/distutils/__init__.py"
    cat >"$SITE/distutils/version.py" <<'EOF'
"""Stand-in for the removed distutils.version (petastorm imports LooseVersion)."""
import re


class LooseVersion:
    def __init__(self, vstring=None):
        self.vstring = str(vstring)
        self.version = [int(p) if p.isdigit() else p for p in re.split(r"[.\-+]", self.vstring)]

    def _key(self, other):
        other = other if isinstance(other, LooseVersion) else LooseVersion(other)
        pad = lambda v: [(0, p) if isinstance(p, int) else (1, p) for p in v]  # noqa: E731
        return pad(self.version), pad(other.version)

    def __lt__(self, other):
        a, b = self._key(other)
        return a < b

    def __le__(self, other):
        a, b = self._key(other)
        return a <= b

    def __gt__(self, other):
        a, b = self._key(other)
        return a > b

    def __ge__(self, other):
        a, b = self._key(other)
        return a >= b

    def __eq__(self, other):
        a, b = self._key(other)
        return a == b

    def __str__(self):
        return self.vstring
EOF
  fi
}

versions() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  echo "cpus: $(nproc)"
  "$PY" - <<'EOF'
import sys, warnings
warnings.simplefilter("ignore")
import numpy, pyarrow, pandas, torch, pydantic, petastorm
import petastorm.pytorch  # noqa: F401  (the loader the trainer uses)
print("python", sys.version.split()[0])
for m in (torch, numpy, pyarrow, pandas, petastorm, pydantic):
    print(f"{m.__name__:10s} {m.__version__:14s} {m.__file__}")
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
t = torch.from_numpy(numpy.arange(6, dtype=numpy.int64).reshape(2, 3))
col = pyarrow.array([[1, 2], [3, 4]]).to_pandas()  # petastorm's per-column conversion
assert int(t.sum()) == 15 and len(col) == 2
if torch.cuda.is_available():
    print("on", torch.cuda.get_device_name(), "sum", float(t.cuda().float().sum()))
EOF
}

part "install wheels into $SITE" install_wheels
export PYTHONPATH="$SITE:$PWD"
part "versions" versions
part "GPU: bench/gpu.sh (ROWS=${ROWS:-1000000})" env ROWS="${ROWS:-1000000}" bash bench/gpu.sh "$PY" --baseline
PIN=(taskset -c 0,1)
command -v taskset >/dev/null || {
  echo "no taskset: the CPU part runs on all cores"
  PIN=()
}
part "CPU, 2 cores, in process: bench.training" \
  env CUDA_VISIBLE_DEVICES="" timeout 240 "${PIN[@]}" "$PY" -m bench.training \
  --rows "${CPU_ROWS:-200000}" --repeats 2 --no-real-trainer --baseline

echo
if [ ${#FAILED[@]} -eq 0 ]; then
  echo "device check: all parts passed"
else
  printf 'device check: FAILED part: %s\n' "${FAILED[@]}"
  exit 1
fi
