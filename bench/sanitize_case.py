"""A small GPU case for compute-sanitizer (memcheck / racecheck), run by bench/device.sh after
``csrc/sanitize_case.py`` (which calls each CUDA kernel by name): forward, dX and dW through the
public ops of every available GPU backend (the Triton kernels too) on a few small shapes (odd M,
an empty block-row, padding), each checked against float64.

    compute-sanitizer --tool memcheck python3 bench/sanitize_case.py

Without a GPU, ``TRITON_INTERPRET=1`` runs the same case on the CPU (triton backend only), to
check the script itself.
"""
import os
import sys

import torch

import sparsecore as sc
from sparsecore import backends
from sparsecore.bench import REL_TOL, rel_err


def main() -> int:
    if torch.cuda.is_available():
        dev = "cuda"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        dev = "cpu"
    else:
        print("sanitize_case: no CUDA GPU (set TRITON_INTERPRET=1 to dry-run on the CPU)")
        return 2
    bad, ran = [], 0
    g = torch.Generator(device=dev).manual_seed(0)
    for backend in ("cuda", "triton"):
        ok, why = backends.module(backend).available()
        if not ok:
            print(f"sanitize_case: backend {backend} unavailable: {why}")
            continue
        for (M, N, K, block) in ((5, 192, 160, (64, 32)), (16, 256, 256, (32, 32)), (33, 128, 256, (16, 64))):
            w = torch.randn(N, K, device=dev, generator=g, dtype=torch.bfloat16)
            mask = torch.rand(-(-N // block[0]), -(-K // block[1]), device=dev, generator=g) < 0.4
            mask[0] = False  # an empty block-row
            W = sc.BlockSparseWeight.from_dense(w, sc.BlockMask(mask, block, (N, K)))
            x = torch.randn(M, K, device=dev, generator=g, dtype=torch.bfloat16)
            dy = torch.randn(M, N, device=dev, generator=g, dtype=torch.bfloat16)
            if not backends.module(backend).supports(x, W.values):
                continue
            wd = W.to_dense().double()
            y = sc.ops.bsr_linear(x, W, backend=backend)
            dx = torch.ops.sparsecore.bsr_linear_grad_input(dy, W.values, W.col_ptr, W.row_idx, W.t_perm, K, backend)
            dw = torch.ops.sparsecore.bsr_linear_grad_weight(dy, x, W.block_row, W.col_idx, *block, backend)
            if dev == "cuda":
                torch.cuda.synchronize()
            ref_dw = sc.BlockSparseWeight.from_dense(dy.double().T @ x.double(), W.block_mask()).values
            for what, out, ref in (("y", y, x.double() @ wd.T), ("dx", dx, dy.double() @ wd), ("dw", dw, ref_dw)):
                err = rel_err(out, ref)
                ran += 1
                if not err <= REL_TOL[torch.bfloat16]:
                    bad.append(f"{backend} {what} M={M} N={N} K={K} block={block}: rel err {err:.3e}")
    print(f"sanitize_case: {ran} outputs checked, {len(bad)} wrong")
    if ran == 0:
        print("sanitize_case: no backend ran: nothing was sanitized")
        return 3
    for b in bad:
        print("WRONG", b)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
