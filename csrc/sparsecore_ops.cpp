// torch.ops.sparsecore.cuda_* : schemas, input checks, kernel choice, launches.
//
//   cuda_bsr_linear(x [M, K], values [nnzb, BN, BK], row_ptr, col_idx, block_row, row_order,
//                   out_features, bias?, activation, kernel) -> y [M, out_features]
//     kernel: "auto" (decode if M <= 64 and BK >= 32, else sm90 on compute capability 9.0
//             when built for sm_90a, else sm80) | "sm80" | "sm90" | "decode"
//   cuda_has_sm90a() -> bool   (the build contains the sm_90a wgmma kernel)
//
// Importing the module `sparsecore._C` (a plain CPython module with no functions) runs the
// registrations below.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <climits>
#include <mutex>
#include <string>

#include "bsr_kernels.h"

namespace sparsecore {
namespace {

using at::Tensor;

bool is_block_side(int64_t s) { return s == 16 || s == 32 || s == 64 || s == 128; }

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
                     const c10::optional<Tensor>& bias, c10::string_view activation) {
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
};

const DeviceInfo& device_info(int dev) {
  static std::array<DeviceInfo, 64> cache;
  static std::array<std::once_flag, 64> once;
  TORCH_CHECK(dev >= 0 && dev < 64, "cuda_bsr_linear: x: unsupported CUDA device index ", dev);
  std::call_once(once[dev], [dev] {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cache[dev].major, cudaDevAttrComputeCapabilityMajor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cache[dev].minor, cudaDevAttrComputeCapabilityMinor, dev));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cache[dev].sms, cudaDevAttrMultiProcessorCount, dev));
  });
  return cache[dev];
}

bool aligned16(const Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

Tensor bsr_linear_cuda(const Tensor& x, const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx,
                       const Tensor& block_row, const Tensor& row_order, int64_t out_features,
                       const c10::optional<Tensor>& bias, c10::string_view activation, c10::string_view kernel) {
  const int64_t R = check_inputs(x, values, row_ptr, col_idx, block_row, row_order, out_features, bias, activation);
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&values, "values"}, {&row_ptr, "row_ptr"},
                         {&col_idx, "col_idx"}, {&block_row, "block_row"}, {&row_order, "row_order"}}) {
    TORCH_CHECK(t->device() == x.device(), "cuda_bsr_linear: ", name, ": expected device ", x.device(),
                " (as x), got ", t->device());
  }
  if (bias) {
    TORCH_CHECK(bias->device() == x.device(), "cuda_bsr_linear: bias: expected device ", x.device(), ", got ",
                bias->device());
  }
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t bn = values.size(1), bk = values.size(2);
  TORCH_CHECK(M <= 65535LL * 128 && K < INT_MAX - 8, "cuda_bsr_linear: x: expected at most ", 65535LL * 128,
              " rows and fewer than 2^31 - 8 columns, got ", x.sizes());

  c10::cuda::CUDAGuard guard(x.device());
  const DeviceInfo& info = device_info(x.get_device());
  TORCH_CHECK(info.major >= 8, "cuda_bsr_linear: x: expected a GPU of compute capability >= 8.0, got ",
              info.major, ".", info.minor);

  Tensor y = at::empty({M, out_features}, x.options());
  if (M == 0) return y;

  // x: row-major, 16-byte aligned rows of a multiple of 8 elements; else a zero-padded copy.
  const int64_t Kx = (K + 7) / 8 * 8;
  Tensor xp = x;
  if (!x.is_contiguous() || K != Kx || !aligned16(x)) {
    xp = at::zeros({M, Kx}, x.options());
    xp.narrow(1, 0, K).copy_(x);
  }
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
  const bool sm90_ok = bsr_sm90_built() && info.major == 9 && info.minor == 0;
  std::string which(kernel);
  if (which == "auto") which = decode_ok ? "decode" : sm90_ok ? "sm90" : "sm80";
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  if (which == "decode") {
    TORCH_CHECK(decode_ok, "cuda_bsr_linear: kernel: 'decode' expects M <= ", kDecodeMaxM,
                " and BK >= 32, got M=", M, ", BK=", bk);
    Tensor ws = at::zeros({M, R * bn}, x.options().dtype(at::kFloat));
    p.workspace = ws.data_ptr<float>();
    if (p.nnzb > 0) {
      C10_CUDA_CHECK(launch_bsr_decode(p, dt, static_cast<int>(bn), info.sms, stream));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    C10_CUDA_CHECK(launch_bsr_finalize(p, dt, static_cast<int>(bn), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else if (which == "sm90") {
    TORCH_CHECK(sm90_ok, "cuda_bsr_linear: kernel: 'sm90' expects a compute capability 9.0 GPU and a build with ",
                "sm_90a, got ", info.major, ".", info.minor, bsr_sm90_built() ? "" : " and a build without sm_90a");
    C10_CUDA_CHECK(launch_bsr_sm90(p, dt, static_cast<int>(bn), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    TORCH_CHECK(which == "sm80", "cuda_bsr_linear: kernel: expected one of auto, sm80, sm90, decode, got '",
                which, "'");
    C10_CUDA_CHECK(launch_bsr_sm80(p, dt, static_cast<int>(bn), stream));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return y;
}

// Fake/meta kernel: same checks that need no data, output [M, out_features].
Tensor bsr_linear_meta(const Tensor& x, const Tensor& values, const Tensor& row_ptr, const Tensor& col_idx,
                       const Tensor& block_row, const Tensor& row_order, c10::SymInt out_features,
                       const c10::optional<Tensor>& bias, c10::string_view activation, c10::string_view kernel) {
  check_inputs(x, values, row_ptr, col_idx, block_row, row_order, out_features.maybe_as_int(), bias, activation);
  return at::empty_symint({x.sym_size(0), out_features}, x.options());
}

bool has_sm90a() { return bsr_sm90_built(); }

}  // namespace
}  // namespace sparsecore

TORCH_LIBRARY_FRAGMENT(sparsecore, m) {
  m.def(
      "cuda_bsr_linear(Tensor x, Tensor values, Tensor row_ptr, Tensor col_idx, Tensor block_row, "
      "Tensor row_order, SymInt out_features, Tensor? bias=None, str activation=\"none\", "
      "str kernel=\"auto\") -> Tensor");
  m.def("cuda_has_sm90a() -> bool", &sparsecore::has_sm90a);
}

TORCH_LIBRARY_IMPL(sparsecore, CUDA, m) { m.impl("cuda_bsr_linear", &sparsecore::bsr_linear_cuda); }

TORCH_LIBRARY_IMPL(sparsecore, Meta, m) { m.impl("cuda_bsr_linear", &sparsecore::bsr_linear_meta); }

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "sparsecore CUDA kernels (registers "
                                      "torch.ops.sparsecore.cuda_*)", -1, nullptr};
  return PyModule_Create(&module);
}
