// Kernels that exercise the host runtime itself (test-only): CUDA's shuffle rules, and misuses the
// runtime must report as launch errors rather than hang or pass silently. tests/kernels/test_kernels_host.py
// calls them through osm_host_selftest.
#include "kernels/seam.cuh"

#include <cstdint>

namespace {

// out[t] = the shuffle of (100 + t) by the kind, argument and width given.
__global__ void shuffle_rules_kernel(int* out, int kind, int arg, int width) {
  const int t = threadIdx.x;
  const int v = 100 + t;
  int r = 0;
  switch (kind) {
    case 0: r = __shfl_xor_sync(0xffffffffu, v, arg, width); break;
    case 1: r = __shfl_sync(0xffffffffu, v, arg, width); break;
    case 2: r = __shfl_down_sync(0xffffffffu, v, arg, width); break;
    case 3: r = __shfl_up_sync(0xffffffffu, v, arg, width); break;
  }
  out[t] = r;
}

// A shared-memory tree sum over the block. Without the barrier inside the loop, a thread can read
// a partner's slot before the partner has written it.
__global__ void tree_sum_kernel(const float* x, float* out, bool barrier) {
  __shared__ float partial[256];
  const int t = threadIdx.x;
  partial[t] = x[blockIdx.x * blockDim.x + t];
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    float mine = partial[t];
    if (t < stride) mine += partial[t + stride];
    if (barrier) __syncthreads();
    partial[t] = mine;
    if (barrier) __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = partial[0];
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void exit_before_barrier_kernel(int* out) {
  if (threadIdx.x == 3) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void exit_before_shuffle_kernel(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}

// Launched with 16 threads: the full mask names 16 lanes that do not exist.
__global__ void partial_warp_shuffle_kernel(int* out) {
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
}

// Half the warp at one shuffle, the other half at another (divergent warp-level code).
__global__ void divergent_shuffle_kernel(int* out) {
  int v = int(threadIdx.x);
  if (threadIdx.x < 16) {
    v = __shfl_xor_sync(0xffffffffu, v, 1);
  } else {
    v = __shfl_xor_sync(0xffffffffu, v, 2);
  }
  out[threadIdx.x] = v;
}

// Lane 31 and the second warp wait at a barrier, lanes 0..30 at a shuffle that names lane 31:
// nobody can move (a deadlock).
__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x >= 31) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, int(threadIdx.x), 1);
  }
}

// Writes one float past `bytes` of dynamic shared memory.
__global__ void dynamic_shared_overflow_kernel(int bytes) {
  OSM_DYNAMIC_SHARED(cache);
  float* f = reinterpret_cast<float*>(cache);
  if (threadIdx.x == 7) f[bytes / 4] = 1.0f;
}

// Fills `bytes` of dynamic shared memory, then reads it back: stays within bounds.
__global__ void dynamic_shared_fill_kernel(int bytes, int* out) {
  OSM_DYNAMIC_SHARED(cache);
  for (int i = threadIdx.x; i < bytes; i += blockDim.x) cache[i] = static_cast<unsigned char>(i);
  __syncthreads();
  int sum = 0;
  for (int i = 0; i < bytes; ++i) sum += cache[i];
  out[threadIdx.x] = sum;
}

}  // namespace

// which: 0 shuffle rules (a = kind, b = arg, c = width; 32 threads into out), 1 tree sum with a
// barrier, 2 without (x = in, 256 threads x `a` blocks), 3 divergent barrier, 4 exit before a
// barrier, 5 exit before a shuffle, 6 shuffle in a 16-thread block, 7 divergent shuffle,
// 8 deadlock, 9 dynamic shared overflow (a = bytes; faults), 10 dynamic shared fill (a = bytes),
// 11 a launch with 50 KB of dynamic shared memory and no opt-in. Returns the launch's error.
extern "C" int osm_host_selftest(int which, const void* in, void* out, int a, int b, int c) {
  int* iout = static_cast<int*>(out);
  switch (which) {
    case 0: OSM_LAUNCH(1, 32, 0, nullptr, shuffle_rules_kernel)(iout, a, b, c); break;
    case 1:
    case 2:
      OSM_LAUNCH(a, 256, 0, nullptr, tree_sum_kernel)(static_cast<const float*>(in), static_cast<float*>(out), which == 1);
      break;
    case 3: OSM_LAUNCH(1, 64, 0, nullptr, divergent_barrier_kernel)(iout); break;
    case 4: OSM_LAUNCH(1, 64, 0, nullptr, exit_before_barrier_kernel)(iout); break;
    case 5: OSM_LAUNCH(1, 32, 0, nullptr, exit_before_shuffle_kernel)(iout); break;
    case 6: OSM_LAUNCH(1, 16, 0, nullptr, partial_warp_shuffle_kernel)(iout); break;
    case 7: OSM_LAUNCH(1, 32, 0, nullptr, divergent_shuffle_kernel)(iout); break;
    case 8: OSM_LAUNCH(1, 64, 0, nullptr, deadlock_kernel)(iout); break;
    case 9: OSM_LAUNCH(1, 32, a, nullptr, dynamic_shared_overflow_kernel)(a); break;
    case 10: OSM_LAUNCH(1, 64, a, nullptr, dynamic_shared_fill_kernel)(a, iout); break;
    case 11: OSM_LAUNCH(1, 64, 50 * 1024, nullptr, dynamic_shared_fill_kernel)(64, iout); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
