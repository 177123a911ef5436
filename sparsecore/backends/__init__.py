"""Backends behind the ``torch.ops.sparsecore`` ops, and the rule that picks one.

Every backend module exposes the same three functions over raw tensors (2-D ``x``/``dy``,
contiguous ``values [nnzb, BN, BK]`` and int32 metadata from ``sparsecore.format``)::

    forward(x, values, row_ptr, col_idx, block_row, row_order, out_features, bias, activation)
        -> y [M, out_features]           y = act(x @ W^T + bias)
    grad_input(dy, values, col_ptr, row_idx, t_perm, in_features) -> dx [M, in_features]
    grad_weight(dy, x, block_row, col_idx, block) -> dvalues [nnzb, BN, BK]  (kept blocks only)

and ``available() -> (bool, reason)`` plus ``supports(x, values) -> bool``.

Choice: the explicit ``backend`` argument, then ``$SPARSECORE_BACKEND``, then auto:
``cuda`` (extension built, tensor on a GPU, shape supported) ▸ ``triton`` (GPU) ▸ ``torch``.
"""
from __future__ import annotations

import functools
import importlib
import os

from ..errors import SparseCoreError

NAMES = ("torch", "triton", "cuda")
CHOICES = ("auto",) + NAMES
ACTIVATIONS = ("none", "relu", "gelu", "silu")


@functools.lru_cache(maxsize=None)  # resolve() asks on every call
def module(name: str):
    return importlib.import_module(f"{__name__}.{'reference' if name == 'torch' else name}")


def requested(backend: str) -> str:
    """The backend asked for: the argument unless 'auto', then the env var, else 'auto'."""
    if backend not in CHOICES:
        raise SparseCoreError(f"backend: expected one of {CHOICES}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("SPARSECORE_BACKEND", "auto").strip().lower() or "auto"
        if env not in CHOICES:
            raise SparseCoreError(f"SPARSECORE_BACKEND: expected one of {CHOICES}, got {env!r}")
        backend = env
    return backend


def resolve(backend: str, x, values):
    """Return the backend module that runs this call (raises if a forced one cannot)."""
    name = requested(backend)
    if name == "auto":
        if x.is_cuda:
            for cand in ("cuda", "triton"):
                mod = module(cand)
                if mod.available()[0] and mod.supports(x, values):
                    return mod
        return module("torch")
    mod = module(name)
    ok, why = mod.available()
    if not ok:
        raise SparseCoreError(f"backend: {name!r} was requested but is unavailable: {why}")
    if not mod.supports(x, values):
        raise SparseCoreError(
            f"backend: {name!r} does not support this call (device {x.device}, dtype {x.dtype}, "
            f"block {tuple(values.shape[1:])})")
    return mod
