"""Compressed checkpoints (sparsecore.io): round trips, size on disk, header, dense export, and
bad files that must raise SparseCoreError without touching the model."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import sparsecore as sc
import sparsecore.io as scio
from conftest import TF32_TOL, assert_close, oracle


class Net(nn.Module):
    def __init__(self, d_in=72, d_hid=200, d_out=40, tied=False):
        super().__init__()
        self.emb = nn.Embedding(11, d_in)
        self.up = nn.Linear(d_in, d_hid)
        self.down = nn.Linear(d_hid, d_out, bias=False)
        self.norm = nn.LayerNorm(d_out)
        self.head = nn.Linear(d_in, 11, bias=False)
        if tied:
            self.head.weight = self.emb.weight
        self.register_buffer("steps", torch.tensor(3, dtype=torch.int64))

    def forward(self, ids):
        h = self.emb(ids)
        return self.norm(self.down(torch.relu(self.up(h)))), self.head(h)


def sparse_net(block=(32, 16), sparsity=0.6, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    dense = Net(**kw).to(dtype)
    model = Net(**kw).to(dtype)
    model.load_state_dict(dense.state_dict())
    sc.sparsify(model, block=block, sparsity=sparsity, filter_fn=lambda m, fqn: fqn in ("up", "down"))
    return dense, model


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, \
        {fqn: type(m) for fqn, m in model.named_modules()}


def assert_unchanged(model, snap):
    state, types = snap
    assert {fqn: type(m) for fqn, m in model.named_modules()} == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


IDS = torch.randint(0, 11, (3, 5), generator=torch.Generator().manual_seed(1))


# -- round trips -----------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["dense", "factory", "sparse", "meta"])
def test_round_trip_matches_saved_model_and_oracle(tmp_path, target):
    dense, model = sparse_net(dtype=torch.float64)
    path = tmp_path / "m.safetensors"
    scio.save(model, path)
    torch.manual_seed(123)  # the target starts from other weights
    if target == "dense":
        loaded = scio.load(Net().double(), path)
    elif target == "factory":
        loaded = scio.load(lambda: Net().double(), path)
    elif target == "sparse":  # same block, another mask: the file's mask wins
        other = sc.sparsify(Net().double(), block=(32, 16), sparsity=0.2, filter_fn=lambda m, f: f in ("up", "down"))
        loaded = scio.load(other, path)
    else:  # no memory, no init: the file's tensors become the model's
        with torch.device("meta"):
            loaded = scio.load(Net(), path)
        assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))
    for fqn in ("up", "down"):
        a, b = getattr(model, fqn), getattr(loaded, fqn)
        assert isinstance(b, sc.SparseLinear) and b.block == a.block
        assert torch.equal(b.mask, a.mask) and torch.equal(b.values, a.values)
        # the loaded layer is the original dense layer masked by the saved block mask
        w = getattr(dense, fqn).weight * a.block_mask().to_dense()
        x = torch.randn(4, a.in_features, dtype=torch.float64)
        assert_close(b(x), oracle(x, w, getattr(dense, fqn).bias), torch.float64)
    for out, ref in zip(loaded(IDS), model(IDS)):
        assert torch.equal(out, ref)
    assert type(loaded.head) is nn.Linear and int(loaded.steps) == 3


def test_tied_weights_stored_once_and_stay_tied(tmp_path):
    _, model = sparse_net(tied=True)
    path = tmp_path / "m.safetensors"
    header = scio.save(model, path)
    assert header["sparsecore"]["aliases"] == {"head.weight": "emb.weight"}
    with safe_open(str(path), "pt") as f:
        assert "head.weight" not in f.keys() and "emb.weight" in f.keys()
    with torch.device("meta"):
        on_meta = Net(tied=True)
    for target in (Net(tied=True), on_meta):
        loaded = scio.load(target, path)
        assert loaded.head.weight is loaded.emb.weight
        assert torch.equal(loaded.head.weight, model.emb.weight)


def test_meta_model_needs_every_tensor_from_the_file(tmp_path):
    _, model = sparse_net()
    path = tmp_path / "m.safetensors"
    scio.save(model, path)
    target = Net().to("meta")
    target.register_buffer("table", torch.empty(3, device="meta"), persistent=False)  # computed, not saved
    types = {fqn: type(m) for fqn, m in target.named_modules()}
    with pytest.raises(sc.SparseCoreError, match=r"model_or_factory: expected a model whose meta-device .*table"):
        scio.load(target, path)
    assert {fqn: type(m) for fqn, m in target.named_modules()} == types and target.up.weight.is_meta


@pytest.mark.parametrize("saved,target", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float16)])
def test_dtypes(tmp_path, saved, target):
    """The file keeps the layer dtype; loading into another float dtype converts like load_state_dict."""
    _, model = sparse_net(dtype=saved)
    path = tmp_path / "m.safetensors"
    scio.save(model, path)
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("up.values").dtype == saved
    loaded = scio.load(Net().to(target), path)
    assert loaded.up.values.dtype == target
    assert torch.equal(loaded.up.values, model.up.values.to(target))


# -- size and header -------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_bytes_on_disk_scale_with_density(tmp_path, sparsity):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512, bias=False), nn.Linear(512, 256, bias=False))
    sc.sparsify(model, block=(32, 32), sparsity=sparsity)
    sc_path, dense_path = tmp_path / "s.safetensors", tmp_path / "d.safetensors"
    scio.save(model, sc_path)
    scio.export_dense(model, dense_path)
    density = sum(m.values.numel() for m in model) / sum(m.in_features * m.out_features for m in model)
    assert abs(density - (1 - sparsity)) < 0.01
    ratio = os.path.getsize(sc_path) / os.path.getsize(dense_path)
    # masks (1 byte per block) and the JSON header are the only overhead
    assert density <= ratio <= density + 0.01, (ratio, density)


def test_header_metadata_and_sparsity_config(tmp_path):
    _, model = sparse_net(block=(32, 16), sparsity=0.5)
    path = tmp_path / "m.safetensors"
    scio.save(model, path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "sparsecore" and meta["format_version"] == str(scio.FORMAT_VERSION)
    layers = json.loads(meta["sparsecore"])["layers"]
    assert set(layers) == {"up", "down"}
    assert layers["up"]["shape"] == [200, 72] and layers["up"]["block"] == [32, 16] and layers["up"]["bias"]
    assert layers["down"]["nnzb"] == model.down.values.shape[0] and not layers["down"]["bias"]
    assert layers["down"]["density"] == pytest.approx(model.down.density, abs=1e-6)
    cfg = json.loads(meta["sparsity_config"])
    assert cfg["format"] == "block-sparse-bsr" and cfg["targets"] == ["down", "up"] and cfg["ignore"] == ["head"]
    assert cfg["sparsity_structure"] == "block-32x16"
    kept = sum(int(getattr(model, f).block_mask().to_dense().sum()) for f in ("up", "down"))
    assert cfg["global_sparsity"] == pytest.approx(1 - kept / (200 * 72 + 40 * 200), abs=1e-6)


# -- dense export ----------------------------------------------------------------------------
def test_dense_export_loads_into_original_architecture(tmp_path):
    dense, model = sparse_net(dtype=torch.float64)
    sd = scio.to_dense_state_dict(model)
    assert list(sd) == list(dense.state_dict())  # same keys, same order as the dense model
    path = tmp_path / "d.safetensors"
    scio.export_dense(model, path)
    plain = Net().double()
    plain.load_state_dict(load_file(str(path)), strict=True)
    for fqn in ("up", "down"):
        m = getattr(model, fqn).block_mask().to_dense()
        assert torch.equal(getattr(plain, fqn).weight, getattr(dense, fqn).weight * m)
    for out, ref in zip(plain(IDS), model(IDS)):
        assert_close(out, ref, torch.float64)


def test_dense_export_of_tied_model_has_every_key(tmp_path):
    _, model = sparse_net(tied=True)
    path = tmp_path / "d.safetensors"
    scio.export_dense(model, path)
    plain = Net(tied=True)
    plain.load_state_dict(load_file(str(path)), strict=True)
    assert torch.equal(plain.head.weight, model.emb.weight)


# -- bad files: clear error, model untouched --------------------------------------------------
def rewrite(src, dst, tensors_fn=None, meta_fn=None, redigest=True):
    """Copy a checkpoint, editing tensors and/or header; re-sign it so deeper checks are reached."""
    with safe_open(str(src), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    if tensors_fn:
        tensors_fn(tensors)
    info = json.loads(meta["sparsecore"])
    if redigest:
        info["sha256"] = scio._digest(tensors)
    meta["sparsecore"] = json.dumps(info)
    if meta_fn:
        meta_fn(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _truncate(n):
    def fn(src, dst):
        data = src.read_bytes()
        dst.write_bytes(data[:n])
    return fn


def _flip_last_byte(src, dst):
    data = bytearray(src.read_bytes())
    data[-3] ^= 0x55
    dst.write_bytes(bytes(data))


def _break_header_json(src, dst):
    data = bytearray(src.read_bytes())
    data[9] = ord("!")  # inside the JSON header right after the 8-byte length
    dst.write_bytes(bytes(data))


def _set_meta(key, value):
    def fn(src, dst):
        def edit(meta):
            meta[key] = value
        rewrite(src, dst, meta_fn=edit)
    return fn


def _edit_layer(field, value):
    def fn(src, dst):
        def edit(meta):
            info = json.loads(meta["sparsecore"])
            info["layers"]["up"][field] = value
            meta["sparsecore"] = json.dumps(info)
        rewrite(src, dst, meta_fn=edit)
    return fn


def _edit_tensors(edit):
    return lambda src, dst: rewrite(src, dst, tensors_fn=edit)


def _drop_mask_block(t):
    m = t["up.mask"].clone()
    m[m.nonzero()[0].tolist()[0], m.nonzero()[0].tolist()[1]] = False
    t["up.mask"] = m


BAD_FILES = {
    "truncated-data": (_truncate(-100), "readable safetensors"),
    "truncated-header": (_truncate(20), "readable safetensors"),
    "empty": (_truncate(0), "readable safetensors"),
    "corrupted-data": (_flip_last_byte, "sha256"),
    "corrupted-header": (_break_header_json, "readable safetensors"),
    "future-version": (_set_meta("format_version", "99"), "format_version"),
    "not-sparsecore": (_set_meta("format", "pt"), "written by sparsecore.io.save"),
    "broken-layers-json": (_set_meta("sparsecore", "{not json"), "header metadata"),
    "bad-block": (_edit_layer("block", [32, 24]), "block"),
    "header-shape": (_edit_layer("shape", [200, 80]), "shape"),
    "header-grid": (_edit_layer("shape", [200, 100]), "mask"),
    "header-nnzb": (_edit_layer("nnzb", 1), "kept blocks"),
    "mask-values-disagree": (_edit_tensors(_drop_mask_block), "kept blocks"),
    "values-shape": (_edit_tensors(lambda t: t.update({"up.values": t["up.values"][:, :, :8].contiguous()})),
                     "values"),
    "mask-dtype": (_edit_tensors(lambda t: t.update({"up.mask": t["up.mask"].to(torch.uint8)})), "bool"),
    "dense-shape": (_edit_tensors(lambda t: t.update({"norm.weight": torch.ones(41)})), "norm.weight"),
    "int-dtype": (_edit_tensors(lambda t: t.update({"steps": torch.tensor(3.0)})), "steps"),
    "missing-key": (_edit_tensors(lambda t: t.pop("norm.bias")), "missing ['norm.bias']"),
    "unexpected-key": (_edit_tensors(lambda t: t.update({"extra": torch.ones(2)})), "unexpected ['extra']"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_raises_and_leaves_model_untouched(tmp_path, case):
    _, model = sparse_net()
    good = tmp_path / "good.safetensors"
    scio.save(model, good)
    make, needle = BAD_FILES[case]
    bad = tmp_path / "bad.safetensors"
    make(good, bad)
    torch.manual_seed(7)
    target = Net()
    snap = snapshot(target)
    with pytest.raises(sc.SparseCoreError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        scio.load(target, bad)
    assert_unchanged(target, snap)


@pytest.mark.parametrize("case", ["in-features", "bias", "block", "no-module", "not-linear"])
def test_model_mismatch_raises_and_leaves_model_untouched(tmp_path, case):
    _, model = sparse_net()
    path = tmp_path / "m.safetensors"
    scio.save(model, path)
    target = Net(d_in=80) if case == "in-features" else Net()
    if case == "bias":
        target.up = nn.Linear(72, 200, bias=False)
    elif case == "block":
        sc.sparsify(target, block=(16, 16), sparsity=0.5, filter_fn=lambda m, f: f == "up")
    elif case == "no-module":
        del target.down
    elif case == "not-linear":
        target.down = nn.Identity()
    snap = snapshot(target)
    with pytest.raises(sc.SparseCoreError, match="layer 'up'|layer 'down'"):
        scio.load(target, path)
    assert_unchanged(target, snap)


def test_other_bad_arguments(tmp_path):
    _, model = sparse_net()
    path = tmp_path / "m.safetensors"
    scio.save(model, path)
    with pytest.raises(sc.SparseCoreError, match="path"):
        scio.load(Net(), tmp_path / "missing.safetensors")
    with pytest.raises(sc.SparseCoreError, match="model_or_factory"):
        scio.load(42, path)
    with pytest.raises(sc.SparseCoreError, match=r"model_or_factory\(\)"):
        scio.load(lambda: "not a model", path)
    with pytest.raises(sc.SparseCoreError, match="model"):
        scio.save("not a model", path)
    for where in (tmp_path / "no" / "such" / "dir.safetensors", tmp_path):
        with pytest.raises(sc.SparseCoreError, match="path: expected a file path in an existing folder"):
            scio.save(model, where)
    with torch.device("meta"):
        skeleton = Net()
    for write in (scio.save, scio.export_dense):
        with pytest.raises(sc.SparseCoreError, match="model: expected a model with data"):
            write(skeleton, tmp_path / "meta.safetensors")
    # after to_empty() from meta a layer's mask is uninitialized memory: never written, never indexed
    blank = sc.SparseLinear(72, 200, block=(32, 16), mask=model.up.mask, device="meta")
    blank.to_empty(device="cpu")
    for write in (scio.save, scio.export_dense):
        with pytest.raises(sc.SparseCoreError, match="mask: expected a block mask loaded"):
            write(nn.Sequential(blank), tmp_path / "blank.safetensors")
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.ones(2)}, str(plain))
    with pytest.raises(sc.SparseCoreError, match="written by sparsecore.io.save"):
        scio.load(Net(), plain)


def test_non_strict_load_keeps_missing_entries(tmp_path):
    _, model = sparse_net()
    good, bad = tmp_path / "m.safetensors", tmp_path / "partial.safetensors"
    scio.save(model, good)
    rewrite(good, bad, tensors_fn=lambda t: t.pop("norm.bias"))
    target = Net()
    before = target.norm.bias.detach().clone()
    scio.load(target, bad, strict=False)
    assert torch.equal(target.norm.bias, before) and torch.equal(target.up.values, model.up.values)
    # a sparse layer of the file that the model lacks is ignored, as load_state_dict(strict=False) does
    smaller = Net()
    del smaller.down
    scio.load(smaller, good, strict=False)
    assert torch.equal(smaller.up.values, model.up.values) and not hasattr(smaller, "down")
    with pytest.raises(sc.SparseCoreError, match="down"):
        scio.load(smaller, good)


def test_empty_layer_round_trip(tmp_path):
    """A layer with no kept block (values [0, BN, BK]) saves, loads and outputs its bias."""
    _, model = sparse_net()
    model.up.set_mask(torch.zeros_like(model.up.mask))
    assert model.up.values.shape == (0, 32, 16)
    path = tmp_path / "m.safetensors"
    scio.save(model, path)
    loaded = scio.load(Net(), path)
    assert loaded.up.values.shape == (0, 32, 16) and not loaded.up.mask.any()
    x = torch.randn(2, 72)
    assert torch.equal(loaded.up(x), model.up.bias.detach().expand(2, 200))
    for out, ref in zip(loaded(IDS), model(IDS)):
        assert torch.equal(out, ref)


def test_views_of_one_storage_are_written_separately(tmp_path):
    """Buffers that are slices of one storage (safetensors refuses shared storage) round-trip."""
    _, model = sparse_net()
    big = torch.arange(10.0)
    model.register_buffer("lo", big[:4])
    model.register_buffer("hi", big[4:])
    path = tmp_path / "m.safetensors"
    scio.save(model, path)
    target = Net()
    target.register_buffer("lo", torch.zeros(4))
    target.register_buffer("hi", torch.zeros(6))
    loaded = scio.load(target, path)
    assert torch.equal(torch.cat([loaded.lo, loaded.hi]), big)


@pytest.mark.gpu
def test_cuda_model_round_trip(tmp_path):
    """A CUDA model saves (tensors come to the host) and loads into CUDA and CPU models."""
    _, model = sparse_net()
    model = model.cuda()
    path = tmp_path / "m.safetensors"
    scio.save(model, path)
    on_gpu = scio.load(Net().cuda(), path)
    on_cpu = scio.load(Net(), path)
    assert on_gpu.up.values.is_cuda and on_gpu.up.row_ptr.is_cuda and not on_cpu.up.values.is_cuda
    assert torch.equal(on_cpu.up.values, model.up.values.cpu())
    ids = IDS.cuda()
    for a, b, c in zip(on_gpu(ids), model(ids), on_cpu(IDS)):
        assert torch.equal(a, b)
        assert_close(c, b.cpu(), torch.float32, TF32_TOL)  # GPU kernels may use tf32
