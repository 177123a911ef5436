#!/usr/bin/env bash
# The one prepared script for a GPU machine: install (building the CUDA extension), the CUDA
# kernel tests, `sparsecore bench --quick`, the other GPU tests, compute-sanitizer (memcheck +
# racecheck) on small cases.
#
#   bash bench/device.sh            # results in $OUT (default ./out)
#
# Baselines the GPU image lacks travel as wheels in .whl/ (git-ignored; the run tool's
# carry [".whl"]), fetched here for the image's Python 3.12 with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl torchao==0.18.0
# and installed under /tmp/site first (torchao 0.18: the torchao-bsr rows).
#
# Env: OUT, DEVICE_BUDGET_S, BENCH_ARGS (default --quick), MAX_JOBS (16), CUDA_HOME (from nvcc),
# PYTHON (python3), SPARSECORE_COMMIT (default: git rev-parse, for copies without .git).
# Files written to $OUT (at most 8): bench.csv, bench.png, table.txt, overhead.csv, summary.txt,
# logs.tar.gz.
# The whole script stays under DEVICE_BUDGET_S seconds (default 560): every stage runs under
# `timeout`, capped by what is left. Exit status: nonzero if any stage failed — a wrong
# benchmark result, a failed GPU test, a sanitizer error or a failed install.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
LOGS="$OUT/logs"
BUDGET="${DEVICE_BUDGET_S:-560}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
export MAX_JOBS="${MAX_JOBS:-16}"
if [ -z "${CUDA_HOME:-}" ]; then
    if [ -x /usr/local/cuda/bin/nvcc ]; then CUDA_HOME=/usr/local/cuda
    elif command -v nvcc >/dev/null; then CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
    fi
fi
export CUDA_HOME="${CUDA_HOME:-}"
export SPARSECORE_COMMIT="${SPARSECORE_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"

STATUS=0
SUMMARY=()
# stage NAME BUDGET_S LOGFILE CMD...: run CMD under timeout min(BUDGET_S, time left - 15 s)
stage() {
    local name=$1 want=$2 logf=$3
    shift 3
    local left=$((BUDGET - SECONDS - 15))
    local t=$((want < left ? want : left))
    if [ "$t" -lt 20 ]; then
        SUMMARY+=("$(printf '%-10s %-8s %5ss  (no time left)' "$name" SKIPPED 0)")
        return 1
    fi
    echo "=== $name (timeout ${t}s) : $*"
    local t0=$SECONDS
    timeout --kill-after=10 "$t" "$@" >"$logf" 2>&1
    local rc=$?
    local verdict=ok
    [ "$rc" -ne 0 ] && verdict="FAIL($rc)" && STATUS=1
    [ "$rc" -eq 124 ] && verdict="TIMEOUT"
    SUMMARY+=("$(printf '%-10s %-8s %5ss  %s' "$name" "$verdict" $((SECONDS - t0)) "$(basename "$logf")")")
    tail -n 5 "$logf"
    return "$rc"
}

finish() {
    {
        echo "sparsecore device run: commit $SPARSECORE_COMMIT, $(date -u +%FT%TZ), ${SECONDS}s"
        nvidia-smi -L 2>/dev/null || true
        "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" 2>&1
        printf '%s\n' "${SUMMARY[@]}"
    } >"$OUT/summary.txt"
    tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
    if [ -f "$OUT/bench.csv" ]; then  # short table: our kernels against cuBLAS (all rows: table.txt)
        echo "=== bench (short): fwd + decoder, dense vs sparsecore-{triton,cuda}"
        "$PY" -m sparsecore.cli bench --report "$OUT/bench.csv" --ops fwd,decoder \
            --providers dense,sparsecore-triton,sparsecore-cuda
    fi
    echo "=== stages"
    cat "$OUT/summary.txt"
    echo "device.sh: $([ "$STATUS" -eq 0 ] && echo OK || echo FAILED) in ${SECONDS}s"
    exit "$STATUS"
}

# 0. carried wheels (baselines only: if this fails, their rows are missing)
if compgen -G ".whl/*.whl" >/dev/null; then
    stage wheels 60 "$LOGS/wheels.log" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# 1. install: editable, builds sparsecore._C from csrc/ with all cores (pure Python if it cannot)
if ! stage install 150 "$LOGS/install.log" \
        "$PY" -m pip install --no-deps --no-build-isolation -v -e .; then
    echo "install failed: see logs"
    finish
fi
"$PY" -m sparsecore.cli info 2>&1 | tee "$LOGS/info.log"

# 2. the CUDA kernels against the float64 oracle (no JIT; 4 workers prepare the cases), so a broken kernel shows
# before the benchmark spends its time. The sm90a kernel first, in a process of its own (a
# trap there ends its CUDA context); if it fails, everything after runs with sm80.
FWD_TESTS="every_kernel or k_multiple or density_extremes or fused_bias or long_rows or unaligned or tile_queue"
if ! stage gpu-sm90 45 "$LOGS/pytest_gpu_sm90.log" env SPARSECORE_TEST_KERNELS=sm90 \
        "$PY" -m pytest -q -m gpu -p no:cacheprovider -rf -n 4 -k "$FWD_TESTS" tests/test_cuda_kernels.py; then
    export SPARSECORE_CUDA_KERNEL=sm80 SPARSECORE_TEST_KERNELS=sm80,decode
    SUMMARY+=("(sm90 kernel failed: the tests and the benchmark below run with SPARSECORE_CUDA_KERNEL=sm80)")
fi
# The decode kernel next, alone too: if its cluster reduction (sm_90) fails, the rest runs without clusters.
if ! stage gpu-decode 30 "$LOGS/pytest_gpu_decode.log" env SPARSECORE_TEST_KERNELS=decode \
        "$PY" -m pytest -q -m gpu -p no:cacheprovider -rf -n 4 -k decode tests/test_cuda_kernels.py; then
    export SPARSECORE_DECODE_CLUSTERS=0
    SUMMARY+=("(decode kernel failed: the tests and the benchmark below run with SPARSECORE_DECODE_CLUSTERS=0)")
fi
stage gpu-cuda 50 "$LOGS/pytest_gpu_cuda.log" env SPARSECORE_TEST_KERNELS=sm80,decode \
    "$PY" -m pytest -q -m gpu -p no:cacheprovider -rf -n 4 tests/test_cuda_kernels.py

# 3. benchmark (the deliverable); rows stream to bench.csv, so a timeout keeps them
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
stage bench 200 "$LOGS/bench.log" "$PY" -m sparsecore.cli bench ${BENCH_ARGS:---quick} --out "$OUT"
grep -E "WRONG RESULT|ERROR provider|FAILED|skipped" "$LOGS/bench.log" | head -n 30

# eager per-call cost beside nn.Linear (launch-bound, as eager decode is)
stage overhead 30 "$LOGS/overhead.log" "$PY" bench/overhead.py --out "$OUT/overhead.csv"

# 4. the other GPU tests (Triton kernels JIT-compile: spread over 4 workers)
stage gpu-tests 80 "$LOGS/pytest_gpu.log" "$PY" -m pytest -q -m gpu -p no:cacheprovider -rf -n 4 \
    --ignore=tests/test_cuda_kernels.py tests

# 5. compute-sanitizer on small cases: the CUDA kernels' and the Triton kernels'. memcheck
# counts failed CUDA API calls as errors too (torch / triton / the cluster query probe some on
# purpose): --report-api-errors no keeps it to memory errors (a failed launch fails the case).
if command -v compute-sanitizer >/dev/null; then
    for CASE in csrc/sanitize_case.py bench/sanitize_case.py; do
        tag=$(basename "$(dirname "$CASE")")
        before=$STATUS
        if ! stage "memcheck-$tag" 40 "$LOGS/memcheck_$tag.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
                compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 --print-limit 20 \
                "$PY" "$CASE" \
                && grep -qi "device not supported" "$LOGS/memcheck_$tag.log"; then
            # seen on gVisor machines (KINDS.md): the tool cannot attach there, not a kernel error
            STATUS=$before
            SUMMARY+=("(compute-sanitizer: 'Device not supported' on this machine: sanitizer stages skipped)")
            break
        fi
        stage "racecheck-$tag" 40 "$LOGS/racecheck_$tag.log" \
            compute-sanitizer --tool racecheck --error-exitcode 9 --print-limit 20 "$PY" "$CASE"
    done
else
    SUMMARY+=("$(printf '%-10s %-8s %5ss  (compute-sanitizer not found)' sanitizer SKIPPED 0)")
fi

finish
