"""``SparseLinear``: a drop-in ``nn.Linear`` whose weight is block-sparse.

State (all plain tensors, so ``state_dict`` survives ``torch.save`` and safetensors)::

    values  Parameter [nnzb, BN, BK]   kept blocks, BSR order (layer dtype)
    bias    Parameter [out_features]   or None
    mask    buffer bool [R, C]         which blocks are kept (defines all metadata)
    row_ptr, col_idx, block_row, col_ptr, row_idx, t_perm, row_order
            non-persistent int32 buffers, rebuilt from ``mask`` (format.build_metadata)

On the meta device (``device="meta"`` or ``with torch.device("meta")``) the layer has its
shapes but no data: ``load_state_dict(sd, assign=True)``, or ``to_empty(device=...)`` then
``load_state_dict(sd)``, gives it the checkpoint's mask and rebuilds the metadata from it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import backends, ops
from .errors import check, fail
from .format import META_FIELDS, BlockMask, BlockSparseWeight, build_metadata, grid_shape, inside, normalize_block
from .prune.magnitude import block_mask


class SparseLinear(nn.Module):
    """``y = x @ W^T + b`` with ``W [out_features, in_features]`` kept only on a block mask.

    Same constructor, attributes and forward as ``nn.Linear``, plus ``block`` and ``mask``
    (a ``BlockMask`` or bool ``[R, C]``; default: every block kept). ``backend`` is passed to
    ``torch.ops.sparsecore.bsr_linear`` ("auto" picks cuda ▸ triton ▸ torch).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 block=(64, 64), mask=None, backend: str = "auto"):
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            check(isinstance(v, int) and not isinstance(v, bool) and v > 0, name, "a positive int", repr(v))
        check(backend in backends.CHOICES, "backend", f"one of {backends.CHOICES}", repr(backend))
        self.in_features, self.out_features = in_features, out_features
        self.block = normalize_block(block)
        self.backend = backend
        grid = grid_shape((out_features, in_features), self.block)
        if mask is None:  # on the CPU even under `with torch.device("meta")`: the structure needs data
            mask = torch.ones(grid, dtype=torch.bool, device="cpu")
        bm = mask if isinstance(mask, BlockMask) else BlockMask(mask, self.block, (out_features, in_features))
        check(bm.block == self.block and bm.shape == (out_features, in_features), "mask",
              f"a mask of block {self.block} for shape {(out_features, in_features)}",
              f"block {bm.block}, shape {bm.shape}")
        check(not bm.mask.is_meta, "mask", "a tensor with data (it defines the layer's shapes)", "a meta tensor")
        factory = {"device": device, "dtype": dtype}
        self.values = nn.Parameter(torch.empty(bm.nnzb, *self.block, **factory))
        # registered when None too, as nn.Linear does
        self.register_parameter("bias", nn.Parameter(torch.empty(out_features, **factory)) if bias else None)
        self._set_structure(bm.mask, self.values.device)
        self.reset_parameters()

    def reset_parameters(self):
        """``nn.Linear``'s init (kaiming-uniform, a=sqrt(5)) on the kept entries."""
        if self.values.is_meta:  # no data to initialize
            return
        self._check_structure()
        bound = 1 / math.sqrt(self.in_features)
        with torch.no_grad():  # the kept entries only: no dense weight is made
            self.values.uniform_(-bound, bound).mul_(
                inside((self.out_features, self.in_features), self.block, self.block_row, self.col_idx))
            if self.bias is not None:
                self.bias.uniform_(-bound, bound)

    # -- construction from dense -----------------------------------------------------------
    @classmethod
    def from_dense(cls, linear: nn.Linear, block=None, sparsity=None, mask=None, *, weight=None,
                   score="l2", balanced: bool = False, backend: str = "auto") -> "SparseLinear":
        """Prune ``linear`` to a block mask (given, or magnitude at ``sparsity``), on its device
        and dtype, in its training mode and ``requires_grad``.

        ``block``: default ``(64, 64)``, or a ``BlockMask`` mask's own. ``weight``: optional
        replacement dense weight of ``linear.weight``'s shape (e.g. refitted by a pruner), cast
        to the layer's dtype.
        """
        check(isinstance(linear, nn.Linear), "linear", "an nn.Linear", type(linear).__name__)
        check(not linear.weight.is_meta, "linear", "an nn.Linear with data (its weight fills the blocks)",
              "one on the meta device")
        check((sparsity is None) != (mask is None), "sparsity/mask", "exactly one of them",
              f"sparsity={sparsity!r}, mask={'set' if mask is not None else None}")
        lw = linear.weight
        if weight is not None:
            check(isinstance(weight, torch.Tensor) and weight.shape == lw.shape and weight.is_floating_point(),
                  "weight", f"None or a floating tensor of linear.weight's shape {tuple(lw.shape)}",
                  f"{weight.dtype} of shape {tuple(weight.shape)}" if isinstance(weight, torch.Tensor)
                  else type(weight).__name__)
        w = (lw if weight is None else weight.to(lw.device, lw.dtype)).detach()
        if block is None and not isinstance(mask, BlockMask):
            block = (64, 64)
        if mask is None:
            mask = block_mask(w, block, sparsity, score=score, balanced=balanced)
        W = BlockSparseWeight.from_dense(w, mask, block)  # checks a given block against a BlockMask's
        lin = cls.from_sparse(W, linear.bias, backend=backend).train(linear.training)
        lin.values.requires_grad_(lw.requires_grad)
        if linear.bias is not None:
            lin.bias.requires_grad_(linear.bias.requires_grad)
        return lin

    @classmethod
    def from_sparse(cls, weight, bias=None, *, backend: str = "auto") -> "SparseLinear":
        """A layer holding ``weight`` (a ``BlockSparseWeight``, or PyTorch's ``sparse_bsr``
        tensor ``[out, in]``) and ``bias [out]``, copied, on their device and dtype; no dense
        weight is made."""
        if isinstance(weight, torch.Tensor) and weight.layout == torch.sparse_bsr:
            weight = BlockSparseWeight.from_sparse_bsr(weight)
        check(isinstance(weight, BlockSparseWeight), "weight", "a BlockSparseWeight or a sparse_bsr tensor",
              type(weight).__name__)
        check(not weight.values.is_meta, "weight", "one with data (its blocks define the layer)", "a meta tensor")
        out_features, in_features = weight.shape
        check(bias is None or isinstance(bias, torch.Tensor) and tuple(bias.shape) == (out_features,)
              and not bias.is_meta, "bias", f"None or a tensor of shape ({out_features},) with data",
              type(bias).__name__ if not isinstance(bias, torch.Tensor)
              else f"shape {tuple(bias.shape)} on {bias.device}")
        mask = weight.block_mask()
        # shapes on the meta device (no random init to overwrite, no draw from the global RNG), then the data
        lin = cls(in_features, out_features, bias is not None, block=weight.block, mask=mask, backend=backend,
                  device="meta", dtype=weight.dtype)
        lin._set_structure(mask.mask, weight.device)
        lin.values = nn.Parameter(weight.values.detach().clone(memory_format=torch.contiguous_format))
        if bias is not None:
            lin.bias = nn.Parameter(bias.detach().to(weight.values).clone(memory_format=torch.contiguous_format))
        return lin

    # -- mask and metadata -----------------------------------------------------------------
    _structure_ready = True  # False after to_empty() from meta until a mask is loaded or set

    def _set_structure(self, mask: torch.Tensor, device):
        """A copy of ``mask`` and the metadata built from it (where it has data), on ``device``."""
        self.register_buffer("mask", mask.to(device, copy=True), persistent=True)
        for name, t in build_metadata(mask).items():
            self.register_buffer(name, t.to(device), persistent=False)
        self._structure_ready = True

    def _apply(self, fn, recurse=True):
        before = {name: self._buffers[name] for name in ("mask", *META_FIELDS)}
        out = super()._apply(fn, recurse)
        if before["mask"].is_meta:
            if not self.mask.is_meta:  # to_empty() from meta: mask and metadata are uninitialized memory
                self._structure_ready = False
        else:  # the structure survives every move, to_empty() too (it would leave garbage indices)
            for name, old in before.items():
                new = self._buffers[name]
                if new is not old and not new.is_meta:
                    new.copy_(old)
        return out

    def _check_structure(self):
        if not self._structure_ready:  # indexing with that garbage reads out of bounds on the GPU
            fail("mask", "a block mask loaded after to_empty() from the meta device (load_state_dict(a checkpoint "
                 "with the mask) or set_mask(mask, weight))", "uninitialized memory")

    def block_mask(self) -> BlockMask:
        return BlockMask(self.mask, self.block, (self.out_features, self.in_features))

    def set_mask(self, mask, weight=None, optimizer=None):
        """Change the kept blocks; metadata is rebuilt once here (not per step).

        Values of blocks kept before are kept; newly kept blocks come from ``weight``
        ``[out, in]`` if given, else start at zero. ``values`` becomes a new Parameter: pass
        the ``optimizer`` that holds the old one to swap it there, with the per-block state
        (e.g. Adam's moments) of the blocks that stay (``sc.prune.replace_in_optimizer``).
        """
        bm = mask if isinstance(mask, BlockMask) else BlockMask(mask, self.block, (self.out_features, self.in_features))
        check(bm.block == self.block and bm.shape == (self.out_features, self.in_features), "mask",
              f"block {self.block}, shape {(self.out_features, self.in_features)}", f"block {bm.block}, shape {bm.shape}")
        check(weight is None or isinstance(weight, torch.Tensor) and tuple(weight.shape) == bm.shape, "weight",
              f"None or a tensor of shape {bm.shape}", type(weight).__name__ if not isinstance(weight, torch.Tensor)
              else f"shape {tuple(weight.shape)}")
        with torch.no_grad():
            src = self.dense_weight() if weight is None else weight.to(self.values)
            new = BlockSparseWeight.from_dense(src, bm.to(self.values.device)).values
        old_values, old_mask = self.values, self.mask
        self._set_structure(bm.mask, self.mask.device)
        self.values = nn.Parameter(new, requires_grad=self.values.requires_grad)
        if optimizer is not None:
            from .prune.gradual import replace_in_optimizer  # prune.gradual imports this module

            replace_in_optimizer(optimizer, old_values, self.values, old_mask, self.mask)

    @property
    def sparse_weight(self) -> BlockSparseWeight:
        """The weight as a ``BlockSparseWeight`` sharing this module's tensors."""
        self._check_structure()
        meta = {name: getattr(self, name) for name in META_FIELDS}
        return BlockSparseWeight(self.values, (self.out_features, self.in_features), self.block, meta, validate=False)

    def dense_weight(self) -> torch.Tensor:
        """``[out_features, in_features]`` with zeros where pruned (differentiable)."""
        return self.sparse_weight.to_dense()

    @property
    def weight(self) -> torch.Tensor:
        """Dense view for code that reads ``linear.weight`` (materializes; prefer ``values``)."""
        return self.dense_weight()

    def to_linear(self) -> nn.Linear:
        """An ``nn.Linear`` with the dense weight (zeros where pruned) and bias, copied, on this
        layer's device and dtype, in its training mode and ``requires_grad``."""
        # skip_init: no random init of a weight overwritten below (nor a draw from the global RNG)
        lin = nn.utils.skip_init(nn.Linear, self.in_features, self.out_features, self.bias is not None,
                                 device=self.values.device, dtype=self.values.dtype)
        with torch.no_grad():
            lin.weight.copy_(self.dense_weight())
            if self.bias is not None:
                lin.bias.copy_(self.bias)
                lin.bias.requires_grad_(self.bias.requires_grad)
        lin.weight.requires_grad_(self.values.requires_grad)
        return lin.train(self.training)

    @property
    def density(self) -> float:
        return self.values.shape[0] / max(1, self.mask.numel())

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] == self.in_features):
            fail("input", f"last dim {self.in_features} (in_features)",
                 f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__)
        self._check_structure()
        # the metadata straight from the buffer dict: nn.Module.__getattr__ costs ~0.4 us a name, and
        # every eager call pays it (values / bias by attribute: torch.nn.utils.parametrize may own them)
        return ops.bsr_linear_tensors(x, self.values, self._buffers, self.out_features, self.bias, "none",
                                      self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block={self.block}, density={self.density:.3f}")

    # -- state dict: a checkpoint with another mask resizes ``values`` -----------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mask = state_dict.get(prefix + "mask")
        if isinstance(mask, torch.Tensor):
            grid = tuple(self.mask.shape)
            if mask.dtype != torch.bool or tuple(mask.shape) != grid or mask.is_meta:
                error_msgs.append(f"{prefix}mask: expected bool {grid} with data, got {mask.dtype} "
                                  f"{tuple(mask.shape)} on {mask.device}")
                return
            vals = state_dict.get(prefix + "values")
            nnzb = int(mask.sum())
            if isinstance(vals, torch.Tensor) and tuple(vals.shape) != (nnzb, *self.block):
                error_msgs.append(f"{prefix}values: expected shape {(nnzb, *self.block)} for the checkpoint's mask, "
                                  f"got {tuple(vals.shape)}")
                return
            # the checkpoint's mask defines the structure: metadata rebuilt where the mask ends up;
            # ``values`` stays the same Parameter (an optimizer holds it), resized when nnzb changes;
            # without values in the checkpoint (strict=False) blocks kept before keep theirs
            assign = local_metadata.get("assign_to_params_buffers", False)
            new = None
            if vals is None and not self.values.is_meta:
                bm = BlockMask(mask.to(self.values.device), self.block, (self.out_features, self.in_features))
                new = BlockSparseWeight.from_dense(self.dense_weight().detach(), bm).values
            elif self.values.shape[0] != nnzb:
                new = self.values.new_empty(nnzb, *self.block)
            self._set_structure(mask, mask.device if assign else self.mask.device)
            if new is not None:
                self.values.data, self.values.grad = new, None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
