// CPU backward kernels of forward, from its output y alone (s = 1 / temperature):
//   softmax:     dx = s * y * (dy - sum(dy * y))
//   log_softmax: dx = s * (dy - exp(y) * sum(dy))
// One pass reduces the row, one pass writes dx; long rows are split across threads and their
// partial sums added.
// Compiled once per ISA (csrc/cpu/isa/); called through the table of dispatch.h.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "the CPU kernels are compiled through csrc/cpu/isa/<capability>.cpp"
#endif

#include "cpu/kernels/common.h"

namespace online_softmax::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// Lane sums are flushed into double every kLaneBlock elements, so their rounding error does not
// grow with the row length. One block is one piece of the fixed split (online_state.h): a row split
// across threads adds the same block sums in the same order as a whole row.
constexpr int64_t kLaneBlock = kRowPiece;

// The reduction sum(dy * y) (sum(dy) for log) of one vector step at i, and of one element.
template <typename Y, typename V = Vectorized<acc_t<Y>>>
inline void reduce_step(const Y* dy, const Y* y, int64_t i, bool log, V& acc0, V& acc1) {
  V g0, g1;
  VecIO<Y>::load2(dy + i, g0, g1);
  if (log) {
    acc0 = acc0 + g0;
    acc1 = acc1 + g1;
  } else {
    V y0, y1;
    VecIO<Y>::load2(y + i, y0, y1);
    acc0 = at::vec::fmadd(g0, y0, acc0);
    acc1 = at::vec::fmadd(g1, y1, acc1);
  }
}

template <typename Y>
inline double reduce_term(const Y* dy, const Y* y, int64_t i, bool log) {
  return log ? static_cast<double>(dy[i]) : static_cast<double>(dy[i]) * static_cast<double>(y[i]);
}

// A row's reduction in blocks of kLaneBlock elements summed in double, so the error does not grow
// with n: step(i, acc0, acc1) for each vector step, then tail(i) (a double term) for each element
// past the last whole step.
template <typename Y, typename Step, typename Tail>
inline acc_t<Y> blocked_sum(int64_t n, Step&& step, Tail&& tail) {
  using A = acc_t<Y>;
  using V = Vectorized<A>;
  const int64_t vec_end = n - n % VecIO<Y>::kStep;
  double total = 0;
  for (int64_t block = 0; block < vec_end; block += kLaneBlock) {
    const int64_t block_end = std::min(vec_end, block + kLaneBlock);
    V acc0(A(0)), acc1(A(0));
    for (int64_t i = block; i < block_end; i += VecIO<Y>::kStep) step(i, acc0, acc1);
    total += at::vec::vec_reduce_all<A>([](V a, V b) { return a + b; }, acc0 + acc1);
  }
  for (int64_t i = vec_end; i < n; ++i) total += tail(i);
  return static_cast<A>(total);
}

// The float sum of one block [begin, end) of whole vector steps, as blocked_sum makes it.
template <typename Y>
inline acc_t<Y> reduce_block(const Y* dy, const Y* y, int64_t begin, int64_t end, bool log) {
  using A = acc_t<Y>;
  using V = Vectorized<A>;
  V acc0(A(0)), acc1(A(0));
  for (int64_t i = begin; i < end; i += VecIO<Y>::kStep) reduce_step(dy, y, i, log, acc0, acc1);
  return at::vec::vec_reduce_all<A>([](V a, V b) { return a + b; }, acc0 + acc1);
}

template <typename Y>
inline acc_t<Y> reduce_contiguous(const Y* dy, const Y* y, int64_t n, bool log) {
  using V = Vectorized<acc_t<Y>>;
  return blocked_sum<Y>(
      n, [&](int64_t i, V& acc0, V& acc1) { reduce_step(dy, y, i, log, acc0, acc1); },
      [&](int64_t i) { return reduce_term(dy, y, i, log); });
}

// One vector of dx, and one element, from dy, y and the row's reduction (sum(dy * y), or sum(dy)).
template <bool kLog, bool kScaled, typename V>
inline V grad_vec(V g, V yv, V total, V s) {
  const V d = kLog ? g - vexp_keep_nan(yv) * total : yv * (g - total);
  return kScaled ? d * s : d;
}

template <typename A>
inline A grad_scalar(bool log, A g, A yv, A total, A s) {
  return (log ? g - std::exp(yv) * total : yv * (g - total)) * s;
}

// The write pass, specialized on log and on s == 1 (no temperature: one multiply fewer per
// vector, which matters in this load/store-bound loop when the rows sit in L2).
template <bool kLog, bool kScaled, typename Y, typename X>
inline void write_grad_loop(const Y* dy, const Y* y, X* dx, int64_t n, acc_t<Y> total, acc_t<Y> s) {
  using A = acc_t<Y>;
  using V = Vectorized<A>;
  using IO = VecIO<Y>;
  const V vt(total), vs(s);
  int64_t i = 0;
  for (; i + IO::kStep <= n; i += IO::kStep) {
    V g0, g1, y0, y1;
    IO::load2(dy + i, g0, g1);
    IO::load2(y + i, y0, y1);
    VecIO<X>::store2(dx + i, grad_vec<kLog, kScaled>(g0, y0, vt, vs), grad_vec<kLog, kScaled>(g1, y1, vt, vs));
  }
  for (; i < n; ++i) {
    dx[i] = static_cast<X>(grad_scalar<A>(kLog, static_cast<A>(dy[i]), static_cast<A>(y[i]), total, s));
  }
}

// The write pass of a row fused with the reduce pass of the next row of the same thread, returning
// the next row's reduction (the same sums in the same order as reduce_contiguous, so the result
// does not depend on which rows a thread got). A thread's rows are consecutive in memory: while
// the current row is re-read from L1/L2, the next one streams in from L3 or DRAM, which would
// otherwise wait idle through the write pass.
template <bool kLog, bool kScaled, typename Y, typename X>
inline acc_t<Y> write_grad_reduce_next(const Y* dy, const Y* y, X* dx, const Y* next_dy, const Y* next_y, int64_t n,
                                      acc_t<Y> total, acc_t<Y> s) {
  using A = acc_t<Y>;
  using V = Vectorized<A>;
  using IO = VecIO<Y>;
  const V vt(total), vs(s);
  return blocked_sum<Y>(
      n,
      [&](int64_t i, V& acc0, V& acc1) {
        V g0, g1, y0, y1;
        IO::load2(dy + i, g0, g1);
        IO::load2(y + i, y0, y1);
        VecIO<X>::store2(dx + i, grad_vec<kLog, kScaled>(g0, y0, vt, vs), grad_vec<kLog, kScaled>(g1, y1, vt, vs));
        reduce_step(next_dy, next_y, i, kLog, acc0, acc1);
      },
      [&](int64_t i) {
        dx[i] = static_cast<X>(grad_scalar<A>(kLog, static_cast<A>(dy[i]), static_cast<A>(y[i]), total, s));
        return reduce_term(next_dy, next_y, i, kLog);
      });
}

template <typename Y, typename X>
inline void write_contiguous_grad(const Y* dy, const Y* y, X* dx, int64_t n, acc_t<Y> total,
                                  acc_t<Y> s, bool log) {
  const bool scaled = s != acc_t<Y>(1);
  if (log) {
    scaled ? write_grad_loop<true, true>(dy, y, dx, n, total, s) : write_grad_loop<true, false>(dy, y, dx, n, total, s);
  } else {
    scaled ? write_grad_loop<false, true>(dy, y, dx, n, total, s) : write_grad_loop<false, false>(dy, y, dx, n, total, s);
  }
}

// Rows [begin, end) of one thread: each row's write pass runs beside the next row's reduce pass.
// Only for rows whose dy and y together outgrow L1 (more than 4096 float32): shorter rows are
// re-read from L1 and the hardware prefetcher already streams the next row meanwhile; there the
// fused loop was slower (against the plain passes, both compiled into one process and timed
// interleaved: 1024 x 1024 0.81-0.87x, 64 x 32768 1.09-1.16x, 8 x 262144 1.07-1.11x; AMD EPYC Zen 4,
// AVX512, 2 threads, 2026-12-07).
constexpr int64_t kPipelineRowBytes = 16384;

template <bool kLog, bool kScaled, typename Y, typename X>
void backward_rows_pipelined(const Y* dy, const Y* y, X* dx, int64_t begin, int64_t end, int64_t n, acc_t<Y> s) {
  acc_t<Y> total = reduce_contiguous(dy + begin * n, y + begin * n, n, kLog);
  for (int64_t r = begin; r + 1 < end; ++r) {
    total = write_grad_reduce_next<kLog, kScaled>(dy + r * n, y + r * n, dx + r * n, dy + (r + 1) * n,
                                                   y + (r + 1) * n, n, total, s);
  }
  write_grad_loop<kLog, kScaled>(dy + (end - 1) * n, y + (end - 1) * n, dx + (end - 1) * n, n, total, s);
}

template <typename Y, typename X>
void backward_contiguous(const Y* dy, const Y* y, X* dx, int64_t rows, int64_t n, acc_t<Y> s, bool log) {
  using A = acc_t<Y>;
  const RowSplit split = plan_row_split(rows, n);
  if (split.chunks == 1) {
    const bool pipelined = n * static_cast<int64_t>(sizeof(Y)) > kPipelineRowBytes;
    const bool scaled = s != A(1);
    at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
      if (!pipelined) {
        for (int64_t r = begin; r < end; ++r) {
          const A total = reduce_contiguous(dy + r * n, y + r * n, n, log);
          write_contiguous_grad(dy + r * n, y + r * n, dx + r * n, n, total, s, log);
        }
      } else if (log) {
        scaled ? backward_rows_pipelined<true, true>(dy, y, dx, begin, end, n, s)
               : backward_rows_pipelined<true, false>(dy, y, dx, begin, end, n, s);
      } else {
        scaled ? backward_rows_pipelined<false, true>(dy, y, dx, begin, end, n, s)
               : backward_rows_pipelined<false, false>(dy, y, dx, begin, end, n, s);
      }
    });
    return;
  }
  // Rows split across threads: the pieces' block sums, then blocked_sum's order (blocks left to
  // right in double, then the tail), so the total is that of a whole row. The threads share out
  // the pieces of all the rows evenly (see for_each_piece in kernels/softmax.h).
  const int64_t P = row_pieces(n), vec_end = n - n % VecIO<Y>::kStep;
  std::vector<A> partial(rows * P, A(0));
  at::parallel_for(0, rows * P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / P, b0 = (t % P) * kLaneBlock, b1 = std::min(vec_end, b0 + kLaneBlock);
      if (b0 < b1) partial[t] = reduce_block(dy + r * n, y + r * n, b0, b1, log);
    }
  });
  std::vector<A> totals(rows);
  for (int64_t r = 0; r < rows; ++r) {
    double total = 0;
    for (int64_t p = 0; p * kLaneBlock < vec_end; ++p) total += partial[r * P + p];
    for (int64_t i = vec_end; i < n; ++i) total += reduce_term(dy + r * n, y + r * n, i, log);
    totals[r] = static_cast<A>(total);
  }
  at::parallel_for(0, rows * P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r = t / P, i0 = (t % P) * kLaneBlock, off = r * n + i0;
      write_contiguous_grad(dy + off, y + off, dx + off, std::min(kLaneBlock, n - i0), totals[r], s, log);
    }
  });
}

// Softmax dim with stride inner > 1: each vector lane is a different row (see kernels/softmax.h).
// Leftover rows (inner not a multiple of the vector step) run the same lane arithmetic on
// zero-padded copies, so a row's bits do not depend on where along inner it sits.
template <typename Y, typename X>
void backward_strided(const Y* dy, const Y* y, X* dx, const RowLayout& g, acc_t<Y> s, bool log) {
  using A = acc_t<Y>;
  using V = Vectorized<A>;
  using IO = VecIO<Y>;
  auto block = [&](int64_t lanes, auto&& load, auto&& store) {
    // Per-lane sums (one row each), flushed into double every kStridedBlock positions.
    constexpr int64_t kStridedBlock = 1024;
    double sums[IO::kStep] = {};
    alignas(64) A part[IO::kStep];
    for (int64_t j0 = 0; j0 < g.size; j0 += kStridedBlock) {
      V p0(A(0)), p1(A(0));
      for (int64_t j = j0; j < std::min(g.size, j0 + kStridedBlock); ++j) {
        V g0, g1, y0, y1;
        load(j, g0, g1, y0, y1, !log);  // the sum of the log form needs no y
        if (log) {
          p0 = p0 + g0;
          p1 = p1 + g1;
        } else {
          p0 = at::vec::fmadd(g0, y0, p0);
          p1 = at::vec::fmadd(g1, y1, p1);
        }
      }
      p0.store(part);
      p1.store(part + IO::kWidth);
      for (int64_t l = 0; l < lanes; ++l) sums[l] += part[l];
    }
    for (int64_t l = 0; l < IO::kStep; ++l) part[l] = static_cast<A>(sums[l]);
    const V t0 = V::loadu(part), t1 = V::loadu(part + IO::kWidth);
    const V vs(s);
    for (int64_t j = 0; j < g.size; ++j) {
      V g0, g1, y0, y1;
      load(j, g0, g1, y0, y1, true);
      if (log) {
        store(j, (g0 - vexp_keep_nan(y0) * t0) * vs, (g1 - vexp_keep_nan(y1) * t1) * vs);
      } else {
        store(j, y0 * (g0 - t0) * vs, y1 * (g1 - t1) * vs);
      }
    }
  };
  for_each_row_block(g, IO::kStep, [&](int64_t o, int64_t i0, int64_t lanes) {
    const int64_t base = o * g.size * g.inner + i0;
    if (lanes == IO::kStep) {
      block(
          lanes,
          [&](int64_t j, V& g0, V& g1, V& y0, V& y1, bool with_y) {
            IO::load2(dy + base + j * g.inner, g0, g1);
            if (with_y) IO::load2(y + base + j * g.inner, y0, y1);
          },
          [&](int64_t j, V a, V b) { VecIO<X>::store2(dx + base + j * g.inner, a, b); });
      return;
    }
    alignas(64) Y gin[IO::kStep] = {}, yin[IO::kStep] = {};
    alignas(64) X out[IO::kStep] = {};
    block(
        lanes,
        [&](int64_t j, V& g0, V& g1, V& y0, V& y1, bool with_y) {
          for (int64_t l = 0; l < lanes; ++l) gin[l] = dy[base + j * g.inner + l];
          IO::load2(gin, g0, g1);
          if (with_y) {
            for (int64_t l = 0; l < lanes; ++l) yin[l] = y[base + j * g.inner + l];
            IO::load2(yin, y0, y1);
          }
        },
        [&](int64_t j, V a, V b) {
          VecIO<X>::store2(out, a, b);
          for (int64_t l = 0; l < lanes; ++l) dx[base + j * g.inner + l] = out[l];
        });
  });
}

template <typename Y, typename X>
void backward_typed(const BackwardCall& c) {
  using A = acc_t<Y>;
  const A s = static_cast<A>(1.0 / c.temperature);
  const Y* dy = static_cast<const Y*>(c.dy);
  const Y* y = static_cast<const Y*>(c.y);
  X* dx = static_cast<X*>(c.dx);
  if (c.g.inner == 1) {
    backward_contiguous(dy, y, dx, c.g.outer, c.g.size, s, c.log);
  } else {
    backward_strided(dy, y, dx, c.g, s, c.log);
  }
}

void backward_entry(const BackwardCall& c) {
  with_dtype(c.y_dtype, "backward", [&](auto tag) {
    using Y = decltype(tag);
    if (c.dx_dtype == c.y_dtype) {
      backward_typed<Y, Y>(c);
    } else if constexpr (std::is_same_v<Y, float>) {
      if (c.dx_dtype == at::kHalf) {
        backward_typed<float, at::Half>(c);
      } else {
        backward_typed<float, at::BFloat16>(c);
      }
    }
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace online_softmax::cpu
