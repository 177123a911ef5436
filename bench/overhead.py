"""Eager per-call cost of ``SparseLinear`` beside ``nn.Linear``: what every eager call pays
before and around its kernel (checks, backend choice, op dispatch, launch).

    python bench/overhead.py [--out overhead.csv]

CPU: the backend's kernel is stubbed out (it returns an empty output), so the row is the
dispatch path alone. GPU: each available backend runs for real at M = 1, 4096 x 4096, bf16,
90% block-sparse 64x64; wall time per call over 1000 calls with one sync at the end, which is
launch-bound the way eager decoding is (CUDA graphs and torch.compile's "reduce-overhead"
remove this cost). Each provider under ``torch.no_grad()`` and ``torch.inference_mode()``
(column ``mode``); rows: median and p20/p80 of 7 repeats.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

import sparsecore as sc
from sparsecore import backends

CALLS, REPEATS = 1000, 7


def per_call_us(fn, sync) -> list[float]:
    for _ in range(100):
        fn()
    sync()
    out = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        for _ in range(CALLS):
            fn()
        sync()
        out.append((time.perf_counter() - t0) / CALLS * 1e6)
    return out


def _stub_kernels():
    """Every backend resolves to one that returns an empty output (CPU rows only)."""
    stub = types.SimpleNamespace(forward=lambda x, v, rp, ci, br, ro, n, b, a: x.new_empty(x.shape[0], n))
    backends.resolve = lambda backend, x, values: stub
    sc.ops._check_host_meta = lambda *a, **k: None  # a CPU-only check (a GPU call never runs it)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="CSV path (default: print only)")
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    n = k = 4096 if gpu else 64
    block, density = (64, 64) if gpu else (32, 32), 0.1 if gpu else 0.5
    torch.manual_seed(0)
    dense = nn.Linear(k, n, bias=False).to(device, dtype)
    x = torch.randn(1, k, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    providers = {"nn.Linear": dense}
    if gpu:
        for name in ("cuda", "triton"):
            if backends.module(name).available()[0]:
                providers[f"sparsecore-{name}"] = sc.SparseLinear.from_dense(dense, block=block,
                                                                             sparsity=1 - density, backend=name)
    else:
        providers["sparsecore-stub"] = sc.SparseLinear.from_dense(dense, block=block, sparsity=1 - density)
        _stub_kernels()
    gpu_name = torch.cuda.get_device_name() if gpu else "cpu"
    rows = []
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            for name, mod in providers.items():
                us = sorted(per_call_us(lambda: mod(x), sync))
                q = statistics.quantiles(us, n=5)
                rows.append(dict(gpu=gpu_name, torch=torch.__version__, provider=name, dtype=str(dtype).split(".")[1],
                                 M=1, N=n, K=k, block=f"{block[0]}x{block[1]}",
                                 density=density if name != "nn.Linear" else 1.0, us_p50=round(statistics.median(us), 2),
                                 us_p20=round(q[0], 2), us_p80=round(q[3], 2), mode=mode.__name__))
                print(f"{mode.__name__:15s} {name:18s} {rows[-1]['us_p50']:8.2f} us/call "
                      f"(p20 {rows[-1]['us_p20']}, p80 {rows[-1]['us_p80']})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
