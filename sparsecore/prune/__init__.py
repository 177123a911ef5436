"""Pruners: produce kernel-ready ``BlockMask``s.

``block_mask`` (magnitude) is the core; activation-aware pruners compute an element
importance and hand it to ``block_mask(score=...)``. ``plan`` decides the masks (and
optionally refitted weights) for the layers that ``sparsecore.sparsify`` swaps.
"""
from ..format import BlockMask
from .magnitude import block_mask, block_scores, check_sparsity, select_blocks
from .oneshot import METHODS, plan

__all__ = ["BlockMask", "block_mask", "block_scores", "select_blocks", "check_sparsity", "plan", "METHODS"]
