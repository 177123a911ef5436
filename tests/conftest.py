"""Shared test helpers: the float64 masked-dense oracle and dtype-based tolerances."""
from __future__ import annotations

import os

import pytest
import torch

import sparsecore as sc

# Relative Frobenius error ||out - ref|| / ||ref|| allowed per dtype of the computation.
# bf16 has 8 mantissa bits (~4e-3 per rounding), fp16 11 (~5e-4); outputs are rounded once
# after fp32 accumulation, so a correct kernel lands near one rounding of the output.
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
TF32_TOL = 5e-3  # Triton's default fp32 dot is tf32 (10 mantissa bits)


def oracle(x, w_dense_masked, bias=None, activation="none"):
    """float64 ``act(x @ W^T + b)`` with W already masked (dense [N, K])."""
    y = x.double() @ w_dense_masked.double().T
    if bias is not None:
        y = y + bias.double()
    return {"none": lambda t: t, "relu": torch.relu, "gelu": torch.nn.functional.gelu,
            "silu": torch.nn.functional.silu}[activation](y)


def rel_err(out, ref):
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def assert_close(out, ref, dtype, tol=None):
    """NaN never passes; an all-zero reference needs an exactly-zero output."""
    out, ref = out.detach(), ref.detach()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), "non-finite output"
    if ref.numel() == 0:
        return
    if float(ref.abs().max()) == 0.0:
        assert float(out.abs().max()) == 0.0, "expected exact zeros"
        return
    err, tol = rel_err(out, ref), REL_TOL[dtype] if tol is None else tol
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e} ({dtype})"


def random_weight(n, k, block, density, dtype=torch.float32, device="cpu", generator=None, empty_rows=0):
    """A random dense weight and a random BlockMask of about ``density`` (first rows emptied).

    Drawn on the generator's device (a CUDA generator keeps big GPU cases off the CPU)."""
    g = generator or torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g, device=g.device).to(dtype=dtype, device=device)
    R, C = sc.format.grid_shape((n, k), sc.format.normalize_block(block))
    m = torch.rand(R, C, generator=g, device=g.device) < density
    m[:empty_rows] = False
    return w, sc.BlockMask(m.to(device), block, (n, k))


def has_gpu():
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = pytest.mark.skip(reason="slow: set SPARSECORE_SLOW=1")
    for item in items:
        if "gpu" in item.keywords and not has_gpu():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and os.environ.get("SPARSECORE_SLOW") != "1":
            item.add_marker(skip_slow)
