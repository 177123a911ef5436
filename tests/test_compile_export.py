"""torch.compile(fullgraph=True) and torch.export of models with SparseLinear (CPU, torch backend):
one graph, no breaks, outputs and gradients equal to eager. Few tests: compiling is slow on CI."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

import sparsecore as sc
from conftest import assert_close


def model(dtype=torch.float64):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 48, bias=False), nn.LayerNorm(48),
                      nn.Linear(48, 40))
    m = sc.sparsify(m.to(dtype), block=(16, 32), sparsity=0.5, backend="torch",
                    filter_fn=lambda mod, fqn: fqn in ("0", "2"))
    assert [type(l).__name__ for l in m] == ["SparseLinear", "GELU", "SparseLinear", "LayerNorm", "Linear"]
    return m


def x_input(batch=3, dtype=torch.float64, seed=1):
    return torch.randn(batch, 5, 64, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def grads(run, params, x):
    """Output and gradients of ``run(x)`` w.r.t. ``x`` and the parameters of module ``params``."""
    x = x.detach().clone().requires_grad_()
    y = run(x)
    (y * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
    out = {"y": y.detach(), "x": x.grad}
    out.update({n: p.grad.clone() for n, p in params.named_parameters()})
    params.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("train", [True, False])
def test_explain_one_graph_no_breaks(train):
    m = model().train(train)
    torch._dynamo.reset()
    with torch.set_grad_enabled(train):
        ex = torch._dynamo.explain(m)(x_input())
    assert ex.graph_count == 1 and ex.graph_break_count == 0, ex.break_reasons


def test_compile_inductor_training_matches_eager():
    """Forward + backward through Inductor (fullgraph); float64 so any difference is a bug."""
    m = model()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(m, fullgraph=True, backend="inductor")
    x = x_input()
    got, ref = grads(compiled, m, x), grads(m, m, x)
    assert not counters["graph_break"]
    assert got.keys() == ref.keys() and {"0.values", "2.values", "0.bias", "x"} <= got.keys()
    for k in ref:
        assert_close(got[k], ref[k], torch.float64)


def test_compile_inference_float32_and_new_batch():
    """Inference under no_grad, float32 against the float64 eager model; a second batch size
    recompiles (dynamic) without a break."""
    m32, m64 = model(torch.float32).eval(), model(torch.float64).eval()
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(m32, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for batch in (3, 7):
            x = x_input(batch)
            assert_close(compiled(x.float()), m64(x), torch.float32)
    assert not counters["graph_break"]


def test_export_inference_dynamic_batch_and_save_load(tmp_path):
    m = model().eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(m, (x_input(3),), dynamic_shapes=({0: batch},))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.sparsecore.bsr_linear.default) == 2
    path = tmp_path / "m.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    decomposed = ep.run_decompositions()  # the op is opaque: it survives decomposition
    assert sum(n.target == torch.ops.sparsecore.bsr_linear.default for n in decomposed.graph.nodes) == 2
    with torch.no_grad():
        for batch in (1, 9):
            x = x_input(batch)
            ref = m(x)
            for prog in (ep, loaded, decomposed):
                assert_close(prog.module()(x), ref, torch.float64)


def test_export_training_graph_backward_matches_eager():
    m = model().train()
    ep = torch.export.export(m, (x_input(),))
    ref = grads(m, m, x_input())
    trainable = ep.module()
    got = grads(trainable, trainable, x_input())
    assert got.keys() == ref.keys()
    for k in ref:
        assert_close(got[k], ref[k], torch.float64)
