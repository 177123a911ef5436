"""Pieces every kernel shares: the MMA step, the fused epilogue, small host helpers.

Kernels are plain ``@triton.jit`` functions. Triton decides at *its own import* whether
they compile for the GPU or run in the CPU interpreter (``TRITON_INTERPRET=1``), so the
launchers below take whatever mode the process is in: CUDA tensors normally, CPU tensors
when ``TRITON_INTERPRET=1`` was set before ``triton`` was first imported.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

ACT_CODES = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}


def interpreting() -> bool:
    """True when this process runs Triton kernels in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def launchable(k, wrap=None):
    """``k`` as launched: through ``wrap`` (``wrap_triton`` inside a ``triton_op``) or plain."""
    return wrap(k) if wrap is not None else k


@triton.jit
def mma(a, b, acc, DOT_F32: tl.constexpr):
    """``acc += a @ b`` (fp32 accumulate). ``DOT_F32`` upcasts the operands first: only the
    CPU interpreter needs it, for bf16, whose ``tl.dot`` returns garbage there (triton 3.8);
    the upcast is exact (bf16 -> fp32) so the numerics under test are unchanged."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def row_segment(x_rows, m_ok, values, col_idx, start, end, K, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, G: tl.constexpr, DOT_F32: tl.constexpr, SWAP: tl.constexpr):
    """fp32 ``[BM, BN]`` = x[rows, cols of kept blocks start..end) @ their values^T.

    ``x_rows``: ``[BM, 1]`` row pointers of x; kept blocks ``start..end`` of one block-row are
    contiguous in ``values``, so ``G`` of them are one K-step (the MMA sees K = G*BK)::

        a [BM, G*BK] = x[rows, col_idx[i+g]*BK + k]      (gathered, masked to K)
        b [G*BK, BN] = values[i+g, n, k]                 (W^T tile, K-contiguous)

    ``SWAP`` computes the transpose, ``[BN, BM] += b^T @ a^T``, returned transposed: the
    block's rows become the MMA's M and the x rows its N (BN = 64, BM = 128..256 on Hopper:
    wgmma m64nBM instead of m64n64, a better ratio of FLOPs to shared-memory bytes).
    """
    kk = tl.arange(0, G * BK)
    g = kk // BK                                   # which of the G blocks this column is in
    k = kk % BK
    if SWAP:
        w_tile = tl.arange(0, BN)[:, None] * BK + k[None, :]   # [BN, G*BK]: values' own layout
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        w_tile = tl.arange(0, BN)[None, :] * BK + k[:, None]   # [G*BK, BN]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for i in range(start, end, G):
        blk = i + g
        ok = blk < end
        c = tl.load(col_idx + blk, mask=ok, other=0)
        kcol = c * BK + k
        a = tl.load(x_rows + kcol[None, :], mask=m_ok[:, None] & (ok & (kcol < K))[None, :], other=0.0)
        if SWAP:
            b = tl.load(values + blk.to(tl.int64)[None, :] * (BN * BK) + w_tile, mask=ok[None, :], other=0.0)
            acc = mma(b, tl.trans(a), acc, DOT_F32)
        else:
            b = tl.load(values + blk.to(tl.int64)[:, None] * (BN * BK) + w_tile, mask=ok[:, None], other=0.0)
            acc = mma(a, b, acc, DOT_F32)
    if SWAP:
        out = tl.trans(acc)
    else:
        out = acc
    return out


@triton.jit
def raster(M, T, BM: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (M tile, output-tile index j): programs go in groups of ``GROUP_M`` M
    tiles x all ``T`` output tiles, M fastest inside a group, so a group's input rows stay
    in L2 while every block-row (fwd) / block-column (dX) streams past them. ``j`` indexes
    the launch order (``row_order``: heaviest first)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    per_group = GROUP_M * T
    first_m = (pid // per_group) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % gsize, (pid % per_group) // gsize


@triton.jit
def epilogue(z, bias_ptr, offs_n, n_ok, HAS_BIAS: tl.constexpr, ACT: tl.constexpr):
    """``act(z + bias[offs_n])`` in fp32 on a ``[BM, BN]`` tile; ACT codes in ``ACT_CODES``
    (gelu is the erf form, as ``F.gelu``)."""
    if HAS_BIAS:
        z += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:
        z = tl.maximum(z, 0.0)
    elif ACT == 2:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:
        z = z * tl.sigmoid(z)
    return z


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(1, int(n)))
