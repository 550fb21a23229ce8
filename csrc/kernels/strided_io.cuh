// Access to strided slices (softmax dim not last): a thread owns a group of kCols neighbouring
// columns (one 16-byte vector where inner is a multiple of a granule), read and written together
// at each position along the dim.
#pragma once

#include "kernels/online_state.cuh"
#include "kernels/vec_io.cuh"

namespace online_softmax::kernels {

// The column group a strided thread works on: columns [col, col + count) of outer index o.
struct StridedColumns {
  int64_t o;
  int64_t col;
  int count;  // 0: past the end of inner
};

template <int kCols>
__device__ __forceinline__ StridedColumns strided_columns(int64_t tile_block, int64_t tiles, int64_t inner) {
  StridedColumns c;
  c.o = tile_block / tiles;
  c.col = ((tile_block % tiles) * blockDim.x + threadIdx.x) * kCols;
  c.count = c.col < inner ? static_cast<int>(imin(kCols, inner - c.col)) : 0;
  return c;
}

// v[c] = column c's element at p (p points at the group's first column), `fill` past `count`.
template <int kCols, typename T, typename A>
__device__ __forceinline__ void load_columns(const T* p, int count, A (&v)[kCols], A fill) {
  if constexpr (kCols * sizeof(T) % 16 == 0) {
    load_elems(p, 0, count, v, fill);
  } else {
#pragma unroll
    for (int c = 0; c < kCols; ++c) v[c] = c < count ? to_acc(p[c]) : fill;
  }
}

template <int kCols, typename O, typename A>
__device__ __forceinline__ void store_columns(O* p, int count, const A (&v)[kCols]) {
  if constexpr (kCols * sizeof(O) % 16 == 0) {
    store_elems(p, 0, count, v);
  } else {
#pragma unroll
    for (int c = 0; c < kCols; ++c)
      if (c < count) p[c] = from_acc<O>(v[c]);
  }
}

}  // namespace online_softmax::kernels
