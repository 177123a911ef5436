"""The CUDA kernels of ``sparsecore._C`` against the float64 oracle (needs a GPU).

Every kernel is called by name (``kernel="sm80" | "sm90" | "decode"``) so each one meets
every shape class it accepts: odd M (1, 3, 59, 111, 300: partial and several 128-row tiles),
N and K that are not multiples of the block (K % 8 != 0 takes the padded-x path), square and
rectangular blocks 16..128 (16/32-wide blocks share a K-chunk, 128-wide ones span two),
empty block-rows, density 0 and 1, bias, activations, long rows (pipeline wrap-around),
a decode split that crosses block-rows, unaligned / strided x. The backward kernels (dX over
the CSC metadata, dW on kept blocks, with and without the split over M) meet the same classes.
"""
from __future__ import annotations

import os

import pytest
import torch

import sparsecore as sc
from conftest import assert_close, oracle, random_weight

pytestmark = pytest.mark.gpu

BLOCKS = [(16, 16), (32, 32), (64, 64), (128, 128), (64, 32), (32, 128), (128, 16), (16, 64)]
DTYPES = [torch.float16, torch.bfloat16]


def _has_sm90():
    import sparsecore._C  # noqa: F401

    return torch.cuda.get_device_capability() == (9, 0) and torch.ops.sparsecore.cuda_has_sm90a()


def _kernels(M, block):
    """Kernels that accept this call on this GPU ($SPARSECORE_TEST_KERNELS, e.g. "sm80,decode",
    keeps only those: bench/device.sh tests the sm90 kernel in a process of its own)."""
    ks = ["sm80"]
    if _has_sm90():
        ks.append("sm90")
    if M <= 64 and block[1] >= 32:
        ks.append("decode")
    only = os.environ.get("SPARSECORE_TEST_KERNELS")
    return [k for k in ks if not only or k in only.split(",")]


def _gen(seed):
    """A CUDA generator: this file draws ~1.1e10 numbers (~40 s of one CPU core on the CPU)."""
    return torch.Generator(device="cuda").manual_seed(seed)


def _case(M, N, K, block, density, dtype, bias=False, empty_rows=1, seed=0):
    g = _gen(seed)
    w, mask = random_weight(N, K, block, density, dtype=dtype, device="cuda", generator=g, empty_rows=empty_rows)
    W = sc.BlockSparseWeight.from_dense(w, mask)
    x = torch.randn(M, K, generator=g, device="cuda").to(dtype)
    b = torch.randn(N, generator=g, device="cuda").to(dtype) if bias else None
    return x, W, b


def _randn(*shape, dtype):
    return torch.randn(*shape, generator=_gen(1), device="cuda").to(dtype)


def _run(x, W, b=None, activation="none", kernel="auto"):
    y = torch.ops.sparsecore.cuda_bsr_linear(x, W.values, W.row_ptr, W.col_idx, W.block_row, W.row_order,
                                             W.shape[0], b, activation, kernel)
    torch.cuda.synchronize()
    return y


def _check(x, W, b=None, activation="none", kernel="auto"):
    y = _run(x, W, b, activation, kernel)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], W.shape[0])
    ref = oracle(x, W.to_dense(), b, activation)
    try:
        assert_close(y, ref, x.dtype)
    except AssertionError as e:  # say which kernel and where the output goes wrong
        bad = ((y.double() - ref).abs() > 0.05 * ref.abs().max()).nonzero()
        raise AssertionError(f"kernel={kernel} M={x.shape[0]} N={W.shape[0]} K={W.shape[1]} block={W.block}: {e}; "
                             f"{len(bad)} bad entries, first (m, n): {bad[:4].tolist()}") from None


@pytest.mark.parametrize("kernel", ["sm80", "sm90", "decode"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", BLOCKS, ids=str)
@pytest.mark.parametrize("M", [1, 3, 59, 111])
def test_every_kernel_every_shape_class(M, block, dtype, kernel):
    if kernel not in _kernels(M, block):
        pytest.skip(f"{kernel} does not take M={M}, block={block} on this GPU / build")
    bn, bk = block
    N, K = 3 * bn + bn // 2 + 1, 4 * bk + 13  # odd N tail; K % 8 != 0 -> padded x
    x, W, b = _case(M, N, K, block, 0.6, dtype, bias=True)
    _check(x, W, b, kernel=kernel)


@pytest.mark.parametrize("block", [(16, 16), (32, 32), (64, 64), (128, 128), (32, 64)], ids=str)
@pytest.mark.parametrize("M", [2, 16, 40, 300])
def test_k_multiple_of_8_not_of_block(M, block):
    bn, bk = block
    x, W, b = _case(M, 2 * bn + 8, 5 * bk + 24, block, 0.5, torch.bfloat16, bias=False, empty_rows=0)
    for kernel in _kernels(M, block):
        _check(x, W, b, kernel=kernel)


@pytest.mark.parametrize("density", [0.0, 1.0])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("M", [4, 130])
def test_density_extremes(M, bias, density):
    for block in [(32, 32), (64, 128), (128, 64)]:
        x, W, b = _case(M, 2 * block[0] + 3, 3 * block[1] + 8, block, density, torch.float16, bias=bias,
                        empty_rows=0)
        assert W.nnzb == (0 if density == 0 else W.grid[0] * W.grid[1])
        for kernel in _kernels(M, block):
            y = _run(x, W, b, kernel=kernel)
            if density == 0:  # exactly the bias (or exact zeros), never garbage from empty rows
                ref = b.expand_as(y) if bias else torch.zeros_like(y)
                assert torch.equal(y, ref), kernel
            else:
                _check(x, W, b, kernel=kernel)


@pytest.mark.parametrize("activation", ["none", "relu", "gelu", "silu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_bias_activation(activation, dtype):
    for M in (5, 77):
        x, W, b = _case(M, 192, 256, (64, 64), 0.5, dtype, bias=True)
        for kernel in _kernels(M, (64, 64)):
            _check(x, W, b, activation, kernel=kernel)


@pytest.mark.parametrize("block", [(64, 64), (128, 128), (32, 32), (16, 16)], ids=str)
def test_long_rows_and_many_tiles(block):
    """Dozens of K-chunks per block-row (every pipeline stage reused) and 3 M tiles."""
    x, W, b = _case(300, 512, 4096 + 8, block, 0.9, torch.bfloat16, bias=True, empty_rows=2)
    for kernel in _kernels(300, block):
        _check(x, W, b, kernel=kernel)


def _decode_plan(M, W):
    return torch.ops.sparsecore.cuda_decode_split(0, M, W.grid[0], W.nnzb, W.block[1])


def _block_rows_for(split, groups, sms):
    """Block-rows R whose decode plan is `split` CTAs per cluster (rows long enough: > 8*split units)."""
    return -(-sms // groups) + 3 if split == 1 else -(-(-(-sms // split)) // groups)


@pytest.mark.parametrize("block", [(16, 16), (32, 64), (64, 64), (64, 16), (128, 64)], ids=str)
def test_sm90_tile_queue(block):
    """Persistent sm90 CTAs (BN <= 64; BN = 128 runs a CTA per tile): ~4 tiles per CTA slot,
    block-rows of every length down to empty ones, 3-5 M tiles with a tail, bitwise repeatable
    whichever CTA takes which tile."""
    if "sm90" not in _kernels(300, block):
        pytest.skip("no sm90 kernel here")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bn, bk = block
    M = 520  # 3 tiles of 256 rows (BN >= 64) or 5 of 128
    R = -(-4 * sms * (1 if bn >= 64 else 2) // (-(-M // (256 if bn >= 64 else 128))))
    x, W, b = _case(M, R * bn - 5, 12 * bk + 8, block, 0.4, torch.bfloat16, bias=True, empty_rows=R // 10)
    _check(x, W, b, "silu", kernel="sm90")
    assert torch.equal(_run(x, W, b, kernel="sm90"), _run(x, W, b, kernel="sm90"))


@pytest.mark.parametrize("block", [(32, 32), (64, 64), (16, 128)], ids=str)
@pytest.mark.parametrize("M", [7, 50])
@pytest.mark.parametrize("path", ["rows", "cluster", "split"])
def test_decode_long_rows_every_path(path, block, M):
    """rows: a CTA per block-row (and 16 rows of x), at least one per SM, whose 8 warps take
    turns over dozens of units. cluster: fewer block-rows than SMs, each taken by a cluster of
    4 CTAs (sm_90) that reduce through distributed shared memory. split: so few block-rows that
    even clusters of 8 leave most SMs idle: the warps split the kept-block list, each walking
    several blocks across block-row boundaries. M = 50 takes 4 groups of 16 rows."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bn, bk = block
    groups = -(-M // 16)
    if path == "split":  # 16 R groups < sms; > 16 units (32 columns of a block) per warp of 16 per SM
        R = max(1, (sms - 1) // (16 * groups))
        K = (-(-64 * sms * 32 // (bk * max(1, R - 1))) + 8) * bk - 8
    else:
        R, K = _block_rows_for(1 if path == "rows" else 4, groups, sms), 100 * bk - 8
    x, W, b = _case(M, R * bn - 3, K, block, 0.5, torch.bfloat16, bias=True, empty_rows=min(3, R - 1))
    plan = _decode_plan(M, W)
    if path == "cluster" and plan == 0:
        pytest.skip("no thread block clusters here (the split kernel serves)")
    assert plan == {"rows": 1, "cluster": 4, "split": 0}[path]
    if path == "split":
        assert W.nnzb * bk // 32 > 16 * sms
    else:  # one launch, sums in a fixed order: bitwise repeatable
        assert torch.equal(_run(x, W, b, kernel="decode"), _run(x, W, b, kernel="decode"))
    _check(x, W, b, kernel="decode")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", [(16, 32), (32, 32), (64, 64), (128, 128), (128, 32), (64, 128)], ids=str)
@pytest.mark.parametrize("M", [1, 17, 64])
@pytest.mark.parametrize("split", [1, 2, 8])
def test_decode_by_rows_shape_classes(split, M, block, dtype):
    """The per-row decode kernel, alone (split 1) or in clusters of 2 and 8 CTAs: N tail,
    K % 8 != 0, an empty block-row, bias or none, each activation, density 0 and 1."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bn, bk = block
    R = _block_rows_for(split, -(-M // 16), sms)
    N, K = R * bn - bn // 2 + 1, 100 * bk + 13
    for density, bias, act in ((0.6, True, "none"), (0.6, False, "gelu"), (0.0, True, "silu"), (1.0, True, "relu")):
        x, W, b = _case(M, N, K, block, density, dtype, bias=bias, empty_rows=1 if 0 < density < 1 else 0)
        plan = _decode_plan(M, W)
        if split > 1 and plan == 0:
            pytest.skip("no thread block clusters here")
        if density > 0 and 1 < plan < split:  # the device caps clusters below 8 (MIG slice, MPS share)
            pytest.skip(f"clusters of {split} CTAs do not fit here (at most {plan})")
        assert plan == (1 if density == 0 else split)  # no units: nothing to split
        _check(x, W, b, act, kernel="decode")


def test_unaligned_and_strided_x():
    x, W, b = _case(40, 256, 512, (64, 64), 0.5, torch.float16, bias=True)
    base = torch.randn(40 * 512 + 1, device="cuda", dtype=torch.float16)
    shifted = base[1:].view(40, 512)  # data_ptr 2 bytes off a 16-byte boundary
    shifted.copy_(x)
    wide = torch.randn(40, 1024, device="cuda", dtype=torch.float16)[:, ::2]  # stride 2 columns
    wide.copy_(x)
    for xv in (shifted, wide, x.t().contiguous().t()):
        for kernel in _kernels(40, (64, 64)):
            _check(xv, W, b, kernel=kernel)


def test_metadata_past_the_operand_reads_zeros():
    """A direct caller's metadata for a wider weight than x / dy (block index x side >= 2^31,
    which int32 would wrap into an address): those blocks read zeros, nothing out of bounds."""
    i32 = lambda *v: torch.tensor(v, dtype=torch.int32, device="cuda")  # noqa: E731
    ops = torch.ops.sparsecore
    for M, block in ((3, (16, 128)), (130, (16, 128)), (3, (64, 64))):
        bn, bk = block
        x = _randn(M, 64, dtype=torch.float16)
        v = _randn(1, bn, bk, dtype=torch.float16)
        for kernel in _kernels(M, block):
            y = ops.cuda_bsr_linear(x, v, i32(0, 1), i32(2**31 // bk), i32(0), i32(0), bn, None, "none", kernel)
            torch.cuda.synchronize()
            assert not y.any(), kernel
    dy, x = _randn(8, 16, dtype=torch.float16), _randn(8, 16, dtype=torch.float16)
    dv = ops.cuda_bsr_linear_grad_weight(dy, x, i32(2**27), i32(0), 16, 16)
    dx = ops.cuda_bsr_linear_grad_input(dy, _randn(1, 16, 16, dtype=torch.float16), i32(0, 1), i32(2**27), i32(0), 16)
    torch.cuda.synchronize()
    assert not dv.any() and not dx.any()


def test_auto_choice_and_public_op():
    """Through sc.ops.bsr_linear(backend='cuda'): decode for small M, prefill otherwise; backward
    delegates to triton / torch and matches the oracle's gradients."""
    for M in (3, 200):
        x, W, b = _case(M, 384, 320, (64, 64), 0.4, torch.bfloat16, bias=True)
        y = sc.ops.bsr_linear(x.view(M, 1, -1), W, bias=b, backend="cuda")
        assert y.shape == (M, 1, 384)
        assert_close(y.view(M, -1), oracle(x, W.to_dense(), b), torch.bfloat16)
    lin = sc.SparseLinear.from_dense(torch.nn.Linear(256, 192), block=(32, 32), sparsity=0.5).cuda().half()
    x = torch.randn(33, 256, device="cuda", dtype=torch.float16, requires_grad=True)
    y = sc.ops.bsr_linear(x, lin.sparse_weight, backend="cuda")
    y.float().square().sum().backward()
    xd = x.detach().double().requires_grad_()
    wd = lin.dense_weight().detach().double()
    (xd @ wd.T).square().sum().backward()
    assert_close(x.grad, xd.grad, torch.float16, tol=5e-3)


def _grad_refs(x, W, dy):
    wd = W.to_dense().double()
    dw = sc.BlockSparseWeight.from_dense(dy.double().T @ x.double(), W.block_mask()).values
    return dy.double() @ wd, dw


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", BLOCKS, ids=str)
@pytest.mark.parametrize("M", [1, 59, 300])
def test_backward_kernels(M, block, dtype):
    bn, bk = block
    N, K = 3 * bn + bn // 2 + 1, 4 * bk + 13
    x, W, _ = _case(M, N, K, block, 0.6, dtype)
    W = sc.BlockSparseWeight.from_dense(W.to_dense(), W.block_mask().mask.index_fill(1, torch.tensor([1], device="cuda"),
                                                                                     False), block)  # empty column
    dy = _randn(M, N, dtype=dtype)
    dx = torch.ops.sparsecore.cuda_bsr_linear_grad_input(dy, W.values, W.col_ptr, W.row_idx, W.t_perm, K)
    dw = torch.ops.sparsecore.cuda_bsr_linear_grad_weight(dy, x, W.block_row, W.col_idx, bn, bk)
    torch.cuda.synchronize()
    ref_dx, ref_dw = _grad_refs(x, W, dy)
    assert_close(dx, ref_dx, dtype)
    assert_close(dw, ref_dw, dtype)


@pytest.mark.parametrize("M", [2000, 1601])  # 32 chunks of 64 rows in 8 ranges; 26 in 6 uneven ones
@pytest.mark.parametrize("block", [(64, 64), (128, 32), (16, 16)], ids=str)
def test_grad_weight_split_over_m(block, M):
    """Few kept blocks and many rows: M is cut into ranges summed with fp32 atomics."""
    x, W, _ = _case(M, 2 * block[0], 2 * block[1], block, 1.0, torch.bfloat16, empty_rows=0)
    dy = _randn(M, W.shape[0], dtype=torch.bfloat16)
    dw = torch.ops.sparsecore.cuda_bsr_linear_grad_weight(dy, x, W.block_row, W.col_idx, *block)
    assert_close(dw, _grad_refs(x, W, dy)[1], torch.bfloat16)


def test_training_step_through_the_public_op():
    """autograd of sc.ops.bsr_linear_tensors(backend='cuda'): dX, dvalues, dbias vs float64."""
    x, W, b = _case(77, 320, 256, (64, 32), 0.5, torch.float16, bias=True)
    x.requires_grad_()
    values = W.values.clone().requires_grad_()
    b.requires_grad_()
    y = sc.ops.bsr_linear_tensors(x, values, W.meta, W.shape[0], b, backend="cuda")
    dy = _randn(*y.shape, dtype=y.dtype)
    y.backward(dy)
    xd, bd = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    wd = W.to_dense().double().requires_grad_()
    (xd @ wd.T + bd).backward(dy.double())
    assert_close(x.grad, xd.grad, torch.float16)
    assert_close(values.grad, sc.BlockSparseWeight.from_dense(wd.grad, W.block_mask()).values, torch.float16)
    assert_close(b.grad, bd.grad, torch.float16)


def test_kernel_forced_by_env(monkeypatch):
    x, W, b = _case(4, 256, 256, (64, 64), 0.5, torch.bfloat16, bias=True)
    for kernel in _kernels(4, (64, 64)):
        monkeypatch.setenv("SPARSECORE_CUDA_KERNEL", kernel)
        assert_close(sc.ops.bsr_linear(x, W, bias=b, backend="cuda"), oracle(x, W.to_dense(), b), torch.bfloat16)
    monkeypatch.setenv("SPARSECORE_CUDA_KERNEL", "fast")
    with pytest.raises(RuntimeError, match="kernel: expected one of"):
        sc.ops.bsr_linear(x, W, backend="cuda")


def test_opcheck():
    x, W, b = _case(9, 128, 192, (32, 64), 0.5, torch.float16, bias=True)
    checks = ("test_schema", "test_faketensor")
    for kernel in ("sm80", "decode"):
        torch.library.opcheck(torch.ops.sparsecore.cuda_bsr_linear.default,
                              (x, W.values, W.row_ptr, W.col_idx, W.block_row, W.row_order, 128, b, "relu", kernel),
                              test_utils=checks)
    dy = _randn(9, 128, dtype=torch.float16)
    torch.library.opcheck(torch.ops.sparsecore.cuda_bsr_linear_grad_input.default,
                          (dy, W.values, W.col_ptr, W.row_idx, W.t_perm, 192), test_utils=checks)
    torch.library.opcheck(torch.ops.sparsecore.cuda_bsr_linear_grad_weight.default,
                          (dy, x, W.block_row, W.col_idx, 32, 64), test_utils=checks)


def test_errors_name_the_argument():
    x, W, b = _case(65, 128, 128, (64, 64), 0.5, torch.float16)
    with pytest.raises(RuntimeError, match="kernel: 'decode' expects M <= 64"):
        _run(x, W, kernel="decode")
    with pytest.raises(RuntimeError, match="kernel: expected one of"):
        _run(x, W, kernel="fast")
    with pytest.raises(RuntimeError, match="values: expected device"):
        torch.ops.sparsecore.cuda_bsr_linear(x, W.values.cpu(), W.row_ptr, W.col_idx, W.block_row, W.row_order, 128)
    if not _has_sm90():
        with pytest.raises(RuntimeError, match="kernel: 'sm90' expects"):
            _run(x, W, kernel="sm90")
    from sparsecore.backends import cuda

    assert cuda.supports(x, W.values) and not cuda.supports(x.float(), W.values.float())
    # beyond the kernels' grid: supports() is False (auto picks another backend), the op raises
    tall = torch.zeros(cuda.MAX_ROWS + 1, 16, device="cuda", dtype=torch.float16)
    W16 = sc.BlockSparseWeight.from_dense(torch.ones(32, 16, device="cuda", dtype=torch.float16),
                                          torch.ones(2, 1, dtype=torch.bool), block=(16, 16))
    assert not cuda.supports(tall, W16.values)
    with pytest.raises(RuntimeError, match="x: expected at most"):
        _run(tall, W16)
    with pytest.raises(RuntimeError, match="cuda_decode_split: device: expected a CUDA device index"):
        torch.ops.sparsecore.cuda_decode_split(torch.cuda.device_count(), 1, 4, 4, 64)
