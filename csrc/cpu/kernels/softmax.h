// CPU forward (softmax / log-softmax) and stats kernels: one pass for (m, d) (scan_contiguous),
// one pass for the output. Compiled once per ISA (csrc/cpu/isa/); called through the table of dispatch.h.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "the CPU kernels are compiled through csrc/cpu/isa/<capability>.cpp"
#endif

#include "cpu/kernels/common.h"

namespace online_softmax::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// ---- rows contiguous along the softmax dim (inner == 1) ----

// Calls fn(r, p, i0, len) for every kRowPiece piece p of every row r (elements [i0, i0 + len)),
// in parallel. The threads share out the pieces of all the rows evenly (a row's pieces can be
// spread over two threads): chunks of whole pieces of each row would leave the threads unequal
// work (3 rows x 262144 in 9 chunks of 6, 6 and 4 pieces over 2 threads: 28 against 20 pieces).
template <typename Fn>
void for_each_piece(int64_t rows, int64_t n, Fn&& fn) {
  const int64_t P = row_pieces(n);
  at::parallel_for(0, rows * P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / P, p = t % P, i0 = p * kRowPiece;
      fn(r, p, i0, std::min(kRowPiece, n - i0));
    }
  });
}

// Finalized states of `rows` contiguous rows of n elements, splitting long rows across threads
// (the same bits either way: scan_contiguous and fold_pieces fold the same pieces in one order).
template <typename T>
std::vector<State<acc_t<T>>> contiguous_row_states(const T* x, int64_t rows, int64_t n,
                                                   acc_t<T> s, const RowSplit& split) {
  using A = acc_t<T>;
  std::vector<State<A>> states(rows);
  if (split.chunks == 1) {
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) states[r] = finalize(scan_contiguous(x + r * n, n, s));
    });
    return states;
  }
  const int64_t P = row_pieces(n);
  std::vector<State<double>> pieces(rows * P);
  for_each_piece(rows, n, [&](int64_t r, int64_t p, int64_t i0, int64_t len) {
    pieces[r * P + p] = scan_piece(x + r * n + i0, len, s);
  });
  for (int64_t r = 0; r < rows; ++r) states[r] = finalize(fold_pieces(pieces.data() + r * P, P, s));
  return states;
}

// ---- softmax with one exp per element, for rows whose output stays in cache ----
//
// Writing softmax after scan_contiguous would pay a second exp per element. Here the exps that
// block_state computes for d_b are stored as well. A second pass over the row's exps, in cache,
// multiplies block b by exp((m_b - M) s) / D: one exp per block.

// Rows whose exps (as float or double) fit in this many bytes take the one-exp path.
constexpr int64_t kOneExpMaxBytes = 4 * 1024 * 1024;

// The state of one piece (len <= kRowPiece), its blocks' maxima into block_m and, with kStore, its
// exps (the very values block_state sums) into e.
template <bool kStore, typename T>
State<double> piece_one_exp(const T* x, int64_t len, acc_t<T> s, acc_t<T>* e, acc_t<T>* block_m) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  State<double> total;
  for (int64_t i0 = 0; i0 < len; i0 += kScanBlock) {
    A* exps = kStore ? e + i0 : nullptr;
    const State<A> st = block_state(
        x + i0, std::min(kScanBlock, len - i0), s,
        [&](int64_t i, V, V, V ea, V eb) {
          if constexpr (kStore) {
            ea.store(exps + i);
            eb.store(exps + i + V::size());
          }
        },
        [&](int64_t i, A, A ev) {
          if constexpr (kStore) exps[i] = ev;
        });
    block_m[i0 / kScanBlock] = st.m;
    fold(total, st, s);
  }
  return total;
}

// y = e * f over one block.
template <typename A, typename O>
inline void rescale_block(const A* e, O* y, int64_t len, A f) {
  using V = Vectorized<A>;
  const V vf(f);
  int64_t i = 0;
  for (; i + VecIO<O>::kStep <= len; i += VecIO<O>::kStep) {
    VecIO<O>::store2(y + i, V::loadu(e + i) * vf, V::loadu(e + i + V::size()) * vf);
  }
  for (; i < len; ++i) y[i] = static_cast<O>(e[i] * f);
}

// rescale_block with the exps recomputed exactly as block_state made them (same vector and scalar
// positions), for the split rows whose output type cannot hold them: the same bits as the
// one-exp row without a scratch row per task.
template <typename T, typename O>
inline void rewrite_block(const T* x, O* y, int64_t len, acc_t<T> m_b, acc_t<T> s, acc_t<T> f) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  using IO = VecIO<T>;
  static_assert(IO::kStep == VecIO<O>::kStep, "one vector step for input and output");
  const V vm(m_b), vs(s), vf(f);
  int64_t i = 0;
  for (; i + IO::kStep <= len; i += IO::kStep) {
    V a, b;
    IO::load2(x + i, a, b);
    VecIO<O>::store2(y + i, vexp((a - vm) * vs) * vf, vexp((b - vm) * vs) * vf);
  }
  for (; i < len; ++i) y[i] = static_cast<O>(std::exp((static_cast<A>(x[i]) - m_b) * s) * f);
}

// y = softmax(x * s) of one row of n <= kOneExpMaxBytes / sizeof(A) elements. `e` holds the row's
// exps: y itself when O is the accumulation type, else scratch (so half outputs round once).
template <typename T, typename O>
void softmax_row_one_exp(const T* x, O* y, acc_t<T>* e, int64_t n, acc_t<T> s) {
  using A = acc_t<T>;
  constexpr int64_t kMaxBlocks = kOneExpMaxBytes / int64_t(sizeof(A)) / kScanBlock + 1;
  A block_m[kMaxBlocks];
  State<double> total;
  for (int64_t p = 0; p < n; p += kRowPiece) {
    fold(total, piece_one_exp<true>(x + p, std::min(kRowPiece, n - p), s, e + p, block_m + p / kScanBlock), s);
  }
  const Normalizer<A> nz(finalize(to_acc<A>(total)));
  for (int64_t i0 = 0; i0 < n; i0 += kScanBlock) {
    // Rows without a finite max have a NaN inv_d: every output NaN, as in torch.
    const A f = rescale_factor(block_m[i0 / kScanBlock], nz.m, s) * nz.inv_d;
    rescale_block(e + i0, y + i0, std::min(kScanBlock, n - i0), f);
  }
}

template <typename T, typename O>
void forward_contiguous(const T* x, O* y, int64_t rows, int64_t n, acc_t<T> s, bool log) {
  using A = acc_t<T>;
  const RowSplit split = plan_row_split(rows, n);
  const bool one_exp = !log && n * int64_t(sizeof(A)) <= kOneExpMaxBytes;
  if (split.chunks == 1 && one_exp) {
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      std::vector<A> scratch(std::is_same_v<O, A> ? 0 : n);
      for (int64_t r = begin; r < end; ++r) {
        A* e = std::is_same_v<O, A> ? reinterpret_cast<A*>(y + r * n) : scratch.data();
        softmax_row_one_exp(x + r * n, y + r * n, e, n, s);
      }
    });
    return;
  }
  if (split.chunks == 1) {
    // Each task owns whole rows: the second read of a row comes from cache, not memory.
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const Normalizer<A> nz(finalize(scan_contiguous(x + r * n, n, s)));
        write_contiguous(x + r * n, y + r * n, n, nz, s, log);
      }
    });
    return;
  }
  // Rows split across threads, computing the pieces and outputs of the whole-row paths above.
  const int64_t P = row_pieces(n), B = (n + kScanBlock - 1) / kScanBlock;
  std::vector<State<double>> pieces(rows * P);
  std::vector<A> block_m(one_exp ? rows * B : 0);
  for_each_piece(rows, n, [&](int64_t r, int64_t p, int64_t i0, int64_t len) {
    const T* xp = x + r * n + i0;
    if (!one_exp) {
      pieces[r * P + p] = scan_piece(xp, len, s);
    } else if constexpr (std::is_same_v<O, A>) {
      pieces[r * P + p] = piece_one_exp<true>(xp, len, s, y + r * n + i0, block_m.data() + r * B + i0 / kScanBlock);
    } else {
      pieces[r * P + p] = piece_one_exp<false>(xp, len, s, static_cast<A*>(nullptr), block_m.data() + r * B + i0 / kScanBlock);
    }
  });
  std::vector<Normalizer<A>> nz;
  nz.reserve(rows);
  for (int64_t r = 0; r < rows; ++r) nz.emplace_back(finalize(fold_pieces(pieces.data() + r * P, P, s)));
  for_each_piece(rows, n, [&](int64_t r, int64_t, int64_t i0, int64_t len) {
    const int64_t offset = r * n + i0;
    if (!one_exp) {
      write_contiguous(x + offset, y + offset, len, nz[r], s, log);
      return;
    }
    for (int64_t b0 = 0; b0 < len; b0 += kScanBlock) {
      const A m_b = block_m[r * B + (i0 + b0) / kScanBlock];
      const A f = rescale_factor(m_b, nz[r].m, s) * nz[r].inv_d;
      const int64_t blen = std::min(kScanBlock, len - b0);
      if constexpr (std::is_same_v<O, A>) {
        rescale_block(y + offset + b0, y + offset + b0, blen, f);
      } else {
        rewrite_block(x + offset + b0, y + offset + b0, blen, m_b, s, f);
      }
    }
  });
}

// ---- softmax dim with stride `inner` > 1: vectorize across neighbouring rows ----
//
// For a fixed outer index, rows i and i+1 are adjacent in memory at every position j of the
// softmax dim, so one vector holds one element of each of several rows and the lane-wise state
// needs no horizontal merge. Leftover rows (inner not a multiple of the vector step) run the same
// lane arithmetic on a zero-padded copy, so a row's bits do not depend on where along inner it
// sits, nor on inner or outer.

// Runs body(load, store) for one block of `lanes` neighbouring rows starting at x_base / y_base:
// load(j, a, b) reads position j of the rows as a vector pair, store(j, a, b) writes it.
template <typename T, typename O, typename Body>
inline void with_lane_io(const T* x_base, O* y_base, int64_t inner, int64_t lanes, Body&& body) {
  using V = Vectorized<acc_t<T>>;
  constexpr int64_t kStep = VecIO<T>::kStep;
  if (lanes == kStep) {
    body([&](int64_t j, V& a, V& b) { VecIO<T>::load2(x_base + j * inner, a, b); },
         [&](int64_t j, V a, V b) { VecIO<O>::store2(y_base + j * inner, a, b); });
    return;
  }
  alignas(64) T in[kStep] = {};
  alignas(64) O out[kStep] = {};
  body(
      [&](int64_t j, V& a, V& b) {
        for (int64_t l = 0; l < lanes; ++l) in[l] = x_base[j * inner + l];
        VecIO<T>::load2(in, a, b);
      },
      [&](int64_t j, V a, V b) {
        VecIO<O>::store2(out, a, b);
        for (int64_t l = 0; l < lanes; ++l) y_base[j * inner + l] = out[l];
      });
}

template <typename T, typename Sink>
void strided_states(const T* x, const RowLayout& g, acc_t<T> s, Sink&& sink) {
  using A = acc_t<T>;
  using IO = VecIO<T>;
  using V = Vectorized<A>;
  for_each_row_block(g, IO::kStep, [&](int64_t o, int64_t i0, int64_t lanes) {
    alignas(64) A ms[IO::kStep];
    alignas(64) A ds[IO::kStep];
    const T* base = x + o * g.size * g.inner + i0;
    with_lane_io(base, static_cast<T*>(nullptr), g.inner, lanes, [&](auto&& load, auto&&) {
      // Lanes flush into double-precision states every kStridedBlock positions: here one lane
      // sums one row alone, so the block must be short (see kScanBlock).
      constexpr int64_t kStridedBlock = 1024;
      State<double> rows[IO::kStep];
      const V vs(s);
      for (int64_t j0 = 0; j0 < g.size; j0 += kStridedBlock) {
        LaneState<A> lo, hi;
        for (int64_t j = j0; j < std::min(g.size, j0 + kStridedBlock); ++j) {
          V a, b;
          load(j, a, b);
          lo.update(a, vs);
          hi.update(b, vs);
        }
        lo.lanes(ms, ds);
        hi.lanes(ms + IO::kWidth, ds + IO::kWidth);
        for (int64_t l = 0; l < lanes; ++l) fold(rows[l], State<A>{ms[l], ds[l]}, s);
      }
      for (int64_t l = 0; l < lanes; ++l) {
        const State<A> st = finalize(to_acc<A>(rows[l]));
        ms[l] = st.m;
        ds[l] = st.d;
      }
    });
    sink(o, i0, lanes, ms, ds);
  });
}

template <typename T, typename O>
void forward_strided(const T* x, O* y, const RowLayout& g, acc_t<T> s, bool log) {
  using A = acc_t<T>;
  using IO = VecIO<T>;
  using V = Vectorized<A>;
  strided_states(x, g, s, [&](int64_t o, int64_t i0, int64_t lanes, const A* ms, const A* ds) {
    const int64_t offset = o * g.size * g.inner + i0;
    alignas(64) A m[IO::kStep] = {}, inv[IO::kStep] = {}, logd[IO::kStep] = {};
    for (int64_t l = 0; l < lanes; ++l) {
      const Normalizer<A> nz(State<A>{ms[l], ds[l]});
      m[l] = nz.m;
      inv[l] = nz.inv_d;
      logd[l] = nz.log_d;
    }
    const V m0 = V::loadu(m), m1 = V::loadu(m + IO::kWidth);
    const V i0v = V::loadu(inv), i1v = V::loadu(inv + IO::kWidth);
    const V l0 = V::loadu(logd), l1 = V::loadu(logd + IO::kWidth);
    const V vs(s);
    with_lane_io(x + offset, y + offset, g.inner, lanes, [&](auto&& load, auto&& store) {
      for (int64_t j = 0; j < g.size; ++j) {
        V a, b;
        load(j, a, b);
        if (log) {
          store(j, (a - m0) * vs - l0, (b - m1) * vs - l1);
        } else {
          store(j, vexp((a - m0) * vs) * i0v, vexp((b - m1) * vs) * i1v);
        }
      }
    });
  });
}

template <typename T>
void stats_kernel(const T* x, acc_t<T>* m_out, acc_t<T>* d_out, const RowLayout& g, acc_t<T> s) {
  using A = acc_t<T>;
  // Reported maxima are of x / t; d is unchanged by the scaling.
  if (g.inner == 1) {
    const auto states = contiguous_row_states(x, g.outer, g.size, s, plan_row_split(g.outer, g.size));
    for (int64_t r = 0; r < g.outer; ++r) {
      m_out[r] = states[r].m * s;
      d_out[r] = states[r].d;
    }
    return;
  }
  strided_states(x, g, s, [&](int64_t o, int64_t i0, int64_t lanes, const A* ms, const A* ds) {
    for (int64_t l = 0; l < lanes; ++l) {
      m_out[o * g.inner + i0 + l] = ms[l] * s;
      d_out[o * g.inner + i0 + l] = ds[l];
    }
  });
}

template <typename T, typename O>
void forward_typed(const ForwardCall& c) {
  using A = acc_t<T>;
  const A s = static_cast<A>(1.0 / c.temperature);
  const T* x = static_cast<const T*>(c.x);
  O* y = static_cast<O*>(c.y);
  if (c.g.inner == 1) {
    forward_contiguous(x, y, c.g.outer, c.g.size, s, c.log);
  } else {
    forward_strided(x, y, c.g, s, c.log);
  }
}

void forward_entry(const ForwardCall& c) {
  with_dtype(c.x_dtype, "forward", [&](auto tag) {
    using T = decltype(tag);
    if (c.y_dtype == c.x_dtype) {
      forward_typed<T, T>(c);
    } else if constexpr (!std::is_same_v<acc_t<T>, T>) {
      forward_typed<T, float>(c);
    }
  });
}

void stats_entry(const StatsCall& c) {
  with_dtype(c.x_dtype, "stats", [&](auto tag) {
    using T = decltype(tag);
    using A = acc_t<T>;
    stats_kernel(static_cast<const T*>(c.x), static_cast<A*>(c.max), static_cast<A*>(c.sumexp), c.g,
                 static_cast<A>(1.0 / c.temperature));
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace online_softmax::cpu
