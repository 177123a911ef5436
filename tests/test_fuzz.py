"""Property-based fuzzing (hypothesis) of every public op against the float64 masked-dense
oracle, bad inputs that must raise SparseCoreError, and safety: NaN/Inf propagation, empty
layers, concurrent calls.

Shapes are drawn as a block grid (1..4 block-rows/columns, every block side 16..128,
rectangular) with ragged edges, so padding, empty block-rows/columns, density 0 and 1 all
occur. ``SPARSECORE_FUZZ_EXAMPLES=n`` raises the example count (and randomizes the seed);
by default CI runs a fixed, derandomized set of a few hundred cases.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

import sparsecore as sc
from conftest import REL_TOL, TF32_TOL, assert_close, oracle, rel_err

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_EXAMPLES = os.environ.get("SPARSECORE_FUZZ_EXAMPLES")


def fuzz(n: int, shrink: bool = True):
    """``n`` examples in CI (fixed seed), ``$SPARSECORE_FUZZ_EXAMPLES`` when set (random)."""
    phases = (Phase.explicit, Phase.generate) + ((Phase.shrink,) if shrink else ())
    return settings(max_examples=int(_EXAMPLES) if _EXAMPLES else n, derandomize=_EXAMPLES is None,
                    deadline=None, database=None, print_blob=True, phases=phases,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


SIDES = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
ACTS = ("none", "relu", "gelu", "silu")


@st.composite
def problems(draw, dtypes=DTYPES, max_grid=4, max_m=9, sides=SIDES):
    """A random block-sparse linear problem (dense w, its block mask, x, bias, layout)."""
    bn, bk = draw(st.sampled_from(sides)), draw(st.sampled_from(sides))
    R, C = draw(st.integers(1, max_grid)), draw(st.integers(1, max_grid))
    N = (R - 1) * bn + draw(st.integers(1, bn))
    K = (C - 1) * bk + draw(st.integers(1, bk))
    lead = tuple(draw(st.lists(st.integers(0, 3), max_size=2)))
    if not lead or draw(st.booleans()):
        lead = lead + (draw(st.integers(1, max_m)),)
    return {
        "block": (bn, bk), "N": N, "K": K, "lead": lead,
        "density": draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]) | st.floats(0, 1)),
        "dtype": draw(st.sampled_from(dtypes)), "bias": draw(st.booleans()),
        "layout": draw(st.sampled_from(["contiguous", "transposed", "strided", "sliced"])),
        "activation": draw(st.sampled_from(ACTS)), "seed": draw(st.integers(0, 2**31 - 1)),
    }


def materialize(p, device="cpu"):
    """Tensors of a problem: w (dense, layer dtype), bool element mask, BlockSparseWeight, x, bias.

    Drawn on the CPU (same numbers everywhere), then moved; ``x`` gets its layout on ``device``.
    """
    g = torch.Generator().manual_seed(p["seed"])
    dt, (bn, bk), N, K = p["dtype"], p["block"], p["N"], p["K"]
    grid = sc.format.grid_shape((N, K), (bn, bk))
    block_mask = sc.BlockMask(torch.rand(grid, generator=g) < p["density"], (bn, bk), (N, K))
    w = torch.randn(N, K, generator=g).to(dt)
    W = sc.BlockSparseWeight.from_dense(w, block_mask).to(device)
    shape = (*p["lead"], K)
    M = 1
    for s in p["lead"]:
        M *= s
    layout = p["layout"]
    if layout == "transposed":     # [K, M] storage read as [M, K]: column-major x
        x = torch.randn(K, M, generator=g).to(dt).to(device).t().reshape(shape)
    elif layout == "strided":      # every other column of a wider tensor
        x = torch.randn(*p["lead"], 2 * K, generator=g).to(dt).to(device)[..., ::2]
    elif layout == "sliced":       # a column window of a wider tensor
        x = torch.randn(*p["lead"], K + 5, generator=g).to(dt).to(device)[..., 3:K + 3]
    else:
        x = torch.randn(shape, generator=g).to(dt).to(device)
    bias = torch.randn(N, generator=g).to(dt).to(device) if p["bias"] else None
    return w.to(device), block_mask.to_dense().to(device), W, x, bias


def tol(dtype, backend):
    """fp32 kernels of the triton/cuda backends may use tf32 products."""
    return TF32_TOL if (backend in ("triton", "cuda") and dtype == torch.float32) else REL_TOL[dtype]


def close(out, ref, dtype, tol):
    """conftest.assert_close, plus empty tensors (M = 0) compared by shape."""
    if ref.numel() == 0:
        assert out.shape == ref.shape
    else:
        assert_close(out, ref, dtype, tol)


def raw_forward(x2, W, bias, act, backend):
    m = W.meta
    return torch.ops.sparsecore.bsr_linear(x2, W.values, m["row_ptr"], m["col_idx"], m["block_row"], m["col_ptr"],
                                           m["row_idx"], m["t_perm"], m["row_order"], W.shape[0], bias, act,
                                           backend)


def kept_blocks(full, block_mask, block):
    """Independent gather of the kept ``(BN, BK)`` blocks of ``full [N, K]`` in row-major order."""
    bn, bk = block
    R, C = block_mask.shape
    padded = full.new_zeros(R * bn, C * bk)
    padded[: full.shape[0], : full.shape[1]] = full
    return torch.stack([padded[r * bn:(r + 1) * bn, c * bk:(c + 1) * bk] for r, c in block_mask.nonzero().tolist()]) \
        if block_mask.any() else full.new_zeros(0, bn, bk)


def check_ops(p, backend, device="cpu"):
    w, emask, W, x, bias = materialize(p, device)
    wm = w.double() * emask
    dt, act = p["dtype"], p["activation"]
    t = tol(dt, backend)
    x2 = x.reshape(-1, p["K"])
    ref = oracle(x2, wm, bias, act)
    # friendly wrapper, leading dims kept
    y = sc.ops.bsr_linear(x, W, bias=bias, backend=backend, activation=act)
    assert y.dtype == dt and y.shape == (*p["lead"], p["N"])
    close(y.reshape(-1, p["N"]), ref, dt, t)
    # the raw op on the flattened (possibly non-contiguous) 2-D x
    close(raw_forward(x2, W, bias, act, backend), ref, dt, t)
    # gradient ops against float64
    g = torch.Generator().manual_seed(p["seed"] + 1)
    dy = torch.randn(x2.shape[0], p["N"], generator=g).to(dt).to(device)
    dx = torch.ops.sparsecore.bsr_linear_grad_input(dy, W.values, W.col_ptr, W.row_idx, W.t_perm, p["K"], backend)
    assert dx.dtype == dt
    close(dx, dy.double() @ wm, dt, t)
    dv = torch.ops.sparsecore.bsr_linear_grad_weight(dy, x2, W.block_row, W.col_idx, *p["block"], backend)
    assert dv.dtype == dt
    close(dv, kept_blocks(dy.double().T @ x2.double(), W.block_mask().mask, p["block"]), dt, t)


def check_module(p, backend, device="cpu"):
    """SparseLinear forward + backward (x, values, bias) against float64 autograd on the masked weight."""
    w, emask, W, x, bias = materialize(p, device)
    dt = p["dtype"]
    t = tol(dt, backend)
    lin = sc.SparseLinear(p["K"], p["N"], bias is not None, block=p["block"], mask=W.block_mask(), backend=backend,
                          dtype=dt, device=device)
    with torch.no_grad():
        lin.values.copy_(W.values)
        if bias is not None:
            lin.bias.copy_(bias)
    xg = x.detach().requires_grad_()
    y = lin(xg)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(p["seed"] + 2)).to(dt).to(device)
    y.backward(dy)
    x64 = x.detach().double().requires_grad_()
    w64 = (w.double() * emask).requires_grad_()
    b64 = bias.double().requires_grad_() if bias is not None else None
    y64 = F.linear(x64, w64, b64)
    y64.backward(dy.double())
    close(y, y64.detach(), dt, t)
    close(xg.grad, x64.grad, dt, t)
    assert lin.values.grad.shape == lin.values.shape
    close(lin.values.grad, kept_blocks(w64.grad, lin.mask, p["block"]), dt, t)
    if bias is not None:
        close(lin.bias.grad, b64.grad, dt, t)


@fuzz(120)
@given(problems())
def test_fuzz_ops_torch(p):
    check_ops(p, "torch")


@fuzz(100)
@given(problems())
def test_fuzz_sparse_linear_torch(p):
    check_module(p, "torch")


def _triton_ready():
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    from sparsecore import backends
    return backends.module("triton").available()[0]


TINY = problems(dtypes=(torch.float32, torch.float16, torch.bfloat16), max_grid=2, max_m=5, sides=(16, 32, 64))


@pytest.mark.skipif(not _triton_ready(), reason="needs TRITON_INTERPRET=1 and an available triton backend")
@fuzz(25)
@given(TINY)
def test_fuzz_ops_triton_interpreter(p):
    check_ops(p, "triton")


@pytest.mark.skipif(not _triton_ready(), reason="needs TRITON_INTERPRET=1 and an available triton backend")
@fuzz(15)
@given(TINY)
def test_fuzz_sparse_linear_triton_interpreter(p):
    check_module(p, "triton")


def check_gpu_backend(backend, p):
    """The GPU kernels (forced backend) on CUDA tensors against the float64 oracle."""
    mod = sc.backends.module(backend)
    ok, why = mod.available()
    if not ok:
        pytest.skip(f"{backend} backend unavailable: {why}")
    probe = torch.empty(1, p["K"], dtype=p["dtype"], device="cuda")
    hypothesis.assume(mod.supports(probe, torch.empty(0, *p["block"], dtype=p["dtype"], device="cuda")))
    check_ops(p, backend, "cuda")
    check_module(p, backend, "cuda")


GPU_PROBLEMS = problems(dtypes=(torch.float32, torch.float16, torch.bfloat16))


# Each example JIT-compiles ~3 new Triton kernels (~0.4 s each; 60 examples were ~170
# kernels, past bench/device.sh's budget for the GPU tests); the CUDA kernels are prebuilt.
@pytest.mark.gpu
@fuzz(20)
@given(p=GPU_PROBLEMS)
def test_fuzz_gpu_triton(p):
    check_gpu_backend("triton", p)


@pytest.mark.gpu
@fuzz(60)
@given(p=GPU_PROBLEMS)
def test_fuzz_gpu_cuda(p):
    check_gpu_backend("cuda", p)


# -- bad inputs: SparseCoreError, never another exception, a hang or a result -------------------
def _valid():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(72, 100, generator=g)
    mask = torch.rand(3, 4, generator=g) < 0.6
    mask[0, 0] = mask[2, 3] = True
    W = sc.BlockSparseWeight.from_dense(w, mask, (32, 32))
    return w, W, torch.randn(5, 100, generator=g), torch.randn(72, generator=g)


def _bad_public(kind, v, data):
    """One call of the public API that is invalid by construction; ``v`` a random int."""
    w, W, x, b = _valid()
    lin = sc.SparseLinear(100, 72, block=32, mask=W.block_mask())
    other_k = data.draw(st.integers(1, 300).filter(lambda k: k != 100))
    other_n = data.draw(st.integers(1, 300).filter(lambda n: n != 72))
    bad_dtype = data.draw(st.sampled_from([torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64,
                                           torch.bool, torch.complex64]))
    word = data.draw(st.text(max_size=6).filter(lambda s: s not in sc.backends.CHOICES + sc.backends.ACTIVATIONS))
    calls = {
        "x-last-dim": lambda: sc.ops.bsr_linear(torch.randn(3, other_k), W),
        "x-dtype": lambda: sc.ops.bsr_linear(x.to(bad_dtype), W),
        "x-not-tensor": lambda: sc.ops.bsr_linear(x.tolist(), W),
        "x-0d": lambda: sc.ops.bsr_linear(torch.tensor(1.0), W),
        "W-not-bsw": lambda: sc.ops.bsr_linear(x, w),
        "bias-shape": lambda: sc.ops.bsr_linear(x, W, bias=torch.randn(other_n)),
        "bias-dtype": lambda: sc.ops.bsr_linear(x, W, bias=b.to(bad_dtype)),
        "activation": lambda: sc.ops.bsr_linear(x, W, activation=word),
        "backend": lambda: sc.ops.bsr_linear(x, W, backend=word),
        "module-in": lambda: lin(torch.randn(2, other_k)),
        "module-dtype": lambda: lin(x.to(bad_dtype)),
        "module-0d": lambda: lin(torch.tensor(1.0)),
        "module-features": lambda: sc.SparseLinear(-v, 72),
        "module-block": lambda: sc.SparseLinear(100, 72, block=v if v not in SIDES else 3),
        "module-mask": lambda: sc.SparseLinear(100, 72, block=32, mask=torch.ones(3, 5, dtype=torch.bool)),
        "mask-dtype": lambda: sc.BlockMask(torch.ones(3, 4), 32, (72, 100)),
        "from-dense-nan": lambda: sc.BlockSparseWeight.from_dense(
            w.index_fill(1, torch.tensor([v % 100]), float("nan")), W.block_mask()),
        "from-dense-shape": lambda: sc.BlockSparseWeight.from_dense(torch.randn(72, other_k), W.block_mask()),
        "prune-sparsity": lambda: sc.prune.block_mask(w, 32, 1.0 + v / 7 if v else -0.5),
        "prune-block": lambda: sc.prune.block_mask(w, v if v not in SIDES else 3, 0.5),
    }
    return calls[kind]


def _bad_metadata(kind, v):
    """A BlockSparseWeight whose metadata is corrupted (validated construction must refuse it)."""
    _, W, _, _ = _valid()
    meta = {k: t.clone() for k, t in W.meta.items()}
    name = kind.split("-", 1)[1]
    t = meta[name]
    i = v % t.numel()
    t[i] = t[i] + 1 + v % 5 if name != "row_ptr" or i else 1 + v % 5
    return lambda: sc.BlockSparseWeight(W.values, W.shape, W.block, meta)


def _bad_raw(kind, v):
    """A direct ``torch.ops.sparsecore`` call with inconsistent tensors."""
    _, W, x, b = _valid()
    m = {k: t.clone() for k, t in W.meta.items()}
    vals, n, dy = W.values, 72, torch.randn(5, 72)
    op = torch.ops.sparsecore
    fwd = lambda x=x, vals=vals, n=n, m=m: op.bsr_linear(x, vals, m["row_ptr"], m["col_idx"], m["block_row"],  # noqa
                                                         m["col_ptr"], m["row_idx"], m["t_perm"], m["row_order"], n,
                                                         None, "none", "torch")
    calls = {
        "raw-out-features": lambda: fwd(n=[-v, 0, 97 + v, 40][v % 4]),
        "raw-x-narrow": lambda: fwd(x=torch.randn(5, 1 + v % 60)),
        "raw-col_idx-range": lambda: fwd(m={**m, "col_idx": m["col_idx"] + 4 + v % 3}),
        "raw-block_row-range": lambda: fwd(m={**m, "block_row": m["block_row"] + 3 + v % 3}),
        "raw-meta-dtype": lambda: fwd(m={**m, "col_idx": m["col_idx"].long()}),
        "raw-meta-length": lambda: fwd(m={**m, "col_idx": m["col_idx"][:-1]}),
        "raw-values-nnzb": lambda: fwd(vals=vals[:-1]),
        "raw-grad-input-dy": lambda: op.bsr_linear_grad_input(torch.randn(5, 1 + v % 64), vals, m["col_ptr"],
                                                              m["row_idx"], m["t_perm"], 100, "torch"),
        "raw-grad-input-dtype": lambda: op.bsr_linear_grad_input(dy.double(), vals, m["col_ptr"], m["row_idx"],
                                                                 m["t_perm"], 100, "torch"),
        "raw-grad-weight-rows": lambda: op.bsr_linear_grad_weight(dy, torch.randn(5 + 1 + v % 4, 100), m["block_row"],
                                                                  m["col_idx"], 32, 32, "torch"),
        "raw-grad-weight-block": lambda: op.bsr_linear_grad_weight(dy, x, m["block_row"], m["col_idx"], 24, 32,
                                                                   "torch"),
    }
    return calls[kind]


PUBLIC = ["x-last-dim", "x-dtype", "x-not-tensor", "x-0d", "W-not-bsw", "bias-shape", "bias-dtype", "activation",
          "backend", "module-in", "module-dtype", "module-0d", "module-features", "module-block", "module-mask",
          "mask-dtype", "from-dense-nan", "from-dense-shape", "prune-sparsity", "prune-block"]
METADATA = ["meta-" + f for f in sc.format.META_FIELDS]
RAW = ["raw-out-features", "raw-x-narrow", "raw-col_idx-range", "raw-block_row-range", "raw-meta-dtype",
       "raw-meta-length", "raw-values-nnzb", "raw-grad-input-dy", "raw-grad-input-dtype", "raw-grad-weight-rows",
       "raw-grad-weight-block"]
@pytest.mark.parametrize("kind", PUBLIC + METADATA + RAW)
@fuzz(6, shrink=False)  # no shrinking: the expected-failure cases would shrink for minutes
@given(v=st.integers(0, 1000), data=st.data())
def test_fuzz_bad_inputs_raise_sparsecore_error(kind, v, data):
    if kind in PUBLIC:
        call = _bad_public(kind, v, data)
    elif kind in METADATA:
        call = _bad_metadata(kind, v)
    else:
        call = _bad_raw(kind, v)
    with pytest.raises(sc.SparseCoreError):
        call()


# -- safety --------------------------------------------------------------------------------------
def _nonfinite_case(seed, dtype, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    N, K, block = 90, 130, (32, 32)
    grid = sc.format.grid_shape((N, K), block)
    mask = torch.rand(grid, generator=g) < 0.5
    mask[:, 1] = True            # a block-column kept in every (non-empty) block-row
    if empty_row:
        mask[0] = False          # an empty block-row: its outputs never see x
    bm = sc.BlockMask(mask, block, (N, K))
    w = torch.randn(N, K, generator=g).to(dtype)
    x = torch.randn(6, K, generator=g).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    return w, bm, x, bias


def _poison(x, cols, seed):
    g = torch.Generator().manual_seed(seed)
    x = x.clone()
    rows = torch.randint(0, x.shape[0], (len(cols),), generator=g)
    vals = torch.tensor([float("nan"), float("inf"), -float("inf")])[torch.randint(0, 3, (len(cols),), generator=g)]
    x[rows, torch.tensor(cols)] = vals.to(x.dtype)
    return x


def _kept_dense_reference(x, w, bm, bias):
    """float64: each block-row's outputs from F.linear over only the columns its kept blocks cover."""
    bn, bk = bm.block
    y = bias.double().expand(x.shape[0], -1).clone()
    for r in range(bm.mask.shape[0]):
        rows = slice(r * bn, min((r + 1) * bn, w.shape[0]))
        cols = torch.cat([torch.arange(c * bk, min((c + 1) * bk, w.shape[1])) for c in bm.mask[r].nonzero().flatten()]
                         ) if bm.mask[r].any() else torch.zeros(0, dtype=torch.long)
        y[:, rows] += F.linear(x.double()[:, cols], w.double()[rows][:, cols])
    return y


def _same_pattern(out, ref):
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isinf(), ref.isinf())
    assert torch.equal(out[out.isinf()].sign(), ref[ref.isinf()].sign())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nan_inf_in_x_reach_exactly_the_kept_outputs(dtype, seed):
    w, bm, x, bias = _nonfinite_case(seed, dtype)
    W = sc.BlockSparseWeight.from_dense(w, bm)
    xp = _poison(x, torch.randint(0, 130, (5,), generator=torch.Generator().manual_seed(seed)).tolist(), seed)
    out = sc.ops.bsr_linear(xp, W, bias=bias, backend="torch")
    ref = _kept_dense_reference(xp, w, bm, bias)
    _same_pattern(out, ref)
    finite = torch.isfinite(ref)
    assert rel_err(out[finite], ref[finite]) <= REL_TOL[dtype]
    assert torch.isfinite(out[:, :32]).all()  # the empty block-row only has the bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nan_inf_in_fully_kept_columns_match_masked_dense_f_linear(dtype):
    """Where the poisoned columns are kept in every block-row, sparse == masked-dense F.linear."""
    w, bm, x, bias = _nonfinite_case(3, dtype, empty_row=False)
    xp = _poison(x, [32, 40, 63, 50], 3)   # block-column 1 (cols 32..63) is fully kept
    out = sc.ops.bsr_linear(xp, sc.BlockSparseWeight.from_dense(w, bm), bias=bias, backend="torch")
    ref = F.linear(xp.double(), w.double() * bm.to_dense(), bias.double())
    _same_pattern(out, ref)


def test_nan_in_values_propagate_to_their_block_row():
    w, bm, x, bias = _nonfinite_case(4, torch.float32)
    lin = sc.SparseLinear(130, 90, block=32, mask=bm)
    with torch.no_grad():
        lin.values.copy_(sc.BlockSparseWeight.from_dense(w, bm).values)
        lin.bias.copy_(bias)
        r, c = bm.mask.nonzero()[0].tolist()
        lin.values[0, 0, 0] = float("nan")   # first kept block, row r*32 of the weight
    out = lin(x)
    ref = F.linear(x.double(), lin.dense_weight().double(), bias.double())
    _same_pattern(out, ref)
    assert out[:, r * 32].isnan().all() and out.isnan().sum() == x.shape[0]


@pytest.mark.parametrize("bias", [True, False])
def test_empty_layer_outputs_bias_and_trains(bias):
    lin = sc.SparseLinear(70, 50, bias=bias, block=(16, 32), mask=torch.zeros(4, 3, dtype=torch.bool))
    assert lin.values.shape == (0, 16, 32) and lin.density == 0
    x = torch.randn(2, 3, 70, requires_grad=True)
    y = lin(x)
    expect = lin.bias.detach().expand(2, 3, 50) if bias else torch.zeros(2, 3, 50)
    assert torch.equal(y, expect)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert lin.values.grad.shape == (0, 16, 32)
    if bias:
        assert_close(lin.bias.grad, dy.double().sum((0, 1)), torch.float32)
    assert torch.equal(lin.dense_weight(), torch.zeros(50, 70))


def test_concurrent_forward_and_backward_from_threads():
    """No shared mutable state (metadata is built once per layer): threads get the sequential results."""
    torch.manual_seed(0)
    model = sc.sparsify(torch.nn.Sequential(torch.nn.Linear(96, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)),
                        block=(32, 16), sparsity=0.6, backend="torch")
    xs = [torch.randn(3 + i % 4, 96, generator=torch.Generator().manual_seed(i)) for i in range(32)]

    def run(x):
        x = x.clone().requires_grad_()
        y = model(x)
        (dx,) = torch.autograd.grad(y.square().sum(), x)
        return y.detach(), dx

    expected = [run(x) for x in xs]
    barrier = threading.Barrier(8)

    def start(i):
        if i < 8:
            barrier.wait()  # line all threads up before the first call
        return run(xs[i])

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(start, range(len(xs))))
    for (y, dx), (ye, dxe) in zip(got, expected):
        assert torch.equal(y, ye) and torch.equal(dx, dxe)
