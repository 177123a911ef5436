"""Pruners: produce kernel-ready ``BlockMask``s.

``block_mask`` (magnitude) is the core; activation-aware pruners compute an element
importance and hand it to ``block_mask(score=...)``. ``plan`` decides the masks (and
refitted weights) for the layers that ``sparsecore.sparsify`` swaps.

    magnitude    block scores + exact top-k selection; nonzero_mask for weights pruned elsewhere
    wanda        activation-aware importance |W| * ||x||
    calibrate    forward hooks collecting input statistics (norms, Gram matrices)
    reconstruct  least-squares refit of the kept blocks
    oneshot      plan(): importance -> allocation -> selection -> refit, layer by layer
    gradual      cubic-schedule pruning during training (GradualPruner)
    report       predicted speedup per layer from a benchmark CSV; dense fallback
"""
from ..format import BlockMask, block_areas
from .magnitude import block_mask, block_scores, check_sparsity, nonzero_mask, select_blocks
from .oneshot import ALLOCATIONS, METHODS, global_allocation, plan, sensitivity_allocation
from .reconstruct import output_error, refit
from .wanda import importance as wanda_importance
from .gradual import GradualPruner, cubic_sparsity, replace_in_optimizer  # noqa: E402 (imports ..nn)
from .report import layer_report, predict_speedup, sparse_filter

__all__ = ["BlockMask", "block_mask", "nonzero_mask", "block_areas", "block_scores", "select_blocks", "check_sparsity", "plan", "METHODS",
           "ALLOCATIONS", "global_allocation", "sensitivity_allocation", "refit", "output_error", "wanda_importance", "GradualPruner",
           "cubic_sparsity", "replace_in_optimizer", "layer_report", "predict_speedup", "sparse_filter"]
