// CPU implementation of the fused contrastive loss (see contrastive.h for the notation).
//
// The logit matrix is visited in blocks of kBlockRows x kBlockCols: one ATen GEMM (MKL / oneDNN) writes the
// block's cosines, then fused loops run exp and the reductions over it while it is still in the core's L2.
// Threads work on disjoint (row group, column group) pairs (for_each_group_pair), so per-row and per-column
// accumulators need neither atomics nor per-thread copies. Extra memory: one block per thread plus O(n + N).
//
// Half-precision inputs are computed in float32 on a float32 copy of the features (the CPU is not a
// half-precision target); float32 and float64 run natively, float64 mainly so tests can gradcheck the kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "contrastive.h"

// Hot loops get AVX-512 and AVX2 clones picked at load time, so one binary runs fast on any x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NLIP_VECTORIZE __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define NLIP_INLINE inline __attribute__((always_inline))
#else
#define NLIP_VECTORIZE
#define NLIP_INLINE inline
#endif

namespace nlip {
namespace {

// One logit block: 512 KiB in float32, small enough to stay in L2 while the fused passes run over it, large
// enough that the single-threaded GEMM producing it runs near peak.
constexpr int64_t kBlockRows = 256;
constexpr int64_t kBlockCols = 512;

// exp() for float that GCC vectorizes inside `omp simd` loops (std::exp is an opaque libm call, std::floor does
// not vectorize without -ffast-math). Cody-Waite reduction x = k ln2 + r with k rounded by the 1.5 * 2^23 trick,
// Cephes' degree-6 polynomial on |r| <= ln2/2 (about 1 ulp), then 2^k through the exponent bits. Results below
// FLT_MIN flush to zero: the terms summed here are relative to a maximum of about 1.
NLIP_INLINE float fast_exp(float x) {
  const float c = x < 88.3762626647949f ? (x > -87.33654475f ? x : -87.33654475f) : 88.3762626647949f;
  const float k = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (c - k * 0.693359375f) + k * 2.12194440e-4f;
  const float p = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) *
                        r + 1.6666665459e-1f) * r + 5.0000001201e-1f) * (r * r) + r + 1.0f;
  const float two_k = __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);
  return x < -87.33654475f ? 0.0f : p * two_k;
}

// Forced inline: a call inside an `omp simd` loop would keep the loop scalar.
NLIP_INLINE float exp_(float x) { return fast_exp(x); }
NLIP_INLINE double exp_(double x) { return std::exp(x); }
// By value: std::max binds references, and a reference to a temporary blocks vectorization.
template <typename T>
NLIP_INLINE T max_(T a, T b) { return a > b ? a : b; }

struct Range {
  int64_t begin, end;
};

Range part(int64_t total, int64_t parts, int64_t i) { return {total * i / parts, total * (i + 1) / parts}; }

// Calls fn(rows, cols, task) for every pair of T row groups x T column groups, in T rounds of T concurrent tasks
// where task t takes row group t and column group (t + round) % T: concurrent tasks never share a row or a
// column. `task` in [0, T*T) names the pair, for per-task partial sums reduced in a fixed order afterwards.
template <typename F>
void for_each_group_pair(int64_t rows, int64_t cols, const F& fn) {
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), rows, cols}));
  for (int64_t round = 0; round < T; ++round) {
    at::parallel_for(0, T, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) fn(part(rows, T, t), part(cols, T, (t + round) % T), round * T + t);
    });
  }
}

int64_t num_group_pairs(int64_t rows, int64_t cols) {
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>({at::get_num_threads(), rows, cols}));
  return T * T;
}

// Hands fn(s, r0, c0) every block s = x[r0:r0+rb] y[c0:c0+cb]^T (rb, cb) of the unscaled cosines in a group
// pair, written into `buffer`. x (n, d), y (N, d).
template <typename F>
void for_each_block(const at::Tensor& x, const at::Tensor& y, Range rows, Range cols, const F& fn) {
  at::Tensor buffer = at::empty({kBlockRows * kBlockCols}, x.options());
  for (int64_t r0 = rows.begin; r0 < rows.end; r0 += kBlockRows) {
    const int64_t rb = std::min(kBlockRows, rows.end - r0);
    const at::Tensor xb = x.narrow(0, r0, rb);
    for (int64_t c0 = cols.begin; c0 < cols.end; c0 += kBlockCols) {
      const int64_t cb = std::min(kBlockCols, cols.end - c0);
      at::Tensor s = buffer.narrow(0, 0, rb * cb).view({rb, cb});
      at::mm_out(s, xb, y.narrow(0, c0, cb).t());
      fn(s, r0, c0);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Forward: online log-sum-exp, positive logit and logit sum per row (and per column in the symmetric case).

// Running statistics of one direction; lse holds the running maximum until finish() turns it into the lse.
template <typename T>
struct Running {
  T* lse;
  T* sumexp;
  T* pos;
  T* sum;

  void merge(int64_t i, T block_max, T block_sumexp, T block_sum) {
    const T m = std::max(lse[i], block_max);
    sumexp[i] = sumexp[i] * std::exp(lse[i] - m) + block_sumexp * std::exp(block_max - m);
    lse[i] = m;
    sum[i] += block_sum;
  }
};

// Max, sum of exp(x - max) and sum of x = scale * row over one block row.
template <typename T>
NLIP_VECTORIZE void row_reduce(const T* row, int64_t cb, T scale, T* out_max, T* out_sumexp, T* out_sum) {
  T m = -std::numeric_limits<T>::infinity(), total = 0, e = 0;
#pragma omp simd reduction(max : m) reduction(+ : total)
  for (int64_t j = 0; j < cb; ++j) {
    m = max_(m, scale * row[j]);
    total += scale * row[j];
  }
#pragma omp simd reduction(+ : e)
  for (int64_t j = 0; j < cb; ++j) e += exp_(scale * row[j] - m);
  *out_max = m;
  *out_sumexp = e;
  *out_sum = total;
}

// The same reductions down the columns of a (rb, cb) block, into cm / ce / cs (cb,).
template <typename T>
NLIP_VECTORIZE void column_reduce(const T* __restrict__ s, int64_t rb, int64_t cb, T scale, T* __restrict__ cm,
                                  T* __restrict__ ce, T* __restrict__ cs) {
  std::fill(cm, cm + cb, -std::numeric_limits<T>::infinity());
  std::fill(ce, ce + cb, T(0));
  std::fill(cs, cs + cb, T(0));
  for (int64_t i = 0; i < rb; ++i) {
    const T* row = s + i * cb;
#pragma omp simd
    for (int64_t j = 0; j < cb; ++j) {
      cm[j] = max_(cm[j], scale * row[j]);
      cs[j] += scale * row[j];
    }
  }
  for (int64_t i = 0; i < rb; ++i) {
    const T* row = s + i * cb;
#pragma omp simd
    for (int64_t j = 0; j < cb; ++j) ce[j] += exp_(scale * row[j] - cm[j]);
  }
}

template <typename T>
void stats_block(const at::Tensor& block, int64_t r0, int64_t c0, T scale, int64_t row_offset, Running<T> rows,
                 Running<T>* cols, T* scratch) {
  const int64_t rb = block.size(0), cb = block.size(1);
  const T* s = block.const_data_ptr<T>();
  for (int64_t i = 0; i < rb; ++i) {
    T m, e, total;
    row_reduce(s + i * cb, cb, scale, &m, &e, &total);
    rows.merge(r0 + i, m, e, total);
    const int64_t target = row_offset + r0 + i - c0;  // the positive's column inside this block
    if (target >= 0 && target < cb) rows.pos[r0 + i] = scale * s[i * cb + target];
  }
  if (cols == nullptr) return;
  T *cm = scratch, *ce = scratch + cb, *cs = scratch + 2 * cb;
  column_reduce(s, rb, cb, scale, cm, ce, cs);
  for (int64_t j = 0; j < cb; ++j) cols->merge(c0 + j, cm[j], ce[j], cs[j]);
}

// out (3, rows) = [running max | sumexp | pos | sum] views; initializes the accumulators.
template <typename T>
Running<T> start_running(at::Tensor out, at::Tensor sumexp) {
  out[kLse].fill_(-std::numeric_limits<T>::infinity());
  out[kRowSum].zero_();
  sumexp.zero_();
  return {out[kLse].data_ptr<T>(), sumexp.data_ptr<T>(), out[kPos].data_ptr<T>(), out[kRowSum].data_ptr<T>()};
}

// lse = max + log(sumexp), in place over the running maximum.
template <typename T>
void finish(at::Tensor out, const at::Tensor& sumexp) {
  out[kLse].add_(sumexp.log());
}

// Statistics (3, n) of the rows of scale * x y^T, and with `cols` of its columns too (n == N there).
template <typename T>
void direction_stats(const at::Tensor& x, const at::Tensor& y, T scale, int64_t row_offset, at::Tensor out,
                     at::Tensor col_out) {
  const int64_t n = x.size(0), N = y.size(0);
  at::Tensor row_sumexp = at::empty({n}, x.options()), col_sumexp = at::empty({N}, x.options());
  Running<T> rows = start_running<T>(out, row_sumexp);
  Running<T> cols{};
  if (col_out.defined()) cols = start_running<T>(col_out, col_sumexp);
  Running<T>* cols_ptr = col_out.defined() ? &cols : nullptr;
  for_each_group_pair(n, N, [&](Range rg, Range cg, int64_t) {
    std::vector<T> scratch(cols_ptr ? 3 * kBlockCols : 0);
    for_each_block(x, y, rg, cg, [&](const at::Tensor& s, int64_t r0, int64_t c0) {
      stats_block<T>(s, r0, c0, scale, row_offset, rows, cols_ptr, scratch.data());
    });
  });
  finish<T>(out, row_sumexp);
  if (col_out.defined()) finish<T>(col_out, col_sumexp);
}

// ---------------------------------------------------------------------------------------------------------
// Backward: each block of cosines becomes its block of G = P - Q (the logit gradient up to the factor weight),
// then dx += G y_block and dy += G^T x_block. The factor scale * weight is applied once at the end.

// What turns a cosine block into its gradient block. col_lse is set only in the symmetric case, where the
// same block also carries the t2i direction (column softmax, soft targets of the column's sample).
template <typename T>
struct GradTerms {
  T scale;
  int64_t row_offset;
  const T* row_lse;
  const T* a;
  const T* b;
  const T* col_lse;
};

// In place: row -> exp(scale*row - lse) - b; returns sum(G * cosine) for d/d scale.
template <typename T>
NLIP_VECTORIZE T row_gradient(T* row, int64_t cb, T scale, T lse, T b) {
  T ds = 0;
#pragma omp simd reduction(+ : ds)
  for (int64_t j = 0; j < cb; ++j) {
    const T g = exp_(scale * row[j] - lse) - b;
    ds += g * row[j];
    row[j] = g;
  }
  return ds;
}

// As row_gradient plus the column-softmax term of the t2i direction; col_lse, col_b (cb,) for this block.
template <typename T>
NLIP_VECTORIZE T row_gradient_symmetric(T* row, int64_t cb, T scale, T lse, T b, const T* col_lse, const T* col_b) {
  T ds = 0;
#pragma omp simd reduction(+ : ds)
  for (int64_t j = 0; j < cb; ++j) {
    const T g = exp_(scale * row[j] - lse) - b + exp_(scale * row[j] - col_lse[j]) - col_b[j];
    ds += g * row[j];
    row[j] = g;
  }
  return ds;
}

template <typename T>
T gradient_block(at::Tensor& block, int64_t r0, int64_t c0, const GradTerms<T>& g) {
  const int64_t rb = block.size(0), cb = block.size(1);
  T* s = block.data_ptr<T>();
  T ds = 0;
  for (int64_t i = 0; i < rb; ++i) {
    const int64_t r = r0 + i, target = g.row_offset + r - c0;  // the positive's column inside this block
    const bool has_target = target >= 0 && target < cb;
    const T cos_target = has_target ? s[i * cb + target] : T(0);
    T* row = s + i * cb;
    ds += g.col_lse ? row_gradient_symmetric(row, cb, g.scale, g.row_lse[r], g.b[r], g.col_lse + c0, g.b + c0)
                    : row_gradient(row, cb, g.scale, g.row_lse[r], g.b[r]);
    if (has_target) {
      // Symmetric: the diagonal element is the positive of row r and of column r, both with weight a[r].
      const T a = g.col_lse ? 2 * g.a[r] : g.a[r];
      row[target] -= a;
      ds -= a * cos_target;
    }
  }
  return ds;
}

// dx (n, d) and dy (N, d) accumulate G y and G^T x (without the factor scale); returns sum(G * cosines).
template <typename T>
T direction_grads(const at::Tensor& x, const at::Tensor& y, const GradTerms<T>& terms, at::Tensor& dx,
                  at::Tensor& dy) {
  const int64_t n = x.size(0), N = y.size(0);
  std::vector<T> ds(num_group_pairs(n, N), T(0));
  for_each_group_pair(n, N, [&](Range rg, Range cg, int64_t task) {
    for_each_block(x, y, rg, cg, [&](at::Tensor& s, int64_t r0, int64_t c0) {
      ds[task] += gradient_block<T>(s, r0, c0, terms);
      const int64_t rb = s.size(0), cb = s.size(1);
      dx.narrow(0, r0, rb).addmm_(s, y.narrow(0, c0, cb));
      dy.narrow(0, c0, cb).addmm_(s.t(), x.narrow(0, r0, rb));
    });
  });
  T total = 0;
  for (T v : ds) total += v;
  return total;
}

// ---------------------------------------------------------------------------------------------------------
// Entry points: both directions, in the accumulation dtype.

at::Tensor as_compute(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? t : t.to(at::kFloat); }

template <typename T>
at::Tensor stats_impl(const Features& f, T scale) {
  const at::Tensor vl = as_compute(f.img_local), tl = as_compute(f.txt_local);
  at::Tensor out = empty_output({2, 3, vl.size(0)}, vl.options());  // (2, 3, n)
  if (f.symmetric) {
    // Column j of scale * v t^T is the t2i row of sample j: one pass fills both directions.
    direction_stats<T>(vl, tl, scale, 0, out[0], out[1]);
    out[1][kPos].copy_(out[0][kPos]);  // the diagonal is the positive of both
    return out;
  }
  direction_stats<T>(vl, as_compute(f.txt_all), scale, f.row_offset, out[0], at::Tensor());
  direction_stats<T>(tl, as_compute(f.img_all), scale, f.row_offset, out[1], at::Tensor());
  return out;
}

template <typename T>
Grads grads_impl(const Features& f, T scale, const at::Tensor& lse, const at::Tensor& a, const at::Tensor& b,
                 T weight) {
  const at::Tensor vl = as_compute(f.img_local), tl = as_compute(f.txt_local);
  const T* A = a.const_data_ptr<T>();
  const T* B = b.const_data_ptr<T>();
  const T* lse_i2t = lse[0].const_data_ptr<T>();
  const T* lse_t2i = lse[1].const_data_ptr<T>();
  // The blocks accumulated G y and G^T x; the feature gradients are scale * weight times those.
  const auto finish_grad = [&](at::Tensor& g, const at::Tensor& like) {
    return g.mul_(scale * weight).to(like.scalar_type());
  };
  at::Tensor dvl = at::zeros_like(vl), dtl = at::zeros_like(tl);
  T ds;
  if (f.symmetric) {
    ds = direction_grads<T>(vl, tl, GradTerms<T>{scale, 0, lse_i2t, A, B, lse_t2i}, dvl, dtl);
    return {finish_grad(dvl, f.img_local), finish_grad(dtl, f.txt_local), at::Tensor(), at::Tensor(),
            at::full({}, ds * weight, lse.options())};
  }
  const at::Tensor va = as_compute(f.img_all), ta = as_compute(f.txt_all);
  at::Tensor dva = at::zeros_like(va), dta = at::zeros_like(ta);
  ds = direction_grads<T>(vl, ta, GradTerms<T>{scale, f.row_offset, lse_i2t, A, B, nullptr}, dvl, dta);
  ds += direction_grads<T>(tl, va, GradTerms<T>{scale, f.row_offset, lse_t2i, A, B, nullptr}, dtl, dva);
  return {finish_grad(dvl, f.img_local), finish_grad(dtl, f.txt_local), finish_grad(dva, f.img_all),
          finish_grad(dta, f.txt_all), at::full({}, ds * weight, lse.options())};
}

}  // namespace

at::Tensor stats_cpu(const Features& f, const at::Tensor& scale) {
  if (f.img_local.scalar_type() == at::kDouble) return stats_impl<double>(f, scale.item<double>());
  return stats_impl<float>(f, scale.item<float>());
}

Grads grads_cpu(const Features& f, const at::Tensor& scale, const at::Tensor& lse, const at::Tensor& a,
                const at::Tensor& b, const at::Tensor& weight) {
  if (f.img_local.scalar_type() == at::kDouble)
    return grads_impl<double>(f, scale.item<double>(), lse, a, b, weight.item<double>());
  return grads_impl<float>(f, scale.item<float>(), lse, a, b, weight.item<float>());
}

}  // namespace nlip
