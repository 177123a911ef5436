"""Block-sparse decode (small M, 1..64): ``y = act(x @ W^T + bias)``, memory-bound.

Design
------
At small M the cost is reading the kept weight bytes once; compute is nearly free. One
program per block-row would leave most SMs idle (4096/64 = 64 rows for 132 SMs) and the
heavy rows would straggle, so the *global list of kept blocks* (BSR order) is cut into
equal chunks, stream-K style, one chunk per program::

    kept blocks   | r0 r0 r0 | r0 r1 r1 | r2 r2 r2 | r2 r2 r4 | ...      (block_row[i])
    programs      |    p0    |    p1    |    p2    |    p3    |
    partial sums  p0 -> y[r0]   p1 -> y[r0], y[r1]   p2, p3 -> y[r2]   p3 -> y[r4]

Each program walks its chunk row segment by row segment (``G`` blocks per MMA step, as
the forward), and adds each segment's ``[BM, BN]`` fp32 partial into an fp32 buffer with
atomics. Every kept weight byte is read exactly once, by one program, and the chunk size
comes from ``nnzb`` (a shape), so there is no host sync. A second tiny pass applies
``act(acc + bias)`` and casts (it also covers empty block-rows). fp32 atomics make the
summation order (not the accuracy) run-dependent.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import ACT_CODES, epilogue, interpreting, launchable, mma


@triton.jit
def bsr_decode_partial_kernel(
    x, values, row_ptr, col_idx, block_row, acc_buf,
    M, N, K, nnzb, chunk, stride_xm,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, G: tl.constexpr, DOT_F32: tl.constexpr,
):
    lo = tl.program_id(0) * chunk
    hi = tl.minimum(lo + chunk, nnzb)
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    kk = tl.arange(0, G * BK)
    g = kk // BK
    k = kk % BK
    m_ok = offs_m < M
    x_rows = x + offs_m[:, None].to(tl.int64) * stride_xm
    w_tile = offs_n[None, :] * BK + k[:, None]

    i = lo
    while i < hi:                                   # one block-row segment per trip
        r = tl.load(block_row + i)
        stop = tl.minimum(tl.load(row_ptr + r + 1), hi)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for j in range(i, stop, G):
            blk = j + g
            ok = blk < stop
            c = tl.load(col_idx + blk, mask=ok, other=0)
            kcol = c * BK + k
            a = tl.load(x_rows + kcol[None, :], mask=m_ok[:, None] & (ok & (kcol < K))[None, :], other=0.0)
            b = tl.load(values + blk.to(tl.int64)[:, None] * (BN * BK) + w_tile, mask=ok[:, None], other=0.0)
            acc = mma(a, b, acc, DOT_F32)
        n_glob = r * BN + offs_n
        ptrs = acc_buf + offs_m[:, None].to(tl.int64) * N + n_glob[None, :]
        tl.atomic_add(ptrs, acc, mask=m_ok[:, None] & (n_glob < N)[None, :], sem="relaxed")
        i = stop


@triton.jit
def bsr_decode_finish_kernel(acc_buf, bias, y, M, N, stride_ym,
                             BM: tl.constexpr, BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr,
                             ACT: tl.constexpr):
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    mask = (offs_m < M)[:, None] & n_ok[None, :]
    rows = offs_m[:, None].to(tl.int64)
    z = tl.load(acc_buf + rows * N + offs_n[None, :], mask=mask, other=0.0)
    z = epilogue(z, bias, offs_n, n_ok, HAS_BIAS, ACT)
    tl.store(y + rows * stride_ym + offs_n[None, :], z.to(y.dtype.element_ty), mask=mask)


def bsr_decode(x, values, row_ptr, col_idx, block_row, out_features, bias=None, activation="none", *,
               config: dict, programs: int, wrap=None):
    """Launch the decode path: ``programs`` stream-K programs over the kept blocks (e.g.
    ``PROGRAMS_PER_SM x SMs``), then the epilogue pass. ``config`` from
    ``configs.select("decode", ...)``; ``wrap`` as in ``bsr_fwd``."""
    M, K = x.shape
    nnzb, BN, BK = values.shape
    BM, G = config["BM"], config["G"]
    N = out_features
    acc = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    dot_f32 = interpreting() and x.dtype == torch.bfloat16
    if nnzb:
        chunk = max(G, triton.cdiv(nnzb, max(1, programs)))
        grid = (triton.cdiv(nnzb, chunk), triton.cdiv(M, BM))
        launchable(bsr_decode_partial_kernel, wrap)[grid](
            x, values, row_ptr, col_idx, block_row, acc, M, N, K, nnzb, chunk, x.stride(0),
            BM=BM, BN=BN, BK=BK, G=G, DOT_F32=dot_f32,
            num_warps=config["num_warps"], num_stages=config["num_stages"])
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    fin_m = min(BM, 16)
    grid = (triton.cdiv(N, 256), triton.cdiv(M, fin_m))
    launchable(bsr_decode_finish_kernel, wrap)[grid](
        acc, bias if bias is not None else y, y, M, N, y.stride(0),
        BM=fin_m, BLOCK_N=256, HAS_BIAS=bias is not None, ACT=ACT_CODES[activation], num_warps=4)
    return y
