"""Block-sparse forward (prefill / training): ``y[M, N] = act(x[M, K] @ W^T + bias)``.

Design
------
* One program per (M tile of ``BM`` rows, block-row ``r`` of W). It walks the kept blocks
  ``row_ptr[r] .. row_ptr[r+1]`` of that row and accumulates ``acc[BM, BN]`` in fp32::

      acc += x[m0:m0+BM, cols(i..i+G)] @ Wt(i..i+G)      Wt: [G*BK, BN], rows g*BK+k
                                                              = values[i+g, :, k]
  The values of one block-row are contiguous, so ``G`` consecutive kept blocks are one
  contiguous slab: with small blocks (16, 32) ``G`` blocks are taken per K-step and the MMA
  sees K = G*BK = 64..128 (x is gathered at ``G`` column offsets into one tile). The W^T
  tile is K-contiguous (it is W's own layout), which wgmma takes for 16-bit and tf32.
* The loop is a plain ``for`` over a runtime range with the column index loaded inside, so
  Triton software-pipelines it (``num_stages`` buffers of cp.async loads, async wgmma).
* Launch order: programs are rastered in groups of ``GROUP_M`` M tiles x all block-rows
  (rows in ``row_order``, heaviest first): a group's x tiles stay in L2 while every row of
  W streams past them, and heavy rows start first so they do not straggle at the end.
* K and N need not be multiples of the block: x loads are masked to ``K`` (values are
  zero-padded blocks), stores are masked to ``M`` x ``N``. Empty block-rows write
  ``act(bias)`` (or zeros). Epilogue (bias + none/relu/gelu/silu) is fused.
* Precision: fp16/bf16 operands; fp32 operands go through ``tl.dot``'s default tf32 on
  the GPU (10-bit mantissa products, fp32 accumulate). Accumulation is always fp32.
* Config ``SWAP: True`` computes the tile transposed (see ``row_segment``): the block's rows
  as the MMA's M. A tuning candidate on Hopper for BN >= 64 until timed.
* ``bsr_fwd_tma_kernel`` (config ``TMA: True``, Hopper, G = 1, 16-byte aligned rows): the
  same loop with both tiles fetched by TMA from host-built tensor descriptors (x as
  ``[M, K]`` tiles ``[BM, BK]`` at ``(m0, c*BK)``, values as ``[nnzb*BN, BK]`` tiles at
  ``(i*BN, 0)``); TMA zero-fills out-of-bounds rows/columns, so no masks and no address
  arithmetic in the loop. Off by default: a tuning candidate (sm_90+ only: on sm_80 the
  descriptor loads compile to plain, unpipelined loads) until timed on an H100.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import ACT_CODES, epilogue, interpreting, launchable, mma, raster, row_segment


@triton.jit
def bsr_fwd_kernel(
    x, values, row_ptr, col_idx, row_order, bias, y,
    M, N, K, R, stride_xm, stride_ym,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, G: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, DOT_F32: tl.constexpr, SWAP: tl.constexpr,
):
    pid_m, j = raster(M, R, BM, GROUP_M)
    r = tl.load(row_order + j)

    start = tl.load(row_ptr + r)
    end = tl.load(row_ptr + r + 1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_ok = offs_m < M
    x_rows = x + offs_m[:, None].to(tl.int64) * stride_xm
    acc = row_segment(x_rows, m_ok, values, col_idx, start, end, K, BM, BN, BK, G, DOT_F32, SWAP)

    n_glob = r * BN + tl.arange(0, BN)
    n_ok = n_glob < N
    z = epilogue(acc, bias, n_glob, n_ok, HAS_BIAS, ACT)
    y_ptrs = y + offs_m[:, None].to(tl.int64) * stride_ym + n_glob[None, :]
    tl.store(y_ptrs, z.to(y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def bsr_fwd_tma_kernel(
    x_desc, v_desc, row_ptr, col_idx, row_order, bias, y,
    M, N, R, stride_ym,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, DOT_F32: tl.constexpr,
):
    pid_m, j = raster(M, R, BM, GROUP_M)
    r = tl.load(row_order + j)
    start = tl.load(row_ptr + r)
    end = tl.load(row_ptr + r + 1)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for i in range(start, end):
        c = tl.load(col_idx + i)
        a = x_desc.load([pid_m * BM, c * BK])          # [BM, BK]
        b = v_desc.load([i * BN, 0])                   # [BN, BK], K-contiguous
        acc = mma(a, b.T, acc, DOT_F32)

    offs_m = pid_m * BM + tl.arange(0, BM)
    n_glob = r * BN + tl.arange(0, BN)
    n_ok = n_glob < N
    z = epilogue(acc, bias, n_glob, n_ok, HAS_BIAS, ACT)
    y_ptrs = y + offs_m[:, None].to(tl.int64) * stride_ym + n_glob[None, :]
    tl.store(y_ptrs, z.to(y.dtype.element_ty), mask=(offs_m < M)[:, None] & n_ok[None, :])


def tma_ok(x, values) -> bool:
    """Whether the TMA variant can take these tensors: rows and bases 16-byte aligned (TMA's
    rule), at least one kept block. Reads only strides and offsets (fake tensors too)."""
    e = x.element_size()
    return (values.shape[0] > 0 and (x.stride(0) * e) % 16 == 0 and (x.storage_offset() * e) % 16 == 0
            and (values.storage_offset() * e) % 16 == 0 and values.is_contiguous())


def bsr_fwd(x, values, row_ptr, col_idx, row_order, out_features, bias=None, activation="none", *,
            config: dict, wrap=None):
    """Launch the forward. ``x [M, K]`` (unit stride along K), ``values [nnzb, BN, BK]``;
    ``config`` from ``sparsecore.kernels.configs.select("fwd", ...)`` (BM, G, GROUP_M,
    num_warps, num_stages, optional TMA). ``wrap``: e.g. ``wrap_triton`` inside a ``triton_op``."""
    M, K = x.shape
    _, BN, BK = values.shape
    R = row_ptr.numel() - 1
    y = torch.empty(M, out_features, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(M, config["BM"]) * R,)
    dot_f32 = interpreting() and x.dtype == torch.bfloat16
    if config.get("TMA") and config["G"] == 1 and tma_ok(x, values):
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_desc = TensorDescriptor.from_tensor(x, [config["BM"], BK])
        v_desc = TensorDescriptor.from_tensor(values.view(-1, BK), [BN, BK])
        launchable(bsr_fwd_tma_kernel, wrap)[grid](
            x_desc, v_desc, row_ptr, col_idx, row_order, bias if bias is not None else y, y,
            M, out_features, R, y.stride(0),
            BM=config["BM"], BN=BN, BK=BK, GROUP_M=config["GROUP_M"],
            HAS_BIAS=bias is not None, ACT=ACT_CODES[activation], DOT_F32=dot_f32,
            num_warps=config["num_warps"], num_stages=config["num_stages"])
        return y
    launchable(bsr_fwd_kernel, wrap)[grid](
        x, values, row_ptr, col_idx, row_order, bias if bias is not None else y, y,
        M, out_features, K, R, x.stride(0), y.stride(0),
        BM=config["BM"], BN=BN, BK=BK, G=config["G"], GROUP_M=config["GROUP_M"],
        HAS_BIAS=bias is not None, ACT=ACT_CODES[activation], DOT_F32=dot_f32, SWAP=bool(config.get("SWAP")),
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    return y
