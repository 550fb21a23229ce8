// The online softmax state (m, d) on the CPU: one scalar form, one lane-wise vector form, and the
// merge that combines them. Every CPU kernel (forward, stats, top-k) is built from these pieces.
//
// Conventions inside the kernels:
//  * s = 1 / temperature. A state over raw values x holds m = max(x) and d = sum(exp((x - m) * s)),
//    so softmax(x / t) = exp((x - m) * s) / d. Subtracting before scaling keeps (x - m) exact for
//    1e4-scale logits.
//  * While scanning, m starts at the lowest finite value instead of -inf, so that a -inf element
//    contributes exp(-inf) = 0 rather than exp(-inf - -inf) = NaN, and no per-element guard is
//    needed. `finalize` maps a state that saw nothing finite (d == 0) back to m = -inf, the identity
//    of the merge, and marks rows whose max is +inf or NaN with d = NaN (torch.softmax returns NaN
//    for the whole row in both cases).
#pragma once

#if !defined(CPU_CAPABILITY)
#error "the CPU kernels are compiled through csrc/cpu/isa/<capability>.cpp"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace online_softmax::cpu {
inline namespace CPU_CAPABILITY {  // one copy per ISA (csrc/cpu/kernels/common.h)

using at::vec::Vectorized;

// float for float32/float16/bfloat16, double for float64.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

template <typename A>
inline A nan_max(A a, A b) {
  return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<A>::quiet_NaN() : (a > b ? a : b);
}

template <typename A>
struct State {
  A m = std::numeric_limits<A>::lowest();
  A d = 0;
};

// exp((m_old - m_new) * s), exactly 1 when the maxima agree (also -inf == -inf: the merge identity).
template <typename A>
inline A rescale_factor(A m_old, A m_new, A s) {
  return m_old == m_new ? A(1) : std::exp((m_old - m_new) * s);
}

template <typename A>
inline void update(State<A>& st, A x, A s) {
  const A m_new = nan_max(st.m, x);
  if (!(m_new == st.m)) {
    st.d *= rescale_factor(st.m, m_new, s);
    st.m = m_new;
  }
  st.d += std::exp((x - st.m) * s);
}

// The one merge: m = max(m1, m2), d = d1 exp((m1 - m) s) + d2 exp((m2 - m) s).
template <typename A>
inline State<A> merge(State<A> a, State<A> b, A s) {
  State<A> r;
  r.m = nan_max(a.m, b.m);
  r.d = a.d * rescale_factor(a.m, r.m, s) + b.d * rescale_factor(b.m, r.m, s);
  return r;
}

template <typename A>
inline State<A> finalize(State<A> st) {
  if (st.d == A(0)) st.m = -std::numeric_limits<A>::infinity();
  if (std::isnan(st.m) || st.m == std::numeric_limits<A>::infinity())
    st.d = std::numeric_limits<A>::quiet_NaN();
  return st;
}

// What the output pass needs from a finalized state. A row without a finite max (all -inf, or
// containing +inf/NaN) gets NaN factors, so every output of that row is NaN, as in torch.
template <typename A>
struct Normalizer {
  A m;       // subtracted before scaling
  A inv_d;   // softmax factor
  A log_d;   // log-softmax offset
  explicit Normalizer(State<A> st) {
    const bool finite = st.m > -std::numeric_limits<A>::infinity() &&
                        st.m < std::numeric_limits<A>::infinity();
    m = finite ? st.m : A(0);
    inv_d = finite ? A(1) / st.d : std::numeric_limits<A>::quiet_NaN();
    log_d = finite ? std::log(st.d) : std::numeric_limits<A>::quiet_NaN();
  }
};

// Loads and stores two vectors' worth of T as Vectorized<acc_t<T>> (16 floats = 32 bytes of half).
template <typename T>
struct VecIO {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  static constexpr int64_t kWidth = V::size();
  static constexpr int64_t kStep = 2 * kWidth;

  static inline void load2(const T* p, V& a, V& b) {
    if constexpr (std::is_same_v<T, A>) {
      a = V::loadu(p);
      b = V::loadu(p + kWidth);
    } else {
      at::vec::load_to_float(p, a, b);
    }
  }
  static inline void store2(T* p, V a, V b) {
    if constexpr (std::is_same_v<T, A>) {
      a.store(p);
      b.store(p + kWidth);
    } else {
      at::vec::convert_from_float<T>(a, b).store(p);
    }
  }
};

template <typename A>
inline Vectorized<A> vexp(Vectorized<A> v) {
  // ATen's polynomial exp (float: <= 20 ulp, double: Sleef 1 ulp). Its arguments here are <= 0 or
  // -inf; NaN arguments only occur in rows that finalize() already marked NaN.
  return v.exp_u20();
}

// exp that keeps NaN, for arguments that may be NaN: log-softmax outputs of NaN rows, or x - lse
// where every logit is -inf; their gradients must be NaN, as in torch.
template <typename A>
inline Vectorized<A> vexp_keep_nan(Vectorized<A> v) {
  return Vectorized<A>::blendv(vexp(v), v, v.isnan());
}

// Lane-wise online state: lane l of (m, d) is the state of every element that passed through lane
// l. Strided layouts keep one LaneState per group of independent rows (one row per lane).
template <typename A>
struct LaneState {
  using V = Vectorized<A>;
  static constexpr int kAllLanes = (1 << V::size()) - 1;
  V m = V(std::numeric_limits<A>::lowest());
  V d = V(A(0));

  inline void update(V a, V s) {
    const V m_new = at::vec::maximum(m, a);
    // The maximum settles early in almost every row, so the rescale exp is rarely taken.
    if ((m_new - m).zero_mask() != kAllLanes) {
      // Lanes whose max stayed keep d untouched (not d * exp(0)), so a lane's result never depends
      // on what its neighbours (other rows, in the strided kernels) did.
      d = V::blendv(d * vexp((m - m_new) * s), d, m_new == m);
      m = m_new;
    }
    d = d + vexp((a - m) * s);
  }
  // Lane i as a scalar state.
  inline void lanes(A* m_out, A* d_out) const {
    m.store(m_out);
    d.store(d_out);
  }
};

// max(lowest, x[0..n)), NaN if any x is NaN.
template <typename T>
inline acc_t<T> block_max(const T* x, int64_t n) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  using IO = VecIO<T>;
  V vm(std::numeric_limits<A>::lowest()), vm2 = vm;
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    V a, b;
    IO::load2(x + i, a, b);
    vm = at::vec::maximum(vm, a);  // propagates NaN
    vm2 = at::vec::maximum(vm2, b);
  }
  alignas(64) A lanes[V::size()];
  at::vec::maximum(vm, vm2).store(lanes);
  A m = lanes[0];
  for (int l = 1; l < V::size(); ++l) m = nan_max(m, lanes[l]);
  for (; i < n; ++i) m = nan_max(m, static_cast<A>(x[i]));
  return m;
}

// The state (m_b, d_b) of one block of n elements, read twice while it sits in L1: once for its max
// m_b, once for d_b = sum(exp((x - m_b) s)). One exp per element and no branch, where the lane-wise
// online update pays a rescale exp and a mispredicted branch whenever some lane's max rises (with
// 16 float lanes, most steps of a 1024-element row). Every element is shown once, in order, with
// its exp: to on_vector(offset, a, b, exp_a, exp_b) a vector pair at a time, and past the last
// whole pair to on_scalar(offset, value, exp).
// block_state_at takes the block's max m = block_max(x, n) from the caller, for scans that need it
// beside the exps (the entropy's (x - m) s).
template <typename T, typename OnVector, typename OnScalar>
inline State<acc_t<T>> block_state_at(const T* x, int64_t n, acc_t<T> m, acc_t<T> s, OnVector&& on_vector,
                                      OnScalar&& on_scalar) {
  using A = acc_t<T>;
  using IO = VecIO<T>;
  using V = Vectorized<A>;
  const V vm(m), vs(s);
  V d0(A(0)), d1(A(0));
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    V a, b;
    IO::load2(x + i, a, b);
    const V ea = vexp((a - vm) * vs), eb = vexp((b - vm) * vs);
    d0 = d0 + ea;
    d1 = d1 + eb;
    on_vector(i, a, b, ea, eb);
  }
  A d = at::vec::vec_reduce_all<A>([](V u, V v) { return u + v; }, d0 + d1);
  for (; i < n; ++i) {
    const A v = static_cast<A>(x[i]);
    const A e = std::exp((v - m) * s);
    d += e;
    on_scalar(i, v, e);
  }
  return State<A>{m, d};
}

template <typename T, typename OnVector, typename OnScalar>
inline State<acc_t<T>> block_state(const T* x, int64_t n, acc_t<T> s, OnVector&& on_vector,
                                   OnScalar&& on_scalar) {
  return block_state_at(x, n, block_max(x, n), s, on_vector, on_scalar);
}

// Rows are scanned in blocks of this many elements (a multiple of every VecIO step). The blocks'
// states merge in double, so the rounding error of d does not grow with the row length (a
// 2^31-element row of equal values is off by 1e-3 in float32 when one float sum runs the row).
constexpr int64_t kScanBlock = 1024;

// The fixed split of every CPU row reduction: pieces of kRowPiece elements from the row's start
// (the last one shorter), each reduced alone, then merged left to right. A function of the row's
// length only, so a row gets the same bits whether one thread runs it whole or several threads
// run its pieces, and whatever the thread count or the other rows of the batch. Rows up to this
// length are one piece. Threads take whole pieces (row_split.h).
constexpr int64_t kRowPiece = 16 * kScanBlock;

// The one fold of the fixed tree: a block's state into its piece's, and a piece's into the row's,
// in double, left to right from the identity.
// Into the identity (the first block of a piece, the first piece of a row) the state is taken as
// it is: the merge would give the same state and costs a double exp, a tenth of a 1024-wide row.
template <typename B, typename A>
inline void fold(State<double>& total, State<B> st, A s) {
  const State<double> next{static_cast<double>(st.m), static_cast<double>(st.d)};
  if (total.d == 0 && total.m == std::numeric_limits<double>::lowest()) {
    total = next;
  } else {
    total = merge(total, next, static_cast<double>(s));
  }
}

template <typename A>
inline State<A> to_acc(State<double> st) {
  return State<A>{static_cast<A>(st.m), static_cast<A>(st.d)};
}

// The state of one piece (n <= kRowPiece elements): its blocks folded left to right.
// `on_step(a, b, offset)` sees every vector pair and `on_scalar(value, offset)` every tail element,
// in order, so the fused top-k can ride the scan.
template <typename T, typename OnStep, typename OnScalar>
inline State<double> scan_piece(const T* x, int64_t n, acc_t<T> s, OnStep&& on_step, OnScalar&& on_scalar) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  State<double> total;
  for (int64_t block = 0; block < n; block += kScanBlock) {
    fold(total,
         block_state(
             x + block, std::min(kScanBlock, n - block), s,
             [&](int64_t i, V a, V b, V, V) { on_step(a, b, block + i); },
             [&](int64_t i, A v, A) { on_scalar(v, block + i); }),
         s);
  }
  return total;
}

template <typename T>
inline State<double> scan_piece(const T* x, int64_t n, acc_t<T> s) {
  return scan_piece(x, n, s, [](auto, auto, int64_t) {}, [](auto, int64_t) {});
}

// The row's state from its pieces' states, in the fixed order.
template <typename A>
inline State<A> fold_pieces(const State<double>* pieces, int64_t count, A s) {
  State<double> total;
  for (int64_t p = 0; p < count; ++p) fold(total, pieces[p], s);
  return to_acc<A>(total);
}

// The un-finalized state of a whole row of n contiguous elements, in the fixed tree above.
template <typename T, typename OnStep, typename OnScalar>
inline State<acc_t<T>> scan_contiguous(const T* x, int64_t n, acc_t<T> s, OnStep&& on_step,
                                       OnScalar&& on_scalar) {
  using A = acc_t<T>;
  State<double> total;
  for (int64_t p = 0; p < n; p += kRowPiece) {
    const State<double> piece = scan_piece(
        x + p, std::min(kRowPiece, n - p), s, [&](auto a, auto b, int64_t i) { on_step(a, b, p + i); },
        [&](auto v, int64_t i) { on_scalar(v, p + i); });
    fold(total, piece, s);
  }
  return to_acc<A>(total);
}

template <typename T>
inline State<acc_t<T>> scan_contiguous(const T* x, int64_t n, acc_t<T> s) {
  return scan_contiguous(x, n, s, [](auto, auto, int64_t) {}, [](auto, int64_t) {});
}

// y = softmax or log-softmax of n contiguous elements, given the row's normalizer.
template <typename T, typename O>
inline void write_contiguous(const T* x, O* y, int64_t n, const Normalizer<acc_t<T>>& nz,
                             acc_t<T> s, bool log) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  static_assert(std::is_same_v<A, acc_t<O>>, "input and output must share the accumulation type");
  const V vm(nz.m), vs(s), vinv(nz.inv_d), vlogd(nz.log_d);
  int64_t i = 0;
  if (log) {
    for (; i + VecIO<T>::kStep <= n; i += VecIO<T>::kStep) {
      V a, b;
      VecIO<T>::load2(x + i, a, b);
      VecIO<O>::store2(y + i, (a - vm) * vs - vlogd, (b - vm) * vs - vlogd);
    }
    for (; i < n; ++i) y[i] = static_cast<O>((static_cast<A>(x[i]) - nz.m) * s - nz.log_d);
  } else {
    for (; i + VecIO<T>::kStep <= n; i += VecIO<T>::kStep) {
      V a, b;
      VecIO<T>::load2(x + i, a, b);
      VecIO<O>::store2(y + i, vexp((a - vm) * vs) * vinv, vexp((b - vm) * vs) * vinv);
    }
    for (; i < n; ++i) y[i] = static_cast<O>(std::exp((static_cast<A>(x[i]) - nz.m) * s) * nz.inv_d);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace online_softmax::cpu
