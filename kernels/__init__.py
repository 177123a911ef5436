"""Hand-written Triton kernels for block-sparse matmul (installed as ``sparsecore.kernels``).

One kernel per module, each with a host launcher taking the ``BlockSparseWeight`` tensors::

    bsr_fwd     y = act(x @ W^T + bias)    prefill / training forward (M > 64)
    bsr_decode  same, small M              stream-K over the kept blocks + epilogue pass
    bsr_dx      dX = dY @ W                through the CSC (transposed) metadata
    bsr_dw      dV = dY^T X, kept blocks   sampled product, optional M split
    configs     launch configs: tuned_configs.json, else heuristics
    common      the MMA step and the fused epilogue shared by the kernels

The backend (``sparsecore.backends.triton``) registers them as ``torch.library.triton_op``
ops (``torch.ops.sparsecore.triton_bsr_linear*``) for torch.compile and other libraries.
Submodules import ``triton``; this package itself does not (``triton_unusable`` reads the
installed version from its metadata, so the interpreter mode is not fixed by asking).
"""
from __future__ import annotations

import importlib.metadata
import re
from typing import Optional

MIN_TRITON = (3, 6)  # 3.4, 3.5 fail to lower the kernels (erf on an MMA tile; 2-byte cp.async of x)


def triton_unusable() -> Optional[str]:
    """Why the installed triton cannot run these kernels, or None when it can."""
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return "triton is not installed"
    have = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
    if have < MIN_TRITON:
        return f"triton {version} is older than {'.'.join(map(str, MIN_TRITON))}, which the kernels need"
    return None
