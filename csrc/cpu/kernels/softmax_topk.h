// CPU fused online softmax + top-k: one read of x. While the online (m, d) runs over a row, a
// vector compare against the k-th best value so far sends only the rare candidates to a min-heap;
// the softmax of the k winners is computed from the final (m, d). Long rows are split across
// threads, each piece with its own heap and state, then merged (concatenate, keep the k best).
// Compiled once per ISA (csrc/cpu/isa/); called through the table of dispatch.h.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "the CPU kernels are compiled through csrc/cpu/isa/<capability>.cpp"
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>

#include "cpu/kernels/common.h"

namespace online_softmax::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// An unsigned key whose order is the top-k order of the values: NaN above every number (like
// torch.topk), -0 equal to +0. Candidates compare by key, then by index, so the comparisons of the
// selection are two integer compares instead of NaN tests on floats (the NaN tests, out of line,
// were a quarter of the time of k = 64 on 1024-wide rows).
template <typename A>
using OrderKey = std::conditional_t<sizeof(A) == 4, uint32_t, uint64_t>;

template <typename A>
inline OrderKey<A> order_key(A v) {
  using K = OrderKey<A>;
  constexpr K kSign = K(1) << (8 * sizeof(K) - 1);
  if (std::isnan(v)) return ~K(0);
  v = v + A(0);  // -0 + 0 = +0
  K bits;
  std::memcpy(&bits, &v, sizeof bits);
  return (bits & kSign) ? ~bits : (bits | kSign);
}

template <typename A>
struct Candidate {
  A value;
  int64_t index;
  OrderKey<A> key;
  Candidate() = default;
  Candidate(A v, int64_t i) : value(v), index(i), key(order_key(v)) {}
};

// The top-k order: larger first, NaN above every number, ties to the lower index.
template <typename A>
inline bool better(const Candidate<A>& a, const Candidate<A>& b) {
  return a.key > b.key || (a.key == b.key && a.index < b.index);
}
// How the selection stores a candidate. Pairs: (value, index, key), any dtype and row length.
template <typename A>
struct PairItems {
  using Acc = A;
  using Item = Candidate<A>;
  // A type for the standard algorithms. Still a call each compare: they are compiled for the
  // baseline ISA (baseline_headers.h), and GCC does not inline this ISA's code into them.
  struct Better {
    bool operator()(const Item& a, const Item& b) const { return better(a, b); }
  };
  static Item make(A value, int64_t index) { return Item(value, index); }
  static A value(const Item& c) { return c.value; }
  static int64_t index(const Item& c) { return c.index; }
};

// Packed: one uint64 per float candidate of a row shorter than 2^32, the order key in the high half
// and the complement of the index in the low half, so a larger integer is a better candidate and
// the standard algorithms compare with an inlined integer compare (for k = 64 on 1024-wide rows the
// out-of-line compares of the pairs were 40% of the time).
struct PackedItems {
  using Acc = float;
  using Item = uint64_t;
  using Better = std::greater<uint64_t>;
  static constexpr int64_t kMaxRow = int64_t(1) << 32;
  static Item make(float value, int64_t index) {
    return (uint64_t(order_key(value)) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(index));
  }
  static float value(Item c) {
    const uint32_t key = static_cast<uint32_t>(c >> 32), sign = 0x80000000u;
    const uint32_t bits = (key & sign) ? (key & ~sign) : ~key;  // order_key's inverse (NaN stays NaN)
    float v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
  }
  static int64_t index(Item c) { return 0xFFFFFFFFu - static_cast<uint32_t>(c); }
};

// The k best candidates seen so far. Candidates are appended to a buffer of about 2k; when it
// fills, nth_element keeps the k best and their worst becomes the threshold the vector filter
// compares against. That is amortized O(1) per candidate, where a heap pays O(log k) per insertion
// (a heap made k = 64 on 1024-wide rows slower than torch.softmax + torch.topk).
template <typename ItemsT>
class TopK {
 public:
  using Items = ItemsT;
  using A = typename Items::Acc;
  using Item = typename Items::Item;
  explicit TopK(int64_t k) : k_(k), capacity_(std::max<int64_t>(2 * k, k + 64)) { buf_.reserve(capacity_); }

  // Values not above this can never enter (ties lose to the earlier index): valid once full().
  A threshold() const { return Items::value(kth_); }
  bool full() const { return has_threshold_; }

  void offer(A value, int64_t index) {
    const Item c = Items::make(value, index);
    if (has_threshold_ && !typename Items::Better{}(c, kth_)) return;
    buf_.push_back(c);
    // The first prune comes as soon as k candidates exist, so the filter gets a threshold early.
    const int64_t size = static_cast<int64_t>(buf_.size());
    if (size == capacity_ || (!has_threshold_ && size == k_)) prune();
  }

  void reset() {
    buf_.clear();
    has_threshold_ = false;
  }

  // At least min(k, offered) best candidates, in no particular order.
  std::vector<Item>& candidates() {
    if (static_cast<int64_t>(buf_.size()) > k_) prune();
    return buf_;
  }

 private:
  void prune() {
    std::nth_element(buf_.begin(), buf_.begin() + (k_ - 1), buf_.end(), typename Items::Better{});
    buf_.resize(k_);
    kth_ = buf_[k_ - 1];  // the worst of the k best after nth_element
    has_threshold_ = true;
  }

  int64_t k_;
  int64_t capacity_;
  std::vector<Item> buf_;
  Item kth_{};
  bool has_threshold_ = false;
};

// For small k: the k best kept sorted, worst last, so the threshold tightens with every insertion
// (the buffer above only tightens it when it fills, so on a 1024-wide row with k = 1 about half of
// the row went through it). A random row offers about k (1 + ln(n / k)) candidates; each costs a
// binary search and a shift of at most k entries. Measured on 4096 x 1024 float32 (AVX2, 2
// threads): k = 1 and 8 are 1.4x and 1.2x torch with it, while k = 64 was slower than with the
// buffer (0.69x), so larger k keep the buffer.
constexpr int64_t kSortedMaxK = 16;

template <typename ItemsT>
class SortedTopK {
 public:
  using Items = ItemsT;
  using A = typename Items::Acc;
  using Item = typename Items::Item;
  explicit SortedTopK(int64_t k) : k_(k) { buf_.reserve(k); }

  A threshold() const { return Items::value(buf_.back()); }  // valid once full()
  bool full() const { return static_cast<int64_t>(buf_.size()) == k_; }

  void offer(A value, int64_t index) {
    const Item c = Items::make(value, index);
    const typename Items::Better better_than;
    if (full()) {
      if (!better_than(c, buf_.back())) return;
      buf_.pop_back();
    }
    // Before the first entry c is better than; an equal value (earlier index) stays ahead of c.
    buf_.insert(std::upper_bound(buf_.begin(), buf_.end(), c, better_than), c);
  }

  void reset() { buf_.clear(); }

  // The min(k, offered) best candidates, best first.
  std::vector<Item>& candidates() { return buf_; }

 private:
  int64_t k_;
  std::vector<Item> buf_;
};

// Offers the lanes of a vector pair (indices first, first + 1, ...) that can enter the top-k.
template <int64_t W, typename Select, typename V>
inline void offer_lanes(Select& topk, V a, V b, int64_t first) {
  using A = typename Select::A;
  // 64-bit: two vectors of 16 floats (AVX-512) make a 32-lane mask.
  uint64_t mask = (uint64_t(1) << (2 * W)) - 1;
  if (topk.full()) {
    // Lanes that are not <= the threshold: greater, or NaN.
    const V thr(topk.threshold());
    mask = uint64_t(uint32_t((a <= thr).zero_mask())) | (uint64_t(uint32_t((b <= thr).zero_mask())) << W);
  }
  if (mask == 0) return;
  alignas(64) A lanes[2 * W];
  a.store(lanes);
  b.store(lanes + W);
  // Only the lanes that passed, in index order (ties keep the lower index ahead).
  for (; mask != 0; mask &= mask - 1) {
    const int l = __builtin_ctzll(mask);
    topk.offer(lanes[l], first + l);
  }
}

// State and top-k of n contiguous elements whose first element has index `first`.
template <typename T, typename Select>
State<acc_t<T>> scan_topk(const T* x, int64_t n, int64_t first, acc_t<T> s, Select& topk) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  return scan_contiguous(
      x, n, s, [&](V a, V b, int64_t offset) { offer_lanes<W>(topk, a, b, first + offset); },
      [&](A v, int64_t offset) { topk.offer(v, first + offset); });
}

// The state (one kRowPiece piece, as scan_contiguous folds it) and top-k of n <= kRowPiece
// contiguous elements whose first element has index `first`.
template <typename T, typename Select>
State<double> scan_topk_piece(const T* x, int64_t n, int64_t first, acc_t<T> s, Select& topk) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t W = V::size();
  return scan_piece(
      x, n, s,
      [&](V a, V b, int64_t offset) { offer_lanes<W>(topk, a, b, first + offset); },
      [&](A v, int64_t offset) { topk.offer(v, first + offset); });
}

// A selection that skips the row's excluded tokens (sorted ids). Only candidates that pass the
// vector filter reach the binary search, so the scan stays one compare per element.
template <typename SelectT>
class Excluding {
 public:
  using Items = typename SelectT::Items;
  using A = typename Items::Acc;
  explicit Excluding(int64_t k) : inner_(k) {}
  void exclude(const int64_t* sorted_ids, int64_t count) { ids_ = sorted_ids, count_ = count; }
  A threshold() const { return inner_.threshold(); }
  bool full() const { return inner_.full(); }
  void offer(A value, int64_t index) {
    if (!std::binary_search(ids_, ids_ + count_, index)) inner_.offer(value, index);
  }
  void reset() { inner_.reset(); }
  auto& candidates() { return inner_.candidates(); }

 private:
  SelectT inner_;
  const int64_t* ids_ = nullptr;
  int64_t count_ = 0;
};

template <typename S>
struct TypeTag {
  using type = S;
};

template <typename S>
struct IsExcluding : std::false_type {};
template <typename S>
struct IsExcluding<Excluding<S>> : std::true_type {};

template <typename Select, typename T>
void topk_rows(const T* x, int64_t rows, int64_t n, int64_t k, acc_t<T> s, bool log, T* values,
               int64_t* indices, acc_t<T>* m_out, acc_t<T>* d_out, const int64_t* excluded = nullptr,
               int64_t excluded_width = 0, T* excluded_values = nullptr) {
  using A = acc_t<T>;
  constexpr bool kExcluding = IsExcluding<Select>::value;
  const RowSplit split = plan_row_split(rows, n);
  // Pieces shorter than k would only pad the merge; keep whole rows then.
  const RowSplit plan = split.chunk >= k ? split : RowSplit{1, n};

  using Items = typename Select::Items;
  using Item = typename Items::Item;
  auto prepare = [&](Select& topk, int64_t r) {
    if constexpr (kExcluding) topk.exclude(excluded + r * excluded_width, excluded_width);
  };
  auto emit = [&](int64_t r, State<A> st, std::vector<Item>& cands) {
    st = finalize(st);
    const int64_t found = std::min<int64_t>(k, static_cast<int64_t>(cands.size()));  // < k only when excluding
    std::partial_sort(cands.begin(), cands.begin() + found, cands.end(), typename Items::Better{});
    const Normalizer<A> nz(st);
    auto value_of = [&](A v) {
      const A z = (v - nz.m) * s;
      return static_cast<T>(log ? z - nz.log_d : std::exp(z) * nz.inv_d);
    };
    for (int64_t j = 0; j < found; ++j) {
      values[r * k + j] = value_of(Items::value(cands[j]));
      indices[r * k + j] = Items::index(cands[j]);
    }
    for (int64_t j = found; j < k; ++j) {
      values[r * k + j] = static_cast<T>(-std::numeric_limits<A>::infinity());
      indices[r * k + j] = -1;
    }
    if constexpr (kExcluding) {
      for (int64_t j = 0; j < excluded_width; ++j) {
        const int64_t t = excluded[r * excluded_width + j];
        if (t >= 0) excluded_values[r * excluded_width + j] = value_of(static_cast<A>(x[r * n + t]));
      }
    }
    m_out[r] = st.m * s;
    d_out[r] = st.d;
  };

  if (plan.chunks == 1) {
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      Select topk(k);
      for (int64_t r = begin; r < end; ++r) {
        topk.reset();  // keeps the buffer's allocation
        prepare(topk, r);
        const State<A> st = scan_topk(x + r * n, n, 0, s, topk);
        emit(r, st, topk.candidates());
      }
    });
    return;
  }
  // Rows split across threads: the state of every kRowPiece piece, folded in the fixed order as
  // scan_topk folds them on a whole row; the candidates of each thread's run of pieces of a row,
  // merged (the top-k of their union is exact however the pieces were shared out). The threads
  // share out the pieces of all the rows evenly (see for_each_piece in kernels/softmax.h).
  const int64_t P = row_pieces(n);
  std::vector<State<double>> states(rows * P);
  std::vector<std::vector<Item>> run_cands(rows * P);  // at the first piece of each run
  at::parallel_for(0, rows * P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end;) {
      const int64_t r = t / P, run_end = std::min(end, (r + 1) * P);
      Select topk(k);
      prepare(topk, r);
      for (int64_t u = t; u < run_end; ++u) {
        const int64_t i0 = (u % P) * kRowPiece;
        states[u] = scan_topk_piece(x + r * n + i0, std::min(kRowPiece, n - i0), i0, s, topk);
      }
      run_cands[t] = std::move(topk.candidates());
      t = run_end;
    }
  });
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      std::vector<Item> cands;
      for (int64_t p = 0; p < P; ++p) {
        auto& more = run_cands[r * P + p];
        cands.insert(cands.end(), more.begin(), more.end());
      }
      emit(r, fold_pieces(states.data() + r * P, P, s), cands);
    }
  });
}

// Calls fn(TypeTag<Select>{}) with the selection for the k best of rows of n values of type A:
// sorted for small k, the pruned buffer for larger; packed items for float rows shorter than 2^32.
// Every choice keeps the same total order (key, then index), so all select the same candidates.
template <typename A, typename Fn>
void with_selection(int64_t n, int64_t k, Fn&& fn) {
  auto run = [&](auto items) {
    using Items = decltype(items);
    if (k <= kSortedMaxK) {
      fn(TypeTag<SortedTopK<Items>>{});
    } else {
      fn(TypeTag<TopK<Items>>{});
    }
  };
  if constexpr (std::is_same_v<A, float>) {
    if (n < PackedItems::kMaxRow) return run(PackedItems{});
  }
  run(PairItems<A>{});
}

template <typename T>
void topk_kernel(const T* x, int64_t rows, int64_t n, int64_t k, acc_t<T> s, bool log, T* values,
                 int64_t* indices, acc_t<T>* m_out, acc_t<T>* d_out, const int64_t* excluded,
                 int64_t excluded_width, T* excluded_values) {
  with_selection<acc_t<T>>(n, k, [&](auto tag) {
    using Select = typename decltype(tag)::type;
    if (excluded != nullptr) {
      topk_rows<Excluding<Select>>(x, rows, n, k, s, log, values, indices, m_out, d_out, excluded,
                                   excluded_width, excluded_values);
    } else {
      topk_rows<Select>(x, rows, n, k, s, log, values, indices, m_out, d_out);
    }
  });
}

// dx = s * (G * w - p * C) with p = softmax(x / t) recomputed from (m, d), G the scatter-add of the
// value gradients g at the top-k indices, and
//   softmax values:     w = p, C = sum_j g_j p_{i_j}
//   log-softmax values: w = 1, C = sum_j g_j.
// Written as one pass of dx = -s * p * C, then one correction per distinct index.
//
// The exponent is (x - M) * s with M the raw row max, as in the forward, so 1e4-scale logits keep
// their digits. M is the largest x among the top-k (the top-1 is the row max); where the indices
// did not come from the forward and that disagrees with the state's max, the offset M*s - m makes
// the formula exact anyway. When every index points at a -inf entry, M is the row max itself.
template <typename T>
void topk_backward_kernel(const T* g, const T* x, const int64_t* idx, const acc_t<T>* m_in,
                          const acc_t<T>* d_in, T* dx, int64_t rows, int64_t n, int64_t k,
                          acc_t<T> s, bool log) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  using IO = VecIO<T>;
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<std::pair<int64_t, A>> grads;
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * n;
      T* dxr = dx + r * n;
      const int64_t* ir = idx + r * k;
      // Checked here rather than by a separate pass over the indices (exceptions leave parallel_for).
      for (int64_t j = 0; j < k; ++j) {
        TORCH_CHECK_INDEX(ir[j] >= 0 && ir[j] < n, "online_softmax.softmax_topk_backward: indices must "
                          "lie in [0, ", n, "), got ", ir[j]);
      }
      A M = static_cast<A>(xr[ir[0]]);
      for (int64_t j = 1; j < k; ++j) M = nan_max(M, static_cast<A>(xr[ir[j]]));
      const Normalizer<A> nz(State<A>{m_in[r], d_in[r]});
      // Every index at a -inf entry: their p are 0; take the exponent against the row max instead
      // (-inf - -inf would make every p NaN).
      if (M == -std::numeric_limits<A>::infinity() && std::isfinite(m_in[r])) M = m_in[r] / s;
      const A offset = (static_cast<A>(M * s) == m_in[r]) ? A(0) : M * s - m_in[r];
      auto prob = [&](A xv) { return std::exp((xv - M) * s + offset) * nz.inv_d; };
      // Sum the gradients of repeated indices (the forward never repeats one; a direct call may).
      grads.clear();
      for (int64_t j = 0; j < k; ++j) grads.emplace_back(ir[j], static_cast<A>(g[r * k + j]));
      std::sort(grads.begin(), grads.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
      int64_t unique = 0;
      for (int64_t j = 0; j < k; ++j) {
        if (unique > 0 && grads[unique - 1].first == grads[j].first) {
          grads[unique - 1].second += grads[j].second;
        } else {
          grads[unique++] = grads[j];
        }
      }
      A C = 0;
      for (int64_t j = 0; j < unique; ++j) {
        C += log ? grads[j].second : grads[j].second * prob(static_cast<A>(xr[grads[j].first]));
      }
      const V vs(s), vM(M), voff(offset), vcoef(-s * C * nz.inv_d);
      int64_t i = 0;
      for (; i + IO::kStep <= n; i += IO::kStep) {
        V a, b;
        IO::load2(xr + i, a, b);
        IO::store2(dxr + i, vexp((a - vM) * vs + voff) * vcoef, vexp((b - vM) * vs + voff) * vcoef);
      }
      for (; i < n; ++i) dxr[i] = static_cast<T>(-s * prob(static_cast<A>(xr[i])) * C);
      for (int64_t j = 0; j < unique; ++j) {
        const int64_t at = grads[j].first;
        const A p = prob(static_cast<A>(xr[at]));
        dxr[at] = static_cast<T>(s * (grads[j].second * (log ? A(1) : p) - p * C));
      }
    }
  });
}

void topk_entry(const TopKCall& c) {
  with_dtype(c.x_dtype, "softmax_topk", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    topk_kernel(static_cast<const T*>(c.x), c.rows, c.n, c.k, static_cast<A>(1.0 / c.temperature), c.log,
                static_cast<T*>(c.values), c.indices, static_cast<A*>(c.max), static_cast<A*>(c.sumexp),
                c.excluded, c.excluded_width, static_cast<T*>(c.excluded_values));
  });
}

void topk_backward_entry(const TopKBackwardCall& c) {
  with_dtype(c.x_dtype, "softmax_topk_backward", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    topk_backward_kernel(static_cast<const T*>(c.grad_values), static_cast<const T*>(c.x), c.indices,
                         static_cast<const A*>(c.max), static_cast<const A*>(c.sumexp), static_cast<T*>(c.dx), c.rows,
                         c.n, c.k, static_cast<A>(1.0 / c.temperature), c.log);
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace online_softmax::cpu
