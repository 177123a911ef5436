"""Least-squares refit of kept blocks: checked against float64 computations on the raw inputs."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sparsecore as sc
from sparsecore.prune import calibrate
from conftest import oracle, rel_err


def correlated_inputs(t, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k // 2, k, generator=g)  # features correlated as real activations are
    return torch.randn(t, k // 2, generator=g) @ mix + 0.1 * torch.randn(t, k, generator=g) + 0.3


def gram_of(x):
    a = torch.cat([x.double(), torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    return a.T @ a


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,block", [((64, 96), (16, 32)), ((50, 70), (16, 16))])
def test_refit_lowers_output_error(bias, shape, block):
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0], bias=bias)
    x = correlated_inputs(512, shape[1])
    w, b = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
    mask = sc.prune.block_mask(w, block, 0.6)
    w_new, b_new = sc.prune.refit(w, b, mask, gram_of(x), damp=1e-6)
    dense = oracle(x, w, b)
    masked_err = rel_err(oracle(x, w * mask.to_dense(), b), dense)
    refit_err = rel_err(oracle(x, w_new, b_new), dense)
    assert (w_new[~mask.to_dense()] == 0).all()
    assert refit_err < 0.85 * masked_err, (refit_err, masked_err)
    # the Gram-only error estimate agrees with the direct float64 one
    est = sc.prune.output_error(w_new, b_new, w, b, gram_of(x))
    assert abs(est ** 0.5 - refit_err) < 1e-6


def test_refit_is_the_least_squares_solution():
    """Per output row: the kept-column weights (and bias) equal float64 lstsq on the raw inputs."""
    torch.manual_seed(1)
    lin = nn.Linear(48, 32)
    x = correlated_inputs(400, 48, seed=2).double()
    w, b = lin.weight.detach().double(), lin.bias.detach().double()
    mask = sc.prune.block_mask(w, 16, 0.5)
    w_new, b_new = sc.prune.refit(w, b, mask, gram_of(x), damp=1e-10)
    y = x @ w.T + b
    em = mask.to_dense()
    for i in range(32):
        cols = em[i].nonzero().squeeze(1)
        a = torch.cat([x[:, cols], torch.ones(400, 1, dtype=torch.float64)], 1)
        sol = torch.linalg.lstsq(a, y[:, i:i + 1]).solution.squeeze(1)
        torch.testing.assert_close(w_new[i, cols], sol[:-1], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(b_new[i], sol[-1], rtol=1e-6, atol=1e-7)


def test_refit_empty_block_row_keeps_mean_output():
    lin = nn.Linear(32, 32)
    x = correlated_inputs(256, 32)
    w, b = lin.weight.detach(), lin.bias.detach()
    m = torch.tensor([[False, False], [True, True]])
    mask = sc.BlockMask(m, 16, (32, 32))
    w_new, b_new = sc.prune.refit(w, b, mask, gram_of(x))
    assert (w_new[:16] == 0).all()
    torch.testing.assert_close(b_new[:16].double(), (x.double() @ w[:16].double().T + b[:16].double()).mean(0),
                               rtol=1e-5, atol=1e-5)


def test_sequential_reconstruction_beats_masking_end_to_end():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 96), nn.GELU(), nn.Linear(96, 64), nn.GELU(), nn.Linear(64, 32))
    xs = [correlated_inputs(128, 48, seed=s) for s in range(4)]
    x = torch.cat(xs)
    with torch.no_grad():
        ref = model.double()(x.double())
    model.float()
    errs = {}
    for rec in (False, True):
        m = sc.sparsify(copy.deepcopy(model), block=16, sparsity=0.6, method="wanda", calibration=xs, reconstruct=rec)
        with torch.no_grad():
            errs[rec] = rel_err(m(x), ref)
    assert errs[True] < 0.85 * errs[False], errs


def test_stages_group_layers_fed_the_same_input():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

        def forward(self, x):
            q, k, v = self.q(x), self.k(x), self.v(x)
            return self.o(torch.softmax(q @ k.transpose(-1, -2), -1) @ v)

    model = Attn()
    layers = {n: getattr(model, n) for n in "qkvo"}
    c = calibrate.collect(model, layers, [torch.randn(2, 5, 16)])
    assert calibrate.stages(c) == [["q", "k", "v"], ["o"]]
    # a stage pass stops once its layers ran: "o" never runs
    ran = []
    model.o.register_forward_hook(lambda *a: ran.append(1))
    c = calibrate.collect(model, {n: layers[n] for n in "qkv"}, [torch.randn(2, 5, 16)], stop_early=True)
    assert c.stats["v"].tokens == 10 and not ran
    calibrate.collect(model, {n: layers[n] for n in "qkv"}, [torch.randn(2, 5, 16)])
    assert ran


def test_refit_to_dense_target_uses_cross_gram():
    """With cross = A^T A_d the refit fits the dense layer's output on *its* inputs (lstsq check)."""
    torch.manual_seed(2)
    w, b = torch.randn(16, 32, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    x_dense = correlated_inputs(300, 32, seed=3).double()
    x_pruned = x_dense + 0.2 * torch.randn_like(x_dense)  # what earlier pruned layers hand over
    a_s = torch.cat([x_pruned, torch.ones(300, 1, dtype=torch.float64)], 1)
    a_d = torch.cat([x_dense, torch.ones(300, 1, dtype=torch.float64)], 1)
    mask = sc.prune.block_mask(w, 16, 0.5)
    w_new, b_new = sc.prune.refit(w, b, mask, a_s.T @ a_s, damp=1e-10, cross=a_s.T @ a_d)
    y = x_dense @ w.T + b
    for i in range(16):
        cols = mask.to_dense()[i].nonzero().squeeze(1)
        sol = torch.linalg.lstsq(torch.cat([a_s[:, cols], a_s[:, -1:]], 1), y[:, i:i + 1]).solution.squeeze(1)
        torch.testing.assert_close(torch.cat([w_new[i, cols], b_new[i:i + 1]]), sol, rtol=1e-6, atol=1e-7)
    dense_target = rel_err(x_pruned @ w_new.T + b_new, y)
    w_l, b_l = sc.prune.refit(w, b, mask, a_s.T @ a_s, damp=1e-10)
    assert dense_target < rel_err(x_pruned @ w_l.T + b_l, y)
