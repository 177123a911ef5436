"""Block-sparse input gradient: ``dX[M, K] = dY[M, N] @ W`` through the transposed metadata.

Design
------
The forward kernel turned around: one program per (M tile, block-column ``c`` of W), which
walks the kept blocks of column ``c`` in CSC order (``col_ptr[c] .. col_ptr[c+1]``; their
block-rows ``row_idx[j]`` and their values ``values[t_perm[j]]``, no transposed copy)::

    acc[BM, BK] += dY[m0:m0+BM, rows(j..j+G)] @ Wg        Wg: [G*BN, BK], rows g*BN+n
                                                               = values[t_perm[j+g], n, :]
``G`` blocks per step for small ``BN`` so the MMA's K (= G*BN) reaches 64..128. Each
value block is contiguous along BK, i.e. the B tile is N-contiguous: wgmma takes it for
16-bit types (tf32 may fall back, see tests/test_triton_compile.py).
Launch order: ``col_order`` (block-columns heaviest first, computed by the caller) inside
``GROUP_M`` M-tile groups, as the forward. Masks: dY columns to ``N``, dX stores to
``M`` x ``K``. fp32 accumulate; fp32 operands use tf32 on the GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import interpreting, launchable, mma, raster


@triton.jit
def bsr_dx_kernel(
    dy, values, col_ptr, row_idx, t_perm, col_order, dx,
    M, N, K, C, stride_dym, stride_dxm,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, G: tl.constexpr, GROUP_M: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    pid_m, j = raster(M, C, BM, GROUP_M)
    c = tl.load(col_order + j)

    start = tl.load(col_ptr + c)
    end = tl.load(col_ptr + c + 1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_k = tl.arange(0, BK)
    nn = tl.arange(0, G * BN)
    g = nn // BN
    n = nn % BN
    m_ok = offs_m < M
    dy_rows = dy + offs_m[:, None].to(tl.int64) * stride_dym
    w_tile = n[:, None] * BK + offs_k[None, :]      # [G*BN, BK] offsets inside one block

    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for j in range(start, end, G):
        blk = j + g
        ok = blk < end
        r = tl.load(row_idx + blk, mask=ok, other=0)
        p = tl.load(t_perm + blk, mask=ok, other=0)
        ncol = r * BN + n
        a = tl.load(dy_rows + ncol[None, :], mask=m_ok[:, None] & (ok & (ncol < N))[None, :], other=0.0)
        b = tl.load(values + p.to(tl.int64)[:, None] * (BN * BK) + w_tile, mask=ok[:, None], other=0.0)
        acc = mma(a, b, acc, DOT_F32)

    k_glob = c * BK + offs_k
    ptrs = dx + offs_m[:, None].to(tl.int64) * stride_dxm + k_glob[None, :]
    tl.store(ptrs, acc.to(dx.dtype.element_ty), mask=m_ok[:, None] & (k_glob < K)[None, :])


def bsr_dx(dy, values, col_ptr, row_idx, t_perm, in_features, *, config: dict, wrap=None):
    """Launch dX. ``dy [M, N]`` (unit stride along N); ``config`` from
    ``configs.select("dx", ...)``; ``wrap`` as in ``bsr_fwd``."""
    M, N = dy.shape
    _, BN, BK = values.shape
    C = col_ptr.numel() - 1
    col_order = torch.argsort(col_ptr[1:] - col_ptr[:-1], descending=True, stable=True).to(torch.int32)
    dx = torch.empty(M, in_features, dtype=dy.dtype, device=dy.device)
    grid = (triton.cdiv(M, config["BM"]) * C,)
    launchable(bsr_dx_kernel, wrap)[grid](
        dy, values, col_ptr, row_idx, t_perm, col_order, dx,
        M, N, in_features, C, dy.stride(0), dx.stride(0),
        BM=config["BM"], BN=BN, BK=BK, G=config["G"], GROUP_M=config["GROUP_M"],
        DOT_F32=interpreting() and dy.dtype == torch.bfloat16,
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    return dx
