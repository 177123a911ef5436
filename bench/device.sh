#!/usr/bin/env bash
# The one prepared script for a GPU machine, in this order: install (building the CUDA
# extension), the CUDA kernel tests, compute-sanitizer (memcheck + racecheck) on a small case of
# every CUDA kernel, `sparsecore bench --quick`, the eager overhead, the other GPU tests, the
# Triton kernels under compute-sanitizer.
#
#   bash bench/device.sh            # results in $OUT (default ./out)
#
# Baselines the GPU image lacks travel as wheels in .whl/ (git-ignored; the run tool's
# carry [".whl"]), fetched here for the image's Python 3.12 with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 -d .whl torchao==0.18.0
# and installed under /tmp/site first (torchao 0.18: the torchao-bsr rows).
#
# Env: OUT, DEVICE_BUDGET_S, BENCH_ARGS (default --quick --warmup-ms 10 --rep-ms 40), MAX_JOBS
# (16), CUDA_HOME (from nvcc), PYTHON (python3), SPARSECORE_COMMIT (default: git rev-parse; set
# it where the copy has no .git, as the run tool's does).
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
    # in the background so that a TERM from outside runs `finish` now, not after the stage
    timeout --kill-after=10 "$t" "$@" >"$logf" 2>&1 &
    STAGE_PID=$! STAGE_NAME=$name
    wait "$STAGE_PID"
    local rc=$?
    STAGE_PID=
    local verdict=ok
    [ "$rc" -ne 0 ] && verdict="FAIL($rc)" && STATUS=1
    [ "$rc" -eq 124 ] && verdict="TIMEOUT"
    SUMMARY+=("$(printf '%-10s %-8s %5ss  %s' "$name" "$verdict" $((SECONDS - t0)) "$(basename "$logf")")")
    tail -n 5 "$logf"
    return "$rc"
}

STAGE_PID= STAGE_NAME=
finish() {
    trap "" TERM INT  # finish is short: let it end
    if [ -n "$STAGE_PID" ]; then  # stopped from outside: end the stage (the bench keeps its rows)
        kill -TERM "$STAGE_PID" 2>/dev/null
        wait "$STAGE_PID" 2>/dev/null
        STATUS=1
        SUMMARY+=("(stopped from outside after ${SECONDS}s, during stage $STAGE_NAME)")
    fi
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

# sanitize CASE: compute-sanitizer memcheck + racecheck on a small case script. memcheck counts
# failed CUDA API calls as errors too (torch / triton / the cluster query probe some on
# purpose): --report-api-errors no keeps it to memory errors (a failed launch fails the case).
# Where the tool cannot attach (gVisor: "Device not supported"), this and later calls skip.
SANITIZER=$(command -v compute-sanitizer >/dev/null && echo yes || echo "not found")
sanitize() {
    local case=$1 tag before=$STATUS
    tag=$(basename "$(dirname "$1")")
    if [ "$SANITIZER" != yes ]; then
        SUMMARY+=("$(printf '%-10s %-8s %5ss  (compute-sanitizer: %s)' "sanitize-$tag" SKIPPED 0 "$SANITIZER")")
        return
    fi
    if ! stage "memcheck-$tag" 40 "$LOGS/memcheck_$tag.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
            compute-sanitizer --tool memcheck --report-api-errors no --error-exitcode 9 --print-limit 20 \
            "$PY" "$case" \
            && grep -qi "device not supported" "$LOGS/memcheck_$tag.log"; then
        STATUS=$before
        SANITIZER="'Device not supported' on this machine"
        SUMMARY+=("(compute-sanitizer: $SANITIZER: sanitizer stages skipped)")
        return
    fi
    stage "racecheck-$tag" 40 "$LOGS/racecheck_$tag.log" \
        compute-sanitizer --tool racecheck --error-exitcode 9 --print-limit 20 "$PY" "$case"
}

trap finish TERM INT  # killed from outside: still write the summary and the log tarball

# 0. carried wheels (baselines only: if this fails, their rows are missing)
if compgen -G ".whl/*.whl" >/dev/null; then
    stage wheels 60 "$LOGS/wheels.log" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# 1. install: editable, builds sparsecore._C from csrc/ with all cores. If the build fails, the
# run still fails, but Triton and the baselines are measured without the extension.
if ! stage install 150 "$LOGS/install.log" \
        "$PY" -m pip install --no-deps --no-build-isolation -v -e .; then
    if ! stage install-py 60 "$LOGS/install_py.log" env SPARSECORE_SKIP_CUDA_BUILD=1 \
            "$PY" -m pip install --no-deps --no-build-isolation -e .; then
        echo "install failed: see logs"
        finish
    fi
fi
timeout 60 "$PY" -m sparsecore.cli info 2>&1 | tee "$LOGS/info.log"

# 2. the CUDA kernels against the float64 oracle (no JIT; 4 workers prepare the cases), so a broken kernel shows
# before the benchmark spends its time. The sm90a kernel first, in a process of its own (a
# trap there ends its CUDA context); if it fails, everything after runs with sm80.
# pytest-xdist (in the GPU image) spreads the cases over 4 workers; without it they run in one
# process rather than failing on an unknown -n.
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 4")
FWD_TESTS="every_kernel or k_multiple or density_extremes or fused_bias or long_rows or unaligned or tile_queue"
if ! stage gpu-sm90 45 "$LOGS/pytest_gpu_sm90.log" env SPARSECORE_TEST_KERNELS=sm90 \
        "$PY" -m pytest -q -m gpu -p no:cacheprovider -rf $XDIST -k "$FWD_TESTS" tests/test_cuda_kernels.py; then
    export SPARSECORE_CUDA_KERNEL=sm80 SPARSECORE_TEST_KERNELS=sm80,decode
    SUMMARY+=("(sm90 kernel failed: the tests and the benchmark below run with SPARSECORE_CUDA_KERNEL=sm80)")
fi
# The decode kernel next, alone too: if its cluster reduction (sm_90) fails, the rest runs without clusters.
if ! stage gpu-decode 30 "$LOGS/pytest_gpu_decode.log" env SPARSECORE_TEST_KERNELS=decode \
        "$PY" -m pytest -q -m gpu -p no:cacheprovider -rf $XDIST -k decode tests/test_cuda_kernels.py; then
    export SPARSECORE_DECODE_CLUSTERS=0
    SUMMARY+=("(decode kernel failed: the tests and the benchmark below run with SPARSECORE_DECODE_CLUSTERS=0)")
fi
stage gpu-cuda 50 "$LOGS/pytest_gpu_cuda.log" env SPARSECORE_TEST_KERNELS=sm80,decode \
    "$PY" -m pytest -q -m gpu -p no:cacheprovider -rf $XDIST tests/test_cuda_kernels.py
# compute-sanitizer (memcheck + racecheck) on a small case of every CUDA kernel
sanitize csrc/sanitize_case.py

# 3. benchmark (the deliverable); rows stream to bench.csv, so a timeout keeps them
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
stage bench 200 "$LOGS/bench.log" "$PY" -m sparsecore.cli bench ${BENCH_ARGS:---quick --warmup-ms 10 --rep-ms 40} \
    --out "$OUT"
grep -E "WRONG RESULT|ERROR provider|FAILED|skipped" "$LOGS/bench.log" | head -n 30

# eager per-call cost beside nn.Linear (launch-bound, as eager decode is)
stage overhead 30 "$LOGS/overhead.log" "$PY" bench/overhead.py --out "$OUT/overhead.csv"

# 4. the other GPU tests (Triton kernels JIT-compile: spread over 4 workers)
stage gpu-tests 80 "$LOGS/pytest_gpu.log" "$PY" -m pytest -q -m gpu -p no:cacheprovider -rf $XDIST \
    --ignore=tests/test_cuda_kernels.py tests

# 5. the Triton kernels under compute-sanitizer (the CUDA kernels' case ran before the bench)
sanitize bench/sanitize_case.py

finish
