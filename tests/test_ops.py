"""torch.ops.sparsecore.* through the torch (reference) backend vs the float64 oracle."""
import warnings

import pytest
import torch

import sparsecore as sc

from conftest import REL_TOL, assert_close, oracle, random_weight

CASES = [  # (M, N, K, block, density, empty_rows)
    (1, 64, 64, 32, 0.5, 0),
    (59, 100, 70, 32, 0.6, 1),
    (111, 130, 257, (16, 64), 0.3, 2),
    (7, 256, 128, 128, 1.0, 0),
    (33, 96, 96, 16, 0.0, 0),
    (300, 192, 320, 64, 0.25, 1),
]


@pytest.mark.parametrize("M,N,K,block,density,empty_rows", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_forward_matches_oracle(M, N, K, block, density, empty_rows, dtype):
    g = torch.Generator().manual_seed(M * 7 + N)
    w, m = random_weight(N, K, block, density, dtype, generator=g, empty_rows=empty_rows)
    W = sc.BlockSparseWeight.from_dense(w, m)
    x = torch.randn(M, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    for b, act in ((None, "none"), (bias, "gelu")):
        y = sc.ops.bsr_linear(x, W, bias=b, backend="torch", activation=act)
        assert y.dtype == dtype
        assert_close(y, oracle(x, W.to_dense(), b, act), dtype)


def test_leading_dims_and_noncontiguous():
    w, m = random_weight(96, 64, 32, 0.5)
    W = sc.BlockSparseWeight.from_dense(w, m)
    x = torch.randn(2, 3, 5, 64)
    y = sc.ops.bsr_linear(x, W)
    assert y.shape == (2, 3, 5, 96)
    assert_close(y, oracle(x.reshape(-1, 64), W.to_dense()).reshape(2, 3, 5, 96), torch.float32)
    xt = torch.randn(64, 9).T  # non-contiguous
    assert_close(sc.ops.bsr_linear(xt, W), oracle(xt, W.to_dense()), torch.float32)
    assert sc.ops.bsr_linear(torch.randn(0, 64), W).shape == (0, 96)


@pytest.mark.parametrize("act", ["none", "relu", "gelu", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_masked_dense(act, dtype):
    g = torch.Generator().manual_seed(3)
    w, m = random_weight(80, 72, (16, 32), 0.5, dtype, generator=g, empty_rows=1)
    W = sc.BlockSparseWeight.from_dense(w, m)
    x = torch.randn(2, 19, 72, generator=g).to(dtype).requires_grad_(True)
    bias = torch.randn(80, generator=g).to(dtype).requires_grad_(True)
    values = W.values.clone().requires_grad_(True)
    y = sc.ops.bsr_linear_tensors(x, values, W.meta, 80, bias, act, "torch")
    dy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(dy)
    # oracle: float64 autograd through the element-masked dense weight
    mask = m.to_dense().double()
    xd = x.detach().double().requires_grad_(True)
    wd = w.double().requires_grad_(True)
    bd = bias.detach().double().requires_grad_(True)
    yd = oracle(xd, wd * mask, bd, act)
    yd.backward(dy.double())
    assert_close(x.grad, xd.grad, dtype)
    assert_close(bias.grad, bd.grad, dtype)
    dV = sc.BlockSparseWeight(values.grad, W.shape, W.block, W.meta).to_dense()
    assert_close(dV, wd.grad * mask, dtype)


@pytest.mark.parametrize("device,backend", [
    ("cpu", "torch"),
    pytest.param("cuda", "triton", marks=pytest.mark.gpu),
    pytest.param("cuda", "cuda", marks=pytest.mark.gpu),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["none", "gelu"])
def test_autocast_like_f_linear(device, backend, dtype, act):
    """Under torch.autocast an fp32 layer runs in the autocast dtype, as F.linear does, and its
    fp32 tensors get fp32 gradients, with backward() inside the region too; float64 is left alone."""
    if backend == "cuda" and not sc.backends.module("cuda").available()[0]:
        pytest.skip(sc.backends.module("cuda").available()[1])
    g = torch.Generator().manual_seed(11)
    w, m = random_weight(96, 80, 32, 0.5, generator=g, empty_rows=1)
    W = sc.BlockSparseWeight.from_dense(w, m).to(device)
    x = torch.randn(3, 17, 80, generator=g).to(device).requires_grad_(True)
    bias = torch.randn(96, generator=g).to(device).requires_grad_(True)
    values = W.values.clone().requires_grad_(True)
    dy = torch.randn(3, 17, 96, generator=g).to(device, dtype)
    with torch.autocast(device, dtype=dtype):
        y = sc.ops.bsr_linear_tensors(x, values, W.meta, 96, bias, act, backend)
        y.backward(dy)
        y64 = sc.ops.bsr_linear_tensors(x.detach().double(), values.detach().double(), W.meta, 96, None, act, "torch")
    assert y.dtype == dtype and y64.dtype == torch.float64
    assert values.grad.dtype == x.grad.dtype == bias.grad.dtype == torch.float32
    # oracle: float64 autograd on the inputs rounded to the autocast dtype, as the kernels see them
    xd, wd, bd = (t.detach().to(dtype).double().requires_grad_(True) for t in (x, W.to_dense(), bias))
    yd = oracle(xd.reshape(-1, 80), wd, bd, act)
    yd.backward(dy.reshape(-1, 96).double())
    assert_close(y.reshape(-1, 96), yd, dtype)
    assert_close(x.grad, xd.grad.reshape(x.shape), dtype)
    assert_close(bias.grad, bd.grad, dtype)
    mask = m.to_dense().to(device)
    assert_close(sc.BlockSparseWeight(values.grad, W.shape, W.block, W.meta).to_dense(), wd.grad * mask, dtype)
    assert_close(y64, oracle(x.detach().reshape(-1, 80), W.to_dense(), None, act).reshape(y64.shape),
                 torch.float64)


def test_autocast_compile_fullgraph():
    torch._dynamo.reset()
    lin = sc.SparseLinear.from_dense(torch.nn.Linear(64, 96), block=32, sparsity=0.5)
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.compile(lin, fullgraph=True, backend="aot_eager")(x)
    assert y.dtype == torch.bfloat16
    ref = oracle(x.bfloat16(), lin.dense_weight().detach().bfloat16(), lin.bias.detach().bfloat16())
    assert_close(y, ref, torch.bfloat16)


def test_torch_func_transforms():
    """vmap works; torch.func's autodiff transforms raise (jvp would pass a zero tangent)."""
    w, m = random_weight(48, 40, 16, 0.5)
    W = sc.BlockSparseWeight.from_dense(w, m)
    x = torch.randn(4, 3, 40)
    f = lambda t: sc.ops.bsr_linear(t, W)  # noqa: E731
    assert_close(torch.func.vmap(f)(x), oracle(x.reshape(-1, 40), W.to_dense()).reshape(4, 3, 48), torch.float32)
    for transform in (lambda: torch.func.jvp(f, (x[0],), (x[1],)), lambda: torch.func.jacfwd(f)(x[0]),
                      lambda: torch.func.jacrev(f)(x[0]), lambda: torch.func.grad(lambda t: f(t).sum())(x[0])):
        with pytest.raises(sc.SparseCoreError, match="torch.func's (Jvp|Grad) transform"):
            transform()


def test_vmap_rules_match_the_oracle():
    """vmap over x folds the batch into M (one call, no per-sample fallback warning); per-sample
    weights, a batched bias and batched gradients (autograd.grad's is_grads_batched) match too."""
    g = torch.Generator().manual_seed(11)
    w, m = random_weight(48, 40, 16, 0.5, torch.float64, generator=g)
    W = sc.BlockSparseWeight.from_dense(w, m)
    wd = W.to_dense()
    x = torch.randn(3, 5, 40, dtype=torch.float64, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback warns "There is a performance drop ..."
        y = torch.func.vmap(lambda t: sc.ops.bsr_linear(t, W), in_dims=1)(x)
    assert_close(y, oracle(x.transpose(0, 1).reshape(-1, 40), wd).reshape(5, 3, 48), torch.float64)
    xg, vg = x.clone().requires_grad_(True), W.values.clone().requires_grad_(True)
    torch.func.vmap(lambda t: sc.ops.bsr_linear_tensors(t, vg, W.meta, 48))(xg).pow(2).sum().backward()
    wg = sc.BlockSparseWeight(W.values.clone().requires_grad_(True), W.shape, W.block, W.meta)
    xo = x.clone().requires_grad_(True)
    (xo @ wg.to_dense().T).pow(2).sum().backward()  # autograd through the vmapped op, against dense
    assert_close(xg.grad, xo.grad, torch.float64)
    assert_close(vg.grad, wg.values.grad, torch.float64)
    # per-sample values and bias: the per-sample path
    vs = W.values * torch.rand(4, 1, 1, 1, dtype=torch.float64, generator=g)
    bs = torch.randn(4, 48, dtype=torch.float64, generator=g)
    ys = torch.func.vmap(lambda v, b: sc.ops.bsr_linear_tensors(x[0], v, W.meta, 48, b, "gelu"))(vs, bs)
    for i in range(4):
        wi = sc.BlockSparseWeight(vs[i], W.shape, W.block, W.meta).to_dense()
        assert_close(ys[i], oracle(x[0], wi, bs[i], "gelu"), torch.float64)
    # batched cotangents through backward: grad_input folds, grad_weight runs per sample
    xr = x[0].clone().requires_grad_(True)
    v = W.values.clone().requires_grad_(True)
    out = sc.ops.bsr_linear_tensors(xr, v, W.meta, 48)
    cot = torch.randn(2, *out.shape, dtype=torch.float64, generator=g)
    dx, dv = torch.autograd.grad(out, (xr, v), cot, is_grads_batched=True)
    for i in range(2):
        assert_close(dx[i], cot[i] @ wd, torch.float64)
        dw = cot[i].T @ x[0]
        assert_close(sc.BlockSparseWeight(dv[i], W.shape, W.block, W.meta).to_dense(),
                     sc.BlockSparseWeight.from_dense(dw, W.block_mask()).to_dense(), torch.float64)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    w, m = random_weight(40, 36, 16, 0.5, torch.float64, generator=g)
    W = sc.BlockSparseWeight.from_dense(w, m)
    x = torch.randn(5, 36, dtype=torch.float64, generator=g, requires_grad=True)
    v = W.values.clone().requires_grad_(True)
    b = torch.randn(40, dtype=torch.float64, generator=g, requires_grad=True)
    for act in ("none", "silu"):
        fn = lambda x, v, b: sc.ops.bsr_linear_tensors(x, v, W.meta, 40, b, act, "torch")
        assert torch.autograd.gradcheck(fn, (x, v, b))


def _op_args(dtype=torch.float32, bias=True):
    g = torch.Generator().manual_seed(9)
    w, m = random_weight(48, 40, 16, 0.5, dtype, generator=g)
    W = sc.BlockSparseWeight.from_dense(w, m)
    x = torch.randn(6, 40, dtype=dtype, generator=g, requires_grad=True)
    v = W.values.clone().requires_grad_(True)
    b = torch.randn(48, dtype=dtype, generator=g, requires_grad=True) if bias else None
    meta = W.meta
    return W, (x, v, meta["row_ptr"], meta["col_idx"], meta["block_row"], meta["col_ptr"], meta["row_idx"],
               meta["t_perm"], meta["row_order"], 48, b, "none", "torch")


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    W, args = _op_args(bias=bias)
    torch.library.opcheck(torch.ops.sparsecore.bsr_linear.default, args)
    x, v = args[0], args[1]
    dy = torch.randn(6, 48)
    torch.library.opcheck(torch.ops.sparsecore.bsr_linear_grad_input.default,
                          (dy, v.detach(), W.col_ptr, W.row_idx, W.t_perm, 40, "torch"))
    torch.library.opcheck(torch.ops.sparsecore.bsr_linear_grad_weight.default,
                          (dy, x.detach(), W.block_row, W.col_idx, 16, 16, "torch"))


def test_compile_fullgraph_no_graph_break():
    torch._dynamo.reset()
    lin = sc.SparseLinear.from_dense(torch.nn.Linear(64, 96), block=32, sparsity=0.5)
    x = torch.randn(4, 7, 64, requires_grad=True)
    compiled = torch.compile(lin, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    assert_close(y, oracle(x.reshape(-1, 64), lin.dense_weight().detach(), lin.bias.detach()).reshape(4, 7, 96),
                 torch.float32)
    gx = x.grad.clone()
    x.grad = None
    lin(x).sum().backward()
    assert torch.allclose(gx, x.grad, rtol=REL_TOL[torch.float32], atol=1e-6)


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    W, args = _op_args()
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(13, 40)
        y = torch.ops.sparsecore.bsr_linear(x, *args[1:])
    assert y.shape == (13, 48)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_dense_path_on_cpu(dtype):
    """At high density and many rows the CPU path scatters W to dense: same results."""
    from sparsecore.backends import reference

    g = torch.Generator().manual_seed(11)
    w, m = random_weight(100, 70, 32, 0.9, dtype, generator=g, empty_rows=1)
    W = sc.BlockSparseWeight.from_dense(w, m)
    x = torch.randn(512, 70, generator=g).to(dtype)
    assert reference._dense_is_faster(x, W.density)
    b = torch.randn(100, generator=g).to(dtype)
    assert_close(sc.ops.bsr_linear(x, W, bias=b, backend="torch"), oracle(x, W.to_dense(), b), dtype)
    dy = torch.randn(512, 100, generator=g).to(dtype)
    dx = torch.ops.sparsecore.bsr_linear_grad_input(dy, W.values, W.col_ptr, W.row_idx, W.t_perm, 70, "torch")
    assert_close(dx, dy.double() @ W.to_dense().double(), dtype)
