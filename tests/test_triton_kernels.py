"""Triton kernels against the float64 oracle.

Without a GPU the kernels run in Triton's CPU interpreter. Triton fixes interpreter mode
when it is first imported, so this module imports it (and the kernels) with
``TRITON_INTERPRET=1`` set, then restores the variable for the rest of the session; an
autouse fixture sets it again around each test (the backend's ``available()`` reads it).
If triton was already imported in compiled mode by something collected earlier, the tests
here skip and one test reruns this file in a subprocess instead. With a GPU the same tests
run on CUDA tensors, plus the ``gpu``-marked realistic shapes at the end.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import sparsecore as sc
from conftest import REL_TOL, TF32_TOL, assert_close, oracle, random_weight
from sparsecore.kernels import triton_unusable

if triton_unusable():
    pytest.skip(triton_unusable(), allow_module_level=True)
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
_saved = os.environ.get("TRITON_INTERPRET")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
try:
    from sparsecore.backends import triton as tb
    from sparsecore.kernels import bsr_decode, bsr_dw, bsr_dx, bsr_fwd, configs
finally:
    if _saved is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _saved

import triton.language as tl  # noqa: E402  (after the import above, on purpose)

# triton.language's own helpers (tl.cdiv, ...) are interpreted only if triton itself was
# first imported in interpreter mode, not just our kernels
INTERPRETED = all(type(f).__name__ == "InterpretedFunction" for f in (tl.cdiv, bsr_fwd.bsr_fwd_kernel))
RUNNABLE = ON_GPU or INTERPRETED
needs_kernels = pytest.mark.skipif(not RUNNABLE, reason="triton was imported in compiled mode before this "
                                   "module: covered by test_rerun_in_interpreter_subprocess")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKS = ((16, 16), (32, 32), (64, 64), (128, 128), (16, 64), (64, 16), (32, 128))
ODD_M = (1, 3, 17, 59)
ACTS = ("none", "relu", "gelu", "silu")


@pytest.fixture(autouse=True)
def _interpret_env(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def tol(dtype):
    return TF32_TOL if (ON_GPU and dtype == torch.float32) else REL_TOL[dtype]


def make(block, dtype, density=0.6, n_blocks=2, k_blocks=3, empty_rows=1, seed=0):
    """A weight whose N and K are not multiples of the block, first block-row empty; at
    least one kept block (the last row's first) unless density is 0."""
    bn, bk = block
    g = torch.Generator().manual_seed(seed)
    w, mask = random_weight(n_blocks * bn - 3, k_blocks * bk - 5, block, density, dtype, generator=g,
                            empty_rows=empty_rows)
    if density > 0:
        m = mask.mask.clone()
        m[-1, 0] = True
        mask = sc.BlockMask(m, mask.block, mask.shape)
    W = sc.BlockSparseWeight.from_dense(w, mask).to(DEVICE)
    return W, g


def rand(g, *shape, dtype):
    return torch.randn(*shape, generator=g).to(dtype=dtype, device=DEVICE)


def kept(dense, W):
    """Blocks of a dense [N, K] tensor at W's kept positions, in W's BSR order (float64)."""
    return sc.BlockSparseWeight.from_dense(dense.double(), W.block_mask()).values


def cases():
    """Every dtype x block, cycling through odd M, activations and bias on/off."""
    out = []
    for i, (dtype, block) in enumerate((d, b) for d in DTYPES for b in BLOCKS):
        out.append(pytest.param(dtype, block, ODD_M[i % 4], ACTS[i % 4], i % 3 != 0,
                                id=f"{str(dtype)[6:]}-{block[0]}x{block[1]}"))
    return out


# -- kernels, called directly ------------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("dtype,block,M,act,with_bias", cases())
def test_fwd_kernel(dtype, block, M, act, with_bias):
    W, g = make(block, dtype)
    N, K = W.shape
    b = rand(g, N, dtype=dtype) if with_bias else None
    for rows in (M, M + 64):  # BM = 64 and BM = 128 configs
        x = rand(g, rows, K, dtype=dtype)
        cfg = configs.select("fwd", dtype, block, rows, N, K, x.device)
        y = bsr_fwd.bsr_fwd(x, W.values, W.row_ptr, W.col_idx, W.row_order, N, b, act, config=cfg)
        assert_close(y, oracle(x, W.to_dense(), b, act), dtype, tol(dtype))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block", [(64, 64), (32, 128), (128, 16)])
def test_fwd_tma_variant(dtype, block):
    """TMA descriptors when the rows are 16-byte aligned; the pointer kernel otherwise."""
    bn, bk = block
    g = torch.Generator().manual_seed(2)
    w, mask = random_weight(2 * bn - 3, 3 * bk - 8, block, 0.6, dtype, generator=g, empty_rows=1)
    W = sc.BlockSparseWeight.from_dense(w, mask).to(DEVICE)
    N, K = W.shape
    b = rand(g, N, dtype=dtype)
    cfg = {"BM": 64, "G": 1, "GROUP_M": 8, "num_warps": 4, "num_stages": 3, "TMA": True}
    launched = []
    spy = lambda k: launched.append(k.__name__) or k  # noqa: E731
    for x, kernel in ((rand(g, 70, K, dtype=dtype), "bsr_fwd_tma_kernel"),
                      (rand(g, 70, K + 1, dtype=dtype)[:, 1:], "bsr_fwd_kernel")):  # misaligned rows
        y = bsr_fwd.bsr_fwd(x, W.values, W.row_ptr, W.col_idx, W.row_order, N, b, "relu", config=cfg, wrap=spy)
        assert launched[-1] == kernel
        assert_close(y, oracle(x, W.to_dense(), b, "relu"), dtype, tol(dtype))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block,G", [((64, 64), 1), ((128, 32), 2), ((64, 16), 4)])
def test_fwd_swap_variant(dtype, block, G):
    """SWAP (the tile computed transposed, block rows as the MMA's M): odd M over two tiles,
    N and K off the block, an empty block-row, G blocks per K-step, bias + gelu."""
    bn, bk = block
    g = torch.Generator().manual_seed(3)
    w, mask = random_weight(3 * bn - 5, 5 * bk - 3, block, 0.6, dtype, generator=g, empty_rows=1)
    W = sc.BlockSparseWeight.from_dense(w, mask).to(DEVICE)
    N, K = W.shape
    x, b = rand(g, 83, K, dtype=dtype), rand(g, N, dtype=dtype)
    cfg = {"BM": 64, "G": G, "GROUP_M": 8, "num_warps": 4, "num_stages": 3, "SWAP": True}
    y = bsr_fwd.bsr_fwd(x, W.values, W.row_ptr, W.col_idx, W.row_order, N, b, "gelu", config=cfg)
    assert_close(y, oracle(x, W.to_dense(), b, "gelu"), dtype, tol(dtype))


@needs_kernels
@pytest.mark.parametrize("dtype,block,M,act,with_bias", cases())
def test_decode_kernel(dtype, block, M, act, with_bias):
    W, g = make(block, dtype)
    N, K = W.shape
    x, b = rand(g, M, K, dtype=dtype), (rand(g, N, dtype=dtype) if with_bias else None)
    cfg = configs.select("decode", dtype, block, M, N, K, x.device)
    ref = oracle(x, W.to_dense(), b, act)
    for programs in (1, 5, 1000):  # one program for all blocks, chunks crossing rows, one per block
        y = bsr_decode.bsr_decode(x, W.values, W.row_ptr, W.col_idx, W.block_row, N, b, act, config=cfg,
                                  programs=programs)
        assert_close(y, ref, dtype, tol(dtype))


@needs_kernels
def test_decode_empty_rows_between_chunk_boundaries():
    """Empty block-rows whose position in the kept list falls inside a chunk, at any split."""
    dtype, block = torch.float32, (16, 16)
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0] * 5, [1, 0, 1, 1, 1], [0] * 5, [0] * 5, [1, 1, 1, 0, 1]], dtype=torch.bool)
    w = torch.randn(6 * 16 - 2, 5 * 16 - 7, generator=g)
    W = sc.BlockSparseWeight.from_dense(w, sc.BlockMask(mask, block, tuple(w.shape))).to(DEVICE)
    N, K = W.shape
    x, b = rand(g, 3, K, dtype=dtype), rand(g, N, dtype=dtype)
    ref = oracle(x, W.to_dense(), b, "silu")
    cfg = dict(configs.select("decode", dtype, block, 3, N, K, x.device), G=2)
    for programs in (1, 2, 3, 5, 7, 100):
        y = bsr_decode.bsr_decode(x, W.values, W.row_ptr, W.col_idx, W.block_row, N, b, "silu", config=cfg,
                                  programs=programs)
        assert_close(y, ref, dtype, tol(dtype))


@needs_kernels
@pytest.mark.parametrize("dtype,block,M,act,with_bias", cases())
def test_dx_kernel(dtype, block, M, act, with_bias):
    W, g = make(block, dtype)
    N, K = W.shape
    dy = rand(g, M, N, dtype=dtype)
    cfg = configs.select("dx", dtype, block, M, N, K, dy.device)
    dx = bsr_dx.bsr_dx(dy, W.values, W.col_ptr, W.row_idx, W.t_perm, K, config=cfg)
    assert_close(dx, dy.double() @ W.to_dense().double(), dtype, tol(dtype))


@needs_kernels
@pytest.mark.parametrize("dtype,block,M,act,with_bias", cases())
def test_dw_kernel(dtype, block, M, act, with_bias):
    W, g = make(block, dtype)
    N, K = W.shape
    M = M + 70  # several M steps of the reduction
    dy, x = rand(g, M, N, dtype=dtype), rand(g, M, K, dtype=dtype)
    cfg = configs.select("dw", dtype, block, M, N, K, dy.device)
    ref = kept(dy.double().T @ x.double(), W)
    for programs in (1, 1000):  # one program per block; M split into workspace slices
        dv = bsr_dw.bsr_dw(dy, x, W.block_row, W.col_idx, block, config=cfg, programs=programs)
        assert dv.dtype == dtype
        assert_close(dv, ref, dtype, tol(dtype))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_raster_groups_with_partial_last_group(dtype):
    """7 M tiles in groups of 2 (last group of 1) x 3 block-rows / 4 block-columns."""
    block = (16, 32)
    W, g = make(block, dtype, n_blocks=3, k_blocks=4)
    N, K = W.shape
    cfg = {"BM": 16, "G": 2, "GROUP_M": 2, "num_warps": 4, "num_stages": 2}
    x, dy = rand(g, 100, K, dtype=dtype), rand(g, 100, N, dtype=dtype)
    y = bsr_fwd.bsr_fwd(x, W.values, W.row_ptr, W.col_idx, W.row_order, N, config=cfg)
    assert_close(y, oracle(x, W.to_dense()), dtype, tol(dtype))
    dx = bsr_dx.bsr_dx(dy, W.values, W.col_ptr, W.row_idx, W.t_perm, K, config=cfg)
    assert_close(dx, dy.double() @ W.to_dense().double(), dtype, tol(dtype))


@needs_kernels
@pytest.mark.parametrize("density", [0.0, 1.0])
@pytest.mark.parametrize("M", [5, 70])  # decode and prefill paths
def test_density_edges_through_backend(density, M):
    dtype, block = torch.float16, (32, 16)
    W, g = make(block, dtype, density=density, empty_rows=0)
    N, K = W.shape
    x, b, dy = rand(g, M, K, dtype=dtype), rand(g, N, dtype=dtype), rand(g, M, N, dtype=dtype)
    y = tb.forward(x, W.values, W.row_ptr, W.col_idx, W.block_row, W.row_order, N, b, "relu")
    assert_close(y, oracle(x, W.to_dense(), b, "relu"), dtype)
    dx = tb.grad_input(dy, W.values, W.col_ptr, W.row_idx, W.t_perm, K)
    dv = tb.grad_weight(dy, x, W.block_row, W.col_idx, block)
    assert dv.shape == (W.nnzb, *block)
    if density == 0.0:
        assert float(dx.abs().max()) == 0.0
    else:
        assert_close(dx, dy.double() @ W.to_dense().double(), dtype)
        assert_close(dv, kept(dy.double().T @ x.double(), W), dtype)


# -- the backend and the public op -------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("M", [3, 130])
@pytest.mark.parametrize("dtype", DTYPES)
def test_backend_functions(dtype, M):
    block = (64, 32)
    W, g = make(block, dtype)
    N, K = W.shape
    x, b, dy = rand(g, M, K, dtype=dtype), rand(g, N, dtype=dtype), rand(g, M, N, dtype=dtype)
    y = tb.forward(x, W.values, W.row_ptr, W.col_idx, W.block_row, W.row_order, N, b, "silu")
    assert_close(y, oracle(x, W.to_dense(), b, "silu"), dtype, tol(dtype))
    dx = tb.grad_input(dy, W.values, W.col_ptr, W.row_idx, W.t_perm, K)
    assert_close(dx, dy.double() @ W.to_dense().double(), dtype, tol(dtype))
    dv = tb.grad_weight(dy, x, W.block_row, W.col_idx, block)
    assert_close(dv, kept(dy.double().T @ x.double(), W), dtype, tol(dtype))


@needs_kernels
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype,block,lead", [(torch.float32, (16, 32), (2, 3)), (torch.bfloat16, (32, 16), (67,))])
def test_public_op_autograd(dtype, block, lead, act):
    W, g = make(block, dtype)
    N, K = W.shape
    x = rand(g, *lead, K, dtype=dtype).requires_grad_()
    b = rand(g, N, dtype=dtype).requires_grad_()
    values = W.values.detach().clone().requires_grad_()
    Wt = sc.BlockSparseWeight(values, W.shape, W.block, W.meta, validate=False)
    y = sc.ops.bsr_linear(x, Wt, b, backend="triton", activation=act)
    xd, bd = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    wd = W.to_dense().double().requires_grad_()
    ref = oracle(xd, wd, bd, act)
    gy = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(DEVICE)
    y.backward(gy.to(dtype))
    ref.backward(gy)
    t = tol(dtype)
    assert_close(y, ref, dtype, t)
    assert_close(x.grad, xd.grad, dtype, t)
    assert_close(b.grad, bd.grad, dtype, t)
    assert_close(values.grad, kept(wd.grad, W), dtype, t)


@needs_kernels
@pytest.mark.parametrize("M", [3, 130])  # decode and prefill kernels
def test_public_op_strided_values_and_metadata(M):
    """Values and metadata that are views with other strides (a transposed copy, a column of
    a stack) give the same results: the kernels index them as contiguous."""
    W, g = make((16, 32), torch.float32)
    N, K = W.shape
    values = W.values.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    meta = {k: torch.stack([t, torch.zeros_like(t)], 1)[:, 0] for k, t in W.meta.items()}
    assert not values.is_contiguous() and not meta["row_ptr"].is_contiguous()
    x = rand(g, M, K, dtype=torch.float32).requires_grad_()
    y = sc.ops.bsr_linear_tensors(x, values, meta, N, backend="triton")
    xd, wd = x.detach().double().requires_grad_(), W.to_dense().double().requires_grad_()
    ref = oracle(xd, wd)
    y.backward(torch.ones_like(y))
    ref.backward(torch.ones_like(ref))
    t = tol(torch.float32)
    assert_close(y, ref, torch.float32, t)
    assert_close(x.grad, xd.grad, torch.float32, t)
    assert_close(values.grad, kept(wd.grad, W), torch.float32, t)


@needs_kernels
def test_backend_interface_and_selection():
    ok, why = tb.available()
    assert ok, why
    W, g = make((16, 16), torch.float32)
    x = rand(g, 2, W.shape[1], dtype=torch.float32)
    assert tb.supports(x, W.values)
    assert not tb.supports(x.double(), W.values.double())  # fp64: not a kernel dtype
    assert sc.backends.resolve("triton", x, W.values) is tb
    with pytest.raises(sc.SparseCoreError, match="backend"):
        sc.ops.bsr_linear(x.double(), W.to(torch.float64), backend="triton")


@needs_kernels
@pytest.mark.parametrize("M", [3, 130])
def test_registered_triton_ops_eager(M):
    """The torch.library.triton_op ops (launching through wrap_triton), called eagerly."""
    dtype, block = torch.float16, (32, 16)
    W, g = make(block, dtype)
    N, K = W.shape
    x, b, dy = rand(g, M, K, dtype=dtype), rand(g, N, dtype=dtype), rand(g, M, N, dtype=dtype)
    ops = torch.ops.sparsecore
    y = ops.triton_bsr_linear(x, W.values, W.row_ptr, W.col_idx, W.block_row, W.row_order, N, b, "gelu")
    assert_close(y, oracle(x, W.to_dense(), b, "gelu"), dtype)
    dx = ops.triton_bsr_linear_grad_input(dy, W.values, W.col_ptr, W.row_idx, W.t_perm, K)
    assert_close(dx, dy.double() @ W.to_dense().double(), dtype)
    dv = ops.triton_bsr_linear_grad_weight(dy, x, W.block_row, W.col_idx, *block)
    assert_close(dv, kept(dy.double().T @ x.double(), W), dtype)


@needs_kernels
def test_direct_calls_reject_bad_input():
    W, g = make((16, 16), torch.float16)
    x = rand(g, 2, W.shape[1], dtype=torch.float32)
    with pytest.raises(sc.SparseCoreError, match="^x: expected .*float16"):
        tb.forward(x, W.values, W.row_ptr, W.col_idx, W.block_row, W.row_order, W.shape[0], None, "none")
    with pytest.raises(sc.SparseCoreError, match="^dy: expected a 2-D tensor"):
        tb.grad_input(x[0].half(), W.values, W.col_ptr, W.row_idx, W.t_perm, W.shape[1])
    with pytest.raises(sc.SparseCoreError, match="^x: expected"):
        tb.grad_weight(x.half(), x.half()[:1], W.block_row, W.col_idx, W.block)
    # shapes the metadata does not describe (were: uninitialized output columns)
    xh = x.half()
    with pytest.raises(sc.SparseCoreError, match="^row_ptr: expected int32"):
        tb.forward(xh, W.values, W.row_ptr, W.col_idx, W.block_row, W.row_order, W.shape[0] + 16, None, "none")
    with pytest.raises(sc.SparseCoreError, match="^bias: expected"):
        tb.forward(xh, W.values, W.row_ptr, W.col_idx, W.block_row, W.row_order, W.shape[0],
                   torch.zeros(W.shape[0] - 1, dtype=torch.float16, device=DEVICE), "none")
    with pytest.raises(sc.SparseCoreError, match="^col_ptr: expected int32"):
        tb.grad_input(xh[:, :W.shape[0]], W.values, W.col_ptr, W.row_idx, W.t_perm, W.shape[1] + 16)


@needs_kernels
@pytest.mark.parametrize("M", [3, 130])  # decode and prefill kernels
def test_backend_functions_take_strided_values_and_metadata(M):
    """Called directly (as other libraries call the registered ops), views with other strides
    are made contiguous, not read as if they were (was: wrong results, a decode loop that never
    ended); dW over zero rows is zeros."""
    W, g = make((16, 32), torch.float32)
    N, K = W.shape
    values = W.values.transpose(1, 2).contiguous().transpose(1, 2)
    meta = {k: torch.stack([t, torch.zeros_like(t)], 1)[:, 0] for k, t in W.meta.items()}
    x, dy = rand(g, M, K, dtype=torch.float32), rand(g, M, N, dtype=torch.float32)
    t = tol(torch.float32)
    y = tb.forward(x, values, meta["row_ptr"], meta["col_idx"], meta["block_row"], meta["row_order"], N, None, "none")
    assert_close(y, oracle(x, W.to_dense()), torch.float32, t)
    dx = tb.grad_input(dy, values, meta["col_ptr"], meta["row_idx"], meta["t_perm"], K)
    assert_close(dx, dy.double() @ W.to_dense().double(), torch.float32, t)
    dv = tb.grad_weight(dy, x, meta["block_row"], meta["col_idx"], W.block)
    assert_close(dv, kept(dy.double().T @ x.double(), W), torch.float32, t)
    none = tb.grad_weight(dy[:0], x[:0], W.block_row, W.col_idx, W.block)
    assert none.shape == W.values.shape and not none.any()


def test_unavailable_on_cpu_without_interpreter(monkeypatch):
    if ON_GPU:
        pytest.skip("a GPU makes the backend available")
    monkeypatch.delenv("TRITON_INTERPRET")
    ok, why = tb.available()
    assert not ok and "TRITON_INTERPRET" in why
    x = torch.zeros(2, 16)
    assert not tb.supports(x, torch.zeros(1, 16, 16))


def test_config_table_lookup(monkeypatch):
    cpu = torch.device("cpu")
    tuned = {"BM": 32, "G": 1, "GROUP_M": 4, "num_warps": 2, "num_stages": 2}
    wild = dict(tuned, BM=16)
    entries = {configs.key("fwd", 0, torch.float16, (64, 64), 300, 512, 256): tuned,
               configs.key("fwd", 0, torch.float16, (64, 64), 300, None, None): wild}
    monkeypatch.setattr(configs, "table", lambda: entries)
    assert configs.select("fwd", torch.float16, (64, 64), 257, 512, 256, cpu) == tuned   # same M bucket
    assert configs.select("fwd", torch.float16, (64, 64), 300, 512, 512, cpu) == wild    # other K
    fallback = configs.select("fwd", torch.float16, (64, 64), 2048, 512, 256, cpu)     # other bucket
    assert fallback == configs.heuristic("fwd", 0, torch.float16, (64, 64), 2048, 512, 256)
    assert configs.m_bucket(1) == 1 and configs.m_bucket(63) == 16 and configs.m_bucket(10 ** 6) == 4096


def test_checked_in_table_is_well_formed():
    import json

    with open(configs.TABLE_PATH) as f:
        entries = json.load(f)["entries"]
    assert isinstance(entries, dict)
    for k, cfg in entries.items():  # every entry has exactly the fields its kernel reads
        kernel, _, dtype, block, bucket, _, _ = k.split("|")
        bn, bk = (int(v) for v in block.split("x"))
        ref = configs.heuristic(kernel, 90, torch.float16, (bn, bk), int(bucket[1:]), 4096, 4096)
        assert set(ref) <= set(cfg) <= set(ref) | {"TMA", "SWAP"}, k


@pytest.mark.skipif(RUNNABLE, reason="the tests above ran in this process")
def test_rerun_in_interpreter_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    here = os.path.dirname(__file__)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                       cwd=os.path.dirname(here), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


# -- realistic shapes on a GPU -----------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("block", [(64, 64), (32, 32), (16, 16), (128, 64)])
@pytest.mark.parametrize("M", [16, 2048])  # decode and prefill paths
def test_gpu_realistic(block, M):
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(1)
    w, mask = random_weight(4096, 4096 + 64, block, 0.1, dtype, generator=g)
    W = sc.BlockSparseWeight.from_dense(w, mask).to("cuda")
    N, K = W.shape
    x, b = rand(g, M, K, dtype=dtype), rand(g, N, dtype=dtype)
    y = tb.forward(x, W.values, W.row_ptr, W.col_idx, W.block_row, W.row_order, N, b, "gelu")
    assert_close(y, oracle(x, W.to_dense(), b, "gelu"), dtype)
    assert torch.equal(y, tb.forward(x, W.values, W.row_ptr, W.col_idx, W.block_row, W.row_order, N, b, "gelu"))
    dy = rand(g, M, N, dtype=dtype)
    assert_close(tb.grad_input(dy, W.values, W.col_ptr, W.row_idx, W.t_perm, K),
                 dy.double() @ W.to_dense().double(), dtype)
    dv = tb.grad_weight(dy, x, W.block_row, W.col_idx, block)
    assert_close(dv, kept(dy.double().T @ x.double(), W), dtype)
    assert torch.equal(dv, tb.grad_weight(dy, x, W.block_row, W.col_idx, block))  # no atomics anywhere


@pytest.mark.gpu
def test_gpu_triton_op_compiles_and_passes_opcheck():
    dtype, block = torch.float16, (64, 64)
    W, g = make(block, dtype, n_blocks=4, k_blocks=4)
    N, K = W.shape
    x, b = rand(g, 256, K, dtype=dtype), rand(g, N, dtype=dtype)
    args = (x, W.values, W.row_ptr, W.col_idx, W.block_row, W.row_order, N, b, "relu")
    op = torch.ops.sparsecore.triton_bsr_linear
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    y = torch.compile(lambda *a: op(*a), fullgraph=True)(*args)
    assert_close(y, oracle(x, W.to_dense(), b, "relu"), dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_capability()[0] < 9, reason="TMA needs sm_90+")
@pytest.mark.parametrize("block", [(64, 64), (128, 128)])
def test_gpu_fwd_tma_variant(block):
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(4)
    w, mask = random_weight(4096, 4096, block, 0.1, dtype, generator=g)
    W = sc.BlockSparseWeight.from_dense(w, mask).to("cuda")
    x, b = rand(g, 2048, 4096, dtype=dtype), rand(g, 4096, dtype=dtype)
    cfg = dict(configs.heuristic("fwd", 90, dtype, block, 2048, 4096, 4096), G=1, TMA=True)
    launched = []
    spy = lambda k: launched.append(k.__name__) or k  # noqa: E731
    y = bsr_fwd.bsr_fwd(x, W.values, W.row_ptr, W.col_idx, W.row_order, 4096, b, "silu", config=cfg, wrap=spy)
    assert launched == ["bsr_fwd_tma_kernel"]
    assert_close(y, oracle(x, W.to_dense(), b, "silu"), dtype)
