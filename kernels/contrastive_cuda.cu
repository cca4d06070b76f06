// CUDA epilogues of the fused contrastive loss (tile driver: tiles.h; per-element math: epilogue.h).
//
// The tile products are cuBLAS GEMMs issued by the driver through ATen: bf16 / fp16 features on tensor cores
// with a float32 tile, float32 features as float32 GEMMs (TF32 only if torch.backends.cuda.matmul.allow_tf32
// is on), float64 as float64. The kernels here are the epilogues, one launch each per tile, all on the current
// stream and none with atomics: each row (column) of a tile is reduced by one block (thread) in a fixed order,
// so losses and gradients are bitwise reproducible.
//   row_stats_kernel        one block per tile row: online lse, logit sum, positive logit, merged into the
//                           running row statistics
//   col_stats_*_kernel      shared tile only: column partials over kColSplits row slices, then their merge
//   grad_tile_kernel        one block per tile row: G = P - Q in the GEMM dtype, and the row's sum(G * cosine)
//                           added to a per-row d/d scale accumulator
// Extra memory: one float32 tile (and a half G tile for half inputs), O(n + N) statistics, float32 gradient
// accumulators for half inputs.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <type_traits>

#include "contrastive.h"
#include "epilogue.h"
#include "tiles.h"

namespace nlip {
namespace {

using tiles::GradTerms;
using tiles::Range;
using tiles::Running;

// 2048 x 4096 float32 logits (32 MiB): cuBLAS runs a 2048 x 4096 x d product near the tensor-core rate, and
// each epilogue launch has thousands of blocks to spread over the SMs.
constexpr TileShape kDefaultTile{2048, 4096};
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kColWidth = 32;   // columns per block of the column kernel (one warp across)
constexpr int kColLanes = 8;    // row lanes per block of the column kernel
constexpr int kColSplits = 16;  // row slices reduced separately, then merged in order

template <typename T>
__device__ __forceinline__ void warp_lse(T& m, T& l) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const T m2 = __shfl_down_sync(0xffffffffu, m, offset);
    const T l2 = __shfl_down_sync(0xffffffffu, l, offset);
    epi::lse_merge(m, l, m2, l2);
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Thread 0 ends with the block's (m, l) and total; the warps are merged in order.
template <typename T>
__device__ void block_lse_sum(T& m, T& l, T& total) {
  __shared__ T sm[kWarps], sl[kWarps], st[kWarps];
  warp_lse(m, l);
  total = warp_sum(total);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sm[warp] = m;
    sl[warp] = l;
    st[warp] = total;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kWarps; ++w) {
      epi::lse_merge(m, l, sm[w], sl[w]);
      total += st[w];
    }
  }
}

template <typename T>
__device__ T block_sum(T v) {
  __shared__ T partial[kWarps];
  v = warp_sum(v);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0)
    for (int w = 1; w < kWarps; ++w) v += partial[w];
  return v;
}

// Grid (rb): block i folds tile row i into running row r0 + i.
template <typename T>
__global__ void row_stats_kernel(const T* __restrict__ s, int64_t cb, const T* __restrict__ scale_ptr, int64_t r0,
                                 int64_t c0, int64_t row_offset, Running<T> rows) {
  const T scale = *scale_ptr;
  const T* row = s + blockIdx.x * cb;
  T m = epi::neg_inf<T>(), l = 0, total = 0;
  for (int64_t j = threadIdx.x; j < cb; j += kThreads) {
    const T x = scale * row[j];
    epi::lse_push(m, l, x);
    total += x;
  }
  block_lse_sum(m, l, total);
  if (threadIdx.x != 0) return;
  const int64_t r = r0 + blockIdx.x;
  epi::lse_merge(rows.max[r], rows.sumexp[r], m, l);
  rows.sum[r] += total;
  const int64_t target = epi::positive_column(row_offset, r, c0, cb);
  if (target >= 0) rows.pos[r] = scale * row[target];
}

// Grid (ceil(cb / kColWidth), kColSplits), block (kColWidth, kColLanes): partial (m, l, sum) of each column over
// row slice blockIdx.y, into partial (kColSplits, 3, cb).
template <typename T>
__global__ void col_stats_partial_kernel(const T* __restrict__ s, int64_t rb, int64_t cb,
                                         const T* __restrict__ scale_ptr, T* __restrict__ partial) {
  __shared__ T sm[kColLanes][kColWidth], sl[kColLanes][kColWidth], st[kColLanes][kColWidth];
  const T scale = *scale_ptr;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kColWidth + threadIdx.x;
  T m = epi::neg_inf<T>(), l = 0, total = 0;
  if (j < cb) {
    for (int64_t i = static_cast<int64_t>(blockIdx.y) * kColLanes + threadIdx.y; i < rb;
         i += static_cast<int64_t>(kColLanes) * gridDim.y) {
      const T x = scale * s[i * cb + j];
      epi::lse_push(m, l, x);
      total += x;
    }
  }
  sm[threadIdx.y][threadIdx.x] = m;
  sl[threadIdx.y][threadIdx.x] = l;
  st[threadIdx.y][threadIdx.x] = total;
  __syncthreads();
  if (threadIdx.y != 0 || j >= cb) return;
  for (int lane = 1; lane < kColLanes; ++lane) {
    epi::lse_merge(m, l, sm[lane][threadIdx.x], sl[lane][threadIdx.x]);
    total += st[lane][threadIdx.x];
  }
  T* out = partial + static_cast<int64_t>(blockIdx.y) * 3 * cb;
  out[j] = m;
  out[cb + j] = l;
  out[2 * cb + j] = total;
}

// Grid over the cb columns: merges the kColSplits partials, in order, into running column c0 + j.
template <typename T>
__global__ void col_stats_merge_kernel(const T* __restrict__ partial, int64_t cb, int64_t c0, Running<T> cols) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= cb) return;
  T m = cols.max[c0 + j], l = cols.sumexp[c0 + j], total = 0;
  for (int split = 0; split < kColSplits; ++split) {
    const T* p = partial + static_cast<int64_t>(split) * 3 * cb;
    epi::lse_merge(m, l, p[j], p[cb + j]);
    total += p[2 * cb + j];
  }
  cols.max[c0 + j] = m;
  cols.sumexp[c0 + j] = l;
  cols.sum[c0 + j] += total;
}

// Grid (rb): block i turns tile row i into its gradient row g (GEMM dtype G) and adds sum(G * cosine) to
// ds_rows[r0 + i].
template <typename T, typename G>
__global__ void grad_tile_kernel(const T* __restrict__ s, G* __restrict__ g, int64_t cb,
                                 const T* __restrict__ scale_ptr, int64_t r0, int64_t c0, GradTerms<T> terms,
                                 T* __restrict__ ds_rows) {
  const T scale = *scale_ptr;
  const int64_t r = r0 + blockIdx.x;
  const bool symmetric = terms.col_lse != nullptr;
  const T lse = terms.row_lse[r], b = terms.b[r];
  const T a = epi::positive_weight(terms.a[r], symmetric);
  const int64_t target = epi::positive_column(terms.row_offset, r, c0, cb);
  const T* row = s + blockIdx.x * cb;
  G* out = g + blockIdx.x * cb;
  T ds = 0;
  for (int64_t j = threadIdx.x; j < cb; j += kThreads) {
    const T c = row[j];
    T v = symmetric ? epi::grad_entry_symmetric(c, scale, lse, b, terms.col_lse[c0 + j], terms.col_b[c0 + j])
                    : epi::grad_entry(c, scale, lse, b);
    if (j == target) v -= a;
    ds += v * c;
    out[j] = static_cast<G>(v);
  }
  ds = block_sum(ds);
  if (threadIdx.x == 0) ds_rows[r] += ds;
}

int blocks(int64_t count, int per_block) { return static_cast<int>((count + per_block - 1) / per_block); }

// T: accumulation type; G: the GEMM dtype of the features (and of the gradient tile handed to the GEMMs).
template <typename T, typename G>
struct CudaEpilogue {
  using acc_t = T;
  at::Tensor scale;    // 0-dim, acc_t, on the device: read by the kernels, so the host never syncs
  at::Tensor ds_rows;  // (n,) per-row sums of G * cosines
  at::Tensor g_tile;   // the half gradient tile (half inputs only)

  at::Tensor compute(const at::Tensor& t) const { return t; }

  template <typename F>
  void for_each_task(int64_t rows, int64_t cols, const F& fn) const {
    fn(Range{0, rows}, Range{0, cols}, 0);  // one stream: tiles in order, GEMMs of one tile fill the GPU
  }

  void row_stats(const at::Tensor& s, int64_t r0, int64_t c0, int64_t row_offset, const Running<T>& rows) const {
    row_stats_kernel<T><<<s.size(0), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        s.const_data_ptr<T>(), s.size(1), scale.const_data_ptr<T>(), r0, c0, row_offset, rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  void col_stats(const at::Tensor& s, int64_t, int64_t c0, const Running<T>& cols) const {
    const int64_t rb = s.size(0), cb = s.size(1);
    at::Tensor partial = at::empty({kColSplits, 3, cb}, s.options());
    const auto stream = c10::cuda::getCurrentCUDAStream();
    col_stats_partial_kernel<T><<<dim3(blocks(cb, kColWidth), kColSplits), dim3(kColWidth, kColLanes), 0, stream>>>(
        s.const_data_ptr<T>(), rb, cb, scale.const_data_ptr<T>(), partial.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    col_stats_merge_kernel<T><<<blocks(cb, kThreads), kThreads, 0, stream>>>(partial.const_data_ptr<T>(), cb, c0,
                                                                             cols);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  at::Tensor grad_tile(at::Tensor& s, int64_t r0, int64_t c0, const GradTerms<T>& terms, int64_t) {
    const int64_t rb = s.size(0), cb = s.size(1);
    at::Tensor g = s;  // float32 / float64 features: G overwrites the cosines
    if (!std::is_same<T, G>::value) {
      if (!g_tile.defined() || g_tile.numel() < rb * cb)
        g_tile = at::empty({rb * cb}, s.options().dtype(c10::CppTypeToScalarType<G>::value));
      g = g_tile.narrow(0, 0, rb * cb).view({rb, cb});
    }
    grad_tile_kernel<T, G><<<rb, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        s.const_data_ptr<T>(), g.data_ptr<G>(), cb, scale.const_data_ptr<T>(), r0, c0, terms,
        ds_rows.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return g;
  }

  at::Tensor d_scale() const { return ds_rows.sum(); }
};

template <typename T, typename G>
CudaEpilogue<T, G> epilogue(const Features& f, const at::Tensor& scale) {
  const auto acc = f.img_local.options().dtype(c10::CppTypeToScalarType<T>::value);
  return {scale.to(acc).reshape({}).contiguous(), at::zeros({f.img_local.size(0)}, acc), at::Tensor()};
}

// Calls fn(epilogue) with the epilogue type of the features' dtype.
template <typename F>
auto with_epilogue(const Features& f, const at::Tensor& scale, const F& fn) {
  switch (f.img_local.scalar_type()) {
    case at::kDouble: {
      auto e = epilogue<double, double>(f, scale);
      return fn(e);
    }
    case at::kHalf: {
      auto e = epilogue<float, at::Half>(f, scale);
      return fn(e);
    }
    case at::kBFloat16: {
      auto e = epilogue<float, at::BFloat16>(f, scale);
      return fn(e);
    }
    default: {
      auto e = epilogue<float, float>(f, scale);
      return fn(e);
    }
  }
}

}  // namespace

at::Tensor stats_cuda(const Features& f, const at::Tensor& scale) {
  const c10::cuda::CUDAGuard guard(f.img_local.device());
  return with_epilogue(f, scale, [&](auto& e) { return tiles::stats(e, f, tile_or(kDefaultTile)); });
}

Grads grads_cuda(const Features& f, const at::Tensor& scale, const at::Tensor& lse, const at::Tensor& a,
                 const at::Tensor& b, const at::Tensor& weight) {
  const c10::cuda::CUDAGuard guard(f.img_local.device());
  return with_epilogue(f, scale, [&](auto& e) {
    return tiles::grads(e, f, scale, lse, a, b, weight, tile_or(kDefaultTile));
  });
}

}  // namespace nlip
