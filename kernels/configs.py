"""Launch configs: a checked-in tuned table first, shape heuristics when no entry fits.

Key: ``(kernel, arch, dtype, block, M bucket, N, K)``. ``tuned_configs.json`` (written on a
GPU by ``bench/tune_triton.py``) maps ``"<kernel>|sm<arch>|<dtype>|<BN>x<BK>|M<bucket>|N<N>|K<K>"``
to a config dict; an entry with ``N*`` / ``K*`` (``"...|M<bucket>|N*|K*"``) covers every
N, K. Lookup: exact shape, then the wildcard, then ``heuristic``. Nothing is autotuned at
call time, so a first call never launches a storm of trial compiles.

Config fields (all kernels): ``num_warps``, ``num_stages``, and
  fwd / dx : ``BM`` (rows of x per program), ``G`` (kept blocks per K-step), ``GROUP_M``;
             fwd also the optional ``TMA``, ``SWAP`` (tuning candidates on Hopper)
  decode   : ``BM``, ``G``, ``PROGRAMS_PER_SM`` (kept-block list split over that many programs)
  dw       : ``BM`` (M step of the reduction), ``PROGRAMS_PER_SM`` (split M until nnzb x
             splits reaches that many programs per SM)
"""
from __future__ import annotations

import functools
import json
import os

import torch

from .common import next_pow2

KERNELS = ("fwd", "decode", "dx", "dw")
TABLE_PATH = os.path.join(os.path.dirname(__file__), "tuned_configs.json")
M_BUCKETS = (1, 16, 64, 256, 1024, 4096)  # an M belongs to the largest bucket <= M
DECODE_MAX_M = 64
_SMS = {90: 132, 80: 108}  # SMs of H100 SXM / A100, for shape rules that need a GPU size
# shared memory a program may use (KiB): sm_80 / 87 163, sm_90 / 100 227, others (86, 89, 120) 99
_SMEM_KIB = {80: 163, 87: 163, 90: 227, 100: 227}
_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def m_bucket(M: int) -> int:
    return max(b for b in M_BUCKETS if b <= max(1, M))


def dtype_name(dtype) -> str:
    return _DTYPES[dtype]


def key(kernel, arch, dtype, block, M, N, K) -> str:
    n, k = ("*", "*") if N is None else (N, K)
    return f"{kernel}|sm{arch}|{dtype_name(dtype)}|{block[0]}x{block[1]}|M{m_bucket(M)}|N{n}|K{k}"


@functools.lru_cache(maxsize=None)
def table(path: str = TABLE_PATH) -> dict:
    try:
        with open(path) as f:
            return json.load(f).get("entries", {})
    except FileNotFoundError:
        return {}


@functools.lru_cache(maxsize=None)  # per device, as sm_count: a property query costs microseconds a launch
def arch_of(device) -> int:
    """sm number (90 for H100) of a CUDA device; 0 for the CPU interpreter."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@functools.lru_cache(maxsize=None)
def sm_count(device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs are enough to exercise the split
    return torch.cuda.get_device_properties(device).multi_processor_count


def heuristic(kernel, arch, dtype, block, M, N, K) -> dict:
    """Shape rules for when the table has no entry (see the kernel files for the why)."""
    BN, BK = block
    wide = dtype == torch.float32  # 4-byte operands: half the K per step fits the same smem
    kstep = 32 if wide else 64     # the MMA's K per step, reached with G blocks at a time
    if kernel in ("fwd", "dx"):
        out, red = (BN, BK) if kernel == "fwd" else (BK, BN)  # output tile side, reduced side
        tiles_out = -(-(N if kernel == "fwd" else K) // out)     # block-rows (fwd) / -columns (dx)
        # 128-row tiles unless that leaves fewer than two programs per SM (small M)
        BM = 128 if -(-M // 128) * tiles_out >= 2 * _SMS.get(arch, 132) else 64
        G = max(1, kstep // red)
        budget = (160 if arch >= 90 else 96) * 1024  # leave room for the epilogue's layout swap
        limit = (_SMEM_KIB.get(arch, 99) - 1) * 1024  # the hard cap (1 KiB for barriers)

        def step_bytes(bm):  # one pipeline stage: the x tile and the W^T tile
            return (bm + out) * G * red * (4 if wide else 2)

        while BM > 32 and 2 * step_bytes(BM) > limit:  # e.g. fp32 128x128: two 128-row stages need 256 KiB
            BM //= 2
        warps = 8 if BM * out >= 128 * 128 else 4
        per_stage = step_bytes(BM)
        stages = max(2, min(4, budget // per_stage))       # the budget's depth, at least double-buffered
        stages = max(1, min(stages, limit // per_stage))   # never past the hard cap
        return {"BM": BM, "G": G, "GROUP_M": 8, "num_warps": warps, "num_stages": stages}
    if kernel == "decode":
        BM = min(DECODE_MAX_M, max(16, next_pow2(M)))
        G = max(1, (64 if wide else 128) // BK)
        return {"BM": BM, "G": G, "PROGRAMS_PER_SM": 4, "num_warps": 4, "num_stages": 3}
    if kernel == "dw":
        BM = 32 if wide else 64
        warps = 8 if BN * BK >= 128 * 128 else 4
        return {"BM": BM, "PROGRAMS_PER_SM": 2, "num_warps": warps, "num_stages": 3}
    raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")


def select(kernel, dtype, block, M, N, K, device) -> dict:
    """The config for one launch: tuned table (exact shape, then any shape), else heuristic."""
    arch = arch_of(device)
    entries = table()
    for k in (key(kernel, arch, dtype, block, M, N, K), key(kernel, arch, dtype, block, M, None, None)):
        if k in entries:
            return dict(entries[k])
    return heuristic(kernel, arch, dtype, block, M, N, K)
