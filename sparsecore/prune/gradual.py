"""Gradual block pruning during training (Zhu & Gupta's cubic schedule) for ``SparseLinear`` layers.

Sparsity at training step ``t`` (held at ``s0`` before ``start`` and at ``s1`` after ``end``)::

    s(t) = s1 + (s0 - s1) * (1 - (t - start) / (end - start))^3

Every ``update_every`` steps from ``start`` (and at ``end``) each layer is re-pruned by block
magnitude to ``s(t)`` (``SparseLinear.set_mask``: metadata rebuilt once per update, not per step). Pruned blocks
are zero, so they score lowest and never come back: masks only shrink.

``set_mask`` replaces the layer's ``values`` Parameter (its shape is ``[nnzb, BN, BK]``), so
an optimizer holding the old one must be told: pass it to ``GradualPruner`` or ``set_mask``,
which call ``replace_in_optimizer``: it swaps the Parameter in the param groups and carries the
per-parameter state (e.g. Adam moments) of the blocks that stay. Typical loop::

    pruner = GradualPruner(model, s0=0.0, s1=0.9, start=0, end=1000, update_every=100, optimizer=opt)
    for step in range(steps):
        loss.backward(); opt.step(); opt.zero_grad()
        pruner.step()          # after opt.step(), once per training step
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import check
from ..format import BlockMask
from ..nn import SparseLinear
from .magnitude import SCORES, block_scores, check_sparsity, magnitude, select_blocks

log = logging.getLogger(__name__)


def cubic_sparsity(step: int, s0: float, s1: float, start: int, end: int) -> float:
    """The schedule value at ``step`` (module docstring)."""
    if step <= start:
        return s0
    if step >= end:
        return s1
    return s1 + (s0 - s1) * (1.0 - (step - start) / (end - start)) ** 3


def _block_index(mask: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` long: the position of each kept block in ``values`` (BSR order), -1 if pruned."""
    idx = torch.full(mask.shape, -1, dtype=torch.long, device=mask.device)
    idx[mask] = torch.arange(int(mask.sum()), device=mask.device)
    return idx


def replace_in_optimizer(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter,
                         old_mask: torch.Tensor, new_mask: torch.Tensor) -> None:
    """Swap ``old`` for ``new`` (a layer's ``values`` before/after ``set_mask``) in ``optimizer``.

    State tensors shaped like ``old`` (``[nnzb_old, BN, BK]``) are re-indexed to the new mask:
    blocks kept in both keep their state, new blocks start at zero; other state (e.g. ``step``)
    is kept as is.
    """
    found = False
    for group in optimizer.param_groups:
        for i, p in enumerate(group["params"]):
            if p is old:
                group["params"][i] = new
                found = True
    check(found, "optimizer", "an optimizer holding the layer's old values Parameter", "none of its params")
    state = optimizer.state.pop(old, None)
    if not state:
        return
    rows, cols = new_mask.nonzero(as_tuple=True)
    src = _block_index(old_mask.to(rows.device))[rows, cols]          # [nnzb_new], -1 = new block
    moved = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor) and v.shape == old.shape:
            t = v.new_zeros(new.shape)
            keep = src >= 0
            t[keep.to(t.device)] = v[src[keep].to(v.device)]
            moved[k] = t
        else:
            moved[k] = v
    optimizer.state[new] = moved


class GradualPruner:
    """Prunes every ``SparseLinear`` in ``model`` on the cubic schedule (module docstring).

    ``score``: "l1" or "l2" block magnitude; ``balanced``: equal blocks per block-row.
    ``optimizer``: kept in sync through ``replace_in_optimizer`` on each mask update.
    """

    def __init__(self, model: nn.Module, s0: float, s1: float, start: int, end: int, update_every: int = 100,
                 score: str = "l2", balanced: bool = False, optimizer: torch.optim.Optimizer | None = None):
        self.s0, self.s1 = check_sparsity(s0), check_sparsity(s1)
        check(s1 >= s0, "s1", f"a final sparsity >= s0={s0}", s1)
        for name, v in (("start", start), ("end", end), ("update_every", update_every)):
            check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, name, "a non-negative int", repr(v))
        check(score in SCORES, "score", f"one of {SCORES}", repr(score))
        check(end > start, "end", f"a step after start={start}", end)
        check(update_every >= 1, "update_every", "an int >= 1", update_every)
        check(optimizer is None or isinstance(optimizer, torch.optim.Optimizer), "optimizer",
              "None or a torch.optim.Optimizer", type(optimizer).__name__)
        self.layers = [(fqn, m) for fqn, m in model.named_modules() if isinstance(m, SparseLinear)]
        check(bool(self.layers), "model", "a model containing SparseLinear layers", "none")
        self.start, self.end, self.update_every = start, end, update_every
        self.score, self.balanced, self.optimizer = score, balanced, optimizer
        self.step_count = 0
        self.sparsity = None  # the last applied value

    def target(self, step: int | None = None) -> float:
        return cubic_sparsity(self.step_count if step is None else step, self.s0, self.s1, self.start, self.end)

    def step(self) -> bool:
        """Advance one training step; on update steps re-prune. True when masks changed."""
        t = self.step_count
        self.step_count += 1
        due = (t - self.start) % self.update_every == 0 or t == self.end  # start, start + update_every, ...
        if not due or t < self.start or t > self.end:
            return False
        return self.apply(self.target(t))

    def apply(self, sparsity: float) -> bool:
        """Re-prune every layer to ``sparsity`` now (never regrowing a pruned block)."""
        if self.optimizer is not None:  # checked before any layer changes
            held = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            lost = [fqn for fqn, layer in self.layers if id(layer.values) not in held]
            check(not lost, "optimizer", "an optimizer holding every SparseLinear's values",
                  f"one missing {lost[:3]}")
        changed = False
        for fqn, layer in self.layers:
            old_mask = layer.mask.clone()
            scores = block_scores(magnitude(layer.dense_weight(), self.score), layer.block).to(old_mask.device)
            scores[~old_mask] = -1.0  # a pruned block never wins, even against an all-zero kept block
            new = select_blocks(scores, sparsity, self.balanced) & old_mask  # nor comes back at a lower target
            if torch.equal(new, old_mask):
                continue
            layer.set_mask(BlockMask(new, layer.block, (layer.out_features, layer.in_features)),
                           optimizer=self.optimizer)
            changed = True
            log.debug("gradual: %s -> density %.3f", fqn, layer.density)
        self.sparsity = sparsity
        return changed
