"""Op schemas: ``torch.ops.sparsecore.*`` definitions, fake kernels, autograd, wrappers.

Three ops, one schema each, every backend behind them (``sparsecore.backends``)::

  bsr_linear(x[M,K], values, row_ptr, col_idx, block_row, col_ptr, row_idx, t_perm,
             row_order, out_features, bias?, activation, backend)  -> y[M,N]
  bsr_linear_grad_input(dy[M,N], values, col_ptr, row_idx, t_perm, in_features, backend)
                                                                    -> dx[M,K]
  bsr_linear_grad_weight(dy[M,N], x[M,K], block_row, col_idx, block_n, block_k, backend)
                                                                    -> dvalues[nnzb,BN,BK]

Autograd of ``bsr_linear`` uses the other two (the mask is fixed: metadata gets no
gradient). Any library can call the ops directly; ``bsr_linear(x, W)`` below is the
friendly wrapper taking a ``BlockSparseWeight`` and ``x [..., K]``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .errors import check, fail
from .format import BLOCK_SIDES, BlockSparseWeight


def _check_block(block, arg: str) -> None:
    """Both sides of ``block`` are ones the kernels have (``arg`` names it in the error)."""
    if not (block[0] in BLOCK_SIDES and block[1] in BLOCK_SIDES):
        fail(arg, f"blocks with sides in {BLOCK_SIDES}", f"blocks of {tuple(block)}")


def _check_meta(nnzb: int, block, n: int, k: int, device, **meta) -> None:
    """Metadata shapes fit ``nnzb`` blocks of ``block`` over ``[n, k]`` (no host sync)."""
    bn, bk = block
    R, C = -(-n // bn), -(-k // bk)
    lengths = {"row_ptr": R + 1, "col_ptr": C + 1, "row_order": R, "col_idx": nnzb, "block_row": nnzb,
               "row_idx": nnzb, "t_perm": nnzb}
    for name, t in meta.items():
        if not (t.dtype == torch.int32 and t.dim() == 1 and t.numel() == lengths[name] and t.device == device):
            fail(name, f"int32 [{lengths[name]}] on {device} (nnzb={nnzb}, blocks {block} over [{n}, {k}])",
                 f"{t.dtype} {tuple(t.shape)} on {t.device}")


def _check_host_meta(R: int, C: int, nnzb: int, **meta) -> None:
    """Index ranges and mutual consistency of CPU metadata, O(nnzb + R + C) (cheap on the host;
    on a GPU it would sync every call, so GPU calls skip it): pointers are the prefix sums of
    their index lists, permutations are permutations, the CSC view is the BSR's (as
    format.build_metadata)."""
    m = {k: t.long() for k, t in meta.items()}

    def head(t):  # for messages: formatted for bad input only
        return f"{t.tolist()[:8]}..."

    bounds = {"col_idx": C, "block_row": R, "row_idx": R, "t_perm": nnzb, "row_order": R}
    for name, t in m.items():
        if name in bounds and t.numel():
            lo, hi = int(t.min()), int(t.max())
            if not (lo >= 0 and hi < bounds[name]):
                fail(name, f"indices in [0, {bounds[name]})", f"range [{lo}, {hi}]")
    for name, n in (("t_perm", nnzb), ("row_order", R)):
        if name in m and not bool((torch.bincount(m[name], minlength=n) == 1).all()):
            fail(name, f"a permutation of range({n})", head(m[name]))
    for ptr, idx, n in (("row_ptr", "block_row", R), ("col_ptr", "col_idx", C)):
        if ptr in m:
            p = m[ptr]
            ok = int(p[0]) == 0 and int(p[-1]) == nnzb and bool((p[1:] >= p[:-1]).all())
            if ok and idx in m:
                ok = torch.equal(p[1:], torch.bincount(m[idx], minlength=n).cumsum(0))
            if not ok:
                fail(ptr, f"0, then running counts of {idx} up to nnzb={nnzb}", head(p))
    if "block_row" in m and "col_idx" in m:
        br, ci = m["block_row"], m["col_idx"]
        if not bool((br[1:] >= br[:-1]).all()):
            fail("block_row", "non-decreasing (BSR order)", head(br))
        if not bool(((ci[1:] > ci[:-1]) | (br[1:] != br[:-1])).all()):
            fail("col_idx", "strictly increasing within each block-row (sorted, no block twice)", head(ci))
    if {"t_perm", "row_idx", "block_row", "col_idx"} <= set(m):
        t = m["t_perm"]
        ok = torch.equal(m["row_idx"], m["block_row"][t]) and bool((m["col_idx"][t][1:] >= m["col_idx"][t][:-1]).all())
        check(ok, "t_perm, row_idx", "the CSC order of the blocks (format.build_metadata)", "another order")


def _check_forward(x, values, row_ptr, col_idx, block_row, col_ptr, row_idx, t_perm, row_order, out_features,
                   bias, activation):
    # every forward runs this: conditions first, messages only for bad input
    if x.dim() != 2:
        fail("x", "a 2-D tensor [M, K] (the wrapper flattens leading dims)", f"shape {tuple(x.shape)}")
    if x.layout != torch.strided:
        fail("x", "a dense (strided) tensor", x.layout)
    if not (values.dim() == 3 and values.dtype.is_floating_point):
        fail("values", "a float tensor [nnzb, BN, BK]", f"{values.dtype} {tuple(values.shape)}")
    if x.dtype != values.dtype:
        fail("x", f"dtype {values.dtype} (the weight's)", x.dtype)
    if x.device != values.device:
        fail("x", f"device {values.device} (the weight's)", x.device)
    if activation not in backends.ACTIVATIONS:
        fail("activation", f"one of {backends.ACTIVATIONS}", repr(activation))
    nnzb, bn, bk = values.shape
    _check_block((bn, bk), "values")
    R, C = row_ptr.numel() - 1, col_ptr.numel() - 1
    if not (R - 1) * bn < out_features <= R * bn:
        fail("out_features", f"in ({(R - 1) * bn}, {R * bn}] (R={R} block-rows)", out_features)
    if not (C - 1) * bk < x.shape[1] <= C * bk:
        fail("x", f"({(C - 1) * bk}, {C * bk}] columns (C={C} block-columns)", f"{x.shape[1]} columns")
    _check_meta(nnzb, (bn, bk), out_features, x.shape[1], x.device, row_ptr=row_ptr, col_idx=col_idx,
                block_row=block_row, col_ptr=col_ptr, row_idx=row_idx, t_perm=t_perm, row_order=row_order)
    if bias is not None:
        if bias.shape != (out_features,):
            fail("bias", f"shape ({out_features},)", f"shape {tuple(bias.shape)}")
        if not (bias.dtype == x.dtype and bias.device == x.device):
            fail("bias", f"{x.dtype} on {x.device}", f"{bias.dtype} on {bias.device}")


def _check_grad_input(dy, values, col_ptr, row_idx, t_perm, in_features):
    if dy.dim() != 2:
        fail("dy", "a 2-D tensor [M, N]", f"shape {tuple(dy.shape)}")
    if not (values.dim() == 3 and values.dtype.is_floating_point):
        fail("values", "a float tensor [nnzb, BN, BK]", f"{values.dtype} {tuple(values.shape)}")
    if not (dy.dtype == values.dtype and dy.device == values.device):
        fail("dy", f"{values.dtype} on {values.device}", f"{dy.dtype} on {dy.device}")
    if in_features <= 0:
        fail("in_features", "a positive int", in_features)
    nnzb, bn, bk = values.shape
    _check_block((bn, bk), "values")
    _check_meta(nnzb, (bn, bk), dy.shape[1], in_features, dy.device, col_ptr=col_ptr, row_idx=row_idx, t_perm=t_perm)


def _check_grad_weight(dy, x, block_row, col_idx, block_n, block_k):
    if not (dy.dim() == 2 and x.dim() == 2 and dy.shape[0] == x.shape[0]):
        fail("dy, x", "2-D [M, N] and [M, K] (same M)", f"shapes {tuple(dy.shape)}, {tuple(x.shape)}")
    if not dy.dtype.is_floating_point:
        fail("dy", "a floating dtype", dy.dtype)
    if not (x.dtype == dy.dtype and x.device == dy.device):
        fail("x", f"{dy.dtype} on {dy.device} (as dy)", f"{x.dtype} on {x.device}")
    _check_block((block_n, block_k), "block_n, block_k")
    _check_meta(col_idx.numel(), (block_n, block_k), dy.shape[1], x.shape[1], dy.device, block_row=block_row,
                col_idx=col_idx)


def _dense(*tensors):
    """Values and metadata as the kernels index them: contiguous (a no-op when they are)."""
    return tuple(t.contiguous() for t in tensors)


@torch.library.custom_op("sparsecore::bsr_linear", mutates_args=())
def _bsr_linear(x: Tensor, values: Tensor, row_ptr: Tensor, col_idx: Tensor, block_row: Tensor,
                col_ptr: Tensor, row_idx: Tensor, t_perm: Tensor, row_order: Tensor, out_features: int,
                bias: Optional[Tensor] = None, activation: str = "none", backend: str = "auto") -> Tensor:
    _check_forward(x, values, row_ptr, col_idx, block_row, col_ptr, row_idx, t_perm, row_order, out_features, bias,
                   activation)
    if x.is_cpu:
        _check_host_meta(row_ptr.numel() - 1, col_ptr.numel() - 1, values.shape[0], row_ptr=row_ptr,
                         col_idx=col_idx, block_row=block_row, col_ptr=col_ptr, row_idx=row_idx, t_perm=t_perm,
                         row_order=row_order)
    if x.shape[0] == 0:
        return x.new_zeros(0, out_features)
    mod = backends.resolve(backend, x, values)
    values, row_ptr, col_idx, block_row, row_order = _dense(values, row_ptr, col_idx, block_row, row_order)
    return mod.forward(x, values, row_ptr, col_idx, block_row, row_order, out_features, bias, activation).contiguous()


@_bsr_linear.register_fake
def _(x, values, row_ptr, col_idx, block_row, col_ptr, row_idx, t_perm, row_order, out_features,
      bias=None, activation="none", backend="auto"):
    _check_forward(x, values, row_ptr, col_idx, block_row, col_ptr, row_idx, t_perm, row_order, out_features, bias,
                   activation)
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("sparsecore::bsr_linear_grad_input", mutates_args=())
def _grad_input(dy: Tensor, values: Tensor, col_ptr: Tensor, row_idx: Tensor, t_perm: Tensor,
                in_features: int, backend: str = "auto") -> Tensor:
    _check_grad_input(dy, values, col_ptr, row_idx, t_perm, in_features)
    if dy.is_cpu:
        _check_host_meta(-(-dy.shape[1] // values.shape[1]), col_ptr.numel() - 1, values.shape[0], col_ptr=col_ptr,
                         row_idx=row_idx, t_perm=t_perm)
    if dy.shape[0] == 0:
        return dy.new_zeros(0, in_features)
    mod = backends.resolve(backend, dy, values)
    values, col_ptr, row_idx, t_perm = _dense(values, col_ptr, row_idx, t_perm)
    return mod.grad_input(dy.contiguous(), values, col_ptr, row_idx, t_perm, in_features).contiguous()


@_grad_input.register_fake
def _(dy, values, col_ptr, row_idx, t_perm, in_features, backend="auto"):
    _check_grad_input(dy, values, col_ptr, row_idx, t_perm, in_features)
    return dy.new_empty(dy.shape[0], in_features)


@torch.library.custom_op("sparsecore::bsr_linear_grad_weight", mutates_args=())
def _grad_weight(dy: Tensor, x: Tensor, block_row: Tensor, col_idx: Tensor, block_n: int, block_k: int,
                 backend: str = "auto") -> Tensor:
    _check_grad_weight(dy, x, block_row, col_idx, block_n, block_k)
    if dy.is_cpu:
        _check_host_meta(-(-dy.shape[1] // block_n), -(-x.shape[1] // block_k), col_idx.numel(),
                         block_row=block_row, col_idx=col_idx)
    if dy.shape[0] == 0:
        return dy.new_zeros(col_idx.numel(), block_n, block_k)
    mod = backends.resolve(backend, dy, dy.new_empty(0, block_n, block_k))
    block_row, col_idx = _dense(block_row, col_idx)
    return mod.grad_weight(dy.contiguous(), x.contiguous(), block_row, col_idx, (block_n, block_k)).contiguous()


@_grad_weight.register_fake
def _(dy, x, block_row, col_idx, block_n, block_k, backend="auto"):
    _check_grad_weight(dy, x, block_row, col_idx, block_n, block_k)
    return dy.new_empty(col_idx.shape[0], block_n, block_k)


def _activation_slope(z: Tensor, act: str) -> Tensor:
    """d act(z) / dz for gelu (erf form, as F.gelu) and silu."""
    if act == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    return 0.5 * (1 + torch.erf(z * 0.7071067811865476)) + z * torch.exp(-0.5 * z * z) * 0.3989422804014327


def _setup_context(ctx, inputs, output):
    x, values, row_ptr, col_idx, block_row, col_ptr, row_idx, t_perm, row_order, n, bias, act, backend = inputs
    ctx.save_for_backward(x, values, row_ptr, col_idx, block_row, col_ptr, row_idx, t_perm, row_order, bias,
                          output if act == "relu" else None)
    ctx.out_features, ctx.activation, ctx.backend = n, act, backend
    ctx.has_bias = bias is not None


def _backward(ctx, dy):
    x, values, row_ptr, col_idx, block_row, col_ptr, row_idx, t_perm, row_order, bias, out = ctx.saved_tensors
    act = ctx.activation
    if act == "relu":
        dy = dy * (out > 0)
    elif act in ("gelu", "silu"):  # recompute the pre-activation instead of storing it
        z = _bsr_linear(x, values, row_ptr, col_idx, block_row, col_ptr, row_idx, t_perm, row_order,
                        ctx.out_features, bias, "none", ctx.backend)
        cd = torch.float64 if dy.dtype == torch.float64 else torch.float32
        dy = (dy.to(cd) * _activation_slope(z.to(cd), act)).to(dy.dtype)
    dx = dvalues = dbias = None
    if ctx.needs_input_grad[0]:
        dx = _grad_input(dy, values, col_ptr, row_idx, t_perm, x.shape[1], ctx.backend)
    if ctx.needs_input_grad[1]:
        dvalues = _grad_weight(dy, x, block_row, col_idx, values.shape[1], values.shape[2], ctx.backend)
    if ctx.has_bias and ctx.needs_input_grad[10]:
        dbias = dy.sum(0)
    return dx, dvalues, None, None, None, None, None, None, None, None, dbias, None, None


_bsr_linear.register_autograd(_backward, setup_context=_setup_context)


def _vmap_rule(op, fold: bool):
    """torch.vmap: a batch of the first input alone (``x`` / ``dy``) is a taller matrix, so
    ``fold`` rules make one call over ``[B*M, D]``; anything else batched (per-sample weights,
    bias or metadata; both ``dy`` and ``x`` in grad_weight) runs once per sample."""
    def rule(info, in_dims, first, *rest):
        if fold and in_dims[0] is not None and all(d is None for d in in_dims[1:]):
            a = first.movedim(in_dims[0], 0)                                   # [B, M, D]
            return op(a.reshape(-1, a.shape[-1]), *rest).unflatten(0, a.shape[:2]), 0
        args = (first, *rest)
        return torch.stack([op(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))
                            for i in range(info.batch_size)]), 0
    return rule


_bsr_linear.register_vmap(_vmap_rule(_bsr_linear, fold=True))
_grad_input.register_vmap(_vmap_rule(_grad_input, fold=True))
_grad_weight.register_vmap(_vmap_rule(_grad_weight, fold=False))

# torch.autocast: the policy of F.linear (lower precision). Floating inputs on the autocast
# device, float64 excepted, go to the autocast dtype (differentiably: fp32 parameters get fp32
# gradients through the cast), then the op runs with autocast off, so a backend's own torch
# calls never see it. The grad ops too: CPU autograd runs backward() under the caller's autocast.
_AUTOCAST = torch.library.Library("sparsecore", "FRAGMENT")


def _autocast_kernel(op, device_type: str):
    def cast(a):
        eligible = isinstance(a, Tensor) and a.is_floating_point() and a.dtype != torch.float64
        return a.to(torch.get_autocast_dtype(device_type)) if eligible and a.device.type == device_type else a

    def kernel(*args, **kwargs):
        with torch.autocast(device_type, enabled=False):
            return op(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
    return kernel


for _op in (_bsr_linear, _grad_input, _grad_weight):
    for _device_type, _key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
        _AUTOCAST.impl(_op._name, _autocast_kernel(_op._opoverload, _device_type), _key)


def _check_no_func_autodiff():
    """The ops differentiate through torch.autograd (backward()), not torch.func's transforms:
    jvp / jacfwd would pass a zero tangent through them silently (grad / vjp / jacrev fail
    inside torch). vmap works."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None:
        return
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    autodiff = [i.key().name for i in retrieve_all_functorch_interpreters()
                if i.key() in (TransformType.Jvp, TransformType.Grad)]
    check(not autodiff, "x", "differentiation through torch.autograd (loss.backward(), torch.autograd.grad)",
          f"a call under torch.func's {autodiff[0] if autodiff else ''} transform (jvp, jacfwd, grad, vjp, jacrev)")


def bsr_linear_tensors(x: Tensor, values: Tensor, meta: dict, out_features: int, bias: Optional[Tensor] = None,
                       activation: str = "none", backend: str = "auto") -> Tensor:
    """``y [..., N] = act(x [..., K] @ W^T + bias)`` from raw tensors (``meta`` as in format)."""
    if not (isinstance(x, Tensor) and x.layout == torch.strided):
        fail("x", "a dense torch.Tensor", getattr(x, "layout", type(x).__name__))
    if x.dim() < 1:
        fail("x", "at least 1-D [..., K]", f"shape {tuple(x.shape)}")
    _check_no_func_autodiff()
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])  # 2-D: no reshape, no view (~4 us a call)
    y = torch.ops.sparsecore.bsr_linear.default(
        x2, values, meta["row_ptr"], meta["col_idx"], meta["block_row"], meta["col_ptr"], meta["row_idx"],
        meta["t_perm"], meta["row_order"], out_features, bias, activation, backend)
    if x2 is x:
        return y
    # not a view of y (as F.linear): FSDP2 warns that in-place ops on view outputs skip its hooks
    return torch.ops.aten._unsafe_view.default(y, (*x.shape[:-1], out_features))


def bsr_linear(x: Tensor, W: BlockSparseWeight, bias: Optional[Tensor] = None, backend: str = "auto",
               activation: str = "none") -> Tensor:
    """``y [..., N] = act(x [..., K] @ W^T + bias)`` with ``W`` a ``BlockSparseWeight [N, K]``.

    ``backend``: "auto" | "torch" | "triton" | "cuda" (see ``sparsecore.backends``).
    """
    check(isinstance(W, BlockSparseWeight), "W", "a sparsecore.BlockSparseWeight", type(W).__name__)
    check(bias is None or isinstance(bias, Tensor), "bias", "None or a torch.Tensor", type(bias).__name__)
    check(backend in backends.CHOICES, "backend", f"one of {backends.CHOICES}", repr(backend))
    check(activation in backends.ACTIVATIONS, "activation", f"one of {backends.ACTIVATIONS}", repr(activation))
    if not (isinstance(x, Tensor) and x.dim() >= 1 and x.shape[-1] == W.shape[1]):
        fail("x", f"a tensor [..., {W.shape[1]}] (in_features of W)",
             f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__)
    return bsr_linear_tensors(x, W.values, W.meta, W.shape[0], bias, activation, backend)
