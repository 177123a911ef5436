"""The ``torch`` backend: the reference every test compares against, and the CPU path.

Batched gathers + ``bmm`` + ``index_add_`` over kept blocks (no Python loop over blocks);
work is chunked so the gathered operands stay under ``_CHUNK_ELEMS`` elements. Half
precision is computed in float32 and cast back, so the reference carries no low-precision
accumulation error of its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_CHUNK_ELEMS = 1 << 24


def available():
    return True, ""


def supports(x, values):
    return True


def _compute_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _blocked(t: torch.Tensor, side: int, nblocks: int, dtype) -> torch.Tensor:
    """``t [M, D]`` -> zero-padded ``[nblocks, M, side]`` (block-major) in ``dtype``."""
    M, D = t.shape
    t = t.to(dtype)
    if nblocks * side != D:
        t = F.pad(t, (0, nblocks * side - D))
    return t.reshape(M, nblocks, side).transpose(0, 1)


def _chunks(n_items: int, per_item: int):
    step = max(1, _CHUNK_ELEMS // max(1, per_item))
    for s in range(0, n_items, step):
        yield s, min(n_items, s + step)


def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "silu":
        return F.silu(z)
    return z


def forward(x, values, row_ptr, col_idx, block_row, row_order, out_features, bias, activation):
    M, K = x.shape
    nnzb, bn, bk = values.shape
    R = row_ptr.numel() - 1
    C = -(-K // bk)
    cd = _compute_dtype(x.dtype)
    xb = _blocked(x, bk, C, cd)                                  # [C, M, BK]
    vt = values.to(cd).transpose(1, 2)                           # [nnzb, BK, BN]
    yb = torch.zeros(R, M, bn, dtype=cd, device=x.device)        # [R, M, BN]
    ci, br = col_idx.long(), block_row.long()
    for s, e in _chunks(nnzb, M * max(bn, bk)):
        yb.index_add_(0, br[s:e], torch.bmm(xb[ci[s:e]], vt[s:e]))
    y = yb.transpose(0, 1).reshape(M, R * bn)[:, :out_features]
    if bias is not None:
        y = y + bias.to(cd)
    return activate(y, activation).to(x.dtype)


def grad_input(dy, values, col_ptr, row_idx, t_perm, in_features):
    """dX = dY @ W, walking the kept blocks column by column (CSC order)."""
    M, N = dy.shape
    nnzb, bn, bk = values.shape
    C = col_ptr.numel() - 1
    R = -(-N // bn)
    cd = _compute_dtype(dy.dtype)
    dyb = _blocked(dy, bn, R, cd)                                 # [R, M, BN]
    counts = (col_ptr[1:] - col_ptr[:-1]).long()
    col_of = torch.repeat_interleave(torch.arange(C, device=dy.device), counts)  # [nnzb] CSC order
    perm, ri = t_perm.long(), row_idx.long()
    dxb = torch.zeros(C, M, bk, dtype=cd, device=dy.device)
    for s, e in _chunks(nnzb, M * max(bn, bk)):
        dxb.index_add_(0, col_of[s:e], torch.bmm(dyb[ri[s:e]], values[perm[s:e]].to(cd)))
    return dxb.transpose(0, 1).reshape(M, C * bk)[:, :in_features].to(dy.dtype)


def grad_weight(dy, x, block_row, col_idx, block):
    """dV[i] = dY[:, rows of block i]^T @ X[:, cols of block i], for kept blocks only."""
    bn, bk = block
    M = dy.shape[0]
    nnzb = col_idx.numel()
    cd = _compute_dtype(dy.dtype)
    dyb = _blocked(dy, bn, -(-dy.shape[1] // bn), cd)             # [R, M, BN]
    xb = _blocked(x, bk, -(-x.shape[1] // bk), cd)                # [C, M, BK]
    out = torch.empty(nnzb, bn, bk, dtype=dy.dtype, device=dy.device)
    br, ci = block_row.long(), col_idx.long()
    for s, e in _chunks(nnzb, M * max(bn, bk)):
        out[s:e] = torch.bmm(dyb[br[s:e]].transpose(1, 2), xb[ci[s:e]]).to(dy.dtype)
    return out
