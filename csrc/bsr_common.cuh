// Device helpers shared by the block-sparse forward kernels (sm80 prefill, sm90a prefill,
// decode): element types, cp.async, ldmatrix, mma.sync, the swizzled shared-memory tile
// that both prefill kernels fill, and the fused bias + activation epilogue.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>
#include <type_traits>

#include "bsr_kernels.h"

namespace sparsecore {

// ---------------------------------------------------------------------------------------
// Element types: the kernels move raw 16-bit words; Elem<T> names the mma variant and the
// scalar conversions.
template <typename T> struct Elem;
template <> struct Elem<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// ---------------------------------------------------------------------------------------
// cp.async (sm80+): 16-byte global -> shared copy; src_bytes = 0 writes 16 zero bytes.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// ldmatrix: four 8x8 b16 matrices; lane l gives the row address of matrix l/8. Plain: lane
// (g, t) gets row g, columns 2t..2t+1 of each; .trans: rows 2t..2t+1 of column g.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// mma.sync m16n8k16, fp32 accumulate. Fragments (g = lane/4, t = lane%4):
//   a0:(g, 2t..2t+1) a1:(g+8, 2t..) a2:(g, 2t+8..) a3:(g+8, 2t+8..)      A [16 x 16] row-major
//   b0:(k 2t..2t+1, n g) b1:(k 2t+8.., n g)                              B [16 x 8], "col"
//   c0,c1:(g, 2t..2t+1) c2,c3:(g+8, 2t..2t+1)                           C [16 x 8]
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// acc[mi][2nj], acc[mi][2nj + 1] += a[mi] @ the two n8 halves of one 16-wide B slab
// (b[0..1]: n 0-7, b[2..3]: n 8-15), for every m16 tile mi of the warp.
template <typename T, int MI, int NI>
__device__ __forceinline__ void mma_slab(float (&acc)[MI][NI][4], const uint32_t (&a)[MI][4], const uint32_t (&b)[4],
                                         int nj) {
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
    mma16816<T>(acc[mi][2 * nj], a[mi], b[0], b[1]);
    mma16816<T>(acc[mi][2 * nj + 1], a[mi], b[2], b[3]);
  }
}

// ---------------------------------------------------------------------------------------
// K-chunks. The kept blocks of one block-row, laid side by side, form a "virtual K" of
// nb*BK columns (v = i*BK + k: column k of the row's i-th kept block). Prefill kernels
// consume it 64 columns at a time: chunk j = v in [64j, 64j+64). A 128-wide block is two
// chunks; a chunk holds two 32-wide or four 16-wide blocks (a short last chunk is
// zero-filled), so the MMA always sees K = 64.
__device__ __forceinline__ int num_chunks(int nb, int bk_shift) { return ((nb << bk_shift) + 63) >> 6; }

// First column (idx * side, side a power of two) of a block index into a D-wide operand, or D
// when that is not below D: loads from D on are zero-filled. Metadata for a wider weight than
// the operand (a direct caller of the cuda_* ops; the public op ties the widths) can then
// never address outside it (int32 would wrap into a negative column; a product past 2^32 may
// still land on another column of it). 32-bit: the decode loop keeps its registers.
__device__ __forceinline__ int block_col(int idx, unsigned side, int D) {
  const unsigned c = static_cast<unsigned>(idx) * side;
  return c < static_cast<unsigned>(D) ? static_cast<int>(c) : D;
}

// Swizzled tile: ROWS rows of 64 elements (128 B). The 16-byte piece c (elements 8c..8c+7)
// of row r lives at byte r*128 + ((c ^ (r & 7)) << 4): ldmatrix and cp.async touch 8
// distinct bank groups, and it is exactly wgmma's 128-byte swizzle (Swizzle<3,4,3>) when
// the tile starts on a 1024-byte boundary.
__device__ __forceinline__ uint32_t swz(int row, int piece) {
  return static_cast<uint32_t>(row * 128 + ((piece ^ (row & 7)) << 4));
}

// Load chunk j of block-row (first, nb) into a stage: A = x[m0 .. m0+BM, chunk columns],
// B = values[chunk blocks, 0 .. BN, chunk columns]. NT threads; thread tid always copies
// piece (tid % 8) of rows tid/8, tid/8 + NT/8, ... Rows past M, columns past Kx and blocks
// past the row's last are zero-filled.
template <typename T, int BM, int BN, int NT>
__device__ __forceinline__ void load_chunk(const BsrParams& p, uint32_t sA, uint32_t sB, int m0, int first, int nb,
                                           int j, int tid) {
  static_assert(NT % 8 == 0, "threads must cover whole rows");
  const int piece = tid & 7;
  const int v = (j << 6) + (piece << 3);
  const int i = v >> p.bk_shift;            // kept block of this row (relative)
  const int kin = v & ((1 << p.bk_shift) - 1);  // column inside the block
  const bool block_ok = i < nb;
  const int blk = first + (block_ok ? i : 0);
  const int kx = block_ok ? block_col(__ldg(p.col_idx + blk), 1 << p.bk_shift, p.Kx) + kin : 0;  // column of x
  const T* x = static_cast<const T*>(p.x);
  const T* vals = static_cast<const T*>(p.values) + ((static_cast<int64_t>(blk) * BN) << p.bk_shift) + kin;
  const bool col_ok = block_ok && kx < p.Kx;
  constexpr int ROWS_PER_PASS = NT / 8;
  static_assert(BM % ROWS_PER_PASS == 0, "x tile rows must split evenly over the threads");
#pragma unroll
  for (int it = 0; it < BM / ROWS_PER_PASS; ++it) {
    const int r = (tid >> 3) + it * ROWS_PER_PASS;
    const int m = m0 + r;
    const bool ok = col_ok && m < p.M;
    const T* src = ok ? x + static_cast<int64_t>(m) * p.ldx + kx : x;
    cp_async16(sA + swz(r, piece), src, ok);
  }
#pragma unroll
  for (int it = 0; it < (BN + ROWS_PER_PASS - 1) / ROWS_PER_PASS; ++it) {
    const int r = (tid >> 3) + it * ROWS_PER_PASS;
    if (BN % ROWS_PER_PASS != 0 && r >= BN) break;
    const T* src = block_ok ? vals + (r << p.bk_shift) : static_cast<const T*>(p.values);
    cp_async16(sB + swz(r, piece), src, block_ok);
  }
}

// ---------------------------------------------------------------------------------------
// Epilogue: y = act(acc + bias), fp32 until the single rounding to T.
__device__ __forceinline__ float activate(float z, int act) {
  switch (act) {
    case kActRelu: return fmaxf(z, 0.f);
    case kActGelu: return 0.5f * z * (1.f + erff(z * 0.70710678118654752f));
    case kActSilu: return z / (1.f + expf(-z));
    default: return z;
  }
}

// Store v0, v1 at y[m, n], y[m, n+1] of a [M, N] row-major y (n even). Skips rows >= M and
// columns >= N; a 4-byte store when both columns exist and rows stay 4-byte aligned (N even).
template <typename T>
__device__ __forceinline__ void store_pair_raw(T* y, int M, int N, int m, int n, float v0, float v1) {
  if (m >= M || n >= N) return;
  T* dst = y + static_cast<int64_t>(m) * N + n;
  if (n + 1 < N && (N & 1) == 0) {
    *reinterpret_cast<uint32_t*>(dst) = Elem<T>::pack(v0, v1);
  } else {
    dst[0] = Elem<T>::from_float(v0);
    if (n + 1 < N) dst[1] = Elem<T>::from_float(v1);
  }
}

// The forward epilogue: y[m, n..n+1] = act(acc + bias).
template <typename T>
__device__ __forceinline__ void store_pair(const BsrParams& p, int m, int n, float v0, float v1) {
  if (m >= p.M || n >= p.N) return;
  const T* bias = static_cast<const T*>(p.bias);
  if (bias) {
    v0 += Elem<T>::to_float(bias[n]);
    if (n + 1 < p.N) v1 += Elem<T>::to_float(bias[n + 1]);
  }
  store_pair_raw<T>(static_cast<T*>(p.y), p.M, p.N, m, n, activate(v0, p.activation), activate(v1, p.activation));
}

// ---------------------------------------------------------------------------------------
// Host-side launch helpers.
// with_side(s, f): f(std::integral_constant<int, S>{}) for a runtime block side S.
template <typename F>
cudaError_t with_side(int side, F&& f) {
  switch (side) {
    case 16: return f(std::integral_constant<int, 16>{});
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: return cudaErrorInvalidValue;
  }
}

// Launch `kernel(p)` with Cfg::NT threads and Cfg::SMEM bytes of dynamic shared memory.
template <typename Cfg, typename Kernel, typename Params>
cudaError_t launch_smem(Kernel kernel, dim3 grid, const Params& p, cudaStream_t stream) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::SMEM);
  if (err != cudaSuccess) return err;
  kernel<<<grid, Cfg::NT, Cfg::SMEM, stream>>>(p);
  return cudaSuccess;
}

}  // namespace sparsecore
