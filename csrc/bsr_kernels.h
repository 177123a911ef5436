// Host-side interface of the block-sparse forward kernels (no torch headers: the .cu files
// stay light to compile; sparsecore_ops.cpp validates tensors and fills BsrParams).
//
//   y[M, N] = act(x[M, K] @ W^T + bias),  W [N, K] stored as BSR blocks of (BN, BK):
//
//   values    [nnzb, BN, BK]  contiguous, fp16 | bf16, 16-byte aligned
//   row_ptr   [R + 1] int32   kept blocks of block-row r: values[row_ptr[r] .. row_ptr[r+1])
//   col_idx   [nnzb]  int32   block-column of each kept block
//   block_row [nnzb]  int32   block-row of each kept block (decode kernel)
//   row_order [R]     int32   launch order of block-rows (heaviest first)
//   x         [M, ldx]        row-major, 16-byte aligned, Kx <= ldx, both % 8 == 0 (16-byte
//                             loads never straddle Kx); columns >= Kx read as 0
//   y         [M, N]          contiguous, written in full (empty block-rows get act(bias))
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace sparsecore {

enum Activation : int { kActNone = 0, kActRelu = 1, kActGelu = 2, kActSilu = 3 };
enum DType : int { kFloat16 = 0, kBFloat16 = 1 };

struct BsrParams {
  const void* x;
  const void* values;
  const int32_t* row_ptr;
  const int32_t* col_idx;
  const int32_t* block_row;
  const int32_t* row_order;
  const void* bias;  // [N] or nullptr
  void* y;
  float* workspace;  // decode only: fp32 [M, R*BN], zeroed
  int* tile_counter;  // sm90 only: one int32, zeroed (the persistent CTAs' tile queue)
  int M, N, R, nnzb;
  int Kx, ldx;
  int bk_shift;  // log2(BK)
  int activation;
};

// Each launcher makes exactly one kernel launch on `stream` (the caller checks it with
// C10_CUDA_KERNEL_LAUNCH_CHECK) and returns the status of its setup calls.
// bn: block rows (16, 32, 64, 128); BK comes from p.bk_shift (16 .. 128).

// sm80+ prefill: cp.async pipeline, ldmatrix, mma.sync m16n8k16. Tile 128 x BN.
cudaError_t launch_bsr_sm80(const BsrParams& p, DType dt, int bn, cudaStream_t stream);

// sm90a prefill: TMA loads on mbarriers from a producer warp, wgmma.mma_async in 2 consumer
// warpgroups, persistent CTAs taking tiles from p.tile_counter (zeroed). Tile 256 x BN for
// BN >= 64 (BN = 64: weights as wgmma's M), else 128 x BN. Only for compute capability 9.0,
// and only when built for sm_90a (bsr_sm90_built()). Encodes two tensor maps per call (x and
// values; returns cudaErrorSymbolNotFound if the driver lacks cuTensorMapEncodeTiled).
cudaError_t launch_bsr_sm90(const BsrParams& p, DType dt, int bn, int num_sms, cudaStream_t stream);
bool bsr_sm90_built();

// Decode (M <= 64, BK >= 32): decode_split() picks the kernel. S >= 1: bsr_fwd_decode_rows,
// one cluster of S CTAs per block-row and 16-row group of x, y written directly, no workspace
// (S > 1 needs sm_90 clusters). 0: warps split the global kept-block list (grid.y: 16-row
// groups of x), fp32 atomics into p.workspace (zeroed), then launch_bsr_finalize writes
// y = act(ws + bias).
constexpr int kDecodeMaxM = 64;
constexpr int kDecodeMaxSplit = 8;  // portable cluster size
// ctas = R x ceil(M/16); units = nnzb x BK/32 (32-column slices of the kept blocks);
// max_split: the largest cluster this device runs (1: none). S = 1
// when ctas >= #SMs. Else the smallest power of two S <= max_split with ctas x S >= #SMs,
// stopping once the cluster's S x 8 warps reach a block-row's mean number of 32-column units
// (a warp takes 2 per step for BN <= 32); 0 without clusters, or when even S = max_split would
// leave more than half the SMs idle.
inline int decode_split(int R, int M, int64_t nnzb, int bk_shift, int num_sms, int max_split) {
  const int64_t ctas = static_cast<int64_t>(R) * ((M + 15) / 16), units = nnzb << (bk_shift - 5);
  if (ctas >= num_sms) return 1;
  if (max_split < 2 || 2LL * max_split * ctas < num_sms) return 0;
  int s = 1;
  while (s < max_split && ctas * s < num_sms && 8LL * s * R < units) s *= 2;
  return s;
}
cudaError_t launch_bsr_decode_rows(const BsrParams& p, DType dt, int bn, int split, cudaStream_t stream);
// The largest cluster (8, 4, 2) of bsr_fwd_decode_rows the current device runs; 1: no clusters
// (no sm_90+ build of the kernel for it, or not even 2 CTAs fit).
int bsr_decode_max_split();
cudaError_t launch_bsr_decode(const BsrParams& p, DType dt, int bn, int num_sms, cudaStream_t stream);
cudaError_t launch_bsr_finalize(const BsrParams& p, DType dt, int bn, cudaStream_t stream);

// ---- backward (mask fixed), mma.sync kernels for sm80+ ------------------------------------
//   dX [M, K]          = dY [M, N] @ W            via the CSC metadata:
//   col_ptr [C + 1]    kept blocks of block-column c: CSC slots col_ptr[c] .. col_ptr[c+1]
//   row_idx [nnzb]     block-row of each CSC slot;  t_perm [nnzb]: its index into values
//   dV [nnzb, BN, BK]  = dY[:, rows of block]^T @ X[:, cols of block]  (kept blocks only)
//   dy / x: row-major, 16-byte aligned, Ny <= ldy, Kx <= ldx, all % 8 == 0; columns >= Ny / Kx
//   read as 0.
struct BsrDxParams {
  const void* dy;
  const void* values;
  const int32_t* col_ptr;
  const int32_t* row_idx;
  const int32_t* t_perm;
  void* dx;  // [M, K]
  int M, K, C;
  int Ny, ldy;
  int bn_shift;  // log2(BN)
};

struct BsrDwParams {
  const void* dy;
  const void* x;
  const int32_t* block_row;
  const int32_t* col_idx;
  void* dv;          // [nnzb, BN, BK]
  float* workspace;  // fp32 [nnzb, BN, BK], zeroed, when splits > 1; else nullptr
  int M, nnzb;
  int Ny, ldy, Kx, ldx;
  int splits;         // M is cut into `splits` near-equal ranges of whole 64-row chunks (grid.y)
};

// dX: one CTA per (block-column, 128-row tile of dY); bk: 16 .. 128 (the output tile width).
cudaError_t launch_bsr_dx(const BsrDxParams& p, DType dt, int bk, cudaStream_t stream);
// dW: one CTA per (kept block, M range); with splits > 1 it accumulates into p.workspace
// and launch_bsr_dw_finalize casts it into p.dv.
cudaError_t launch_bsr_dw(const BsrDwParams& p, DType dt, int bn, int bk, cudaStream_t stream);
cudaError_t launch_bsr_dw_finalize(const BsrDwParams& p, DType dt, int64_t numel, cudaStream_t stream);

}  // namespace sparsecore
