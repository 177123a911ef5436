"""One-shot planning: a mask (and optionally a new weight) for each target Linear."""
from __future__ import annotations

from ..errors import check
from .magnitude import block_mask

METHODS = ("magnitude",)


def plan(model, targets, *, block, sparsity, method="magnitude", calibration=None, reconstruct=False,
         balanced=False, score="l2"):
    """Return ``{fqn: (BlockMask, weight or None)}`` for ``targets`` = [(fqn, nn.Linear)]."""
    check(method in METHODS, "method", f"one of {METHODS}", repr(method))
    check(not reconstruct, "reconstruct", f"False for method {method!r} (needs calibration data)", reconstruct)
    return {fqn: (block_mask(lin.weight.detach(), block, sparsity, score=score, balanced=balanced), None)
            for fqn, lin in targets}
