"""Input statistics of ``nn.Linear`` layers, gathered by forward hooks over calibration batches.

For a layer ``y = x @ W^T + b`` whose inputs, flattened to tokens, are ``X [T, K]``::

    sq_norm [K]          float64   sum_t X[t, j]^2          Wanda's ||x_j||^2
    gram    [K+1, K+1]   float64   A^T A,  A = [X | 1]      H = X^T X in gram[:K, :K],
                                                           column sums in gram[K, :K],
                                                           T in gram[K, K]  (refit with bias)
    cross   [K+1, K+1]   float64   A^T A_d  (paired mode)   A_d = [X_d | 1], the same tokens'
                                                           inputs in a reference (dense) copy
    tokens               int       T

Each batch's product is formed in float32 and added to the float64 totals. Padding: when a
calibration batch is a dict holding ``attention_mask [B, S]`` and a layer's input is
``[B, S, K]``, the tokens whose mask is 0 are left out of the statistics.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import check

log = logging.getLogger(__name__)


@dataclass
class LayerStats:
    """Accumulated input statistics of one Linear (layouts in the module docstring)."""

    sq_norm: torch.Tensor
    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    tokens: int = 0

    @property
    def hessian(self) -> torch.Tensor:
        """``H = X^T X`` ``[K, K]`` float64 (needs ``gram``)."""
        return self.gram[:-1, :-1]

    def add(self, x2d: torch.Tensor, ref2d: torch.Tensor | None = None) -> None:
        x = x2d.float()
        self.sq_norm += (x * x).sum(0).double()
        if self.gram is not None:
            one = x.new_ones(x.shape[0], 1)
            a = torch.cat([x, one], 1)
            self.gram += (a.T @ a).double()
            if ref2d is not None:
                check(ref2d.shape == x.shape, "reference", f"inputs of shape {tuple(x.shape)} (same tokens)",
                      f"shape {tuple(ref2d.shape)}")
                if self.cross is None:
                    self.cross = torch.zeros_like(self.gram)
                self.cross += (a.T @ torch.cat([ref2d.float(), one], 1)).double()
        self.tokens += x.shape[0]


class StopForward(Exception):
    """Raised by a hook to end a calibration forward once every watched layer has run."""


@dataclass
class Collector:
    """Context manager: hooks ``layers`` ({fqn: nn.Linear}) and fills ``stats`` ({fqn: LayerStats}).

    ``stop_early``: end each forward (``StopForward``) as soon as all watched layers have seen
    the batch — later layers need not run. ``capture``: keep only the current batch's inputs
    in ``captured`` ({fqn: [T, K]}), no statistics. ``paired``: a capturing Collector over a
    reference copy, run on each batch first; its inputs fill ``LayerStats.cross``. ``order``
    lists fqns in first-call order and ``input_key`` identifies each layer's input tensor
    (layers fed the same tensor share a key).
    """

    layers: dict
    gram: bool = False
    stop_early: bool = False
    capture: bool = False
    paired: "Collector | None" = None
    captured: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    order: list = field(default_factory=list)
    input_key: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)
    token_mask: torch.Tensor | None = None
    _seen: set = field(default_factory=set)
    _handles: list = field(default_factory=list)

    def __enter__(self):
        for fqn, lin in self.layers.items():
            K, dev = lin.in_features, lin.weight.device
            gram = torch.zeros(K + 1, K + 1, dtype=torch.float64, device=dev) if self.gram else None
            self.stats[fqn] = LayerStats(torch.zeros(K, dtype=torch.float64, device=dev), gram)
            self._handles.append(lin.register_forward_pre_hook(self._hook(fqn), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def new_batch(self, token_mask):
        self.token_mask = token_mask
        self._seen = set()

    def _hook(self, fqn):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["input"]  # nn.Linear.forward(input)
            if fqn not in self.input_key:
                self.order.append(fqn)
                self.input_key[fqn] = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            self.calls[fqn] = self.calls.get(fqn, 0) + 1
            m = self.token_mask
            if m is not None and x.dim() == 3 and tuple(m.shape) == tuple(x.shape[:2]):
                x2d = x[m.to(x.device) != 0]
            else:
                x2d = x.reshape(-1, x.shape[-1])
            if self.capture:
                self.captured[fqn] = x2d.detach()
            else:
                self.stats[fqn].add(x2d.detach(), None if self.paired is None else self.paired.captured[fqn])
            self._seen.add(fqn)
            if self.stop_early and len(self._seen) == len(self.layers):
                raise StopForward
        return hook


def as_batches(calibration) -> list:
    """Materialize ``calibration`` (an iterable of model inputs) so it can be replayed."""
    iterable = hasattr(calibration, "__iter__") and not isinstance(calibration, (torch.Tensor, dict, str))
    check(iterable, "calibration", "an iterable of model inputs (tensors or dicts of tensors)", type(calibration).__name__)
    batches = list(calibration)
    check(len(batches) > 0, "calibration", "at least one batch", "an empty iterable")
    for b in batches:
        check(isinstance(b, (torch.Tensor, dict)), "calibration", "batches that are tensors or dicts",
              f"a batch of type {type(b).__name__}")
    return batches


def _to(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _forward(model, batch):
    try:
        model(**batch) if isinstance(batch, dict) else model(batch)
    except StopForward:
        pass


def run(model: nn.Module, batches: list, collector: Collector, desc: str = "calibration",
        reference: nn.Module | None = None) -> Collector:
    """Forward every batch through ``model`` (no grad) while ``collector`` is hooked in.

    ``reference``: a copy of ``model`` (same fqns) run on each batch first, so that
    ``LayerStats.cross`` pairs the inputs of ``model``'s layers with the copy's.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    if reference is not None:
        collector.paired = Collector({f: reference.get_submodule(f) for f in collector.layers},
                                     stop_early=collector.stop_early, capture=True)
    with collector, collector.paired or contextlib.nullcontext(), torch.no_grad():
        for batch in tqdm(batches, desc=desc, leave=False, disable=None):
            batch = _to(batch, device)
            token_mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            if reference is not None:
                collector.paired.new_batch(token_mask)
                _forward(reference, batch)
            collector.new_batch(token_mask)
            _forward(model, batch)
    missing = [fqn for fqn in collector.layers if collector.stats[fqn].tokens == 0]
    check(not missing, "calibration", "batches that reach every layer being pruned",
          f"no input reached {missing[:3]}{'...' if len(missing) > 3 else ''}")
    return collector


def collect(model: nn.Module, layers: dict, batches: list, gram: bool = False, stop_early: bool = False,
            desc: str = "calibration", reference: nn.Module | None = None) -> Collector:
    """One hooked pass over ``batches``; returns the collector (``.stats``, ``.order``, ...)."""
    c = run(model, batches, Collector(layers, gram=gram, stop_early=stop_early), desc, reference)
    log.debug("calibration: %d layers, %d batches, tokens %s", len(layers), len(batches),
              sorted({s.tokens for s in c.stats.values()}))
    return c


def stages(collector: Collector) -> list[list[str]]:
    """Group layers in call order; consecutive layers fed the same input tensor form one stage
    (e.g. q, k, v projections), so a sequential pruner can treat them together."""
    out: list[list[str]] = []
    for fqn in collector.order:
        if out and collector.input_key[out[-1][-1]] == collector.input_key[fqn]:
            out[-1].append(fqn)
        else:
            out.append([fqn])
    return out
