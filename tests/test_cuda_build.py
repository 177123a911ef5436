"""The CUDA extension ``sparsecore._C`` as built — checked without a GPU.

Runs wherever setup.py builds the extension (nvcc + a CUDA build of torch, no
SPARSECORE_SKIP_CUDA_BUILD): the module imports and registers its ops, the meta kernel
checks inputs, and the compiled kernels are read back from the .so with cuobjdump:
no spills, HGMMA + TMA (UTMALDG) + mbarriers in the sm_90a kernel, HMMA + ldmatrix + cp.async in the sm80 one and
the backward ones (ldmatrix.trans there), 16-byte loads + HMMA in the decode kernel. Also: an unloadable build never breaks
``import sparsecore`` and warns once.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "csrc"))
import sparsecore_build  # noqa: E402

# (bsr_fwd_decode_rows before bsr_fwd_decode: a name is matched by the first base it contains)
KERNELS = ("bsr_fwd_sm80", "bsr_fwd_sm90", "bsr_fwd_decode_rows", "bsr_fwd_decode", "bsr_finalize", "bsr_dx_sm80",
           "bsr_dw_sm80", "bsr_dw_finalize")


_SKIP = sparsecore_build.toolkit(torch)[1]
needs_build = pytest.mark.skipif(_SKIP is not None, reason=f"extension not built here: {_SKIP}")


def _archs():
    return sparsecore_build.parse_archs(os.environ.get("SPARSECORE_CUDA_ARCHS", sparsecore_build.DEFAULT_ARCHS))


def _so_path():
    spec = importlib.util.find_spec("sparsecore._C")
    assert spec is not None and spec.origin and spec.origin.endswith(".so"), \
        "sparsecore._C was not built: run `pip install --no-build-isolation -e .` with CUDA_HOME set"
    return spec.origin


def _cuobjdump():
    import triton

    cands = [os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"),
             os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump"),
             shutil.which("cuobjdump") or ""]
    for c in cands:
        if c and os.path.exists(c):
            return c
    pytest.fail(f"cuobjdump not found in {cands}")


def _sections(text: str, header: str):
    """cuobjdump output -> {(arch, kernel base name, mangled): body} for our kernels."""
    out, arch, name, body = {}, None, None, []

    def close():
        if name is not None:
            base = next((k for k in KERNELS if k in name), None)
            if base:
                out[(arch, base, name)] = "\n".join(body)

    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            close()
            arch, name, body = m.group(1), None, []
            continue
        m = re.match(header, line)
        if m:
            close()
            name, body = m.group(1), []
            continue
        body.append(line)
    close()
    return out


# -- build flags (pure Python) ------------------------------------------------------------
def test_arch_flags():
    assert sparsecore_build.parse_archs("80;90a") == ["80", "90a"]
    assert sparsecore_build.parse_archs("8.0, 9.0a") == ["80", "90a"]
    assert sparsecore_build.gencode_flags(["80", "90a"]) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_80,code=compute_80"]
    kw = sparsecore_build.extension_kwargs("/usr/local/cuda")
    assert "-O3" in kw["extra_compile_args"]["nvcc"]
    for bad in ("", "75", "sm_90", "90b"):
        with pytest.raises(ValueError, match="SPARSECORE_CUDA_ARCHS"):
            sparsecore_build.parse_archs(bad)


@pytest.mark.parametrize("release, torch_cuda, why", [
    ("13.0", "13.0", None),
    ("13.0", "12.4", "set CUDA_HOME to a CUDA 12.x toolkit"),  # was torch's RuntimeError: pip install failed
    ("12.8", "13.0", "set CUDA_HOME to a CUDA 13.x toolkit"),
    ("11.8", "11.8", "need CUDA 12 or newer"),
    ("garbled", "13.0", "unknown version"),
    ("13.0", None, "CPU build"),
])
def test_toolkit_decides_the_build(tmp_path, monkeypatch, release, torch_cuda, why):
    """setup.py builds only against a toolkit torch will build with (same major CUDA, 12+);
    otherwise a pure-Python install that says why. A fake nvcc stands in for the toolkit."""
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.delenv("SPARSECORE_SKIP_CUDA_BUILD", raising=False)
    fake = type(torch)("torch")
    fake.__version__, fake.version = "2.x", type(torch)("version")
    fake.version.cuda = torch_cuda
    home, got = sparsecore_build.toolkit(fake)
    if why is None:
        assert (home, got) == (str(tmp_path), None)
    else:
        assert home is None and why in got, got
    monkeypatch.setenv("SPARSECORE_SKIP_CUDA_BUILD", "1")
    assert sparsecore_build.toolkit(fake) == (None, "SPARSECORE_SKIP_CUDA_BUILD=1")


# -- the module and its ops --------------------------------------------------------------
@needs_build
def test_extension_loads_and_registers_ops():
    import sparsecore._C  # noqa: F401
    from sparsecore.backends import cuda

    assert cuda._load() is None
    assert hasattr(torch.ops.sparsecore, "cuda_bsr_linear")
    assert torch.ops.sparsecore.cuda_has_sm90a() == ("90a" in _archs())
    ok, why = cuda.available()
    assert ok == torch.cuda.is_available(), why


@needs_build
def test_info_reports_the_build(capsys):
    from sparsecore.cli import main

    assert main(["info"]) == 0
    want = "yes" if "90a" in _archs() else "no"
    assert f"sparsecore._C   built; sm_90a wgmma kernel: {want}" in capsys.readouterr().out


def _meta_args(M=5, K=100, N=120, block=(32, 32), nnzb=3, dtype=torch.float16):
    R = -(-N // block[0])
    i32 = lambda n: torch.empty(n, dtype=torch.int32, device="meta")
    return [torch.empty(M, K, dtype=dtype, device="meta"), torch.empty(nnzb, *block, dtype=dtype, device="meta"),
            i32(R + 1), i32(nnzb), i32(nnzb), i32(R), N]


@needs_build
def test_meta_kernel_shape():
    import sparsecore._C  # noqa: F401

    op = torch.ops.sparsecore.cuda_bsr_linear
    for dtype in (torch.float16, torch.bfloat16):
        y = op(*_meta_args(M=7, dtype=dtype), torch.empty(120, dtype=dtype, device="meta"), "gelu", "auto")
        assert y.shape == (7, 120) and y.dtype == dtype and y.device.type == "meta"
    assert op(*_meta_args(M=0, block=(64, 16), N=64)).shape == (0, 64)


@needs_build
@pytest.mark.parametrize("change, match", [
    (lambda a: a.__setitem__(0, a[0].float()), "x: expected dtype float16 or bfloat16"),
    (lambda a: a.__setitem__(0, a[0][0]), "x: expected a 2-D tensor"),
    (lambda a: a.__setitem__(1, a[1].bfloat16()), "values: expected dtype"),
    (lambda a: a.__setitem__(1, torch.empty(3, 48, 32, dtype=torch.float16, device="meta")), "values: expected blocks"),
    (lambda a: a.__setitem__(2, a[2].long()), "row_ptr: expected int32"),
    (lambda a: a.__setitem__(3, a[3][:2]), "col_idx: expected int32 \\[3\\]"),
    (lambda a: a.__setitem__(5, a[5][:1]), "row_order: expected int32 \\[4\\]"),
    (lambda a: a.__setitem__(6, 129), "out_features: expected a value in \\(96, 128\\]"),
    (lambda a: a.append(torch.empty(7, dtype=torch.float16, device="meta")), "bias: expected shape \\(120,\\)"),
    (lambda a: a.extend([None, "tanh"]), "activation: expected one of"),
    (lambda a: a.extend([None, "none", "fast"]), "kernel: expected one of auto, sm80, sm90, decode"),
])
def test_meta_kernel_rejects_bad_input(change, match):
    import sparsecore._C  # noqa: F401

    args = _meta_args()
    change(args)
    with pytest.raises(RuntimeError, match=match):
        torch.ops.sparsecore.cuda_bsr_linear(*args)


@needs_build
def test_meta_kernels_of_the_backward():
    import sparsecore._C  # noqa: F401

    meta = lambda *shape, dtype=torch.bfloat16: torch.empty(*shape, dtype=dtype, device="meta")
    i32 = lambda n: meta(n, dtype=torch.int32)
    dy, x = meta(6, 120), meta(6, 100)
    dx = torch.ops.sparsecore.cuda_bsr_linear_grad_input(dy, meta(5, 32, 64), i32(3), i32(5), i32(5), 100)
    assert dx.shape == (6, 100) and dx.dtype == torch.bfloat16
    dv = torch.ops.sparsecore.cuda_bsr_linear_grad_weight(dy, x, i32(5), i32(5), 32, 64)
    assert dv.shape == (5, 32, 64) and dv.dtype == torch.bfloat16
    bad = [
        (lambda: torch.ops.sparsecore.cuda_bsr_linear_grad_input(dy, meta(5, 32, 64), i32(3), i32(5), i32(5), 129),
         "in_features: expected a value in \\(64, 128\\]"),
        (lambda: torch.ops.sparsecore.cuda_bsr_linear_grad_input(dy, meta(5, 32, 64), i32(3), i32(4), i32(5), 100),
         "row_idx: expected int32 \\[5\\]"),
        (lambda: torch.ops.sparsecore.cuda_bsr_linear_grad_input(dy.float(), meta(5, 32, 64), i32(3), i32(5), i32(5),
                                                                 100), "dy: expected dtype"),
        (lambda: torch.ops.sparsecore.cuda_bsr_linear_grad_weight(dy, meta(7, 100), i32(5), i32(5), 32, 64),
         "x: expected 6 rows"),
        (lambda: torch.ops.sparsecore.cuda_bsr_linear_grad_weight(dy, x, i32(5), i32(5), 48, 64),
         "block_n: expected one of"),
        (lambda: torch.ops.sparsecore.cuda_bsr_linear_grad_weight(dy, x, i32(4), i32(5), 32, 64),
         "block_row: expected int32 \\[5\\]"),
    ]
    for call, match in bad:
        with pytest.raises(RuntimeError, match=match):
            call()


@needs_build
def test_meta_kernels_trace_with_symbolic_sizes():
    """make_fx with dynamic shapes (as torch.compile with another M or nnzb) traces all three
    ops: sizes are symbolic there, so the size checks wait for the real call."""
    import sparsecore._C  # noqa: F401
    from torch.fx.experimental.proxy_tensor import make_fx

    ops = torch.ops.sparsecore
    meta = lambda *shape, dtype=torch.float16: torch.empty(*shape, dtype=dtype, device="meta")  # noqa: E731
    i32 = lambda n: meta(n, dtype=torch.int32)  # noqa: E731
    x, dy, v = meta(8, 64), meta(8, 64), meta(5, 16, 32)
    cases = [
        (lambda x, v, rp, ci, br, ro: ops.cuda_bsr_linear(x, v, rp, ci, br, ro, 64), (x, v, i32(5), i32(5), i32(5), i32(4)),
         (8, 64)),
        (lambda dy, v, cp, ri, tp: ops.cuda_bsr_linear_grad_input(dy, v, cp, ri, tp, 64), (dy, v, i32(3), i32(5), i32(5)),
         (8, 64)),
        (lambda dy, x, br, ci: ops.cuda_bsr_linear_grad_weight(dy, x, br, ci, 16, 32), (dy, x, i32(5), i32(5)),
         (5, 16, 32)),
    ]
    for fn, args, shape in cases:
        out = [n for n in make_fx(fn, tracing_mode="symbolic")(*args).graph.nodes if n.op == "call_function"][-1]
        assert len(out.meta["val"].shape) == len(shape)
        assert tuple(make_fx(fn, tracing_mode="real")(*args)(*args).shape) == shape


# -- the compiled kernels ----------------------------------------------------------------
@needs_build
def test_no_register_spills():
    res = subprocess.run([_cuobjdump(), "--dump-resource-usage", _so_path()], capture_output=True, text=True,
                         check=True).stdout
    funcs = _sections(res, r"\s*Function (\S+):")
    archs = {f"sm_{a}" for a in _archs()}
    assert {a for a, _, _ in funcs} == archs
    expected = {"bsr_fwd_sm80": 8, "bsr_fwd_sm90": 8, "bsr_fwd_decode_rows": 8, "bsr_fwd_decode": 8, "bsr_dx_sm80": 8,
                "bsr_dw_sm80": 32}
    for arch in archs:  # 2 dtypes x 4 block sides (x 4 for dW: both sides)
        for k, n in expected.items():
            assert sum(1 for a, b, _ in funcs if (a, b) == (arch, k)) == n, (arch, k)
    for (arch, _, name), body in funcs.items():
        usage = dict(re.findall(r"(\w+):(\d+)", body))
        assert usage["STACK"] == "0" and usage["LOCAL"] == "0", f"{arch} {name} spills: {body.strip()}"
        assert int(usage["REG"]) <= 255, f"{arch} {name}: {usage['REG']} registers"


@needs_build
def test_sass_uses_tensor_cores():
    sass = subprocess.run([_cuobjdump(), "--dump-sass", _so_path()], capture_output=True, text=True,
                          check=True).stdout
    funcs = _sections(sass, r"\s*Function : (\S+)")
    seen = set()
    for (arch, base, name), body in funcs.items():
        seen.add((arch, base))
        if base == "bsr_fwd_sm80":  # cp.async + ldmatrix + mma.sync
            for op in ("HMMA.16816.F32", "LDSM.16.M88.4", "LDGSTS.E.BYPASS.128", "LDGDEPBAR"):
                assert op in body, f"{arch} {name}: no {op}"
        elif base in ("bsr_dx_sm80", "bsr_dw_sm80"):  # cp.async + ldmatrix.trans + mma.sync
            for op in ("HMMA.16816.F32", "LDSM.16.MT88.4", "LDGSTS.E.BYPASS.128"):
                assert op in body, f"{arch} {name}: no {op}"
        elif base in ("bsr_fwd_decode", "bsr_fwd_decode_rows"):  # 16-byte loads + mma.sync
            assert "HMMA.16816.F32" in body and "LDG.E.128" in body, f"{arch} {name}"
            if base == "bsr_fwd_decode_rows" and arch == "sm_90a":  # the cluster reduction's barriers
                assert "UCGABAR_ARV" in body and "UCGABAR_WAIT" in body, f"{name}: no cluster barrier"
        elif base == "bsr_fwd_sm90" and arch == "sm_90a":
            assert re.search(r"HGMMA\.64x\d+x16\.F32", body), f"{name}: no HGMMA"
            # TMA tile loads completing on mbarriers, waited on by the consumer warpgroups
            for op in ("UTMALDG.2D", "SYNCS.ARRIVE.TRANS64", "SYNCS.PHASECHK.TRANS64.TRYWAIT"):
                assert op in body, f"{name}: no {op}"
            # one wgmma group left in flight while the next chunk is prepared
            assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in body, f"{name}: wgmma not overlapped"
            if "Li64E" in name:  # SWAP: N = 128 rows of x, the transposed tile staged by stmatrix .trans
                assert re.search(r"HGMMA\.64x128x16", body) and "STSM.16.MT88.4" in body, name
    for a in _archs():
        for k in ("bsr_fwd_sm80", "bsr_fwd_decode", "bsr_fwd_decode_rows", "bsr_dx_sm80", "bsr_dw_sm80") + (
                ("bsr_fwd_sm90",) if a == "90a" else ()):
            assert (f"sm_{a}", k) in seen, (a, k)


@needs_build
def test_sm90_wgmma_not_serialized(tmp_path):
    """ptxas keeps every wgmma of the sm_90a kernel asynchronous: no C7518 "wgmma.mma_async
    instructions are serialized" (a wgmma on a path ptxas cannot prove warpgroup-uniform, or
    accumulators touched while in flight, makes it wait after each one)."""
    if "90a" not in _archs():
        pytest.skip("not built for sm_90a")
    from torch.utils import cpp_extension

    home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME
    r = subprocess.run([os.path.join(home, "bin", "nvcc"), "-std=c++17", "-O3", f"-I{ROOT}/csrc",
                        "-gencode=arch=compute_90a,code=sm_90a", "-DSPARSECORE_HAS_SM90A", "-Xptxas", "-v",
                        "-c", os.path.join(ROOT, "csrc", "bsr_sm90.cu"), "-o", str(tmp_path / "k.o")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bsr_fwd_sm90" in r.stderr and "serialized" not in r.stderr, r.stderr[-3000:]


# -- host-side planning ------------------------------------------------------------------
@needs_build
def test_decode_plan_rule(tmp_path):
    """decode_split (bsr_kernels.h), compiled on the host over a grid of shapes: 1 when the
    (block-row, 16-row group) CTAs fill the SMs; else without clusters 0 (the split kernel);
    with clusters of up to X CTAs the smallest power of two <= X that fills the SMs or gives
    every unit of a mean block-row its own warp (8 per CTA), 0 when even X would leave half
    the SMs idle."""
    from torch.utils import cpp_extension

    src = tmp_path / "plan.cpp"
    src.write_text(textwrap.dedent("""
        #include <cstdio>
        #include "bsr_kernels.h"
        int main() {
          const int rs[] = {1, 2, 7, 8, 9, 16, 17, 33, 64, 131, 132, 300};
          const int ms[] = {1, 16, 17, 64};
          const long long units[] = {0, 5, 64, 500, 5000, 100000};
          for (int sms : {16, 108, 132})
            for (int r : rs) for (int m : ms) for (long long u : units) for (int c : {1, 2, 8})
              std::printf("%d %d %d %lld %d %d\\n", sms, r, m, u, c, sparsecore::decode_split(r, m, u, 5, sms, c));
        }"""))
    home = os.environ.get("CUDA_HOME") or cpp_extension.CUDA_HOME
    exe = tmp_path / "plan"
    subprocess.run([os.path.join(home, "bin", "nvcc"), "-std=c++17", f"-I{ROOT}/csrc", str(src), "-o", str(exe)],
                   check=True, capture_output=True)
    rows = [tuple(int(v) for v in line.split()) for line in subprocess.run(
        [str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()]
    assert len(rows) == 3 * 12 * 4 * 6 * 3
    for sms, r, m, units, most, s in rows:
        ctas = r * -(-m // 16)
        if ctas >= sms:
            assert s == 1
        elif most == 1 or 2 * most * ctas < sms:
            assert s == 0
        else:
            assert s in (1, 2, 4, 8) and s <= most
            done = lambda k: ctas * k >= sms or 8 * k * r >= units  # noqa: E731
            assert s == most or done(s), (sms, r, m, units, s)
            assert s == 1 or not done(s // 2), (sms, r, m, units, s)


# -- an unloadable build -----------------------------------------------------------------
def test_unloadable_extension_warns_once(tmp_path):
    """A copy of the package whose _C is garbage: import works, the backend warns once."""
    pkg = tmp_path / "sparsecore"
    shutil.copytree(os.path.join(ROOT, "sparsecore"), pkg,
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (pkg / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}").write_bytes(b"not an ELF file")
    script = textwrap.dedent("""
        import warnings
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import sparsecore, torch
            from sparsecore.backends import cuda
            assert sparsecore.__file__.startswith(%r), sparsecore.__file__
            first, again = cuda.available(), cuda.available()
            x = torch.zeros(2, 32)
            y = sparsecore.ops.bsr_linear(x, sparsecore.BlockSparseWeight.from_dense(
                torch.ones(32, 32), torch.ones(1, 1, dtype=torch.bool), block=32), backend="auto")
        assert first[0] is False and again == first and "sparsecore._C" in first[1], first
        assert not cuda.supports(x, x)
        assert float(y.sum()) == 0.0
        msgs = [str(w.message) for w in caught if "sparsecore._C" in str(w.message)]
        assert len(msgs) == 1, msgs
        print("OK")
    """ % str(tmp_path))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=str(tmp_path))
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]
