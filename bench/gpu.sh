#!/usr/bin/env bash
# GPU check for an NVIDIA (H100/H200-class) machine with a CUDA build of PyTorch and this
# project's other dependencies installed, no network needed: trains the default ESMM on the
# CUDA device with the real Petastorm input pipeline and prints samples/s next to the
# compute-only ceiling. Finishes in under 5 minutes.
#
# Usage: bench/gpu.sh [PYTHON [BENCH_GPU_ARGS...]]  (default: .venv/bin/python, else python3;
#        e.g. bench/gpu.sh python3 --baseline to also time the input as it was before #8)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-}"
shift || true
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
"$PY" -c "import torch; assert torch.cuda.is_available(), 'torch has no CUDA device'; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout 290 "$PY" -m bench.gpu --rows "${ROWS:-1000000}" --batch-size "${BATCH_SIZE:-4096}" "$@"
