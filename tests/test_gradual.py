"""Gradual pruning: cubic schedule values, mask updates, optimizer kept in sync."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import sparsecore as sc
from sparsecore.prune import GradualPruner, cubic_sparsity
from conftest import oracle, rel_err


def test_cubic_schedule_values():
    s = lambda t: cubic_sparsity(t, 0.1, 0.9, 10, 110)
    assert s(0) == 0.1 and s(10) == 0.1 and s(110) == 0.9 and s(500) == 0.9
    assert s(60) == pytest.approx(0.9 - 0.8 * 0.5 ** 3)
    assert s(35) == pytest.approx(0.9 - 0.8 * 0.75 ** 3)
    vals = [s(t) for t in range(0, 120)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))
    # cubic: most of the pruning happens early
    assert s(60) - s(10) > s(110) - s(60)


def make_model():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48))
    return nn.Sequential(*(sc.SparseLinear.from_dense(l, block=16, sparsity=0.0) if isinstance(l, nn.Linear) else l
                           for l in dense))


def test_masks_follow_schedule_and_optimizer_stays_in_sync():
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = GradualPruner(model, s0=0.0, s1=0.75, start=2, end=12, update_every=4, optimizer=opt)
    x, y = torch.randn(64, 32), torch.randn(64, 48)
    layers = [m for m in model if isinstance(m, sc.SparseLinear)]
    masks = [l.mask.clone() for l in layers]
    for step in range(16):
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        old = {id(l): (l.values, l.mask.clone(), {k: v.clone() for k, v in opt.state[l.values].items()})
               for l in layers}
        changed = pruner.step()
        due = step in (2, 6, 10, 12)  # start + k * update_every, and end
        assert changed == any(not torch.equal(l.mask, old[id(l)][1]) for l in layers)
        assert due or not changed
        for i, l in enumerate(layers):
            want = round((1 - pruner.target(step)) * l.mask.numel())
            if due:
                assert int(l.mask.sum()) == want
            assert bool((l.mask <= masks[i]).all())  # masks only shrink
            masks[i] = l.mask.clone()
            params = [p for g in opt.param_groups for p in g["params"]]
            assert any(p is l.values for p in params)
            values, mask, state = old[id(l)]
            if not torch.equal(mask, l.mask):
                assert not any(p is values for p in params)
                # Adam moments of surviving blocks moved with them
                idx = torch.full(mask.shape, -1, dtype=torch.long)
                idx[mask] = torch.arange(int(mask.sum()))
                src = idx[l.mask]
                for k in ("exp_avg", "exp_avg_sq"):
                    torch.testing.assert_close(opt.state[l.values][k], state[k][src], rtol=0, atol=0)
                torch.testing.assert_close(l.values, values[src], rtol=0, atol=0)
    assert pruner.sparsity == pytest.approx(0.75)
    # the pruned model still computes x @ W^T + b on its kept blocks (float64 oracle)
    l = layers[0]
    xin = torch.randn(8, 32)
    with torch.no_grad():
        assert rel_err(l(xin), oracle(xin, l.dense_weight(), l.bias)) < 1e-5
    assert (l.dense_weight()[~l.block_mask().to_dense()] == 0).all()


def test_never_regrows_after_one_shot_pruning():
    """Gradual pruning from s0=0 on an already 75%-sparse model keeps its mask until the
    schedule passes 75%, then only shrinks it (pruned blocks never come back as zeros)."""
    torch.manual_seed(0)
    model = sc.sparsify(nn.Sequential(nn.Linear(128, 128)), block=32, sparsity=0.75)
    first = model[0].mask.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pruner = GradualPruner(model, s0=0.0, s1=0.9, start=0, end=1000, update_every=100, optimizer=opt)
    assert not pruner.step() and torch.equal(model[0].mask, first)
    pruner.apply(0.9)
    assert model[0].values.shape[0] == 2 and not (model[0].mask & ~first).any()


def test_balanced_and_bad_arguments():
    model = make_model()
    pruner = GradualPruner(model, 0.0, 0.5, start=0, end=1, update_every=1, balanced=True, score="l1")
    pruner.step()
    pruner.step()
    for l in model:
        if isinstance(l, sc.SparseLinear):
            assert (l.mask.sum(1) == l.mask.shape[1] // 2).all()
    with pytest.raises(sc.SparseCoreError, match="s1"):
        GradualPruner(model, 0.5, 0.2, 0, 10)
    with pytest.raises(sc.SparseCoreError, match="end"):
        GradualPruner(model, 0.0, 0.5, 10, 10)
    with pytest.raises(sc.SparseCoreError, match="model"):
        GradualPruner(nn.Linear(4, 4), 0.0, 0.5, 0, 10)
    masks = [l.mask.clone() for l in model if isinstance(l, sc.SparseLinear)]
    with pytest.raises(sc.SparseCoreError, match="sparsity: expected a number in"):
        GradualPruner(model, 0.0, 0.5, 0, 10).apply(1.5)
    assert all(torch.equal(l.mask, m) for l, m in zip((l for l in model if isinstance(l, sc.SparseLinear)), masks))
    masks = [l.mask.clone() for l in model if isinstance(l, sc.SparseLinear)]
    partial = torch.optim.SGD([next(l.values for l in model if isinstance(l, sc.SparseLinear))], lr=0.1)
    pruner = GradualPruner(model, 0.0, 0.9, start=0, end=1, update_every=1, optimizer=partial)
    with pytest.raises(sc.SparseCoreError, match="optimizer: expected an optimizer holding every"):
        pruner.apply(0.9)
    assert all(torch.equal(l.mask, m) for l, m in zip((l for l in model if isinstance(l, sc.SparseLinear)), masks))
    with pytest.raises(sc.SparseCoreError, match="optimizer"):
        sc.prune.replace_in_optimizer(torch.optim.SGD([nn.Parameter(torch.ones(1))]), nn.Parameter(torch.ones(1)),
                                      nn.Parameter(torch.ones(1)), torch.ones(1, 1, dtype=torch.bool),
                                      torch.ones(1, 1, dtype=torch.bool))
