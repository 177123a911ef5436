// torch.ops.sparsecore.cuda_* : schemas, input checks, kernel choice, launches.
//
//   cuda_bsr_linear(x [M, K], values [nnzb, BN, BK], row_ptr, col_idx, block_row, row_order,
//                   out_features, bias?, activation, kernel) -> y [M, out_features]
//     kernel: "auto" (decode if M <= 64 and BK >= 32, else sm90 on compute capability 9.0
//             when built for sm_90a, else sm80) | "sm80" | "sm90" | "decode" (a cluster of
//             1..8 CTAs per block-row and 16 rows of x, one launch; on GPUs without clusters and
//             fewer such CTAs than SMs, the kept blocks split over all SMs + finalize)
//   cuda_bsr_linear_grad_input(dy [M, N], values, col_ptr, row_idx, t_perm, in_features)
//                   -> dx [M, in_features]            (dX = dY @ W, CSC metadata)
//   cuda_bsr_linear_grad_weight(dy [M, N], x [M, K], block_row, col_idx, block_n, block_k)
//                   -> dvalues [nnzb, BN, BK]          (dY^T X on the kept blocks only)
//   cuda_has_sm90a() -> bool   (the build contains the sm_90a wgmma kernel)
//   cuda_decode_split(device, M, block_rows, nnzb, block_k) -> int   (the decode plan there:
//                   cluster size of the per-row kernel, or 0 for the split kernel + finalize)
//
// Importing the module `sparsecore._C` (a plain CPython module with no functions) runs the
// registrations below.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdlib>
#include <mutex>
#include <string>

#include "bsr_kernels.h"

namespace sparsecore {
namespace {

using at::Tensor;

constexpr int64_t kMaxRows = 65535LL * 128;  // grid.y (65535) x the largest row tile

bool is_block_side(int64_t s) { return s == 16 || s == 32 || s == 64 || s == 128; }

// d rounded up to whole blocks of `side`: the kernels' int32 column indices reach it
int64_t padded(int64_t d, int64_t side) { return (d + side - 1) / side * side; }

int parse_activation(c10::string_view a) {
  if (a == "none") return kActNone;
  if (a == "relu") return kActRelu;
  if (a == "gelu") return kActGelu;
  if (a == "silu") return kActSilu;
  TORCH_CHECK(false, "cuda_bsr_linear: activation: expected one of none, relu, gelu, silu, got '",
              std::string(a), "'");
}

void check_index(const Tensor& t, const char* name, int64_t numel) {
  TORCH_CHECK(t.scalar_type() == at::kInt && t.dim() == 1 && t.numel() == numel, "cuda_bsr_linear: ", name,
              ": expected int32 [", numel, "], got ", t.scalar_type(), " ", t.sizes());
}

// Checks that hold for real and fake (meta) tensors alike. Returns R (block-rows).
int64_t check_inputs(const Tensor& x, const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx,
                     const Tensor& block_row, const Tensor& row_order, c10::optional<int64_t> out_features,
                     const c10::optional<Tensor>& bias, c10::string_view activation, c10::string_view kernel) {
  TORCH_CHECK(kernel == "auto" || kernel == "sm80" || kernel == "sm90" || kernel == "decode",
              "cuda_bsr_linear: kernel: expected one of auto, sm80, sm90, decode, got '", std::string(kernel), "'");
  TORCH_CHECK(x.dim() == 2, "cuda_bsr_linear: x: expected a 2-D tensor [M, K], got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
              "cuda_bsr_linear: x: expected dtype float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(values.dim() == 3, "cuda_bsr_linear: values: expected [nnzb, BN, BK], got shape ", values.sizes());
  TORCH_CHECK(values.scalar_type() == x.scalar_type(), "cuda_bsr_linear: values: expected dtype ",
              x.scalar_type(), " (as x), got ", values.scalar_type());
  TORCH_CHECK(values.is_contiguous(), "cuda_bsr_linear: values: expected a contiguous tensor, got strides ",
              values.strides());
  const int64_t nnzb = values.size(0), bn = values.size(1), bk = values.size(2);
  TORCH_CHECK(is_block_side(bn) && is_block_side(bk),
              "cuda_bsr_linear: values: expected blocks with sides in {16, 32, 64, 128}, got (", bn, ", ", bk, ")");
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.numel() >= 2,
              "cuda_bsr_linear: row_ptr: expected int32 [R + 1] with R >= 1, got shape ", row_ptr.sizes());
  const int64_t R = row_ptr.numel() - 1;
  check_index(row_ptr, "row_ptr", R + 1);
  check_index(col_idx, "col_idx", nnzb);
  check_index(block_row, "block_row", nnzb);
  check_index(row_order, "row_order", R);
  if (out_features) {
    TORCH_CHECK(*out_features > (R - 1) * bn && *out_features <= R * bn, "cuda_bsr_linear: out_features: expected ",
                "a value in (", (R - 1) * bn, ", ", R * bn, "] for ", R, " block-rows of ", bn, ", got ", *out_features);
    if (bias) {
      TORCH_CHECK(bias->dim() == 1 && bias->numel() == *out_features, "cuda_bsr_linear: bias: expected shape (",
                  *out_features, ",), got ", bias->sizes());
    }
  }
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "cuda_bsr_linear: bias: expected dtype ", x.scalar_type(),
                ", got ", bias->scalar_type());
  }
  parse_activation(activation);
  return R;
}

struct DeviceInfo {
  int major = 0, minor = 0, sms = 0;
  int max_split = 1;  // the largest thread block cluster of the decode kernel here (1: none)
};

const DeviceInfo& device_info(int dev) {
  static std::array<DeviceInfo, 64> cache;
  static std::array<std::once_flag, 64> once;
  TORCH_CHECK(dev >= 0 && dev < 64, "cuda_bsr_linear: x: unsupported CUDA device index ", dev);
  std::call_once(once[dev], [dev] {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cache[dev].major, cudaDevAttrComputeCapabilityMajor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cache[dev].minor, cudaDevAttrComputeCapabilityMinor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cache[dev].sms, cudaDevAttrMultiProcessorCount, dev));
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(dev));
    const char* env = std::getenv("SPARSECORE_DECODE_CLUSTERS");  // "0": never (a fallback switch)
    cache[dev].max_split = env && std::string(env) == "0" ? 1 : bsr_decode_max_split();
  });
  return cache[dev];
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// t [rows, D] as the kernels read it: row-major, 16-byte aligned, D a multiple of 8 (a
// zero-padded copy when t is not already so).
Tensor rows16(const Tensor& t) {
  const int64_t d = t.size(1), d8 = (d + 7) / 8 * 8;
  if (t.is_contiguous() && d == d8 && aligned16(t)) return t;
  Tensor out = at::zeros({t.size(0), d8}, t.options());
  out.narrow(1, 0, d).copy_(t);
  return out;
}

void check_half(const Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "cuda_bsr_linear: ", name, ": expected a 2-D tensor, got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16, "cuda_bsr_linear: ", name,
              ": expected dtype float16 or bfloat16, got ", t.scalar_type());
}

void check_same_device(const Tensor& ref, std::initializer_list<std::pair<const Tensor*, const char*>> ts) {
  for (auto [t, name] : ts) {
    TORCH_CHECK(t->device() == ref.device(), "cuda_bsr_linear: ", name, ": expected device ", ref.device(),
                ", got ", t->device());
  }
}

const DeviceInfo& checked_device(const Tensor& t) {
  const DeviceInfo& info = device_info(t.get_device());
  TORCH_CHECK(info.major >= 8, "cuda_bsr_linear: expected a GPU of compute capability >= 8.0, got ", info.major,
              ".", info.minor);
  return info;
}

Tensor bsr_linear_cuda(const Tensor& x, const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx,
                       const Tensor& block_row, const Tensor& row_order, int64_t out_features,
                       const c10::optional<Tensor>& bias, c10::string_view activation, c10::string_view kernel) {
  const int64_t R =
      check_inputs(x, values, row_ptr, col_idx, block_row, row_order, out_features, bias, activation, kernel);
  check_same_device(x, {{&values, "values"}, {&row_ptr, "row_ptr"}, {&col_idx, "col_idx"},
                       {&block_row, "block_row"}, {&row_order, "row_order"}});
  if (bias) check_same_device(x, {{&*bias, "bias"}});
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t bn = values.size(1), bk = values.size(2);
  TORCH_CHECK(M <= kMaxRows && padded(K, bk) < INT_MAX - 64, "cuda_bsr_linear: x: expected at most ",
              kMaxRows, " rows and fewer than 2^31 - 64 columns padded to a multiple of BK, got ", x.sizes());
  TORCH_CHECK(R * bn < INT_MAX - 64 && values.size(0) < INT_MAX, "cuda_bsr_linear: values: expected fewer than ",
              "2^31 - 64 padded output features (block-rows x BN) and 2^31 blocks, got ", R, " block-rows of ", bn,
              " and ", values.size(0), " blocks");

  c10::cuda::CUDAGuard guard(x.device());
  const DeviceInfo& info = checked_device(x);

  Tensor y = at::empty({M, out_features}, x.options());
  if (M == 0) return y;

  const Tensor xp = rows16(x);
  const int64_t Kx = xp.size(1);
  const Tensor vals = aligned16(values) ? values : values.clone();
  const Tensor b = bias ? bias->contiguous() : Tensor();
  const Tensor rp = row_ptr.contiguous(), ci = col_idx.contiguous(), br = block_row.contiguous(),
               ro = row_order.contiguous();

  BsrParams p{};
  p.x = xp.data_ptr();
  p.values = vals.data_ptr();
  p.row_ptr = rp.data_ptr<int32_t>();
  p.col_idx = ci.data_ptr<int32_t>();
  p.block_row = br.data_ptr<int32_t>();
  p.row_order = ro.data_ptr<int32_t>();
  p.bias = b.defined() ? b.data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.M = static_cast<int>(M);
  p.N = static_cast<int>(out_features);
  p.R = static_cast<int>(R);
  p.nnzb = static_cast<int>(values.size(0));
  p.Kx = static_cast<int>(Kx);
  p.ldx = static_cast<int>(Kx);
  p.bk_shift = __builtin_ctzll(static_cast<unsigned long long>(bk));
  p.activation = parse_activation(activation);
  const DType dt = x.scalar_type() == at::kHalf ? kFloat16 : kBFloat16;

  const bool decode_ok = M <= kDecodeMaxM && bk >= 32;
  // TMA coordinates are int32: the values map has nnzb x BN rows
  const bool sm90_fits = values.size(0) * bn <= INT_MAX;
  const bool sm90_ok = bsr_sm90_built() && info.major == 9 && info.minor == 0 && sm90_fits;
  std::string which(kernel);
  if (which == "auto") which = decode_ok ? "decode" : sm90_ok ? "sm90" : "sm80";
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  if (which == "decode") {
    TORCH_CHECK(decode_ok, "cuda_bsr_linear: kernel: 'decode' expects M <= ", kDecodeMaxM,
                " and BK >= 32, got M=", M, ", BK=", bk);
    const int split = decode_split(p.R, p.M, p.nnzb, p.bk_shift, info.sms, info.max_split);
    if (split > 0) {  // one launch, y written directly
      C10_CUDA_CHECK(launch_bsr_decode_rows(p, dt, static_cast<int>(bn), split, stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {  // few block-rows and no clusters: split the kept blocks over all SMs, reduce through a workspace
      Tensor ws = at::zeros({M, R * bn}, x.options().dtype(at::kFloat));
      p.workspace = ws.data_ptr<float>();
      if (p.nnzb > 0) {
        C10_CUDA_CHECK(launch_bsr_decode(p, dt, static_cast<int>(bn), info.sms, stream));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      C10_CUDA_CHECK(launch_bsr_finalize(p, dt, static_cast<int>(bn), stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  } else if (which == "sm90") {
    TORCH_CHECK(sm90_ok, "cuda_bsr_linear: kernel: 'sm90' expects a compute capability 9.0 GPU, a build with ",
                "sm_90a and at most 2^31 - 1 rows of kept blocks (nnzb x BN), got ", info.major, ".", info.minor,
                bsr_sm90_built() ? "" : ", a build without sm_90a", ", nnzb x BN = ", values.size(0) * bn);
    Tensor counter = at::zeros({1}, x.options().dtype(at::kInt));
    p.tile_counter = counter.data_ptr<int>();
    C10_CUDA_CHECK(launch_bsr_sm90(p, dt, static_cast<int>(bn), info.sms, stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {  // "sm80"
    C10_CUDA_CHECK(launch_bsr_sm80(p, dt, static_cast<int>(bn), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return y;
}

// Whether every size is a plain number. Traced with dynamic shapes (torch.compile, make_fx)
// they are symbolic: the meta kernels then skip the checks that read sizes (the real call
// runs them) instead of failing the trace.
bool concrete(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts) {
    for (const c10::SymInt& s : t->sym_sizes()) {
      if (!s.maybe_as_int()) return false;
    }
  }
  return true;
}

// Fake/meta kernel: same checks that need no data, output [M, out_features].
Tensor bsr_linear_meta(const Tensor& x, const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx,
                       const Tensor& block_row, const Tensor& row_order, c10::SymInt out_features,
                       const c10::optional<Tensor>& bias, c10::string_view activation, c10::string_view kernel) {
  if (concrete({&x, &values, &row_ptr, &col_idx, &block_row, &row_order}) && (!bias || concrete({&*bias}))) {
    check_inputs(x, values, row_ptr, col_idx, block_row, row_order, out_features.maybe_as_int(), bias, activation,
                 kernel);
  }
  return at::empty_symint({x.sym_size(0), out_features}, x.options());
}

// ---- backward ------------------------------------------------------------------------------
void check_values(const Tensor& values, const Tensor& like) {
  TORCH_CHECK(values.dim() == 3 && values.is_contiguous(),
              "cuda_bsr_linear: values: expected a contiguous [nnzb, BN, BK], got shape ", values.sizes());
  TORCH_CHECK(values.scalar_type() == like.scalar_type(), "cuda_bsr_linear: values: expected dtype ",
              like.scalar_type(), ", got ", values.scalar_type());
  TORCH_CHECK(is_block_side(values.size(1)) && is_block_side(values.size(2)),
              "cuda_bsr_linear: values: expected blocks with sides in {16, 32, 64, 128}, got (", values.size(1), ", ",
              values.size(2), ")");
}

// Returns C (block-columns).
int64_t check_grad_input(const Tensor& dy, const Tensor& values, const Tensor& col_ptr, const Tensor& row_idx,
                         const Tensor& t_perm, c10::optional<int64_t> in_features) {
  check_half(dy, "dy");
  check_values(values, dy);
  TORCH_CHECK(col_ptr.dim() == 1 && col_ptr.numel() >= 2,
              "cuda_bsr_linear: col_ptr: expected int32 [C + 1] with C >= 1, got shape ", col_ptr.sizes());
  const int64_t C = col_ptr.numel() - 1, nnzb = values.size(0), bk = values.size(2);
  check_index(col_ptr, "col_ptr", C + 1);
  check_index(row_idx, "row_idx", nnzb);
  check_index(t_perm, "t_perm", nnzb);
  if (in_features) {
    TORCH_CHECK(*in_features > (C - 1) * bk && *in_features <= C * bk, "cuda_bsr_linear: in_features: expected a ",
                "value in (", (C - 1) * bk, ", ", C * bk, "] for ", C, " block-columns of ", bk, ", got ", *in_features);
  }
  return C;
}

Tensor grad_input_cuda(const Tensor& dy, const Tensor& values, const Tensor& col_ptr, const Tensor& row_idx,
                       const Tensor& t_perm, int64_t in_features) {
  const int64_t C = check_grad_input(dy, values, col_ptr, row_idx, t_perm, in_features);
  check_same_device(dy, {{&values, "values"}, {&col_ptr, "col_ptr"}, {&row_idx, "row_idx"}, {&t_perm, "t_perm"}});
  const int64_t M = dy.size(0);
  TORCH_CHECK(M <= kMaxRows && padded(dy.size(1), values.size(1)) < INT_MAX - 64, "cuda_bsr_linear: dy: expected at ",
              "most ", kMaxRows, " rows and fewer than 2^31 - 64 columns padded to a multiple of BN, got ", dy.sizes());
  TORCH_CHECK(C * values.size(2) < INT_MAX - 64 && values.size(0) < INT_MAX, "cuda_bsr_linear: in_features: ",
              "expected fewer than 2^31 - 64 padded input features (block-columns x BK) and 2^31 blocks, got ", C,
              " block-columns of ", values.size(2), " and ", values.size(0), " blocks");
  c10::cuda::CUDAGuard guard(dy.device());
  checked_device(dy);
  Tensor dx = at::empty({M, in_features}, dy.options());
  if (M == 0) return dx;
  const Tensor dyp = rows16(dy), cp = col_ptr.contiguous(), ri = row_idx.contiguous(), tp = t_perm.contiguous();
  const Tensor vals = aligned16(values) ? values : values.clone();
  BsrDxParams p{};
  p.dy = dyp.data_ptr();
  p.values = vals.data_ptr();
  p.col_ptr = cp.data_ptr<int32_t>();
  p.row_idx = ri.data_ptr<int32_t>();
  p.t_perm = tp.data_ptr<int32_t>();
  p.dx = dx.data_ptr();
  p.M = static_cast<int>(M);
  p.K = static_cast<int>(in_features);
  p.C = static_cast<int>(C);
  p.Ny = static_cast<int>(dyp.size(1));
  p.ldy = p.Ny;
  p.bn_shift = __builtin_ctzll(static_cast<unsigned long long>(values.size(1)));
  const DType dt = dy.scalar_type() == at::kHalf ? kFloat16 : kBFloat16;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(launch_bsr_dx(p, dt, static_cast<int>(values.size(2)), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dx;
}

Tensor grad_input_meta(const Tensor& dy, const Tensor& values, const Tensor& col_ptr, const Tensor& row_idx,
                       const Tensor& t_perm, c10::SymInt in_features) {
  if (concrete({&dy, &values, &col_ptr, &row_idx, &t_perm})) {
    check_grad_input(dy, values, col_ptr, row_idx, t_perm, in_features.maybe_as_int());
  }
  return at::empty_symint({dy.sym_size(0), in_features}, dy.options());
}

void check_grad_weight(const Tensor& dy, const Tensor& x, const Tensor& block_row, const Tensor& col_idx,
                       c10::optional<int64_t> bn, c10::optional<int64_t> bk) {
  check_half(dy, "dy");
  check_half(x, "x");
  TORCH_CHECK(x.scalar_type() == dy.scalar_type(), "cuda_bsr_linear: x: expected dtype ", dy.scalar_type(),
              " (as dy), got ", x.scalar_type());
  TORCH_CHECK(x.sym_size(0) == dy.sym_size(0), "cuda_bsr_linear: x: expected ", dy.sym_size(0),
              " rows (as dy), got ", x.sym_size(0));
  for (auto [side, name] : {std::pair{bn, "block_n"}, {bk, "block_k"}}) {
    if (side) {
      TORCH_CHECK(is_block_side(*side), "cuda_bsr_linear: ", name, ": expected one of 16, 32, 64, 128, got ", *side);
    }
  }
  TORCH_CHECK(col_idx.dim() == 1, "cuda_bsr_linear: col_idx: expected int32 [nnzb], got shape ", col_idx.sizes());
  check_index(col_idx, "col_idx", col_idx.numel());
  check_index(block_row, "block_row", col_idx.numel());
}

Tensor grad_weight_cuda(const Tensor& dy, const Tensor& x, const Tensor& block_row, const Tensor& col_idx,
                        int64_t block_n, int64_t block_k) {
  check_grad_weight(dy, x, block_row, col_idx, block_n, block_k);
  check_same_device(dy, {{&x, "x"}, {&block_row, "block_row"}, {&col_idx, "col_idx"}});
  const int64_t M = dy.size(0), nnzb = col_idx.numel();
  TORCH_CHECK(padded(dy.size(1), block_n) < INT_MAX - 64 && padded(x.size(1), block_k) < INT_MAX - 64 &&
                  M < INT_MAX - 64,
              "cuda_bsr_linear: dy, x: expected fewer than 2^31 - 64 rows and columns (padded to the block), got ",
              dy.sizes(), ", ", x.sizes());
  c10::cuda::CUDAGuard guard(dy.device());
  const DeviceInfo& info = checked_device(dy);
  if (nnzb == 0 || M == 0) return at::zeros({nnzb, block_n, block_k}, dy.options());
  Tensor dv = at::empty({nnzb, block_n, block_k}, dy.options());
  const Tensor dyp = rows16(dy), xp = rows16(x), br = block_row.contiguous(), ci = col_idx.contiguous();
  // Cut M when the kept blocks alone leave SMs idle; each range keeps >= 4 chunks of 64 rows.
  const int64_t chunks = (M + 63) / 64;
  const int64_t splits = std::max<int64_t>(
      1, std::min<int64_t>({(2 * info.sms + nnzb - 1) / nnzb, chunks / 4, 65535}));
  Tensor ws;
  if (splits > 1) ws = at::zeros({nnzb, block_n, block_k}, dy.options().dtype(at::kFloat));
  BsrDwParams p{};
  p.dy = dyp.data_ptr();
  p.x = xp.data_ptr();
  p.block_row = br.data_ptr<int32_t>();
  p.col_idx = ci.data_ptr<int32_t>();
  p.dv = dv.data_ptr();
  p.workspace = ws.defined() ? ws.data_ptr<float>() : nullptr;
  p.M = static_cast<int>(M);
  p.nnzb = static_cast<int>(nnzb);
  p.Ny = p.ldy = static_cast<int>(dyp.size(1));
  p.Kx = p.ldx = static_cast<int>(xp.size(1));
  p.splits = static_cast<int>(splits);
  const DType dt = dy.scalar_type() == at::kHalf ? kFloat16 : kBFloat16;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  C10_CUDA_CHECK(launch_bsr_dw(p, dt, static_cast<int>(block_n), static_cast<int>(block_k), stream));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (splits > 1) {
    C10_CUDA_CHECK(launch_bsr_dw_finalize(p, dt, dv.numel(), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return dv;
}

Tensor grad_weight_meta(const Tensor& dy, const Tensor& x, const Tensor& block_row, const Tensor& col_idx,
                        c10::SymInt block_n, c10::SymInt block_k) {
  if (concrete({&dy, &x, &block_row, &col_idx})) {
    check_grad_weight(dy, x, block_row, col_idx, block_n.maybe_as_int(), block_k.maybe_as_int());
  }
  return at::empty_symint({col_idx.sym_size(0), block_n, block_k}, dy.options());
}

bool has_sm90a() { return bsr_sm90_built(); }

int64_t decode_plan(int64_t device, int64_t M, int64_t R, int64_t nnzb, int64_t block_k) {
  TORCH_CHECK(M >= 1 && M <= kDecodeMaxM && is_block_side(block_k) && block_k >= 32 && R >= 0 && R < INT_MAX &&
                  nnzb >= 0 && nnzb < INT_MAX,
              "cuda_decode_split: expected 1 <= M <= ", kDecodeMaxM, ", block_k in {32, 64, 128}, 0 <= block_rows, "
              "nnzb < 2^31, got M=", M, ", block_rows=", R, ", nnzb=", nnzb, ", block_k=", block_k);
  int count = 0;
  C10_CUDA_CHECK(cudaGetDeviceCount(&count));
  TORCH_CHECK(device >= 0 && device < count, "cuda_decode_split: device: expected a CUDA device index in [0, ",
              count, "), got ", device);
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  const DeviceInfo& info = device_info(static_cast<int>(device));
  const int bk_shift = __builtin_ctzll(static_cast<unsigned long long>(block_k));
  return decode_split(static_cast<int>(R), static_cast<int>(M), nnzb, bk_shift, info.sms, info.max_split);
}

}  // namespace
}  // namespace sparsecore

TORCH_LIBRARY_FRAGMENT(sparsecore, m) {
  m.def(
      "cuda_bsr_linear(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor block_row, "
      "Tensor row_order, SymInt out_features, Tensor? bias=None, str activation=\"none\", "
      "str kernel=\"auto\") -> Tensor");
  m.def(
      "cuda_bsr_linear_grad_input(Tensor dy, Tensor values, Tensor col_ptr, Tensor row_idx, Tensor t_perm, "
      "SymInt in_features) -> Tensor");
  m.def(
      "cuda_bsr_linear_grad_weight(Tensor dy, Tensor x, Tensor block_row, Tensor col_idx, SymInt block_n, "
      "SymInt block_k) -> Tensor");
  m.def("cuda_has_sm90a() -> bool", &sparsecore::has_sm90a);
  m.def("cuda_decode_split(int device, int M, int block_rows, int nnzb, int block_k) -> int",
        &sparsecore::decode_plan);
}

TORCH_LIBRARY_IMPL(sparsecore, CUDA, m) {
  m.impl("cuda_bsr_linear", &sparsecore::bsr_linear_cuda);
  m.impl("cuda_bsr_linear_grad_input", &sparsecore::grad_input_cuda);
  m.impl("cuda_bsr_linear_grad_weight", &sparsecore::grad_weight_cuda);
}

TORCH_LIBRARY_IMPL(sparsecore, Meta, m) {
  m.impl("cuda_bsr_linear", &sparsecore::bsr_linear_meta);
  m.impl("cuda_bsr_linear_grad_input", &sparsecore::grad_input_meta);
  m.impl("cuda_bsr_linear_grad_weight", &sparsecore::grad_weight_meta);
}

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "sparsecore CUDA kernels (registers "
                                      "torch.ops.sparsecore.cuda_*)", -1, nullptr};
  return PyModule_Create(&module);
}
