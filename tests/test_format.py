"""BlockMask / BlockSparseWeight: round trips, metadata invariants, pruning exactness."""
import pytest
import torch

import sparsecore as sc
from sparsecore.format import build_metadata

from conftest import assert_close, oracle, random_weight

SHAPES = [(64, 64), (100, 70), (1, 1), (129, 257), (16, 300)]
BLOCKS = [16, 32, 64, 128, (16, 64), (128, 32)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
def test_roundtrip_and_metadata(shape, block, density):
    w, m = random_weight(*shape, block, density, generator=torch.Generator().manual_seed(hash((shape, str(block))) % 997))
    W = sc.BlockSparseWeight.from_dense(w, m)
    # to_dense equals the element-masked weight exactly
    assert torch.equal(W.to_dense(), w * m.to_dense())
    R, C = W.grid
    assert W.nnzb == int(m.mask.sum()) and W.values.shape == (W.nnzb, *W.block)
    rp, ci, br = W.row_ptr.long(), W.col_idx.long(), W.block_row.long()
    # BSR: row_ptr delimits rows; cols sorted within each row; block_row agrees with row_ptr
    for r in range(R):
        cols = ci[rp[r]:rp[r + 1]]
        assert torch.all(cols[1:] > cols[:-1])
        assert torch.all(br[rp[r]:rp[r + 1]] == r)
        assert torch.equal(m.mask[r].nonzero().flatten(), cols)
    # CSC: values[t_perm[j]] walks block-columns in order, rows ascending
    cp, ri, tp = W.col_ptr.long(), W.row_idx.long(), W.t_perm.long()
    assert sorted(tp.tolist()) == list(range(W.nnzb))
    for c in range(C):
        js = range(cp[c], cp[c + 1])
        assert all(ci[tp[j]] == c and br[tp[j]] == ri[j] for j in js)
        assert torch.equal(m.mask[:, c].nonzero().flatten(), ri[cp[c]:cp[c + 1]])
    # launch order: heaviest block-rows first, a permutation
    per_row = (rp[1:] - rp[:-1])[W.row_order.long()]
    assert sorted(W.row_order.tolist()) == list(range(R)) and torch.all(per_row[:-1] >= per_row[1:])
    assert all(t.dtype == torch.int32 for t in W.meta.values())
    assert W.density == pytest.approx(W.nnzb / (R * C))


def test_padding_is_zero_and_values_match_blocks():
    w = torch.randn(70, 50)
    W = sc.BlockSparseWeight.from_dense(w, torch.ones(3, 2, dtype=torch.bool), block=(32, 32))
    # last block-row covers rows 64..95 of which 64..69 are real
    last = W.values[-1]
    assert torch.equal(last[:6, :18], w[64:70, 32:50])
    assert last[6:].abs().sum() == 0 and last[:, 18:].abs().sum() == 0


def test_to_dtype_and_block_mask():
    w, m = random_weight(96, 80, 32, 0.5)
    W = sc.BlockSparseWeight.from_dense(w, m)
    H = W.to(torch.float16)
    assert H.values.dtype == torch.float16 and H.row_ptr.dtype == torch.int32
    assert torch.equal(W.block_mask().mask, m.mask)
    assert "density" in repr(W)


@pytest.mark.parametrize("balanced", [False, True])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9, 1.0])
def test_block_mask_exact_sparsity(sparsity, balanced):
    w = torch.randn(256, 320)
    m = sc.prune.block_mask(w, (32, 64), sparsity, balanced=balanced)
    R, C = m.mask.shape
    if balanced:
        assert torch.all(m.mask.sum(1) == round((1 - sparsity) * C)) and m.balanced
    else:
        assert m.nnzb == round((1 - sparsity) * R * C)


def test_block_mask_keeps_largest_blocks():
    w = torch.randn(128, 128) * 0.01
    w[32:64, 64:96] += 10.0  # one loud block must survive 95% sparsity
    m = sc.prune.block_mask(w, 32, 0.9375)  # keep exactly 1 of 16
    assert m.nnzb == 1 and bool(m.mask[1, 2])
    # l1 vs l2 agree on such a clear case; a custom importance overrides magnitude
    imp = torch.zeros_like(w)
    imp[:32, :32] = 1.0
    assert bool(sc.prune.block_mask(w, 32, 0.9375, score=imp).mask[0, 0])


def test_metadata_of_empty_and_full():
    for m in (torch.zeros(3, 4, dtype=torch.bool), torch.ones(3, 4, dtype=torch.bool)):
        meta = build_metadata(m)
        assert meta["row_ptr"].tolist()[-1] == int(m.sum()) and meta["col_ptr"].tolist()[-1] == int(m.sum())


@pytest.mark.parametrize("shape,block", [((100, 70), (32, 32)), ((64, 256), (16, 64)), ((129, 40), (128, 16))])
def test_torch_sparse_bsr_round_trip(shape, block):
    """to_sparse_bsr / from_sparse_bsr against torch's own BSR conversion of the masked weight."""
    w, m = random_weight(*shape, block, 0.5, generator=torch.Generator().manual_seed(3), empty_rows=1)
    W = sc.BlockSparseWeight.from_dense(w, m)
    t = W.to_sparse_bsr()
    assert t.layout == torch.sparse_bsr and t.values().shape == W.values.shape
    assert torch.equal(t.to_dense()[: shape[0], : shape[1]], W.to_dense())
    back = sc.BlockSparseWeight.from_sparse_bsr(t, shape=shape)
    assert torch.equal(back.values, W.values) and back.shape == W.shape
    assert all(torch.equal(back.meta[k], W.meta[k]) for k in W.meta)
    # PyTorch's own BSR of the padded masked weight (int64 indices) gives the same weight
    R, C = W.grid
    padded = torch.zeros(R * block[0], C * block[1])
    padded[: shape[0], : shape[1]] = w * m.to_dense()
    theirs = sc.BlockSparseWeight.from_sparse_bsr(padded.to_sparse_bsr(block), shape=shape)
    assert torch.equal(theirs.to_dense(), W.to_dense()) and theirs.nnzb == W.nnzb
    x = torch.randn(7, shape[1], generator=torch.Generator().manual_seed(4))
    y = sc.ops.bsr_linear(x, theirs, backend="torch")
    assert_close(y, oracle(x, w * m.to_dense()), torch.float32)


def test_from_sparse_bsr_unsorted_padding_and_errors():
    # blocks out of order within a row, nonzero entries beyond the logical shape
    vals = torch.randn(3, 16, 16)
    t = torch.sparse_bsr_tensor(torch.tensor([0, 2, 3]), torch.tensor([1, 0, 1]), vals, size=(32, 32),
                                check_invariants=False)
    W = sc.BlockSparseWeight.from_sparse_bsr(t, shape=(20, 30))
    assert W.col_idx.tolist() == [0, 1, 1] and torch.equal(W.values[0], vals[1])
    ref = torch.zeros(32, 32)
    ref[:16, 16:], ref[:16, :16], ref[16:, 16:] = vals[0], vals[1], vals[2]
    assert torch.equal(W.to_dense(), ref[:20, :30])
    assert W.values[2, 4:].abs().sum() == 0 and W.values[1:, :, 14:].abs().sum() == 0  # padding zeroed
    dup = torch.sparse_bsr_tensor(torch.tensor([0, 2, 2]), torch.tensor([1, 1]), vals[:2], size=(32, 32),
                                  check_invariants=False)
    for bad, arg in ((dup, "t"), (torch.randn(32, 32), "t"), (torch.randn(32, 32).to_sparse_csr(), "t"),
                     (t.to_dense().to_sparse_bsr((16, 8)), "block")):
        with pytest.raises(sc.SparseCoreError, match=arg):
            sc.BlockSparseWeight.from_sparse_bsr(bad)
    with pytest.raises(sc.SparseCoreError, match="shape"):
        sc.BlockSparseWeight.from_sparse_bsr(t, shape=(40, 30))


@pytest.mark.parametrize("crow,col,nvals,arg", [
    ([0, 2, 1], [0, 1], 2, "crow_indices"),   # offsets go down
    ([1, 1, 2], [0, 1], 2, "crow_indices"),   # not from 0 (was read as blocks (1, 0), (1, 1))
    ([0, 1, 3], [0, 1], 2, "crow_indices"),   # past nnz
    ([0, 2], [0, 1], 2, "crow_indices"),      # one block-row short
    ([0, 1, 2], [0, 1], 3, "crow_indices"),   # a value block no index points at
    ([0, 1, 2], [0, 2], 2, "col_indices"),    # column past the grid
    ([0, 1, 2], [0, -1], 2, "col_indices"),   # negative (was wrapped to the last column)
])
def test_from_sparse_bsr_rejects_inconsistent_indices(crow, col, nvals, arg):
    """check_invariants=False lets torch build any BSR: ours must not index with it blindly."""
    t = torch.sparse_bsr_tensor(torch.tensor(crow), torch.tensor(col), torch.randn(nvals, 16, 16), size=(32, 32),
                                check_invariants=False)
    with pytest.raises(sc.SparseCoreError, match=arg):
        sc.BlockSparseWeight.from_sparse_bsr(t)
    with pytest.raises(sc.SparseCoreError, match="meta"):
        sc.BlockSparseWeight.from_sparse_bsr(torch.randn(32, 32).to_sparse_bsr((16, 16)).to("meta"))
