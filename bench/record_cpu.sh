#!/usr/bin/env bash
# Re-record bench/results/cpu-2core/ on a CPU machine: the CPU quick preset (1 thread, so
# other jobs on the cores do not stall OpenMP barriers) and the issue-2 check — sparsecore-torch
# at 90% sparsity vs dense F.linear, 4096x4096, 256 tokens, fp32 — at 1 and 2 threads.
set -euo pipefail
cd "$(dirname "$0")/.."
R=bench/results/cpu-2core
PY="${PYTHON:-python3}"
mkdir -p "$R/quick" "$R/issue2"
"$PY" bench/run.py --device cpu --quick --threads 1 --out "$R/quick"
I2=(--device cpu --ops fwd --shapes 4096 --tokens 256 --densities 0.1 --blocks 32,64
    --providers dense,oracle,sparsecore-torch,torch-bsr --rep-ms 1000 --no-plot)
tmp="$(mktemp -d)"
"$PY" bench/run.py "${I2[@]}" --threads 1 --out "$tmp/t1"
"$PY" bench/run.py "${I2[@]}" --threads 2 --out "$tmp/t2"
OMP_WAIT_POLICY=PASSIVE "$PY" bench/run.py "${I2[@]}" --threads 2 --out "$tmp/t2p"
{ head -n 1 "$tmp/t1/bench.csv"; for d in t1 t2 t2p; do tail -n +2 "$tmp/$d/bench.csv"; done; } >"$R/issue2/bench.csv"
"$PY" bench/run.py --report "$R/issue2/bench.csv" >"$R/issue2/table.txt"
rm -rf "$tmp"
uptime >"$R/load.txt"
