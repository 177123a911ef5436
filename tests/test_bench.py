"""The benchmark harness on the CPU: runs end to end, writes the documented CSV, and refuses
to time a wrong result."""
from __future__ import annotations

import csv
import logging
import os
import signal

import pytest
import torch

import sparsecore as sc
from sparsecore import bench, cli
from sparsecore.backends import reference

# bench/README.md: these columns, in this order (extras only after them).
DESIGN_COLUMNS = ["gpu", "torch", "triton", "cuda", "commit", "op", "provider", "dtype", "M", "N", "K", "block_n",
                  "block_k", "density", "ms_p50", "ms_p20", "ms_p80", "tflops", "speedup_vs_dense", "pct_of_ideal",
                  "eff_vs_oracle"]
TINY = ["--device", "cpu", "--shapes", "128x96", "--tokens", "3", "--densities", "0.5", "--blocks", "16,32x16",
        "--layers", "1", "--context", "8", "--rep-ms", "2", "--warmup-ms", "0", "--no-plot",
        "--threads", "1"]


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_end_to_end_writes_design_csv(tmp_path):
    out = tmp_path / "out"
    rc = cli.main(["bench", *TINY, "--ops", "fwd,bwd,mlp,decoder",
                   "--providers", "dense,oracle,sparsecore-torch,torch-bsr", "--out", str(out)])
    assert rc == 0
    header, rows = _read(out / "bench.csv")
    assert header[: len(DESIGN_COLUMNS)] == DESIGN_COLUMNS
    seen = {(r["op"], r["provider"]) for r in rows}
    for op in bench.OPS:
        for prov in ("dense", "oracle", "sparsecore-torch"):
            assert (op, prov) in seen, (op, prov)
    assert ("fwd", "torch-bsr") in seen
    assert not any(r["op"] == "bwd" and r["provider"] == "torch-bsr" for r in rows)  # no backward there
    for r in rows:
        assert r["gpu"].startswith("cpu") and r["torch"] == torch.__version__ and r["dtype"] == "fp32"
        p20, p50, p80 = float(r["ms_p20"]), float(r["ms_p50"]), float(r["ms_p80"])
        assert 0 < p20 <= p50 <= p80
        assert float(r["rel_err"]) <= float(r["tol"])
        speedup, density = float(r["speedup_vs_dense"]), float(r["density"])
        assert float(r["pct_of_ideal"]) == pytest.approx(speedup * density, rel=1e-4)
        if r["provider"] == "dense":
            assert speedup == 1.0 and density == 1.0 and r["eff_vs_oracle"] == ""
        else:
            assert 0 < density < 1 and float(r["eff_vs_oracle"]) > 0
        if r["provider"] == "oracle":
            assert float(r["eff_vs_oracle"]) == 1.0
        if r["provider"] == "sparsecore-torch":
            # the realized density of a random mask keeping round(0.5 * blocks)
            assert density == pytest.approx(0.5, abs=0.05)
            assert (r["block_n"], r["block_k"]) in {("16", "16"), ("32", "16")}
        if r["op"] == "fwd":  # bytes moved: x [3, K] + kept weights + y [3, N], fp32
            M, N, K = int(r["M"]), int(r["N"]), int(r["K"])
            nbytes = 4 * (M * K + round(density * N * K) + M * N)
            assert float(r["gbps"]) == pytest.approx(nbytes / (p50 * 1e-3) / 1e9, rel=1e-3)
            assert float(r["pct_of_copy_bw"]) == pytest.approx(float(r["gbps"]) / float(r["copy_gbps"]), rel=1e-3)
        else:
            assert r["gbps"] == r["pct_of_copy_bw"] == ""
        if r["op"] == "decoder":
            assert float(r["tokens_per_s"]) == pytest.approx(3 / (p50 * 1e-3), rel=1e-4)
            assert (r["N"], r["K"]) == ("896", "256")  # the tiny decoder on the CPU
    table = (out / "table.txt").read_text()
    assert "sparsecore-torch" in table and "speedup" in table
    only = bench.report(out / "bench.csv", ops=("fwd",), providers=("sparsecore-torch",)).splitlines()
    assert len(only) == 1 + 2 and all(" fwd " in f" {line} " and "sparsecore-torch" in line for line in only[1:])


@pytest.mark.parametrize("fn, op", [("forward", "fwd"), ("forward", "mlp"), ("grad_input", "bwd"),
                                    ("grad_weight", "bwd")])
def test_wrong_kernel_fails_the_row(monkeypatch, tmp_path, caplog, fn, op):
    real = getattr(reference, fn)
    monkeypatch.setattr(reference, fn, lambda *a: real(*a) * 1.05)  # 5% off: far past fp32 tolerance
    out = tmp_path / "out"
    with caplog.at_level(logging.ERROR, logger="sparsecore.bench"):
        rc = cli.main(["bench", *TINY, "--ops", op, "--providers", "dense,sparsecore-torch", "--out", str(out)])
    assert rc == 1
    assert "WRONG RESULT provider sparsecore-torch" in caplog.text and "M=3 N=128 K=96" in caplog.text
    _, rows = _read(out / "bench.csv")
    assert {r["provider"] for r in rows} == {"dense"}  # the wrong rows are never timed


def test_wrong_kernel_raises_from_run(monkeypatch, tmp_path):
    monkeypatch.setattr(reference, "forward", lambda x, values, *a: torch.zeros(x.shape[0], a[-3], dtype=x.dtype))
    args = _parser().parse_args([*TINY, "--ops", "fwd", "--providers", "sparsecore-torch", "--out", str(tmp_path)])
    with pytest.raises(bench.BenchError, match=r"sparsecore-torch.*M=3 N=128 K=96.*block=16x16"):
        bench.run(bench.make_config(args))


def test_wrong_baseline_skips_its_row(monkeypatch, tmp_path, caplog):
    """A third-party provider's wrong result is its own numerics: the row is skipped (never
    timed) and the run goes on; ours fail the run (above)."""
    real = bench.TorchBSR.linear
    monkeypatch.setattr(bench.TorchBSR, "linear", lambda self, *a: (lambda f: lambda x: f(x) * 1.05)(real(self, *a)))
    with caplog.at_level(logging.INFO, logger="sparsecore.bench"):
        rc = cli.main(["bench", *TINY, "--ops", "fwd", "--providers", "dense,torch-bsr", "--out", str(tmp_path)])
    assert rc == 0 and "WRONG RESULT provider torch-bsr" in caplog.text
    _, rows = _read(tmp_path / "bench.csv")
    assert rows and {r["provider"] for r in rows} == {"dense"}


def test_sigterm_keeps_rows_table_and_fails(monkeypatch, tmp_path):
    """`timeout` ending a device run: the rows timed so far stay, the table is still written,
    the run fails, and the previous SIGTERM handler is back."""
    real, seen = bench.Runner.run_task, []

    def run_task(self, t):
        seen.append(t)
        if len(seen) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, t)
    monkeypatch.setattr(bench.Runner, "run_task", run_task)
    before = signal.getsignal(signal.SIGTERM)
    rc = cli.main(["bench", *TINY, "--ops", "fwd", "--providers", "dense,sparsecore-torch", "--out", str(tmp_path)])
    assert rc == 1 and len(seen) == 3 and signal.getsignal(signal.SIGTERM) is before
    _, rows = _read(tmp_path / "bench.csv")
    table = (tmp_path / "table.txt").read_text()
    assert len(rows) == 2 and all(f"{r['provider']}" in table for r in rows)


def _parser():
    import argparse
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    return p


def test_flags_parse_and_reject(tmp_path):
    cfg = bench.make_config(_parser().parse_args(
        ["--device", "cpu", "--shapes", "llama3-8b-up,64x32", "--blocks", "64,64x32", "--densities", "0.1",
         "--tokens", "1,16", "--dtype", "fp32,bf16", "--out", str(tmp_path)]))
    assert cfg.shapes == (("llama3-8b-up", 14336, 4096), ("64x32", 64, 32))
    assert cfg.blocks == ((64, 64), (64, 32)) and cfg.tokens == (1, 16)
    assert cfg.dtypes == (torch.float32, torch.bfloat16)
    assert cfg.providers == bench.CPU_PROVIDERS and cfg.decoder == "tiny"
    for flag, value in (("--blocks", "24"), ("--densities", "0"), ("--shapes", "12xa"), ("--ops", "conv"),
                        ("--providers", "cusparse"), ("--tokens", "-1"), ("--threads", "0"),
                        ("--blocks", "32x32x32"), ("--warmup-ms", "inf"), ("--rep-ms", "nan")):
        with pytest.raises(sc.SparseCoreError, match=flag):
            bench.make_config(_parser().parse_args(["--device", "cpu", flag, value]))


def test_cli_errors_are_one_line(tmp_path, capsys):
    """Bad flags, a missing or foreign report file, no runnable provider: one line, exit 2."""
    (tmp_path / "notes.txt").write_text("hello\n")
    for argv, text in ((["--blocks", "24"], "--blocks: expected B or BNxBK"),
                       (["--report", str(tmp_path / "none.csv")], "No such file"),
                       (["--report", str(tmp_path / "notes.txt")], "--report: expected a bench.csv"),
                       (["--providers", "sparsecore-cuda", "--ops", "fwd", "--out", str(tmp_path / "o")],
                        "--providers: expected at least one that runs on cpu")):
        assert cli.main(["bench", "--device", "cpu", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("sparsecore bench: error: ") and text in err[-1] and "Traceback" not in err


def test_structures_keep_what_they_claim():
    w = torch.randn(8, 64)
    w24 = bench.two_four(w)
    groups, kept = w.reshape(8, 16, 4), w24.reshape(8, 16, 4)
    assert ((kept != 0).sum(-1) == 2).all()
    # the kept two are the two largest magnitudes of each group
    assert torch.equal(kept.abs().sum(-1), groups.abs().topk(2, dim=-1).values.sum(-1))
    assert bench.packed_k(4096, 0.1) == 416 and bench.packed_k(96, 0.01) == 16 and bench.packed_k(96, 1.0) == 96
    assert bench.packed_k(70, 1.0) == 70  # not rounded down to 64: the oracle at density 1 is dense


def test_cpu_timer_quantiles_order():
    x = torch.randn(64, 64)
    p50, p20, p80 = bench.time_cpu(lambda: x @ x, warmup_ms=1, rep_ms=5)
    assert 0 < p20 <= p50 <= p80


def test_plot_written(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(gpu="cpu", torch="t", commit="c", op="fwd", provider=p, block_n=b, block_k=b, density=d,
                 speedup_vs_dense=s) for p, b, d, s in (("dense", 0, 1.0, 1.0), ("sparsecore-torch", 32, 0.5, 1.5),
                                                        ("sparsecore-torch", 32, 0.1, 4.0))]
    assert bench.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_crash_of_our_provider_fails_the_run(monkeypatch, tmp_path, caplog):
    def boom(*a):
        raise RuntimeError("kernel exploded")
    monkeypatch.setattr(reference, "forward", boom)
    with caplog.at_level(logging.ERROR, logger="sparsecore.bench"):
        rc = cli.main(["bench", *TINY, "--ops", "fwd", "--providers", "dense,sparsecore-torch", "--out", str(tmp_path)])
    assert rc == 1 and "ERROR provider sparsecore-torch" in caplog.text and "kernel exploded" in caplog.text


class _FakeCuda:
    """Just enough of torch.cuda for bench.time_cuda_graph's control flow on the CPU."""

    def __init__(self, monkeypatch, capture_end_error=None, released_by_torch=False):
        self.calls = []
        fake = self

        class Graph:
            def capture_begin(self, pool):
                fake.calls.append(("capture_begin", pool))

            def capture_end(self):
                if capture_end_error:
                    raise RuntimeError(capture_end_error)

            def replay(self):
                fake.calls.append("replay")

        class Event:
            def __init__(self, enable_timing):
                pass

            def record(self):
                pass

            def elapsed_time(self, other):
                return 2.0

        def end_pool(device, pool):
            fake.calls.append(("end", pool))
            if released_by_torch:
                raise RuntimeError("endAllocatePool: not currently recording to mempool_id")

        class Stream:
            def wait_stream(self, other):
                pass

        for name, value in {"current_device": lambda: 0, "Stream": Stream, "current_stream": Stream,
                            "stream": lambda s: __import__("contextlib").nullcontext(), "Event": Event,
                            "synchronize": lambda: None, "graph_pool_handle": lambda: (0, 7),
                            "CUDAGraph": Graph}.items():
            monkeypatch.setattr(torch.cuda, name, value, raising=False)
        monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", end_pool, raising=False)
        monkeypatch.setattr(torch._C, "_cuda_releasePool", lambda d, p: self.calls.append(("release", p)),
                            raising=False)


def test_cuda_graph_timer_cleans_up_a_failed_capture(monkeypatch):
    """torch's capture_end raises (capture invalidated by a host sync) before it takes the caching
    allocator out of capture mode; unless the timer ends that and releases the pool, every later
    torch.cuda.empty_cache() fails an internal assert. Then it raises (time_cuda falls back)."""
    fake = _FakeCuda(monkeypatch, capture_end_error="operation not permitted when stream is capturing")
    with pytest.raises(RuntimeError, match="capturing"):
        bench.time_cuda_graph(lambda: None, 10.0)
    assert fake.calls == [("capture_begin", (0, 7)), ("end", (0, 7)), ("release", (0, 7))]
    # capture_end failed after the allocator's part: the graph releases its own pool
    fake = _FakeCuda(monkeypatch, capture_end_error="Invalid capture.", released_by_torch=True)
    with pytest.raises(RuntimeError, match="Invalid capture"):
        bench.time_cuda_graph(lambda: None, 10.0)
    assert fake.calls == [("capture_begin", (0, 7)), ("end", (0, 7))]
    # a capture that works (every event pair reads 2 ms): estimate 2/5 ms per call, so the graph
    # holds 10 / 0.4 = 25 calls; 10 replays, each 2 ms / 25 calls
    fake = _FakeCuda(monkeypatch)
    calls = []
    assert bench.time_cuda_graph(lambda: calls.append(1), 10.0) == pytest.approx((0.08,) * 3)
    assert len(calls) == 1 + 5 + 25 and fake.calls.count("replay") == 10


@pytest.mark.gpu
def test_gpu_harness_tiny(tmp_path):
    """Every available GPU provider on a tiny bf16 config: graphs for small M, events for
    larger M, copies rotated past L2."""
    rc = cli.main(["bench", "--device", "cuda", "--shapes", "256x128", "--tokens", "1,130", "--densities", "0.5",
                   "--blocks", "32", "--ops", "fwd,bwd", "--rep-ms", "5",
                   "--warmup-ms", "1", "--no-plot", "--out", str(tmp_path)])
    assert rc == 0
    _, rows = _read(tmp_path / "bench.csv")
    assert {r["dtype"] for r in rows} == {"bf16"} and not rows[0]["gpu"].startswith("cpu")
    provs = {r["provider"] for r in rows}
    assert {"dense", "oracle", "sparsecore-torch", "sparsecore-triton"} <= provs
    small = [r for r in rows if r["op"] == "fwd" and r["M"] == "1" and r["provider"] == "dense"]
    assert small and int(small[0]["copies"]) > 1  # a 64 KiB weight is far below L2: rotated
    assert {r["timer"] for r in rows if r["M"] == "130"} == {"events"}
    # our GPU ops are capturable (the reference backend syncs: it is timed with events)
    assert {r["timer"] for r in rows if r["M"] == "1" and r["provider"] in (
        "dense", "oracle", "sparsecore-triton", "sparsecore-cuda")} == {"cudagraph"}
