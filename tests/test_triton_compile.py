"""Ahead-of-time codegen checks of the Triton kernels for sm_90 (H100) and sm_80 (A100).

No GPU needed: each kernel is compiled with ``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))`` exactly as the launchers would launch it (arguments
captured from the real launcher on meta tensors, configs from the heuristics for that
arch, divisibility-16 attrs where the JIT would specialize them), then ``ptxas -v`` (from
the triton wheel) reports registers and spills. Checked: wgmma on Hopper for the 16-bit
prefill / dX / dW kernels, mma.sync on sm_80, cp.async pipelining, no spills, shared
memory within the chip's limit. About 20 s on 2 cores.

Compiling happens in one subprocess (this file run as a script) so that it never meets a
process where triton was imported in interpreter mode (see test_triton_kernels.py).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from sparsecore.kernels import triton_unusable

if __name__ != "__main__" and triton_unusable():
    pytest.skip(triton_unusable(), allow_module_level=True)

SMEM_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
N, K, PROGRAMS = 4096, 4096, 264

# (id, kernel, dtype, block, M, activation) -- a representative set, compiled for both archs
CASES = [
    ("fwd-bf16-64x64", "fwd", "bf16", (64, 64), 2048, "gelu"),
    ("fwd-bf16-128x128", "fwd", "bf16", (128, 128), 2048, "none"),
    ("fwd-bf16-32x32", "fwd", "bf16", (32, 32), 2048, "silu"),
    ("fwd-fp16-16x16", "fwd", "fp16", (16, 16), 2048, "relu"),
    ("fwd-fp16-64x32", "fwd", "fp16", (64, 32), 128, "none"),
    ("fwd-fp32-64x64", "fwd", "fp32", (64, 64), 2048, "none"),
    ("fwd-fp32-128x128", "fwd", "fp32", (128, 128), 2048, "none"),
    ("fwd-tma-bf16-64x64", "fwd+tma", "bf16", (64, 64), 2048, "gelu"),
    ("fwd-tma-bf16-128x128", "fwd+tma", "bf16", (128, 128), 2048, "none"),
    ("fwd-swap-bf16-64x64", "fwd+swap", "bf16", (64, 64), 2048, "gelu"),
    ("fwd-swap-fp16-128x32", "fwd+swap", "fp16", (128, 32), 2048, "none"),
    ("decode-bf16-64x64", "decode", "bf16", (64, 64), 16, "gelu"),
    ("decode-bf16-16x16", "decode", "bf16", (16, 16), 1, "none"),
    ("dx-bf16-64x64", "dx", "bf16", (64, 64), 2048, None),
    ("dx-bf16-32x32", "dx", "bf16", (32, 32), 2048, None),
    ("dx-fp32-64x64", "dx", "fp32", (64, 64), 2048, None),
    ("dx-fp32-128x128", "dx", "fp32", (128, 128), 2048, None),
    ("dw-bf16-64x64", "dw", "bf16", (64, 64), 2048, None),
    ("dw-bf16-16x16", "dw", "bf16", (16, 16), 2048, None),
    ("dw-bf16-128x128-split", "dw", "bf16", (128, 128), 8192, None),
    ("dw-fp32-64x64", "dw", "fp32", (64, 64), 2048, None),
]
ARCHS = (90, 80)
# TMA is Hopper's (on sm_80 descriptor loads become plain loads); SWAP is for wgmma's N
ARCHS_OF = {"fwd+tma": (90,), "fwd+swap": (90,)}


# -- the compile probe (runs in the subprocess) -------------------------------------------
def _capture_launches(kernel, dtype, block, M, act, arch):
    """Run the real launcher on meta tensors with a ``wrap`` that records each launch."""
    import torch

    from sparsecore.kernels import bsr_decode, bsr_dw, bsr_dx, bsr_fwd, configs

    launches = []

    class Capture:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((self.fn, args, kw))

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    bn, bk = block
    R, C = N // bn, K // bk
    nnzb = R * C // 10
    meta = torch.device("meta")
    i32 = lambda n: torch.empty(n, dtype=torch.int32, device=meta)
    vals = torch.empty(nnzb, bn, bk, dtype=dt, device=meta)
    x, dy = torch.empty(M, K, dtype=dt, device=meta), torch.empty(M, N, dtype=dt, device=meta)
    bias = torch.empty(N, dtype=dt, device=meta)
    cfg = configs.heuristic(kernel.split("+")[0], arch, dt, block, M, N, K)
    if kernel == "fwd+tma":
        cfg.update(TMA=True, G=1)
    if kernel == "fwd+swap":
        cfg.update(SWAP=True)
    if kernel.startswith("fwd"):
        bsr_fwd.bsr_fwd(x, vals, i32(R + 1), i32(nnzb), i32(R), N, bias, act, config=cfg, wrap=Capture)
    elif kernel == "decode":
        bsr_decode.bsr_decode(x, vals, i32(R + 1), i32(nnzb), i32(nnzb), N, bias, act, config=cfg,
                              programs=PROGRAMS, wrap=Capture)
    elif kernel == "dx":
        bsr_dx.bsr_dx(dy, vals, i32(C + 1), i32(nnzb), i32(nnzb), K, config=cfg, wrap=Capture)
    else:
        nnzb = 16 if M > 4096 else nnzb  # few blocks, long M: the split (workspace) variant
        bsr_dw.bsr_dw(dy, x, i32(nnzb), i32(nnzb), block, config=cfg, programs=PROGRAMS, wrap=Capture)
    return launches, cfg


def _compile(fn, args, kw, arch):
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type

    opts = {"num_warps": kw.pop("num_warps"), "num_stages": kw.pop("num_stages", 3)}
    names = fn.arg_names
    positional = dict(zip(names, args))
    signature = {n: ("constexpr" if n in kw else mangle_type(positional[n])) for n in names}
    # the JIT's specialization: pointers and ints divisible by 16 get tt.divisibility
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in positional and (
        isinstance(positional[n], torch.Tensor) or (isinstance(positional[n], int) and positional[n] % 16 == 0))}
    c = triton.compile(ASTSource(fn, signature, kw, attrs), target=GPUTarget("cuda", arch, 32), options=opts)
    return c.asm["ptx"], c.metadata.shared, opts


def _ptxas(ptx):
    import tempfile

    import triton

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([os.path.join(bindir, "ptxas"), f"-arch={target}", "-v", src, "-o",
                            os.path.join(d, "k.cubin")], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)]
    regs = [int(n) for n in re.findall(r"Used (\d+) registers", r.stderr)]
    return {"target": target, "spill_bytes": sum(spills), "registers": max(regs) if regs else None}


def probe():
    out = {}
    for case_id, kernel, dtype, block, M, act in CASES:
        for arch in ARCHS_OF.get(kernel, ARCHS):
            launches, cfg = _capture_launches(kernel, dtype, block, M, act, arch)
            fn, args, kw = launches[0]  # the matmul kernel (decode's epilogue pass is second)
            ptx, shared, opts = _compile(fn, args, dict(kw), arch)
            waits = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
            out[f"{case_id}@sm{arch}"] = dict(
                kernel=fn.__name__, config=cfg, shared=shared, wgmma="wgmma.mma_async" in ptx,
                mma_sync="mma.sync" in ptx, cp_async="cp.async" in ptx, tma="cp.async.bulk.tensor" in ptx,
                wgmma_n=sorted({int(n) for n in re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k", ptx)}),
                max_wgmma_wait=max(waits, default=None), **_ptxas(ptx))
            if kernel == "decode":  # the epilogue pass
                fn, args, kw = launches[1]
                ptx, shared, _ = _compile(fn, args, dict(kw), arch)
                out[f"{case_id}-finish@sm{arch}"] = dict(kernel=fn.__name__, shared=shared, **_ptxas(ptx))
    return out


# -- the tests ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _ids():
    return [f"{c[0]}@sm{a}" for c in CASES for a in ARCHS_OF.get(c[1], ARCHS)]


@pytest.mark.parametrize("key", _ids())
def test_no_spills_and_smem_fits(report, key):
    rec = report[key]
    assert rec["spill_bytes"] == 0, rec
    assert rec["shared"] <= SMEM_LIMIT[int(key.split("@sm")[1])], rec
    finish = report.get(key.replace("@", "-finish@"))
    assert finish is None or finish["spill_bytes"] == 0, finish


@pytest.mark.parametrize("key", _ids())
def test_mma_instructions_and_pipelining(report, key):
    """sm_80: mma.sync everywhere. sm_90: async wgmma (wait_group >= 1, so loads and MMAs
    overlap) for fwd / dX at every block size and dtype (tf32 included: BM >= 64 rows of x),
    and for dW when BN >= 64 (dW's MMA has BN rows; 16 rows is below wgmma's 64); the TMA
    forward variant loads with cp.async.bulk.tensor, the others with cp.async. Decode's
    tile has BM = 16 rows, so it stays on mma.sync: it is bound by weight bytes anyway.
    Every loop is software-pipelined (cp.async)."""
    rec = report[key]
    case_id, arch = key.split("@sm")
    _, kernel, dtype, block, M, _ = next(c for c in CASES if c[0] == case_id)
    assert rec["cp_async"], rec
    wants_wgmma = arch == "90" and (kernel in ("fwd", "fwd+tma", "fwd+swap", "dx") or (kernel == "dw" and block[0] >= 64))
    assert rec["tma"] == (kernel == "fwd+tma"), rec
    if wants_wgmma:
        assert rec["wgmma"] and rec["max_wgmma_wait"] >= 1, rec
    else:
        assert rec["mma_sync"] and not rec["wgmma"], rec


@pytest.mark.parametrize("key", [k for k in _ids() if "-swap-" in k])
def test_swap_makes_the_x_rows_wgmma_n(report, key):
    """SWAP: the block's BN rows are wgmma's M (m64 tiles), the tile's BM rows of x its N."""
    rec = report[key]
    assert rec["wgmma_n"] and max(rec["wgmma_n"]) == rec["config"]["BM"], rec
    plain = report.get(key.replace("-swap-", "-"))  # the same case unswapped: N = BN
    assert plain is None or max(plain["wgmma_n"]) < max(rec["wgmma_n"]), (plain, rec)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps(probe()))
