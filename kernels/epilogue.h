// Per-element math of the fused contrastive loss, written once for the CPU loops and the CUDA epilogue kernels.
//
// Every function here is `__host__ __device__` under nvcc and a plain (forced) inline function in the C++ build,
// so the CPU tests run the same formulas as the GPU. The only per-side difference is exp(): the CPU takes a
// polynomial float exp that GCC vectorizes (about 1 ulp), the GPU its libdevice expf; doubles use exp() on both.
// Notation as in contrastive.h: cosines c = x_i . y_j of a tile, logits scale * c, per-row lse, soft targets
// q_ij = a_i [j == g_i] + b_i.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define NLIP_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define NLIP_HD inline __attribute__((always_inline))
#else
#define NLIP_HD inline
#endif

namespace nlip {
namespace epi {

// exp() for float that GCC vectorizes inside `omp simd` loops (std::exp is an opaque libm call). Cody-Waite
// reduction x = k ln2 + r with k rounded by the 1.5 * 2^23 trick, Cephes' degree-6 polynomial on |r| <= ln2/2,
// then 2^k through the exponent bits. Results below FLT_MIN flush to zero: the terms summed here are relative to
// a maximum of about 1.
NLIP_HD float poly_exp(float x) {
  const float c = x < 88.3762626647949f ? (x > -87.33654475f ? x : -87.33654475f) : 88.3762626647949f;
  const float k = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (c - k * 0.693359375f) + k * 2.12194440e-4f;
  const float p = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r + 4.1665795894e-2f) *
                        r + 1.6666665459e-1f) * r + 5.0000001201e-1f) * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  __builtin_memcpy(&two_k, &bits, sizeof two_k);
  return x < -87.33654475f ? 0.0f : p * two_k;
}

NLIP_HD float exp_(float x) {
#if defined(__CUDA_ARCH__)
  return ::expf(x);
#else
  return poly_exp(x);
#endif
}
NLIP_HD double exp_(double x) { return ::exp(x); }

// By value: std::max binds references, and a reference to a temporary blocks vectorization.
template <typename T>
NLIP_HD T max_(T a, T b) { return a > b ? a : b; }

template <typename T>
NLIP_HD T neg_inf() { return -std::numeric_limits<T>::infinity(); }

// Online log-sum-exp: (m, l) is a set's (max, sum of exp(x - max)); merging (m2, l2) gives the union's pair.
// An empty set is (-inf, 0). A NaN anywhere makes l NaN, so the lse m + log l stays NaN.
template <typename T>
NLIP_HD void lse_merge(T& m, T& l, T m2, T l2) {
  const T mx = max_(m, m2);
  if (mx == neg_inf<T>()) return;  // both empty
  l = l * exp_(m - mx) + l2 * exp_(m2 - mx);
  m = mx;
}

// The same for one more element x of the set.
template <typename T>
NLIP_HD void lse_push(T& m, T& l, T x) {
  if (x > m) {
    l = l * exp_(m - x) + T(1);
    m = x;
  } else {
    l += exp_(x - m);
  }
}

// Column (inside a tile starting at column c0, of width cb) of local row r's positive g_r = row_offset + r, or -1.
NLIP_HD int64_t positive_column(int64_t row_offset, int64_t r, int64_t c0, int64_t cb) {
  const int64_t target = row_offset + r - c0;
  return target >= 0 && target < cb ? target : -1;
}

// Softmax probability of a logit against its row's log-sum-exp: exp(scale * c - lse). Handed lse - log m, it is
// m times the probability (contrastive.py's mass shift).
template <typename T>
NLIP_HD T scaled_exp(T c, T scale, T lse) { return exp_(scale * c - lse); }

// One element of the logit gradient G = P - Q away from the positive: p_ij - b_i.
template <typename T>
NLIP_HD T grad_entry(T c, T scale, T lse, T b) { return scaled_exp(c, scale, lse) - b; }

// The same when the tile also carries the t2i direction as its columns (one process, B = A^T): the column's
// softmax term p_ji - b_j is added.
template <typename T>
NLIP_HD T grad_entry_symmetric(T c, T scale, T lse, T b, T col_lse, T col_b) {
  return scaled_exp(c, scale, lse) - b + scaled_exp(c, scale, col_lse) - col_b;
}

// What the positive element subtracts from G: a_i, twice in the shared tile (the positive of row and column).
template <typename T>
NLIP_HD T positive_weight(T a, bool symmetric) { return symmetric ? T(2) * a : a; }

}  // namespace epi
}  // namespace nlip
