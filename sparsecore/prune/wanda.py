"""Activation-aware importance (Wanda-style): weights scaled by their input's norm.

For ``W [N, K]`` and calibration input norms ``||x_j||`` (``LayerStats.sq_norm = ||x_j||^2``)::

    "l1":  I_ij = |W_ij| * ||x_j||          block score = sum over the block of I_ij
    "l2":  I_ij = W_ij^2 * ||x_j||^2        block score = the block's share of ||X W^T||^2
                                             when input features are uncorrelated

The importance goes to ``block_mask(w, block, sparsity, score=I)``.
"""
from __future__ import annotations

import torch

from ..errors import check
from .magnitude import SCORES, score_dtype


def importance(w: torch.Tensor, sq_norm: torch.Tensor, score: str = "l2") -> torch.Tensor:
    """Element importance ``[N, K]`` (``score_dtype(w)``) from ``w [N, K]`` and ``sq_norm [K]``."""
    check(score in SCORES, "score", f"one of {SCORES}", repr(score))
    check(sq_norm.shape == (w.shape[1],), "sq_norm", f"shape ({w.shape[1]},) (in_features)", tuple(sq_norm.shape))
    sq = sq_norm.to(device=w.device, dtype=torch.float64).clamp_min(0)
    wd = w.detach().double()
    imp = wd.abs() * sq.sqrt() if score == "l1" else wd * wd * sq
    return imp.to(score_dtype(w))
