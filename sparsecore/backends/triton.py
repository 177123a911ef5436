"""The ``triton`` backend: the kernels of ``sparsecore.kernels`` behind the backend interface.

Paths (configs from ``sparsecore.kernels.configs``: tuned table, else heuristics)::

    forward     M <= 64  -> bsr_decode (stream-K over kept blocks + reduce/epilogue pass)
                M  > 64  -> bsr_fwd    (program per M tile x block-row, fused epilogue)
    grad_input           -> bsr_dx     (program per M tile x block-column, CSC metadata)
    grad_weight          -> bsr_dw     (program per kept block [x M split])

On CUDA tensors the functions call the ``torch.library.triton_op`` ops registered here
(on import of this module), so Inductor sees the kernels inside them and other libraries
can call them directly (after ``import sparsecore.backends.triton``):

    torch.ops.sparsecore.triton_bsr_linear(x, values, row_ptr, col_idx, block_row, row_order,
                                           out_features, bias, activation) -> y [M, N]
    torch.ops.sparsecore.triton_bsr_linear_grad_input(dy, values, col_ptr, row_idx, t_perm,
                                                      in_features) -> dx [M, K]
    torch.ops.sparsecore.triton_bsr_linear_grad_weight(dy, x, block_row, col_idx, block_n,
                                                       block_k) -> dvalues [nnzb, BN, BK]

On CPU tensors (only when ``TRITON_INTERPRET=1`` was set before triton's import) the same
launchers run plainly in the Triton interpreter: ``triton_op`` + fake tensors cannot run
there. fp32 inputs use tf32 products on the GPU (``tl.dot`` default); fp64 is not supported
(auto falls back to the torch backend). Results are deterministic (no atomics).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..errors import check
from ..format import BLOCK_SIDES
from ..kernels import triton_unusable

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_UNUSABLE = triton_unusable()  # why the kernels cannot run here, or None
if _UNUSABLE is None:
    try:
        from ..kernels import bsr_decode, bsr_dw, bsr_dx, bsr_fwd, configs
        from ..kernels.common import interpreting
    except ImportError as e:  # triton unusable here: the backend reports unavailable
        _UNUSABLE = f"triton cannot be imported ({e})"


def available():
    if _UNUSABLE is not None:
        return False, _UNUSABLE
    if torch.cuda.is_available() or interpreting():
        return True, ""
    return False, "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on CPU)"


def supports(x, values):
    if _UNUSABLE is not None:
        return False
    on_device = x.is_cuda or (x.device.type == "cpu" and interpreting())
    return (on_device and x.dtype in DTYPES and values.dtype == x.dtype and values.dim() == 3
            and values.shape[1] in BLOCK_SIDES and values.shape[2] in BLOCK_SIDES)


def _rowmajor(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(name, t, values, n, k, **meta):
    """What the kernels need, for callers of the triton ops that skip the public op: ``t`` 2-D
    of the kernels' dtypes, metadata of the lengths ``[n, k]`` in blocks asks for (``ops``'
    checks; None: ``t``'s columns). Returns ``values`` and ``meta`` contiguous (the kernels
    index them so)."""
    from ..ops import _check_meta  # ops imports the backends

    check(t.dim() == 2, name, "a 2-D tensor", f"shape {tuple(t.shape)}")
    check(supports(t, values), name,
          f"a CUDA tensor (CPU only with TRITON_INTERPRET=1) of dtype {DTYPES} matching values, values "
          f"[nnzb, BN, BK] with sides in {BLOCK_SIDES}", f"{t.dtype} on {t.device}, values "
          f"{values.dtype} {tuple(values.shape)}")
    n, k = (t.shape[1] if n is None else n), (t.shape[1] if k is None else k)
    _check_meta(values.shape[0], tuple(values.shape[1:]), n, k, t.device, **meta)
    return values.contiguous(), [m.contiguous() for m in meta.values()]


# -- launches shared by the triton_ops (wrap=wrap_triton) and the CPU interpreter (wrap=None)
def _forward(x, values, row_ptr, col_idx, block_row, row_order, out_features, bias, activation, wrap=None):
    values, (row_ptr, col_idx, block_row, row_order) = _check(
        "x", x, values, out_features, None, row_ptr=row_ptr, col_idx=col_idx, block_row=block_row,
        row_order=row_order)
    check(bias is None or bias.shape == (out_features,) and bias.dtype == x.dtype and bias.device == x.device,
          "bias", f"None or {x.dtype} ({out_features},) on {x.device}",
          f"{bias.dtype} {tuple(bias.shape)} on {bias.device}" if bias is not None else None)
    x = _rowmajor(x)
    bias = bias.contiguous() if bias is not None else None
    M, K = x.shape
    block = tuple(values.shape[1:])
    if M <= configs.DECODE_MAX_M:
        cfg = configs.select("decode", x.dtype, block, M, out_features, K, x.device)
        programs = cfg["PROGRAMS_PER_SM"] * configs.sm_count(x.device)
        return bsr_decode.bsr_decode(x, values, row_ptr, col_idx, block_row, out_features, bias, activation,
                                     config=cfg, programs=programs, wrap=wrap)
    cfg = configs.select("fwd", x.dtype, block, M, out_features, K, x.device)
    return bsr_fwd.bsr_fwd(x, values, row_ptr, col_idx, row_order, out_features, bias, activation,
                           config=cfg, wrap=wrap)


def _grad_input(dy, values, col_ptr, row_idx, t_perm, in_features, wrap=None):
    values, (col_ptr, row_idx, t_perm) = _check("dy", dy, values, None, in_features, col_ptr=col_ptr,
                                                row_idx=row_idx, t_perm=t_perm)
    dy = _rowmajor(dy)
    cfg = configs.select("dx", dy.dtype, tuple(values.shape[1:]), dy.shape[0], dy.shape[1], in_features,
                         dy.device)
    return bsr_dx.bsr_dx(dy, values, col_ptr, row_idx, t_perm, in_features, config=cfg, wrap=wrap)


def _grad_weight(dy, x, block_row, col_idx, block, wrap=None):
    _, (block_row, col_idx) = _check("dy", dy, dy.new_empty(col_idx.numel(), *block), None,
                                     x.shape[1] if x.dim() == 2 else 0, block_row=block_row, col_idx=col_idx)
    check(x.dim() == 2 and x.dtype == dy.dtype and x.device == dy.device and x.shape[0] == dy.shape[0], "x",
          f"2-D, {dy.dtype} on {dy.device} with {dy.shape[0]} rows (as dy)", f"{x.dtype} on {x.device}, {tuple(x.shape)}")
    dy, x = _rowmajor(dy), _rowmajor(x)
    cfg = configs.select("dw", dy.dtype, block, dy.shape[0], dy.shape[1], x.shape[1], dy.device)
    programs = cfg["PROGRAMS_PER_SM"] * configs.sm_count(dy.device)
    return bsr_dw.bsr_dw(dy, x, block_row, col_idx, block, config=cfg, programs=programs, wrap=wrap)


if _UNUSABLE is None:
    from torch.library import triton_op, wrap_triton

    def _wrap(kernel):
        """wrap_triton, except in the CPU interpreter: nothing traces there, and torch < 2.14's
        wrap_triton rejects the interpreter's kernels."""
        return kernel if interpreting() else wrap_triton(kernel)

    @triton_op("sparsecore::triton_bsr_linear", mutates_args=())
    def _op_forward(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, block_row: Tensor,
                    row_order: Tensor, out_features: int, bias: Optional[Tensor] = None,
                    activation: str = "none") -> Tensor:
        return _forward(x, values, row_ptr, col_idx, block_row, row_order, out_features, bias, activation,
                        _wrap)

    @triton_op("sparsecore::triton_bsr_linear_grad_input", mutates_args=())
    def _op_grad_input(dy: Tensor, values: Tensor, col_ptr: Tensor, row_idx: Tensor, t_perm: Tensor,
                       in_features: int) -> Tensor:
        return _grad_input(dy, values, col_ptr, row_idx, t_perm, in_features, _wrap)

    @triton_op("sparsecore::triton_bsr_linear_grad_weight", mutates_args=())
    def _op_grad_weight(dy: Tensor, x: Tensor, block_row: Tensor, col_idx: Tensor, block_n: int,
                        block_k: int) -> Tensor:
        return _grad_weight(dy, x, block_row, col_idx, (block_n, block_k), _wrap)


# -- the backend interface (see sparsecore.backends) ----------------------------------------
def forward(x, values, row_ptr, col_idx, block_row, row_order, out_features, bias, activation):
    if x.is_cuda:
        return torch.ops.sparsecore.triton_bsr_linear(x, values, row_ptr, col_idx, block_row, row_order,
                                                      out_features, bias, activation)
    return _forward(x, values, row_ptr, col_idx, block_row, row_order, out_features, bias, activation)


def grad_input(dy, values, col_ptr, row_idx, t_perm, in_features):
    if dy.is_cuda:
        return torch.ops.sparsecore.triton_bsr_linear_grad_input(dy, values, col_ptr, row_idx, t_perm,
                                                                 in_features)
    return _grad_input(dy, values, col_ptr, row_idx, t_perm, in_features)


def grad_weight(dy, x, block_row, col_idx, block):
    if dy.is_cuda:
        return torch.ops.sparsecore.triton_bsr_linear_grad_weight(dy, x, block_row, col_idx, block[0], block[1])
    return _grad_weight(dy, x, block_row, col_idx, block)
