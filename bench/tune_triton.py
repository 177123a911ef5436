"""Tune the Triton kernels' launch configs on this GPU and write ``kernels/tuned_configs.json``.

    python bench/tune_triton.py                       # bf16, blocks 16..128, ~6-10 min on an H100
    python bench/tune_triton.py --quick               # blocks 32, 64; M 16 and 4096: ~1-2 min
    python bench/tune_triton.py --dtypes bf16,fp16 --blocks 64 --shape 8192 --exact

For each (kernel, dtype, block, M bucket) it times a small candidate set around the
heuristic (``sparsecore.kernels.configs.heuristic``) on one problem (default N = K = 4096,
density 0.1, random mask), checks the winner against the torch reference backend, and
records it under the wildcard key ``...|M<bucket>|N*|K*`` (``--exact`` also writes the
exact N, K key). Existing entries for other keys are kept. Timing: CUDA events via
``triton.testing.do_bench`` (median), after a warm-up launch that also compiles. The
heuristic itself is always a candidate, so an entry is never slower than the fallback on
the tuned shape.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

from sparsecore.bench import rel_err

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
M_OF_BUCKET = {1: 1, 16: 16, 64: 64, 256: 256, 1024: 1024, 4096: 4096}


def candidates(kernel, arch, dtype, block, M, N, K, limit):
    """The heuristic first, then variations of its fields; at most ``limit`` configs."""
    from sparsecore.kernels import configs

    base = configs.heuristic(kernel, arch, dtype, block, M, N, K)
    red = {"fwd": block[1], "dx": block[0]}.get(kernel)
    options = {"num_stages": (2, 3, 4, 5), "num_warps": (4, 8)}
    if kernel in ("fwd", "dx"):
        options.update(BM=(64, 128, 256) if M > 64 else (16, 32, 64),
                       G=tuple(g for g in (1, 2, 4, 8) if 32 <= g * red <= 128) or (1,), GROUP_M=(4, 8, 16))
        if kernel == "fwd" and arch >= 90 and base["G"] == 1:
            options["TMA"] = (True,)  # TMA descriptors (Hopper only; see kernels/bsr_fwd.py)
        if kernel == "fwd" and arch >= 90 and block[0] >= 64:
            options["SWAP"] = (True,)  # block rows as wgmma's M (see kernels/common.py row_segment)
    elif kernel == "decode":
        options.update(G=tuple(g for g in (1, 2, 4, 8) if g * block[1] <= 256), PROGRAMS_PER_SM=(1, 2, 4, 8))
    else:
        options.update(BM=(32, 64, 128), PROGRAMS_PER_SM=(1, 2, 4))
    out, seen = [base], {json.dumps(base, sort_keys=True)}
    order = [f for f in ("BM", "SWAP", "num_warps", "TMA", "num_stages", "G", "PROGRAMS_PER_SM", "GROUP_M")
             if f in options]
    # one field at a time around the heuristic (most telling fields first), then pairs
    for n_changed in (1, 2):
        for fields in itertools.combinations(order, n_changed):
            for values in itertools.product(*(options[f] for f in fields)):
                cfg = dict(base, **dict(zip(fields, values)))
                sig = json.dumps(cfg, sort_keys=True)
                if sig not in seen and len(out) < limit:
                    seen.add(sig)
                    out.append(cfg)
    return out


def problem(dtype, block, M, N, K, density, seed=0):
    import sparsecore as sc

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g).to(dtype)
    R, C = sc.format.grid_shape((N, K), block)
    mask = sc.BlockMask(torch.rand(R, C, generator=g) < density, block, (N, K))
    W = sc.BlockSparseWeight.from_dense(w, mask).to("cuda")
    x = torch.randn(M, K, generator=g).to(dtype).cuda()
    dy = torch.randn(M, N, generator=g).to(dtype).cuda()
    return W, x, dy


def runner(kernel, W, x, dy, cfg):
    """A zero-argument launch of ``kernel`` with ``cfg`` (and the reference's result)."""
    from sparsecore.backends import reference
    from sparsecore.kernels import bsr_decode, bsr_dw, bsr_dx, bsr_fwd, configs

    N, K = W.shape
    sms = configs.sm_count(x.device)
    if kernel == "fwd":
        return (lambda: bsr_fwd.bsr_fwd(x, W.values, W.row_ptr, W.col_idx, W.row_order, N, config=cfg),
                lambda: reference.forward(x, W.values, W.row_ptr, W.col_idx, W.block_row, W.row_order, N,
                                          None, "none"))
    if kernel == "decode":
        progs = cfg["PROGRAMS_PER_SM"] * sms
        return (lambda: bsr_decode.bsr_decode(x, W.values, W.row_ptr, W.col_idx, W.block_row, N, config=cfg,
                                              programs=progs),
                lambda: reference.forward(x, W.values, W.row_ptr, W.col_idx, W.block_row, W.row_order, N,
                                          None, "none"))
    if kernel == "dx":
        return (lambda: bsr_dx.bsr_dx(dy, W.values, W.col_ptr, W.row_idx, W.t_perm, K, config=cfg),
                lambda: reference.grad_input(dy, W.values, W.col_ptr, W.row_idx, W.t_perm, K))
    progs = cfg["PROGRAMS_PER_SM"] * sms
    return (lambda: bsr_dw.bsr_dw(dy, x, W.block_row, W.col_idx, W.block, config=cfg, programs=progs),
            lambda: reference.grad_weight(dy, x, W.block_row, W.col_idx, W.block))


def tune_one(kernel, dtype, block, M, N, K, density, limit, arch):
    import triton.testing

    W, x, dy = problem(dtype, block, M, N, K, density)
    best = None
    for cfg in candidates(kernel, arch, dtype, block, M, N, K, limit):
        fn, _ = runner(kernel, W, x, dy, cfg)
        try:
            fn()  # compile (and reject configs that do not fit: out of resources)
            torch.cuda.synchronize()
            ms = triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")
        except Exception as e:  # noqa: BLE001 - a config that cannot launch is skipped
            print(f"    skip {cfg}: {type(e).__name__}", file=sys.stderr)
            continue
        if best is None or ms < best[0]:
            best = (ms, cfg)
    if best is None:
        return None
    fn, ref = runner(kernel, W, x, dy, best[1])
    err = rel_err(fn(), ref().double())
    tol = {torch.float32: 5e-3, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    if not err <= tol:
        raise RuntimeError(f"{kernel} {block} M={M}: best config {best[1]} is wrong (rel err {err:.2e})")
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default="fwd,decode,dx,dw")
    p.add_argument("--dtypes", default="bf16")
    p.add_argument("--blocks", default="16,32,64,128", help="square sides, or BNxBK pairs")
    p.add_argument("--buckets", default="1,16,64,256,1024,4096", help="M buckets to tune")
    p.add_argument("--shape", type=int, default=4096, help="N = K of the tuning problem")
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--limit", type=int, default=8, help="candidates per key (heuristic included)")
    p.add_argument("--exact", action="store_true", help="also write exact-shape keys")
    p.add_argument("--out", default=None, help="table path (default: the package's tuned_configs.json)")
    p.add_argument("--quick", action="store_true", help="--blocks 32,64 --buckets 16,4096 --limit 6")
    args = p.parse_args(argv)
    if args.quick:
        args.blocks, args.buckets, args.limit = "32,64", "16,4096", 6
    if not torch.cuda.is_available():
        sys.exit("tune_triton.py needs a CUDA GPU")

    from sparsecore.kernels import configs

    path = args.out or configs.TABLE_PATH
    table = {}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
    entries = table.setdefault("entries", {})
    arch = configs.arch_of(torch.device("cuda"))
    N = K = args.shape
    blocks = [tuple(int(s) for s in b.split("x")) if "x" in b else (int(b), int(b)) for b in args.blocks.split(",")]
    t0 = time.time()
    for kernel, dname, block, bucket in itertools.product(args.kernels.split(","), args.dtypes.split(","), blocks,
                                                          [int(b) for b in args.buckets.split(",")]):
        dtype, M = DTYPES[dname], M_OF_BUCKET[bucket]
        if (kernel == "decode") != (M <= configs.DECODE_MAX_M):
            continue  # the backend only launches decode for M <= DECODE_MAX_M, fwd above
        if kernel in ("dx", "dw") and M < 256:
            continue  # backward runs on training batches
        best = tune_one(kernel, dtype, block, M, N, K, args.density, args.limit, arch)
        if best is None:
            continue
        ms, cfg = best
        keys = [configs.key(kernel, arch, dtype, block, M, None, None)]
        if args.exact:
            keys.append(configs.key(kernel, arch, dtype, block, M, N, K))
        for k in keys:
            entries[k] = cfg
        print(f"{keys[0]:45s} {ms * 1e3:9.1f} us  {cfg}  [{time.time() - t0:.0f}s]", flush=True)
    table["tuned_on"] = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "triton": __import__("triton").__version__, "N": N, "K": K, "density": args.density}
    with open(path, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(entries)} entries to {path}")


if __name__ == "__main__":
    main()
