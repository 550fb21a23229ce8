// CPU forward (softmax / log-softmax) and stats: one online pass for (m, d), one pass for the output.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "common/checks.h"
#include "common/op_args.h"
#include "cpu/huge_pages.h"
#include "cpu/kernels.h"
#include "cpu/online_state.h"
#include "cpu/row_split.h"

namespace online_softmax::cpu {
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

template <typename T, typename O>
void forward_contiguous(const T* x, O* y, int64_t rows, int64_t n, acc_t<T> s, bool log) {
  using A = acc_t<T>;
  const RowSplit split = plan_row_split(rows, n);
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
void strided_states(const T* x, const RowGeometry& g, acc_t<T> s, Sink&& sink) {
  using A = acc_t<T>;
  using IO = VecIO<T>;
  using V = Vectorized<A>;
  const int64_t blocks = (g.inner + IO::kStep - 1) / IO::kStep;
  const int64_t grain = row_grain(g.size * IO::kStep);  // a task is a block of kStep rows
  at::parallel_for(0, g.outer * blocks, grain, [&](int64_t begin, int64_t end) {
    alignas(64) A ms[IO::kStep];
    alignas(64) A ds[IO::kStep];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t / blocks, i0 = (t % blocks) * IO::kStep;
      const int64_t lanes = std::min<int64_t>(IO::kStep, g.inner - i0);
      const T* base = x + o * g.size * g.inner + i0;
      if (lanes == IO::kStep) {
        // Lanes flush into double-precision states every kStridedBlock positions: here one lane
        // sums one row alone, so the block must be short (see kLaneBlock in scan_contiguous).
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
    }
  });
}

template <typename T, typename O>
void forward_strided(const T* x, O* y, const RowGeometry& g, acc_t<T> s, bool log) {
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
void stats_kernel(const T* x, acc_t<T>* m_out, acc_t<T>* d_out, const RowGeometry& g, acc_t<T> s) {
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
void forward_kernel(const at::Tensor& x, at::Tensor& y, const RowGeometry& g, double temperature, bool log) {
  using A = acc_t<T>;
  const A s = static_cast<A>(1.0 / temperature);
  const T* xp = x.const_data_ptr<T>();
  O* yp = y.mutable_data_ptr<O>();
  if (g.inner == 1) {
    forward_contiguous(xp, yp, g.outer, g.size, s, log);
  } else {
    forward_strided(xp, yp, g, s, log);
  }
}

}  // namespace

at::Tensor forward(const at::Tensor& x_in, int64_t dim, bool log, double temperature,
                   std::optional<at::ScalarType> dtype) {
  const ForwardArgs a = forward_args(x_in, dim, temperature, dtype);
  const at::Tensor& x = a.x;
  at::Tensor y = empty_output(x.sizes(), x.options().dtype(a.out_dtype));
  if (x.numel() == 0) return y;
  const RowGeometry g = row_geometry(x, a.dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "online_softmax.forward", [&] {
    if (a.out_dtype == x.scalar_type()) {
      forward_kernel<scalar_t, scalar_t>(x, y, g, temperature, log);
    } else if constexpr (!std::is_same_v<acc_t<scalar_t>, scalar_t>) {
      forward_kernel<scalar_t, float>(x, y, g, temperature, log);
    }
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> stats(const at::Tensor& x_in, int64_t dim, double temperature) {
  const StatsArgs a = stats_args(x_in, dim, temperature);
  at::Tensor m = at::empty(a.shape, a.options);
  at::Tensor d = at::empty(a.shape, a.options);
  if (stats_without_kernel(m, d, a.x)) return {m, d};
  const RowGeometry g = row_geometry(a.x, a.dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "online_softmax.stats", [&] {
    using A = acc_t<scalar_t>;
    stats_kernel(a.x.const_data_ptr<scalar_t>(), m.mutable_data_ptr<A>(), d.mutable_data_ptr<A>(), g,
                 static_cast<A>(1.0 / temperature));
  });
  return {m, d};
}

}  // namespace online_softmax::cpu
