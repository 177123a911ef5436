// Prefill forward for sm80+ (runs on Hopper too): one CTA per (128-row tile of x, block-row).
//
//   grid  = (R, ceil(M/128))        blockIdx.x -> block-row r = row_order[blockIdx.x]; the
//         block-rows of one M tile run together, so its x tile is read from DRAM once
//   CTA   = WARPS_M x WARPS_N warps  warp tile 32 x WN (WN = BN / WARPS_N)
//   loop  over the K-chunks of r (64 columns each, see bsr_common.cuh), STAGES-deep
//         cp.async pipeline; per chunk 4 k16 steps of ldmatrix.x4 + mma.sync m16n8k16.
//
//   shared, per stage:  A [128][64] x rows (swizzled)  |  B [BN][64] values rows (swizzled)
//   mma:  acc[m, n] += A[m, k] * B[n, k]   (B stored [n][k] = the "col" operand as is)
#include "bsr_common.cuh"

namespace sparsecore {
namespace {

template <int BN> struct Sm80Cfg {
  static constexpr int BM = 128;
  static constexpr int WARPS_M = 4;
  static constexpr int WARPS_N = BN >= 64 ? 2 : 1;
  static constexpr int WN = BN / WARPS_N;  // 16, 32, 32, 64
  static constexpr int MI = 2;             // m16 tiles per warp (warp rows = 32)
  static constexpr int NI = WN / 8;        // n8 tiles per warp
  static constexpr int NT = 32 * WARPS_M * WARPS_N;
  static constexpr int STAGE_BYTES = (BM + BN) * 128;
  static constexpr int STAGES = BN >= 128 ? 3 : 4;
  static constexpr int SMEM = STAGES * STAGE_BYTES;
};

template <typename T, int BN>
__global__ void __launch_bounds__(Sm80Cfg<BN>::NT) bsr_fwd_sm80(const BsrParams p) {
  using C = Sm80Cfg<BN>;
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t s0 = smem_addr(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % C::WARPS_M, wn = warp / C::WARPS_M;
  const int r = p.row_order[blockIdx.x];
  const int m0 = blockIdx.y * C::BM;
  const int first = p.row_ptr[r], nb = p.row_ptr[r + 1] - first;
  const int nchunks = num_chunks(nb, p.bk_shift);

  auto stage_a = [&](int s) { return s0 + s * C::STAGE_BYTES; };
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < nchunks) load_chunk<T, C::BM, BN, C::NT>(p, stage_a(s), stage_a(s) + C::BM * 128, m0, first, nb, s, tid);
    cp_async_commit();
  }

  float acc[C::MI][C::NI][4] = {};
  for (int j = 0; j < nchunks; ++j) {
    cp_async_wait<C::STAGES - 2>();  // chunk j landed (this thread's copies)
    __syncthreads();                 // ... everyone's; and chunk j-1's stage is free
    const int jn = j + C::STAGES - 1;
    if (jn < nchunks) {
      const int sn = jn % C::STAGES;
      load_chunk<T, C::BM, BN, C::NT>(p, stage_a(sn), stage_a(sn) + C::BM * 128, m0, first, nb, jn, tid);
    }
    cp_async_commit();

    const uint32_t sA = stage_a(j % C::STAGES), sB = sA + C::BM * 128;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[C::MI][4];
#pragma unroll
      for (int mi = 0; mi < C::MI; ++mi)  // lanes 0-15: rows 0-15 at k 0-7; 16-31: k 8-15
        ldmatrix_x4(a[mi], sA + swz(wm * 32 + mi * 16 + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
      for (int nj = 0; nj < C::NI / 2; ++nj) {
        // matrices: (n 0-7, k 0-7) (n 0-7, k 8-15) (n 8-15, k 0-7) (n 8-15, k 8-15)
        uint32_t b[4];
        ldmatrix_x4(b, sB + swz(wn * C::WN + nj * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1)));
        mma_slab<T>(acc, a, b, nj);
      }
    }
  }
  cp_async_wait<0>();

  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < C::MI; ++mi) {
    const int m = m0 + wm * 32 + mi * 16 + g;
#pragma unroll
    for (int ni = 0; ni < C::NI; ++ni) {
      const int n = r * BN + wn * C::WN + ni * 8 + 2 * t;
      store_pair<T>(p, m, n, acc[mi][ni][0], acc[mi][ni][1]);
      store_pair<T>(p, m + 8, n, acc[mi][ni][2], acc[mi][ni][3]);
    }
  }
}

template <typename T>
cudaError_t launch_bn(const BsrParams& p, int bn, cudaStream_t stream) {
  return with_side(bn, [&](auto side) {
    using C = Sm80Cfg<decltype(side)::value>;
    return launch_smem<C>(bsr_fwd_sm80<T, decltype(side)::value>, dim3(p.R, (p.M + C::BM - 1) / C::BM), p, stream);
  });
}

}  // namespace

cudaError_t launch_bsr_sm80(const BsrParams& p, DType dt, int bn, cudaStream_t stream) {
  return dt == kFloat16 ? launch_bn<__half>(p, bn, stream) : launch_bn<__nv_bfloat16>(p, bn, stream);
}

}  // namespace sparsecore
