"""One-shot planning: a block mask (and a refitted weight) for each target Linear.

``plan`` is what ``sparsecore.sparsify`` calls. Steps, per target layer ``W [N, K]``::

    importance  magnitude: |W| ("l1") or W^2 ("l2")
                wanda:     |W| * ||x_j|| or W^2 * ||x_j||^2   (calibration input norms)
    allocation  "uniform": every layer at ``sparsity``
                "global":  one threshold over all layers' block scores, each layer's scores
                           divided by its mean block score (per element of block area);
                           kept area = density * total area, rounded to whole blocks
                "sensitivity": per-layer sparsity by measured sensitivity (needs
                           calibration): each layer's relative output error e_l(g) at
                           g = sparsity + {0, ±0.1, ±0.2, ±0.3} (after the refit when
                           reconstructing), then greedy on the smallest error per pruned
                           parameter until sum n_l s_l = sparsity * sum n_l (the last
                           layer moved takes a fractional step)
                {fqn: s}:  explicit per-layer sparsity (others get ``sparsity``)
    selection   magnitude.block_mask (top-k blocks, optionally balanced per block-row)
    refit       reconstruct=True: reconstruct.refit on the calibration Gram matrix

With ``sequential=True`` (the default when refitting) layers are pruned stage by stage in
call order — a stage is the layers fed the same input, e.g. q/k/v — and each stage's
statistics come from a fresh pass through the model with all earlier stages already
pruned (as SparseGPT does); each pass stops once the stage has run. The refit target is
then ``refit_target="dense"`` (default): the dense model's own output, from a dense copy
run alongside (twice the model's memory while planning), so each layer also undoes the
error of the layers before it; or ``"layer"``: the dense layer applied to the pruned
model's input (SparseGPT's target).
"""
from __future__ import annotations

import contextlib
import copy
import logging

import torch
from tqdm.auto import tqdm

from ..errors import check
from ..format import block_areas, normalize_block
from . import calibrate, reconstruct as recon, wanda
from .magnitude import SCORES, block_mask, block_scores, check_sparsity, magnitude

log = logging.getLogger(__name__)

METHODS = ("magnitude", "wanda")
ALLOCATIONS = ("uniform", "global", "sensitivity")
SENSITIVITY_OFFSETS = (-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3)


def _layer_blocks(targets, block, layer_block) -> dict:
    out = {}
    for fqn, lin in targets:
        b = None
        if isinstance(layer_block, dict):
            b = layer_block.get(fqn)
        elif callable(layer_block):
            b = layer_block(lin, fqn)
        out[fqn] = block if b is None else normalize_block(b)
    return out


def global_allocation(scores: dict, areas: dict, sparsity: float) -> dict:
    """Per-layer sparsity from one threshold over normalised block scores.

    ``scores``: {fqn: float ``[R, C]`` block scores}; ``areas``: {fqn: weights per block, an int
    (BN*BK) or ``[R, C]`` (``block_areas``: padded edge blocks hold fewer)}. Each layer's scores
    are divided by its mean block score; blocks are kept in descending order while the kept
    area is <= ``(1 - sparsity) * total area`` + half a block (ties: layer order, then index).
    """
    names = list(scores)
    norm, area, owner = [], [], []
    for i, fqn in enumerate(names):
        s = scores[fqn].double().reshape(-1)
        mean = float(s.mean())
        norm.append(s / mean if mean > 0 else torch.ones_like(s))
        a = areas[fqn]
        area.append(a.to(s).reshape(-1) if isinstance(a, torch.Tensor) else torch.full_like(s, float(a)))
        owner.append(torch.full((s.numel(),), i, dtype=torch.long))
    norm, area, owner = torch.cat(norm), torch.cat(area), torch.cat(owner)
    order = torch.sort(norm, descending=True, stable=True).indices
    csum = area[order].cumsum(0)
    kept = order[csum <= (1.0 - sparsity) * float(area.sum()) + area[order] / 2]
    counts = torch.bincount(owner[kept], minlength=len(names))
    return {fqn: 1.0 - int(counts[i]) / scores[fqn].numel() for i, fqn in enumerate(names)}


def sensitivity_allocation(errors: dict, sizes: dict, sparsity: float) -> dict:
    """Per-layer sparsity from error curves (see the module docstring).

    ``errors``: {fqn: [(g, e_l(g)), ...]} sorted by g; ``sizes``: {fqn: n_l parameters}. Starts
    every layer at its lowest g and repeatedly advances the layer whose next step costs the
    least error per pruned parameter; the step that would pass the budget is taken in part.
    Non-convex curves are made convex first (a step is judged by its best reachable slope).
    """
    target = sparsity * sum(sizes.values())
    cur = {f: 0 for f in errors}
    s = {f: errors[f][0][0] for f in errors}
    pruned = sum(sizes[f] * s[f] for f in errors)
    check(pruned <= target + 1e-9 and sum(sizes[f] * errors[f][-1][0] for f in errors) >= target - 1e-9,
          "allocation", f"candidate sparsities around {sparsity} that can meet it", "a grid that cannot")

    def best_step(f):  # (error per pruned parameter, index of the grid point reached)
        g0, e0 = errors[f][cur[f]]
        return min(((e - e0) / (sizes[f] * (g - g0)), j) for j, (g, e) in enumerate(errors[f]) if j > cur[f])

    while pruned < target - 1e-9:
        f, (_, j) = min(((f, best_step(f)) for f in errors if cur[f] < len(errors[f]) - 1), key=lambda t: t[1][0])
        step = sizes[f] * (errors[f][j][0] - s[f])
        if pruned + step >= target:
            s[f] += (target - pruned) / sizes[f]
            break
        pruned += step
        cur[f], s[f] = j, errors[f][j][0]
    return s


@contextlib.contextmanager
def _eval_mode(model):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode


def plan(model, targets, *, block, sparsity, method="magnitude", calibration=None, reconstruct=False,
         balanced=False, score="l2", allocation="uniform", layer_block=None, sequential=None, damp=0.01,
         refit_target="dense"):
    """Return ``{fqn: BlockMask}`` for ``targets`` = [(fqn, nn.Linear)] (the new weight is
    left in the target itself, see below).

    ``calibration`` (iterable of model inputs, replayed several times when sequential) is
    needed for ``method="wanda"`` and for ``reconstruct=True``. ``layer_block``: {fqn: block}
    or ``callable(module, fqn) -> block | None`` overriding ``block`` per layer.
    ``sequential``: default ``reconstruct``. ``damp``: ridge of the refit (fraction of the
    mean diagonal of ``X^T X``).

    The targets are left holding their pruned (refit) weight and bias, which ``sparsify``
    copies into the ``SparseLinear`` that replaces them; on error they are restored.
    """
    check(method in METHODS, "method", f"one of {METHODS}", repr(method))
    check(score in SCORES, "score", f"one of {SCORES}", repr(score))
    check(allocation in ALLOCATIONS or isinstance(allocation, dict), "allocation",
          f"one of {ALLOCATIONS} or a dict {{fqn: sparsity}}", repr(allocation))
    check(layer_block is None or isinstance(layer_block, dict) or callable(layer_block), "layer_block",
          "None, a dict {fqn: block} or a callable(module, fqn)", type(layer_block).__name__)
    check(refit_target in ("dense", "layer"), "refit_target", "'dense' or 'layer'", repr(refit_target))
    needs_data = method == "wanda" or reconstruct
    check(not needs_data or calibration is not None, "calibration",
          f"an iterable of model inputs for method={method!r}, reconstruct={reconstruct}", None)
    sequential = bool(reconstruct) if sequential is None else bool(sequential)
    layers = dict(targets)
    blocks = _layer_blocks(targets, block, layer_block)
    sparsities = {fqn: sparsity for fqn in layers}
    if isinstance(allocation, dict):
        unknown = sorted(set(allocation) - set(layers))
        check(not unknown, "allocation", "fqns of layers being pruned", unknown[:3])
        sparsities.update({fqn: check_sparsity(s) for fqn, s in allocation.items()})
    if not layers:  # nothing selected (sparsify logs it)
        return {}

    with _eval_mode(model):  # calibration as inference: no dropout, BatchNorm statistics untouched
        batches = calibrate.as_batches(calibration) if needs_data else None
        first_gram = (reconstruct and not sequential) or allocation == "sensitivity"
        first = calibrate.collect(model, layers, batches, gram=first_gram) if needs_data else None

        def importance(fqn, stats):
            w = layers[fqn].weight.detach()
            if method == "wanda":
                return wanda.importance(w, stats.sq_norm, score)
            return magnitude(w, score)

        if allocation == "sensitivity":
            check(first is not None, "allocation",
                  "'sensitivity' with calibration data (method='wanda' or reconstruct)", "no calibration")
            errors = {}
            for f in tqdm(list(layers), desc="sensitivity", leave=False, disable=None):
                lin, st = layers[f], first.stats[f]
                w, b = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
                imp = importance(f, st)
                curve = []
                for g in sorted({min(0.99, max(0.0, round(sparsity + o, 6))) for o in SENSITIVITY_OFFSETS}):
                    m = block_mask(w, blocks[f], g, score=imp, balanced=balanced)
                    wn, bn_ = recon.refit(w, b, m, st.gram, damp) if reconstruct else (w * m.to_dense().to(w.dtype), b)
                    curve.append((g, recon.output_error(wn, bn_, w, b, st.gram)))
                errors[f] = curve
            sparsities = sensitivity_allocation(errors, {f: lin.weight.numel() for f, lin in layers.items()}, sparsity)
            log.info("sensitivity allocation: %s", ", ".join(f"{f}={v:.2f}" for f, v in sparsities.items()))
        if allocation == "global":
            scores = {f: block_scores(importance(f, first.stats[f] if first else None), blocks[f]) for f in layers}
            areas = {f: block_areas(tuple(layers[f].weight.shape), blocks[f]) for f in layers}
            sparsities = global_allocation(scores, areas, sparsity)

        originals = {f: (lin.weight.detach().clone(), None if lin.bias is None else lin.bias.detach().clone())
                     for f, lin in layers.items()}
        out = {}

        def prune_layer(fqn, stats):
            lin = layers[fqn]
            w, b = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
            mask = block_mask(w, blocks[fqn], sparsities[fqn], score=importance(fqn, stats), balanced=balanced)
            w_masked = w * mask.to_dense().to(w.dtype)
            w_new, b_new = w_masked, b
            if reconstruct:
                w_new, b_new = recon.refit(w, b, mask, stats.gram, damp, cross=stats.cross)
                if stats.cross is None:  # vs the dense layer on the same input
                    log.debug("prune %s: sparsity %.3f, rel. output error %.4f masked -> %.4f refit (%d tokens)", fqn,
                              mask.sparsity, recon.output_error(w_masked, b, w, b, stats.gram),
                              recon.output_error(w_new, b_new, w, b, stats.gram), stats.tokens)
                else:
                    log.debug("prune %s: sparsity %.3f, refit to the dense model's output (%d tokens)", fqn,
                              mask.sparsity, stats.tokens)
            else:
                log.debug("prune %s: sparsity %.3f", fqn, mask.sparsity)
            with torch.no_grad():
                lin.weight.copy_(w_new)
                if b is not None:
                    lin.bias.copy_(b_new)
            out[fqn] = mask

        try:
            if not sequential:
                for fqn in tqdm(list(layers), desc="prune", leave=False, disable=None):
                    prune_layer(fqn, first.stats[fqn] if first else None)
            else:
                groups = calibrate.stages(first) if first else [[f] for f in layers]
                shared = first is not None and any(first.calls[f] > len(batches) for f in layers)
                reference = copy.deepcopy(model) if reconstruct and refit_target == "dense" else None
                for i, stage in enumerate(tqdm(groups, desc="prune (sequential)", leave=False, disable=None)):
                    c = calibrate.collect(model, {f: layers[f] for f in stage}, batches, gram=reconstruct,
                                          stop_early=not shared, desc=f"stage {i + 1}/{len(groups)}",
                                          reference=reference) if needs_data else None
                    for fqn in stage:
                        prune_layer(fqn, c.stats[fqn] if c else None)
        except BaseException:
            with torch.no_grad():
                for f, (w, b) in originals.items():
                    layers[f].weight.copy_(w)
                    if b is not None:
                        layers[f].bias.copy_(b)
            raise
        return out

