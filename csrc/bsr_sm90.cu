// Prefill forward for sm90a: wgmma.mma_async (SASS HGMMA) fed by a cp.async pipeline.
//
//   grid  = (R, ceil(M/128))        blockIdx.x -> block-row r = row_order[blockIdx.x]; the
//         block-rows of one M tile run together, so its x tile is read from DRAM once
//   CTA   = 2 warpgroups (256 threads); warpgroup w computes rows [64w, 64w+64) x BN
//   loop  over the K-chunks of r (64 columns each, see bsr_common.cuh); STAGES-deep ring:
//         loads run STAGES-2 chunks ahead, one wgmma group stays in flight.
//
//   shared, per stage (1024-byte aligned):  A [128][64] x rows | B [BN][64] values rows,
//   both K-major with the 128-byte swizzle; wgmma descriptors: SBO = 1024 (8 rows x 128 B),
//   LBO unused, k16 step = +32 bytes on the start address.
//   wgmma:  D[m, n] += A[m, k] * B[n, k]  (both operands K-major, no transpose)
#include "bsr_common.cuh"

namespace sparsecore {

bool bsr_sm90_built() {
#ifdef SPARSECORE_HAS_SM90A
  return true;
#else
  return false;
#endif
}

namespace {

template <int BN> struct Sm90Cfg {
  static constexpr int BM = 128;
  static constexpr int NT = 256;
  static constexpr int STAGE_BYTES = (BM + BN) * 128;  // a multiple of 1024
  static constexpr int STAGES = 4;
  static constexpr int SMEM = STAGES * STAGE_BYTES + 1024;  // + room to align the base
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Shared-memory matrix descriptor: start address, LBO = 16 B (unused with swizzle),
// SBO = 1024 B, 128-byte swizzle (mode 1 in bits 62-63).
__device__ __forceinline__ uint64_t gmma_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(16 >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Pin the accumulators in place around async wgmma: no reads or writes of them move across.
template <int R> __device__ __forceinline__ void fence_operands(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// D[64 x N] (+)= A[64 x 16] B[N x 16]^T; D fragment of thread (warp w of the warpgroup,
// g = lane/4, t = lane%4): d[4i + e] is row 16w + g + 8*(e >= 2), column 8i + 2t + (e & 1).
template <typename T, int N>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[N / 2], uint64_t da, uint64_t db);
template <>
__device__ __forceinline__ void wgmma_m64k16<__half, 16>(float (&d)[8], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "l"(da), "l"(db), "r"(1));
}
template <>
__device__ __forceinline__ void wgmma_m64k16<__half, 32>(float (&d)[16], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(da), "l"(db), "r"(1));
}
template <>
__device__ __forceinline__ void wgmma_m64k16<__half, 64>(float (&d)[32], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db), "r"(1));
}
template <>
__device__ __forceinline__ void wgmma_m64k16<__half, 128>(float (&d)[64], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(1));
}
template <>
__device__ __forceinline__ void wgmma_m64k16<__nv_bfloat16, 16>(float (&d)[8], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
      : "l"(da), "l"(db), "r"(1));
}
template <>
__device__ __forceinline__ void wgmma_m64k16<__nv_bfloat16, 32>(float (&d)[16], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "l"(da), "l"(db), "r"(1));
}
template <>
__device__ __forceinline__ void wgmma_m64k16<__nv_bfloat16, 64>(float (&d)[32], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "l"(da), "l"(db), "r"(1));
}
template <>
__device__ __forceinline__ void wgmma_m64k16<__nv_bfloat16, 128>(float (&d)[64], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(da), "l"(db), "r"(1));
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <typename T, int BN>
__global__ void __launch_bounds__(Sm90Cfg<BN>::NT) bsr_fwd_sm90(const BsrParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Sm90Cfg<BN>;
  extern __shared__ uint8_t smem[];
  const uint32_t s0 = (smem_addr(smem) + 1023u) & ~1023u;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2;  // warpgroup: rows [64 wg, 64 wg + 64)
  const int r = p.row_order[blockIdx.x];
  const int m0 = blockIdx.y * C::BM;
  const int first = p.row_ptr[r], nb = p.row_ptr[r + 1] - first;
  const int nchunks = num_chunks(nb, p.bk_shift);

  auto stage_a = [&](int s) { return s0 + s * C::STAGE_BYTES; };
#pragma unroll
  for (int s = 0; s < C::STAGES - 2; ++s) {
    if (s < nchunks) load_chunk<T, C::BM, BN, C::NT>(p, stage_a(s), stage_a(s) + C::BM * 128, m0, first, nb, s, tid);
    cp_async_commit();
  }

  float d[BN / 2];
#pragma unroll
  for (int i = 0; i < BN / 2; ++i) d[i] = 0.f;
  fence_operands(d);

  for (int j = 0; j < nchunks; ++j) {
    cp_async_wait<C::STAGES - 3>();  // chunk j landed (this thread's copies)
    fence_proxy_async();             // ... and is visible to the async proxy (wgmma)
    __syncthreads();                 // everyone's; every warpgroup has retired wgmma j-2
    const int jn = j + C::STAGES - 2;
    if (jn < nchunks) {
      const int sn = jn % C::STAGES;  // == (j - 2) % STAGES: free since wgmma j-2 retired
      load_chunk<T, C::BM, BN, C::NT>(p, stage_a(sn), stage_a(sn) + C::BM * 128, m0, first, nb, jn, tid);
    }
    cp_async_commit();

    const uint32_t sA = stage_a(j % C::STAGES), sB = sA + C::BM * 128;
    const uint64_t da = gmma_desc(sA + wg * 64 * 128), db = gmma_desc(sB);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)  // +32 bytes per k16 step = +2 in the encoded address
      wgmma_m64k16<T, BN>(d, da + 2 * kk, db + 2 * kk);
    wgmma_commit();
    wgmma_wait<1>();  // wgmma j-1 retired: its stage may be refilled next iteration
  }
  wgmma_wait<0>();
  fence_operands(d);
  cp_async_wait<0>();

  const int g = lane >> 2, t = lane & 3;
  const int m = m0 + wg * 64 + (warp & 3) * 16 + g;
#pragma unroll
  for (int i = 0; i < BN / 8; ++i) {
    const int n = r * BN + i * 8 + 2 * t;
    store_pair<T>(p, m, n, d[4 * i], d[4 * i + 1]);
    store_pair<T>(p, m + 8, n, d[4 * i + 2], d[4 * i + 3]);
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

template <typename T>
cudaError_t launch_bn(const BsrParams& p, int bn, cudaStream_t stream) {
  return with_side(bn, [&](auto side) {
    using C = Sm90Cfg<decltype(side)::value>;
    return launch_smem<C>(bsr_fwd_sm90<T, decltype(side)::value>, dim3(p.R, (p.M + C::BM - 1) / C::BM), p, stream);
  });
}

}  // namespace

cudaError_t launch_bsr_sm90(const BsrParams& p, DType dt, int bn, cudaStream_t stream) {
  return dt == kFloat16 ? launch_bn<__half>(p, bn, stream) : launch_bn<__nv_bfloat16>(p, bn, stream);
}

}  // namespace sparsecore
