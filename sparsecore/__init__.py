"""sparsecore: block-sparse weights that run faster.

    import sparsecore as sc
    mask = sc.prune.block_mask(w, block=(64, 64), sparsity=0.9)
    W    = sc.BlockSparseWeight.from_dense(w, mask)
    y    = sc.ops.bsr_linear(x, W, bias=None, backend="auto")
    lin  = sc.SparseLinear.from_dense(nn_linear, block=(64, 64), sparsity=0.9)
    model = sc.sparsify(model, block=(64, 64), sparsity=0.9)
"""
from . import ops, prune  # prune before io/hf: prune.gradual and nn import each other's modules
from . import hf, io
from .errors import SparseCoreError
from .format import BlockMask, BlockSparseWeight
from .io import load, save
from .nn import SparseLinear
from .sparsify import densify, sparsify

__version__ = "0.1.0"
__all__ = ["BlockMask", "BlockSparseWeight", "SparseLinear", "SparseCoreError", "hf", "io", "load", "ops", "prune",
           "save", "sparsify", "densify"]
