// CUDA implementation of the fused contrastive loss (see contrastive.h for the notation).
//
// Tiles of kTile x kTile logits, 256 threads per block, each thread owning a kMicro x kMicro micro-tile in
// registers; the feature dimension is staged through shared memory kDepth at a time and accumulated in fp32
// (fp64 for double) with FMA. Tensor cores are not used (see docs/performance.md).
//
// Forward: stats_kernel keeps an online (max, sumexp, sum) per row over one split of the columns;
// finish_stats_kernel merges the splits. Backward: grads_kernel recomputes one tile per block, turns it into
// G = P - Q in shared memory and adds G y_tile / G^T x_tile to fp32 gradient buffers with atomics, so the
// gradient sums are not bitwise deterministic across runs. Extra memory: O((n + N) d) fp32 accumulators for
// half inputs, O(splits * n) partial statistics, and one partial per block for d/d scale.
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "contrastive.h"

namespace nlip {
namespace {

constexpr int kSide = 16;              // threads per block side: 16 x 16
constexpr int kThreads = kSide * kSide;
constexpr int kDepth = 16;             // feature columns staged per step of the tile product
constexpr int kChunk = 32;             // feature columns per step of the gradient products (2 per thread)

// Tile side: 64 (4 x 4 per thread) for 4-byte accumulators; 32 for double, to keep shared memory under 48 KiB.
template <typename scalar_t>
constexpr int tile_side() {
  return std::is_same<scalar_t, double>::value ? 32 : 64;
}

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// (m, l) <- the log-sum-exp pair of the union of two sets; an empty set is (-inf, 0).
template <typename acc_t>
__device__ __forceinline__ void merge_lse(acc_t& m, acc_t& l, acc_t m2, acc_t l2) {
  const acc_t mx = m > m2 ? m : m2;
  if (mx == neg_inf<acc_t>()) return;  // both empty
  l = l * ::exp(m - mx) + l2 * ::exp(m2 - mx);
  m = mx;
}

// acc[i][j] = x[r0 + ty*kMicro + i] . y[c0 + tx*kMicro + j] for one tile. Rows past `rows` or `cols` read zeros
// and their results must be ignored by the caller. xs, ys: shared staging [kDepth][kTile + 1] (padded against
// bank conflicts on the transposing store).
template <typename scalar_t, typename acc_t, int kTile>
__device__ void tile_product(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t rows,
                             int64_t cols, int64_t d, int64_t r0, int64_t c0, acc_t (*xs)[kTile + 1],
                             acc_t (*ys)[kTile + 1], acc_t (&acc)[kTile / kSide][kTile / kSide]) {
  constexpr int kMicro = kTile / kSide;
  const int tid = threadIdx.y * kSide + threadIdx.x;
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int j = 0; j < kMicro; ++j) acc[i][j] = acc_t(0);
  for (int64_t k0 = 0; k0 < d; k0 += kDepth) {
    for (int e = tid; e < kTile * kDepth; e += kThreads) {
      const int r = e / kDepth, k = e % kDepth;
      const int64_t gk = k0 + k;
      xs[k][r] = (r0 + r < rows && gk < d) ? static_cast<acc_t>(x[(r0 + r) * d + gk]) : acc_t(0);
      ys[k][r] = (c0 + r < cols && gk < d) ? static_cast<acc_t>(y[(c0 + r) * d + gk]) : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kDepth; ++k) {
      acc_t xv[kMicro], yv[kMicro];
#pragma unroll
      for (int i = 0; i < kMicro; ++i) xv[i] = xs[k][threadIdx.y * kMicro + i];
#pragma unroll
      for (int j = 0; j < kMicro; ++j) yv[j] = ys[k][threadIdx.x * kMicro + j];
#pragma unroll
      for (int i = 0; i < kMicro; ++i)
#pragma unroll
        for (int j = 0; j < kMicro; ++j) acc[i][j] += xv[i] * yv[j];
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward

// Grid (row tiles, column splits). partial (splits, 3, n): [max, sumexp, sum] of row r over the split's columns;
// pos (n,): the positive logit, written by the one thread that meets column row_offset + r.
template <typename scalar_t, int kTile>
__global__ void __launch_bounds__(kThreads)
    stats_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t n, int64_t N, int64_t d,
                 const at::acc_type<scalar_t, true>* __restrict__ scale_ptr, int64_t row_offset,
                 int64_t cols_per_split, at::acc_type<scalar_t, true>* __restrict__ partial,
                 at::acc_type<scalar_t, true>* __restrict__ pos) {
  using acc_t = at::acc_type<scalar_t, true>;
  constexpr int kMicro = kTile / kSide;
  __shared__ acc_t xs[kDepth][kTile + 1];
  __shared__ acc_t ys[kDepth][kTile + 1];
  const acc_t scale = *scale_ptr;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * cols_per_split;
  const int64_t c_end = std::min(N, c_begin + cols_per_split);

  acc_t m[kMicro], l[kMicro], sum[kMicro];  // this thread's running stats over the columns it has seen
#pragma unroll
  for (int i = 0; i < kMicro; ++i) m[i] = neg_inf<acc_t>(), l[i] = acc_t(0), sum[i] = acc_t(0);

  for (int64_t c0 = c_begin; c0 < c_end; c0 += kTile) {
    acc_t acc[kMicro][kMicro];
    tile_product<scalar_t, acc_t, kTile>(x, y, n, c_end, d, r0, c0, xs, ys, acc);
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int64_t r = r0 + threadIdx.y * kMicro + i;
      acc_t tile_max = neg_inf<acc_t>();
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        const int64_t c = c0 + threadIdx.x * kMicro + j;
        if (c >= c_end) continue;
        const acc_t v = scale * acc[i][j];
        tile_max = v > tile_max ? v : tile_max;
        sum[i] += v;
        if (r < n && c == row_offset + r) pos[r] = v;
      }
      if (tile_max == neg_inf<acc_t>()) continue;  // no valid column for this thread in this tile
      acc_t e = acc_t(0);
#pragma unroll
      for (int j = 0; j < kMicro; ++j) {
        if (c0 + threadIdx.x * kMicro + j < c_end) e += ::exp(scale * acc[i][j] - tile_max);
      }
      merge_lse(m[i], l[i], tile_max, e);
    }
  }

  // The 16 threads of a row are the lanes of one half-warp differing in threadIdx.x: merge across them.
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
#pragma unroll
    for (int offset = kSide / 2; offset > 0; offset >>= 1) {
      const acc_t om = __shfl_xor_sync(0xffffffffu, m[i], offset);
      const acc_t ol = __shfl_xor_sync(0xffffffffu, l[i], offset);
      sum[i] += __shfl_xor_sync(0xffffffffu, sum[i], offset);
      merge_lse(m[i], l[i], om, ol);
    }
    const int64_t r = r0 + threadIdx.y * kMicro + i;
    if (threadIdx.x == 0 && r < n) {
      acc_t* out = partial + static_cast<int64_t>(blockIdx.y) * 3 * n;
      out[r] = m[i];
      out[n + r] = l[i];
      out[2 * n + r] = sum[i];
    }
  }
}

// stats (3, n): lse and rowsum from the splits' partials (pos is already there).
template <typename acc_t>
__global__ void finish_stats_kernel(const acc_t* __restrict__ partial, int64_t splits, int64_t n,
                                    acc_t* __restrict__ stats) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= n) return;
  acc_t m = neg_inf<acc_t>(), l = acc_t(0), sum = acc_t(0);
  for (int64_t s = 0; s < splits; ++s) {
    const acc_t* p = partial + s * 3 * n;
    merge_lse(m, l, p[r], p[n + r]);
    sum += p[2 * n + r];
  }
  stats[kLse * n + r] = m + ::log(l);
  stats[kRowSum * n + r] = sum;
}

// Only c10's CUDA headers are used (not ATen/cuda/CUDAContext.h), so the build needs no cuBLAS / cuSPARSE
// headers, which a minimal toolkit lacks.
int num_sms(const at::Tensor& t) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, t.device().index()));
  return count;
}

// Statistics (3, n) of the rows of scale * x y^T into `out`.
template <typename scalar_t>
void direction_stats(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale, int64_t row_offset,
                     at::Tensor out) {
  using acc_t = at::acc_type<scalar_t, true>;
  constexpr int kTile = tile_side<scalar_t>();
  const int64_t n = x.size(0), N = y.size(0), d = x.size(1);
  const int64_t row_tiles = (n + kTile - 1) / kTile, col_tiles = (N + kTile - 1) / kTile;
  // Split the columns until the grid has a few blocks per SM; a split is a whole number of tiles.
  const int64_t wanted = std::max<int64_t>(1, (4 * num_sms(x) + row_tiles - 1) / row_tiles);
  const int64_t tiles_per_split = (col_tiles + std::min(wanted, col_tiles) - 1) / std::min(wanted, col_tiles);
  const int64_t splits = (col_tiles + tiles_per_split - 1) / tiles_per_split;
  at::Tensor partial = at::empty({splits, 3, n}, out.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  acc_t* stats = out.data_ptr<acc_t>();
  stats_kernel<scalar_t, kTile><<<dim3(row_tiles, splits), dim3(kSide, kSide), 0, stream>>>(
      x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), n, N, d, scale.const_data_ptr<acc_t>(),
      row_offset, tiles_per_split * kTile, partial.data_ptr<acc_t>(), stats + kPos * n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_stats_kernel<acc_t><<<(n + 255) / 256, 256, 0, stream>>>(partial.const_data_ptr<acc_t>(), splits, n, stats);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------------
// Backward

// Sum of v over the block, valid in thread 0.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* warp_sums) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int tid = threadIdx.y * kSide + threadIdx.x;
  if (tid % 32 == 0) warp_sums[tid / 32] = v;
  __syncthreads();
  acc_t total = acc_t(0);
  if (tid == 0)
    for (int w = 0; w < kThreads / 32; ++w) total += warp_sums[w];
  return total;
}

// out[o][k0 + k] += sum_t g(o, t) src[t][k] for the tile's kTile outputs o, where g(o, t) is gs[o][t] for dx
// (transpose == false) and gs[t][o] for dy. src (kTile, kChunk) is the staged feature slice.
template <typename acc_t, int kTile, bool transpose>
__device__ void add_gradient_slice(const acc_t (*gs)[kTile + 1], const acc_t (*src)[kChunk + 1], int64_t o0,
                                   int64_t outputs, int64_t d, int64_t k0, acc_t* __restrict__ out) {
  constexpr int kMicro = kTile / kSide, kCols = kChunk / kSide;
  // Thread (ty, tx) owns outputs ty*kMicro + i and feature columns tx + kSide*jj of the slice.
  acc_t v[kMicro][kCols];
#pragma unroll
  for (int i = 0; i < kMicro; ++i)
#pragma unroll
    for (int jj = 0; jj < kCols; ++jj) v[i][jj] = acc_t(0);
  for (int t = 0; t < kTile; ++t) {
    acc_t sv[kCols];
#pragma unroll
    for (int jj = 0; jj < kCols; ++jj) sv[jj] = src[t][threadIdx.x + kSide * jj];
#pragma unroll
    for (int i = 0; i < kMicro; ++i) {
      const int o = threadIdx.y * kMicro + i;
      const acc_t g = transpose ? gs[t][o] : gs[o][t];
#pragma unroll
      for (int jj = 0; jj < kCols; ++jj) v[i][jj] += g * sv[jj];
    }
  }
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t o = o0 + threadIdx.y * kMicro + i;
#pragma unroll
    for (int jj = 0; jj < kCols; ++jj) {
      const int64_t k = k0 + threadIdx.x + kSide * jj;
      if (o < outputs && k < d) atomicAdd(out + o * d + k, v[i][jj]);
    }
  }
}

// Stages src[row0 + t][k0 + k] (rows past `rows`, columns past d read zero) into cs (kTile, kChunk).
template <typename scalar_t, typename acc_t, int kTile>
__device__ void stage_slice(const scalar_t* __restrict__ src, int64_t row0, int64_t rows, int64_t d, int64_t k0,
                            acc_t (*cs)[kChunk + 1]) {
  const int tid = threadIdx.y * kSide + threadIdx.x;
  for (int e = tid; e < kTile * kChunk; e += kThreads) {
    const int t = e / kChunk, k = e % kChunk;
    cs[t][k] = (row0 + t < rows && k0 + k < d) ? static_cast<acc_t>(src[(row0 + t) * d + k0 + k]) : acc_t(0);
  }
}

// Grid (column tiles, row tiles). G = exp(scale*cos - lse_r) - b_r - a_r [c == row_offset + r] on the tile;
// dx (n, d) += G y_tile, dy (N, d) += G^T x_tile, ds_partial[block] = sum(G * cos).
template <typename scalar_t, int kTile>
__global__ void __launch_bounds__(kThreads)
    grads_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t n, int64_t N, int64_t d,
                 const at::acc_type<scalar_t, true>* __restrict__ scale_ptr, int64_t row_offset,
                 const at::acc_type<scalar_t, true>* __restrict__ lse,
                 const at::acc_type<scalar_t, true>* __restrict__ a,
                 const at::acc_type<scalar_t, true>* __restrict__ b, at::acc_type<scalar_t, true>* __restrict__ dx,
                 at::acc_type<scalar_t, true>* __restrict__ dy, at::acc_type<scalar_t, true>* __restrict__ ds_partial) {
  using acc_t = at::acc_type<scalar_t, true>;
  constexpr int kMicro = kTile / kSide;
  __shared__ acc_t xs[kDepth][kTile + 1];
  __shared__ acc_t ys[kDepth][kTile + 1];
  __shared__ acc_t gs[kTile][kTile + 1];
  __shared__ acc_t cs[kTile][kChunk + 1];
  __shared__ acc_t warp_sums[kThreads / 32];
  const acc_t scale = *scale_ptr;
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kTile;

  acc_t acc[kMicro][kMicro];
  tile_product<scalar_t, acc_t, kTile>(x, y, n, N, d, r0, c0, xs, ys, acc);
  acc_t ds = acc_t(0);
#pragma unroll
  for (int i = 0; i < kMicro; ++i) {
    const int64_t r = r0 + threadIdx.y * kMicro + i;
#pragma unroll
    for (int j = 0; j < kMicro; ++j) {
      const int64_t c = c0 + threadIdx.x * kMicro + j;
      acc_t g = acc_t(0);  // padding rows / columns contribute nothing
      if (r < n && c < N) {
        g = ::exp(scale * acc[i][j] - lse[r]) - b[r] - (c == row_offset + r ? a[r] : acc_t(0));
        ds += g * acc[i][j];
      }
      gs[threadIdx.y * kMicro + i][threadIdx.x * kMicro + j] = g;
    }
  }
  const acc_t block_ds = block_sum(ds, warp_sums);  // its __syncthreads also publishes gs
  if (threadIdx.x == 0 && threadIdx.y == 0) ds_partial[blockIdx.y * gridDim.x + blockIdx.x] = block_ds;

  for (int64_t k0 = 0; k0 < d; k0 += kChunk) {
    stage_slice<scalar_t, acc_t, kTile>(y, c0, N, d, k0, cs);
    __syncthreads();
    add_gradient_slice<acc_t, kTile, false>(gs, cs, r0, n, d, k0, dx);
    __syncthreads();
    stage_slice<scalar_t, acc_t, kTile>(x, r0, n, d, k0, cs);
    __syncthreads();
    add_gradient_slice<acc_t, kTile, true>(gs, cs, c0, N, d, k0, dy);
    __syncthreads();
  }
}

// dx (n, d), dy (N, d) accumulate G y and G^T x (without the factor scale); returns sum(G * cos) on device.
template <typename scalar_t>
at::Tensor direction_grads(const at::Tensor& x, const at::Tensor& y, const at::Tensor& scale, int64_t row_offset,
                           const at::Tensor& lse, const at::Tensor& a, const at::Tensor& b, at::Tensor& dx,
                           at::Tensor& dy) {
  using acc_t = at::acc_type<scalar_t, true>;
  constexpr int kTile = tile_side<scalar_t>();
  const int64_t n = x.size(0), N = y.size(0), d = x.size(1);
  const int64_t row_tiles = (n + kTile - 1) / kTile, col_tiles = (N + kTile - 1) / kTile;
  TORCH_CHECK(row_tiles <= 65535, "img_local has ", n, " rows; the CUDA kernel supports at most ", 65535 * kTile);
  at::Tensor ds_partial = at::empty({row_tiles * col_tiles}, dx.options());
  grads_kernel<scalar_t, kTile><<<dim3(col_tiles, row_tiles), dim3(kSide, kSide), 0,
                                  c10::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<scalar_t>(), y.const_data_ptr<scalar_t>(), n, N, d, scale.const_data_ptr<acc_t>(),
      row_offset, lse.const_data_ptr<acc_t>(), a.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(),
      dx.data_ptr<acc_t>(), dy.data_ptr<acc_t>(), ds_partial.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ds_partial.sum();
}

at::ScalarType acc_dtype(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace

at::Tensor stats_cuda(const Features& f, const at::Tensor& scale) {
  const c10::cuda::CUDAGuard guard(f.img_local.device());
  const int64_t n = f.img_local.size(0);
  const at::TensorOptions acc = f.img_local.options().dtype(acc_dtype(f.img_local));
  const at::Tensor s = scale.reshape({}).to(acc);
  at::Tensor out = empty_output({2, 3, n}, acc);  // (2, 3, n) [i2t, t2i] x [lse, pos, rowsum]
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.img_local.scalar_type(), "nlip_stats_cuda", [&] {
    direction_stats<scalar_t>(f.img_local, f.txt_all, s, f.row_offset, out[0]);
    direction_stats<scalar_t>(f.txt_local, f.img_all, s, f.row_offset, out[1]);
  });
  return out;
}

// The symmetric flag needs no special case here: both directions run as in the general case and autograd
// adds the *_all gradients to the *_local ones, which are the same tensors.
Grads grads_cuda(const Features& f, const at::Tensor& scale, const at::Tensor& lse, const at::Tensor& a,
                 const at::Tensor& b, const at::Tensor& weight) {
  const c10::cuda::CUDAGuard guard(f.img_local.device());
  const at::TensorOptions acc = f.img_local.options().dtype(acc_dtype(f.img_local));
  const at::Tensor s = scale.reshape({}).to(acc);
  at::Tensor dvl = at::zeros(f.img_local.sizes(), acc), dtl = at::zeros(f.txt_local.sizes(), acc);
  at::Tensor dva = at::zeros(f.img_all.sizes(), acc), dta = at::zeros(f.txt_all.sizes(), acc);
  at::Tensor ds;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f.img_local.scalar_type(), "nlip_grads_cuda", [&] {
    ds = direction_grads<scalar_t>(f.img_local, f.txt_all, s, f.row_offset, lse[0], a, b, dvl, dta) +
         direction_grads<scalar_t>(f.txt_local, f.img_all, s, f.row_offset, lse[1], a, b, dtl, dva);
  });
  // The kernels accumulated G y and G^T x; the feature gradients are scale * weight times those.
  const at::Tensor factor = s * weight.reshape({}).to(acc);
  const auto finish = [&](at::Tensor& g, const at::Tensor& like) { return g.mul_(factor).to(like.scalar_type()); };
  return {finish(dvl, f.img_local), finish(dtl, f.txt_local), finish(dva, f.img_all), finish(dta, f.txt_all),
          ds * weight.reshape({}).to(acc)};
}

}  // namespace nlip
