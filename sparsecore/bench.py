"""Microbenchmarks: every provider side by side, each checked against float64 before it is timed.

    sparsecore bench --quick --out out/         # bf16 on a GPU (estimated a few minutes on an H100)
    sparsecore bench --ops fwd --shapes 4096 --tokens 256 --densities 0.1 --blocks 32,64

Without a GPU the same command benchmarks the CPU path (fp32, small shapes) and says so.

Every provider computes with an *effective dense weight* ``W_eff [N, K]`` derived from one
random weight ``W`` by its structure, so one float64 product is the reference for all::

    structure  providers                                  W_eff                  row density
    dense      dense (F.linear, cuBLAS)                   W                      1
    packed     oracle (dense GEMM over the kept K)        W[:, :Kk], rest 0      Kk / K
    block      sparsecore-{torch,triton,cuda},            W * block mask         kept blocks
               torch-bsr, torchao-bsr
    2:4        semi-2:4 (at 50% only)                     2 largest |w| of 4     0.5

Ops (``M`` = tokens): ``fwd`` y = x W^T; ``bwd`` dX = dY W and dW (kept blocks only);
``mlp`` down(gelu(up(x))) with up ``[N, K]``, down ``[K, N]``; ``decoder`` a stack of
Llama-3-8B-shaped layers (RMSNorm, dense attention projections, SDPA with GQA, SwiGLU MLP
whose gate/up/down use the provider): M <= 16 is a decode step of a batch of M sequences
over a KV cache, larger M a causal prefill of M tokens.

A row: build the problem (random data, never zeros) -> provider prepares copy 0 -> its
output is compared with the float64 reference (relative Frobenius error within a dtype
tolerance; a wrong result fails the row, and the run exits nonzero) -> more copies until
they exceed twice the L2 cache (rotated every call) -> timed: CUDA events via
``triton.testing.do_bench`` (for M <= 128 a CUDA graph of many calls: ``time_cuda_graph``), or
``time.perf_counter`` on the CPU; median, p20, p80.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from . import backends
from .errors import SparseCoreError, check
from .format import BlockMask, BlockSparseWeight, grid_shape, normalize_block
from .prune.magnitude import select_blocks

log = logging.getLogger("sparsecore.bench")

# CSV columns (bench/README.md), in order (other tools parse them); extras only at the end.
CSV_COLUMNS = ("gpu", "torch", "triton", "cuda", "commit", "op", "provider", "dtype", "M", "N", "K",
               "block_n", "block_k", "density", "ms_p50", "ms_p20", "ms_p80", "tflops",
               "speedup_vs_dense", "pct_of_ideal", "eff_vs_oracle")
EXTRA_COLUMNS = ("nominal_density", "rel_err", "tol", "tokens_per_s", "copies", "timer", "detail", "gbps",
                 "pct_of_copy_bw", "copy_gbps")

OPS = ("fwd", "bwd", "mlp", "decoder")
PROVIDERS = ("dense", "oracle", "sparsecore-torch", "sparsecore-triton", "sparsecore-cuda", "torch-bsr",
             "torchao-bsr", "semi-2:4")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Relative Frobenius error allowed for one matmul's output, per dtype: one rounding of the
# output after fp32 accumulation (fp32 allows TF32, Triton's default fp32 dot). Composite
# ops multiply it by their depth (OP_DEPTH). A wrong kernel is off by O(1).
REL_TOL = {torch.float32: 5e-3, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
OP_DEPTH = {"fwd": 1, "bwd": 1, "mlp": 2, "decoder": 4}

# Named shapes (N, K) = (out_features, in_features) of the speed targets (bench/README.md).
SHAPES = {
    "4096": (4096, 4096), "8192": (8192, 8192),                      # also Llama-3-8B q/o proj
    "llama3-8b-up": (14336, 4096), "llama3-8b-down": (4096, 14336), "llama3-8b-kv": (1024, 4096),
    "vith-fc1": (5120, 1280), "vith-fc2": (1280, 5120),
    "1024": (1024, 1024),
}
# Decoder layer shapes: hidden, MLP intermediate, query heads, KV heads, head dim.
DECODERS = {"llama3-8b": dict(hidden=4096, inter=14336, heads=32, kv_heads=8, head_dim=128),
            "tiny": dict(hidden=256, inter=896, heads=8, kv_heads=2, head_dim=32)}
DECODE_MAX_M = 16      # decoder: M <= this is a decode step of M sequences, else a prefill
GRAPH_MAX_M = 128      # CUDA graphs (launch overhead hidden) up to this many tokens

PRESETS = {  # (device kind, preset) -> defaults; flags override each field. GPU quick: fwd and
    # decoder first, so a run cut short by a time limit keeps them
    ("cuda", "quick"): dict(ops="fwd,decoder,bwd,mlp", shapes="4096,llama3-8b-up", tokens="1,2048",
                            densities="0.5,0.1", blocks="32,64", dtype="bf16", layers=2, context=1024),
    ("cuda", "full"): dict(ops="fwd,bwd,mlp,decoder", shapes=",".join(s for s in SHAPES if s != "1024"),
                           tokens="1,16,128,2048,8192", densities="0.5,0.25,0.1,0.05", blocks="16,32,64,128",
                           dtype="bf16", layers=4, context=2048),
    ("cpu", "quick"): dict(ops="fwd,bwd,mlp,decoder", shapes="1024,4096", tokens="16,256", densities="0.5,0.1",
                           blocks="32,64", dtype="fp32", layers=2, context=64),
    ("cpu", "full"): dict(ops="fwd,bwd,mlp,decoder", shapes="1024,4096,llama3-8b-kv", tokens="1,16,256",
                          densities="0.5,0.25,0.1,0.05", blocks="16,32,64,128", dtype="fp32", layers=2, context=128),
}
CPU_PROVIDERS = ("dense", "oracle", "sparsecore-torch", "torch-bsr")  # CPU default (the others need a GPU)


class BenchError(RuntimeError):
    """One or more rows failed (wrong result or a crash of our own provider)."""


class Unsupported(Exception):
    """This provider cannot run this row (dtype, device, block shape...): skipped, not failed."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    device: str
    ops: tuple
    shapes: tuple           # ((name, N, K), ...)
    tokens: tuple
    densities: tuple
    blocks: tuple           # ((BN, BK), ...)
    dtypes: tuple
    providers: tuple
    layers: int
    context: int
    decoder: str
    out: Path
    seed: int = 0
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    plot: bool = True
    threads: Optional[int] = None   # CPU: torch.set_num_threads for the run


def _csv(arg: str, text: str, convert, allowed=None, what="") -> tuple:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    check(items, arg, "a comma-separated list", repr(text))
    out = []
    for t in items:
        try:
            v = convert(t)
        except (ValueError, KeyError):
            v = None
        check(v is not None and (allowed is None or v in allowed), arg,
              f"items from {allowed}" if allowed else what, repr(t))
        out.append(v)
    return tuple(dict.fromkeys(out))


def _shape(t: str):
    if t in SHAPES:
        return (t, *SHAPES[t])
    n, k = t.lower().split("x")
    n, k = int(n), int(k)
    if n <= 0 or k <= 0:
        raise ValueError(t)
    return (t, n, k)


def _block(t: str):
    parts = t.lower().split("x")
    if len(parts) > 2:
        raise ValueError(t)
    try:
        return normalize_block(int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1])))
    except SparseCoreError:
        raise ValueError(t)


def _density(t: str):
    d = float(t)
    if not 0.0 < d <= 1.0:
        raise ValueError(t)
    return d


def _tokens(t: str):
    m = int(t)
    if m <= 0:
        raise ValueError(t)
    return m


def make_config(args) -> Config:
    """Resolve flags over the preset of the device (``--quick`` is the default preset)."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    check(device == "cpu" or torch.cuda.is_available(), "--device", "cpu (no CUDA GPU is visible)", device)
    preset = PRESETS[(device, "full" if args.full else "quick")]
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else preset[name]
    providers = args.providers or ("all" if device == "cuda" else ",".join(CPU_PROVIDERS))
    providers = PROVIDERS if providers == "all" else _csv("--providers", providers, str, PROVIDERS)
    decoder = args.decoder or ("llama3-8b" if device == "cuda" else "tiny")
    check(decoder in DECODERS, "--decoder", f"one of {tuple(DECODERS)}", repr(decoder))
    layers, context = int(pick("layers")), int(pick("context"))
    check(layers > 0, "--layers", "a positive int", layers)
    check(context > 0, "--context", "a positive int", context)
    check(args.threads is None or args.threads > 0, "--threads", "a positive int", args.threads)
    check(0 <= args.warmup_ms < math.inf, "--warmup-ms", "a finite time >= 0", args.warmup_ms)
    check(0 < args.rep_ms < math.inf, "--rep-ms", "a finite time > 0", args.rep_ms)
    return Config(
        device=device, ops=_csv("--ops", pick("ops"), str, OPS),
        shapes=_csv("--shapes", pick("shapes"), _shape, what=f"NxK (positive) or names from {tuple(SHAPES)}"),
        tokens=_csv("--tokens", pick("tokens"), _tokens, what="positive ints"),
        densities=_csv("--densities", pick("densities"), _density, what="kept fractions in (0, 1]"),
        blocks=_csv("--blocks", pick("blocks"), _block, what="B or BNxBK with sides in (16, 32, 64, 128)"),
        dtypes=_csv("--dtype", pick("dtype"), DTYPES.__getitem__, what=f"names from {tuple(DTYPES)}"),
        providers=providers, layers=layers, context=context, decoder=decoder, out=Path(args.out), seed=args.seed,
        warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, plot=not args.no_plot, threads=args.threads)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small preset (default; estimated a few minutes on an H100)")
    g.add_argument("--full", action="store_true", help="every shape, token count, density and block size")
    p.add_argument("--ops", help=f"comma list of {OPS}")
    p.add_argument("--shapes", help=f"comma list of NxK or names {tuple(SHAPES)}")
    p.add_argument("--tokens", help="comma list of M (tokens / rows of x)")
    p.add_argument("--densities", help="comma list of kept fractions in (0, 1]")
    p.add_argument("--blocks", help="comma list of block sides (64) or BNxBK (64x32); sides 16/32/64/128")
    p.add_argument("--dtype", help=f"comma list of {tuple(DTYPES)} (default bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--providers", help=f"'all' or comma list of {PROVIDERS}")
    p.add_argument("--layers", type=int, help="decoder layers in the stack")
    p.add_argument("--context", type=int, help="decoder decode: KV-cache length")
    p.add_argument("--decoder", help=f"decoder layer shape: {tuple(DECODERS)} (default llama3-8b; tiny on the CPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--out", default="out", help="directory for bench.csv, bench.png, table.txt (default ./out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads; default: torch's)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up time per row")
    p.add_argument("--rep-ms", type=float, default=100.0, help="timed time per row")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--report", metavar="CSV", help="only print the table of an earlier run's bench.csv "
                   "(--ops / --providers filter it)")


# ---------------------------------------------------------------------------------------------
# Problems: random data shared by every provider of a row group
# ---------------------------------------------------------------------------------------------
def _gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def packed_k(K: int, density: float) -> int:
    """Columns the packed oracle keeps: density * K rounded to a multiple of 16 (>= 16, <= K);
    all K at density 1."""
    return K if density >= 1.0 else min(K, max(16, int(round(density * K / 16)) * 16))


def two_four(w: torch.Tensor) -> torch.Tensor:
    """``w`` with the 2 smallest |w| of every 4 consecutive entries along K zeroed."""
    N, K = w.shape
    g = w.reshape(N, K // 4, 4)
    keep = torch.zeros_like(g, dtype=torch.bool).scatter_(2, g.abs().topk(2, dim=2).indices, True)
    return (g * keep).reshape(N, K)


@dataclasses.dataclass(frozen=True)
class Structure:
    """How a provider derives W_eff from W (see the module docstring)."""
    kind: str                      # dense | packed | block | 2:4
    density: float = 1.0           # nominal (the flag's value)
    block: Optional[tuple] = None


class Problem:
    """One (op, dtype, M, N, K): its random weights, inputs, masks and cached references.

    Weights ``name -> [out, in]``: fwd/bwd ``w [N, K]``; mlp ``up [N, K]``, ``down [K, N]``;
    decoder per layer ``l{i}.gate/up [I, H]``, ``l{i}.down [H, I]`` (sparse; the rest dense).
    """

    def __init__(self, op, dtype, M, N, K, cfg: Config, shape_name: str):
        self.op, self.dtype, self.M, self.N, self.K = op, dtype, M, N, K
        self.cfg, self.device, self.shape_name = cfg, torch.device(cfg.device), shape_name
        self.seed = cfg.seed * 1_000_003 + zlib.crc32(f"{op} {M} {N} {K} {dtype}".encode())
        if op == "decoder":
            d = DECODERS[cfg.decoder]
            self.heads = (d["heads"], d["kv_heads"], d["head_dim"])
            self.decode = M <= DECODE_MAX_M
        self.loaded = False

    def load(self) -> None:
        """Make the random data (on first use; ``release`` frees it)."""
        if self.loaded:
            return
        self.g = _gen(self.device, self.seed)
        self.cpu_g = torch.Generator().manual_seed(self.seed)
        self._masks, self._refs, self.dense_params, self.dy = {}, {}, {}, None
        M, N, K = self.M, self.N, self.K
        if self.op in ("fwd", "bwd"):
            self.weights = {"w": self._randn(N, K, scale=K ** -0.5)}
            self.x = self._randn(M, K)
            self.dy = self._randn(M, N) if self.op == "bwd" else None
        elif self.op == "mlp":
            self.weights = {"up": self._randn(N, K, scale=K ** -0.5), "down": self._randn(K, N, scale=N ** -0.5)}
            self.x = self._randn(M, K)
        else:  # decoder: N = MLP intermediate I, K = hidden H
            (hq, hkv, hd), H, I = self.heads, K, N
            B, T = (M, 1) if self.decode else (1, M)
            self.weights = {}
            for i in range(self.cfg.layers):
                self.weights[f"l{i}.gate"] = self._randn(I, H, scale=H ** -0.5)
                self.weights[f"l{i}.up"] = self._randn(I, H, scale=H ** -0.5)
                self.weights[f"l{i}.down"] = self._randn(H, I, scale=I ** -0.5)
                for nm, rows in (("q", hq * hd), ("k", hkv * hd), ("v", hkv * hd)):
                    self.dense_params[f"l{i}.{nm}"] = self._randn(rows, H, scale=H ** -0.5)
                self.dense_params[f"l{i}.o"] = self._randn(H, hq * hd, scale=(hq * hd) ** -0.5)
                for nm in ("ln1", "ln2"):
                    self.dense_params[f"l{i}.{nm}"] = 1 + 0.1 * self._randn(H)
                if self.decode:  # cache of `context` past tokens + 1 slot for the new one
                    for nm in ("kc", "vc"):
                        self.dense_params[f"l{i}.{nm}"] = self._randn(B, hkv, self.cfg.context + 1, hd)
            self.x = self._randn(B, T, H)
        self.sparse_names = tuple(self.weights)
        self.loaded = True

    def release(self) -> None:
        for name in ("weights", "dense_params", "x", "dy", "_masks", "_refs", "g", "cpu_g"):
            self.__dict__.pop(name, None)
        self.loaded = False

    def _randn(self, *shape, scale=1.0):
        return (torch.randn(*shape, generator=self.g, device=self.device) * scale).to(self.dtype)

    @property
    def label(self) -> str:
        return (f"op {self.op} dtype {DTYPE_NAMES[self.dtype]} M={self.M} N={self.N} K={self.K}"
                + (f" ({self.shape_name})" if self.shape_name else ""))

    def mask(self, name: str, block, density: float) -> BlockMask:
        """A random block mask keeping round(density * R * C) blocks (cached)."""
        key = (name, block, density)
        if key not in self._masks:
            shape = tuple(self.weights[name].shape)
            scores = torch.rand(grid_shape(shape, block), generator=self.cpu_g)
            self._masks[key] = BlockMask(select_blocks(scores, 1.0 - density).to(self.device), block, shape)
        return self._masks[key]

    def effective(self, name: str, s: Structure) -> torch.Tensor:
        w = self.weights[name]
        if s.kind == "dense":
            return w
        if s.kind == "packed":
            out = torch.zeros_like(w)
            kk = packed_k(w.shape[1], s.density)
            out[:, :kk] = w[:, :kk]
            return out
        if s.kind == "2:4":
            return two_four(w)
        return w * self.mask(name, s.block, s.density).to_dense().to(w.dtype)

    def density_of(self, s: Structure) -> float:
        """The fraction of weight entries the structure keeps (over all sparse weights)."""
        if s.kind == "dense":
            return 1.0
        if s.kind == "2:4":
            return 0.5
        total = sum(w.numel() for w in self.weights.values())
        if s.kind == "packed":
            return sum(w.shape[0] * packed_k(w.shape[1], s.density) for w in self.weights.values()) / total
        return sum(self.mask(n, s.block, s.density).density * w.numel() for n, w in self.weights.items()) / total

    def flops(self, density: float) -> float:
        """FLOPs of one call on the kept weights (attention of the decoder counted dense)."""
        M, N, K = self.M, self.N, self.K
        if self.op == "fwd":
            return 2 * M * N * K * density
        if self.op == "bwd":
            return 4 * M * N * K * density
        if self.op == "mlp":
            return 4 * M * N * K * density
        hq, hkv, hd = self.heads
        B, T = (M, 1) if self.decode else (1, M)
        keys = self.cfg.context + 1 if self.decode else T
        attn_proj = 2 * B * T * K * (2 * hq * hd + 2 * hkv * hd)
        sdpa = 4 * B * hq * T * keys * hd * (1.0 if self.decode else 0.5)
        mlp = 2 * B * T * 3 * K * N * density
        return self.cfg.layers * (attn_proj + sdpa + mlp)

    def bytes_moved(self, s: Structure) -> Optional[int]:
        """Fewest bytes one fwd call must move: read x and the kept weights, write y (the
        measure of a memory-bound decode step); None for the other ops."""
        if self.op != "fwd":
            return None
        es = torch.empty((), dtype=self.dtype).element_size()
        kept = round(self.density_of(s) * self.N * self.K)
        return es * (self.M * self.K + kept + self.M * self.N)

    # -- float64 references ----------------------------------------------------------------
    def reference(self, s: Structure):
        """float64 result of the op with W_eff of structure ``s`` (cached per structure)."""
        if s not in self._refs:
            self._refs = {s: self._reference(s)}  # keep one: tasks are grouped by structure
        return self._refs[s]

    def _reference(self, s: Structure):
        f64 = lambda t: t.double()
        w64 = {n: f64(self.effective(n, s)) for n in self.sparse_names}
        if self.op == "bwd":
            x, dy, w = f64(self.x), f64(self.dy), w64["w"]
            return dy @ w, dy.T @ x
        lin = {n: _dense_linear(w, self.activation(n)) for n, w in w64.items()}
        params = {n: f64(p) for n, p in self.dense_params.items()} if self.op == "decoder" else None
        return self.run_op(lin, f64(self.x), params)

    def activation(self, name: str) -> str:
        """Activation fused into sparse weight ``name``: mlp up -> gelu, decoder gate -> silu."""
        if (self.op, name) == ("mlp", "up") or (self.op == "decoder" and name.endswith(".gate")):
            return "gelu" if self.op == "mlp" else "silu"
        return "none"

    def run_op(self, lin: dict, x, params=None):
        """The forward ops over ``lin`` (name -> callable [..., in] -> [..., out])."""
        if self.op == "fwd":
            return lin["w"](x)
        if self.op == "mlp":
            return lin["down"](lin["up"](x))
        return decoder_forward(x, lin, params, self.cfg.layers, self.heads, self.decode)


def _act(z, activation):
    return {"none": lambda t: t, "relu": F.relu, "gelu": F.gelu, "silu": F.silu}[activation](z)


def _dense_linear(w, activation="none"):
    return lambda x: _act(F.linear(x, w), activation)


def _rms_norm(h, weight, eps=1e-5):
    hf = h.float() if h.dtype != torch.float64 else h
    return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype) * weight


def decoder_forward(h, lin, params, layers, heads, decode):
    """Llama-style layers on ``h [B, T, H]``; ``lin`` holds the MLP linears (gate has silu).

    Decode (T == 1): the new token's k/v go into the last cache slot, attention over all
    ``context + 1`` positions. Prefill: causal attention over the T tokens.
    """
    hq, hkv, hd = heads
    B, T, _ = h.shape
    for i in range(layers):
        p = lambda n: params[f"l{i}.{n}"]
        a = _rms_norm(h, p("ln1"))
        q = F.linear(a, p("q")).view(B, T, hq, hd).transpose(1, 2)
        k = F.linear(a, p("k")).view(B, T, hkv, hd).transpose(1, 2)
        v = F.linear(a, p("v")).view(B, T, hkv, hd).transpose(1, 2)
        if decode:
            kc, vc = p("kc"), p("vc")
            kc[:, :, -1:] = k
            vc[:, :, -1:] = v
            k, v = kc, vc
        o = F.scaled_dot_product_attention(q, k, v, is_causal=not decode, enable_gqa=True)
        h = h + F.linear(o.transpose(1, 2).reshape(B, T, hq * hd), p("o"))
        a = _rms_norm(h, p("ln2"))
        h = h + lin[f"l{i}.down"](lin[f"l{i}.gate"](a) * lin[f"l{i}.up"](a))
    return h


# ---------------------------------------------------------------------------------------------
# Providers
# ---------------------------------------------------------------------------------------------
def _flat(fn, out_features):
    """Wrap a 2-D linear so it takes ``[..., K]``."""
    return lambda x: fn(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], out_features)


class Provider:
    """A way to compute the ops. ``linear`` builds one forward layer from W_eff; ``grads``
    builds the backward of a linear and ``project`` maps the float64 (dX, dW) onto what
    the provider returns."""
    name = ""
    kind = "block"
    ops = ("fwd", "mlp", "decoder")
    ours = False   # a crash is a failure (ours) or a skip (third party)
    graphs = True  # False: the op syncs with the host, so a CUDA graph cannot capture it

    def available(self, device, dtype):
        return True, ""

    def linear(self, prob: Problem, name: str, w_eff, s: Structure, activation: str):
        raise NotImplementedError

    def grads(self, prob, w_eff, s):
        raise Unsupported("no backward")

    def project(self, prob, s, dx64, dw64):
        return dx64, dw64


class Dense(Provider):
    name, kind, ops, ours = "dense", "dense", OPS, True

    def linear(self, prob, name, w_eff, s, activation):
        return _dense_linear(w_eff, activation)

    def grads(self, prob, w_eff, s):
        return lambda dy, x: (dy @ w_eff, dy.T @ x)


class Oracle(Provider):
    """The best a sparse kernel can do: a dense GEMM over only the kept fraction of K."""
    name, kind, ops, ours = "oracle", "packed", OPS, True

    def linear(self, prob, name, w_eff, s, activation):
        kk = packed_k(w_eff.shape[1], s.density)
        wp = w_eff[:, :kk].contiguous()
        return lambda x: _act(F.linear(x[..., :kk], wp), activation)

    def grads(self, prob, w_eff, s):
        kk = packed_k(w_eff.shape[1], s.density)
        wp = w_eff[:, :kk].contiguous()
        return lambda dy, x: (dy @ wp, dy.T @ x[:, :kk])

    def project(self, prob, s, dx64, dw64):
        kk = packed_k(prob.K, s.density)
        return dx64[:, :kk], dw64[:, :kk]


class SparseCore(Provider):
    ours, ops = True, OPS

    def __init__(self, backend):
        self.backend, self.name = backend, f"sparsecore-{backend}"
        self.graphs = backend != "torch"  # the reference reads its row lengths on the host

    def available(self, device, dtype):
        return backends.module(self.backend).available()

    def _weight(self, prob, name, w_eff, s):
        W = BlockSparseWeight.from_dense(w_eff, prob.mask(name, s.block, s.density))
        if not backends.module(self.backend).supports(w_eff.new_empty(prob.M, w_eff.shape[1]), W.values):
            raise Unsupported(f"backend {self.backend} does not support this call")
        return W

    def linear(self, prob, name, w_eff, s, activation):
        from . import ops
        W = self._weight(prob, name, w_eff, s)
        return lambda x: ops.bsr_linear(x, W, backend=self.backend, activation=activation)

    def grads(self, prob, w_eff, s):
        W = self._weight(prob, "w", w_eff, s)
        ops_ = torch.ops.sparsecore
        N, K = W.shape
        return lambda dy, x: (
            ops_.bsr_linear_grad_input(dy, W.values, W.col_ptr, W.row_idx, W.t_perm, K, self.backend),
            ops_.bsr_linear_grad_weight(dy, x, W.block_row, W.col_idx, W.block[0], W.block[1], self.backend))

    def project(self, prob, s, dx64, dw64):
        return dx64, BlockSparseWeight.from_dense(dw64, prob.mask("w", s.block, s.density).to(dw64.device)).values


class TorchBSR(Provider):
    """PyTorch's own path: ``F.linear`` with a ``to_sparse_bsr`` weight."""
    name = "torch-bsr"

    def linear(self, prob, name, w_eff, s, activation):
        wb = w_eff.to_sparse_bsr(s.block)
        return _flat(lambda x: _act(F.linear(x, wb), activation), w_eff.shape[0])


class TorchAO(Provider):
    """torchao 0.18 block sparsity (``sparsify_`` with ``block_sparse_weight``), if importable."""
    name = "torchao-bsr"

    def available(self, device, dtype):
        try:
            import torchao.sparsity  # noqa: F401
        except Exception as e:  # any import failure means "not installed / broken here"
            return False, f"torchao not importable ({type(e).__name__})"
        return device == "cuda", "torchao block sparsity needs CUDA"

    def linear(self, prob, name, w_eff, s, activation):
        from torchao.sparsity import block_sparse_weight, sparsify_  # 0.18 exports this name only
        if s.block[0] != s.block[1]:
            raise Unsupported("square blocks only")
        mod = torch.nn.Linear(w_eff.shape[1], w_eff.shape[0], bias=False, device=w_eff.device, dtype=w_eff.dtype)
        with torch.no_grad():
            mod.weight.copy_(w_eff)
        sparsify_(mod, block_sparse_weight(blocksize=s.block[0]))
        return _flat(lambda x: _act(mod(x), activation), w_eff.shape[0])


class Semi24(Provider):
    """2:4 semi-structured sparsity at 50% (``to_sparse_semi_structured``), sm_80+ GPUs."""
    name, kind = "semi-2:4", "2:4"

    def available(self, device, dtype):
        if device != "cuda":
            return False, "needs a CUDA GPU"
        if torch.cuda.get_device_capability() < (8, 0):
            return False, "needs compute capability >= 8.0"
        return True, ""

    def linear(self, prob, name, w_eff, s, activation):
        from torch.sparse import to_sparse_semi_structured
        ws = to_sparse_semi_structured(w_eff)
        return _flat(lambda x: _act(F.linear(x, ws), activation), w_eff.shape[0])


def all_providers() -> dict:
    ps = [Dense(), Oracle(), SparseCore("torch"), SparseCore("triton"), SparseCore("cuda"), TorchBSR(), TorchAO(),
          Semi24()]
    return {p.name: p for p in ps}


def build_callable(prov: Provider, prob: Problem, s: Structure) -> Callable:
    """One copy of the provider's op: a zero-argument callable holding its own inputs."""
    if prob.op == "bwd":
        g = prov.grads(prob, prob.effective("w", s).clone(), s)
        x, dy = prob.x.clone(), prob.dy.clone()
        return lambda: g(dy, x)
    lin = {n: prov.linear(prob, n, prob.effective(n, s).clone(), s, prob.activation(n)) for n in prob.sparse_names}
    x = prob.x.clone()
    params = None
    if prob.op == "decoder":  # per-copy KV cache (written each call); dense weights shared
        params = {n: (p.clone() if n.endswith(("kc", "vc")) else p) for n, p in prob.dense_params.items()}
    return lambda: prob.run_op(lin, x, params)


# ---------------------------------------------------------------------------------------------
# Checking and timing
# ---------------------------------------------------------------------------------------------
def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| (Frobenius, float64); inf for a non-finite or misshapen output."""
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(ref.shape):
        return math.inf
    out = out.double()
    if not bool(torch.isfinite(out).all()):
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def check_output(out, ref) -> float:
    """Worst relative error over the (possibly tuple) outputs."""
    if isinstance(ref, tuple):
        if not isinstance(out, (tuple, list)) or len(out) != len(ref):
            return math.inf
        return max(rel_err(o, r) for o, r in zip(out, ref))
    return rel_err(out, ref)


def _quantiles(samples_ms) -> tuple:
    q = torch.quantile(torch.tensor(samples_ms, dtype=torch.float64), torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return tuple(float(v) for v in q)


def time_cpu(fn, warmup_ms: float, rep_ms: float, min_reps: int = 5, max_reps: int = 200) -> tuple:
    """(p50, p20, p80) ms of ``fn()`` by perf_counter, after a timed warm-up."""
    t_end = time.perf_counter() + warmup_ms / 1e3
    fn()
    while time.perf_counter() < t_end:
        fn()
    samples, spent = [], 0.0
    while len(samples) < max_reps and (len(samples) < min_reps or spent < rep_ms):
        t0 = time.perf_counter()
        fn()
        dt = (time.perf_counter() - t0) * 1e3
        samples.append(dt)
        spent += dt
    return _quantiles(samples)


def _end_failed_capture(device: int, pool) -> None:
    """Undo what a failed capture leaves behind. ``CUDAGraph.capture_end`` raises (capture
    invalidated, e.g. by a host sync inside ``fn``) before it takes the caching allocator out of
    capture mode, and the graph never releases its pool; from then on every
    ``torch.cuda.empty_cache()`` fails an internal assert (torch 2.11)."""
    try:
        torch._C._cuda_endAllocateToPool(device, pool)
    except RuntimeError:  # "not currently recording": capture_end got past it, the graph cleans up
        return
    torch._C._cuda_releasePool(device, pool)


def time_cuda_graph(fn, rep_ms: float) -> tuple:
    """(p50, p20, p80) ms per call of ``fn``: ``triton.testing.do_bench_cudagraph``'s method (as
    many calls as fill ``rep_ms`` captured in one graph, 10 timed replays, no L2 flush), with the
    cleanup it lacks when capture fails (then it raises)."""
    device = torch.cuda.current_device()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize()
        estimate = start.elapsed_time(end) / 5
        n = min(10_000, max(1, int(rep_ms / estimate))) if estimate > 0 else 1000
        pool = torch.cuda.graph_pool_handle()
        g = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        g.capture_begin(pool=pool)
        ended = False
        try:
            try:
                for _ in range(n):
                    fn()
            finally:
                g.capture_end()  # raises if the capture was invalidated
                ended = True
        except BaseException:
            if not ended:
                _end_failed_capture(device, pool)
            raise
        torch.cuda.synchronize()
        samples = []
        for _ in range(10):
            start.record()
            g.replay()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / n)
    del g
    return _quantiles(samples)


def time_cuda(fn, warmup_ms: float, rep_ms: float, graph: bool) -> tuple:
    """(p50, p20, p80, timer) ms by CUDA events: a CUDA graph when asked (falls back to
    ``do_bench``, which flushes L2 before each call, if capture fails)."""
    from triton.testing import do_bench
    if graph:
        try:
            # 10 replays of a rep_ms / 5 graph: about do_bench's time per row (triton's own default is 20 ms)
            return (*time_cuda_graph(fn, max(1.0, rep_ms / 5)), "cudagraph")
        except Exception as e:  # capture is not possible for every provider: time it without
            log.info("CUDA graph capture failed (%s): timing with events", str(e).splitlines()[0][:160] if str(e)
                     else type(e).__name__)
            torch.cuda.synchronize()
    q = [0.5, 0.2, 0.8]
    return (*do_bench(fn, warmup=max(1, int(warmup_ms)), rep=max(1, int(rep_ms)), quantiles=q), "events")


def copy_bandwidth(device: str) -> float:
    """GB/s (bytes read + written) of a plain copy between two 1 GiB (CPU: 128 MiB) buffers:
    the memory ceiling that memory-bound rows are measured against (``pct_of_copy_bw``)."""
    n = (1 << 30) if device == "cuda" else (128 << 20)
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    if device == "cuda":
        ms = time_cuda(lambda: dst.copy_(src), 50, 200, graph=False)[0]
    else:
        ms = time_cpu(lambda: dst.copy_(src), 50, 200)[0]
    del src, dst
    return 2 * n / (ms * 1e-3) / 1e9


def cache_bytes(device: str) -> int:
    if device == "cuda":
        return int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))
    return 0  # CPU: no rotation (every CPU shape here is far larger than its caches)


# ---------------------------------------------------------------------------------------------
# Environment and rows
# ---------------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    try:
        import triton
        triton_v = triton.__version__
    except Exception:
        triton_v = ""
    if device == "cuda":
        gpu = torch.cuda.get_device_name()
    else:
        omp = os.environ.get("OMP_WAIT_POLICY")
        gpu = f"cpu: {_cpu_name()} ({torch.get_num_threads()} threads{', OMP_WAIT_POLICY=' + omp if omp else ''})"
    return {"gpu": gpu, "torch": torch.__version__, "triton": triton_v, "cuda": torch.version.cuda or "",
            "commit": _commit()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("SPARSECORE_COMMIT", "unknown")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.6g}"
    return str(v)


@dataclasses.dataclass
class Task:
    prob: Problem
    prov: Provider
    s: Structure


def plan(cfg: Config, provs: dict) -> list:
    """Tasks grouped by problem, then structure: dense first, then the oracle, so each row's
    baselines are measured before it (rows stream to the CSV complete)."""
    tasks = []
    dec = DECODERS[cfg.decoder]
    by_kind = {}
    for p in provs.values():
        by_kind.setdefault(p.kind, []).append(p)
    for op in cfg.ops:
        shapes = [("", dec["inter"], dec["hidden"])] if op == "decoder" else cfg.shapes
        for dtype in cfg.dtypes:
            for name, N, K in shapes:
                for M in cfg.tokens:
                    prob = Problem(op, dtype, M, N, K, cfg, f"{cfg.decoder} x{cfg.layers}" if op == "decoder" else name)
                    structs = [Structure("dense")] + [Structure("packed", d) for d in cfg.densities]
                    structs += [Structure("block", d, b) for b in cfg.blocks for d in cfg.densities]
                    if 0.5 in cfg.densities:
                        structs.append(Structure("2:4", 0.5))
                    for s in structs:
                        tasks += [Task(prob, p, s) for p in by_kind.get(s.kind, []) if op in p.ops]
    return tasks


class Runner:
    """Runs tasks into rows; keeps the dense / oracle times each row is compared with."""

    def __init__(self, cfg: Config, env: dict, copy_gbps: Optional[float] = None):
        self.cfg, self.env, self.copy_gbps = cfg, env, copy_gbps
        self.rows, self.failures, self.skips = [], [], {}
        self._dense, self._oracle = {}, {}

    def run_task(self, t: Task):
        prob, prov, s = t.prob, t.prov, t.s
        where = (f"provider {prov.name}, {prob.label}"
                 + (f" block={s.block[0]}x{s.block[1]}" if s.block else "")
                 + (f" density={s.density:g}" if s.kind != "dense" else ""))
        try:
            if s.kind == "block" and prob.density_of(s) == 0:
                raise Unsupported(f"no block kept at density {s.density:g} with blocks {s.block} (shape too small)")
            fn = build_callable(prov, prob, s)
            out = fn()
        except Unsupported as e:
            self._skip(prov.name, str(e))
            return None
        except Exception as e:
            return self._crash(prov, where, e)
        ref = prob.reference(s)
        if prob.op == "bwd":
            ref = prov.project(prob, s, *ref)
        tol = REL_TOL[prob.dtype] * OP_DEPTH[prob.op]
        err = check_output(out, ref)
        del out
        if not err <= tol:  # never timed; ours fail the run, a baseline's own numerics only skip its row
            msg = f"WRONG RESULT {where}: relative error {err:.3e} > tolerance {tol:.1e}"
            if prov.ours:
                self.failures.append(msg)
            else:
                self._skip(prov.name, msg)
            return None
        try:
            fns, timer_fn = self._rotate(fn, prov, prob, s)
            if self.cfg.device == "cuda":
                graph = prob.M <= GRAPH_MAX_M and prov.graphs
                p50, p20, p80, timer = time_cuda(timer_fn, self.cfg.warmup_ms, self.cfg.rep_ms, graph)
            else:
                (p50, p20, p80), timer = time_cpu(timer_fn, self.cfg.warmup_ms, self.cfg.rep_ms), "perf_counter"
        except Exception as e:
            return self._crash(prov, where, e)
        n = len(fns)
        return self._row(prob, prov, s, (p50 / n, p20 / n, p80 / n), err, tol, n, timer)

    def _crash(self, prov, where, e):
        """An exception: a failure for our providers, a skip (logged) for third-party ones."""
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if prov.ours:
            self.failures.append(f"ERROR {where}: {msg}")
        else:
            self._skip(prov.name, msg)
        return None

    def _rotate(self, fn, prov, prob, s):
        """Copies of the op (own weights and inputs) until they exceed 2x the L2 cache."""
        fns = [fn]
        budget = 2 * cache_bytes(self.cfg.device)
        if budget and prob.op != "decoder":  # a decoder stack is far larger than L2
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            extra = build_callable(prov, prob, s)
            footprint = max(1, torch.cuda.memory_allocated() - before)
            n = min(64, math.ceil(budget / footprint))
            if n > 1:
                fns += [extra] + [build_callable(prov, prob, s) for _ in range(n - 2)]
        if len(fns) == 1:
            return fns, fn
        return fns, lambda: [f() for f in fns]

    def _row(self, prob, prov, s, times, err, tol, ncopies, timer):
        p50, p20, p80 = times
        density = prob.density_of(s)
        key = (prob.op, prob.dtype, prob.M, prob.N, prob.K)
        if s.kind == "dense":
            self._dense[key] = p50
        if s.kind == "packed":
            self._oracle[key + (s.density,)] = p50
        dense_ms = self._dense.get(key)
        oracle_ms = self._oracle.get(key + (s.density,)) if s.kind != "dense" else None
        speedup = dense_ms / p50 if dense_ms else None
        nbytes = prob.bytes_moved(s)
        gbps = nbytes / (p50 * 1e-3) / 1e9 if nbytes else None
        row = dict(self.env, op=prob.op, provider=prov.name, dtype=DTYPE_NAMES[prob.dtype], M=prob.M, N=prob.N,
                   K=prob.K, block_n=s.block[0] if s.block else (1 if s.kind == "2:4" else 0),
                   block_k=s.block[1] if s.block else (4 if s.kind == "2:4" else 0), density=density,
                   ms_p50=p50, ms_p20=p20, ms_p80=p80, tflops=prob.flops(density) / (p50 * 1e-3) / 1e12,
                   speedup_vs_dense=speedup, pct_of_ideal=speedup * density if speedup else None,
                   eff_vs_oracle=oracle_ms / p50 if oracle_ms else None, rel_err=err, tol=tol,
                   tokens_per_s=prob.M / (p50 * 1e-3) if prob.op == "decoder" else None, copies=ncopies,
                   timer=timer, detail=_detail(prob, s), nominal_density=s.density, gbps=gbps,
                   pct_of_copy_bw=gbps / self.copy_gbps if gbps and self.copy_gbps else None,
                   copy_gbps=self.copy_gbps)
        self.rows.append(row)
        return row

    def _skip(self, name, why):
        self.skips[(name, why)] = self.skips.get((name, why), 0) + 1


def _detail(prob: Problem, s: Structure) -> str:
    bits = [prob.shape_name] if prob.shape_name else []
    if prob.op == "decoder":
        bits.append(f"decode batch={prob.M} context={prob.cfg.context}" if prob.decode else f"prefill {prob.M} tokens")
    if s.kind == "packed":
        bits.append("Kk = density*K rounded to 16")
    return "; ".join(bits)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------
TABLE_COLS = (("op", "op", "{}"), ("provider", "provider", "{}"), ("dtype", "dtype", "{}"), ("M", "M", "{}"),
              ("N", "N", "{}"), ("K", "K", "{}"), ("block", None, "{}"), ("density", "density", "{:.3f}"),
              ("ms p50", "ms_p50", "{:.4g}"), ("p20-p80", None, "{}"), ("TFLOP/s", "tflops", "{:.3g}"),
              ("speedup", "speedup_vs_dense", "{:.3g}x"), ("% ideal", "pct_of_ideal", "{:.0%}"),
              ("vs oracle", "eff_vs_oracle", "{:.0%}"), ("GB/s", "gbps", "{:.3g}"),
              ("% copy bw", "pct_of_copy_bw", "{:.0%}"), ("tok/s", "tokens_per_s", "{:.4g}"))


def format_table(rows) -> str:
    """Fixed-width text table of the rows (blank where a value does not apply)."""
    if not rows:
        return "(no rows)"
    lines = []
    for r in rows:
        cells = []
        for head, key, fmt in TABLE_COLS:
            if head == "block":
                v = f"{r['block_n']}x{r['block_k']}" if r["block_n"] else "-"
            elif head == "p20-p80":
                v = f"{r['ms_p20']:.3g}-{r['ms_p80']:.3g}"
            else:
                v = r.get(key)
                v = "" if v is None else fmt.format(v)
            cells.append(v)
        lines.append(cells)
    heads = [h for h, _, _ in TABLE_COLS]
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(heads)]
    out = ["  ".join(h.rjust(w) for h, w in zip(heads, widths))]
    machines = len({r["gpu"] for r in rows}) > 1  # e.g. several runs in one CSV: name each
    prev = None
    for r, cells in zip(rows, lines):
        group = (r["gpu"], r["op"], r["dtype"], r["M"], r["N"], r["K"])
        if prev is not None and group != prev:
            out.append("")
        if machines and (prev is None or group[0] != prev[0]):
            out.append(f"# {r['gpu']}")
        prev = group
        out.append("  ".join(c.rjust(w) for c, w in zip(cells, widths)))
    return "\n".join(out)


class CsvWriter:
    """Streams rows to ``bench.csv`` (flushed per row: a killed run keeps what it measured)."""

    def __init__(self, path: Path):
        self.f = open(path, "w", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=CSV_COLUMNS + EXTRA_COLUMNS)
        self.w.writeheader()
        self.f.flush()

    def write(self, row):
        self.w.writerow({k: _fmt(row.get(k)) for k in CSV_COLUMNS + EXTRA_COLUMNS})
        self.f.flush()

    def close(self):
        self.f.close()


def plot(rows, path: Path) -> bool:
    """Speedup vs density per block size, one panel per (op, sparse provider), with the ideal
    1/density line. Returns False (and logs) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no plot (pip install 'sparsecore[bench]')")
        return False
    sparse = [r for r in rows if r["provider"] not in ("dense", "oracle") and r["speedup_vs_dense"]]
    panels = sorted({(r["op"], r["provider"]) for r in sparse}, key=lambda p: (OPS.index(p[0]), PROVIDERS.index(p[1])))
    if not panels:
        log.info("no sparse rows to plot")
        return False
    ncol = min(4, len(panels))
    nrow = math.ceil(len(panels) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
    nominal = lambda r: r.get("nominal_density") or r["density"]
    dens = sorted({nominal(r) for r in sparse}) or [0.1, 1.0]
    for ax, (op, prov) in zip(axes.flat, panels):
        pts = [r for r in sparse if r["op"] == op and r["provider"] == prov]
        for blk in sorted({(r["block_n"], r["block_k"]) for r in pts}):
            mine = [r for r in pts if (r["block_n"], r["block_k"]) == blk]
            xs = [r["density"] for r in mine]
            ax.scatter(xs, [r["speedup_vs_dense"] for r in mine], s=12, alpha=0.5)
            med = {}
            for r in mine:
                med.setdefault(nominal(r), []).append(r["speedup_vs_dense"])
            d_sorted = sorted(med)
            ax.plot(d_sorted, [statistics.median(med[d]) for d in d_sorted], marker="o",
                    label=f"{blk[0]}x{blk[1]}" if blk != (1, 4) else "2:4")
        lo, hi = min(min(dens), min(r["density"] for r in pts)) * 0.9, 1.0
        grid = [lo * (hi / lo) ** (i / 40) for i in range(41)]
        ax.plot(grid, [1 / d for d in grid], "k--", lw=1, label="ideal 1/density")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(dens, [f"{d:.2g}" for d in dens])
        ax.minorticks_off()
        ax.set_title(f"{op} / {prov}", fontsize=9)
        ax.set_xlabel("density")
        ax.set_ylabel("speedup vs dense")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    env = rows[0]
    fig.suptitle(f"{env['gpu']} | torch {env['torch']} | commit {env['commit']} (points: shapes x tokens; "
                 f"line: median at the nominal density)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def run(cfg: Config) -> list:
    """Run the benchmark; write ``bench.csv``, ``table.txt`` and ``bench.png`` into ``cfg.out``.

    Returns the rows; raises ``BenchError`` (after writing what ran) if any row failed.
    """
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    handler = (signal.signal(signal.SIGTERM, _on_sigterm)
               if threading.current_thread() is threading.main_thread() else None)
    try:
        return _run(cfg)
    except _Terminated as e:
        raise BenchError(f"{e}: stopped outside the rows (setup or report)") from None
    finally:
        torch.set_num_threads(threads)
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)


class _Terminated(BaseException):  # not an Exception: no provider handler may swallow it
    """SIGTERM during the rows (``timeout`` ending a device run): what ran is still reported."""


def _on_sigterm(signum, frame):
    raise _Terminated("SIGTERM")


def _run(cfg: Config) -> list:
    from tqdm import tqdm

    warnings.filterwarnings("ignore", message=".*[Ss]parse.*beta.*")
    warnings.filterwarnings("ignore", message=".*(semi-structured|SemiStructured).*")
    cfg.out.mkdir(parents=True, exist_ok=True)
    env = environment(cfg.device)
    if cfg.device == "cpu":
        log.info("no GPU: benchmarking the CPU path on %s", env["gpu"])
    log.info("%s | torch %s | triton %s | cuda %s | commit %s", env["gpu"], env["torch"], env["triton"] or "-",
             env["cuda"] or "-", env["commit"])
    provs, unavailable = {}, []
    for name in cfg.providers:
        p = all_providers()[name]
        ok, why = p.available(cfg.device, cfg.dtypes[0])
        if ok:
            provs[name] = p
        else:
            log.info("provider %s skipped: %s", name, why)
            unavailable.append(f"{name} ({why})")
    check(provs, "--providers", f"at least one that runs on {cfg.device}", "; ".join(unavailable))
    for base in ("dense", "oracle"):
        if base not in provs:
            log.info("provider %s not selected: speedup / oracle columns stay empty", base)
    copy_gbps = copy_bandwidth(cfg.device) if "fwd" in cfg.ops else None
    if copy_gbps:
        log.info("plain device copy: %.0f GB/s (read + write): the ceiling for memory-bound rows", copy_gbps)
    runner = Runner(cfg, env, copy_gbps)
    tasks = plan(cfg, provs)
    writer = CsvWriter(cfg.out / "bench.csv")
    stopped = None
    try:
        with tqdm(total=len(tasks), desc="bench", unit="row", mininterval=1.0, disable=None) as bar:
            prob = None
            for t in tasks:
                if t.prob is not prob:  # tasks come grouped by problem: free the previous one
                    if prob is not None:
                        prob.release()
                        if cfg.device == "cuda":
                            torch.cuda.empty_cache()
                    prob = t.prob
                    prob.load()
                bar.set_postfix_str(f"{t.prob.op} {t.prov.name} M={t.prob.M}", refresh=False)
                row = runner.run_task(t)
                if row is not None:
                    writer.write(row)
                bar.update(1)
    except _Terminated as e:  # keep the rows, write the table and plot below, then fail
        stopped = f"{e}: stopped after {len(runner.rows)} timed rows of {len(tasks)} planned"
        log.error("%s", stopped)
    finally:
        writer.close()
    for (name, why), n in sorted(runner.skips.items()):
        log.info("skipped %d row(s) of %s: %s", n, name, why)
    table = format_table(runner.rows)
    (cfg.out / "table.txt").write_text(
        f"{env['gpu']} | torch {env['torch']} | triton {env['triton'] or '-'} | cuda {env['cuda'] or '-'} | "
        f"commit {env['commit']}\n\n{table}\n")
    if cfg.plot and runner.rows:
        if plot(runner.rows, cfg.out / "bench.png"):
            log.info("wrote %s", cfg.out / "bench.png")
    print(table)
    log.info("wrote %s (%d rows) and %s", cfg.out / "bench.csv", len(runner.rows), cfg.out / "table.txt")
    if runner.failures:
        for f in runner.failures:
            log.error("%s", f)
        raise BenchError(f"{len(runner.failures)} row(s) failed; first: {runner.failures[0]}")
    if stopped:
        raise BenchError(stopped)
    return runner.rows


INT_FIELDS = ("M", "N", "K", "block_n", "block_k", "copies")
FLOAT_FIELDS = ("density", "nominal_density", "ms_p50", "ms_p20", "ms_p80", "tflops", "speedup_vs_dense", "pct_of_ideal",
                "eff_vs_oracle", "rel_err", "tol", "tokens_per_s", "gbps", "pct_of_copy_bw", "copy_gbps")


def load_csv(path) -> list:
    """Rows of a ``bench.csv`` with numbers parsed (empty cells -> None)."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        check(reader.fieldnames and set(CSV_COLUMNS) <= set(reader.fieldnames), "--report",
              "a bench.csv with sparsecore bench's columns", f"{path} with {reader.fieldnames}")
        rows = list(reader)
    for r in rows:
        for k in INT_FIELDS + FLOAT_FIELDS:
            if k in r:
                r[k] = None if r[k] in ("", None) else (int(r[k]) if k in INT_FIELDS else float(r[k]))
    return rows


def report(path, ops=None, providers=None) -> str:
    """The table of an earlier run's CSV, optionally only some ops / providers."""
    rows = [r for r in load_csv(path) if (not ops or r["op"] in ops) and (not providers or r["provider"] in providers)]
    return format_table(rows)


def _cli(args) -> int:
    if args.report:
        split = lambda t: tuple(t.split(",")) if t else None
        print(report(args.report, split(args.ops), split(args.providers)))
        return 0
    try:
        run(make_config(args))
    except BenchError as e:
        print(f"sparsecore bench: FAILED: {e}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub):
    """Add the ``bench`` sub-command to the ``sparsecore`` console script."""
    p = sub.add_parser("bench", help="microbenchmarks of every provider (CSV, table, plot)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(fn=_cli)


def main(argv=None) -> int:
    """``python bench/run.py [flags]``: the same as ``sparsecore bench [flags]``."""
    from .cli import main as cli_main

    return cli_main(["bench", *(sys.argv[1:] if argv is None else list(argv))])
