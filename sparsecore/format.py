"""Block-sparse weight format: ``BlockMask`` and ``BlockSparseWeight``.

All format logic lives here; backends and kernels only read the tensors built below.

A weight ``W [N, K]`` (out_features x in_features, as ``nn.Linear``) is cut into blocks of
``(BN, BK)``. Shapes that do not divide are zero-padded to ``[Np, Kp] = [R*BN, C*BK]``
(R block-rows, C block-columns)::

            k ->  c=0    c=1    c=2         mask [R, C]      BSR (forward)
          +------+------+------+            1 0 1            row_ptr   = [0, 2, 3]
    r=0   |  V0  |      |  V1  |            0 1 0            col_idx   = [0, 2, 1]
          +------+------+------+                             block_row = [0, 0, 1]
    r=1   |      |  V2  |      |                             values    = [V0, V1, V2]
          +------+------+------+                                          [nnzb, BN, BK]
                                             CSC (dX = dY @ W), same values, no copy:
                                             col_ptr = [0, 1, 2, 3]
                                             row_idx = [0, 1, 0]
                                             t_perm  = [0, 2, 1]  (values[t_perm[j]])

``row_order`` lists block-rows heaviest first (launch order for load balance);
``balanced`` is True when every block-row keeps the same number of blocks (blocked-ELL).
Metadata is int32 and built once, at construction.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .errors import SparseCoreError, check, fail

BLOCK_SIDES = (16, 32, 64, 128)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
META_FIELDS = ("row_ptr", "col_idx", "block_row", "col_ptr", "row_idx", "t_perm", "row_order")


def normalize_block(block) -> tuple[int, int]:
    """``64`` or ``(64, 32)`` -> ``(BN, BK)``; each side one of 16, 32, 64, 128."""
    if isinstance(block, int) and not isinstance(block, bool):
        block = (block, block)
    ok = (isinstance(block, (tuple, list)) and len(block) == 2
          and all(isinstance(b, int) and not isinstance(b, bool) and b in BLOCK_SIDES for b in block))
    check(ok, "block", f"an int or a pair (BN, BK) with sides in {BLOCK_SIDES}", repr(block))
    return int(block[0]), int(block[1])


def normalize_shape(shape, name="shape") -> tuple[int, int]:
    """``(N, K)``: two positive ints (a tuple, list or torch.Size)."""
    ok = (isinstance(shape, (tuple, list, torch.Size)) and len(shape) == 2
          and all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in shape))
    check(ok, name, "(out_features, in_features): two positive ints", repr(shape))
    return int(shape[0]), int(shape[1])


def grid_shape(shape, block) -> tuple[int, int]:
    """Number of (block-rows, block-columns) covering ``shape`` (padding included)."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def _check_weight(w, name="w"):
    check(isinstance(w, torch.Tensor), name, "a torch.Tensor", type(w).__name__)
    check(w.dim() == 2, name, "a 2-D weight [out_features, in_features]", f"shape {tuple(w.shape)}")
    check(w.dtype in FLOAT_DTYPES, name, f"a floating dtype {FLOAT_DTYPES}", w.dtype)
    check(w.shape[0] > 0 and w.shape[1] > 0, name, "non-empty dimensions", f"shape {tuple(w.shape)}")
    check(not w.is_meta, name, "a tensor with data (its values choose and fill the blocks)", "a meta tensor")


def block_areas(shape, block) -> torch.Tensor:
    """Weights each block holds, ``[R, C]`` int64: ``BN*BK``, less in the last block-row and
    block-column when ``block`` does not divide ``shape``."""
    (N, K), (bn, bk) = shape, block
    R, C = grid_shape(shape, block)
    rows = (N - bn * torch.arange(R)).clamp(max=bn)
    cols = (K - bk * torch.arange(C)).clamp(max=bk)
    return rows[:, None] * cols[None, :]


def pad_to_blocks(w: torch.Tensor, block) -> torch.Tensor:
    """Zero-pad ``w [N, K]`` to ``[R*BN, C*BK]`` (a view-free copy only when needed)."""
    R, C = grid_shape(w.shape, block)
    pn, pk = R * block[0] - w.shape[0], C * block[1] - w.shape[1]
    return torch.nn.functional.pad(w, (0, pk, 0, pn)) if (pn or pk) else w


def inside(shape, block, block_row: torch.Tensor, col_idx: torch.Tensor) -> torch.Tensor:
    """bool ``[nnzb, BN, BK]``: the entries of the kept blocks that lie inside ``shape`` (the
    rest is padding, kept at zero)."""
    (bn, bk), dev = block, block_row.device
    rows = block_row.long()[:, None] * bn + torch.arange(bn, device=dev)  # [nnzb, BN]
    cols = col_idx.long()[:, None] * bk + torch.arange(bk, device=dev)    # [nnzb, BK]
    return (rows < shape[0])[:, :, None] & (cols < shape[1])[:, None, :]


def blocks_to_dense(values: torch.Tensor, block_row: torch.Tensor, col_idx: torch.Tensor, shape) -> torch.Tensor:
    """Scatter kept blocks ``values [nnzb, BN, BK]`` into a dense ``[N, K]`` (zeros elsewhere).

    Written in place through a blocked view of the padded result (one pass, differentiable).
    """
    _, bn, bk = values.shape
    R, C = grid_shape(shape, (bn, bk))
    dense = values.new_zeros(R * bn, C * bk)
    dense.view(R, bn, C, bk).permute(0, 2, 1, 3)[block_row.long(), col_idx.long()] = values
    return dense[: shape[0], : shape[1]]


@dataclass(frozen=True)
class BlockMask:
    """Which blocks of a ``[N, K]`` weight are kept.

    ``mask`` is bool ``[R, C]`` (one entry per ``(BN, BK)`` block, padding included);
    ``shape`` is the unpadded ``(N, K)``; ``block`` is ``(BN, BK)``.
    """

    mask: torch.Tensor
    block: tuple
    shape: tuple

    def __post_init__(self):
        block = normalize_block(self.block)
        object.__setattr__(self, "block", block)
        check(isinstance(self.mask, torch.Tensor) and self.mask.dtype == torch.bool, "mask", "a bool torch.Tensor",
              self.mask.dtype if isinstance(self.mask, torch.Tensor) else type(self.mask).__name__)
        shape = normalize_shape(self.shape)
        object.__setattr__(self, "shape", shape)
        grid = grid_shape(shape, block)
        check(tuple(self.mask.shape) == grid, "mask",
              f"shape {grid} (blocks of {block} over a weight of {shape})", f"shape {tuple(self.mask.shape)}")

    @property
    def nnzb(self) -> int:
        return int(self.mask.sum())

    @property
    def density(self) -> float:
        """Fraction of blocks kept (of the padded grid)."""
        return self.nnzb / max(1, self.mask.numel())

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def balanced(self) -> bool:
        per_row = self.mask.sum(1)
        return bool((per_row == per_row[0]).all())

    def to_dense(self) -> torch.Tensor:
        """Element mask, bool ``[N, K]``."""
        bn, bk = self.block
        full = self.mask.repeat_interleave(bn, 0).repeat_interleave(bk, 1)
        return full[: self.shape[0], : self.shape[1]]

    def to(self, device) -> "BlockMask":
        return BlockMask(self.mask.to(device), self.block, self.shape)


def build_metadata(mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """BSR + CSC + launch-order metadata (int32, on ``mask.device``) from a bool ``[R, C]``."""
    R, C = mask.shape
    dev = mask.device
    rows, cols = mask.nonzero(as_tuple=True)  # row-major: BSR order, cols sorted within rows
    per_row = mask.sum(1)
    per_col = mask.sum(0)
    zero = torch.zeros(1, dtype=torch.long, device=dev)
    row_ptr = torch.cat([zero, per_row.cumsum(0)])
    col_ptr = torch.cat([zero, per_col.cumsum(0)])
    # CSC order: stable sort by column keeps rows ascending inside each column.
    t_perm = torch.sort(cols, stable=True).indices
    row_order = torch.sort(per_row, descending=True, stable=True).indices
    i32 = lambda t: t.to(torch.int32).contiguous()
    return {"row_ptr": i32(row_ptr), "col_idx": i32(cols), "block_row": i32(rows),
            "col_ptr": i32(col_ptr), "row_idx": i32(rows[t_perm]), "t_perm": i32(t_perm),
            "row_order": i32(row_order)}


def check_metadata(values: torch.Tensor, meta: dict, grid: tuple) -> None:
    """Validate tensors that claim to be a BSR of ``grid`` blocks (cheap, host-side)."""
    R, C = grid
    check(values.dim() == 3, "values", "[nnzb, BN, BK]", f"shape {tuple(values.shape)}")
    nnzb = values.shape[0]
    for name, length in (("row_ptr", R + 1), ("col_ptr", C + 1), ("col_idx", nnzb), ("block_row", nnzb),
                         ("row_idx", nnzb), ("t_perm", nnzb), ("row_order", R)):
        t = meta[name]
        check(t.dtype == torch.int32 and t.dim() == 1 and t.numel() == length, name,
              f"int32 [{length}]", f"{t.dtype} {tuple(t.shape)}")
        check(t.device == values.device, name, f"device {values.device} (as values)", t.device)
    br, ci = meta["block_row"].long().cpu(), meta["col_idx"].long().cpu()
    for name, t, hi in (("block_row", br, R), ("col_idx", ci, C)):
        check(nnzb == 0 or (int(t.min()) >= 0 and int(t.max()) < hi), name, f"values in [0, {hi})",
              f"range [{int(t.min())}, {int(t.max())}]" if nnzb else "empty")
    mask = torch.zeros(R, C, dtype=torch.bool)
    mask[br, ci] = True
    check(int(mask.sum()) == nnzb, "block_row/col_idx", f"{nnzb} distinct blocks", int(mask.sum()))
    # everything else is a function of the kept set: it must equal what build_metadata gives
    for name, ref in build_metadata(mask).items():
        check(torch.equal(meta[name].cpu(), ref), name, "the BSR/CSC metadata of the kept blocks (build_metadata)",
              f"{meta[name].tolist()[:8]}... vs {ref.tolist()[:8]}...")


class BlockSparseWeight:
    """A ``[N, K]`` weight stored as its kept ``(BN, BK)`` blocks (see the module docstring).

    Build with ``from_dense(w, mask)``. Tensors: ``values [nnzb, BN, BK]`` (weight dtype),
    int32 metadata ``row_ptr, col_idx, block_row, col_ptr, row_idx, t_perm, row_order``.
    """

    def __init__(self, values: torch.Tensor, shape, block, meta: dict, validate: bool = True):
        self.values = values
        self.shape = normalize_shape(shape)
        self.block = normalize_block(block)
        check(isinstance(meta, dict) and all(name in meta for name in META_FIELDS), "meta",
              f"a dict with {META_FIELDS}", sorted(meta) if isinstance(meta, dict) else type(meta).__name__)
        for name in META_FIELDS:
            setattr(self, name, meta[name])
        if validate:
            check(values.dtype in FLOAT_DTYPES, "values", f"a floating dtype {FLOAT_DTYPES}", values.dtype)
            check(tuple(values.shape[1:]) == self.block, "values", f"blocks of {self.block}",
                  f"shape {tuple(values.shape)}")
            check_metadata(values, self.meta, self.grid)

    @classmethod
    def from_dense(cls, w: torch.Tensor, mask, block=None) -> "BlockSparseWeight":
        """Keep the blocks of ``w [N, K]`` where ``mask`` is True.

        ``mask``: a ``BlockMask``, or a bool ``[R, C]`` tensor with ``block=(BN, BK)``.
        """
        _check_weight(w)
        if isinstance(mask, BlockMask):
            check(block is None or normalize_block(block) == mask.block, "block",
                  f"None or the mask's block {mask.block}", block)
            check(mask.shape == tuple(w.shape), "mask", f"a BlockMask for shape {tuple(w.shape)}",
                  f"one for shape {mask.shape}")
            bm = mask
        else:
            check(block is not None, "block", "(BN, BK) when mask is a plain tensor", None)
            bm = BlockMask(mask, block, tuple(w.shape))
        check(not bm.mask.is_meta, "mask", "a tensor with data", "a meta tensor")
        check(bool(torch.isfinite(w).all()), "w", "finite values (no NaN/Inf)", "non-finite entries")
        m = bm.mask.to(w.device)
        meta = build_metadata(m)
        bn, bk = bm.block
        R, C = m.shape
        blocks = pad_to_blocks(w, bm.block).reshape(R, bn, C, bk).permute(0, 2, 1, 3)
        values = blocks[m].contiguous()  # [nnzb, BN, BK] in row-major (BSR) order
        return cls(values, w.shape, bm.block, meta, validate=False)

    @classmethod
    def from_sparse_bsr(cls, t: torch.Tensor, shape=None) -> "BlockSparseWeight":
        """From PyTorch's own BSR tensor (``w.to_sparse_bsr((BN, BK))``), with no dense copy.

        ``t``: 2-D, ``layout=torch.sparse_bsr``, size ``[R*BN, C*BK]``, blocks in any order
        within a row (no duplicates). ``shape``: the logical ``[N, K]`` when ``t`` is its
        zero-padded form (entries beyond it are dropped); default ``t.shape``.
        """
        check(isinstance(t, torch.Tensor) and t.layout == torch.sparse_bsr, "t",
              "a torch.sparse_bsr tensor (Tensor.to_sparse_bsr)", getattr(t, "layout", type(t).__name__))
        check(t.dim() == 2 and t.values().dim() == 3, "t", "a 2-D BSR tensor (no batch or dense dimensions)",
              f"shape {tuple(t.shape)} with values {tuple(t.values().shape)}")
        block = normalize_block(tuple(t.values().shape[1:]))
        R, C = t.shape[0] // block[0], t.shape[1] // block[1]
        shape = normalize_shape(tuple(t.shape) if shape is None else shape)
        check(grid_shape(shape, block) == (R, C), "shape", f"a shape that {(R, C)} blocks of {block} pad",
              repr(shape))
        check(t.dtype in FLOAT_DTYPES, "t", f"a floating dtype {FLOAT_DTYPES}", t.dtype)
        check(not t.is_meta, "t", "a tensor with data (its indices define the blocks)", "a meta tensor")
        check(bool(torch.isfinite(t.values()).all()), "t", "finite values (no NaN/Inf)", "non-finite entries")
        crow, col = t.crow_indices().long(), t.col_indices().long()
        # a tensor built with check_invariants=False may hold anything: check what we index with
        nnz = t.values().shape[0]
        if not (crow.numel() == R + 1 and int(crow[0]) == 0 and int(crow[-1]) == nnz == col.numel()
                and bool((crow.diff() >= 0).all())):
            fail("t.crow_indices()", f"{R + 1} non-decreasing offsets from 0 to nnz={nnz} (one per block-row)",
                 f"{crow.tolist()[:8]}... with {col.numel()} column indices")
        if nnz and not (int(col.min()) >= 0 and int(col.max()) < C):
            fail("t.col_indices()", f"block columns in [0, {C})", f"range [{int(col.min())}, {int(col.max())}]")
        rows = torch.repeat_interleave(torch.arange(R, device=crow.device), crow.diff())
        mask = torch.zeros(R, C, dtype=torch.bool, device=crow.device)
        mask[rows, col] = True
        check(int(mask.sum()) == col.numel(), "t", "no duplicate blocks (coalesced)",
              f"{col.numel()} blocks at {int(mask.sum())} positions")
        values = t.values()[torch.argsort(rows * C + col)]  # -> row-major (BSR) order, cols sorted
        meta = build_metadata(mask.to(values.device))
        values = values * inside(shape, block, meta["block_row"], meta["col_idx"])  # padding -> 0
        return cls(values, shape, block, meta, validate=False)

    def to_sparse_bsr(self) -> torch.Tensor:
        """PyTorch's BSR tensor of the zero-padded weight, size ``[R*BN, C*BK]`` (int32 indices)."""
        (R, C), (bn, bk) = self.grid, self.block
        return torch.sparse_bsr_tensor(self.row_ptr, self.col_idx, self.values, size=(R * bn, C * bk),
                                       check_invariants=False)  # valid by construction

    # -- views -----------------------------------------------------------------------
    @property
    def meta(self) -> dict:
        return {name: getattr(self, name) for name in META_FIELDS}

    @property
    def grid(self) -> tuple[int, int]:
        return grid_shape(self.shape, self.block)

    @property
    def nnzb(self) -> int:
        return self.values.shape[0]

    @property
    def density(self) -> float:
        R, C = self.grid
        return self.nnzb / (R * C)

    @property
    def balanced(self) -> bool:
        per_row = self.row_ptr[1:] - self.row_ptr[:-1]
        return bool((per_row == per_row[0]).all())

    @property
    def dtype(self):
        return self.values.dtype

    @property
    def device(self):
        return self.values.device

    def block_mask(self) -> BlockMask:
        R, C = self.grid
        m = torch.zeros(R, C, dtype=torch.bool, device=self.device)
        m[self.block_row.long(), self.col_idx.long()] = True
        return BlockMask(m, self.block, self.shape)

    def to_dense(self) -> torch.Tensor:
        """Dense ``[N, K]`` with zeros where pruned."""
        return blocks_to_dense(self.values, self.block_row, self.col_idx, self.shape)

    def to(self, *args, **kwargs) -> "BlockSparseWeight":
        """Like ``Tensor.to``: dtype applies to ``values`` only; device to everything."""
        values = self.values.to(*args, **kwargs)
        check(values.dtype in FLOAT_DTYPES, "dtype", f"a floating dtype {FLOAT_DTYPES}", values.dtype)
        meta = {k: v.to(values.device) for k, v in self.meta.items()}
        return BlockSparseWeight(values, self.shape, self.block, meta, validate=False)

    def __repr__(self):
        return (f"BlockSparseWeight(shape={self.shape}, block={self.block}, nnzb={self.nnzb}, "
                f"density={self.density:.3f}, dtype={self.dtype}, device={self.device})")
