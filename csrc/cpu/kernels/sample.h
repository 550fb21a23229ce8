// CPU kernel of sample_categorical: draws from softmax(x / t) over a whole row, optionally cut to
// the tokens with p >= min_p * p_max, without writing anything of the row's size.
//
// Pass 1 cuts the row into kScanBlock-element blocks and keeps one mass per block (its state
// (m_b, d_b), or with min_p its kept mass after a max pass). A draw then walks the block masses to
// the block holding u * D and re-reads that one block (1024 elements, in cache) to find the token.
// So the row is read once (twice with min_p), and each draw costs one block, not the row.
// Compiled once per ISA (csrc/cpu/isa/); called through the table of dispatch.h.
#pragma once

#include <cmath>
#include <vector>

#include "cpu/kernels/common.h"

namespace online_softmax::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// Sum of exp((x - m) s) over the elements with x >= threshold (all others weigh 0).
template <typename T>
inline double kept_mass(const T* x, int64_t n, acc_t<T> m, acc_t<T> s, acc_t<T> threshold) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  using IO = VecIO<T>;
  const V vm(m), vs(s), vt(threshold), zero(A(0));
  V d0(A(0)), d1(A(0));
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    V a, b;
    IO::load2(x + i, a, b);
    d0 = d0 + V::blendv(zero, vexp((a - vm) * vs), a >= vt);
    d1 = d1 + V::blendv(zero, vexp((b - vm) * vs), b >= vt);
  }
  double d = at::vec::vec_reduce_all<A>([](V u, V v) { return u + v; }, d0 + d1);
  for (; i < n; ++i) {
    const A v = static_cast<A>(x[i]);
    if (v >= threshold) d += std::exp((v - m) * s);
  }
  return d;
}

template <typename T>
void sample_row(const T* x, int64_t n, double temperature, double min_p, const double* u, int64_t num_samples,
                int64_t* tokens, acc_t<T>* log_probs, std::vector<double>& mass) {
  using A = acc_t<T>;
  const A s = static_cast<A>(1.0 / temperature);
  const int64_t blocks = (n + kScanBlock - 1) / kScanBlock;
  mass.assign(blocks, 0.0);
  A m = std::numeric_limits<A>::lowest();
  A threshold = -std::numeric_limits<A>::infinity();
  bool defined = n > 0;
  if (min_p > 0.0) {
    for (int64_t b = 0; b < blocks; ++b) m = nan_max(m, block_max(x + b * kScanBlock, std::min(kScanBlock, n - b * kScanBlock)));
    // p_i >= min_p * p_max  <=>  (x_i - m) s >= log(min_p).
    threshold = static_cast<A>(static_cast<double>(m) + std::log(min_p) / static_cast<double>(s));
    defined = defined && std::isfinite(m);
    if (defined) {
      for (int64_t b = 0; b < blocks; ++b)
        mass[b] = kept_mass(x + b * kScanBlock, std::min(kScanBlock, n - b * kScanBlock), m, s, threshold);
    }
  } else {
    std::vector<State<A>> st(blocks);
    for (int64_t b = 0; b < blocks; ++b) {
      st[b] = block_state(x + b * kScanBlock, std::min(kScanBlock, n - b * kScanBlock), s,
                          [](int64_t, auto, auto, auto, auto) {}, [](int64_t, A, A) {});
      m = nan_max(m, st[b].m);
    }
    defined = defined && std::isfinite(m);
    if (defined) {
      for (int64_t b = 0; b < blocks; ++b)
        mass[b] = static_cast<double>(st[b].d) * std::exp((static_cast<double>(st[b].m) - m) * s);
    }
  }
  double total = 0.0;
  for (double w : mass) total += w;
  // NaN or +inf anywhere, or nothing with positive mass (all -inf): no distribution to draw from.
  if (!defined || !(total > 0.0) || !std::isfinite(total)) {
    for (int64_t j = 0; j < num_samples; ++j) {
      tokens[j] = -1;
      log_probs[j] = std::numeric_limits<A>::quiet_NaN();
    }
    return;
  }
  const double log_total = std::log(total);
  for (int64_t j = 0; j < num_samples; ++j) {
    double target = u[j] * total;
    int64_t b = 0, last = -1;
    for (; b < blocks; ++b) {
      if (mass[b] > 0.0) last = b;
      if (mass[b] > 0.0 && target < mass[b]) break;
      target -= mass[b];
    }
    if (b == blocks) {  // rounding put u * D past the sum: the last block with mass
      b = last;
      target = mass[b];
    }
    const T* xb = x + b * kScanBlock;
    const int64_t len = std::min(kScanBlock, n - b * kScanBlock);
    int64_t pick = -1, best = 0;
    double acc = 0.0;
    for (int64_t i = 0; i < len; ++i) {
      const A v = static_cast<A>(xb[i]);
      if (v > static_cast<A>(xb[best])) best = i;
      if (!(v >= threshold)) continue;
      const double e = std::exp(static_cast<double>((v - m) * s));
      if (e > 0.0) {
        pick = i;
        acc += e;
        if (acc > target) break;
      }
    }
    if (pick < 0) pick = best;  // the block's mass was all in elements that round to 0 here
    tokens[j] = b * kScanBlock + pick;
    log_probs[j] = static_cast<A>(static_cast<double>((static_cast<A>(xb[pick]) - m) * s) - log_total);
  }
}

template <typename T>
void sample_kernel(const SampleCall& c) {
  using A = acc_t<T>;
  const T* x = static_cast<const T*>(c.x);
  A* log_probs = static_cast<A*>(c.log_probs);
  at::parallel_for(0, c.rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> mass;
    for (int64_t r = begin; r < end; ++r) {
      sample_row(x + r * c.n, c.n, c.temperature[r], c.min_p ? c.min_p[r] : 0.0, c.uniforms + r * c.num_samples,
                 c.num_samples, c.tokens + r * c.num_samples, log_probs + r * c.num_samples, mass);
    }
  });
}

void sample_entry(const SampleCall& c) {
  with_dtype(c.x_dtype, "sample_categorical", [&](auto tag) { sample_kernel<decltype(tag)>(c); });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace online_softmax::cpu
