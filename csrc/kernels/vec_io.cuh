// 16-byte vector access to rows of any dtype and any alignment.
//
// A row is cut into granules of kVec = 16 / sizeof(T) elements aligned to 16 bytes in memory:
// granule g covers row elements [g * kVec - head, g * kVec - head + kVec), where `head` is how far
// the row start lies past a 16-byte boundary. Granules wholly inside the row are one 16-byte load;
// the (at most two) granules that straddle the row's ends fall back to guarded scalar accesses, so
// nothing outside the row is ever read or written.
#pragma once

#include "kernels/online_state.cuh"

namespace online_softmax::kernels {

template <typename T>
struct Granule {
  static constexpr int kVec = 16 / sizeof(T);
};

// Elements from the row start to the next 16-byte boundary's granule start (0 <= head < kVec).
template <typename T>
__device__ __forceinline__ int row_head(const T* row) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(row) % 16) / sizeof(T));
}

// Granules covering a row of n elements that starts `head` elements past a 16-byte boundary.
template <typename T>
__device__ __forceinline__ int64_t granule_count(int head, int64_t n) {
  return (head + n + Granule<T>::kVec - 1) / Granule<T>::kVec;
}

template <typename T>
__device__ __forceinline__ bool aligned16(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// v[j] = row[i0 + j] for 0 <= i0 + j < n, else `fill`. One 16-byte load when the granule is whole
// and aligned (always, for granules of the row's own head).
template <typename T, typename A, int N>
__device__ __forceinline__ void load_elems(const T* row, int64_t i0, int64_t n, A (&v)[N], A fill) {
  static_assert(N * sizeof(T) % 16 == 0, "a granule is a whole number of 16-byte vectors");
  if (i0 >= 0 && i0 + N <= n && aligned16(row + i0)) {
    constexpr int kChunks = N * sizeof(T) / 16;
#pragma unroll
    for (int c = 0; c < kChunks; ++c) {
      const uint4 raw = reinterpret_cast<const uint4*>(row + i0)[c];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < 16 / int(sizeof(T)); ++j) v[c * (16 / sizeof(T)) + j] = to_acc(e[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const int64_t i = i0 + j;
      v[j] = (i >= 0 && i < n) ? to_acc(row[i]) : fill;
    }
  }
}

// row[i0 + j] = v[j] for the in-range j; 16-byte stores when whole and aligned.
template <typename O, typename A, int N>
__device__ __forceinline__ void store_elems(O* row, int64_t i0, int64_t n, const A (&v)[N]) {
  constexpr int kPer = 16 / sizeof(O);
  if (N % kPer == 0 && i0 >= 0 && i0 + N <= n && aligned16(row + i0)) {
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
      uint4 raw;
      O* e = reinterpret_cast<O*>(&raw);
#pragma unroll
      for (int j = 0; j < kPer; ++j) e[j] = from_acc<O>(v[c * kPer + j]);
      reinterpret_cast<uint4*>(row + i0)[c] = raw;
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const int64_t i = i0 + j;
      if (i >= 0 && i < n) row[i] = from_acc<O>(v[j]);
    }
  }
}

}  // namespace online_softmax::kernels
