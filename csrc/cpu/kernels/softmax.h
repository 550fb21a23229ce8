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

// Finalized states of `rows` contiguous rows of n elements, splitting long rows across threads.
template <typename T>
std::vector<State<acc_t<T>>> contiguous_row_states(const T* x, int64_t rows, int64_t n,
                                                   acc_t<T> s, const RowSplit& split) {
  using A = acc_t<T>;
  std::vector<State<A>> partial(rows * split.chunks);
  at::parallel_for(0, rows * split.chunks, split.chunks == 1 ? row_grain(n) : 1,
                   [&](int64_t begin, int64_t end) {
                     for (int64_t t = begin; t < end; ++t) {
                       const int64_t r = t / split.chunks, c = t % split.chunks;
                       partial[t] = scan_contiguous(x + r * n + c * split.chunk,
                                                    split.length(c, n), s);
                     }
                   });
  std::vector<State<A>> states(rows);
  for (int64_t r = 0; r < rows; ++r) {
    State<A> st = partial[r * split.chunks];
    for (int64_t c = 1; c < split.chunks; ++c) st = merge(st, partial[r * split.chunks + c], s);
    states[r] = finalize(st);
  }
  return states;
}

// ---- softmax with one exp per element, for rows whose output stays in cache ----
//
// Writing softmax after scan_contiguous would pay a second exp per element. Here the exps that
// block_state computes for d_b are stored as well. A second pass over the row's exps, in cache,
// multiplies block b by exp((m_b - M) s) / D: one exp per block.

// Rows whose exps (as float or double) fit in this many bytes take the one-exp path.
constexpr int64_t kOneExpMaxBytes = 4 * 1024 * 1024;

// y = softmax(x * s) of one row of n <= kOneExpMaxBytes / sizeof(A) elements. `e` holds the row's
// exps: y itself when O is the accumulation type, else scratch (so half outputs round once).
template <typename T, typename O>
void softmax_row_one_exp(const T* x, O* y, acc_t<T>* e, int64_t n, acc_t<T> s) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  constexpr int64_t kMaxBlocks = kOneExpMaxBytes / int64_t(sizeof(A)) / kScanBlock + 1;
  A block_m[kMaxBlocks];
  const int64_t blocks = (n + kScanBlock - 1) / kScanBlock;
  State<double> total;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i0 = b * kScanBlock, len = std::min(kScanBlock, n - i0);
    A* exps = e + i0;
    const State<A> st = block_state(
        x + i0, len, s,
        [&](int64_t i, V, V, V ea, V eb) {
          ea.store(exps + i);
          eb.store(exps + i + V::size());
        },
        [&](int64_t i, A, A ev) { exps[i] = ev; });
    block_m[b] = st.m;
    total = merge(total, State<double>{st.m, st.d}, static_cast<double>(s));
  }
  const Normalizer<A> nz(finalize(State<A>{static_cast<A>(total.m), static_cast<A>(total.d)}));
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i0 = b * kScanBlock, len = std::min(kScanBlock, n - i0);
    // Rows without a finite max have a NaN inv_d: every output NaN, as in torch.
    const A f = rescale_factor(block_m[b], nz.m, s) * nz.inv_d;
    const V vf(f);
    int64_t i = i0;
    for (; i + VecIO<O>::kStep <= i0 + len; i += VecIO<O>::kStep) {
      VecIO<O>::store2(y + i, V::loadu(e + i) * vf, V::loadu(e + i + V::size()) * vf);
    }
    for (; i < i0 + len; ++i) y[i] = static_cast<O>(e[i] * f);
  }
}

template <typename T, typename O>
void forward_contiguous(const T* x, O* y, int64_t rows, int64_t n, acc_t<T> s, bool log) {
  using A = acc_t<T>;
  const RowSplit split = plan_row_split(rows, n);
  if (split.chunks == 1 && !log && n * int64_t(sizeof(A)) <= kOneExpMaxBytes) {
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
  const auto states = contiguous_row_states(x, rows, n, s, split);
  at::parallel_for(0, rows * split.chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / split.chunks, c = t % split.chunks;
      const int64_t offset = r * n + c * split.chunk;
      write_contiguous(x + offset, y + offset, split.length(c, n), Normalizer<A>(states[r]), s, log);
    }
  });
}

// ---- softmax dim with stride `inner` > 1: vectorize across neighbouring rows ----
//
// For a fixed outer index, rows i and i+1 are adjacent in memory at every position j of the
// softmax dim, so one vector holds one element of each of several rows and the lane-wise state
// needs no horizontal merge. Leftover rows (inner not a multiple of the vector step) run scalar.

template <typename T, typename Sink>
void strided_states(const T* x, const RowLayout& g, acc_t<T> s, Sink&& sink) {
  using A = acc_t<T>;
  using IO = VecIO<T>;
  using V = Vectorized<A>;
  for_each_row_block(g, IO::kStep, [&](int64_t o, int64_t i0, int64_t lanes) {
    alignas(64) A ms[IO::kStep];
    alignas(64) A ds[IO::kStep];
    const T* base = x + o * g.size * g.inner + i0;
    if (lanes == IO::kStep) {
      // Lanes flush into double-precision states every kStridedBlock positions: here one lane
      // sums one row alone, so the block must be short (see kScanBlock).
      constexpr int64_t kStridedBlock = 1024;
      State<double> rows[IO::kStep];
      const V vs(s);
      for (int64_t j0 = 0; j0 < g.size; j0 += kStridedBlock) {
        LaneState<A> lo, hi;
        for (int64_t j = j0; j < std::min(g.size, j0 + kStridedBlock); ++j) {
          V a, b;
          IO::load2(base + j * g.inner, a, b);
          lo.update(a, vs);
          hi.update(b, vs);
        }
        lo.lanes(ms, ds);
        hi.lanes(ms + IO::kWidth, ds + IO::kWidth);
        for (int64_t l = 0; l < IO::kStep; ++l) {
          rows[l] = merge(rows[l], State<double>{ms[l], ds[l]}, static_cast<double>(s));
        }
      }
      for (int64_t l = 0; l < IO::kStep; ++l) {
        ms[l] = static_cast<A>(rows[l].m);
        ds[l] = static_cast<A>(rows[l].d);
      }
    } else {
      // One scalar sum per row runs long (no lanes share it): accumulate in double.
      for (int64_t l = 0; l < lanes; ++l) {
        State<double> st;
        for (int64_t j = 0; j < g.size; ++j) update(st, static_cast<double>(base[j * g.inner + l]), double(s));
        ms[l] = st.d == 0 ? std::numeric_limits<A>::lowest() : static_cast<A>(st.m);
        ds[l] = static_cast<A>(st.d);
      }
    }
    for (int64_t l = 0; l < lanes; ++l) {
      const State<A> st = finalize(State<A>{ms[l], ds[l]});
      ms[l] = st.m;
      ds[l] = st.d;
    }
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
    alignas(64) A m[IO::kStep], inv[IO::kStep], logd[IO::kStep];
    for (int64_t l = 0; l < lanes; ++l) {
      const Normalizer<A> nz(State<A>{ms[l], ds[l]});
      m[l] = nz.m;
      inv[l] = nz.inv_d;
      logd[l] = nz.log_d;
    }
    if (lanes == IO::kStep) {
      const V m0 = V::loadu(m), m1 = V::loadu(m + IO::kWidth);
      const V i0v = V::loadu(inv), i1v = V::loadu(inv + IO::kWidth);
      const V l0 = V::loadu(logd), l1 = V::loadu(logd + IO::kWidth);
      const V vs(s);
      for (int64_t j = 0; j < g.size; ++j) {
        V a, b;
        IO::load2(x + offset + j * g.inner, a, b);
        if (log) {
          VecIO<O>::store2(y + offset + j * g.inner, (a - m0) * vs - l0, (b - m1) * vs - l1);
        } else {
          VecIO<O>::store2(y + offset + j * g.inner, vexp((a - m0) * vs) * i0v,
                           vexp((b - m1) * vs) * i1v);
        }
      }
    } else {
      for (int64_t j = 0; j < g.size; ++j) {
        for (int64_t l = 0; l < lanes; ++l) {
          const int64_t at = offset + j * g.inner + l;
          const A z = (static_cast<A>(x[at]) - m[l]) * s;
          y[at] = static_cast<O>(log ? z - logd[l] : std::exp(z) * inv[l]);
        }
      }
    }
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
