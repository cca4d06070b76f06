// CPU epilogues of the fused contrastive loss (tile driver: tiles.h; per-element math: epilogue.h).
//
// Tiles of 256 x 512 logits: one single-threaded ATen GEMM (MKL / oneDNN) writes a tile's cosines, then
// vectorized loops run exp and the reductions over it while it is still in the core's L2. Threads work on
// disjoint (row group, column group) pairs (for_each_task), so per-row and per-column accumulators need neither
// atomics nor per-thread copies, and the per-task partial sums of d/d scale are added in a fixed order.
//
// Half-precision inputs are computed in float32 on a float32 copy of the features (the CPU is not a
// half-precision target); float32 and float64 run natively, float64 mainly so tests can gradcheck the kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "contrastive.h"
#include "epilogue.h"
#include "tiles.h"

// Hot loops get AVX-512 and AVX2 clones picked at load time, so one binary runs fast on any x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NLIP_VECTORIZE __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NLIP_VECTORIZE
#endif

namespace nlip {
namespace {

using tiles::GradTerms;
using tiles::Range;
using tiles::Running;

// 512 KiB in float32: small enough to stay in L2 while the epilogue runs over it, large enough that the
// single-threaded GEMM producing it runs near peak.
constexpr TileShape kDefaultTile{256, 512};

// Max, sum of exp(x - max) and sum of x = scale * row over one tile row.
template <typename T>
NLIP_VECTORIZE void row_reduce(const T* row, int64_t cb, T scale, T* out_max, T* out_sumexp, T* out_sum) {
  T m = epi::neg_inf<T>(), total = 0, e = 0;
#pragma omp simd reduction(max : m) reduction(+ : total)
  for (int64_t j = 0; j < cb; ++j) {
    m = epi::max_(m, scale * row[j]);
    total += scale * row[j];
  }
#pragma omp simd reduction(+ : e)
  for (int64_t j = 0; j < cb; ++j) e += epi::scaled_exp(row[j], scale, m);
  *out_max = m;
  *out_sumexp = e;
  *out_sum = total;
}

// The same reductions down the columns of a (rb, cb) tile, into cm / ce / cs (cb,).
template <typename T>
NLIP_VECTORIZE void column_reduce(const T* __restrict__ s, int64_t rb, int64_t cb, T scale, T* __restrict__ cm,
                                  T* __restrict__ ce, T* __restrict__ cs) {
  std::fill(cm, cm + cb, epi::neg_inf<T>());
  std::fill(ce, ce + cb, T(0));
  std::fill(cs, cs + cb, T(0));
  for (int64_t i = 0; i < rb; ++i) {
    const T* row = s + i * cb;
#pragma omp simd
    for (int64_t j = 0; j < cb; ++j) {
      cm[j] = epi::max_(cm[j], scale * row[j]);
      cs[j] += scale * row[j];
    }
  }
  for (int64_t i = 0; i < rb; ++i) {
    const T* row = s + i * cb;
#pragma omp simd
    for (int64_t j = 0; j < cb; ++j) ce[j] += epi::scaled_exp(row[j], scale, cm[j]);
  }
}

// In place: row -> G = p - b (plus the column term in the shared tile); returns sum(G * cosine) for d/d scale.
template <typename T>
NLIP_VECTORIZE T row_gradient(T* row, int64_t cb, T scale, T lse, T b) {
  T ds = 0;
#pragma omp simd reduction(+ : ds)
  for (int64_t j = 0; j < cb; ++j) {
    const T g = epi::grad_entry(row[j], scale, lse, b);
    ds += g * row[j];
    row[j] = g;
  }
  return ds;
}

template <typename T>
NLIP_VECTORIZE T row_gradient_symmetric(T* row, int64_t cb, T scale, T lse, T b, const T* col_lse, const T* col_b) {
  T ds = 0;
#pragma omp simd reduction(+ : ds)
  for (int64_t j = 0; j < cb; ++j) {
    const T g = epi::grad_entry_symmetric(row[j], scale, lse, b, col_lse[j], col_b[j]);
    ds += g * row[j];
    row[j] = g;
  }
  return ds;
}

int64_t num_threads(int64_t rows, int64_t cols) {
  return std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), rows, cols}));
}

template <typename T>
struct CpuEpilogue {
  using acc_t = T;
  T scale;
  std::vector<T> ds;  // per-task partial sums of G * cosines

  at::Tensor compute(const at::Tensor& t) const {
    return t.scalar_type() == at::kDouble ? t : t.to(at::kFloat);
  }

  // fn(rows, cols, task) for every pair of P row groups x P column groups, in P rounds of P concurrent tasks
  // where task t takes row group t and column group (t + round) % P: concurrent tasks never share a row or a
  // column.
  template <typename F>
  void for_each_task(int64_t rows, int64_t cols, const F& fn) {
    const int64_t P = num_threads(rows, cols);
    if (ds.size() < static_cast<size_t>(P * P)) ds.resize(P * P, T(0));
    for (int64_t round = 0; round < P; ++round) {
      at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t)
          fn(tiles::part(rows, P, t), tiles::part(cols, P, (t + round) % P), round * P + t);
      });
    }
  }

  void row_stats(const at::Tensor& tile, int64_t r0, int64_t c0, int64_t row_offset, const Running<T>& rows) const {
    const int64_t rb = tile.size(0), cb = tile.size(1);
    const T* s = tile.const_data_ptr<T>();
    for (int64_t i = 0; i < rb; ++i) {
      T m, e, total;
      row_reduce(s + i * cb, cb, scale, &m, &e, &total);
      const int64_t r = r0 + i;
      epi::lse_merge(rows.max[r], rows.sumexp[r], m, e);
      rows.sum[r] += total;
      const int64_t target = epi::positive_column(row_offset, r, c0, cb);
      if (target >= 0) rows.pos[r] = scale * s[i * cb + target];
    }
  }

  void col_stats(const at::Tensor& tile, int64_t, int64_t c0, const Running<T>& cols) const {
    const int64_t rb = tile.size(0), cb = tile.size(1);
    std::vector<T> scratch(3 * cb);
    T *cm = scratch.data(), *ce = cm + cb, *cs = cm + 2 * cb;
    column_reduce(tile.const_data_ptr<T>(), rb, cb, scale, cm, ce, cs);
    for (int64_t j = 0; j < cb; ++j) {
      epi::lse_merge(cols.max[c0 + j], cols.sumexp[c0 + j], cm[j], ce[j]);
      cols.sum[c0 + j] += cs[j];
    }
  }

  at::Tensor grad_tile(at::Tensor& tile, int64_t r0, int64_t c0, const GradTerms<T>& g, int64_t task) {
    const int64_t rb = tile.size(0), cb = tile.size(1);
    const bool symmetric = g.col_lse != nullptr;
    T* s = tile.data_ptr<T>();
    T sum = 0;
    for (int64_t i = 0; i < rb; ++i) {
      const int64_t r = r0 + i, target = epi::positive_column(g.row_offset, r, c0, cb);
      const T cos_target = target >= 0 ? s[i * cb + target] : T(0);
      T* row = s + i * cb;
      sum += symmetric ? row_gradient_symmetric(row, cb, scale, g.row_lse[r], g.b[r], g.col_lse + c0, g.col_b + c0)
                       : row_gradient(row, cb, scale, g.row_lse[r], g.b[r]);
      if (target >= 0) {
        const T a = epi::positive_weight(g.a[r], symmetric);
        row[target] -= a;
        sum -= a * cos_target;
      }
    }
    ds[task] += sum;
    return tile;
  }

  at::Tensor d_scale() const {
    T total = 0;
    for (T v : ds) total += v;
    return at::scalar_tensor(total, at::CPU(c10::CppTypeToScalarType<T>::value));
  }
};

template <typename T>
CpuEpilogue<T> epilogue(const at::Tensor& scale) {
  return CpuEpilogue<T>{scale.item<T>(), {}};
}

}  // namespace

at::Tensor stats_cpu(const Features& f, const at::Tensor& scale) {
  if (f.img_local.scalar_type() == at::kDouble) {
    auto e = epilogue<double>(scale);
    return tiles::stats(e, f, tile_or(kDefaultTile));
  }
  auto e = epilogue<float>(scale);
  return tiles::stats(e, f, tile_or(kDefaultTile));
}

Grads grads_cpu(const Features& f, const at::Tensor& scale, const at::Tensor& lse, const at::Tensor& a,
                const at::Tensor& b, const at::Tensor& weight) {
  if (f.img_local.scalar_type() == at::kDouble) {
    auto e = epilogue<double>(scale);
    return tiles::grads(e, f, scale, lse, a, b, weight, tile_or(kDefaultTile));
  }
  auto e = epilogue<float>(scale);
  return tiles::grads(e, f, scale, lse, a, b, weight, tile_or(kDefaultTile));
}

}  // namespace nlip
