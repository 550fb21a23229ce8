// The fused top-k's selection on the GPU, shared by softmax_topk.cu and token_logprobs.cu: a
// shared-memory candidate buffer that an element enters only if it beats the current k-th best;
// when the buffer fills, a bitonic sort keeps the k best and their worst becomes the threshold.
// The order is torch.topk's: larger first, NaN above every number, ties to the lower index.
#pragma once

#include "kernels/launchers.h"
#include "kernels/online_state.cuh"
#include "kernels/vec_io.cuh"

namespace online_softmax::kernels {
namespace topk_select {

template <typename T>
using A_t = acc_t<T>;

constexpr int kThreads = kTopKThreads;
constexpr int32_t kNoRef = 0x7fffffff;  // padding: worse than every real candidate

// Elements a block looks at per step: 2048 (1024 for double, so its buffer stays small).
template <typename T>
struct TopKTile {
  static constexpr int kVec = Granule<T>::kVec;
  static constexpr int kUnroll = sizeof(T) == 8 ? 2 : 2048 / (kThreads * kVec);
  static constexpr int kSize = kThreads * kVec * kUnroll;
  static constexpr int kCapacity = 2 * kSize;  // a full step always fits after a prune to k <= kSize
};

// A candidate is (value, ref); refs grow with the element index, so comparing refs breaks ties.
template <typename A, typename R>
__device__ __forceinline__ bool better(A a, R ra, A b, R rb) {
  const bool an = is_nan(a), bn = is_nan(b);
  if (an || bn) return an && (!bn || ra < rb);
  if (a != b) return a > b;
  return ra < rb;
}

// A thread's register copy of the buffer's threshold: the pre-filter of offer_warp.
template <typename A>
struct Bar {
  bool set;
  A value;
  int32_t ref;
};

// The block's k best candidates so far, in shared memory.
template <typename A, int kCapacity, int kStep>
struct CandidateBuffer {
  A value[kCapacity];
  int32_t ref[kCapacity];
  int count;
  A threshold;
  int32_t threshold_ref;
  bool has_threshold;

  __device__ void reset() {
    __syncthreads();  // the previous row's results have been read
    if (threadIdx.x == 0) {
      count = 0;
      has_threshold = false;
    }
    __syncthreads();
  }

  // Called by any thread for any element; thread-safe.
  __device__ __forceinline__ void offer(A v, int32_t r) {
    if (has_threshold && !better(v, r, threshold, threshold_ref)) return;
    const int slot = atomicAdd(&count, 1);
    value[slot] = v;
    ref[slot] = r;
  }

  // Warp-collective offer (all 32 lanes call it, each with its own element or want = false): the
  // lanes whose element beats `bar` (the threshold as of the last end_step, kept in registers by
  // the caller) take consecutive slots with one shared atomic per warp instead of one per element.
  __device__ __forceinline__ void offer_warp(bool want, A v, int32_t r, const Bar<A>& bar) {
    want = want && (!bar.set || better(v, r, bar.value, bar.ref));
    const unsigned mask = __ballot_sync(0xffffffffu, want);
    if (mask == 0) return;
    const int lane = threadIdx.x % 32;
    int base = 0;
    if (lane == __ffs(mask) - 1) base = atomicAdd(&count, __popc(mask));
    base = __shfl_sync(0xffffffffu, base, __ffs(mask) - 1);
    if (want) {
      const int slot = base + __popc(mask & ((1u << lane) - 1u));
      value[slot] = v;
      ref[slot] = r;
    }
  }

  // The threshold as every thread sees it between steps (read after end_step's barriers).
  __device__ __forceinline__ Bar<A> bar() const { return {has_threshold, threshold, threshold_ref}; }

  // Sorts the first `count` entries descending (best first), padding to a power of two.
  __device__ void sort() {
    const int n = count;
    int length = 1;
    while (length < n) length *= 2;
    for (int i = n + threadIdx.x; i < length; i += blockDim.x) {
      value[i] = -Limits<A>::inf();
      ref[i] = kNoRef;
    }
    __syncthreads();
    for (int size = 2; size <= length; size *= 2) {
      for (int stride = size / 2; stride > 0; stride /= 2) {
        for (int i = threadIdx.x; i < length / 2; i += blockDim.x) {
          const int lo = 2 * i - (i & (stride - 1));
          const int hi = lo + stride;
          const bool descending = (lo & size) == 0;
          const bool swap = descending ? better(value[hi], ref[hi], value[lo], ref[lo])
                                       : better(value[lo], ref[lo], value[hi], ref[hi]);
          if (swap) {
            const A v = value[lo];
            value[lo] = value[hi];
            value[hi] = v;
            const int32_t r = ref[lo];
            ref[lo] = ref[hi];
            ref[hi] = r;
          }
        }
        __syncthreads();
      }
    }
  }

  // Collective, after every step: keeps the k best once the buffer could not take another step.
  // Every thread reads count between two barriers, so all of them take the same branch (a thread
  // that read it after a faster warp's next offers could otherwise prune alone).
  __device__ void end_step(int k) {
    __syncthreads();  // the step's offers are all in
    const int n = count;
    __syncthreads();  // everyone has read count before anyone offers again
    if (n > kCapacity - kStep || (!has_threshold && n >= kStep)) {
      sort();
      if (threadIdx.x == 0) {
        count = k;
        threshold = value[k - 1];
        threshold_ref = ref[k - 1];
        has_threshold = true;
      }
      __syncthreads();
    }
  }

  // Collective: the k best, sorted, in value[0..k) / ref[0..k). Needs count >= k.
  __device__ void finish() {
    __syncthreads();
    sort();
  }
};

}  // namespace topk_select
}  // namespace online_softmax::kernels
