// Decode forward (M <= 64, BK >= 32): memory-bound, so every kept weight byte is read once
// from DRAM with 16-byte loads and all SMs get work whatever the row lengths. Two kernels:
//
//   bsr_fwd_decode_rows (one launch, no workspace, bitwise repeatable): one cluster of S CTAs
//   per (block-row, group of 16 rows of x); the S x 8 warps take the row's units in turn and
//   park their partial sums in shared memory; each CTA sums its warps, then (S > 1, sm_90
//   clusters) the CTAs of the cluster sum the S partial tiles through distributed shared
//   memory, in rank order. S (decode_split) is 1 when R x groups >= #SMs, else up to 8.
//   bsr_fwd_decode (no clusters, and too few block-rows for the SMs: pre-sm_90 GPUs): warps
//   split the global list of units into equal contiguous ranges (grid.y: groups of 16 rows of
//   x; the groups re-read the same weight blocks, from L2); partial sums (fp32, rows < M) go to
//   workspace [M, R*BN] with atomicAdd whenever a warp leaves a block-row; bsr_finalize then
//   writes y = act(workspace + bias).
//
//   A unit is a 32-column slice of a kept block (BSR order, a block's slices in a row):
//     lane (g = lane/4, t = lane%4) loads 16 B of x rows mb+g and mb+g+8 at columns 8t..8t+7,
//     and 16 B of values row n = 8q + g at the same columns, for every n8 group q
//     (BN/8 independent 16-byte loads in flight per lane), then two mma.sync m16n8k16.
//   The k order inside a 32-column slice is permuted identically for x and W (the dot
//   product does not care): phys column 8t+e (e < 8) is logical  2t + (e&1) + 8*((e>>1)&1)
//   of mma (e >> 2). So one 16-byte load is exactly a lane's B fragment of two mmas.
//   For BN <= 32 a warp takes two units per step, all their loads issued before any mma.
#include <cooperative_groups.h>

#include "bsr_common.cuh"

namespace sparsecore {
namespace {

constexpr int kDecodeThreads = 256;
// Resident warps per SM the split targets (and the launch bounds ask for): 16, or 8 at BN = 128,
// whose 16 loads in flight per lane need more than 128 registers without spilling.
template <int BN> __host__ __device__ constexpr int decode_warps_per_sm() { return BN == 128 ? 8 : 16; }

__device__ __forceinline__ uint4 ldg16(const void* p) { return __ldg(static_cast<const uint4*>(p)); }

// Units per step of a warp: two for BN <= 32, whose BN/8 loads per lane per unit would leave
// too few bytes in flight to cover DRAM latency.
template <int BN> __host__ __device__ constexpr int decode_units_per_step() { return BN <= 32 ? 2 : 1; }

// What a lane of a decode warp keeps: its x rows (mb + g, mb + g + 8) and fragment position.
template <typename T> struct DecodeLane {
  const T* x_lo;
  const T* x_hi;
  bool lo_ok, hi_ok;
  int g, t;
  __device__ DecodeLane(const BsrParams& p, int mb, int lane) : g(lane >> 2), t(lane & 3) {
    x_lo = static_cast<const T*>(p.x) + static_cast<int64_t>(mb + g) * p.ldx;
    x_hi = x_lo + 8 * static_cast<int64_t>(p.ldx);
    lo_ok = mb + g < p.M;
    hi_ok = mb + g + 8 < p.M;
  }
};

// One unit's registers: BN/8 16-byte pieces of values and 16 bytes of each x row.
template <int BN> struct UnitRegs {
  uint4 b[BN / 8], xl, xh;
};

// Issue this lane's loads of unit u (32-column slice u % slices of kept block u / slices).
template <typename T, int BN>
__device__ __forceinline__ void load_unit(const BsrParams& p, const DecodeLane<T>& L, int u, UnitRegs<BN>& un) {
  const int slice_shift = p.bk_shift - 5;
  const int i = u >> slice_shift, ks = (u & ((1 << slice_shift) - 1)) << 5;
  const T* v = static_cast<const T*>(p.values) + ((static_cast<int64_t>(i) * BN + L.g) << p.bk_shift) + ks + 8 * L.t;
#pragma unroll
  for (int q = 0; q < BN / 8; ++q) un.b[q] = ldg16(v + ((q * 8) << p.bk_shift));
  const int k = block_col(p.col_idx[i], 1 << p.bk_shift, p.Kx) + ks + 8 * L.t;  // column of x
  const uint4 zero = make_uint4(0, 0, 0, 0);
  un.xl = (L.lo_ok && k < p.Kx) ? ldg16(L.x_lo + k) : zero;
  un.xh = (L.hi_ok && k < p.Kx) ? ldg16(L.x_hi + k) : zero;
}

// acc[q] (rows g, g + 8 of the group; columns 8q + 2t, +1) += the unit's x slice @ W slice^T.
template <typename T, int BN>
__device__ __forceinline__ void mma_unit(const UnitRegs<BN>& un, float (&acc)[BN / 8][4]) {
  const uint32_t a0[4] = {un.xl.x, un.xh.x, un.xl.y, un.xh.y};  // phys columns 8t+0..3
  const uint32_t a1[4] = {un.xl.z, un.xh.z, un.xl.w, un.xh.w};  // phys columns 8t+4..7
#pragma unroll
  for (int q = 0; q < BN / 8; ++q) {
    mma16816<T>(acc[q], a0, un.b[q].x, un.b[q].y);
    mma16816<T>(acc[q], a1, un.b[q].z, un.b[q].w);
  }
}

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
  const int warp = (blockIdx.x * kDecodeThreads + threadIdx.x) >> 5;
  const int slice_shift = p.bk_shift - 5;  // log2(32-column slices per block)
  const int u0 = warp * units_per_warp;
  const int u1 = min(p.nnzb << slice_shift, u0 + units_per_warp);
  const int mb = blockIdx.y * 16;
  const DecodeLane<T> L(p, mb, threadIdx.x & 31);
  const int g = L.g, t = L.t;

  float acc[BN / 8][4] = {};
  int cur = u0 < u1 ? p.block_row[u0 >> slice_shift] : -1;
  constexpr int UN = decode_units_per_step<BN>();
#pragma unroll 1
  for (int u = u0; u < u1; u += UN) {
    UnitRegs<BN> un[UN];
    int rows[UN];
#pragma unroll
    for (int w = 0; w < UN; ++w) {
      rows[w] = -1;
      if (w > 0 && u + w >= u1) continue;  // past the warp's range (warp-uniform); unit u always exists
      rows[w] = p.block_row[(u + w) >> slice_shift];
      if (w == 0 && rows[0] != cur) {  // before the loads: fewer registers live across the atomics
        flush<T, BN>(p, cur, mb, g, t, acc);
        cur = rows[0];
      }
      load_unit<T, BN>(p, L, u + w, un[w]);
    }
#pragma unroll
    for (int w = 0; w < UN; ++w) {
      if (w > 0 && rows[w] < 0) continue;
      if (w > 0 && rows[w] != cur) {  // unit u + w starts another block-row (w = 0: done above)
        flush<T, BN>(p, cur, mb, g, t, acc);
        cur = rows[w];
      }
      mma_unit<T, BN>(un[w], acc);
    }
  }
  if (cur >= 0) flush<T, BN>(p, cur, mb, g, t, acc);
}


// One cluster of S CTAs (S = `split`, 1..8; a plain launch when 1) per (block-row, 16 rows of
// x); cluster c takes group c % G (G = ceil(M/16) groups, so the groups of one block-row run
// together and share its weights in L2) of block-row row_order[c / G]. Warp w of CTA rank s
// takes the row's units s*8 + w, + 8S, ... (UN per step). Every warp parks its fragments in
// red[w][16][BN + 8]; the CTA sums them in warp order into red[0]; with S > 1 rank s then
// sums red[0] of ranks 0..S-1 (distributed shared memory) for its share of the tile:
//
//     tile element idx (row idx / BN, column idx % BN): rank (idx / NT) % S, thread idx % NT
//
// and writes y = act(sum + bias): no workspace, no atomics, bitwise repeatable.
template <int BN> struct DecodeRowsCfg {
  static constexpr int NW = 8;
  static constexpr int NT = NW * 32;
  static constexpr int MIN_BLOCKS = BN == 128 ? 1 : 2;  // 16 warps/SM (<= 128 registers) up to BN = 64
  static constexpr int LDR = BN + 8;
  static constexpr int SMEM = NW * 16 * LDR * 4;
};

template <typename T, int BN>
__global__ void __launch_bounds__(DecodeRowsCfg<BN>::NT, DecodeRowsCfg<BN>::MIN_BLOCKS)
    bsr_fwd_decode_rows(const BsrParams p, int split) {
  using C = DecodeRowsCfg<BN>;
  constexpr int UN = decode_units_per_step<BN>();
  extern __shared__ float red[];
  const int warp = threadIdx.x >> 5;
  const int groups = (p.M + 15) / 16;
  const int c = blockIdx.x / split, rank = blockIdx.x % split;  // a cluster's CTAs are consecutive
  const int r = p.row_order[c / groups];
  const int mb = (c % groups) * 16;
  const DecodeLane<T> L(p, mb, threadIdx.x & 31);
  const int slice_shift = p.bk_shift - 5;
  const int ub = p.row_ptr[r] << slice_shift, ue = p.row_ptr[r + 1] << slice_shift;
  const int stride = split * C::NW;  // warps of the cluster

  float acc[BN / 8][4] = {};
#pragma unroll 1
  for (int u = ub + rank * C::NW + warp; u < ue; u += stride * UN) {
    UnitRegs<BN> un[UN];
#pragma unroll
    for (int w = 0; w < UN; ++w)
      if (w == 0 || u + w * stride < ue) load_unit<T, BN>(p, L, u + w * stride, un[w]);
#pragma unroll
    for (int w = 0; w < UN; ++w)
      if (w == 0 || u + w * stride < ue) mma_unit<T, BN>(un[w], acc);
  }

  float* mine = red + warp * 16 * C::LDR;
#pragma unroll
  for (int q = 0; q < BN / 8; ++q) {  // 8-byte stores: no bank conflict within a half-warp
    const int n = q * 8 + 2 * L.t;
    *reinterpret_cast<float2*>(mine + L.g * C::LDR + n) = make_float2(acc[q][0], acc[q][1]);
    *reinterpret_cast<float2*>(mine + (L.g + 8) * C::LDR + n) = make_float2(acc[q][2], acc[q][3]);
  }
  __syncthreads();
  const T* bias = static_cast<const T*>(p.bias);
  auto write = [&](int idx, float z) {
    const int m = mb + idx / BN, n = r * BN + idx % BN;
    if (m >= p.M || n >= p.N) return;
    if (bias) z += Elem<T>::to_float(bias[n]);
    static_cast<T*>(p.y)[static_cast<int64_t>(m) * p.N + n] = Elem<T>::from_float(activate(z, p.activation));
  };
  for (int idx = threadIdx.x; idx < 16 * BN; idx += C::NT) {  // this CTA's sum over its warps
    const int at = (idx / BN) * C::LDR + idx % BN;
    float z = 0.f;
#pragma unroll
    for (int w = 0; w < C::NW; ++w) z += red[w * 16 * C::LDR + at];
    if (split == 1) write(idx, z);
    else red[at] = z;  // slot 0: only this thread reads or writes element `at`
  }
  if (split == 1) return;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  cg::cluster_group cluster = cg::this_cluster();
  if (cluster.num_blocks() != static_cast<unsigned>(split)) __trap();  // launched without its clusters
  cluster.sync();  // release / acquire: every CTA's red[0] is final and visible cluster-wide
  constexpr int PER = (16 * BN + 2 * C::NT - 1) / (2 * C::NT);  // elements a thread sums (split >= 2)
  float z[PER];
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int idx = rank * C::NT + threadIdx.x + k * split * C::NT;
    const int at = (idx / BN) * C::LDR + idx % BN;
    z[k] = 0.f;
    if (idx < 16 * BN)
      for (int j = 0; j < split; ++j) z[k] += cluster.map_shared_rank(red, j)[at];
  }
  // Arrive with release, so the remote reads above complete before it (.relaxed would not order
  // them), write y meanwhile, and wait at the end: no CTA frees its shared memory while another
  // still reads it.
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#pragma unroll
  for (int k = 0; k < PER; ++k) {
    const int idx = rank * C::NT + threadIdx.x + k * split * C::NT;
    if (idx < 16 * BN) write(idx, z[k]);
  }
  asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");
#else
  __trap();  // split > 1 needs sm_90 clusters; the launcher checks the binary first
#endif
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

// The launch of a bsr_fwd_decode_rows<., BN> on `ctas` CTAs in clusters of `split` (1: plain);
// the config points at `cluster`, which the caller keeps alive.
template <int BN>
cudaLaunchConfig_t rows_config(unsigned ctas, int split, cudaStream_t stream, cudaLaunchAttribute& cluster) {
  cluster = cudaLaunchAttribute{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = split;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(ctas);
  cfg.blockDim = dim3(DecodeRowsCfg<BN>::NT);
  cfg.dynamicSmemBytes = DecodeRowsCfg<BN>::SMEM;
  cfg.stream = stream;
  cfg.attrs = &cluster;
  cfg.numAttrs = split > 1 ? 1 : 0;
  return cfg;
}

// split > 1 launches clusters of `split` CTAs (at most bsr_decode_max_split() on this device).
template <typename T, int BN>
cudaError_t launch_rows(const BsrParams& p, int split, cudaStream_t stream) {
  const auto kernel = bsr_fwd_decode_rows<T, BN>;
  if (split < 1 || split > kDecodeMaxSplit) return cudaErrorInvalidConfiguration;  // caller: <= bsr_decode_max_split()
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               DecodeRowsCfg<BN>::SMEM);
  if (err != cudaSuccess) return err;
  cudaLaunchAttribute cluster;
  const cudaLaunchConfig_t cfg =
      rows_config<BN>(static_cast<unsigned>(p.R) * ((p.M + 15) / 16) * split, split, stream, cluster);
  return cudaLaunchKernelEx(&cfg, kernel, p, split);
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
  if (p.bk_shift < 5) return cudaErrorInvalidValue;  // units are 32-column slices: BK >= 32
  if (p.nnzb == 0) return cudaSuccess;                // nothing to add into the zeroed workspace
  return dt == kFloat16 ? launch_bn<__half>(p, bn, num_sms, stream)
                        : launch_bn<__nv_bfloat16>(p, bn, num_sms, stream);
}

cudaError_t launch_bsr_decode_rows(const BsrParams& p, DType dt, int bn, int split, cudaStream_t stream) {
  if (p.bk_shift < 5) return cudaErrorInvalidValue;  // units are 32-column slices: BK >= 32
  return with_side(bn, [&](auto side) {
    constexpr int BN = decltype(side)::value;
    return dt == kFloat16 ? launch_rows<__half, BN>(p, split, stream)
                          : launch_rows<__nv_bfloat16, BN>(p, split, stream);
  });
}

namespace {
int max_split_query() {
  // Clusters need the kernel compiled for sm_90+ (__CUDA_ARCH__ follows the PTX it came from:
  // a JIT of the compute_80 PTX on a newer GPU has no cluster code) and running as such.
  const auto kernel = bsr_fwd_decode_rows<__half, 128>;  // the most shared memory of them
  cudaFuncAttributes fa{};
  if (cudaFuncGetAttributes(&fa, kernel) != cudaSuccess || fa.ptxVersion < 90 || fa.binaryVersion < 90) return 1;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, DecodeRowsCfg<128>::SMEM) !=
      cudaSuccess)
    return 1;
  for (int s = kDecodeMaxSplit; s >= 2; s /= 2) {  // a small GPU, MIG slice or MPS share may fit fewer
    cudaLaunchAttribute cluster;
    const cudaLaunchConfig_t cfg = rows_config<128>(s, s, nullptr, cluster);
    int n = 0;
    if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) == cudaSuccess && n >= 1) return s;
  }
  return 1;
}
}  // namespace

int bsr_decode_max_split() {
  const int s = max_split_query();
  cudaGetLastError();  // a failed query must not surface at the next launch check
  return s;
}

cudaError_t launch_bsr_finalize(const BsrParams& p, DType dt, int bn, cudaStream_t stream) {
  return dt == kFloat16 ? launch_fin<__half>(p, bn, stream) : launch_fin<__nv_bfloat16>(p, bn, stream);
}

}  // namespace sparsecore
