"""BlockMask / BlockSparseWeight: round trips, metadata invariants, pruning exactness."""
import pytest
import torch

import sparsecore as sc
from sparsecore.format import build_metadata

from conftest import random_weight

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
