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
the forward) and stores each segment's ``[BM, BN]`` fp32 partial in its own workspace slot.
A segment (program p, block-row r) gets slot ``p + r``: walking the kept-block list, every
new segment advances p or r (or both), so slots never collide and there are at most
``P + R``. A second pass, one program per (block-row, M tile), sums the slots of the
programs that overlapped its row (``row_ptr[r] // chunk .. (row_ptr[r+1]-1) // chunk``) in
a fixed order, applies ``act(acc + bias)`` and casts: deterministic, no atomics, no memset
(two launches). Empty block-rows sum nothing and write ``act(bias)``. Every kept weight
byte is read exactly once, and the chunk size comes from ``nnzb`` (a shape): no host sync.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import ACT_CODES, epilogue, interpreting, launchable, row_segment


@triton.jit
def bsr_decode_partial_kernel(
    x, values, row_ptr, col_idx, block_row, ws,
    M, K, nnzb, chunk, stride_xm,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, G: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid = tl.program_id(0)
    lo = pid * chunk
    hi = tl.minimum(lo + chunk, nnzb)
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    m_ok = offs_m < M
    x_rows = x + offs_m[:, None].to(tl.int64) * stride_xm

    i = lo
    while i < hi:                                   # one block-row segment per trip
        r = tl.load(block_row + i)
        stop = tl.minimum(tl.load(row_ptr + r + 1), hi)
        acc = row_segment(x_rows, m_ok, values, col_idx, i, stop, K, BM, BN, BK, G, DOT_F32, False)
        slot = (pid + r).to(tl.int64)
        tl.store(ws + (slot * M + offs_m[:, None]) * BN + offs_n[None, :], acc, mask=m_ok[:, None])
        i = tl.maximum(stop, i + 1)  # = stop for valid metadata; a bad row_ptr must not loop forever


@triton.jit
def bsr_decode_finish_kernel(ws, row_ptr, bias, y, M, N, chunk, stride_ym,
                             BM: tl.constexpr, BN: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
    r = tl.program_id(0)
    offs_m = tl.program_id(1) * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    m_ok = offs_m < M
    lo = tl.load(row_ptr + r)
    hi = tl.load(row_ptr + r + 1)
    p_end = tl.where(hi > lo, (hi - 1) // chunk + 1, lo // chunk)   # programs overlapping row r
    tile = offs_m[:, None].to(tl.int64) * BN + offs_n[None, :]
    z = tl.zeros((BM, BN), dtype=tl.float32)
    for p in range(lo // chunk, p_end):
        z += tl.load(ws + (p + r).to(tl.int64) * M * BN + tile, mask=m_ok[:, None], other=0.0)
    n_glob = r * BN + offs_n
    n_ok = n_glob < N
    z = epilogue(z, bias, n_glob, n_ok, HAS_BIAS, ACT)
    ptrs = y + offs_m[:, None].to(tl.int64) * stride_ym + n_glob[None, :]
    tl.store(ptrs, z.to(y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def bsr_decode(x, values, row_ptr, col_idx, block_row, out_features, bias=None, activation="none", *,
               config: dict, programs: int, wrap=None):
    """Launch the decode path: about ``programs`` stream-K programs over the kept blocks
    (e.g. ``PROGRAMS_PER_SM x SMs``), then the reduce + epilogue pass. ``config`` from
    ``configs.select("decode", ...)``; ``wrap`` as in ``bsr_fwd``."""
    M, K = x.shape
    nnzb, BN, BK = values.shape
    BM, G = config["BM"], config["G"]
    R = row_ptr.numel() - 1
    chunk = max(G, triton.cdiv(nnzb, max(1, programs)))
    P = triton.cdiv(nnzb, chunk)
    ws = torch.empty(P + R, M, BN, dtype=torch.float32, device=x.device)  # slot p + r per segment
    if nnzb:
        launchable(bsr_decode_partial_kernel, wrap)[(P, triton.cdiv(M, BM))](
            x, values, row_ptr, col_idx, block_row, ws, M, K, nnzb, chunk, x.stride(0),
            BM=BM, BN=BN, BK=BK, G=G, DOT_F32=interpreting() and x.dtype == torch.bfloat16,
            num_warps=config["num_warps"], num_stages=config["num_stages"])
    y = torch.empty(M, out_features, dtype=x.dtype, device=x.device)
    fin_m = 16
    launchable(bsr_decode_finish_kernel, wrap)[(R, triton.cdiv(M, fin_m))](
        ws, row_ptr, bias if bias is not None else y, y, M, out_features, chunk, y.stride(0),
        BM=fin_m, BN=BN, HAS_BIAS=bias is not None, ACT=ACT_CODES[activation], num_warps=4)
    return y
