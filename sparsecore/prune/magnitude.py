"""Block scores and top-k block selection: the core every pruner ends in.

A pruner turns an element importance ``[N, K]`` (|W|, |W|^2, Wanda's |W|*||x||, ...) into
one score per ``(BN, BK)`` block, then keeps the best blocks::

    keep = round(density * R * C) blocks overall      (balanced=False)
    keep = round(density * C) blocks in every row      (balanced=True: blocked-ELL)

``density = 1 - sparsity``; rounding is to the nearest integer (half to even, Python's
``round``), so the achieved sparsity is the requested one up to one block (one block per
row when balanced). Ties go to the lower block index.
"""
from __future__ import annotations

import torch

from ..errors import check
from ..format import BlockMask, _check_weight, grid_shape, normalize_block, pad_to_blocks

SCORES = ("l1", "l2")


def check_sparsity(sparsity) -> float:
    ok = isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) and 0.0 <= float(sparsity) <= 1.0
    check(ok, "sparsity", "a number in [0, 1]", repr(sparsity))
    return float(sparsity)


def score_dtype(t: torch.Tensor) -> torch.dtype:
    """Scores are float32, float64 for float64 weights (whose magnitudes float32 may not hold)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def magnitude(w: torch.Tensor, score: str = "l2") -> torch.Tensor:
    """Element importance ``|w|`` ("l1") or ``w^2`` ("l2"), in ``score_dtype(w)``."""
    w = w.detach().to(score_dtype(w))
    return w.abs() if score == "l1" else w * w


def block_scores(importance: torch.Tensor, block) -> torch.Tensor:
    """Sum an element importance ``[N, K]`` (>= 0) over blocks -> ``[R, C]`` (``score_dtype``)."""
    bn, bk = block
    R, C = grid_shape(importance.shape, block)
    imp = pad_to_blocks(importance.to(score_dtype(importance)), block)
    return imp.reshape(R, bn, C, bk).sum(dim=(1, 3))


def select_blocks(scores: torch.Tensor, sparsity: float, balanced: bool = False) -> torch.Tensor:
    """Bool ``[R, C]`` keeping the top-scoring blocks (see the module docstring)."""
    check(isinstance(balanced, bool), "balanced", "a bool", repr(balanced))
    R, C = scores.shape
    density = 1.0 - check_sparsity(sparsity)
    flat_order = lambda s: torch.sort(s, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros(R, C, dtype=torch.bool, device=scores.device)
    if balanced:
        keep = round(density * C)
        idx = flat_order(scores)[:, :keep]
        mask.scatter_(1, idx, True)
    else:
        keep = round(density * R * C)
        idx = flat_order(scores.reshape(-1))[:keep]
        mask.view(-1)[idx] = True
    return mask


def block_mask(w: torch.Tensor, block=(64, 64), sparsity: float = 0.5, score="l2",
               balanced: bool = False) -> BlockMask:
    """Magnitude block pruning of ``w [N, K]``.

    ``score``: "l2" (block Frobenius norm), "l1" (sum of |w|), or a tensor ``[N, K]`` of
    element importances (>= 0) summed per block — how activation-aware pruners plug in.
    """
    _check_weight(w)
    block = normalize_block(block)
    sparsity = check_sparsity(sparsity)
    check(bool(torch.isfinite(w).all()), "w", "finite values (no NaN/Inf)", "non-finite entries")
    if isinstance(score, torch.Tensor):
        check(score.shape == w.shape, "score", f"a tensor of shape {tuple(w.shape)} or one of {SCORES}",
              f"shape {tuple(score.shape)}")
        check(bool(torch.isfinite(score).all()) and bool((score >= 0).all()), "score",
              "finite non-negative importances", "negative or non-finite entries")
        imp = score
    else:
        check(score in SCORES, "score", f"one of {SCORES} or a tensor", repr(score))
        imp = magnitude(w, score)
    return BlockMask(select_blocks(block_scores(imp, block), sparsity, balanced), block, tuple(w.shape))


def nonzero_mask(w: torch.Tensor, block=(64, 64)) -> BlockMask:
    """The blocks of ``w [N, K]`` that hold any nonzero entry: the mask of a weight already
    pruned elsewhere (a dense tensor full of zeros), so converting it changes no value."""
    _check_weight(w)
    block = normalize_block(block)
    return BlockMask(block_scores(w != 0, block) > 0, block, tuple(w.shape))
