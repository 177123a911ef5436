"""One-shot pruners (magnitude, wanda), allocation, per-layer blocks, skips, speedup report."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import sparsecore as sc
from sparsecore.format import grid_shape
from sparsecore.prune import calibrate


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(48, 80), nn.ReLU(), nn.Linear(80, 64), nn.ReLU(), nn.Linear(64, 40))


def calib(n=4, seed=1, k=48):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(32, k, generator=g) * torch.linspace(0.1, 3.0, k) for _ in range(n)]


def sparse_layers(model):
    return {fqn: m for fqn, m in model.named_modules() if isinstance(m, sc.SparseLinear)}


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_exact_sparsity_blocks_balance(method, balanced, sparsity):
    model = mlp()
    sc.sparsify(model, block=16, sparsity=sparsity, method=method, calibration=calib(), balanced=balanced)
    layers = sparse_layers(model)
    assert len(layers) == 3
    for lin in layers.values():
        R, C = grid_shape((lin.out_features, lin.in_features), (16, 16))
        assert lin.block == (16, 16) and tuple(lin.mask.shape) == (R, C)
        if balanced:
            assert (lin.mask.sum(1) == round((1 - sparsity) * C)).all()
        else:
            assert int(lin.mask.sum()) == round((1 - sparsity) * R * C)


def test_wanda_mask_matches_float64_scores():
    """Wanda's mask = top blocks of sum W^2 ||x_j||^2, computed independently in float64."""
    torch.manual_seed(3)
    lin = nn.Linear(64, 48)
    xs = calib(3, k=64)
    model = nn.Sequential(lin)
    w = lin.weight.detach().double().clone()
    sq = sum((x.double() ** 2).sum(0) for x in xs)
    imp = (w * w * sq).reshape(3, 16, 4, 16).sum((1, 3))
    keep = round(0.5 * imp.numel())
    expected = torch.zeros(12, dtype=torch.bool)
    expected[torch.sort(imp.reshape(-1), descending=True, stable=True).indices[:keep]] = True
    sc.sparsify(model, block=16, sparsity=0.5, method="wanda", calibration=xs)
    assert torch.equal(model[0].mask.reshape(-1), expected)
    # and it differs from plain magnitude here (inputs are strongly scaled per feature)
    assert not torch.equal(sc.prune.block_mask(w.float(), 16, 0.5).mask.reshape(-1), expected)


def test_skipped_layer_is_untouched():
    model = mlp()
    before = model[2].weight.detach().clone()
    sc.sparsify(model, block=16, sparsity=0.7, method="wanda", calibration=calib(), reconstruct=True,
                filter_fn=lambda m, fqn: fqn != "2")
    assert type(model[2]) is nn.Linear and torch.equal(model[2].weight, before)
    assert set(sparse_layers(model)) == {"0", "4"}


def test_layer_block_and_explicit_allocation():
    model = mlp()
    sc.sparsify(model, block=16, sparsity=0.5, method="magnitude", layer_block={"2": (32, 16)},
                allocation={"4": 0.75})
    layers = sparse_layers(model)
    assert layers["2"].block == (32, 16) and layers["0"].block == (16, 16)
    R, C = layers["4"].mask.shape
    assert int(layers["4"].mask.sum()) == round(0.25 * R * C)
    model = mlp()
    sc.sparsify(model, block=16, sparsity=0.5, layer_block=lambda m, fqn: (16, 32) if m.in_features == 64 else None)
    assert sparse_layers(model)["4"].block == (16, 32) and sparse_layers(model)["2"].block == (16, 16)


@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_global_allocation_total_and_spread(method):
    model = mlp()
    with torch.no_grad():
        model[2].weight.mul_(50.0)  # one layer's scores dominate in absolute terms...
    sc.sparsify(model, block=16, sparsity=0.6, method=method, calibration=calib(), allocation="global")
    layers = sparse_layers(model)
    # 40% of the weights (the last layer's 40 rows pad its last block-row of 16x16 blocks to 8 rows)
    kept = sum(int(sc.prune.block_areas((m.out_features, m.in_features), m.block)[m.mask].sum())
               for m in layers.values())
    total = sum(m.out_features * m.in_features for m in layers.values())
    assert abs(kept - 0.4 * total) <= 16 * 16 / 2
    # ...but scores are normalised per layer, so no layer is wiped out or left dense by scale
    assert all(0.0 < m.density < 1.0 for m in layers.values())


def test_global_allocation_prefers_concentrated_layer():
    flat = torch.ones(4, 4)
    peaked = torch.ones(4, 4)
    peaked[0] = 100.0  # 4 blocks far above this layer's mean
    s = sc.prune.global_allocation({"a": flat, "b": peaked}, {"a": 256, "b": 256}, 0.75)
    # 8 of 32 blocks kept: all 4 peaked blocks of b, then the tied ones of a win by layer order
    assert s == {"a": 0.75, "b": 0.75}
    s = sc.prune.global_allocation({"a": flat, "b": peaked}, {"a": 256, "b": 256}, 0.875)
    assert s == {"a": 1.0, "b": 0.75}


def test_global_allocation_counts_real_weights_not_padding():
    """A layer padded to large blocks weighs what it holds: 10x96 in one 128x128 block is 960
    weights, not 16384 (which alone would exceed a 50% budget of the rest)."""
    areas = sc.prune.block_areas((10, 96), (128, 128))
    assert areas.tolist() == [[960]]
    big = sc.prune.block_areas((70, 100), (32, 64))
    assert big.tolist() == [[2048, 1152], [2048, 1152], [384, 216]] and int(big.sum()) == 7000
    a = torch.ones(4, 4)
    a[0, :2] = 10.0  # two blocks of a rank above the head's one, the rest below it
    scores = {"a": a, "head": torch.ones(1, 1)}
    # 25% of 16384 + 960 weights: a's top two blocks, the head's 960, one more of a (1024)
    assert sc.prune.global_allocation(scores, {"a": 1024, "head": areas}, 0.75) == {"a": 1 - 3 / 16, "head": 0.0}
    # counted as 16384 padded weights, the head would not fit (and end the list)
    assert sc.prune.global_allocation(scores, {"a": 1024, "head": 16384}, 0.75) == {"a": 1 - 2 / 16, "head": 1.0}


def test_calibration_skips_padded_tokens():
    class Tok(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x, attention_mask):
            return self.lin(x)

    model = Tok()
    x = torch.randn(2, 5, 8)
    am = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    x[am == 0] = 1e6  # padding garbage
    c = calibrate.collect(model, {"lin": model.lin}, [{"x": x, "attention_mask": am}], gram=True)
    kept = x[am != 0].double()
    st = c.stats["lin"]
    assert st.tokens == 7
    torch.testing.assert_close(st.sq_norm, (kept ** 2).sum(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st.hessian, kept.T @ kept, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(st.gram[-1, :-1], kept.sum(0), rtol=1e-6, atol=1e-6)


def test_bad_arguments():
    with pytest.raises(sc.SparseCoreError, match="calibration"):
        sc.sparsify(mlp(), block=16, sparsity=0.5, method="wanda")
    with pytest.raises(sc.SparseCoreError, match="method"):
        sc.sparsify(mlp(), block=16, sparsity=0.5, method="obs")
    with pytest.raises(sc.SparseCoreError, match="allocation"):
        sc.sparsify(mlp(), block=16, sparsity=0.5, allocation="sometimes")
    with pytest.raises(sc.SparseCoreError, match="allocation"):
        sc.sparsify(mlp(), block=16, sparsity=0.5, allocation={"nope": 0.5})
    with pytest.raises(sc.SparseCoreError, match="calibration"):
        sc.sparsify(mlp(), block=16, sparsity=0.5, method="wanda", calibration=[])
    with pytest.raises(sc.SparseCoreError, match="calibration"):
        sc.sparsify(mlp(), block=16, sparsity=0.5, method="wanda", calibration=torch.randn(4, 48))
    with pytest.raises(sc.SparseCoreError, match="sparsty: expected a keyword of sparsify or of"):
        sc.sparsify(mlp(), block=16, sparsty=0.9)
    for s in (1.25, -0.5, math.nan):
        with pytest.raises(sc.SparseCoreError, match="sparsity"):
            sc.prune.select_blocks(torch.rand(4, 4), s)
    # nothing selected: a warning and no change, whatever the allocation
    model = mlp()
    for allocation in ("uniform", "global"):
        assert sc.sparsify(model, block=16, sparsity=0.5, allocation=allocation, filter_fn=lambda m, f: False) is model
    assert not sparse_layers(model)


def test_float64_weights_scored_in_float64():
    """Magnitudes float32 cannot hold apart (squares underflow to 0) still pick the larger block."""
    w = torch.ones(64, 64, dtype=torch.float64)
    w[:32] *= 1e-30
    w[32:] *= 2e-30
    assert sc.prune.block_mask(w, 32, 0.5).mask.any(1).tolist() == [False, True]


class KeywordCall(nn.Module):
    """A model that calls its Linear layers by keyword (``lin(input=x)``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(48, 64), nn.Linear(64, 32)

    def forward(self, x):
        return self.b(input=torch.relu(self.a(input=x)))


@pytest.mark.parametrize("kwargs", [{"method": "wanda"}, {"reconstruct": True}])
def test_calibration_sees_keyword_inputs(kwargs):
    torch.manual_seed(0)
    model = KeywordCall()
    sc.sparsify(model, block=16, sparsity=0.5, calibration=calib(), **kwargs)
    assert set(sparse_layers(model)) == {"a", "b"}


def test_plan_restores_weights_on_error():
    class Boom(nn.Module):  # fails on its 4th call: in the last stage's pass, after two layers were pruned
        calls = 0

        def forward(self, x):
            Boom.calls += 1
            if Boom.calls > 3:
                raise RuntimeError("boom")
            return x

    m = mlp()
    model = nn.Sequential(*m[:4], Boom(), m[4])
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        sc.sparsify(model, block=16, sparsity=0.5, method="wanda", calibration=calib(3), reconstruct=True)
    assert Boom.calls == 4
    assert all(type(l) is nn.Linear for l in (model[0], model[2], model[5]))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_speedup_report_and_dense_fallback(tmp_path):
    cols = "gpu,torch,triton,cuda,commit,op,provider,dtype,M,N,K,block_n,block_k,density,ms_p50,ms_p20,ms_p80,tflops,speedup_vs_dense,pct_of_ideal,eff_vs_oracle"
    rows = [("sparsecore-triton", 64, 0.5, 0.8), ("sparsecore-triton", 64, 0.25, 2.1),
            ("sparsecore-cuda", 64, 0.5, 1.3), ("dense", 64, 0.5, 5.0), ("sparsecore-triton", 16, 0.5, 0.4)]
    lines = [cols] + [f"H100,2.11,3.6,13.0,abc,fwd,{p},bfloat16,2048,4096,4096,{b},{b},{d},1,1,1,1,{s},1,1"
                      for p, b, d, s in rows]
    path = tmp_path / "bench.csv"
    path.write_text("\n".join(lines) + "\n")
    bench = sc.prune.report.load_bench(path)
    assert all(r["provider"].startswith("sparsecore") for r in bench)  # "dense" rows are not predictions
    sp, row = sc.prune.predict_speedup(bench, 4096, 4096, 2048, 0.5, 64)
    assert sp == 1.3 and row["provider"] == "sparsecore-cuda"  # best provider at the nearest point
    assert sc.prune.predict_speedup(bench, 3000, 5000, 1024, 0.3, 64)[0] == 2.1
    assert sc.prune.predict_speedup(bench, 4096, 4096, 2048, 0.5, 16)[0] == 0.4
    assert math.isnan(sc.prune.predict_speedup(bench, 4096, 4096, 2048, 0.5, 64, dtype="float16")[0])

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    rep = sc.prune.layer_report(model, block={"0": 16, "1": 64}, sparsity=0.5, csv_path=path)
    assert [(r["fqn"], r["speedup"], r["sparse"]) for r in rep] == [("0", 0.4, False), ("1", 1.3, True)]
    sc.sparsify(model, block=64, sparsity=0.5, filter_fn=sc.prune.sparse_filter(rep))
    assert type(model[0]) is nn.Linear and isinstance(model[1], sc.SparseLinear)
    with pytest.raises(sc.SparseCoreError, match="csv_path"):
        sc.prune.report.load_bench(tmp_path / "missing.csv")
    # a dtype (or op) the CSV has no rows of would predict nothing for every layer: refused
    with pytest.raises(sc.SparseCoreError, match="dtype: expected one the CSV has rows of for op 'fwd': \\['bf16'\\]"):
        sc.prune.layer_report(model, block=64, sparsity=0.5, csv_path=path, dtype="fp32")


def test_sensitivity_allocation_budget_and_order():
    from sparsecore.prune.oneshot import sensitivity_allocation

    grid = [0.2, 0.4, 0.6, 0.8]
    errors = {"robust": [(g, 0.1 * g ** 2) for g in grid], "fragile": [(g, 2.0 * g ** 2) for g in grid],
              "mid": [(g, 0.5 * g ** 2) for g in grid]}
    sizes = {"robust": 300, "fragile": 100, "mid": 200}
    s = sensitivity_allocation(errors, sizes, 0.6)
    assert sum(sizes[f] * s[f] for f in s) == pytest.approx(0.6 * 600)
    assert s["robust"] > s["mid"] > s["fragile"]
    assert all(0.2 <= v <= 0.8 for v in s.values())
    with pytest.raises(sc.SparseCoreError, match="allocation"):
        sensitivity_allocation(errors, sizes, 0.9)  # grid tops out at 0.8


def test_sensitivity_allocation_in_plan():
    model = mlp()
    xs = calib()
    sc.sparsify(model, block=16, sparsity=0.5, method="wanda", calibration=xs, reconstruct=True,
                allocation="sensitivity")
    layers = sparse_layers(model)
    kept = sum(m.values.numel() for m in layers.values())
    total = sum(m.out_features * m.in_features for m in layers.values())
    # fractional per-layer targets are rounded to whole blocks: within one block per layer
    assert abs(kept - 0.5 * total) <= len(layers) * 16 * 16
    assert len({round(m.density, 3) for m in layers.values()}) > 1
    with pytest.raises(sc.SparseCoreError, match="allocation"):
        sc.sparsify(mlp(), block=16, sparsity=0.5, allocation="sensitivity")
