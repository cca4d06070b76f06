// The tile driver of the fused contrastive loss, shared by the CPU and the CUDA extension.
//
// The (n, N) cosine matrix of each direction is visited tile by tile. Every tile product is an ATen GEMM
// (MKL / oneDNN on the CPU, cuBLAS on a GPU: bf16 / fp16 inputs on tensor cores with a float32 result; float32
// inputs follow torch's TF32 switch, off by default, so float32 stays float32), and every per-tile epilogue is
// handed to the device's `Epilogue` (contrastive_cpu.cpp: vectorized loops; contrastive_cuda.cu: small
// kernels), both built on the per-element functions of epilogue.h.
//
// Forward: the epilogue folds each tile into running per-row (and, in the shared tile, per-column) max, sum of
// exp and sum of logits, and picks the positive logit; lse = max + log(sumexp) at the end.
// Backward: the epilogue turns each recomputed tile into G = P - Q (and returns it in the GEMM dtype), then
// dx[rows] += G y[cols] and dy[cols] += G^T x[rows] are two more GEMMs, issued in a fixed order: no atomics,
// so the gradients are deterministic. Extra memory: O(n + N) statistics, one tile (and its G) per concurrent
// task, and float32 gradient accumulators for half inputs.
//
// An Epilogue E provides:
//   using acc_t                              accumulation type (float, or double for float64 inputs)
//   at::Tensor compute(t)                    the features in the GEMM dtype (the CPU computes halves in float)
//   for_each_task(rows, cols, fn)            calls fn(Range rows, Range cols, task id) over groups whose
//                                            concurrent calls share no row and no column
//   void row_stats(s, r0, c0, Running)       fold tile s (rb, cb) into the running row statistics
//   void col_stats(s, r0, c0, Running)       the same down the columns (shared tile only)
//   at::Tensor grad_tile(s, r0, c0, terms, task)  G of tile s, in the GEMM dtype; accumulates d/d scale
//   at::Tensor d_scale()                     sum over tiles of G * cosines, a 0-dim tensor on the device
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>

#include "contrastive.h"

namespace nlip {
namespace tiles {

struct Range {
  int64_t begin, end;
};

inline Range part(int64_t total, int64_t parts, int64_t i) {
  return {total * i / parts, total * (i + 1) / parts};
}

// Running statistics of one direction (device pointers); max holds the running maximum until finish() turns
// it into the lse.
template <typename T>
struct Running {
  T* max;
  T* sumexp;
  T* pos;
  T* sum;
};

// What turns a cosine tile into its gradient tile. col_lse / col_b are set only in the shared tile, where the
// same tile also carries the t2i direction (column softmax, soft targets of the column's sample).
template <typename T>
struct GradTerms {
  int64_t row_offset;
  const T* row_lse;
  const T* a;
  const T* b;
  const T* col_lse;
  const T* col_b;
};

// s = x y^T in float32 (float64 for double inputs), whatever the input dtype.
inline void tile_product(at::Tensor& s, const at::Tensor& x, const at::Tensor& y) {
  if (x.scalar_type() == s.scalar_type()) {
    at::mm_out(s, x, y.t());
  } else {
    at::mm_out(s, x, y.t(), s.scalar_type());  // half inputs, float32 result (cuBLAS: tensor cores)
  }
}

// acc (rows, d) += g (rows, k) y (k, d); acc in float32 (or float64), g and y in the GEMM dtype.
inline void add_product(at::Tensor acc, const at::Tensor& g, const at::Tensor& y) {
  if (g.scalar_type() == acc.scalar_type()) {
    acc.addmm_(g, y);
  } else {
    at::addmm_out(acc, acc, g, y, acc.scalar_type());
  }
}

// Calls fn(s, r0, c0) for every tile s = x[r0:r0+rb] y[c0:c0+cb]^T of a group pair, written into `buffer`.
template <typename F>
void for_each_tile(const at::Tensor& x, const at::Tensor& y, Range rows, Range cols, TileShape tile,
                   at::Tensor& buffer, const F& fn) {
  for (int64_t r0 = rows.begin; r0 < rows.end; r0 += tile.rows) {
    const int64_t rb = std::min(tile.rows, rows.end - r0);
    const at::Tensor xb = x.narrow(0, r0, rb);
    for (int64_t c0 = cols.begin; c0 < cols.end; c0 += tile.cols) {
      const int64_t cb = std::min(tile.cols, cols.end - c0);
      at::Tensor s = buffer.narrow(0, 0, rb * cb).view({rb, cb});
      tile_product(s, xb, y.narrow(0, c0, cb));
      fn(s, r0, c0);
    }
  }
}

// out (3, rows) [max -> lse | pos | sum] and sumexp (rows,) start as (-inf, -, 0, 0).
template <typename T>
Running<T> start_running(at::Tensor out, at::Tensor sumexp) {
  out[kLse].fill_(-std::numeric_limits<double>::infinity());
  out[kRowSum].zero_();
  sumexp.zero_();
  return {out[kLse].data_ptr<T>(), sumexp.data_ptr<T>(), out[kPos].data_ptr<T>(), out[kRowSum].data_ptr<T>()};
}

// Statistics (3, n) of the rows of scale * x y^T, and with col_out defined of its columns too (n == N there).
template <typename E>
void direction_stats(E& e, const at::Tensor& x, const at::Tensor& y, int64_t row_offset, TileShape tile,
                     at::Tensor out, at::Tensor col_out) {
  using T = typename E::acc_t;
  const int64_t n = x.size(0), N = y.size(0);
  const auto acc = out.options();
  at::Tensor row_sumexp = at::empty({n}, acc), col_sumexp = at::empty({N}, acc);
  const Running<T> rows = start_running<T>(out, row_sumexp);
  const Running<T> cols = col_out.defined() ? start_running<T>(col_out, col_sumexp) : Running<T>{};
  e.for_each_task(n, N, [&](Range rg, Range cg, int64_t) {
    at::Tensor buffer = at::empty({tile.rows * tile.cols}, acc);
    for_each_tile(x, y, rg, cg, tile, buffer, [&](const at::Tensor& s, int64_t r0, int64_t c0) {
      e.row_stats(s, r0, c0, row_offset, rows);
      if (col_out.defined()) e.col_stats(s, r0, c0, cols);
    });
  });
  out[kLse].add_(row_sumexp.log());
  if (col_out.defined()) col_out[kLse].add_(col_sumexp.log());
}

// dx (n, d) and dy (N, d) accumulate G y and G^T x (without the factor scale * weight).
template <typename E>
void direction_grads(E& e, const at::Tensor& x, const at::Tensor& y, const GradTerms<typename E::acc_t>& terms,
                     TileShape tile, at::Tensor& dx, at::Tensor& dy) {
  const int64_t n = x.size(0), N = y.size(0);
  e.for_each_task(n, N, [&](Range rg, Range cg, int64_t task) {
    at::Tensor buffer = at::empty({tile.rows * tile.cols}, dx.options());
    for_each_tile(x, y, rg, cg, tile, buffer, [&](at::Tensor& s, int64_t r0, int64_t c0) {
      const at::Tensor g = e.grad_tile(s, r0, c0, terms, task);  // (rb, cb) in the GEMM dtype
      const int64_t rb = s.size(0), cb = s.size(1);
      add_product(dx.narrow(0, r0, rb), g, y.narrow(0, c0, cb));
      add_product(dy.narrow(0, c0, cb), g.t(), x.narrow(0, r0, rb));
    });
  });
}

// Both directions' statistics (2, 3, n) in the accumulation dtype.
template <typename E>
at::Tensor stats(E& e, const Features& f, TileShape tile) {
  const at::Tensor vl = e.compute(f.img_local), tl = e.compute(f.txt_local);
  const auto acc = vl.options().dtype(c10::CppTypeToScalarType<typename E::acc_t>::value);
  at::Tensor out = empty_output({2, 3, vl.size(0)}, acc);  // (2, 3, n)
  if (f.symmetric) {
    // Column j of scale * v t^T is the t2i row of sample j: one pass fills both directions.
    direction_stats(e, vl, tl, 0, tile, out[0], out[1]);
    out[1][kPos].copy_(out[0][kPos]);  // the diagonal is the positive of both
    return out;
  }
  direction_stats(e, vl, e.compute(f.txt_all), f.row_offset, tile, out[0], at::Tensor());
  direction_stats(e, tl, e.compute(f.img_all), f.row_offset, tile, out[1], at::Tensor());
  return out;
}

// The accumulated G y / G^T x times scale * weight, in the input's dtype.
inline at::Tensor finish_grad(const at::Tensor& g, const at::Tensor& factor, const at::Tensor& like) {
  return g.mul_(factor).to(like.scalar_type());
}

template <typename E>
Grads grads(E& e, const Features& f, const at::Tensor& scale, const at::Tensor& lse, const at::Tensor& a,
            const at::Tensor& b, const at::Tensor& weight, TileShape tile) {
  using T = typename E::acc_t;
  const at::Tensor vl = e.compute(f.img_local), tl = e.compute(f.txt_local);
  const auto acc = lse.options();
  const at::Tensor factor = (scale.to(lse.scalar_type()) * weight.to(lse.scalar_type())).reshape({});
  const T* A = a.const_data_ptr<T>();
  const T* B = b.const_data_ptr<T>();
  const T* lse_i2t = lse[0].const_data_ptr<T>();
  const T* lse_t2i = lse[1].const_data_ptr<T>();
  at::Tensor dvl = at::zeros(vl.sizes(), acc), dtl = at::zeros(tl.sizes(), acc);
  if (f.symmetric) {
    direction_grads(e, vl, tl, GradTerms<T>{0, lse_i2t, A, B, lse_t2i, B}, tile, dvl, dtl);
    return {finish_grad(dvl, factor, f.img_local), finish_grad(dtl, factor, f.txt_local), at::Tensor(),
            at::Tensor(), e.d_scale() * weight.to(lse.scalar_type()).reshape({})};
  }
  const at::Tensor va = e.compute(f.img_all), ta = e.compute(f.txt_all);
  at::Tensor dta = at::zeros(ta.sizes(), acc);
  direction_grads(e, vl, ta, GradTerms<T>{f.row_offset, lse_i2t, A, B, nullptr, nullptr}, tile, dvl, dta);
  dta = finish_grad(dta, factor, f.txt_all);  // done: its float32 accumulator can go before the next one
  at::Tensor dva = at::zeros(va.sizes(), acc);
  direction_grads(e, tl, va, GradTerms<T>{f.row_offset, lse_t2i, A, B, nullptr, nullptr}, tile, dtl, dva);
  return {finish_grad(dvl, factor, f.img_local), finish_grad(dtl, factor, f.txt_local),
          finish_grad(dva, factor, f.img_all), dta, e.d_scale() * weight.to(lse.scalar_type()).reshape({})};
}

}  // namespace tiles
}  // namespace nlip
