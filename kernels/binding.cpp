// Python binding of the fused contrastive loss: argument checks that name the offending tensor, then the
// device implementation. Compiled twice: into nlip_ds._C_cpu, and with NLIP_DS_CUDA into nlip_ds._C_cuda.
#include <torch/extension.h>

#include <atomic>
#include <limits>
#include <string>

#include "contrastive.h"

namespace nlip {
namespace {

#ifdef NLIP_DS_CUDA
constexpr c10::DeviceType kDevice = c10::DeviceType::CUDA;
#else
constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
#endif

std::atomic<bool> g_poison{false};
std::atomic<int64_t> g_tile_rows{0}, g_tile_cols{0};

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_device(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().type() == kDevice, name, " must be a ", c10::DeviceTypeName(kDevice, /*lower_case=*/true),
              " tensor for this extension, got ", t.device());
}

// A (rows, d) feature matrix on this extension's device, of the reference tensor's dtype and device.
void check_matrix(const at::Tensor& t, const char* name, const at::Tensor& ref, int64_t rows) {
  check_device(t, name);
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but img_local is on ", ref.device());
  TORCH_CHECK(is_float_dtype(t.scalar_type()), name, " must be float32, float16, bfloat16 or float64, got ",
              t.scalar_type());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(),
              " but img_local has ", ref.scalar_type());
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D (rows, d), got shape ", t.sizes());
  TORCH_CHECK(t.size(1) == ref.size(1), name, " has feature dim ", t.size(1), " but img_local has ", ref.size(1));
  TORCH_CHECK(rows < 0 || t.size(0) == rows, name, " must have ", rows, " rows, got ", t.size(0));
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

// A per-row vector (n,) of the accumulation dtype, e.g. lse or the soft-target coefficients a, b.
void check_vector(const at::Tensor& t, const char* name, const at::Tensor& ref, int64_t rows, at::ScalarType acc) {
  check_device(t, name);
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but img_local is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == acc, name, " must have dtype ", acc, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows, name, " must have shape (", rows, ",), got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_scalar(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  check_device(t, name);
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but img_local is on ", ref.device());
  TORCH_CHECK(t.numel() == 1, name, " must hold one element, got shape ", t.sizes());
  TORCH_CHECK(is_float_dtype(t.scalar_type()), name, " must be a floating tensor, got ", t.scalar_type());
}

at::ScalarType acc_dtype(const at::Tensor& features) {
  return features.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Features make_features(at::Tensor img_local, at::Tensor txt_local, at::Tensor img_all, at::Tensor txt_all,
                       int64_t row_offset, bool symmetric) {
  check_matrix(img_local, "img_local", img_local, -1);
  const int64_t n = img_local.size(0);
  check_matrix(txt_local, "txt_local", img_local, n);
  check_matrix(img_all, "img_all", img_local, -1);
  const int64_t N = img_all.size(0);
  check_matrix(txt_all, "txt_all", img_local, N);
  TORCH_CHECK(n > 0 && img_local.size(1) > 0, "img_local must be non-empty, got shape ", img_local.sizes());
  TORCH_CHECK(row_offset >= 0 && row_offset + n <= N, "row_offset ", row_offset, " puts the ", n,
              " local rows outside the ", N, " gathered rows");
  if (symmetric) {
    // The shared-tile path reads only the local tensors, so they must really be the gathered ones.
    TORCH_CHECK(img_local.data_ptr() == img_all.data_ptr() && txt_local.data_ptr() == txt_all.data_ptr() &&
                    n == N && row_offset == 0,
                "symmetric=True requires img_local is img_all, txt_local is txt_all and row_offset 0");
  }
  // Detached: the kernels run ATen ops on worker threads, where the caller's no-grad mode does not apply.
  return Features{img_local.detach(), txt_local.detach(), img_all.detach(), txt_all.detach(), row_offset,
                  symmetric};
}

at::Tensor stats(at::Tensor img_local, at::Tensor txt_local, at::Tensor img_all, at::Tensor txt_all,
                 at::Tensor scale, int64_t row_offset, bool symmetric) {
  const Features f = make_features(img_local, txt_local, img_all, txt_all, row_offset, symmetric);
  check_scalar(scale, "logit_scale", img_local);
#ifdef NLIP_DS_CUDA
  return stats_cuda(f, scale);
#else
  return stats_cpu(f, scale);
#endif
}

Grads grads(at::Tensor img_local, at::Tensor txt_local, at::Tensor img_all, at::Tensor txt_all, at::Tensor scale,
            int64_t row_offset, bool symmetric, at::Tensor lse, at::Tensor a, at::Tensor b, at::Tensor weight) {
  const Features f = make_features(img_local, txt_local, img_all, txt_all, row_offset, symmetric);
  const int64_t n = img_local.size(0);
  const at::ScalarType acc = acc_dtype(img_local);
  check_scalar(scale, "logit_scale", img_local);
  check_scalar(weight, "weight", img_local);
  check_device(lse, "lse");
  TORCH_CHECK(lse.scalar_type() == acc && lse.dim() == 2 && lse.size(0) == 2 && lse.size(1) == n &&
                  lse.is_contiguous(),
              "lse must be a contiguous (2, ", n, ") ", acc, " tensor, got ", lse.scalar_type(), " ", lse.sizes());
  check_vector(a, "a", img_local, n, acc);
  check_vector(b, "b", img_local, n, acc);
#ifdef NLIP_DS_CUDA
  return grads_cuda(f, scale, lse, a, b, weight);
#else
  return grads_cpu(f, scale, lse, a, b, weight);
#endif
}

}  // namespace

void set_poison_outputs(bool on) { g_poison.store(on); }

void set_tile(int64_t rows, int64_t cols) {
  TORCH_CHECK(rows >= 0 && cols >= 0 && (rows == 0) == (cols == 0),
              "tile must be two positive sizes, or (0, 0) for the device default; got (", rows, ", ", cols, ")");
  g_tile_rows.store(rows);
  g_tile_cols.store(cols);
}

TileShape tile_or(TileShape device_default) {
  const int64_t rows = g_tile_rows.load(), cols = g_tile_cols.load();
  return rows > 0 ? TileShape{rows, cols} : device_default;
}

at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  if (g_poison.load()) return at::full(shape, std::numeric_limits<double>::quiet_NaN(), options);
  return at::empty(shape, options);
}

}  // namespace nlip

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused contrastive (CLIP / NLIP) loss kernels; see nlip_ds/ops/contrastive.py";
  m.attr("device") = c10::DeviceTypeName(nlip::kDevice, /*lower_case=*/true);
  m.def("stats", &nlip::stats, "Per-row (2, 3, n) [i2t, t2i] x [lse, pos, rowsum] of the scaled logits",
        py::arg("img_local"), py::arg("txt_local"), py::arg("img_all"), py::arg("txt_all"), py::arg("scale"),
        py::arg("row_offset"), py::arg("symmetric"));
  m.def("grads", &nlip::grads,
        "[d_img_local, d_txt_local, d_img_all, d_txt_all, d_scale] of weight * sum of soft-target losses",
        py::arg("img_local"), py::arg("txt_local"), py::arg("img_all"), py::arg("txt_all"), py::arg("scale"),
        py::arg("row_offset"), py::arg("symmetric"), py::arg("lse"), py::arg("a"), py::arg("b"),
        py::arg("weight"));
  m.def("set_poison_outputs", &nlip::set_poison_outputs, "Allocate kernel outputs filled with NaN (tests)");
  m.def("set_tile", &nlip::set_tile, "Logit tile (rows, cols) per GEMM and epilogue; (0, 0): the device default",
        py::arg("rows"), py::arg("cols"));
}
