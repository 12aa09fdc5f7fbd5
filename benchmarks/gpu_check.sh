#!/usr/bin/env bash
# GPU check of the triton block-sparse kernels, one command, under 5 minutes on an H100:
#   1. pytest -m gpu tests/test_triton_kernels.py   (real sizes, bf16, against masked-SDPA references)
#   2. benchmarks/gpu_bench.py                      (triton vs compiled FlexAttention vs dense flash SDPA)
# Tables and logs go to "$OUT" when set, else ./gpu_check_out (gpu_bench.md is rewritten after every row, so a
# run cut by its timeout keeps what it measured). Exit status: non-zero if either step failed.
set -uo pipefail

cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-./gpu_check_out}"
mkdir -p "$OUT_DIR"
unset TRITON_INTERPRET

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
        2>/dev/null; then
        PY=.venv/bin/python
    else
        PY=python3
    fi
fi
if ! "$PY" -c "import vidattn.kernels" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$OUT_DIR/pip_install.txt" 2>&1 || true
fi

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} >"$OUT_DIR/environment.txt" 2>&1
cat "$OUT_DIR/environment.txt"

timeout 140 "$PY" -m pytest -m gpu tests/test_triton_kernels.py -q -rA -p no:cacheprovider 2>&1 \
    | tee "$OUT_DIR/pytest_gpu.txt"
tests_rc=${PIPESTATUS[0]}

OUT="$OUT_DIR" timeout 140 "$PY" benchmarks/gpu_bench.py --out "$OUT_DIR" --budget-s 110 2>&1 \
    | tee "$OUT_DIR/gpu_bench_log.txt"
bench_rc=${PIPESTATUS[0]}

echo "gpu_check: pytest exit ${tests_rc}, benchmark exit ${bench_rc}; outputs in ${OUT_DIR}"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
