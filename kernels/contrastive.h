// Fused symmetric InfoNCE (CLIP / NLIP soft-target) loss: shared declarations of the device implementations.
//
// Notation (docs/method.md): one rank holds n local pairs, rows [row_offset, row_offset + n) of the N gathered ones.
// Direction i2t scores local images against all texts, t2i local texts against all images:
//   A = scale * img_local txt_all^T (n, N),   B = scale * txt_local img_all^T (n, N),
// and local row i has its positive in column g_i = row_offset + i. Neither matrix is ever stored whole: the
// forward keeps three numbers per row, the backward recomputes tiles.
//
// Soft targets q_ij = a_i [j == g_i] + b_i (a = 1 - w - w/(N-1), b = w/(N-1) for the NLIP weight w; a = 1,
// b = 0 for plain CLIP) make the loss of row i in one direction  lse_i - (a_i pos_i + b_i rowsum_i), so the
// forward needs only lse, pos and rowsum per row and the Python layer assembles the loss from them.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace nlip {

// The inputs of one call, checked by the binding: contiguous (n, d) / (N, d) matrices of one dtype and device.
struct Features {
  at::Tensor img_local;  // (n, d)
  at::Tensor txt_local;  // (n, d)
  at::Tensor img_all;    // (N, d)
  at::Tensor txt_all;    // (N, d)
  int64_t row_offset;
  // img_local is img_all and txt_local is txt_all (one process, n == N, offset 0). Then B = A^T, one tile
  // product serves both directions, and the whole feature gradient is returned on the *_local outputs.
  bool symmetric;
};

// Per-row statistics, layout (2, 3, n) in the accumulation dtype: [i2t, t2i] x [lse, pos, rowsum].
enum StatRow : int64_t { kLse = 0, kPos = 1, kRowSum = 2 };

// Gradients of  weight * sum_i sum_dir (lse_i - sum_j q_ij logit_ij)  given the forward's lse (2, n):
// {d_img_local, d_txt_local, d_img_all, d_txt_all, d_scale}. With `symmetric`, d_img_all and d_txt_all are
// undefined (None in Python) and the *_local gradients carry both paths.
using Grads = std::vector<at::Tensor>;

// `scale` and `weight` are one-element tensors on the features' device, so a CUDA call never syncs the host.
at::Tensor stats_cpu(const Features& f, const at::Tensor& scale);
Grads grads_cpu(const Features& f, const at::Tensor& scale, const at::Tensor& lse, const at::Tensor& a,
                const at::Tensor& b, const at::Tensor& weight);

at::Tensor stats_cuda(const Features& f, const at::Tensor& scale);
Grads grads_cuda(const Features& f, const at::Tensor& scale, const at::Tensor& lse, const at::Tensor& a,
                 const at::Tensor& b, const at::Tensor& weight);

// Tile of the logit matrix that one GEMM produces and one epilogue consumes. {0, 0} means the device's default
// (CPU: 256 x 512 per thread, L2-sized; CUDA: 2048 x 4096, large enough for cuBLAS to run near peak).
struct TileShape {
  int64_t rows, cols;
};
void set_tile(int64_t rows, int64_t cols);
TileShape tile_or(TileShape device_default);

// Debug switch for tests: outputs that the kernels must overwrite are allocated filled with NaN instead of
// uninitialized, so an element a kernel forgets to write shows up as NaN.
void set_poison_outputs(bool on);
at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options);

}  // namespace nlip
