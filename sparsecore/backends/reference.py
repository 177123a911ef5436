"""The ``torch`` backend: the reference every test compares against, and the CPU path.

No Python loop over blocks. Block-rows (forward) or block-columns (dX) are grouped by how
many blocks they keep; a group of ``n`` rows with ``L`` blocks each is one ``bmm``::

    x [M, C*BK] --gather cols--> A [n, M, L*BK]      values --gather--> B [n, L*BK, BN]
    y[:, rows] = A @ B                                (exact: no padding, no atomics)

so the loop runs over distinct row lengths (a handful), and each GEMM has K = L*BK.
On the CPU, at high density and many rows, W is scattered to dense and one F.linear runs
instead (``_dense_is_faster``): never much slower than dense, whatever the density.
Work is chunked to keep gathered operands under ``_CHUNK_ELEMS`` elements. Half precision
is computed in float32 and cast back once, so the reference adds no low-precision
accumulation error of its own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..format import blocks_to_dense

_CHUNK_ELEMS = 1 << 24


def available():
    return True, ""


def supports(x, values):
    return True


def _compute_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _blocked(t: torch.Tensor, side: int, nblocks: int, dtype) -> torch.Tensor:
    """``t [M, D]`` -> zero-padded view ``[M, nblocks, side]`` in ``dtype``."""
    M, D = t.shape
    t = t.to(dtype)
    if nblocks * side != D:
        t = F.pad(t, (0, nblocks * side - D))
    return t.reshape(M, nblocks, side)


def _chunks(n_items: int, per_item: int):
    step = max(1, _CHUNK_ELEMS // max(1, per_item))
    for s in range(0, n_items, step):
        yield s, min(n_items, s + step)


def _groups(ptr: torch.Tensor):
    """Segments of a CSR pointer grouped by length: ``(segment ids [n], positions [n, L])``."""
    lengths = (ptr[1:] - ptr[:-1]).long()
    for L in torch.unique(lengths).tolist():
        if L:
            seg = (lengths == L).nonzero().flatten()
            yield seg, ptr[seg].long()[:, None] + torch.arange(L, device=ptr.device)


def activate(z: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "silu":
        return F.silu(z)
    return z


def _grouped_spmm(a: torch.Tensor, ptr, a_idx, b_blocks, out_blocks: int, out_side: int):
    """``out[:, s] = sum_j a[:, a_idx[p_j]] @ b_blocks[p_j]`` over segments ``s`` of ``ptr``.

    ``a [M, A, side_in]`` blocked operand; ``b_blocks(p) -> [n, L*side_in, out_side]``.
    Returns ``[M, out_blocks, out_side]``.
    """
    M = a.shape[0]
    out = a.new_zeros(M, out_blocks, out_side)
    for seg, pos in _groups(ptr):
        L = pos.shape[1]
        for s, e in _chunks(seg.numel(), M * L * max(a.shape[2], out_side)):
            p = pos[s:e]
            lhs = a[:, a_idx[p]].permute(1, 0, 2, 3).reshape(e - s, M, L * a.shape[2])
            out[:, seg[s:e]] = torch.bmm(lhs, b_blocks(p)).transpose(0, 1)
    return out


def _dense_is_faster(x, density: float) -> bool:
    """CPU cost model (2-core x86, fp32): the grouped GEMMs run ~4x slower per kept FLOP
    than one dense GEMM, and scattering W to dense costs about as much as a GEMM with
    M ~ 190 rows. So at high density and many rows, materialize W and call F.linear.
    Only for finite ``x``: a pruned block never reads ``x`` (as in every kernel), so an inf
    or NaN under it must not reach ``y`` through the dense zeros (inf * 0 = NaN)."""
    return (x.device.type == "cpu" and 4.0 * density > 1.0 + 190.0 / max(1, x.shape[0])
            and bool(torch.isfinite(x).all()))


def forward(x, values, row_ptr, col_idx, block_row, row_order, out_features, bias, activation):
    M, K = x.shape
    nnzb, bn, bk = values.shape
    R, C = row_ptr.numel() - 1, -(-K // bk)
    cd = _compute_dtype(x.dtype)
    v = values.to(cd)
    if _dense_is_faster(x, nnzb / max(1, R * C)):
        y = F.linear(x.to(cd), blocks_to_dense(v, block_row, col_idx, (out_features, K)))
    else:
        blocks = lambda p: v[p].transpose(2, 3).reshape(p.shape[0], p.shape[1] * bk, bn)  # [n, L*BK, BN]
        y = _grouped_spmm(_blocked(x, bk, C, cd), row_ptr, col_idx.long(), blocks, R, bn)
        y = y.reshape(M, R * bn)[:, :out_features]
    if bias is not None:
        y = y + bias.to(cd)
    return activate(y, activation).to(x.dtype)


def grad_input(dy, values, col_ptr, row_idx, t_perm, in_features):
    """dX = dY @ W, walking the kept blocks column by column (CSC order via ``t_perm``)."""
    M, N = dy.shape
    nnzb, bn, bk = values.shape
    C, R = col_ptr.numel() - 1, -(-N // bn)
    cd = _compute_dtype(dy.dtype)
    v, perm = values.to(cd), t_perm.long()
    if _dense_is_faster(dy, nnzb / max(1, R * C)):
        return (dy.to(cd) @ blocks_to_dense(v[perm], row_idx, _csc_cols(col_ptr), (N, in_features))).to(dy.dtype)
    blocks = lambda p: v[perm[p]].reshape(p.shape[0], p.shape[1] * bn, bk)  # [n, L*BN, BK]
    dx = _grouped_spmm(_blocked(dy, bn, R, cd), col_ptr, row_idx.long(), blocks, C, bk)
    return dx.reshape(M, C * bk)[:, :in_features].to(dy.dtype)


def _csc_cols(col_ptr):
    """Block-column of each entry in CSC order."""
    C = col_ptr.numel() - 1
    return torch.repeat_interleave(torch.arange(C, device=col_ptr.device), (col_ptr[1:] - col_ptr[:-1]).long())


def grad_weight(dy, x, block_row, col_idx, block):
    """dV[i] = dY[:, rows of block i]^T @ X[:, cols of block i], for kept blocks only.

    Grouped by block-row like the forward: one GEMM ``[BN, M] @ [M, L*BK]`` per row.
    """
    bn, bk = block
    M = dy.shape[0]
    cd = _compute_dtype(dy.dtype)
    R = -(-dy.shape[1] // bn)
    row_ptr = F.pad(torch.bincount(block_row.long(), minlength=R).cumsum(0), (1, 0))  # BSR order
    dyt = _blocked(dy, bn, R, cd).permute(1, 2, 0)                       # [R, BN, M]
    xb = _blocked(x, bk, -(-x.shape[1] // bk), cd)                       # [M, C, BK]
    out = torch.empty(col_idx.numel(), bn, bk, dtype=dy.dtype, device=dy.device)
    ci = col_idx.long()
    for seg, pos in _groups(row_ptr):
        L = pos.shape[1]
        for s, e in _chunks(seg.numel(), M * L * max(bn, bk)):
            p = pos[s:e]
            rhs = xb[:, ci[p]].permute(1, 0, 2, 3).reshape(e - s, M, L * bk)
            dv = torch.bmm(dyt[seg[s:e]], rhs)                            # [n, BN, L*BK]
            out[p] = dv.reshape(e - s, bn, L, bk).transpose(1, 2).to(dy.dtype)
    return out
