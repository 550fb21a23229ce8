// CPU kernel of rejection_sample (speculative decoding's verification; semantics in csrc/ops.cpp,
// oracle in online_softmax/reference/speculative.py).
//
// Phase 1 reduces every target position a row can reach (0..n_b) to its state in parallel: the
// max, the normalizer over the kept tokens and, for greedy rows, the arg-max. That is one read of
// each position (two with a cut: the max first, then the kept mass from cache), and the work a
// batch of one spreads over the threads. Phase 2 walks each batch row's drafts in order, which
// needs only the draft token's logit per position, and makes the row's one draw: from the
// residual max(p - q, 0) at a rejection, or from the bonus position. A draw keeps one mass per
// kScanBlock block (a read of that row and of its draft row) and rescans the block holding u * R.
// Compiled once per ISA (csrc/cpu/isa/); called through the table of dispatch.h.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "the CPU kernels are compiled through csrc/cpu/isa/<capability>.cpp"
#endif

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/kernels/common.h"
#include "cpu/kernels/sample.h"

namespace online_softmax::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// What phase 1 leaves per target position.
template <typename A>
struct PositionState {
  A m;               // the row's max
  A s;               // 1 / t (1 for greedy rows)
  A threshold;       // tokens with x >= threshold are kept (-inf: all)
  double d;          // sum over kept tokens of exp((x - m) s)
  int64_t best;      // greedy rows: the first index of the max
  bool defined;      // m finite, d > 0 and finite
};

template <typename T>
int64_t first_index_of(const T* x, int64_t n, acc_t<T> value) {
  for (int64_t i = 0; i < n; ++i) {
    if (static_cast<acc_t<T>>(x[i]) == value) return i;
  }
  return -1;
}

template <typename T>
PositionState<acc_t<T>> position_state(const T* x, int64_t n, double temperature, double log_ratio) {
  using A = acc_t<T>;
  PositionState<A> st;
  const bool greedy = temperature == 0.0;
  st.s = greedy ? A(1) : static_cast<A>(1.0 / temperature);
  st.threshold = -std::numeric_limits<A>::infinity();
  st.best = -1;
  const bool cut = !greedy && log_ratio > -std::numeric_limits<double>::infinity();
  const int64_t blocks = (n + kScanBlock - 1) / kScanBlock;
  double d = 0.0;
  if (cut) {
    st.m = row_max(x, n);
    if (std::isfinite(st.m)) {
      st.threshold = threshold_value(st.m, log_ratio, st.s);
      for (int64_t b = 0; b < blocks; ++b)
        d += kept_mass(x + b * kScanBlock, std::min(kScanBlock, n - b * kScanBlock), st.m, st.s, st.threshold);
    }
  } else {
    // The blocks' states, merged in double at the running max.
    A m = std::numeric_limits<A>::lowest();
    for (int64_t b = 0; b < blocks; ++b) {
      const State<A> bs = block_state(x + b * kScanBlock, std::min(kScanBlock, n - b * kScanBlock), st.s,
                                      [](int64_t, auto, auto, auto, auto) {}, [](int64_t, A, A) {});
      const A m_new = nan_max(m, bs.m);
      if (!std::isfinite(m_new)) {  // NaN or +inf: no distribution
        m = m_new;
        break;
      }
      const double s = static_cast<double>(st.s);
      d = d * std::exp((double(m) - double(m_new)) * s) + double(bs.d) * std::exp((double(bs.m) - double(m_new)) * s);
      m = m_new;
    }
    st.m = m;
  }
  st.d = d;
  st.defined = n > 0 && std::isfinite(st.m) && d > 0.0 && std::isfinite(d);
  if (greedy && st.defined) st.best = first_index_of(x, n, st.m);
  return st;
}

// Loads 2 vectors of the accumulation type A from q (float32, or the logits' own type T).
template <typename A, typename Q>
inline void load_q(const Q* q, Vectorized<A>& a, Vectorized<A>& b) {
  VecIO<Q>::load2(q, a, b);
}

// One block's draw weights, as a vector pair at a time and element by element (same rounding):
// e = exp((x - m) s) over kept tokens; with q, the residual max(e / d - q, 0); `skip` (an index in
// the block, or -1) weighs 0 (the one-hot draft's residual).
template <typename T, typename Q>
struct DrawWeights {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  const T* x;
  const Q* q;  // nullptr: no draft row
  A m, s, threshold, inv_d;
  int64_t skip;

  // Vectors need q's lanes in A: float32 q for float/half/bfloat16 logits, double q for double ones.
  static constexpr bool kVectorQ = std::is_same_v<acc_t<Q>, A>;

  inline A at(int64_t i) const {
    if (i == skip) return A(0);
    const A v = static_cast<A>(x[i]);
    if (!(v >= threshold)) return A(0);
    const A e = std::exp((v - m) * s);
    if (q == nullptr) return e;
    const A r = e * inv_d - static_cast<A>(q[i]);
    return r > A(0) ? r : A(0);
  }

  double mass(int64_t begin, int64_t len) const {
    using IO = VecIO<T>;
    double total = 0.0;
    int64_t i = 0;
    if (q == nullptr || kVectorQ) {
      const V vm(m), vs(s), vt(threshold), vinv(inv_d), zero(A(0));
      V acc0(A(0)), acc1(A(0));
      for (; i + IO::kStep <= len; i += IO::kStep) {
        if (skip >= begin + i && skip < begin + i + IO::kStep) {  // the skipped token's pair, one by one
          for (int64_t j = i; j < i + IO::kStep; ++j) total += static_cast<double>(at(begin + j));
          continue;
        }
        V a, b;
        IO::load2(x + begin + i, a, b);
        V ea = V::blendv(zero, vexp((a - vm) * vs), a >= vt);
        V eb = V::blendv(zero, vexp((b - vm) * vs), b >= vt);
        if (q != nullptr) {
          if constexpr (kVectorQ) {
            V qa, qb;
            load_q<A>(q + begin + i, qa, qb);
            ea = at::vec::maximum(ea * vinv - qa, zero);
            eb = at::vec::maximum(eb * vinv - qb, zero);
          }
        }
        acc0 = acc0 + ea;
        acc1 = acc1 + eb;
      }
      total += at::vec::vec_reduce_all<A>([](V u, V v) { return u + v; }, acc0 + acc1);
    }
    for (; i < len; ++i) total += static_cast<double>(at(begin + i));
    return total > 0.0 ? total : 0.0;
  }
};

// The first token whose cumulative weight exceeds u * total (past the end by rounding: the last
// token with weight), by block masses then one block's rescan. -1 when no token has weight.
template <typename T, typename Q>
int64_t draw_token(const DrawWeights<T, Q>& w, int64_t n, double u, std::vector<double>& mass) {
  const int64_t blocks = (n + kScanBlock - 1) / kScanBlock;
  mass.assign(blocks, 0.0);
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    mass[b] = w.mass(b * kScanBlock, std::min(kScanBlock, n - b * kScanBlock));
    total += mass[b];
  }
  if (!(total > 0.0) || !std::isfinite(total)) return -1;
  double target = u * total;
  int64_t b = 0, last = -1;
  for (; b < blocks; ++b) {
    if (mass[b] > 0.0) last = b;
    if (mass[b] > 0.0 && target < mass[b]) break;
    target -= mass[b];
  }
  if (b == blocks) {
    b = last;
    target = mass[b];
  }
  const int64_t begin = b * kScanBlock, end = std::min(n, begin + kScanBlock);
  int64_t pick = -1;
  double acc = 0.0;
  for (int64_t i = begin; i < end; ++i) {
    const double e = static_cast<double>(w.at(i));
    if (e > 0.0) {
      pick = i;
      acc += e;
      if (acc > target) break;
    }
  }
  return pick;  // -1 only if the block's mass sat in vector lanes that round to 0 one by one
}

template <typename T, typename Q>
void rejection_kernel(const RejectionCall& c) {
  using A = acc_t<T>;
  const T* target = static_cast<const T*>(c.target);
  const Q* draft_probs = static_cast<const Q*>(c.draft_probs);
  A* log_probs = static_cast<A*>(c.log_probs);
  const int64_t n1 = c.n + 1, V = c.vocab;
  const A nan = std::numeric_limits<A>::quiet_NaN();
  // Phase 1: the state of every reachable position.
  std::vector<PositionState<A>> states(c.batch * n1);
  at::parallel_for(0, c.batch * n1, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / n1, i = r % n1;
      if (i > c.num_drafts[b]) continue;
      states[r] = position_state(target + r * V, V, c.temperature[b],
                                 c.min_log_ratio ? c.min_log_ratio[r] : -std::numeric_limits<double>::infinity());
    }
  });
  // Phase 2: each batch row's acceptance walk and its one draw.
  at::parallel_for(0, c.batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> mass;
    for (int64_t b = begin; b < end; ++b) {
      int64_t* tok = c.token_ids + b * n1;
      A* lp = log_probs + b * n1;
      for (int64_t i = 0; i < n1; ++i) {
        tok[i] = -1;
        lp[i] = nan;
      }
      const bool greedy = c.temperature[b] == 0.0;
      const double u_final = c.uniforms[b * n1 + c.n];
      const int64_t nb = c.num_drafts[b];
      int64_t i = 0;
      for (;; ++i) {
        const PositionState<A>& st = states[b * n1 + i];
        const T* x = target + (b * n1 + i) * V;
        if (!st.defined) break;  // -1 / NaN here, and the row ends
        const double log_d = std::log(st.d);
        auto log_p = [&](int64_t v) {
          return static_cast<A>(static_cast<double>((static_cast<A>(x[v]) - st.m) * st.s) - log_d);
        };
        auto emit = [&](int64_t v) {
          tok[i] = v;
          lp[i] = v >= 0 ? log_p(v) : nan;
        };
        if (i == nb) {  // every draft accepted: the bonus token
          DrawWeights<T, Q> w{x, nullptr, st.m, st.s, st.threshold, A(0), -1};
          emit(greedy ? st.best : draw_token(w, V, u_final, mass));
          break;
        }
        const int64_t v = c.draft_ids[b * c.n + i];
        if (greedy) {
          if (v == st.best) {
            emit(v);
            continue;
          }
          emit(st.best);
          break;
        }
        const A xv = static_cast<A>(x[v]);
        const double p = xv >= st.threshold ? std::exp(static_cast<double>((xv - st.m) * st.s)) / st.d : 0.0;
        const Q* q_row = draft_probs ? draft_probs + (b * c.n + i) * V : nullptr;
        const double q = q_row ? static_cast<double>(q_row[v]) : 1.0;
        if (c.uniforms[b * n1 + i] * q < p) {
          emit(v);
          continue;
        }
        // Rejected: the residual max(p - q, 0), or p itself if that mass rounds to zero.
        const A inv_d = static_cast<A>(1.0 / st.d);
        DrawWeights<T, Q> residual{x, q_row, st.m, st.s, st.threshold, inv_d, q_row ? -1 : v};
        int64_t pick = draw_token(residual, V, u_final, mass);
        if (pick < 0) {
          DrawWeights<T, Q> w{x, nullptr, st.m, st.s, st.threshold, A(0), -1};
          pick = draw_token(w, V, u_final, mass);
        }
        emit(pick);
        break;
      }
      c.num_accepted[b] = std::min(i, nb);
    }
  });
}

void rejection_entry(const RejectionCall& c) {
  with_dtype(c.x_dtype, "rejection_sample", [&](auto tag) {
    using T = decltype(tag);
    if (c.draft_probs == nullptr || c.draft_dtype == at::kFloat) {
      rejection_kernel<T, float>(c);
    } else if constexpr (!std::is_same_v<T, float>) {
      rejection_kernel<T, T>(c);
    }
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace online_softmax::cpu
