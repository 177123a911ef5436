"""The README's Python blocks run as written (on small stand-ins for the names they assume)
and do what their comments say, checked against the float64 masked-dense oracle."""
from __future__ import annotations

import os
import re

import torch
from safetensors.torch import load_file
from torch import nn

import sparsecore as sc
from conftest import assert_close, oracle

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def _blocks() -> list[str]:
    with open(README, encoding="utf-8") as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


def _model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))


def test_api_block_runs_and_computes_the_masked_product():
    api = next(b for b in _blocks() if "sc.prune.block_mask(w" in b)
    torch.manual_seed(0)
    w = torch.randn(256, 512, dtype=torch.float64)
    x = torch.randn(7, 512, dtype=torch.float64)
    ns = {"w": w, "x": x, "nn_linear": nn.Linear(512, 256, dtype=torch.float64),
          "bias": torch.randn(256, dtype=torch.float64), "model": _model(),
          "batches": [torch.randn(4, 128) for _ in range(4)]}
    exec(compile(api, README, "exec"), ns)
    mask = ns["mask"].to_dense()
    assert 0.85 < 1 - float(mask.float().mean()) < 0.95  # sparsity=0.9 of the 64x64 blocks
    assert_close(ns["y"], oracle(x, w * mask), torch.float64)
    lin = ns["lin"]
    assert isinstance(lin, sc.SparseLinear)
    assert_close(lin(x), oracle(x, w * mask, ns["bias"]), torch.float64)
    assert torch.equal(ns["W"].to_dense(), w)  # through PyTorch BSR and back: every block of w
    assert all(type(m) in (nn.Linear, nn.ReLU, nn.Sequential) for m in ns["model"].modules())  # densified


def test_checkpoint_block_round_trips(tmp_path, monkeypatch):
    save = next(b for b in _blocks() if "sc.save(model" in b)
    save = save[:save.index("from transformers")]  # the HF part needs a hub model: test_hf covers it
    monkeypatch.chdir(tmp_path)
    model = sc.sparsify(_model(), block=(32, 32), sparsity=0.5)
    x = torch.randn(3, 128)
    ns = {"sc": sc, "model": model, "make_model": _model}
    exec(compile(save, README, "exec"), ns)
    assert ns["model"] is not model and isinstance(ns["model"][0], sc.SparseLinear)
    assert torch.equal(ns["model"](x), model(x))
    dense = _model()
    dense.load_state_dict(load_file("dense.safetensors"))  # a plain nn.Linear checkpoint
    assert_close(dense(x).double(), model(x).double(), torch.float32)
    assert os.path.getsize("model.sparse.safetensors") < 0.7 * os.path.getsize("dense.safetensors")  # ~density
