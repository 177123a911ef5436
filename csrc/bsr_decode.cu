// Decode forward (M <= 64, BK >= 32): memory-bound, so every kept weight byte is read once
// from DRAM with 16-byte loads and all SMs get work whatever the row lengths.
//
//   grid.x: warps split the global list of 32-column slices of kept blocks (BSR order, a
//   block's slices in a row) into equal contiguous ranges; grid.y: groups of 16 rows of x
//   (rows mb = 16*blockIdx.y ..; the groups re-read the same weight blocks, from L2). A warp
//   walks its range slice by slice:
//     lane (g = lane/4, t = lane%4) loads 16 B of x rows mb+g and mb+g+8 at columns 8t..8t+7,
//     and 16 B of values row n = 8q + g at the same columns, for every n8 group q
//     (BN/8 independent 16-byte loads in flight per lane), then two mma.sync m16n8k16.
//   The k order inside a 32-column slice is permuted identically for x and W (the dot
//   product does not care): phys column 8t+e (e < 8) is logical  2t + (e&1) + 8*((e>>1)&1)
//   of mma (e >> 2). So one 16-byte load is exactly a lane's B fragment of two mmas.
//   Partial sums (fp32, rows < M) go to workspace [M, R*BN] with atomicAdd whenever the
//   warp leaves a block-row; bsr_finalize then writes y = act(workspace + bias).
#include "bsr_common.cuh"

namespace sparsecore {
namespace {

constexpr int kDecodeThreads = 256;
// Resident warps per SM the split targets (and the launch bounds ask for): 16, or 8 at BN = 128,
// whose 16 loads in flight per lane need more than 128 registers without spilling.
template <int BN> constexpr int decode_warps_per_sm() { return BN == 128 ? 8 : 16; }

__device__ __forceinline__ uint4 ldg16(const void* p) { return __ldg(static_cast<const uint4*>(p)); }

template <typename T, int BN>
__device__ __forceinline__ void flush(const BsrParams& p, int r, int mb, int g, int t, float (&acc)[BN / 8][4]) {
  const int ldw = p.R * BN;
#pragma unroll
  for (int q = 0; q < BN / 8; ++q) {
    const int n = r * BN + q * 8 + 2 * t;
    float* lo = p.workspace + static_cast<int64_t>(mb + g) * ldw + n;
    if (mb + g < p.M) {
      atomicAdd(lo, acc[q][0]);
      atomicAdd(lo + 1, acc[q][1]);
    }
    if (mb + g + 8 < p.M) {
      atomicAdd(lo + 8 * ldw, acc[q][2]);
      atomicAdd(lo + 8 * ldw + 1, acc[q][3]);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[q][e] = 0.f;
  }
}

template <typename T, int BN>
__global__ void __launch_bounds__(kDecodeThreads, decode_warps_per_sm<BN>() * 32 / kDecodeThreads)
    bsr_fwd_decode(const BsrParams p, int units_per_warp) {
  const int lane = threadIdx.x & 31;
  const int warp = (blockIdx.x * kDecodeThreads + threadIdx.x) >> 5;
  const int slice_shift = p.bk_shift - 5;  // log2(32-column slices per block)
  const int u0 = warp * units_per_warp;
  const int u1 = min(p.nnzb << slice_shift, u0 + units_per_warp);
  const int g = lane >> 2, t = lane & 3;
  const int mb = blockIdx.y * 16;
  const T* x = static_cast<const T*>(p.x);
  const T* x_lo = x + static_cast<int64_t>(mb + g) * p.ldx;  // row mb + g
  const T* x_hi = x_lo + 8 * static_cast<int64_t>(p.ldx);    // row mb + g + 8
  const bool lo_ok = mb + g < p.M, hi_ok = mb + g + 8 < p.M;

  float acc[BN / 8][4] = {};
  int cur = u0 < u1 ? p.block_row[u0 >> slice_shift] : -1;
  // UN units per step, all their loads issued before any mma: BN/8 x UN 16-byte value loads in
  // flight per lane (small BN would leave too few bytes in flight to cover DRAM latency)
  constexpr int UN = BN <= 32 ? 2 : 1;
  const uint4 zero = make_uint4(0, 0, 0, 0);
#pragma unroll 1
  for (int u = u0; u < u1; u += UN) {  // unit u: 32-column slice (u mod slices) of kept block u / slices
    uint4 bq[UN][BN / 8], xl[UN], xh[UN];
    int rows[UN];
#pragma unroll
    for (int w = 0; w < UN; ++w) {
      rows[w] = -1;
      if (w > 0 && u + w >= u1) continue;  // past the warp's range (warp-uniform); unit u always exists
      const int i = (u + w) >> slice_shift, ks = ((u + w) & ((1 << slice_shift) - 1)) << 5;
      rows[w] = p.block_row[i];
      if (w == 0 && rows[0] != cur) {  // before the loads: fewer registers live across the atomics
        flush<T, BN>(p, cur, mb, g, t, acc);
        cur = rows[0];
      }
      const T* v = static_cast<const T*>(p.values) + ((static_cast<int64_t>(i) * BN + g) << p.bk_shift) + ks + 8 * t;
#pragma unroll
      for (int q = 0; q < BN / 8; ++q) bq[w][q] = ldg16(v + ((q * 8) << p.bk_shift));
      const int k = (p.col_idx[i] << p.bk_shift) + ks + 8 * t;  // column of x
      xl[w] = (lo_ok && k < p.Kx) ? ldg16(x_lo + k) : zero;
      xh[w] = (hi_ok && k < p.Kx) ? ldg16(x_hi + k) : zero;
    }
#pragma unroll
    for (int w = 0; w < UN; ++w) {
      if (w > 0 && rows[w] < 0) continue;  // unit u always exists
      if (w > 0 && rows[w] != cur) {  // unit u + w starts another block-row (w = 0: done above)
        flush<T, BN>(p, cur, mb, g, t, acc);
        cur = rows[w];
      }
      const uint32_t a0[4] = {xl[w].x, xh[w].x, xl[w].y, xh[w].y};  // phys columns 8t+0..3
      const uint32_t a1[4] = {xl[w].z, xh[w].z, xl[w].w, xh[w].w};  // phys columns 8t+4..7
#pragma unroll
      for (int q = 0; q < BN / 8; ++q) {
        mma16816<T>(acc[q], a0, bq[w][q].x, bq[w][q].y);
        mma16816<T>(acc[q], a1, bq[w][q].z, bq[w][q].w);
      }
    }
  }
  if (cur >= 0) flush<T, BN>(p, cur, mb, g, t, acc);
}

// y[m, n] = act(workspace[m, n] + bias[n]) for n < N; one thread per output element.
template <typename T>
__global__ void bsr_finalize(const BsrParams p, int ldw) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= static_cast<int64_t>(p.M) * p.N) return;
  const int m = static_cast<int>(idx / p.N), n = static_cast<int>(idx % p.N);
  float z = p.workspace[static_cast<int64_t>(m) * ldw + n];
  if (p.bias) z += Elem<T>::to_float(static_cast<const T*>(p.bias)[n]);
  static_cast<T*>(p.y)[idx] = Elem<T>::from_float(activate(z, p.activation));
}

template <typename T, int BN>
cudaError_t launch(const BsrParams& p, int num_sms, cudaStream_t stream) {
  const int units = p.nnzb << (p.bk_shift - 5);  // 32-column slices of kept blocks
  const int warps_target = num_sms * decode_warps_per_sm<BN>();
  const int per_warp = (units + warps_target - 1) / warps_target;  // >= 1 when nnzb > 0
  const int warps = (units + per_warp - 1) / per_warp;
  const int ctas = (warps * 32 + kDecodeThreads - 1) / kDecodeThreads;
  bsr_fwd_decode<T, BN><<<dim3(ctas, (p.M + 15) / 16), kDecodeThreads, 0, stream>>>(p, per_warp);
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_fin(const BsrParams& p, int bn, cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(p.M) * p.N;
  bsr_finalize<T><<<static_cast<unsigned>((total + 255) / 256), 256, 0, stream>>>(p, p.R * bn);
  return cudaSuccess;
}

template <typename T>
cudaError_t launch_bn(const BsrParams& p, int bn, int num_sms, cudaStream_t stream) {
  return with_side(bn, [&](auto side) { return launch<T, decltype(side)::value>(p, num_sms, stream); });
}

}  // namespace

cudaError_t launch_bsr_decode(const BsrParams& p, DType dt, int bn, int num_sms, cudaStream_t stream) {
  return dt == kFloat16 ? launch_bn<__half>(p, bn, num_sms, stream)
                        : launch_bn<__nv_bfloat16>(p, bn, num_sms, stream);
}

cudaError_t launch_bsr_finalize(const BsrParams& p, DType dt, int bn, cudaStream_t stream) {
  return dt == kFloat16 ? launch_fin<__half>(p, bn, stream) : launch_fin<__nv_bfloat16>(p, bn, stream);
}

}  // namespace sparsecore
