"""Predicted speedup per layer from a benchmark CSV, and the dense fallback it implies.

The CSV is ``bench/``'s (columns as bench/README.md lists them: ``op, provider, dtype, M, N, K, block_n,
block_k, density, ..., speedup_vs_dense, ...``). For a layer ``W [N, K]`` pruned to
``density`` with blocks ``(BN, BK)`` at ``M`` tokens, the prediction is the row of a
sparsecore provider nearest in::

    d = |ln N/N'| + |ln K/K'| + |ln M/M'| + |ln density/density'| + |ln BN/BN'| + |ln BK/BK'|

among rows with the same ``op`` and ``dtype`` ("bf16", "fp16", "fp32"; torch dtypes accepted),
taking the best sparsecore provider at that point. A
layer whose predicted speedup is below ``min_speedup`` is better left dense::

    rows = layer_report(model, block=(32, 32), sparsity=0.7, csv_path="out/bench.csv")  # sparsecore bench on this GPU
    sc.sparsify(model, block=(32, 32), sparsity=0.7, filter_fn=sparse_filter(rows))
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

from torch import nn

from ..errors import check
from ..format import normalize_block

PROVIDERS = ("sparsecore-cuda", "sparsecore-triton", "sparsecore-torch")


def load_bench(csv_path) -> list[dict]:
    """Rows of a benchmark CSV with numeric fields parsed."""
    path = Path(csv_path)
    check(path.is_file(), "csv_path", "an existing benchmark CSV file", str(path))
    rows = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            try:
                for k in ("M", "N", "K", "block_n", "block_k"):
                    r[k] = int(r[k])
                for k in ("density", "speedup_vs_dense"):
                    r[k] = float(r[k])
            except (KeyError, TypeError, ValueError):
                continue
            if r["provider"] in PROVIDERS and r["density"] > 0 and r["speedup_vs_dense"] > 0:
                rows.append(r)
    check(bool(rows), "csv_path", f"a CSV with rows of providers {PROVIDERS} (sparsecore bench's columns)", str(path))
    return rows


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` / "bfloat16" / "bf16" -> "bf16" (the CSV's spelling); fp16, fp32 alike."""
    name = str(dtype).replace("torch.", "")
    return {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}.get(name, name)


def predict_speedup(rows: list[dict], N: int, K: int, M: int, density: float, block, dtype="bf16",
                    op="fwd") -> tuple[float, dict | None]:
    """``(speedup_vs_dense, nearest row)``; ``(nan, None)`` when no row has this op and dtype."""
    bn, bk = normalize_block(block)
    cand = [r for r in rows if r.get("op") == op and dtype_name(r.get("dtype")) == dtype_name(dtype)]
    if not cand:
        return math.nan, None
    if density <= 0:
        return math.inf, None  # nothing left to compute
    ln = lambda a, b: abs(math.log(a / b))
    dist = lambda r: (ln(N, r["N"]) + ln(K, r["K"]) + ln(max(M, 1), r["M"]) + ln(density, r["density"])
                      + ln(bn, r["block_n"]) + ln(bk, r["block_k"]))
    best = min(dist(r) for r in cand)
    near = [r for r in cand if dist(r) <= best + 1e-9]
    row = max(near, key=lambda r: r["speedup_vs_dense"])
    return row["speedup_vs_dense"], row


def layer_report(model: nn.Module, block, sparsity, csv_path, tokens: int = 2048, dtype="bf16",
                 op: str = "fwd", filter_fn=None, min_speedup: float = 1.0) -> list[dict]:
    """One dict per ``nn.Linear`` (or ``SparseLinear``) that ``filter_fn`` accepts:
    ``fqn, N, K, block_n, block_k, density, speedup, sparse`` (``sparse``: predicted
    speedup >= ``min_speedup``; unknown predictions keep the layer sparse).

    ``block`` / ``sparsity``: one value, or {fqn: value}, for layers still dense; a
    ``SparseLinear`` reports its own block and density.
    """
    from ..nn import SparseLinear

    bench = load_bench(csv_path)
    have = sorted({dtype_name(r.get("dtype")) for r in bench if r.get("op") == op})
    check(dtype_name(dtype) in have, "dtype", f"one the CSV has rows of for op {op!r}: {have}", repr(dtype))
    out = []
    for fqn, m in model.named_modules():
        if not isinstance(m, (nn.Linear, SparseLinear)) or (filter_fn is not None and not filter_fn(m, fqn)):
            continue
        if isinstance(m, SparseLinear):
            blk, density = m.block, m.density
        else:
            blk = normalize_block(block.get(fqn, None) if isinstance(block, dict) else block)
            density = 1.0 - float(sparsity.get(fqn) if isinstance(sparsity, dict) else sparsity)
        speedup, _ = predict_speedup(bench, m.out_features, m.in_features, tokens, density, blk, dtype, op)
        out.append({"fqn": fqn, "N": m.out_features, "K": m.in_features, "block_n": blk[0], "block_k": blk[1],
                    "density": density, "speedup": speedup,
                    "sparse": not (speedup < min_speedup)})  # NaN (unknown) keeps the layer sparse
    return out


def sparse_filter(rows: list[dict], filter_fn=None):
    """A ``filter_fn`` for ``sparsify`` that keeps dense the layers ``layer_report`` flags."""
    dense = {r["fqn"] for r in rows if not r["sparse"]}
    return lambda m, fqn: fqn not in dense and (filter_fn is None or filter_fn(m, fqn))
