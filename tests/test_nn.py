"""SparseLinear as a drop-in nn.Linear, and sparsify on a transformer-like model."""
import io

import pytest
import torch
from torch import nn

import sparsecore as sc

from conftest import assert_close, oracle


def _lin(n_in=96, n_out=80, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
def test_from_dense_matches_masked_linear(bias):
    dense = _lin(bias=bias)
    sl = sc.SparseLinear.from_dense(dense, block=(16, 32), sparsity=0.6)
    mask = sc.prune.block_mask(dense.weight.detach(), (16, 32), 0.6).to_dense()
    assert torch.equal(sl.dense_weight(), dense.weight.detach() * mask)
    x = torch.randn(3, 5, 96)
    ref = oracle(x.reshape(-1, 96), dense.weight.detach() * mask, dense.bias.detach() if bias else None)
    assert_close(sl(x), ref.reshape(3, 5, 80), torch.float32)
    assert (sl.in_features, sl.out_features) == (96, 80) and (sl.bias is None) == (not bias)
    assert "block=(16, 32)" in repr(sl) and "density=0.4" in repr(sl)


def test_constructor_like_nn_linear():
    sl = sc.SparseLinear(50, 70, block=16)
    assert sl.density == 1.0 and sl.values.shape == (4 * 5, 16, 16)
    y = sl(torch.randn(2, 50))
    assert y.shape == (2, 70)
    # default init bounded like nn.Linear's
    assert float(sl.dense_weight().detach().abs().max()) <= 1 / 50 ** 0.5 + 1e-6
    # the padding of partial blocks stays zero
    assert float(sl.values.detach()[-1, 6:, :].abs().sum()) == 0.0
    # kept entries are U(-1/sqrt(in), 1/sqrt(in)) as nn.Linear's: std bound/sqrt(3), mean 0
    big = sc.SparseLinear(400, 300, block=64).dense_weight().detach()
    assert abs(float(big.std()) * 3 ** 0.5 * 20 - 1) < 0.02 and abs(float(big.mean())) < 1e-3


def test_parameters_replaced_by_attribute_are_used():
    """Forward reads ``values`` and ``bias`` as attributes, so what replaces them is used:
    a parametrization of ``bias`` (``values`` cannot be one: ModuleDict has a ``values``
    method), and a plain tensor set where the Parameter was (as FSDP1's flat parameters do)."""
    from torch.nn.utils import parametrize

    class Scale(nn.Module):
        def forward(self, t):
            return 2 * t

    sl = sc.SparseLinear.from_dense(_lin(), block=(16, 32), sparsity=0.5)
    w, b = sl.dense_weight().detach(), sl.bias.detach()
    parametrize.register_parametrization(sl, "bias", Scale())
    v = sl.values.detach().clone().mul_(3).requires_grad_(True)
    del sl.values
    sl.values = v
    x = torch.randn(4, 96)
    y = sl(x)
    assert_close(y, oracle(x, 3 * w, 2 * b), torch.float32)
    y.sum().backward()
    assert v.grad is not None and sl.parametrizations.bias.original.grad is not None


@pytest.mark.parametrize("bias", [True, False])
def test_from_sparse_weight_or_torch_bsr(bias):
    """A layer from a BlockSparseWeight or PyTorch's sparse_bsr tensor computes the same linear."""
    dense = _lin(bias=bias)
    w = dense.weight.detach()
    mask = sc.prune.block_mask(w, (16, 32), 0.5)
    W = sc.BlockSparseWeight.from_dense(w, mask)
    b = dense.bias.detach() if bias else None
    x = torch.randn(6, 96)
    ref = oracle(x, w * mask.to_dense(), b)
    t = (w * mask.to_dense()).to_sparse_bsr((16, 32))
    for weight in (W, t):
        sl = sc.SparseLinear.from_sparse(weight, b)
        assert (sl.in_features, sl.out_features, sl.block) == (96, 80, (16, 32)) and sl.density == W.density
        assert_close(sl(x), ref, torch.float32)
    sl.values.data.zero_()  # copied, not shared
    assert W.values.abs().sum() > 0
    half = sc.SparseLinear.from_sparse(W.to(torch.float16))
    assert half.values.dtype == torch.float16 and half.bias is None
    for bad, arg in (((w,), "weight"), ((W, torch.zeros(3)), "bias")):
        with pytest.raises(sc.SparseCoreError, match=arg):
            sc.SparseLinear.from_sparse(*bad)


def test_state_dict_roundtrip_torch_save_and_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    src = sc.SparseLinear.from_dense(_lin(seed=1), block=32, sparsity=0.5)
    sd = src.state_dict()
    assert set(sd) == {"values", "bias", "mask"} and all(isinstance(t, torch.Tensor) for t in sd.values())
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    save_file(sd, str(tmp_path / "w.safetensors"))
    for loaded in (torch.load(buf, weights_only=True), load_file(str(tmp_path / "w.safetensors"))):
        dst = sc.SparseLinear.from_dense(_lin(seed=2), block=32, sparsity=0.75)  # another mask, fewer blocks
        dst.load_state_dict(loaded)
        assert torch.equal(dst.mask, src.mask) and torch.equal(dst.dense_weight(), src.dense_weight())
        x = torch.randn(4, 96)
        assert torch.equal(dst(x), src(x))


def test_load_state_dict_rejects_inconsistent():
    src = sc.SparseLinear.from_dense(_lin(), block=32, sparsity=0.5)
    sd = src.state_dict()
    sd["values"] = sd["values"][:-1]
    dst = sc.SparseLinear.from_dense(_lin(), block=32, sparsity=0.5)
    with pytest.raises(RuntimeError, match="values: expected shape"):
        dst.load_state_dict(sd)
    sd = src.state_dict()
    sd["mask"] = sd["mask"][:, :1]
    with pytest.raises(RuntimeError, match="mask: expected bool"):
        dst.load_state_dict(sd)


def test_load_with_another_mask_keeps_the_parameter():
    """As nn.Linear: loading never replaces ``values`` (an optimizer built before keeps
    training it); a non-strict load of a mask without values keeps the blocks kept before."""
    src = sc.SparseLinear.from_dense(_lin(seed=1), block=32, sparsity=0.5)
    dst = sc.SparseLinear(96, 80, block=32)
    values = dst.values
    opt = torch.optim.SGD(dst.parameters(), lr=0.1)
    dst.load_state_dict(src.state_dict())
    assert dst.values is values and values.shape == src.values.shape and torch.equal(values, src.values)
    dst(torch.randn(4, 96)).square().sum().backward()
    opt.step()
    assert not torch.equal(dst.values, src.values)

    other = sc.SparseLinear.from_dense(_lin(seed=2), block=32, sparsity=0.3)
    before = other.dense_weight().detach()
    sd = {k: v for k, v in src.state_dict().items() if k != "values"}
    result = other.load_state_dict(sd, strict=False)
    assert result.missing_keys == ["values"] and torch.equal(other.mask, src.mask)
    assert torch.equal(other.dense_weight(), before * src.block_mask().to_dense())


@pytest.mark.parametrize("how", ["assign", "to_empty"])
def test_meta_device_then_checkpoint(how):
    """Built on the meta device (as nn.Linear, for big models), then given a checkpoint whose
    mask differs from the constructor's: the loaded layer computes the checkpoint's weight."""
    src = sc.SparseLinear.from_dense(_lin(seed=2), block=(16, 32), sparsity=0.6)
    with torch.device("meta"):
        dst = sc.SparseLinear(96, 80, block=(16, 32))
    direct = sc.SparseLinear(96, 80, block=(16, 32), mask=src.mask, device="meta")
    assert dst.values.is_meta and dst.row_ptr.is_meta and dst.values.shape == (5 * 3, 16, 32)
    assert direct.values.shape == src.values.shape and direct.mask.is_meta
    if how == "assign":
        dst.load_state_dict(src.state_dict(), assign=True)
    else:
        dst.to_empty(device="cpu").load_state_dict(src.state_dict())
    assert not any(t.is_meta for t in (*dst.parameters(), *dst.buffers()))
    assert dst.values.shape == src.values.shape and dst.values.requires_grad
    x = torch.randn(4, 96)
    ref = oracle(x, src.dense_weight().detach(), src.bias.detach())
    assert_close(dst(x), ref, torch.float32)
    with pytest.raises(sc.SparseCoreError, match="mask: expected a tensor with data"):
        sc.SparseLinear(96, 80, block=(16, 32), mask=src.mask.to("meta"))


def test_dtype_and_device_moves():
    sl = sc.SparseLinear.from_dense(_lin(), block=32, sparsity=0.5)
    for conv, dt in ((lambda m: m.half(), torch.float16), (lambda m: m.bfloat16(), torch.bfloat16),
                     (lambda m: m.to(torch.float64), torch.float64)):
        m = conv(sc.SparseLinear.from_dense(_lin(), block=32, sparsity=0.5))
        assert m.values.dtype == dt and m.bias.dtype == dt
        assert m.row_ptr.dtype == torch.int32 and m.mask.dtype == torch.bool
        x = torch.randn(3, 96, dtype=dt)
        assert_close(m(x), oracle(x, m.dense_weight(), m.bias), dt)
    assert sl.to("cpu").values.device.type == "cpu"


def test_training_with_fixed_mask():
    """SGD on SparseLinear == SGD on the element-masked dense weight (float64 oracle)."""
    torch.manual_seed(0)
    sl = sc.SparseLinear.from_dense(_lin(64, 32), block=16, sparsity=0.5).double()
    mask = sl.block_mask().to_dense().double()
    w = sl.dense_weight().detach().clone().requires_grad_(True)
    b = sl.bias.detach().clone().requires_grad_(True)
    target = torch.randn(32, 64, dtype=torch.float64) * mask  # reachable by the sparse layer
    opt, opt_ref = torch.optim.SGD(sl.parameters(), lr=0.2), torch.optim.SGD([w, b], lr=0.2)
    x = torch.randn(256, 64, dtype=torch.float64)
    losses = []
    for _ in range(20):
        loss = (sl(x) - x @ target.T).pow(2).mean()
        loss_ref = (x @ (w * mask).T + b - x @ target.T).pow(2).mean()
        for o, l in ((opt, loss), (opt_ref, loss_ref)):
            o.zero_grad()
            l.backward()
            o.step()
        losses.append(float(loss.detach()))
        assert losses[-1] == pytest.approx(float(loss_ref.detach()), rel=1e-9)
    assert losses[-1] < 0.7 * losses[0]
    assert torch.allclose(sl.dense_weight(), w * mask, rtol=1e-9, atol=1e-12)
    assert float(sl.dense_weight()[mask == 0].abs().max()) == 0.0  # pruned blocks never come back


def test_set_mask_rebuilds_metadata():
    sl = sc.SparseLinear.from_dense(_lin(), block=32, sparsity=0.5)
    before = sl.dense_weight().detach().clone()
    new = sc.prune.block_mask(before, 32, 0.75)  # subset of the kept blocks (magnitude of kept)
    sl.set_mask(new)
    assert sl.values.shape[0] == new.nnzb and torch.equal(sl.mask, new.mask)
    assert torch.equal(sl.dense_weight(), before * new.to_dense())
    x = torch.randn(2, 96)
    assert_close(sl(x), oracle(x, before * new.to_dense(), sl.bias), torch.float32)


class TinyBlock(nn.Module):
    def __init__(self, d=64, h=128):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.q = nn.Linear(d, d)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        x = x + self.attn(self.q(x), x, x, need_weights=False)[0]
        return self.norm(x + self.down(torch.relu(self.up(x))))


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(TinyBlock(), TinyBlock())
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        return self.head(self.blocks(x))


def test_sparsify_transformer_like_model(caplog):
    torch.manual_seed(0)
    model = TinyModel().eval()
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    x = torch.randn(2, 9, 64)
    with caplog.at_level("INFO", logger="sparsecore.sparsify"):
        out = sc.sparsify(model, block=(16, 16), sparsity=0.5, filter_fn=lambda m, fqn: "head" not in fqn)
    assert out is model
    swapped = {n for n, m in model.named_modules() if isinstance(m, sc.SparseLinear)}
    assert swapped == {f"blocks.{i}.{p}" for i in range(2) for p in ("q", "up", "down")}
    assert type(model.head) is nn.Linear  # filtered out
    assert isinstance(model.blocks[0].attn.out_proj, nn.Linear)  # MHA projection skipped, with a reason
    assert "MultiheadAttention" in caplog.text
    # the sparse model equals the dense model with masked weights
    ref = TinyModel().eval()
    ref.load_state_dict({k: v for k, v in _dense_state(model).items()})
    for name in swapped:
        mask = sc.prune.block_mask(dense[name], 16, 0.5).to_dense()
        assert torch.equal(ref.get_submodule(name).weight, dense[name] * mask)
    assert_close(model(x), ref(x).double(), torch.float32)


def _dense_state(model):
    sd = {}
    for name, m in model.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            sd[f"{name}.{pname}" if name else pname] = p.detach()
        if isinstance(m, sc.SparseLinear):
            sd[f"{name}.weight"] = m.dense_weight().detach()
            sd.pop(f"{name}.values")
    return sd


def test_sparsify_leaves_shared_layers_dense():
    """A Linear whose weight another module uses too (a tied LM head) or registered twice stays
    dense and untouched: pruning it in place would prune the other user of the tensor."""
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(64, 32), "head": nn.Linear(32, 64, bias=False),
                           "mlp": nn.Linear(32, 32), "twice": nn.Linear(32, 32)})
    model.head.weight = model.emb.weight
    model.again = model.twice
    emb = model.emb.weight.detach().clone()
    sc.sparsify(model, block=16, sparsity=0.5)
    assert isinstance(model.mlp, sc.SparseLinear) and model.mlp.density == 0.5
    assert type(model.head) is nn.Linear and model.head.weight is model.emb.weight
    assert torch.equal(model.emb.weight, emb)
    assert type(model.twice) is nn.Linear and model.again is model.twice
    with pytest.raises(sc.SparseCoreError, match="model: expected a module containing"):
        sc.sparsify(nn.Linear(32, 32), block=16, sparsity=0.5)
    with pytest.raises(sc.SparseCoreError, match="filter_fn"):
        sc.sparsify(model, block=16, sparsity=0.5, filter_fn=5)


def test_calibration_runs_in_eval_mode_and_restores_modes():
    """Calibration is inference: dropout off, BatchNorm statistics untouched, so a model in
    train mode gets the same masks and refit as in eval mode, and keeps its modes."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(32, 64), nn.BatchNorm1d(64), nn.Dropout(0.5), nn.ReLU(), nn.Linear(64, 32))

    batches = [torch.randn(16, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    kw = dict(block=16, sparsity=0.5, method="wanda", calibration=batches, reconstruct=True)
    a, b = net().train(), net().eval()
    stats = a[1].running_mean.clone(), int(a[1].num_batches_tracked)
    sc.sparsify(a, **kw)
    sc.sparsify(b, **kw)
    assert a.training and all(m.training for m in a) and not b.training
    assert torch.equal(a[1].running_mean, stats[0]) and int(a[1].num_batches_tracked) == stats[1]
    for i in (0, 4):
        assert torch.equal(a[i].mask, b[i].mask) and torch.equal(a[i].values, b[i].values)


def test_sparsify_nonzero_keeps_weights_pruned_elsewhere(caplog):
    """method="nonzero": a weight already full of zero blocks converts with no value changed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 80), nn.ReLU(), nn.Linear(80, 64), nn.ReLU(), nn.Linear(64, 40))
    keep = torch.rand(3, 3) < 0.5
    keep[0, 0] = True
    with torch.no_grad():
        w = model[0].weight
        w.mul_(sc.BlockMask(keep, 32, (80, 96)).to_dense())
        w[0, :5] = 0.0               # zeros inside a kept block do not drop it
        w[40, 70] = 1e-30            # one tiny nonzero entry keeps its block (1, 2)
        model[4].weight.zero_()      # all blocks zero: density 0
    expected = keep.clone()
    expected[1, 2] = True
    before = {i: model[i].weight.detach().clone() for i in (0, 2, 4)}
    x = torch.randn(5, 96)
    with caplog.at_level("INFO", logger="sparsecore.sparsify"):
        sc.sparsify(model, block=32, method="nonzero")
    assert isinstance(model[0], sc.SparseLinear) and torch.equal(model[0].mask, expected)
    assert isinstance(model[2], nn.Linear) and not isinstance(model[2], sc.SparseLinear)  # nothing to skip
    assert "left as nn.Linear" in caplog.text
    assert isinstance(model[4], sc.SparseLinear) and model[4].density == 0.0
    for i in (0, 4):
        assert torch.equal(model[i].dense_weight(), before[i])
    h = torch.relu(oracle(x, before[0], model[0].bias))
    h = torch.relu(oracle(h, before[2], model[2].bias.detach()))
    assert_close(model(x), oracle(h, before[4], model[4].bias), torch.float32)
    for kwargs in ({"sparsity": 0.5}, {"reconstruct": True}):
        with pytest.raises(sc.SparseCoreError, match="method"):
            sc.sparsify(nn.Sequential(nn.Linear(32, 32)), block=16, method="nonzero", **kwargs)
    with pytest.raises(sc.SparseCoreError, match="nonzero"):
        sc.sparsify(nn.Sequential(nn.Linear(32, 32)), block=16, method="random")


def test_densify_restores_plain_linears():
    torch.manual_seed(1)
    model = TinyModel()
    model.extra = model.blocks[0].up  # one layer under two names
    ref_model = TinyModel()
    ref_model.extra = ref_model.blocks[0].up
    sc.sparsify(model, block=(16, 16), sparsity=0.5, filter_fn=lambda m, fqn: "head" not in fqn)
    assert isinstance(model.extra, nn.Linear) and not isinstance(model.extra, sc.SparseLinear)  # shared: kept dense
    sparse = {n: (m.dense_weight().detach(), m.bias.detach()) for n, m in model.named_modules()
              if isinstance(m, sc.SparseLinear)}
    model.blocks[1].down.values.requires_grad_(False)
    model.train()
    x = torch.randn(2, 9, 64)
    y = model(x)
    assert sc.densify(model) is model
    assert not any(isinstance(m, sc.SparseLinear) for m in model.modules())
    for n, (w, b) in sparse.items():
        lin = model.get_submodule(n)
        assert type(lin) is nn.Linear and lin.training and torch.equal(lin.weight, w) and torch.equal(lin.bias, b)
    assert not model.blocks[1].down.weight.requires_grad and model.blocks[0].q.weight.requires_grad
    assert_close(model(x), y, torch.float32)
    ref_model.load_state_dict(model.state_dict())  # the dense architecture's keys, strict
    twice = nn.Sequential(sc.SparseLinear(32, 32, block=16))
    twice.add_module("again", twice[0])
    sc.densify(twice)
    assert twice[0] is twice.again and type(twice.again) is nn.Linear
    with pytest.raises(sc.SparseCoreError, match="to_linear"):
        sc.densify(sc.SparseLinear(32, 32, block=16))


def test_from_sparse_meta_and_to_linear_leaves_the_rng_alone():
    """from_sparse needs data (the blocks define the layer); to_linear draws no random init."""
    w = torch.randn(40, 70)
    W = sc.BlockSparseWeight.from_dense(w, torch.rand(3, 5) < 0.5, 16)
    with pytest.raises(sc.SparseCoreError, match="weight"):
        sc.SparseLinear.from_sparse(W.to("meta"))
    with pytest.raises(sc.SparseCoreError, match="bias"):
        sc.SparseLinear.from_sparse(W, torch.zeros(40, device="meta"))
    sl = sc.SparseLinear.from_sparse(W.to(torch.float64), torch.randn(40, dtype=torch.float64))
    state = torch.get_rng_state()
    lin = sl.to_linear()
    assert torch.equal(torch.get_rng_state(), state)  # densify must not change what the model draws next
    x = torch.randn(3, 70, dtype=torch.float64)
    assert_close(lin(x), oracle(x, W.to_dense(), sl.bias), torch.float64)


@pytest.mark.parametrize("kwargs,named", [({"sparsity": 0.5}, "sparsity"), ({"reconstruct": True}, "reconstruct"),
                                          ({"calibration": [torch.randn(2, 32)]}, "calibration"),
                                          ({"balanced": True}, "balanced"), ({"score": "l1"}, "score")])
def test_sparsify_nonzero_error_names_the_extra_option(kwargs, named):
    with pytest.raises(sc.SparseCoreError, match=f"got 'nonzero' with {named}"):
        sc.sparsify(nn.Sequential(nn.Linear(32, 32)), block=16, method="nonzero", **kwargs)


def test_conversions_leave_the_rng_alone():
    """from_dense / from_sparse / sparsify draw no throwaway init (was: uniform_ over every kept
    block, then overwritten): the global RNG, hence dropout and sampling after, is as for dense."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(70, 40), nn.ReLU(), nn.Linear(40, 33)).double()
    x = torch.randn(3, 70, dtype=torch.float64)
    dense = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in (model[0], model[2])]
    state = torch.get_rng_state()
    sc.sparsify(model, block=16, sparsity=0.5)
    sc.SparseLinear.from_sparse(model[0].sparse_weight, model[0].bias)
    assert torch.equal(torch.get_rng_state(), state)
    (w0, b0), (w2, b2) = dense
    h = torch.relu(oracle(x, w0 * model[0].block_mask().to_dense(), b0))
    assert_close(model(x), oracle(h, w2 * model[2].block_mask().to_dense(), b2), torch.float64)
    assert model[0].values.is_contiguous() and model[0].values.requires_grad and model[0].values.is_leaf


@pytest.mark.parametrize("method", ["nonzero", "magnitude"])
def test_sparsify_torch_pruned_model_after_an_optimizer_step(method):
    """torch.nn.utils.prune recomputes `weight` (weight_orig * weight_mask) in a pre-forward hook,
    so after optimizer.step() the attribute is one step stale: sparsify must use the current one."""
    import torch.nn.utils.prune as tprune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8)).double()
    elem = torch.ones(48, 64, dtype=torch.float64)
    elem[:16, :32] = 0
    elem[32:, 48:] = 0
    tprune.custom_from_mask(model[0], "weight", elem)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(16, 64, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    opt.step()
    w0 = (model[0].weight_orig * elem).detach()
    w2, b0, b2 = model[2].weight.detach().clone(), model[0].bias.detach().clone(), model[2].bias.detach().clone()
    sc.sparsify(model, block=16, method=method, **({"sparsity": 3 / 12} if method == "magnitude" else {}),
                filter_fn=lambda m, fqn: fqn == "0")
    assert isinstance(model[0], sc.SparseLinear)
    if method == "nonzero":
        assert int((~model[0].mask).sum()) == 3 and torch.equal(model[0].dense_weight(), w0)
    kept = w0 * model[0].block_mask().to_dense()
    assert_close(model(x), oracle(torch.relu(oracle(x, kept, b0)), w2, b2), torch.float64)


def test_to_empty_from_meta_refuses_lost_structure_until_loaded():
    """to_empty() from meta leaves mask/metadata uninitialized; reset_parameters() used to init
    through that garbage and forward indexed with it (out of bounds on the GPU). Both raise until
    a mask comes (load_state_dict, set_mask with a weight); then the layer matches the oracle and
    reset_parameters keeps padding at zero."""
    torch.manual_seed(0)
    mask = torch.rand(3, 5) < 0.5
    src = sc.SparseLinear(70, 40, block=16, mask=mask, dtype=torch.float64)
    x = torch.randn(3, 70, dtype=torch.float64)
    for fix in ("load", "set_mask"):
        with torch.device("meta"):
            dst = sc.SparseLinear(70, 40, block=16, mask=mask, dtype=torch.float64)
        dst.to_empty(device="cpu")
        for name in ("mask", *sc.format.META_FIELDS):  # what uninitialized memory may hold
            getattr(dst, name).fill_(1 if name == "mask" else 7)
        for call in (dst.reset_parameters, lambda: dst(x), dst.to_linear, lambda: dst.set_mask(mask)):
            with pytest.raises(sc.SparseCoreError, match="to_empty"):
                call()
        if fix == "load":
            dst.load_state_dict(src.state_dict())
        else:
            dst.set_mask(mask, weight=src.dense_weight().detach())
            dst.bias.data.copy_(src.bias)
        dst.to("cpu", torch.float64)  # a move with data keeps the structure
        assert_close(dst(x), oracle(x, src.dense_weight(), src.bias), torch.float64)
    dst.reset_parameters()
    inside = sc.format.inside((40, 70), (16, 16), dst.block_row, dst.col_idx)
    assert bool((dst.values[~inside] == 0).all()) and float(dst.values.abs().max()) <= 70 ** -0.5
    assert_close(dst(x), oracle(x, dst.dense_weight(), dst.bias), torch.float64)


def test_from_dense_keeps_the_linears_kind():
    """dtype, training mode and requires_grad of the linear; a replacement weight is cast to
    the layer's dtype; the block of a BlockMask is taken when none is given."""
    lin = _lin().eval()
    lin.weight.requires_grad_(False)
    w64 = lin.weight.detach().double() * 2
    sl = sc.SparseLinear.from_dense(lin, sparsity=0.5, weight=w64)
    assert sl.values.dtype == torch.float32 and sl.bias.dtype == torch.float32 and sl.block == (64, 64)
    assert not sl.training and not sl.values.requires_grad and sl.bias.requires_grad
    mask = sl.block_mask().to_dense()
    assert torch.equal(sl.dense_weight(), (w64 * mask).float())
    bm = sc.prune.block_mask(lin.weight.detach(), (16, 32), 0.5)
    assert sc.SparseLinear.from_dense(lin, mask=bm).block == (16, 32)


def test_constructor_positional_device_dtype_as_nn_linear():
    sl = sc.SparseLinear(48, 40, False, "cpu", torch.float64, block=16)
    assert sl.values.dtype == torch.float64 and sl.bias is None


def test_to_empty_on_a_real_layer_keeps_the_structure():
    """to_empty() leaves the parameters uninitialized (as nn.Linear) but never the mask and the
    metadata, which would index out of bounds: load the values and the layer is whole again."""
    src = sc.SparseLinear.from_dense(_lin(n_in=111, n_out=59), block=16, sparsity=0.5)
    dst = sc.SparseLinear.from_dense(_lin(n_in=111, n_out=59), block=16, sparsity=0.5)
    meta = {k: v.clone() for k, v in dst._buffers.items()}
    dst.to_empty(device="cpu")
    assert all(torch.equal(dst._buffers[k], v) for k, v in meta.items())
    dst.load_state_dict(src.state_dict())
    x = torch.randn(5, 111)
    assert_close(dst(x), oracle(x, src.dense_weight(), src.bias), torch.float32)


def test_set_mask_moves_the_optimizer_state():
    sl = sc.SparseLinear.from_dense(_lin(), block=32, sparsity=0.25)
    opt = torch.optim.Adam(sl.parameters(), lr=1e-2)
    sl(torch.randn(4, 96)).square().sum().backward()
    opt.step()
    old_mask, moments = sl.mask.clone(), opt.state[sl.values]["exp_avg"].clone()
    new = sc.prune.block_mask(sl.dense_weight().detach(), 32, 0.5)
    sl.set_mask(new, optimizer=opt)
    state = opt.state[sl.values]
    assert any(p is sl.values for p in opt.param_groups[0]["params"]) and state["exp_avg"].shape == sl.values.shape
    kept_before = old_mask.nonzero().tolist()
    for i, (r, c) in enumerate(new.mask.nonzero().tolist()):  # blocks kept in both keep their moments
        assert torch.equal(state["exp_avg"][i], moments[kept_before.index([r, c])])
    sl(torch.randn(4, 96)).square().sum().backward()
    opt.step()  # shapes agree: no error


@pytest.mark.parametrize("op", ["forward", "grad_input"])
def test_nonfinite_input_under_a_pruned_block_never_reaches_the_output(op):
    """A pruned block never reads x (dy for dX): the same row gives the same result in a
    small batch (grouped path) and a large one (the CPU's dense fallback), and that result is
    the oracle's with the pruned block's input columns ignored."""
    sl = sc.SparseLinear.from_dense(_lin(n_in=64, n_out=64), block=32, mask=torch.tensor([[True, True], [True, False]]))
    w = sl.dense_weight().detach()
    for M in (3, 400):
        if op == "forward":
            x = torch.randn(M, 64)
            x[0, 40] = float("inf")   # column block 1: kept by block-row 0, pruned in block-row 1
            out = sl(x).detach()[0, 32:]
            ref = oracle(x[:1, :32], w[32:, :32], sl.bias[32:])[0]
        else:
            dy = torch.randn(M, 64)
            dy[0, 40] = float("nan")  # block-row 1: kept for block-column 0, pruned for block-column 1
            out = torch.ops.sparsecore.bsr_linear_grad_input(dy, sl.values.detach(), sl.col_ptr, sl.row_idx,
                                                             sl.t_perm, 64, "torch")[0, 32:]
            ref = (dy[:1, :32].double() @ w[:32, 32:].double())[0]
        assert_close(out, ref, torch.float32)
