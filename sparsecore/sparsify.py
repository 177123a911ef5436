"""``sparsify(model, ...)``: swap a model's ``nn.Linear`` layers for ``SparseLinear`` in place;
``densify(model)`` swaps them back."""
from __future__ import annotations

import inspect
import logging

import torch
from torch import nn
from torch.nn.utils.prune import BasePruningMethod

from . import backends, prune
from .errors import check, fail
from .format import normalize_block
from .nn import SparseLinear

log = logging.getLogger(__name__)


def _skip_reason(module: nn.Linear, parent: nn.Module | None) -> str | None:
    w = module.weight
    if isinstance(parent, nn.MultiheadAttention):
        return "nn.MultiheadAttention reads its projection weights directly"
    if type(module) is not nn.Linear:
        return f"{type(module).__name__} is a subclass of nn.Linear with its own behaviour"
    if w.is_meta:
        return "weight is on the meta device"
    if not w.dtype.is_floating_point:
        return f"weight dtype {w.dtype} is not floating point"
    if not bool(torch.isfinite(w).all()):
        return "weight has NaN/Inf"
    return None


def target_linears(model: nn.Module, filter_fn=None) -> list[tuple[str, nn.Linear]]:
    """``(fqn, layer)`` for every Linear that ``filter_fn(module, fqn)`` accepts and we can handle.

    A Linear with a parameter shared with another module (tied weights, e.g. an LM head tied
    to the embedding) or registered under two names is left dense: pruning it would prune the
    other user of that tensor too.
    """
    check(filter_fn is None or callable(filter_fn), "filter_fn", "None or a callable(module, fqn) -> bool",
          type(filter_fn).__name__)
    parents = {fqn: m for fqn, m in model.named_modules()}
    names: dict[int, list[str]] = {}
    for fqn, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), []).append(fqn)
    for fqn, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(fqn)
    out = []
    for fqn, m in model.named_modules():
        if not isinstance(m, nn.Linear) or (filter_fn is not None and not filter_fn(m, fqn)):
            continue
        check(fqn != "", "model", "a module containing the nn.Linear layers (the root cannot be swapped in place)",
              "a bare nn.Linear: wrap it, e.g. nn.Sequential(linear)")
        shared = [n for p in m.parameters(recurse=False) for n in names[id(p)] if n.rpartition(".")[0] != fqn]
        reason = (f"registered under several names {names[id(m)]}" if len(names[id(m)]) > 1 else
                  f"a parameter is shared with {shared[0]} (tied)" if shared else
                  _skip_reason(m, parents.get(fqn.rpartition(".")[0])))
        if reason:
            log.info("sparsify: skipping %s: %s", fqn, reason)
            continue
        out.append((fqn, m))
    return out


def sparsify(model: nn.Module, block=(64, 64), sparsity: float | None = None, method: str = "magnitude",
             filter_fn=None, calibration=None, reconstruct: bool = False, balanced: bool = False,
             backend: str = "auto", **method_kwargs) -> nn.Module:
    """Prune every selected ``nn.Linear`` of ``model`` to ``block`` masks and swap in ``SparseLinear``.

    ``filter_fn(module, fqn) -> bool`` picks layers (default: all). ``method``: "magnitude"
    or "wanda" (activation-aware, fed by ``calibration``: an iterable of model inputs; a
    tensor is passed as ``model(t)``, a dict as ``model(**d)``), at ``sparsity`` (default
    0.5); or "nonzero": no pruning, each layer keeps the blocks of its weight that hold any
    nonzero entry (weights pruned elsewhere; ``sparsity`` stays None; a layer with no zero
    block stays ``nn.Linear``). ``reconstruct=True`` refits
    the kept blocks and the bias of each layer to the dense model's output on the
    calibration data. Further keywords go to ``sparsecore.prune.plan``: ``score`` ("l1" /
    "l2"), ``allocation`` ("uniform" | "global" | "sensitivity" | {fqn: sparsity}),
    ``layer_block`` ({fqn: block} or callable), ``sequential``, ``damp``, ``refit_target``.
    Returns ``model`` (changed in place).
    """
    check(isinstance(model, nn.Module), "model", "an nn.Module", type(model).__name__)
    check(backend in backends.CHOICES, "backend", f"one of {backends.CHOICES}", repr(backend))
    check(method in prune.METHODS + ("nonzero",), "method", f"one of {prune.METHODS + ('nonzero',)}", repr(method))
    block = normalize_block(block)
    if method == "nonzero":
        given = [name for name, v in (("sparsity", sparsity is not None), ("calibration", calibration is not None),
                                      ("reconstruct", reconstruct), ("balanced", balanced)) if v]
        given += sorted(method_kwargs)
        check(not given, "method", "'nonzero' alone (the weights' zero blocks decide: no sparsity, calibration, "
              "reconstruct, balanced or pruner options)", f"'nonzero' with {', '.join(given)}")
    else:
        sparsity = prune.check_sparsity(0.5 if sparsity is None else sparsity)
        options = [n for n, p in inspect.signature(prune.plan).parameters.items() if p.kind is p.KEYWORD_ONLY]
        unknown = sorted(set(method_kwargs) - set(options))
        if unknown:
            fail(unknown[0], f"a keyword of sparsify or of sparsecore.prune.plan ({', '.join(options)})",
                 "an unknown keyword")
    for m in model.modules():  # torch.nn.utils.prune: `weight` as the next forward computes it (stale after a step)
        for hook in m._forward_pre_hooks.values():
            if isinstance(hook, BasePruningMethod):
                hook(m, ())
    targets = target_linears(model, filter_fn)
    if not targets:
        log.warning("sparsify: no nn.Linear layer selected in %s: nothing to do", type(model).__name__)
    if method == "nonzero":
        plans = {fqn: prune.nonzero_mask(lin.weight.detach(), block) for fqn, lin in targets}
        for fqn in [f for f, m in plans.items() if m.density == 1.0]:
            log.info("sparsify: %s has no all-zero %s block: left as nn.Linear", fqn, block)
            del plans[fqn]
        targets = [(fqn, lin) for fqn, lin in targets if fqn in plans]
    else:
        plans = prune.plan(model, targets, block=block, sparsity=sparsity, method=method, calibration=calibration,
                           reconstruct=reconstruct, balanced=balanced, **method_kwargs)
    for fqn, lin in targets:
        new = SparseLinear.from_dense(lin, mask=plans[fqn], backend=backend)  # lin's mode and requires_grad
        parent_name, _, child = fqn.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
        log.info("sparsify: %s -> block %s, density %.3f", fqn, new.block, new.density)
    return model


def densify(model: nn.Module) -> nn.Module:
    """Swap every ``SparseLinear`` of ``model`` for an ``nn.Linear`` holding its dense weight
    (zeros where pruned), in place: for tools that know nothing of sparsecore (ONNX export,
    adapters, a stock ``load_state_dict``). Returns ``model``."""
    check(isinstance(model, nn.Module) and not isinstance(model, SparseLinear), "model",
          "an nn.Module that contains SparseLinear layers (for one layer, use .to_linear())", type(model).__name__)
    dense = {}  # one nn.Linear per SparseLinear, so a layer registered twice stays shared
    for fqn, m in list(model.named_modules(remove_duplicate=False)):
        if isinstance(m, SparseLinear):
            if m not in dense:
                dense[m] = m.to_linear()
            parent_name, _, child = fqn.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, dense[m])
    return model
