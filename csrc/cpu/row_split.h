// How CPU work is cut into tasks: whole rows when there are enough rows to keep every thread busy,
// otherwise chunks of rows whose partial results are merged afterwards (the CPU form of the block
// merge: 4 rows x 1M elements still use every core). Only the scheduling depends on the thread
// count and the number of rows: a split row is shared out in whole kRowPiece pieces
// (online_state.h), and every path reduces a row piece by piece and merges the pieces in the same
// order, so the result is the same whichever plan ran.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "the CPU kernels are compiled through csrc/cpu/isa/<capability>.cpp"
#endif

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "cpu/online_state.h"
#include "kernels/row_layout.h"

namespace online_softmax::cpu {
inline namespace CPU_CAPABILITY {  // one copy per ISA (csrc/cpu/kernels/common.h)

// Below this many elements a task is not worth a thread.
constexpr int64_t kMinTaskElements = 16384;

// The number of kRowPiece pieces of a row of n elements (one for an empty row).
inline int64_t row_pieces(int64_t n) { return std::max<int64_t>(1, (n + kRowPiece - 1) / kRowPiece); }

struct RowSplit {
  int64_t chunks = 1;  // pieces per row
  int64_t chunk = 0;   // elements per piece (the last piece may be shorter)
  int64_t length(int64_t c, int64_t n) const { return std::min(chunk, n - c * chunk); }
};

inline RowSplit plan_row_split(int64_t rows, int64_t n) {
  const int64_t threads = at::get_num_threads();
  // Whole rows when they already divide evenly over the threads (or are plenty): splitting then
  // only adds a second parallel region and a re-read from a farther cache.
  if (threads <= 1 || rows >= 4 * threads || rows % threads == 0 || n < 2 * kMinTaskElements) return {1, n};
  const int64_t wanted = (4 * threads + rows - 1) / rows;
  int64_t chunks = std::min(wanted, n / kMinTaskElements);
  // Whole pieces per chunk (the threads then share out the pieces): the pieces, not the chunks,
  // fix the order of the reduction.
  const int64_t chunk = ((n + chunks - 1) / chunks + kRowPiece - 1) / kRowPiece * kRowPiece;
  chunks = (n + chunk - 1) / chunk;
  return {chunks, chunk};
}

// Rows per task so that a task holds at least kMinTaskElements elements.
inline int64_t row_grain(int64_t n) {
  return std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(n, 1));
}

// A strided layout (inner > 1) in tasks of `step` neighbouring rows, in parallel: fn(o, i0, lanes)
// for each outer index o and each block of rows [i0, i0 + lanes) along inner.
template <typename Fn>
inline void for_each_row_block(const RowLayout& g, int64_t step, Fn&& fn) {
  const int64_t blocks = (g.inner + step - 1) / step;
  at::parallel_for(0, g.outer * blocks, row_grain(g.size * step), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t o = t / blocks, i0 = (t % blocks) * step;
      fn(o, i0, std::min<int64_t>(step, g.inner - i0));
    }
  });
}

}  // namespace CPU_CAPABILITY
}  // namespace online_softmax::cpu
