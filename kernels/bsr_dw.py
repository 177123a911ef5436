"""Block-sparse weight gradient, kept blocks only (a sampled dense-dense product)::

    dV[i] = dY[:, r*BN:(r+1)*BN]^T @ X[:, c*BK:(c+1)*BK]      r = block_row[i], c = col_idx[i]
            [BN, M]                  [M, BK]               -> [BN, BK], same layout as values

Design
------
* One program per (kept block ``i``, M split ``s``); it reduces over its share of M in
  steps of ``BM`` rows, so the MMA's K is ``BM`` (64 for 16-bit) whatever the block size.
  Programs of consecutive kept blocks share the dY columns of their block-row (BSR order)
  and move down M together, so those tiles come from L2.
* When ``nnzb`` alone would not fill the GPU (few kept blocks, large M) M is split into
  ``S`` ranges: each writes its fp32 partial to its own slice of a ``[S, nnzb, BN, BK]``
  workspace, summed in a fixed order and cast once afterwards (deterministic, no atomics).
  With ``S == 1`` the block is stored directly in the output dtype.
* Zero padding: dY columns ``>= N`` and X columns ``>= K`` load as zeros, so padded rows /
  columns of a block get zero gradient, as the format requires.
* The dY^T tile is M-contiguous (a transposed A operand): wgmma reads it from shared memory
  for 16-bit types; fp32 operands use tf32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import interpreting, launchable, mma


@triton.jit
def bsr_dw_kernel(
    dy, x, block_row, col_idx, dv,
    M, N, K, nnzb, m_per_split, stride_dym, stride_xm,
    BN: tl.constexpr, BK: tl.constexpr, BM: tl.constexpr, SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
):
    i = tl.program_id(0)
    s = tl.program_id(1)
    m_lo = s * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    r = tl.load(block_row + i)
    c = tl.load(col_idx + i)
    n_glob = r * BN + tl.arange(0, BN)
    k_glob = c * BK + tl.arange(0, BK)
    n_ok = n_glob < N
    k_ok = k_glob < K
    offs = tl.arange(0, BM)

    acc = tl.zeros((BN, BK), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BM):
        offs_m = m0 + offs
        m_ok = offs_m < m_hi
        a = tl.load(dy + offs_m[None, :].to(tl.int64) * stride_dym + n_glob[:, None],
                    mask=n_ok[:, None] & m_ok[None, :], other=0.0)          # dY^T tile [BN, BM]
        b = tl.load(x + offs_m[:, None].to(tl.int64) * stride_xm + k_glob[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)          # X tile [BM, BK]
        acc = mma(a, b, acc, DOT_F32)

    blk = i.to(tl.int64) * (BN * BK) + tl.arange(0, BN)[:, None] * BK + tl.arange(0, BK)[None, :]
    if SPLIT:  # fp32 partial into slice s of the [S, nnzb, BN, BK] workspace
        tl.store(dv + s.to(tl.int64) * nnzb * (BN * BK) + blk, acc)
    else:
        tl.store(dv + blk, acc.to(dv.dtype.element_ty))


def bsr_dw(dy, x, block_row, col_idx, block, *, config: dict, programs: int, wrap=None):
    """Launch dW for the kept blocks: ``dy [M, N]``, ``x [M, K]`` (unit inner strides) ->
    ``dvalues [nnzb, BN, BK]``. M is split until about ``programs`` programs run (e.g.
    ``PROGRAMS_PER_SM x SMs``); ``config`` from ``configs.select("dw", ...)``."""
    BN, BK = block
    M, N = dy.shape
    K = x.shape[1]
    nnzb = col_idx.numel()
    BM = config["BM"]
    if nnzb == 0 or M == 0:  # no blocks, or no rows to reduce over: dV = 0
        return dy.new_zeros(nnzb, BN, BK)
    tiles = triton.cdiv(M, BM)
    splits = max(1, min(tiles, triton.cdiv(programs, nnzb)))
    m_per_split = triton.cdiv(tiles, splits) * BM
    splits = triton.cdiv(M, m_per_split)
    split = splits > 1
    dv = torch.empty((splits, nnzb, BN, BK) if split else (nnzb, BN, BK),
                     dtype=torch.float32 if split else dy.dtype, device=dy.device)
    launchable(bsr_dw_kernel, wrap)[(nnzb, splits)](
        dy, x, block_row, col_idx, dv, M, N, K, nnzb, m_per_split, dy.stride(0), x.stride(0),
        BN=BN, BK=BK, BM=BM, SPLIT=split, DOT_F32=interpreting() and dy.dtype == torch.bfloat16,
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    return dv.sum(0).to(dy.dtype) if split else dv
