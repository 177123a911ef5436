// Prefill forward for sm90a: TMA loads completing on mbarriers, wgmma.mma_async (SASS HGMMA),
// producer/consumer warp specialization.
//
//   tiles = R x ceil(M/BM), tile -> (M tile tile / R, block-row r = row_order[tile % R]): the
//         block-rows of one M tile run together, so its x tile is read from DRAM once
//   grid  = persistent (BN <= 64): min(tiles, #SMs x CTAs per SM); CTA b takes tile b, then
//         the next untaken one (atomicAdd on p.tile_counter, zeroed): heaviest block-rows
//         first, and the producer loads the next tile while the consumers finish this one.
//         BN = 128: a CTA per tile.
//   CTA   = 2 consumer warpgroups (warps 0-7: warpgroup w computes rows [BM/2 w, BM/2 (w+1)) x BN)
//         + 1 producer warp (warp 8: one thread issues every TMA load) = 288 threads
//   loop  over the 64-column K-chunks of each tile's row (see bsr_common.cuh), a STAGES-deep
//         ring of messages (one per chunk; one per tile with nothing to load; tile -1 at the end):
//         producer: wait empty[s] -> msg[s] = {live, tile}, arrive + expect_tx(full[s]) -> TMA
//                   x and values pieces
//         consumers: wait full[s] -> 4 k16 steps of wgmma (m64 tiles of x rows x BN, or with
//                    SWAP the block's 64 rows x 128 x rows) -> keep one group in flight ->
//                    release the previous chunk's stage (arrive on its empty barrier)
//
//   A chunk is G = 64 / KC pieces, KC = min(BK, 64) columns each (BK = 128: one piece, half
//   a block; BK = 16: four blocks). Shared memory, per stage (1024-byte aligned pieces):
//
//     A: G x [BM rows][KC]   x[m0 .. m0+BM, col_idx[blk]*BK + kin ..]  (BM x 128 B in all)
//     B: G x [BN rows][KC]   values[blk, :, kin ..]                     (a piece >= 1 KB)
//
//   every piece K-major with the swizzle of its row width (KC*2 = 128, 64 or 32 bytes),
//   written by TMA and read by wgmma descriptors of the same swizzle: SBO = 8 rows, LBO
//   unused, a k16 step inside a piece = +32 bytes on the start address. TMA zero-fills rows
//   past M and columns past Kx inside a box. A piece with nothing to load is not loaded and
//   its wgmma reads a zeroed region instead (a select, so every chunk is 4 unconditional
//   k16 steps): past the row's last block (BK < 64, last chunk) A and B read zeros; x columns
//   wholly past Kx (BK = 128, K % 128 <= 64) A reads zeros. The producer tells the consumers
//   which pieces it loaded in live (bit g: A, bit 4 + g: B), published by the full barrier.
//
//     [ stage 0 | ... | stage S-1 | zeros | out (SWAP) | full[S] | empty[S] | msg[S] ]
//
//   wgmma:  D[m, n] += A[m, k] * B[n, k]  (both operands K-major, no transpose): A = x rows,
//           B = values rows; SWAP (BN = 64) A = values rows, B = x rows, D = the tile's transpose,
//           staged through shared memory on its way out so y is written in 16-byte pieces.
#include <cuda.h>  // CUtensorMap (types only: cuTensorMapEncodeTiled comes through the runtime)
#include <cudaTypedefs.h>

#include <algorithm>

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

// Tiles. FLOP per byte a CTA pulls from L2 is BM*BN/(BM+BN) (bench/README.md), and per byte
// a wgmma m64nNk16 reads from shared memory 64N/(64+N): 32 at N = 64, under the ~32-64 the
// tensor cores need at full rate. So BN >= 64 takes BM = 256 at 1 CTA/SM, and BN = 64 swaps
// the operands (SWAP): the block's 64 weight rows are wgmma's M and each warpgroup's 128 rows
// of x its N (m64n128: 43). BN = 128: each warpgroup two m64 tiles of x rows, N = 128.
// BN <= 32: BM = 128, 2 CTAs/SM.
template <int BN> struct Sm90Cfg {
  static constexpr bool SWAP = BN == 64;
  static constexpr int BM = BN >= 64 ? 256 : 128;
  static constexpr int WN = SWAP ? BM / 2 : BN;      // wgmma N
  static constexpr int MT = SWAP ? 1 : BM / 128;     // m64 tiles per warpgroup (SWAP: of weight rows)
  static constexpr int CONSUMERS = 256;              // 2 warpgroups
  static constexpr int NT = CONSUMERS + 32;          // + the producer warp
  static constexpr int A_BYTES = BM * 128;           // x of a stage: BM rows x 64 columns
  static constexpr int B_BYTES = BN * 128 > 4096 ? BN * 128 : 4096;  // values: >= 4 pieces of 1 KB
  static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;               // a multiple of 1024
  // BN >= 64: 1 CTA/SM; else <= 110 KB each, 2 CTAs/SM (of 228 KB per SM)
  static constexpr int STAGES = BN >= 64 ? 4 : 5;
  static constexpr int MIN_BLOCKS = BN >= 64 ? 1 : 2;
  // A CTA per SM slot taking tiles until none is left, except BN = 128: with the loop around
  // the epilogue, ptxas keeps its 128 accumulators partly in local memory (checked, nvcc 13.0).
  static constexpr bool PERSISTENT = BN != 128;
  static constexpr int ZERO_BYTES = (BN >= 64 ? 128 : 64) * 128;  // the most rows one wgmma operand reads
  static constexpr int OUT_LD = BN + 8;                           // SWAP: output tile staged as
  static constexpr int OUT_BYTES = SWAP ? BM * OUT_LD * 2 : 0;     // [BM][OUT_LD] (36 KB)
  // + full and empty barriers, an 8-byte message per stage, 1024-byte alignment: at most 214 KB
  static constexpr int SMEM = STAGES * STAGE_BYTES + ZERO_BYTES + OUT_BYTES + STAGES * 24 + 1024;
  static_assert(OUT_BYTES % 1024 == 0 && SMEM <= 227 * 1024, "shared memory layout");
  static_assert(2 * MT * 64 * WN == BM * BN, "two warpgroups of MT m64 x WN tiles cover the tile");
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// Shared-memory matrix descriptor for a K-major swizzled tile: start address (>> 4), LBO = 16 B
// (unused with swizzle), SBO = 8 rows x row_bytes, layout (bits 62-63): 1 = 128-byte
// swizzle, 2 = 64-byte, 3 = 32-byte. The address bits are filled in per k16 step.
__device__ __forceinline__ uint64_t gmma_desc_base(int row_bytes) {
  const uint64_t layout = row_bytes == 128 ? 1 : row_bytes == 64 ? 2 : 3;
  return (static_cast<uint64_t>(16 >> 4) << 16) | (static_cast<uint64_t>((8 * row_bytes) >> 4) << 32) |
         (layout << 62);
}
__device__ __forceinline__ uint64_t gmma_desc(uint64_t base, uint32_t addr) {
  return base | static_cast<uint64_t>((addr & 0x3FFFF) >> 4);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Order this thread's generic-proxy shared writes before async-proxy (wgmma, TMA) accesses.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// Pin the accumulators in place around async wgmma: no reads or writes of them move across.
template <int R> __device__ __forceinline__ void fence_operands(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// mbarriers (shared::cta, 64-bit) and the TMA 2-D tile load that completes on one.
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Wait until the phase of parity `parity` has completed (a fresh barrier: parity 1 is done).
// A wait past ~2^36 cycles (half a minute: compute-sanitizer slows waits a lot) is a bug (a
// load that never lands): trap, so the launch fails with an error instead of hanging.
__device__ __forceinline__ bool mbar_try_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(bar), "r"(parity)
      : "memory");
  return done != 0;
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  if (mbar_try_wait(bar, parity)) return;
  const long long t0 = clock64();
  while (!mbar_try_wait(bar, parity)) {
    if (clock64() - t0 > (1LL << 36)) __trap();
  }
}
// Box of the tensor map at (c0 = inner column, c1 = row) -> shared dst, tx bytes on bar.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
// stmatrix .x4 .trans: lane l gives the address of row l % 8 of matrix l / 8; register k holds
// this lane's (row g, columns 2t, 2t + 1) of matrix k, stored transposed (row c <- column c).
__device__ __forceinline__ void stmatrix_x4_trans(uint32_t addr, const uint32_t (&v)[4]) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(v[0]),
               "r"(v[1]), "r"(v[2]), "r"(v[3])
               : "memory");
}
__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// D[64 x N] (+)= A[64 x 16] B[N x 16]^T; D fragment of thread (warp w of the warpgroup,
// g = lane/4, t = lane%4): d[4i + e] is row 16w + g + 8*(e >= 2), column 8i + 2t + (e & 1).
template <typename T, int N>
__device__ __forceinline__ void wgmma_m64k16(float (&d)[N / 2], uint64_t da, uint64_t db);
// SC_WGMMA_<N>(AB): the asm for element type AB ("f16" | "bf16"), scale-d = 1, no transpose.
// clang-format off
#define SC_WGMMA_16(AB) asm volatile( \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n" \
    "wgmma.mma_async.sync.aligned.m64n16k16.f32." AB "." AB " {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, 0, 0;\n}\n" \
    : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]) \
    : "l"(da), "l"(db), "r"(1))
#define SC_WGMMA_32(AB) asm volatile( \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n" \
    "wgmma.mma_async.sync.aligned.m64n32k16.f32." AB "." AB " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n}\n" \
    : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]) \
    : "l"(da), "l"(db), "r"(1))
#define SC_WGMMA_128(AB) asm volatile( \
    "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n" \
    "wgmma.mma_async.sync.aligned.m64n128k16.f32." AB "." AB " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n" \
    : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
    : "l"(da), "l"(db), "r"(1))
// clang-format on
#define SC_WGMMA_SPECS(N) \
  template <> __device__ __forceinline__ void wgmma_m64k16<__half, N>(float (&d)[N / 2], uint64_t da, uint64_t db) { \
    SC_WGMMA_##N("f16"); \
  } \
  template <> __device__ __forceinline__ void wgmma_m64k16<__nv_bfloat16, N>(float (&d)[N / 2], uint64_t da, uint64_t db) { \
    SC_WGMMA_##N("bf16"); \
  }
SC_WGMMA_SPECS(16)
SC_WGMMA_SPECS(32)
SC_WGMMA_SPECS(128)
#undef SC_WGMMA_SPECS
#undef SC_WGMMA_16
#undef SC_WGMMA_32
#undef SC_WGMMA_128
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

// Messages through the stages: msg[s] = {live | kLastChunk on a tile's last chunk, tile}; tile
// = -1: no more tiles. The consumers need nothing else to walk a tile (no global loads).
constexpr uint32_t kLastChunk = 1u << 31;

// tmap_x: x [M, Kx] (row stride ldx), box [BM rows][KC]; tmap_v: values as [nnzb*BN, BK],
// box [BN rows][KC]; both with the KC*2-byte swizzle. Unused (may be zero) when nnzb == 0.
template <typename T, int BN>
__global__ void __launch_bounds__(Sm90Cfg<BN>::NT, Sm90Cfg<BN>::MIN_BLOCKS)
    bsr_fwd_sm90(const __grid_constant__ CUtensorMap tmap_x, const __grid_constant__ CUtensorMap tmap_v,
                 const BsrParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Sm90Cfg<BN>;
  extern __shared__ uint8_t smem[];
  const uint32_t s0 = (smem_addr(smem) + 1023u) & ~1023u;
  const uint32_t zeros = s0 + C::STAGES * C::STAGE_BYTES, outb = zeros + C::ZERO_BYTES;
  const uint32_t full0 = outb + C::OUT_BYTES, empty0 = full0 + C::STAGES * 8, msg0 = empty0 + C::STAGES * 8;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int tiles = p.R * ((p.M + C::BM - 1) / C::BM);  // tile = (M tile) * R + launch position of its block-row
  const int kc_shift = p.bk_shift < 6 ? p.bk_shift : 6;  // piece width KC = 2^kc_shift columns
  const int row_bytes = 2 << kc_shift;
  const int a_piece = C::BM * row_bytes, b_piece = BN * row_bytes < 1024 ? 1024 : BN * row_bytes;
  auto stage = [&](int s) { return s0 + s * C::STAGE_BYTES; };

  for (int i = tid; i < C::ZERO_BYTES / 16; i += C::NT)
    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(zeros + 16 * i), "r"(0) : "memory");
  fence_proxy_async();  // the zeros are read by wgmma (the async proxy)
  if (tid == 0) {
    for (int s = 0; s < C::STAGES; ++s) {
      mbar_init(full0 + 8 * s, 1);                // the producer's arrive(.expect_tx)
      mbar_init(empty0 + 8 * s, C::CONSUMERS);    // every consumer thread
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp == C::CONSUMERS / 32) {  // ---- producer warp: one thread takes tiles and issues every load
    if ((tid & 31) != 0) return;
    if (p.nnzb > 0 && p.Kx > 0) {  // else the host left both maps unencoded (nothing is loaded)
      tma_prefetch_map(&tmap_x);
      tma_prefetch_map(&tmap_v);
    }
    const int pieces = 64 >> kc_shift;
    int q = 0;  // messages sent: message q goes through stage q % STAGES
    // Wait for a free stage, post its message, arm its full barrier for `bytes`; returns the stage.
    auto post = [&](uint32_t live, int tile, uint32_t bytes) {
      const int s = q % C::STAGES;
      mbar_wait(empty0 + 8 * s, ((q / C::STAGES) & 1) ^ 1);
      asm volatile("st.shared.v2.u32 [%0], {%1, %2};\n" ::"r"(msg0 + 8 * s), "r"(live), "r"(tile) : "memory");
      if (bytes) mbar_expect_tx(full0 + 8 * s, bytes);  // publishes the message with the arrival
      else mbar_arrive(full0 + 8 * s);
      ++q;
      return s;
    };
    for (int tile = blockIdx.x; tile < tiles; tile = C::PERSISTENT ? gridDim.x + atomicAdd(p.tile_counter, 1) : tiles) {
      const int r = p.row_order[tile % p.R], m0 = (tile / p.R) * C::BM;
      const int first = p.row_ptr[r], nb = p.row_ptr[r + 1] - first;
      const int nchunks = p.Kx > 0 ? num_chunks(nb, p.bk_shift) : 0;  // no columns of x: y = act(bias)
      if (nchunks == 0) post(kLastChunk, tile, 0);  // nothing loaded: the consumers write act(bias)
      for (int j = 0; j < nchunks; ++j) {
        int col[4], blk[4];
        uint32_t live = 0, bytes = 0;
#pragma unroll
        for (int g = 0; g < 4; ++g) {
          const int v = (j << 6) + (g << kc_shift);  // first virtual-K column of the piece
          const int i = v >> p.bk_shift;
          blk[g] = first + i;
          col[g] = (g < pieces && i < nb)
                       ? block_col(__ldg(p.col_idx + blk[g]), 1 << p.bk_shift, p.Kx) + (v & ((1 << p.bk_shift) - 1))
                       : -1;
          if (col[g] >= 0) live |= 1u << (4 + g), bytes += BN * row_bytes;          // B: values
          if (col[g] >= 0 && col[g] < p.Kx) live |= 1u << g, bytes += C::BM * row_bytes;  // A: x
        }
        const int s = post(live | (j == nchunks - 1 ? kLastChunk : 0u), tile, bytes);
#pragma unroll
        for (int g = 0; g < 4; ++g) {
          if (live & (1u << g)) tma_load_2d(stage(s) + g * a_piece, &tmap_x, col[g], m0, full0 + 8 * s);
          if (live & (1u << (4 + g)))
            tma_load_2d(stage(s) + C::A_BYTES + g * b_piece, &tmap_v, ((j << 6) + (g << kc_shift)) & ((1 << p.bk_shift) - 1),
                        blk[g] * BN, full0 + 8 * s);  // (column inside the block, first row of the block)
        }
      }
    }
    post(0, -1, 0);
    return;
  }

  // ---- consumers: warpgroup wg computes rows [BM/2 wg, BM/2 (wg + 1)) of each tile: m64 tile
  // mt of them into d[mt] (x rows as A), or (SWAP) d[0] = their D^T (x rows as B)
  const int wg = warp >> 2, lane = tid & 31, g = lane >> 2, t = lane & 3;
  const uint64_t desc = gmma_desc_base(row_bytes);
  float d[C::MT][C::WN / 2];
  auto message = [&](int q, uint32_t& live, int& tile) {  // wait for message q, read it
    const int s = q % C::STAGES;
    mbar_wait(full0 + 8 * s, (q / C::STAGES) & 1);
    asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(live), "=r"(tile) : "r"(msg0 + 8 * s) : "memory");
  };
  for (int q = 0;;) {  // a tile per pass; message q comes through stage q % STAGES
    uint32_t live;
    int tile;
    message(q, live, tile);
    if (tile < 0) return;
#pragma unroll
    for (int mt = 0; mt < C::MT; ++mt) {
#pragma unroll
      for (int i = 0; i < C::WN / 2; ++i) d[mt][i] = 0.f;
      fence_operands(d[mt]);
    }
    for (int j = 0;; ++j) {  // a tile with nothing loaded multiplies the zero region
      const int s = q % C::STAGES;
      if (j > 0) message(q, live, tile);
      const uint32_t sX = stage(s) + wg * (C::BM / 2) * row_bytes, sV = stage(s) + C::A_BYTES;
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {  // k16 step kk: piece pc, +off bytes inside it
        const int pc = (kk << 4) >> kc_shift, off = ((kk << 4) & ((1 << kc_shift) - 1)) * 2;
        const bool x_live = (live >> pc) & 1;
        const uint32_t v = (live >> (4 + pc)) & 1 ? sV + pc * b_piece : zeros;
        if constexpr (C::SWAP) {  // D^T[64 weight rows, WN x rows] += V W-slice * x-slice^T
          const uint32_t x = x_live ? sX + pc * a_piece : zeros;
          wgmma_m64k16<T, C::WN>(d[0], gmma_desc(desc, v + off), gmma_desc(desc, x + off));
        } else {
#pragma unroll
          for (int mt = 0; mt < C::MT; ++mt) {
            const uint32_t x = x_live ? sX + pc * a_piece + mt * 64 * row_bytes : zeros;
            wgmma_m64k16<T, BN>(d[mt], gmma_desc(desc, x + off), gmma_desc(desc, v + off));
          }
        }
      }
      wgmma_commit();
      wgmma_wait<1>();                                                 // the previous chunk's wgmma retired:
      if (j > 0) mbar_arrive(empty0 + 8 * ((q - 1) % C::STAGES));  // its stage may be refilled
      ++q;
      if (live & kLastChunk) break;
    }
    wgmma_wait<0>();
    mbar_arrive(empty0 + 8 * ((q - 1) % C::STAGES));  // the tile's last stage
    const int r = p.row_order[tile % p.R], m0 = (tile / p.R) * C::BM;

    if constexpr (C::SWAP) {
      // d[0][4i + 2h + e] = D[x row 8i + 2t + e of the warpgroup's, weight row 16 (warp % 4) + g + 8h]:
      // for each (i, h) the 8x8 matrix [g][2t + e] of an mma fragment, which stmatrix .trans
      // stores transposed: its row c (x row 8i + c) = 16 bytes of weight rows 16 (warp % 4) + 8h
      // + 0..7 at out[x row][..]. Stage act(D + bias) so, then copy whole 16-byte row pieces to
      // y. Named barrier 1 of the consumers: the previous tile's copy is done / the tile is staged.
      fence_operands(d[0]);
      T* out = reinterpret_cast<T*>(smem + (outb - smem_addr(smem)));
      const T* bias = static_cast<const T*>(p.bias);
      float bv[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int n = r * BN + 16 * (warp & 3) + 8 * h + g;
        bv[h] = bias && n < p.N ? Elem<T>::to_float(bias[n]) : 0.f;
      }
      asm volatile("bar.sync 1, %0;\n" ::"n"(C::CONSUMERS) : "memory");
      const int mi = lane >> 3, c = lane & 7;  // this lane addresses row c of matrix mi of each x4
#pragma unroll
      for (int i = 0; i < C::WN / 8; i += 2) {  // matrices (i, 0), (i, 1), (i + 1, 0), (i + 1, 1)
        uint32_t v[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int j = 4 * (i + (k >> 1)) + 2 * (k & 1);
          v[k] = Elem<T>::pack(activate(d[0][j] + bv[k & 1], p.activation),
                               activate(d[0][j + 1] + bv[k & 1], p.activation));
        }
        const int row = wg * C::WN + 8 * (i + (mi >> 1)) + c, col = 16 * (warp & 3) + 8 * (mi & 1);
        stmatrix_x4_trans(smem_addr(out + row * C::OUT_LD + col), v);
      }
      asm volatile("bar.sync 1, %0;\n" ::"n"(C::CONSUMERS) : "memory");
      T* y = static_cast<T*>(p.y);
      const int rows = min(C::BM, p.M - m0);
      for (int c = tid; c < rows * (BN / 8); c += C::CONSUMERS) {
        const int row = c / (BN / 8), n = r * BN + 8 * (c % (BN / 8));
        if (n >= p.N) continue;
        const T* src = out + row * C::OUT_LD + (n - r * BN);
        T* dst = y + static_cast<int64_t>(m0 + row) * p.N + n;
        if (n + 8 <= p.N && (p.N & 7) == 0) {
          *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        } else {
          for (int e = 0; e < 8 && n + e < p.N; ++e) dst[e] = src[e];
        }
      }
    } else {
#pragma unroll
      for (int mt = 0; mt < C::MT; ++mt) {
        fence_operands(d[mt]);
        const int m = m0 + (wg * C::MT + mt) * 64 + (warp & 3) * 16 + g;
#pragma unroll
        for (int i = 0; i < BN / 8; ++i) {
          const int n = r * BN + i * 8 + 2 * t;
          store_pair<T>(p, m, n, d[mt][4 * i], d[mt][4 * i + 1]);
          store_pair<T>(p, m + 8, n, d[mt][4 * i + 2], d[mt][4 * i + 3]);
        }
      }
    }
    if constexpr (!C::PERSISTENT) return;
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // a cubin without sm_90a features (the host only launches this on 9.0 + sm_90a)
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// cuTensorMapEncodeTiled through the runtime (no link against libcuda).
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &q);
#endif
    return err == cudaSuccess && q == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f)
               : nullptr;
  }();
  return fn;
}

// A 2-D tensor map over rows x cols 16-bit elements (row stride ld), box [box_rows][box_cols],
// swizzled by the box's row width (box_cols * 2 bytes: 32, 64 or 128); out-of-range -> 0.
cudaError_t encode_map(CUtensorMap* map, DType dt, const void* base, int64_t rows, int64_t cols, int64_t ld,
                       int box_rows, int box_cols) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorSymbolNotFound;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(ld) * 2};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUtensorMapSwizzle swizzle = box_cols == 64   ? CU_TENSOR_MAP_SWIZZLE_128B
                                     : box_cols == 32 ? CU_TENSOR_MAP_SWIZZLE_64B
                                                      : CU_TENSOR_MAP_SWIZZLE_32B;
  const CUresult res = encode(map, dt == kFloat16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                              2, const_cast<void*>(base), dims, strides, box, elem_strides,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return res == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_bn(const BsrParams& p, DType dt, int bn, int num_sms, cudaStream_t stream) {
  return with_side(bn, [&](auto side) {
    constexpr int BN = decltype(side)::value;
    using C = Sm90Cfg<BN>;
    CUtensorMap tmap_x{}, tmap_v{};
    if (static_cast<int64_t>(p.nnzb) * BN > INT32_MAX) return cudaErrorInvalidValue;  // TMA coordinates: s32
    if (p.nnzb > 0 && p.Kx > 0) {  // else the kernel loads nothing
      const int bk = 1 << p.bk_shift, kc = bk < 64 ? bk : 64;
      cudaError_t err = encode_map(&tmap_x, dt, p.x, p.M, p.Kx, p.ldx, C::BM, kc);
      if (err == cudaSuccess) err = encode_map(&tmap_v, dt, p.values, static_cast<int64_t>(p.nnzb) * BN, bk, bk, BN, kc);
      if (err != cudaSuccess) return err;
    }
    const auto kernel = bsr_fwd_sm90<T, BN>;
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
    if (err != cudaSuccess) return err;
    const int64_t tiles = static_cast<int64_t>(p.R) * ((p.M + C::BM - 1) / C::BM);
    if (tiles == 0) return cudaSuccess;  // y has no elements
    // CTAs that fit on an SM here (MIN_BLOCKS unless the shared-memory carveout says fewer)
    static const int per_sm = [&] {
      int n = 0;
      return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, C::NT, C::SMEM) == cudaSuccess && n > 0 ? n : 1;
    }();
    const int64_t ctas = C::PERSISTENT ? std::min<int64_t>(tiles, static_cast<int64_t>(num_sms) * per_sm) : tiles;
    // the queue hands out tiles up to tiles + ctas - 1 (int)
    if (p.tile_counter == nullptr || tiles + ctas > INT32_MAX) return cudaErrorInvalidValue;
    kernel<<<static_cast<unsigned>(ctas), C::NT, C::SMEM, stream>>>(tmap_x, tmap_v, p);
    return cudaSuccess;
  });
}

}  // namespace

cudaError_t launch_bsr_sm90(const BsrParams& p, DType dt, int bn, int num_sms, cudaStream_t stream) {
  return dt == kFloat16 ? launch_bn<__half>(p, dt, bn, num_sms, stream)
                        : launch_bn<__nv_bfloat16>(p, dt, bn, num_sms, stream);
}

}  // namespace sparsecore
