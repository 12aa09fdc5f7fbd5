#!/usr/bin/env bash
# GPU check of the triton block-sparse kernels: one prepared command, under 8 minutes on an H200.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine (files under $OUT, else ./gpu_check_out)
#   bash benchmarks/gpu_check.sh --dry-run  # every step at tiny size on the CPU (TRITON_INTERPRET=1); CI runs it
#
# Steps (wall-clock limits in GPU mode; the whole run is held under GPU_CHECK_TOTAL_S, default 465 s):
#   0. install   vidattn must import; else `pip install --no-deps --no-build-isolation -e .`, and a failure
#                STOPS the check with a message (nothing else runs)
#   1. env       nvidia-smi, versions, clocks; ceilings: bf16 8192^3 matmul TFLOP/s and device-to-device copy
#                GB/s (gpu_bench.py --ceilings)                                                 [timeout 60 s]
#   2. precompile (in the background, alongside step 3) N processes launch the validation's and the benchmark's
#                triton calls and one compiled FlexAttention call per shape and pass, filling triton's and
#                inductor's disk caches in parallel; FlexAttention's cold compile time is reported from here
#                (gpu_validate.py --precompile-shard I/N)                                       [timeout 170 s]
#   3. validate  every fitted config of every kernel, launched explicitly, NaN-prefilled outputs, full-output
#                comparison with a chunked fp32 reference at Wan size (gpu_validate.py)  [budget 140 s, t/o 170 s]
#   4. bench     HunyuanVideo 720p first, then Wan 480p: radial, all-ones, random 10/25/50 %; fwd and fwd+bwd;
#                triton vs compiled FlexAttention vs SDPA flash, interleaved (gpu_bench.py)
#                          [timeout: what is left of the total less 60 s, at most 260 s; budget 25 s less]
#   4b. extra    forward rows with their own budget, from what the main benchmark left (it keeps its own):
#                Rectified SpaAttn (selection + kernel, and the selection alone; drop 0.75, 0.9) on both shapes,
#                FreeSwim's window (1080p x 21 latent frames, 4K x 1) raster via triton, 8x16 tiles via flex
#                (gpu_bench.py --extra; rows added to gpu_bench.md/.json)
#                          [timeout: what is left less 60 s, at most 90 s (dry run 120 s); budget 15 s less]
#   5. profile   per-kernel CUDA profile of one triton forward+backward, compiled-kernel resources
#                (gpu_bench.py --profile)                                                       [timeout <= 50 s]
#   6. summary   the table of targets (fwd / fwd+bwd efficiency, all-ones ratio vs SDPA flash), printed LAST
#
# Files under $OUT (8 at most): environment.txt precompile.txt validate.txt gpu_bench.md gpu_bench.json
# profile.txt summary.txt gpu_check.log (everything printed). Exit status: non-zero if any step failed.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
DRY=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY=1 ;;
        -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument $arg (use --dry-run or --help)" >&2; exit 2 ;;
    esac
done
OUT_DIR="${OUT:-./gpu_check_out}"
mkdir -p "$OUT_DIR" || exit 2
OUT_FILES="environment.txt precompile.txt validate.txt gpu_bench.md gpu_bench.json profile.txt summary.txt gpu_check.log"
for f in $OUT_FILES; do rm -f "$OUT_DIR/$f"; done  # no stale results from an earlier run in the summary
TMP_DIR="$(mktemp -d)"
trap 'rm -rf "$TMP_DIR"' EXIT
export PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
    DRYFLAG=(--dry-run)
    export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
    TOTAL="${GPU_CHECK_TOTAL_S:-600}"
    N_PRE=2; PRE_T=120; VAL_BUDGET=120; VAL_T=150; BENCH_MAX=90; EXTRA_MAX=120; PROF_MAX=90
else
    DRYFLAG=()
    unset TRITON_INTERPRET
    TOTAL="${GPU_CHECK_TOTAL_S:-465}"
    N_PRE="${GPU_CHECK_PRECOMPILE_PROCS:-12}"; PRE_T=170; VAL_BUDGET=140; VAL_T=170; BENCH_MAX=260; EXTRA_MAX=90
    PROF_MAX=50
fi

pick_python() {
    if [ -n "${PYTHON:-}" ]; then
        PY="$PYTHON"
    elif [ -x .venv/bin/python ] && { [ "$DRY" = 1 ] || .venv/bin/python -c \
            "import torch, sys; sys.exit(not torch.cuda.is_available())" >/dev/null 2>&1; }; then
        PY=.venv/bin/python
    else
        PY=python3
    fi
}

# True when a CUDA device is visible: nvidia-smi lists a GPU, or torch (if it imports) sees one.
has_cuda_device() {
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
        return 0
    fi
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1
}

# Step 0. Prints what it did; returns non-zero (after saying STOP) when vidattn cannot be made importable.
ensure_installed() {
    if "$PY" -c "import vidattn.kernels" >/dev/null 2>&1; then
        echo "install: vidattn.kernels imports with $PY"
        return 0
    fi
    echo "install: vidattn.kernels does not import with $PY; running $PY -m pip install --no-deps" \
         "--no-build-isolation -e ."
    if ! timeout -k 5 180 "$PY" -m pip install --no-deps --no-build-isolation -e . >"$TMP_DIR/pip.txt" 2>&1; then
        tail -n 25 "$TMP_DIR/pip.txt"
        echo "gpu_check: STOP: 'pip install --no-deps -e .' failed with $PY (its output is above); nothing else ran."
        return 1
    fi
    tail -n 2 "$TMP_DIR/pip.txt"
    local err
    if ! err=$("$PY" -c "import vidattn.kernels" 2>&1); then
        echo "$err" | tail -n 15
        echo "gpu_check: STOP: vidattn was installed but 'import vidattn.kernels' still fails with $PY (above);" \
             "nothing else ran."
        return 1
    fi
    echo "install: done"
}

STEPS=""
FAILED=""
# record NAME RC SECONDS [LIMIT]: adds "name ok 12s" (or FAIL / TIMEOUT) to the status line.
record() {
    local name=$1 rc=$2 secs=$3 limit=${4:-}
    local st="ok"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        st="TIMEOUT(${limit}s)"
    elif [ "$rc" -ne 0 ]; then
        st="FAIL(rc=$rc)"
    fi
    [ "$st" = ok ] || FAILED="$FAILED $name"
    STEPS="${STEPS:+$STEPS | }$name $st ${secs}s"
}

# limit WANTED RESERVE: WANTED seconds, or less so that RESERVE seconds stay for the later steps (min 10).
limit() {
    local left=$((TOTAL - SECONDS - $2))
    [ "$left" -lt "$1" ] && echo $((left > 10 ? left : 10)) || echo "$1"
}

main() {
    pick_python
    echo "gpu_check: $([ "$DRY" = 1 ] && echo 'DRY RUN (CPU, triton interpreter, tiny sizes)' || echo 'GPU run');" \
         "python $PY; outputs in $OUT_DIR; total budget ${TOTAL}s"

    # ---- no device, no run: refuse before installing anything (a CPU machine takes --dry-run)
    if [ "$DRY" = 0 ] && [ "${GPU_CHECK_SKIP_DEVICE_CHECK:-0}" != 1 ] && ! has_cuda_device; then
        echo "gpu_check: STOP: no CUDA device (nvidia-smi lists none and torch under $PY sees none); nothing was" \
             "installed or run. On a machine without a GPU use: bash benchmarks/gpu_check.sh --dry-run"
        return 4
    fi

    # ---- 0. install
    local t0=$SECONDS
    ensure_installed >"$TMP_DIR/install.txt" 2>&1
    local rc=$?
    cat "$TMP_DIR/install.txt"
    if [ "$rc" -ne 0 ]; then
        cp "$TMP_DIR/install.txt" "$OUT_DIR/environment.txt"
        return 3
    fi

    # ---- 1. environment and ceilings
    echo "== 1. environment and ceilings"
    t0=$SECONDS
    local ceil_rc
    {
        echo "# gpu_check environment, $(date -u '+%Y-%m-%d %H:%M:%S UTC')$([ "$DRY" = 1 ] && echo ', DRY RUN')"
        cat "$TMP_DIR/install.txt"
        echo "host: $(uname -srm), $(nproc) CPUs, python $PY"
        if command -v nvidia-smi >/dev/null 2>&1 && [ "$DRY" = 0 ]; then
            timeout 20 nvidia-smi 2>&1 | head -n 20
            timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,utilization.gpu \
                --format=csv 2>&1
        else
            echo "nvidia-smi: not run ($([ "$DRY" = 1 ] && echo 'dry run' || echo 'not found'))"
        fi
        timeout 60 "$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, '| triton', triton.__version__, '| cuda available', torch.cuda.is_available())" 2>&1
        env | grep -E '^(TRITON|TORCH|CUDA|PYTORCH)[A-Z_]*=' | sort
        timeout -k 5 60 "$PY" benchmarks/gpu_bench.py --ceilings ${DRYFLAG[@]+"${DRYFLAG[@]}"} --out "$OUT_DIR" 2>&1
        ceil_rc=$?
        echo "ceilings exit status: $ceil_rc"
        if command -v nvidia-smi >/dev/null 2>&1 && [ "$DRY" = 0 ]; then
            echo "after the ceilings:"
            timeout 20 nvidia-smi --query-gpu=clocks.sm,clocks.mem,power.draw,temperature.gpu --format=csv 2>&1
        fi
    } >"$OUT_DIR/environment.txt" 2>&1
    cat "$OUT_DIR/environment.txt"
    record env "${ceil_rc:-1}" $((SECONDS - t0)) 60

    # ---- 2. precompile, in the background
    echo "== 2. precompile: $N_PRE processes in the background (logs in precompile.txt)"
    local pre_start=$SECONDS i
    local pids=()
    for ((i = 0; i < N_PRE; i++)); do
        (
            TORCHINDUCTOR_COMPILE_THREADS=1 timeout -k 10 "$PRE_T" "$PY" benchmarks/gpu_validate.py \
                --precompile-shard "$i/$N_PRE" --budget-s $((PRE_T - 20)) ${DRYFLAG[@]+"${DRYFLAG[@]}"} >"$TMP_DIR/pre_$i.txt" 2>&1
            echo $? >"$TMP_DIR/pre_$i.rc"
        ) &
        pids+=($!)
    done

    # ---- 3. validate
    echo "== 3. validate (budget ${VAL_BUDGET}s)"
    t0=$SECONDS
    local vt
    vt=$(limit "$VAL_T" 130)
    timeout -k 10 "$vt" "$PY" benchmarks/gpu_validate.py --budget-s $((vt < VAL_BUDGET + 30 ? vt - 30 : VAL_BUDGET)) \
        ${DRYFLAG[@]+"${DRYFLAG[@]}"} 2>&1 | tee "$OUT_DIR/validate.txt"
    record validate "${PIPESTATUS[0]}" $((SECONDS - t0)) "$vt"

    # ---- 2'. wait for the precompile processes (each has its own timeout)
    t0=$SECONDS
    wait "${pids[@]}" 2>/dev/null
    local pre_rc=0 r
    {
        for ((i = 0; i < N_PRE; i++)); do
            r=$(cat "$TMP_DIR/pre_$i.rc" 2>/dev/null || echo 1)
            echo "--- precompile process $i/$N_PRE: exit status $r"
            cat "$TMP_DIR/pre_$i.txt" 2>/dev/null
        done
    } >"$OUT_DIR/precompile.txt"
    for ((i = 0; i < N_PRE; i++)); do
        r=$(cat "$TMP_DIR/pre_$i.rc" 2>/dev/null || echo 1)
        if [ "$r" -ne 0 ] && [ "$r" -ne 124 ] && [ "$r" -ne 137 ]; then pre_rc=$r; fi  # a timeout only warms less
    done
    grep -E "FLEX_COMPILE|FAILED|time budget ended" "$OUT_DIR/precompile.txt" || true
    record precompile "$pre_rc" $((SECONDS - pre_start)) "$PRE_T"
    echo "precompile: done $((SECONDS - pre_start)) s after its start (waited $((SECONDS - t0)) s after validate)"

    # ---- 4. bench
    t0=$SECONDS
    local bt
    bt=$(limit "$BENCH_MAX" 60)
    echo "== 4. bench (budget $((bt > 40 ? bt - 25 : 10))s, timeout ${bt}s)"
    timeout -k 10 "$bt" "$PY" benchmarks/gpu_bench.py --out "$OUT_DIR" --budget-s $((bt > 40 ? bt - 25 : 10)) \
        ${DRYFLAG[@]+"${DRYFLAG[@]}"} 2>&1
    record bench "$?" $((SECONDS - t0)) "$bt"

    # ---- 4b. extra rows (rectified, FreeSwim window): their own budget, from what the main benchmark left
    t0=$SECONDS
    local et
    et=$(limit "$EXTRA_MAX" 60)
    echo "== 4b. extra rows: rectified, window (budget $((et > 25 ? et - 15 : 10))s, timeout ${et}s)"
    timeout -k 10 "$et" "$PY" benchmarks/gpu_bench.py --extra --out "$OUT_DIR" --budget-s $((et > 25 ? et - 15 : 10)) \
        ${DRYFLAG[@]+"${DRYFLAG[@]}"} 2>&1
    record extra "$?" $((SECONDS - t0)) "$et"

    # ---- 5. profile and compiled-kernel resources
    t0=$SECONDS
    local pt
    pt=$(limit "$PROF_MAX" 10)
    echo "== 5. profile (timeout ${pt}s)"
    timeout -k 5 "$pt" "$PY" benchmarks/gpu_bench.py --profile --out "$OUT_DIR" ${DRYFLAG[@]+"${DRYFLAG[@]}"} 2>&1
    record profile "$?" $((SECONDS - t0)) "$pt"

    # ---- 6. summary, printed last
    local verdict="all steps ok"
    [ -n "$FAILED" ] && verdict="FAILED:$FAILED"
    timeout -k 5 30 "$PY" benchmarks/gpu_bench.py --summary --out "$OUT_DIR" ${DRYFLAG[@]+"${DRYFLAG[@]}"} \
        --steps "$STEPS | total ${SECONDS}s | $verdict" 2>&1
    local sum_rc=$?
    [ "$sum_rc" -eq 0 ] || FAILED="$FAILED summary"
    [ -z "$FAILED" ]
}

main 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
