"""Refit the kept blocks of a pruned layer to its dense output on calibration inputs.

With ``A = [X | 1]`` the calibration inputs ``[T, K+1]`` and ``G = A^T A`` (``LayerStats.gram``),
each output row ``i`` in block-row ``r`` keeps only the columns ``S_r`` of the blocks kept in
that block-row (plus the bias column when the layer has a bias). Its new weights solve::

    min_w  || A_S w - A [W_i, b_i]^T ||^2 + lam ||w_weights||^2
    (G_SS + lam I') w = G_S: [W_i, b_i]^T              lam = damp * mean(diag(X^T X))

by a Cholesky factorization of ``G_SS + lam I'`` (float64), shared by the BN rows of the
block-row; block-rows keeping equally many columns are solved as one batch::

        W [N, K]                 block-row r keeps column blocks {0, 2}
        +----+----+----+         S_r = cols of blocks 0 and 2 (+ bias column)
    r   |keep|    |keep|  --->   rows of r: [BN, |S_r|] = solve(G[S_r, S_r] + lam, G[S_r, :] @ W_aug[rows].T)
        +----+----+----+

``I'`` is the identity without the bias entry (the bias is not damped). The bias is refit
along with the weights, which absorbs the mean shift that pruning causes.

With ``cross = A^T A_d`` (``LayerStats.cross``: ``A_d`` the same tokens' inputs in the dense
model) the target becomes the dense model's own output, ``A_d [W_i, b_i]^T``, and the
right-hand side ``cross_S: [W_i, b_i]^T``: the layer also corrects the error that earlier
pruned layers left in its input.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import check
from ..format import BlockMask

_CHUNK_ELEMS = 1 << 25  # float64 elements of the batched Gram blocks solved at once


def _augmented(w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    b = bias if bias is not None else w.new_zeros(w.shape[0])
    return torch.cat([w.double(), b.double()[:, None]], 1)  # [N, K+1]


def refit(w: torch.Tensor, bias: torch.Tensor | None, mask: BlockMask, gram: torch.Tensor, damp: float = 0.01,
          cross: torch.Tensor | None = None):
    """Least-squares refit of the kept blocks (module docstring). Returns ``(w_new, bias_new)``:
    ``w_new [N, K]`` in ``w``'s dtype with zeros outside ``mask``; ``bias_new`` or None."""
    N, K = w.shape
    check(tuple(gram.shape) == (K + 1, K + 1), "gram", f"shape {(K + 1, K + 1)} ([X | 1]^T [X | 1])",
          f"shape {tuple(gram.shape)}")
    check(isinstance(damp, (int, float)) and damp > 0, "damp", "a positive number", repr(damp))
    check(mask.shape == (N, K), "mask", f"a BlockMask for shape {(N, K)}", f"one for shape {mask.shape}")
    check(cross is None or cross.shape == gram.shape, "cross", f"None or shape {tuple(gram.shape)}",
          tuple(getattr(cross, "shape", ())))
    G = gram.double().to(w.device)
    Cx = G if cross is None else cross.double().to(w.device)
    W = _augmented(w, bias).to(G.device)                       # [N, K+1]
    lam = damp * float(G.diagonal()[:K].mean().clamp_min(1e-12))
    bn, bk = mask.block
    R = mask.mask.shape[0]
    keep = mask.mask.to(G.device).repeat_interleave(bk, 1)[:, :K]       # [R, K] element columns kept
    if bias is not None:
        keep = torch.cat([keep, keep.new_ones(R, 1)], 1)               # the bias column, always kept
    Wr = F.pad(W, (0, 0, 0, R * bn - N)).reshape(R, bn, K + 1)          # [R, BN, K+1]
    out = torch.zeros_like(Wr)
    counts = keep.sum(1)
    for s in counts.unique().tolist():
        if s == 0:
            continue
        rs_all = (counts == s).nonzero().squeeze(1)
        # block-rows with the same number of kept columns are solved as one batch, in chunks
        step = max(1, _CHUNK_ELEMS // (s * s))
        for i in range(0, rs_all.numel(), step):
            rs = rs_all[i:i + step]
            cols = keep[rs].nonzero()[:, 1].reshape(rs.numel(), s)       # [g, s] ascending, bias last
            Gs = G[cols[:, :, None], cols[:, None, :]]                   # [g, s, s]
            Gs.diagonal(dim1=-2, dim2=-1)[:, : s - (bias is not None)] += lam
            rhs = Cx[cols] @ Wr[rs].transpose(1, 2)                      # [g, s, BN]
            out[rs[:, None], :, cols] = _solve_spd(Gs, rhs)
    out = out.reshape(R * bn, K + 1)[:N]
    w_new = out[:, :K].to(w.dtype)
    return w_new, (out[:, K].to(bias.dtype) if bias is not None else None)


def _solve_spd(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched Cholesky solve of ``A [g, s, s] x = b [g, s, m]``; adds damping until ``A`` is
    positive definite in float64."""
    extra = 0.0
    scale = float(A.diagonal(dim1=-2, dim2=-1).abs().mean().clamp_min(1e-12))
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(A + extra * eye)
        if not bool(info.any()):
            return torch.cholesky_solve(b, L)
        extra = scale * 1e-6 if extra == 0.0 else extra * 100
    raise torch.linalg.LinAlgError("refit: calibration Gram matrix is not positive definite even with damping")


def output_error(w_new, bias_new, w, bias, gram) -> float:
    """Relative squared output error on the calibration tokens, from the Gram matrix alone:
    ``||A (Wn - W)^T||^2 / ||A W^T||^2`` with ``A = [X | 1]`` (both weights augmented by bias)."""
    G = gram.double()
    D = _augmented(w_new, bias_new).to(G.device) - _augmented(w, bias).to(G.device)
    Wd = _augmented(w, bias).to(G.device)
    return float(((D @ G) * D).sum() / ((Wd @ G) * Wd).sum().clamp_min(1e-300))
