"""A small case per CUDA kernel for compute-sanitizer (memcheck, racecheck, synccheck).

Each kernel of ``sparsecore._C`` that this GPU can run (forward: sm80, sm90 on compute
capability 9.0 when built for sm_90a, decode; backward: dX, dW) computes a few small cases
with tails everywhere (odd M, N and K off the block, an empty block-row, bias + activation),
each checked against float64.
Exit 0 only if every output is right; 1 if one is wrong; 2 if nothing could run.
$SPARSECORE_TEST_KERNELS (e.g. "sm80,decode") keeps only those forward kernels.

    compute-sanitizer --tool memcheck  python csrc/sanitize_case.py
    compute-sanitizer --tool racecheck python csrc/sanitize_case.py
"""
import os
import sys

import torch

# Relative Frobenius error allowed (one rounding of the output after fp32 accumulation).
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CASES = (  # M, N, K, block, dtype
    (3, 200, 150, (64, 64), torch.bfloat16),
    (13, 100, 260, (32, 128), torch.float16),
    (37, 130, 90, (16, 32), torch.float16),
    (70, 64, 100, (16, 16), torch.float16),
    (131, 96, 200, (128, 16), torch.bfloat16),
    (300, 128, 64, (64, 64), torch.bfloat16),  # dW with M cut into ranges (fp32 atomics)
    (40, 1450, 96, (32, 32), torch.bfloat16),  # 46 block-rows x 3 row groups >= SMs: decode by rows
    (5, 630, 2000, (64, 64), torch.float16),  # 10 block-rows: decode in clusters (sm_90), else split
    (600, 2200, 100, (16, 16), torch.bfloat16),  # 690 sm90 tiles: persistent CTAs take several each
    (260, 1100, 200, (64, 32), torch.float16),  # sm90 SWAP tiles (BN = 64), 2 M tiles, N % 8 != 0
)


def main() -> int:
    if not torch.cuda.is_available():
        print("sanitize_case: no CUDA GPU")
        return 2
    import sparsecore as sc
    from sparsecore.backends import cuda

    ok, why = cuda.available()
    if not ok:
        print(f"sanitize_case: cuda backend unavailable: {why}")
        return 2
    kernels = ["sm80", "decode"]
    if torch.cuda.get_device_capability() == (9, 0) and torch.ops.sparsecore.cuda_has_sm90a():
        kernels.append("sm90")
    only = os.environ.get("SPARSECORE_TEST_KERNELS")  # e.g. "sm80,decode" (bench/device.sh)
    kernels = [k for k in kernels if not only or k in only.split(",")]
    g = torch.Generator().manual_seed(0)
    bad, ran = [], 0
    for M, N, K, block, dtype in CASES:
        R, C = -(-N // block[0]), -(-K // block[1])
        mask = torch.rand(R, C, generator=g) < 0.5
        mask[min(1, R - 1)] = False  # an empty block-row
        mask[0, 0] = True  # never an empty weight (the relative error needs a nonzero reference)
        w = torch.randn(N, K, generator=g).to(dtype)
        W = sc.BlockSparseWeight.from_dense(w, sc.BlockMask(mask, block, (N, K))).to("cuda")
        x = torch.randn(M, K, generator=g).to(dtype=dtype, device="cuda")
        b = torch.randn(N, generator=g).to(dtype=dtype, device="cuda")
        dy = torch.randn(M, N, generator=g).to(dtype=dtype, device="cuda")
        wd = W.to_dense().double()
        ref = torch.relu(x.double() @ wd.T + b.double())
        outs = []
        for kernel in kernels:
            if kernel == "decode" and (M > 64 or block[1] < 32):
                continue
            outs.append((kernel, ref, torch.ops.sparsecore.cuda_bsr_linear(
                x, W.values, W.row_ptr, W.col_idx, W.block_row, W.row_order, N, b, "relu", kernel)))
        outs.append(("dx", dy.double() @ wd, torch.ops.sparsecore.cuda_bsr_linear_grad_input(
            dy, W.values, W.col_ptr, W.row_idx, W.t_perm, K)))
        outs.append(("dw", sc.BlockSparseWeight.from_dense(dy.double().T @ x.double(), W.block_mask()).values,
                     torch.ops.sparsecore.cuda_bsr_linear_grad_weight(dy, x, W.block_row, W.col_idx, *block)))
        torch.cuda.synchronize()
        for kernel, want, got in outs:
            err = float((got.double() - want).norm() / want.norm())
            ran += 1
            if not err <= TOL[dtype]:
                bad.append(f"{kernel} M={M} N={N} K={K} block={block} {dtype}: rel err {err:.3e}")
    print(f"sanitize_case: kernels {kernels}, {ran} outputs checked, {len(bad)} wrong")
    for line in bad:
        print("WRONG", line)
    return 1 if bad else (0 if ran else 2)


if __name__ == "__main__":
    sys.exit(main())
