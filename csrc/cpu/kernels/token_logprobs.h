// CPU token_logprobs: one read of each row gives the online state (m, d), the entropy accumulator
// S = sum e (x - m) s (e = exp((x - m) s)), the rank of the scored token and, when asked, the
// top-n of softmax_topk. The state is folded exactly as stats folds it (same blocks, pieces and
// order), so max and sumexp are stats' bits; S rides beside d and is rescaled with it.
// Compiled once per ISA (csrc/cpu/isa/); called through the table of dispatch.h.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "the CPU kernels are compiled through csrc/cpu/isa/<capability>.cpp"
#endif

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/kernels/common.h"
#include "cpu/kernels/softmax_topk.h"

namespace online_softmax::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// A state with its entropy accumulator, in double like the folds of online_state.h.
struct EntropyState {
  State<double> st;
  double S = 0;
};

// S of a state expressed against the larger max m: e^{(m1 - m) s} (S + (m1 - m) s d). A state that
// saw nothing finite (d = 0) adds nothing; (m1 - m) s may overflow there and 0 * -inf is NaN.
inline double shift_entropy(const EntropyState& e, double m, double s) {
  if (e.st.d == 0) return 0;
  if (e.st.m == m) return e.S;
  const double dm = (e.st.m - m) * s;
  return std::exp(dm) * (e.S + dm * e.st.d);
}

// fold() of online_state.h for (m, d), and S moved to the folded max.
template <typename A>
inline void fold_entropy(EntropyState& total, const EntropyState& next, A s) {
  const EntropyState before = total;
  fold(total.st, next.st, s);
  total.S = shift_entropy(before, total.st.m, s) + shift_entropy(next, total.st.m, s);
}

// e * z, or 0 where e = 0 (z = -inf there: a -inf logit, or a block without a finite value).
template <typename A>
inline Vectorized<A> entropy_terms(Vectorized<A> e, Vectorized<A> z) {
  return Vectorized<A>::blendv(e * z, Vectorized<A>(A(0)), e == Vectorized<A>(A(0)));
}

// Counts the elements ranked ahead of the scored token (value v at index tok) in the top-k order
// (larger first, NaN above every number, -0 == +0, ties to the lower index); tok itself is skipped,
// so v may differ from x[tok].
template <typename A>
struct RankCount {
  using V = Vectorized<A>;
  static constexpr int64_t W = V::size();
  A v;
  int64_t tok;
  bool v_nan;
  int64_t ahead = 0;

  RankCount(A value, int64_t token) : v(value), tok(token), v_nan(std::isnan(value)) {}

  static uint64_t bits(V a, V b) {  // lanes that compare false
    return uint64_t(uint32_t(a.zero_mask())) | (uint64_t(uint32_t(b.zero_mask())) << W);
  }
  // The pair of vectors a, b holds indices first .. first + 2W - 1.
  void vectors(V a, V b, int64_t first) {
    const uint64_t all = (uint64_t(1) << (2 * W)) - 1;
    const int64_t t = tok - first;  // the token's lane, if in [0, 2W)
    const uint64_t below = t <= 0 ? 0 : t >= 2 * W ? all : (uint64_t(1) << t) - 1;
    const uint64_t above = t < 0 ? all : t >= 2 * W - 1 ? 0 : all & ~((uint64_t(2) << t) - 1);
    const V vv(v);
    if (below != 0) {  // a lower index is ahead when not below v (NaN included)
      const uint64_t m = v_nan ? bits(a == a, b == b) : bits(a < vv, b < vv);
      ahead += __builtin_popcountll(m & below);
    }
    if (above != 0 && !v_nan) ahead += __builtin_popcountll(bits(a <= vv, b <= vv) & above);
  }
  void scalar(A value, int64_t index) {
    if (index == tok) return;
    const auto kx = order_key(value), kv = order_key(v);
    ahead += (kx > kv || (kx == kv && index < tok)) ? 1 : 0;
  }
};

// No top-n asked: the scan skips the selection.
struct NoSelection {};

template <typename Select>
struct CandidatesOf {
  using type = std::vector<typename Select::Items::Item>;
};
template <>
struct CandidatesOf<NoSelection> {
  using type = char;
};

struct PieceResult {
  EntropyState e;
  int64_t ahead = 0;
};

// The state, entropy accumulator and rank count of the piece [i0, i0 + n) of row xr (n <=
// kRowPiece), its blocks folded as scan_piece folds them; candidates go to topk unless Select is
// NoSelection.
template <typename T, typename Select>
PieceResult scan_token_piece(const T* xr, int64_t i0, int64_t n, acc_t<T> s, acc_t<T> v, int64_t tok,
                             Select& topk) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  [[maybe_unused]] constexpr int64_t W = V::size();
  constexpr bool kSelect = !std::is_same_v<Select, NoSelection>;
  RankCount<A> rank(v, tok);
  PieceResult out;
  const V vs(s);
  for (int64_t block = i0; block < i0 + n; block += kScanBlock) {
    const int64_t len = std::min(kScanBlock, i0 + n - block);
    const A m = block_max(xr + block, len);
    const V vm(m);
    V S0(A(0)), S1(A(0));
    A S = 0;
    const State<A> st = block_state_at(
        xr + block, len, m, s,
        [&](int64_t i, V a, V b, V ea, V eb) {
          S0 = S0 + entropy_terms(ea, (a - vm) * vs);
          S1 = S1 + entropy_terms(eb, (b - vm) * vs);
          rank.vectors(a, b, block + i);
          if constexpr (kSelect) offer_lanes<W>(topk, a, b, block + i);
        },
        [&](int64_t i, A a, A e) {
          if (e != A(0)) S += e * ((a - m) * s);
          rank.scalar(a, block + i);
          if constexpr (kSelect) topk.offer(a, block + i);
        });
    S += at::vec::vec_reduce_all<A>([](V p, V q) { return p + q; }, S0 + S1);
    fold_entropy(out.e, EntropyState{{static_cast<double>(st.m), static_cast<double>(st.d)}, static_cast<double>(S)}, s);
  }
  out.ahead = rank.ahead;
  return out;
}

template <typename T>
struct TokenOutputs {
  using A = acc_t<T>;
  A* log_probs;
  int64_t* rank;
  int64_t* top_ids;
  A* top_log_probs;
  A* max;
  A* sumexp;
  A* entropy;
};

template <typename Select, typename T>
void token_logprobs_rows(const T* x, int64_t rows, int64_t n, const int64_t* token_ids,
                         const acc_t<T>* token_values, int64_t k, acc_t<T> s, const TokenOutputs<T>& o) {
  using A = acc_t<T>;
  constexpr bool kSelect = !std::is_same_v<Select, NoSelection>;
  auto make_select = [&]() {
    if constexpr (kSelect) {
      return Select(k);
    } else {
      return NoSelection{};
    }
  };
  auto scored = [&](int64_t r) {
    return token_values != nullptr ? token_values[r] : static_cast<A>(x[r * n + token_ids[r]]);
  };
  auto emit = [&](int64_t r, const PieceResult& total, Select& topk) {
    const State<A> st = finalize(to_acc<A>(total.e.st));
    const Normalizer<A> nz(st);
    const bool finite = !std::isnan(nz.log_d);
    o.log_probs[r] = (scored(r) - nz.m) * s - nz.log_d;
    o.rank[r] = 1 + total.ahead;
    o.max[r] = st.m * s;
    o.sumexp[r] = st.d;
    // H = log d - S / d, in double from the folded double state.
    o.entropy[r] = finite ? static_cast<A>(std::log(total.e.st.d) - total.e.S / total.e.st.d)
                          : std::numeric_limits<A>::quiet_NaN();
    if constexpr (kSelect) {
      auto& cands = topk.candidates();
      const int64_t found = std::min<int64_t>(k, static_cast<int64_t>(cands.size()));
      using Items = typename Select::Items;
      std::partial_sort(cands.begin(), cands.begin() + found, cands.end(), typename Items::Better{});
      for (int64_t j = 0; j < found; ++j) {
        o.top_ids[r * k + j] = Items::index(cands[j]);
        o.top_log_probs[r * k + j] = (Items::value(cands[j]) - nz.m) * s - nz.log_d;
      }
    }
  };
  auto add = [&](PieceResult& total, const PieceResult& piece) {
    fold_entropy(total.e, piece.e, s);
    total.ahead += piece.ahead;
  };

  const RowSplit split = plan_row_split(rows, n);
  const RowSplit plan = split.chunk >= k ? split : RowSplit{1, n};
  const int64_t P = row_pieces(n);
  if (plan.chunks == 1) {
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      Select topk = make_select();
      for (int64_t r = begin; r < end; ++r) {
        if constexpr (kSelect) topk.reset();
        const A v = scored(r);
        PieceResult total;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t i0 = p * kRowPiece;
          add(total, scan_token_piece(x + r * n, i0, std::min(kRowPiece, n - i0), s, v, token_ids[r], topk));
        }
        emit(r, total, topk);
      }
    });
    return;
  }
  // Rows split across threads, in whole pieces as topk_rows splits them; the pieces' results fold
  // in the same order as above, so the bits do not depend on the split.
  std::vector<PieceResult> pieces(rows * P);
  std::vector<typename CandidatesOf<Select>::type> run_cands(kSelect ? rows * P : 0);  // at each run's first piece
  at::parallel_for(0, rows * P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end;) {
      const int64_t r = t / P, run_end = std::min(end, (r + 1) * P);
      const A v = scored(r);
      Select topk = make_select();
      for (int64_t u = t; u < run_end; ++u) {
        const int64_t i0 = (u % P) * kRowPiece;
        pieces[u] = scan_token_piece(x + r * n, i0, std::min(kRowPiece, n - i0), s, v, token_ids[r], topk);
      }
      if constexpr (kSelect) run_cands[t] = std::move(topk.candidates());
      t = run_end;
    }
  });
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    Select merged = make_select();
    for (int64_t r = begin; r < end; ++r) {
      PieceResult total;
      for (int64_t p = 0; p < P; ++p) add(total, pieces[r * P + p]);
      if constexpr (kSelect) {
        merged.reset();
        using Items = typename Select::Items;
        for (int64_t p = 0; p < P; ++p) {
          for (const auto& c : run_cands[r * P + p]) merged.offer(Items::value(c), Items::index(c));
        }
      }
      emit(r, total, merged);
    }
  });
}

template <typename T>
void token_logprobs_kernel(const T* x, int64_t rows, int64_t n, const int64_t* token_ids,
                           const acc_t<T>* token_values, int64_t k, acc_t<T> s, const TokenOutputs<T>& o) {
  using A = acc_t<T>;
  if (k == 0) return token_logprobs_rows<NoSelection>(x, rows, n, token_ids, token_values, k, s, o);
  with_selection<A>(n, k, [&](auto tag) {
    token_logprobs_rows<typename decltype(tag)::type>(x, rows, n, token_ids, token_values, k, s, o);
  });
}

void token_logprobs_entry(const TokenLogprobsCall& c) {
  with_dtype(c.x_dtype, "token_logprobs", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    const TokenOutputs<T> o{static_cast<A*>(c.log_probs), c.rank, c.top_ids, static_cast<A*>(c.top_log_probs),
                            static_cast<A*>(c.max), static_cast<A*>(c.sumexp), static_cast<A*>(c.entropy)};
    token_logprobs_kernel(static_cast<const T*>(c.x), c.rows, c.n, c.token_ids,
                          static_cast<const A*>(c.token_values), c.top_n, static_cast<A>(1.0 / c.temperature), o);
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace online_softmax::cpu
