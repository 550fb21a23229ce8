// CPU kernels of sample_categorical and top_p_threshold. sample_categorical draws from
// softmax(x / t) over a whole row, optionally cut to the tokens with p >= exp(min_log_ratio) p_max
// (min-p, and top-p once top_p_threshold has found its cut), without writing anything of the
// row's size.
//
// Pass 1 cuts the row into kScanBlock-element blocks and keeps one mass per block (its state
// (m_b, d_b), or with min_p its kept mass after a max pass). A draw then walks the block masses to
// the block holding u * D and re-reads that one block (1024 elements, in cache) to find the token.
// So the row is read once (twice with min_p), and each draw costs one block, not the row.
//
// Sparse edits (a row's sorted (id, value) list) replace x wherever it is read: a block that holds
// edits is copied into a stack buffer of the accumulation type, patched, and run through the same
// block function as x itself would be; every other block is read from x as before. The blocks,
// their functions and the order of the sums do not change, so the results are those of the dense
// edited copy in the accumulation type, bit for bit.
// Compiled once per ISA (csrc/cpu/isa/); called through the table of dispatch.h.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "the CPU kernels are compiled through csrc/cpu/isa/<capability>.cpp"
#endif

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/kernels/common.h"

namespace online_softmax::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// One row's edits: ids strictly ascending in [0, n), values in the accumulation type.
template <typename A>
struct RowEdits {
  const int64_t* ids = nullptr;
  const A* values = nullptr;
  int64_t count = 0;  // the real entries, the -1 padding cut off
};

template <typename A>
inline RowEdits<A> row_edits(const int64_t* ids, const void* values, int64_t num_edits, int64_t row) {
  RowEdits<A> e;
  if (num_edits == 0) return e;
  e.ids = ids + row * num_edits;
  e.values = static_cast<const A*>(values) + row * num_edits;
  while (e.count < num_edits && e.ids[e.count] >= 0) ++e.count;
  return e;
}

// The block [begin, begin + len) of x with the edits from index k on that fall in it applied, in buf
// (acc type); k ends past them. Called only for a block that holds at least one edit.
template <typename T>
inline const acc_t<T>* patched_block(const T* x, int64_t begin, int64_t len, const RowEdits<acc_t<T>>& e,
                                     int64_t& k, acc_t<T>* buf) {
  for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<acc_t<T>>(x[begin + i]);
  for (; k < e.count && e.ids[k] < begin + len; ++k) buf[e.ids[k] - begin] = e.values[k];
  return buf;
}

// f(begin, p, len) for every kScanBlock block of the row in order, p its elements as the edited row
// has them: x + begin itself (the unchanged fast path) or a patched copy in the accumulation type.
// Where T is the accumulation type itself, f is called from one site, so the block function
// inlines into the loop once.
template <typename T, typename F>
inline void for_each_block(const T* x, int64_t n, const RowEdits<acc_t<T>>& e, F&& f) {
  int64_t k = 0;
  alignas(64) acc_t<T> buf[kScanBlock];
  for (int64_t b = 0; b < n; b += kScanBlock) {
    const int64_t len = std::min(kScanBlock, n - b);
    const bool edited = k < e.count && e.ids[k] < b + len;
    if constexpr (std::is_same_v<T, acc_t<T>>) {
      f(b, edited ? patched_block(x, b, len, e, k, buf) : x + b, len);
    } else if (edited) {
      f(b, patched_block(x, b, len, e, k, buf), len);
    } else {
      f(b, x + b, len);
    }
  }
}

// f(p) for the one block starting at begin, as for_each_block shows it.
template <typename T, typename F>
inline auto with_block(const T* x, int64_t n, const RowEdits<acc_t<T>>& e, int64_t begin, F&& f) {
  const int64_t len = std::min(kScanBlock, n - begin);
  int64_t k = std::lower_bound(e.ids, e.ids + e.count, begin) - e.ids;
  const bool edited = k < e.count && e.ids[k] < begin + len;
  alignas(64) acc_t<T> buf[kScanBlock];
  if constexpr (std::is_same_v<T, acc_t<T>>) {
    return f(edited ? patched_block(x, begin, len, e, k, buf) : x + begin);
  } else {
    return edited ? f(patched_block(x, begin, len, e, k, buf)) : f(x + begin);
  }
}

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

// The raw value at or above which a token has (x - m) s >= log_ratio, i.e. p >= exp(log_ratio) p_max.
// sample_categorical and top_p_threshold both classify tokens by this one rounding.
template <typename A>
inline A threshold_value(A m, double log_ratio, A s) {
  return static_cast<A>(static_cast<double>(m) + log_ratio / static_cast<double>(s));
}

template <typename T>
inline acc_t<T> row_max(const T* x, int64_t n, const RowEdits<acc_t<T>>& e = {}) {
  acc_t<T> m = std::numeric_limits<acc_t<T>>::lowest();
  for_each_block(x, n, e, [&](int64_t, const auto* p, int64_t len) { m = nan_max(m, block_max(p, len)); });
  return m;
}

// The draw inside one block xb (len elements): the first kept token whose cumulative mass exceeds
// target; its value in *value.
template <typename U, typename A>
inline int64_t draw_in_block(const U* xb, int64_t len, A m, A s, A threshold, double target, A* value) {
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
  *value = static_cast<A>(xb[pick]);
  return pick;
}

template <typename T>
void sample_row(const T* x, int64_t n, const RowEdits<acc_t<T>>& edits, double temperature, double log_ratio,
                const double* u, int64_t num_samples, int64_t* tokens, acc_t<T>* log_probs, std::vector<double>& mass,
                std::vector<double>& block_m) {
  using A = acc_t<T>;
  const A s = static_cast<A>(1.0 / temperature);
  const int64_t blocks = (n + kScanBlock - 1) / kScanBlock;
  mass.assign(blocks, 0.0);
  A m = std::numeric_limits<A>::lowest();
  A threshold = -std::numeric_limits<A>::infinity();
  bool defined = n > 0;
  if (log_ratio > -std::numeric_limits<double>::infinity()) {
    m = row_max(x, n, edits);
    threshold = threshold_value(m, log_ratio, s);
    defined = defined && std::isfinite(m);
    if (defined) {
      for_each_block(x, n, edits, [&](int64_t begin, const auto* p, int64_t len) {
        mass[begin / kScanBlock] = kept_mass(p, len, m, s, threshold);
      });
    }
  } else {
    block_m.resize(blocks);  // the blocks' maxima; mass holds their d until rescaled below
    for_each_block(x, n, edits, [&](int64_t begin, const auto* p, int64_t len) {
      const State<A> st = block_state(p, len, s, [](int64_t, auto, auto, auto, auto) {}, [](int64_t, A, A) {});
      block_m[begin / kScanBlock] = st.m;
      mass[begin / kScanBlock] = st.d;
      m = nan_max(m, st.m);
    });
    defined = defined && std::isfinite(m);
    if (defined) {
      for (int64_t b = 0; b < blocks; ++b) mass[b] *= std::exp((block_m[b] - m) * s);
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
    A value;
    const int64_t pick = with_block(x, n, edits, b * kScanBlock, [&](const auto* p) {
      return draw_in_block(p, std::min(kScanBlock, n - b * kScanBlock), m, s, threshold, target, &value);
    });
    tokens[j] = b * kScanBlock + pick;
    log_probs[j] = static_cast<A>(static_cast<double>((value - m) * s) - log_total);
  }
}

// Masses sum(exp((x - m) s)) and counts of the elements at or above each of kProbes thresholds.
constexpr int kProbes = 16;

// One block's part of probe_masses, added to mass and count. Forced inline: the float instantiation
// also serves the patched blocks of float16/bfloat16 rows, and out of line (its 32 vector
// accumulators passed through memory) it cost float32 top_p_threshold 40%.
template <typename U, typename A>
__attribute__((always_inline)) inline void probe_block(const U* xb, int64_t len, A m, A s, const A* thresholds, double* mass, int64_t* count) {
  static_assert(std::is_same_v<acc_t<U>, A>);
  using V = Vectorized<A>;
  using IO = VecIO<U>;
  const V vm(m), vs(s), zero(A(0)), one(A(1));
  V vmass[kProbes], vcount[kProbes];
  for (int j = 0; j < kProbes; ++j) vmass[j] = vcount[j] = zero;
  int64_t i = 0;
  for (; i + IO::kStep <= len; i += IO::kStep) {
    V a, b;
    IO::load2(xb + i, a, b);
    const V ea = vexp((a - vm) * vs), eb = vexp((b - vm) * vs);
    for (int j = 0; j < kProbes; ++j) {
      const V t(thresholds[j]);
      const V ka = a >= t, kb = b >= t;  // all-ones lanes where kept
      vmass[j] = vmass[j] + (ea & ka) + (eb & kb);
      vcount[j] = vcount[j] + (one & ka) + (one & kb);
    }
  }
  alignas(64) A lanes[V::size()];
  for (int j = 0; j < kProbes; ++j) {
    mass[j] += at::vec::vec_reduce_all<A>([](V p, V q) { return p + q; }, vmass[j]);
    vcount[j].store(lanes);
    for (int l = 0; l < V::size(); ++l) count[j] += static_cast<int64_t>(lanes[l]);
  }
  for (; i < len; ++i) {
    const A v = static_cast<A>(xb[i]);
    const A e = std::exp((v - m) * s);
    for (int j = 0; j < kProbes; ++j) {
      if (v >= thresholds[j]) {
        mass[j] += e;
        count[j] += 1;
      }
    }
  }
}

template <typename T>
void probe_masses(const T* x, int64_t n, const RowEdits<acc_t<T>>& edits, acc_t<T> m, acc_t<T> s,
                  const acc_t<T>* thresholds, double* mass, int64_t* count) {
  for (int j = 0; j < kProbes; ++j) {
    mass[j] = 0.0;
    count[j] = 0;
  }
  for_each_block(x, n, edits, [&](int64_t, const auto* p, int64_t len) {
    probe_block(p, len, m, s, thresholds, mass, count);
  });
}

// The smallest log-ratio r = (x - m) s of the tokens transformers' top-p keeps: with F(r) the
// probability of the tokens at or above r, the largest token value with F >= top_p. A bracket
// [lo, hi) with F(lo) >= top_p > F(hi) narrows 15-fold per pass over the row (in cache after the
// first) until it holds one token. Status 0: found; 1: several tokens tied within float
// resolution at the cut (the caller resolves the tie); 2: no distribution (NaN, +inf, all -inf).
template <typename T>
void top_p_row(const T* x, int64_t n, const RowEdits<acc_t<T>>& edits, double temperature, double top_p,
               double* log_ratio, int64_t* status) {
  using A = acc_t<T>;
  const A s = static_cast<A>(1.0 / temperature);
  const A m = row_max(x, n, edits);
  if (!std::isfinite(m)) {
    *log_ratio = std::numeric_limits<double>::quiet_NaN();
    *status = 2;
    return;
  }
  if (top_p <= 0.0) {  // only the largest stays
    *log_ratio = 0.0;
    *status = 0;
    return;
  }
  // exp((x - m) s) is 0 in float below -104: those tokens hold no probability.
  double lo = -104.0, hi = 1.0, f_lo = 0.0, total = 0.0;
  int64_t c_lo = 0, c_hi = 0;
  A thresholds[kProbes];
  double mass[kProbes];
  int64_t count[kProbes];
  for (int pass = 0; pass < 24; ++pass) {
    double probe[kProbes];
    for (int j = 0; j < kProbes; ++j) {
      probe[j] = lo + (hi - lo) * j / kProbes;
      thresholds[j] = threshold_value(m, probe[j], s);
    }
    probe_masses(x, n, edits, m, s, thresholds, mass, count);
    if (pass == 0) total = mass[0];
    if (!(total > 0.0) || !std::isfinite(total)) {
      *log_ratio = std::numeric_limits<double>::quiet_NaN();
      *status = 2;
      return;
    }
    int j = 0;  // probe 0 is lo itself: F(lo) >= top_p holds
    while (j + 1 < kProbes && mass[j + 1] / total >= top_p) ++j;
    lo = probe[j];
    f_lo = mass[j];
    c_lo = count[j];
    if (j + 1 < kProbes) {
      hi = probe[j + 1];
      c_hi = count[j + 1];
    }
    if (c_lo - c_hi <= 1) break;
    // The bracket is down to the float spacing of the values: a tie the probes cannot split.
    if (threshold_value(m, lo, s) == threshold_value(m, hi, s) || hi - lo < 1e-12) {
      *log_ratio = lo;
      *status = 1;
      return;
    }
  }
  (void)f_lo;
  *log_ratio = lo;
  *status = c_lo - c_hi <= 1 ? 0 : 1;
}

template <typename T>
void top_p_kernel(const TopPCall& c) {
  const T* x = static_cast<const T*>(c.x);
  at::parallel_for(0, c.rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      top_p_row(x + r * c.n, c.n, row_edits<acc_t<T>>(c.edit_ids, c.edit_values, c.num_edits, r), c.temperature[r],
                c.top_p[r], c.log_ratio + r, c.status + r);
    }
  });
}

void top_p_entry(const TopPCall& c) {
  with_dtype(c.x_dtype, "top_p_threshold", [&](auto tag) { top_p_kernel<decltype(tag)>(c); });
}

template <typename T>
void sample_kernel(const SampleCall& c) {
  using A = acc_t<T>;
  const T* x = static_cast<const T*>(c.x);
  A* log_probs = static_cast<A*>(c.log_probs);
  at::parallel_for(0, c.rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> mass, block_m;  // per-thread scratch, reused across rows
    for (int64_t r = begin; r < end; ++r) {
      sample_row(x + r * c.n, c.n, row_edits<A>(c.edit_ids, c.edit_values, c.num_edits, r), c.temperature[r],
                 c.min_log_ratio ? c.min_log_ratio[r] : -std::numeric_limits<double>::infinity(), c.uniforms + r * c.num_samples,
                 c.num_samples, c.tokens + r * c.num_samples, log_probs + r * c.num_samples, mass, block_m);
    }
  });
}

void sample_entry(const SampleCall& c) {
  with_dtype(c.x_dtype, "sample_categorical", [&](auto tag) { sample_kernel<decltype(tag)>(c); });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace online_softmax::cpu
