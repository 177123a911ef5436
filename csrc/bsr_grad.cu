// Backward kernels for sm80+ (cp.async pipeline, ldmatrix, mma.sync m16n8k16, fp32 accumulate).
//
// dX = dY @ W: one CTA per (block-column c, 128-row tile of dY). The kept blocks of c (CSC
//   slots col_ptr[c] ..) laid side by side form a virtual reduction axis of nb*BN rows of W
//   (u = i*BN + n: row n of the i-th kept block of c), consumed 64 at a time:
//     A = dY[m0 .., row_idx[slot]*BN + n]   [128][64]  swizzled, as the forward's x tile
//     B = values[t_perm[slot]][n][0 .. BK]   [64][BK]   rows along u, BK contiguous
//   acc[m, k] += A[m, u] * B[u, k]; B is [k-of-mma][n-of-mma] in shared memory, so its
//   fragments come from ldmatrix.trans.
// dW = dY^T X on kept blocks: one CTA per (kept block i, range of M), 64 rows of M a chunk:
//     A = dY[m0 .. m0+64, r*BN .. r*BN+BN]   [64][BN]   read transposed (ldmatrix.trans)
//     B = X [m0 .. m0+64, c*BK .. c*BK+BK]   [64][BK]   read transposed (ldmatrix.trans)
//   acc[n, k] += A[m, n] * B[m, k]; with several M ranges, fp32 atomics into a workspace.
//
// Shared tiles with W columns (16..128) are stored as panels of 64 columns: piece cp (8
// elements) of row r lives in panel cp/8 (8 KB each) at swz(r, cp % 8).
#include "bsr_common.cuh"

namespace sparsecore {
namespace {

__device__ __forceinline__ uint32_t panel_off(int row, int cp) {
  return static_cast<uint32_t>((cp >> 3) * 8192) + swz(row, cp & 7);
}

// B fragments of one 16-wide n slab (panel column pieces cp0, cp0 + 1) at k16 step kk, from a
// panel stored [k][n]: matrices (n 0-7, k 0-7) (n 0-7, k 8-15) (n 8-15, k 0-7) (n 8-15, k 8-15)
// via ldmatrix.trans.
__device__ __forceinline__ void load_b_slab_trans(uint32_t (&b)[4], uint32_t sB, int kk, int cp0, int lane) {
  ldmatrix_x4_trans(b, sB + panel_off(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), cp0 + (lane >> 4)));
}

constexpr int panel_bytes(int cols) { return (cols >= 64 ? cols / 64 : 1) * 8192; }

// Copy a [64][W] tile of a row-major matrix: rows row0 .., columns col0 .. col0+W; rows >= rows_ok
// or columns >= cols_ok are zero-filled.
template <typename T, int W, int NT>
__device__ __forceinline__ void load_rows64(uint32_t s, const T* src, int ld, int row0, int rows_ok, int col0,
                                            int cols_ok, int tid) {
  constexpr int PR = W / 8, TOTAL = 64 * PR;
#pragma unroll
  for (int it = 0; it < (TOTAL + NT - 1) / NT; ++it) {
    const int q = tid + it * NT;
    if (TOTAL % NT != 0 && q >= TOTAL) break;
    const int row = q / PR, cp = q % PR;
    const int m = row0 + row, col = col0 + cp * 8;
    const bool ok = m < rows_ok && col < cols_ok;
    cp_async16(s + panel_off(row, cp), ok ? src + static_cast<int64_t>(m) * ld + col : src, ok);
  }
}

// ---- dX ---------------------------------------------------------------------------------
template <int BK> struct DxCfg {
  static constexpr int BM = 128;
  static constexpr int WARPS_M = 4;
  static constexpr int WARPS_N = BK >= 64 ? 2 : 1;
  static constexpr int WN = BK / WARPS_N;
  static constexpr int MI = 2;
  static constexpr int NI = WN / 8;
  static constexpr int NT = 32 * WARPS_M * WARPS_N;
  static constexpr int A_BYTES = BM * 128;
  static constexpr int STAGE_BYTES = A_BYTES + panel_bytes(BK);
  static constexpr int STAGES = BK >= 128 ? 3 : 4;
  static constexpr int SMEM = STAGES * STAGE_BYTES;
};

template <typename T, int BK, int NT>
__device__ __forceinline__ void load_dx_chunk(const BsrDxParams& p, uint32_t sA, uint32_t sB, int m0, int first,
                                              int nb, int j, int tid) {
  constexpr int BM = DxCfg<BK>::BM;
  const int bn_mask = (1 << p.bn_shift) - 1;
  {  // A: dY rows m0.., 8 columns per piece at virtual u = 64j + 8*piece
    const int piece = tid & 7;
    const int u = (j << 6) + (piece << 3);
    const int i = u >> p.bn_shift;
    const bool block_ok = i < nb;
    const int ky = block_ok ? block_col(__ldg(p.row_idx + first + i), 1 << p.bn_shift, p.Ny) + (u & bn_mask) : 0;
    const bool col_ok = block_ok && ky < p.Ny;
    const T* dy = static_cast<const T*>(p.dy);
#pragma unroll
    for (int it = 0; it < BM / (NT / 8); ++it) {
      const int r = (tid >> 3) + it * (NT / 8);
      const bool ok = col_ok && m0 + r < p.M;
      cp_async16(sA + swz(r, piece), ok ? dy + static_cast<int64_t>(m0 + r) * p.ldy + ky : dy, ok);
    }
  }
  // B: row `row` of the tile is values[t_perm[slot]][n][0 .. BK] for u = 64j + row
  constexpr int PR = BK / 8, TOTAL = 64 * PR;
  const T* vals = static_cast<const T*>(p.values);
#pragma unroll
  for (int it = 0; it < (TOTAL + NT - 1) / NT; ++it) {
    const int q = tid + it * NT;
    if (TOTAL % NT != 0 && q >= TOTAL) break;
    const int row = q / PR, cp = q % PR;
    const int u = (j << 6) + row;
    const int i = u >> p.bn_shift;
    const bool ok = i < nb;
    const int blk = ok ? __ldg(p.t_perm + first + i) : 0;
    const T* src = vals + ((static_cast<int64_t>(blk) << p.bn_shift) + (u & bn_mask)) * BK + cp * 8;
    cp_async16(sB + panel_off(row, cp), ok ? src : vals, ok);
  }
}

template <typename T, int BK>
__global__ void __launch_bounds__(DxCfg<BK>::NT) bsr_dx_sm80(const BsrDxParams p) {
  using C = DxCfg<BK>;
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t s0 = smem_addr(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % C::WARPS_M, wn = warp / C::WARPS_M;
  const int c = blockIdx.x;
  const int m0 = blockIdx.y * C::BM;
  const int first = p.col_ptr[c], nb = p.col_ptr[c + 1] - first;
  const int nchunks = ((nb << p.bn_shift) + 63) >> 6;

  auto stage_a = [&](int s) { return s0 + s * C::STAGE_BYTES; };
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < nchunks) load_dx_chunk<T, BK, C::NT>(p, stage_a(s), stage_a(s) + C::A_BYTES, m0, first, nb, s, tid);
    cp_async_commit();
  }
  float acc[C::MI][C::NI][4] = {};
  for (int j = 0; j < nchunks; ++j) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();
    const int jn = j + C::STAGES - 1;
    if (jn < nchunks) {
      const int sn = jn % C::STAGES;
      load_dx_chunk<T, BK, C::NT>(p, stage_a(sn), stage_a(sn) + C::A_BYTES, m0, first, nb, jn, tid);
    }
    cp_async_commit();

    const uint32_t sA = stage_a(j % C::STAGES), sB = sA + C::A_BYTES;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[C::MI][4];
#pragma unroll
      for (int mi = 0; mi < C::MI; ++mi)
        ldmatrix_x4(a[mi], sA + swz(wm * 32 + mi * 16 + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
      for (int nj = 0; nj < C::NI / 2; ++nj) {
        uint32_t b[4];
        load_b_slab_trans(b, sB, kk, (wn * C::WN + nj * 16) >> 3, lane);
        mma_slab<T>(acc, a, b, nj);
      }
    }
  }
  cp_async_wait<0>();

  const int g = lane >> 2, t = lane & 3;
  T* dx = static_cast<T*>(p.dx);
#pragma unroll
  for (int mi = 0; mi < C::MI; ++mi) {
    const int m = m0 + wm * 32 + mi * 16 + g;
#pragma unroll
    for (int ni = 0; ni < C::NI; ++ni) {
      const int k = c * BK + wn * C::WN + ni * 8 + 2 * t;
      store_pair_raw<T>(dx, p.M, p.K, m, k, acc[mi][ni][0], acc[mi][ni][1]);
      store_pair_raw<T>(dx, p.M, p.K, m + 8, k, acc[mi][ni][2], acc[mi][ni][3]);
    }
  }
}

// ---- dW ---------------------------------------------------------------------------------
template <int BN, int BK> struct DwCfg {
  static constexpr int WARPS_M = BN >= 64 ? 4 : BN / 16;
  static constexpr int WM = BN / WARPS_M;  // 16 or 32
  static constexpr int MI = WM / 16;
  static constexpr int WARPS_N = BK >= 64 ? 2 : 1;
  static constexpr int WN = BK / WARPS_N;
  static constexpr int NI = WN / 8;
  static constexpr int NT = 32 * WARPS_M * WARPS_N;
  static constexpr int A_BYTES = panel_bytes(BN);
  static constexpr int STAGE_BYTES = A_BYTES + panel_bytes(BK);
  static constexpr int STAGES = STAGE_BYTES >= 32768 ? 3 : 4;  // <= 96 KB: fits sm86/89's 99 KB
  static constexpr int SMEM = STAGES * STAGE_BYTES;
};

template <typename T, int BN, int BK>
__global__ void __launch_bounds__(DwCfg<BN, BK>::NT) bsr_dw_sm80(const BsrDwParams p) {
  using C = DwCfg<BN, BK>;
  extern __shared__ __align__(128) uint8_t smem[];
  const uint32_t s0 = smem_addr(smem);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % C::WARPS_M, wn = warp / C::WARPS_M;
  const int blk = blockIdx.x;
  const int ycol = block_col(p.block_row[blk], BN, p.Ny), xcol = block_col(p.col_idx[blk], BK, p.Kx);
  const int total = (p.M + 63) >> 6;
  // range y: chunks [y * total / splits, (y + 1) * total / splits), none empty (splits <= total)
  const int j0 = static_cast<int>(static_cast<int64_t>(blockIdx.y) * total / p.splits);
  const int j1 = static_cast<int>(static_cast<int64_t>(blockIdx.y + 1) * total / p.splits);
  const T* dy = static_cast<const T*>(p.dy);
  const T* x = static_cast<const T*>(p.x);

  auto stage_a = [&](int s) { return s0 + s * C::STAGE_BYTES; };
  auto load = [&](int j, int s) {
    load_rows64<T, BN, C::NT>(stage_a(s), dy, p.ldy, j << 6, p.M, ycol, p.Ny, tid);
    load_rows64<T, BK, C::NT>(stage_a(s) + C::A_BYTES, x, p.ldx, j << 6, p.M, xcol, p.Kx, tid);
  };
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (j0 + s < j1) load(j0 + s, s);
    cp_async_commit();
  }
  float acc[C::MI][C::NI][4] = {};
  for (int j = j0; j < j1; ++j) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();
    if (j + C::STAGES - 1 < j1) load(j + C::STAGES - 1, (j - j0 + C::STAGES - 1) % C::STAGES);
    cp_async_commit();

    const uint32_t sA = stage_a((j - j0) % C::STAGES), sB = sA + C::A_BYTES;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {  // 16 rows of M per step
      uint32_t a[C::MI][4];
#pragma unroll
      for (int mi = 0; mi < C::MI; ++mi) {
        // A = dY^T: matrices (m 0-7, n 0-7) (m 0-7, n 8-15) (m 8-15, n 0-7) (m 8-15, n 8-15), transposed
        const int q = lane >> 3;
        const int cp = ((wm * C::WM + mi * 16) >> 3) + (q & 1);
        ldmatrix_x4_trans(a[mi], sA + panel_off(kk * 16 + (lane & 7) + ((q >> 1) << 3), cp));
      }
#pragma unroll
      for (int nj = 0; nj < C::NI / 2; ++nj) {
        uint32_t b[4];
        load_b_slab_trans(b, sB, kk, (wn * C::WN + nj * 16) >> 3, lane);
        mma_slab<T>(acc, a, b, nj);
      }
    }
  }
  cp_async_wait<0>();

  const int g = lane >> 2, t = lane & 3;
  const int64_t base = static_cast<int64_t>(blk) * BN * BK;
#pragma unroll
  for (int mi = 0; mi < C::MI; ++mi) {
    const int n = wm * C::WM + mi * 16 + g;
#pragma unroll
    for (int ni = 0; ni < C::NI; ++ni) {
      const int k = wn * C::WN + ni * 8 + 2 * t;
      if (p.workspace) {
        float* w = p.workspace + base + n * BK + k;
        atomicAdd(w, acc[mi][ni][0]);
        atomicAdd(w + 1, acc[mi][ni][1]);
        atomicAdd(w + 8 * BK, acc[mi][ni][2]);
        atomicAdd(w + 8 * BK + 1, acc[mi][ni][3]);
      } else {
        T* dv = static_cast<T*>(p.dv) + base;
        store_pair_raw<T>(dv, BN, BK, n, k, acc[mi][ni][0], acc[mi][ni][1]);
        store_pair_raw<T>(dv, BN, BK, n + 8, k, acc[mi][ni][2], acc[mi][ni][3]);
      }
    }
  }
}

template <typename T>
__global__ void bsr_dw_finalize(const BsrDwParams p, int64_t numel) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < numel) static_cast<T*>(p.dv)[i] = Elem<T>::from_float(p.workspace[i]);
}

// ---- launchers --------------------------------------------------------------------------
template <typename T>
cudaError_t launch_dx_bk(const BsrDxParams& p, int bk, cudaStream_t stream) {
  return with_side(bk, [&](auto side) {
    using C = DxCfg<decltype(side)::value>;
    return launch_smem<C>(bsr_dx_sm80<T, decltype(side)::value>, dim3(p.C, (p.M + C::BM - 1) / C::BM), p, stream);
  });
}

template <typename T>
cudaError_t launch_dw_bn(const BsrDwParams& p, int bn, int bk, cudaStream_t stream) {
  return with_side(bn, [&](auto n) {
    return with_side(bk, [&](auto k) {
      using C = DwCfg<decltype(n)::value, decltype(k)::value>;
      return launch_smem<C>(bsr_dw_sm80<T, decltype(n)::value, decltype(k)::value>, dim3(p.nnzb, p.splits), p,
                            stream);
    });
  });
}

}  // namespace

cudaError_t launch_bsr_dx(const BsrDxParams& p, DType dt, int bk, cudaStream_t stream) {
  return dt == kFloat16 ? launch_dx_bk<__half>(p, bk, stream) : launch_dx_bk<__nv_bfloat16>(p, bk, stream);
}

cudaError_t launch_bsr_dw(const BsrDwParams& p, DType dt, int bn, int bk, cudaStream_t stream) {
  return dt == kFloat16 ? launch_dw_bn<__half>(p, bn, bk, stream) : launch_dw_bn<__nv_bfloat16>(p, bn, bk, stream);
}

cudaError_t launch_bsr_dw_finalize(const BsrDwParams& p, DType dt, int64_t numel, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>((numel + 255) / 256);
  if (dt == kFloat16) {
    bsr_dw_finalize<__half><<<grid, 256, 0, stream>>>(p, numel);
  } else {
    bsr_dw_finalize<__nv_bfloat16><<<grid, 256, 0, stream>>>(p, numel);
  }
  return cudaSuccess;
}

}  // namespace sparsecore
