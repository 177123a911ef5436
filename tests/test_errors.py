"""Bad input gets a SparseCoreError naming the argument — never a silent wrong result."""
import math

import pytest
import torch

import sparsecore as sc
from sparsecore.errors import SparseCoreError


def _W(n=64, k=64, block=32, dtype=torch.float32):
    w = torch.randn(n, k, dtype=dtype)
    return sc.BlockSparseWeight.from_dense(w, sc.prune.block_mask(w, block, 0.5))


@pytest.mark.parametrize("block", [8, 24, 256, (32,), (32, 33), "64", 0, True, (16.0, 16)])
def test_bad_block(block):
    with pytest.raises(SparseCoreError, match="block"):
        sc.prune.block_mask(torch.randn(64, 64), block, 0.5)


@pytest.mark.parametrize("sparsity", [-0.1, 1.5, math.nan, "0.5", None, True])
def test_bad_sparsity(sparsity):
    with pytest.raises(SparseCoreError, match="sparsity"):
        sc.prune.block_mask(torch.randn(64, 64), 32, sparsity)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_weights_rejected(bad):
    w = torch.randn(64, 64)
    w[3, 5] = bad
    with pytest.raises(SparseCoreError, match="w: expected finite"):
        sc.prune.block_mask(w, 32, 0.5)
    with pytest.raises(SparseCoreError, match="w: expected finite"):
        sc.BlockSparseWeight.from_dense(w, torch.ones(2, 2, dtype=torch.bool), block=32)


def test_weight_shape_and_dtype():
    with pytest.raises(SparseCoreError, match="w: expected a 2-D"):
        sc.prune.block_mask(torch.randn(4, 64, 64), 32, 0.5)
    with pytest.raises(SparseCoreError, match="w: expected a floating"):
        sc.prune.block_mask(torch.ones(64, 64, dtype=torch.int64), 32, 0.5)


def test_mask_mismatch():
    w = torch.randn(64, 96)
    with pytest.raises(SparseCoreError, match="mask: expected shape"):
        sc.BlockSparseWeight.from_dense(w, torch.ones(2, 2, dtype=torch.bool), block=32)
    with pytest.raises(SparseCoreError, match="mask: expected a bool"):
        sc.BlockSparseWeight.from_dense(w, torch.ones(2, 3), block=32)
    other = sc.prune.block_mask(torch.randn(64, 64), 32, 0.5)
    with pytest.raises(SparseCoreError, match="mask: expected a BlockMask for shape"):
        sc.BlockSparseWeight.from_dense(w, other)


def test_op_input_mismatches():
    W = _W()
    with pytest.raises(SparseCoreError, match="x: expected a tensor"):
        sc.ops.bsr_linear(torch.randn(3, 65), W)
    with pytest.raises(SparseCoreError, match="x: expected dtype"):
        sc.ops.bsr_linear(torch.randn(3, 64, dtype=torch.float64), W)
    with pytest.raises(SparseCoreError, match="bias: expected shape"):
        sc.ops.bsr_linear(torch.randn(3, 64), W, bias=torch.randn(63))
    with pytest.raises(SparseCoreError, match="bias: expected torch.float32"):
        sc.ops.bsr_linear(torch.randn(3, 64), W, bias=torch.randn(64, dtype=torch.float64))
    with pytest.raises(SparseCoreError, match="W: expected a sparsecore.BlockSparseWeight"):
        sc.ops.bsr_linear(torch.randn(3, 64), torch.randn(64, 64))
    with pytest.raises(SparseCoreError, match="activation"):
        sc.ops.bsr_linear(torch.randn(3, 64), W, activation="tanh")


def _swap(t, i, j):
    t = t.clone()
    t[[i, j]] = t[[j, i]]
    return t


@pytest.mark.parametrize("field,edit,op", [
    ("row_ptr", lambda t: t - (torch.arange(t.numel()) == 1).int(), "fwd"),  # monotone, in range, wrong
    ("row_ptr", lambda t: t + 5 * (torch.arange(t.numel()) == t.numel() - 1).int(), "fwd"),
    ("row_order", lambda t: torch.zeros_like(t), "fwd"),
    ("t_perm", lambda t: torch.zeros_like(t), "fwd"),
    ("t_perm, row_idx", lambda t: _swap(t, 0, 1), "fwd"),  # a permutation, but not the CSC order
    ("block_row", lambda t: t.flip(0), "fwd"),
    ("col_ptr", lambda t: t.flip(0), "dx"),
    ("t_perm", lambda t: torch.zeros_like(t), "dx"),
])
def test_inconsistent_metadata(field, edit, op):
    """Hand-made metadata that the ops would read wrongly raises, on the CPU where it is free."""
    torch.manual_seed(0)
    w = torch.randn(96, 128)
    W = sc.BlockSparseWeight.from_dense(w, sc.prune.block_mask(w, 32, 0.5))
    name = field.split(",")[0]
    meta = dict(W.meta, **{name: edit(W.meta[name])})
    with pytest.raises(SparseCoreError, match=f"^{field}: expected"):
        if op == "fwd":
            sc.ops.bsr_linear_tensors(torch.randn(3, 128), W.values, meta, 96)
        else:
            torch.ops.sparsecore.bsr_linear_grad_input(torch.randn(3, 96), W.values, meta["col_ptr"],
                                                       meta["row_idx"], meta["t_perm"], 128, "auto")


def test_backend_choice_errors(monkeypatch):
    W = _W()
    x = torch.randn(3, 64)
    with pytest.raises(SparseCoreError, match="backend: expected one of"):
        sc.ops.bsr_linear(x, W, backend="cublas")
    monkeypatch.setenv("SPARSECORE_BACKEND", "fast")
    with pytest.raises(SparseCoreError, match="SPARSECORE_BACKEND"):
        sc.ops.bsr_linear(x, W)
    monkeypatch.setenv("SPARSECORE_BACKEND", "cuda")  # forced on CPU tensors: a clear refusal
    with pytest.raises(SparseCoreError, match="backend: 'cuda'"):
        sc.ops.bsr_linear(x, W)


@pytest.mark.parametrize("version, why", [
    ("3.6.0", None), ("3.8.0", None), ("4.0.0+git1a2b", None),
    ("3.5.1", "triton 3.5.1 is older than 3.6"),  # fails to compile the kernels
    ("3.2.0", "triton 3.2.0 is older than 3.6"),  # torch 2.6: no tensor descriptors (ModuleNotFoundError mid-call)
    (None, "triton is not installed"),
])
def test_triton_version_gate(monkeypatch, version, why):
    """The backend's availability reason for a triton too old to run the kernels (read from the
    package metadata, without importing triton), instead of an error inside a forward."""
    import importlib.metadata

    from sparsecore.kernels import triton_unusable

    def fake(name):
        assert name == "triton"
        if version is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return version

    monkeypatch.setattr(importlib.metadata, "version", fake)
    got = triton_unusable()
    assert got == why if why is None else why in got, got


def test_sparse_linear_bad_input():
    lin = sc.SparseLinear.from_dense(torch.nn.Linear(64, 32), block=32, sparsity=0.5)
    with pytest.raises(SparseCoreError, match="input: expected last dim 64"):
        lin(torch.randn(2, 63))
    with pytest.raises(SparseCoreError, match="input: expected last dim 64 .*, got list"):  # was 'shape ()'
        lin([0.0] * 64)
    with pytest.raises(SparseCoreError, match="x: expected .*, got list"):
        sc.ops.bsr_linear([0.0] * 64, lin.sparse_weight)
    with pytest.raises(SparseCoreError, match="sparsity/mask"):
        sc.SparseLinear.from_dense(torch.nn.Linear(64, 32), block=32)
    with pytest.raises(SparseCoreError, match="linear: expected an nn.Linear"):
        sc.SparseLinear.from_dense(torch.nn.Conv1d(3, 3, 1), block=32, sparsity=0.5)
    with pytest.raises(SparseCoreError, match="model"):
        sc.sparsify("not a model")


@pytest.mark.gpu
def test_device_mix():
    W = _W()
    with pytest.raises(SparseCoreError, match="x: expected device"):
        sc.ops.bsr_linear(torch.randn(3, 64, device="cuda"), W)


def test_device_mix_without_gpu():
    W = _W()
    with pytest.raises(SparseCoreError, match="x: expected device cpu"):
        sc.ops.bsr_linear(torch.empty(3, 64, device="meta"), W)


def test_more_bad_arguments(tmp_path):
    m = torch.ones(3, 4, dtype=torch.bool)
    for shape in [(-48, -64), (0, 64), (48.7, 64), (48, 64, 3), "ab"]:
        with pytest.raises(SparseCoreError, match="shape: expected"):
            sc.BlockMask(m, 16, shape)
    W = _W()
    with pytest.raises(SparseCoreError, match="shape: expected"):
        sc.BlockSparseWeight(W.values, (64, 64, 1), 32, W.meta)
    with pytest.raises(SparseCoreError, match="meta: expected a dict"):
        sc.BlockSparseWeight(W.values, (64, 64), 32, {"row_ptr": W.row_ptr})
    with pytest.raises(SparseCoreError, match="dtype: expected a floating"):
        W.to(torch.int32)
    with pytest.raises(SparseCoreError, match="in_features: expected a positive int"):
        sc.SparseLinear(True, 48)
    with pytest.raises(SparseCoreError, match="backend: expected one of"):
        sc.SparseLinear(64, 48, block=16, backend="xyz")
    with pytest.raises(SparseCoreError, match="backend: expected one of"):
        sc.sparsify(torch.nn.Sequential(torch.nn.Linear(64, 64)), block=16, backend=None)
    lin = sc.SparseLinear(64, 48, block=16)
    with pytest.raises(SparseCoreError, match="weight: expected None or a tensor of shape"):
        lin.set_mask(lin.mask, weight=[[0.0]])
    with pytest.raises(SparseCoreError, match="x: expected a dense torch.Tensor"):
        lin(torch.randn(3, 64).to_sparse())
    with pytest.raises(SparseCoreError, match="optimizer: expected None or a torch.optim.Optimizer"):
        sc.prune.GradualPruner(torch.nn.Sequential(lin), 0.0, 0.5, 0, 10, optimizer="adam")
    with pytest.raises(SparseCoreError, match="dy: expected a floating dtype"):
        torch.ops.sparsecore.bsr_linear_grad_weight(torch.ones(2, 64, dtype=torch.int64), torch.ones(
            2, 64, dtype=torch.int64), W.block_row, W.col_idx, 32, 32, "auto")
    for path in (123, None):
        with pytest.raises(SparseCoreError, match="path: expected a str or os.PathLike"):
            sc.load(torch.nn.Sequential(lin), path)
    with pytest.raises(SparseCoreError, match="model: expected a transformers PreTrainedModel"):
        sc.hf.save_pretrained(torch.nn.Sequential(), tmp_path)


def test_from_dense_arguments_checked_against_the_linear():
    lin = torch.nn.Linear(111, 59)
    for weight, got in ((torch.randn(59, 110), "shape \\(59, 110\\)"), (torch.ones(59, 111, dtype=torch.int64), "int64"),
                        ([[0.0]], "list")):
        with pytest.raises(SparseCoreError, match=f"weight: expected .*\\(59, 111\\), got .*{got}"):
            sc.SparseLinear.from_dense(lin, block=16, sparsity=0.5, weight=weight)
    bm = sc.prune.block_mask(lin.weight.detach(), 32, 0.5)
    with pytest.raises(SparseCoreError, match="block: expected None or the mask's block \\(32, 32\\)"):
        sc.SparseLinear.from_dense(lin, block=16, mask=bm)
    with pytest.raises(SparseCoreError, match="linear: expected an nn.Linear with data"):
        sc.SparseLinear.from_dense(torch.nn.Linear(64, 32, device="meta"), block=32, sparsity=0.5)
    with pytest.raises(SparseCoreError, match="mask: expected a tensor with data"):
        sc.SparseLinear.from_dense(lin, block=32, mask=bm.mask.to("meta"))
    with pytest.raises(SparseCoreError, match="balanced: expected a bool"):
        sc.SparseLinear.from_dense(lin, block=32, sparsity=0.5, balanced="yes")
    with pytest.raises(SparseCoreError, match="mask: expected a bool torch.Tensor, got ndarray"):
        sc.BlockMask(bm.mask.numpy(), 32, (59, 111))


def test_raw_op_rejects_what_the_format_rejects():
    """Block sides outside BLOCK_SIDES and a block listed twice fail in the forward (not only
    at backward(), and never summed)."""
    from sparsecore.format import build_metadata

    for side in (8, 17, 256):
        m = build_metadata(torch.ones(1, 1, dtype=torch.bool))
        with pytest.raises(SparseCoreError, match="values: expected blocks with sides in"):
            torch.ops.sparsecore.bsr_linear(torch.randn(2, side), torch.randn(1, side, side), m["row_ptr"], m["col_idx"],
                                            m["block_row"], m["col_ptr"], m["row_idx"], m["t_perm"], m["row_order"], side)
        with pytest.raises(SparseCoreError, match="values: expected blocks with sides in"):
            torch.ops.sparsecore.bsr_linear_grad_input(torch.randn(2, side), torch.randn(1, side, side), m["col_ptr"],
                                                       m["row_idx"], m["t_perm"], side)
    i32 = lambda *a: torch.tensor(a, dtype=torch.int32)  # noqa: E731
    # block-row 0 lists block-column 0 twice
    meta = dict(row_ptr=i32(0, 2), col_idx=i32(0, 0), block_row=i32(0, 0), col_ptr=i32(0, 2, 2), row_idx=i32(0, 0),
                t_perm=i32(0, 1), row_order=i32(0))
    with pytest.raises(SparseCoreError, match="col_idx: expected strictly increasing within each block-row"):
        sc.ops.bsr_linear_tensors(torch.randn(3, 32), torch.randn(2, 16, 16), meta, 16)


def test_wrapper_arguments():
    W = _W()
    x = torch.randn(3, 64)
    for kwargs, name in (({"bias": [0.0] * 64}, "bias"), ({"bias": 1.0}, "bias"), ({"backend": None}, "backend"),
                         ({"activation": None}, "activation"), ({"activation": "tanh"}, "activation")):
        with pytest.raises(SparseCoreError, match=f"{name}: expected"):
            sc.ops.bsr_linear(x, W, **kwargs)
