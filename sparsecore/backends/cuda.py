"""The ``cuda`` backend: the hand-written kernels of the extension ``sparsecore._C``.

Loading ``sparsecore._C`` registers (see ``csrc/sparsecore_ops.cpp``)::

    torch.ops.sparsecore.cuda_bsr_linear(x, values, row_ptr, col_idx, block_row, row_order,
                                         out_features, bias=None, activation="none",
                                         kernel="auto") -> y [M, out_features]
    torch.ops.sparsecore.cuda_bsr_linear_grad_input(dy, values, col_ptr, row_idx, t_perm,
                                                    in_features) -> dx [M, in_features]
    torch.ops.sparsecore.cuda_bsr_linear_grad_weight(dy, x, block_row, col_idx, block_n,
                                                     block_k) -> dvalues [nnzb, BN, BK]
    torch.ops.sparsecore.cuda_has_sm90a() -> bool
    torch.ops.sparsecore.cuda_decode_split(device, M, block_rows, nnzb, block_k) -> int
                                       (decode plan: CTAs per cluster, 0 = split kernel)

``kernel="auto"`` picks ``decode`` (M <= 64, BK >= 32: a CTA, or on compute capability >= 9.0 a
cluster of up to 8 CTAs, per block-row and 16 rows of x; on older GPUs with fewer of those
than SMs the kept blocks split over all SMs with fp32 atomics), else ``sm90`` (TMA + wgmma,
warp-specialized; compute capability 9.0, built for sm_90a), else
``sm80`` (mma.sync, any GPU of compute capability >= 8.0). fp16 / bf16, block sides 16..128.
``$SPARSECORE_CUDA_KERNEL`` (sm80 | sm90 | decode) forces one for the backend's forward, to
compare them through the whole stack; ``$SPARSECORE_DECODE_CLUSTERS=0`` keeps decode off clusters
(read once per device).
The backward kernels (dX over the CSC metadata, dW on the kept blocks) are mma.sync kernels
for compute capability >= 8.0.

The ``cuda_*`` ops check dtypes, shapes and metadata lengths (their meta kernels too, once
sizes are plain numbers), not the metadata's values, which would cost a device sync a call:
they expect the BSR that ``format.build_metadata`` makes, for a weight as wide as ``x`` (as
``dy`` for dX; blocks past that width read zeros, never outside it).
``torch.ops.sparsecore.bsr_linear`` ties those widths to the metadata.

The extension is imported lazily, on first use: a missing or mismatched build warns once and
the backend reports unavailable (auto falls back to triton / torch); ``import sparsecore``
never depends on it.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings

import torch

from ..format import BLOCK_SIDES

DTYPES = (torch.float16, torch.bfloat16)
MAX_ROWS = 65535 * 128  # the kernels' grid.y x row tile (csrc/sparsecore_ops.cpp kMaxRows)

_state: dict = {}  # "error": None when loaded, else the reason (set by the first _load())


def _load() -> str | None:
    """Import ``sparsecore._C`` once; return None on success, else why not (warned once)."""
    if "error" not in _state:
        try:
            importlib.import_module("sparsecore._C")
            torch.ops.sparsecore.cuda_bsr_linear  # noqa: B018 (raises if the schema is missing)
            _state["error"] = None
        except Exception as e:  # missing file, ABI mismatch, stale build: all mean "unavailable"
            _state["error"] = f"sparsecore._C could not be loaded ({type(e).__name__}: {e})"
            warnings.warn(f"{_state['error']}; the cuda backend is disabled, falling back to triton/torch",
                          RuntimeWarning, stacklevel=3)
    return _state["error"]


def available():
    err = _load()
    if err is not None:
        return False, err
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, ""


def supports(x, values):
    if _load() is not None or not x.is_cuda:
        return False
    return (x.dtype in DTYPES and values.dtype == x.dtype and values.dim() == 3
            and values.shape[1] in BLOCK_SIDES and values.shape[2] in BLOCK_SIDES
            and x.shape[0] <= MAX_ROWS and -(-x.shape[-1] // values.shape[2]) * values.shape[2] < 2**31 - 64
            and _capability(x.device.index) >= (8, 0))


@functools.lru_cache(maxsize=None)  # a property query costs microseconds, and every eager call asks
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def forward(x, values, row_ptr, col_idx, block_row, row_order, out_features, bias, activation, kernel=None):
    kernel = kernel or os.environ.get("SPARSECORE_CUDA_KERNEL", "auto")
    return torch.ops.sparsecore.cuda_bsr_linear(x, values, row_ptr, col_idx, block_row, row_order, out_features,
                                                bias, activation, kernel)


def grad_input(dy, values, col_ptr, row_idx, t_perm, in_features):
    return torch.ops.sparsecore.cuda_bsr_linear_grad_input(dy, values, col_ptr, row_idx, t_perm, in_features)


def grad_weight(dy, x, block_row, col_idx, block):
    return torch.ops.sparsecore.cuda_bsr_linear_grad_weight(dy, x, block_row, col_idx, block[0], block[1])
