// Host execution of csrc/kernels (test-only). Force-included (g++ -include) ahead of every kernel
// source when the kernels are compiled for the CPU; never part of the extension that users build.
//
// What it models: a grid of blocks, run one block at a time (in order, reversed, or shuffled); the
// threads of a block as fibers on one OS thread, switched only where a thread must wait for others
// (__syncthreads, warp shuffles), and picked at each switch by the current schedule (lowest thread
// first, highest first, or seeded random), so a missing barrier shows up as a wrong answer; static
// __shared__ variables shared by the block and poisoned before every block; dynamic shared memory
// of exactly the launch's size, poisoned, with an inaccessible page right after it; warp shuffles
// among the 32 lanes of a warp, with `width`. Misuse is reported as a launch error naming the
// kernel, block and thread (never a hang): a divergent barrier, a thread that exits while others
// wait at one, a shuffle whose named lanes never arrive or have exited, lanes that disagree on a
// shuffle, a launch configuration the GPU would refuse.
//
// What it cannot show: the GPU memory model (a fiber runs until it waits, so a data race between
// two barriers is invisible unless the schedule happens to expose it), alignment faults, register
// and shared-memory limits, timing and speed.
#pragma once

#define ONLINE_SOFTMAX_HOST_KERNELS 1

// CUDA's keywords. Defined before the toolkit headers, which keep definitions made before them.
#define __global__
#define __device__
#define __host__
#define __launch_bounds__(...)
// One copy per static __shared__ variable. Blocks run one at a time on one OS thread, so that copy
// is the running block's. thread_local puts them all in this library's TLS segment (the runtime
// keeps no thread_local state of its own beyond an anchor), which the runtime poisons before each
// block. (GCC 12 ignores a section attribute on static locals of templates, or a named section
// would do.)
#define __shared__ static thread_local

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <typeinfo>
#include <utility>

namespace online_softmax::host_runtime {

struct ThreadContext {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};

// The running thread's indices (only valid inside a kernel).
const ThreadContext& current();

void syncthreads(const char* file, int line);

enum class ShuffleKind { kXor, kIdx, kDown, kUp };
// Exchanges 8 bytes among the lanes named in `mask`; returns the bytes of the lane selected by
// kind/arg (or the caller's own, where CUDA returns it).
uint64_t shuffle(ShuffleKind kind, unsigned mask, uint64_t bits, int arg, int width, const char* file, int line);

unsigned char* dynamic_shared();

// Runs `body(ctx)` as every thread of every block of the grid. Returns the launch's error.
cudaError_t run_grid(const char* name, const char* signature, const void* kernel, dim3 grid, dim3 block,
                     size_t smem, void (*body)(void*), void* ctx);

template <typename... P>
struct Launch {
  const char* name;
  void (*kernel)(P...);
  dim3 grid;
  dim3 block;
  size_t smem;

  template <typename... Args>
  void operator()(Args&&... args) const {
    // The arguments convert to the parameter types once, as in a launch; every thread then gets
    // its own copies (the kernel takes them by value).
    std::tuple<P...> params(std::forward<Args>(args)...);
    auto call = [&] { std::apply(kernel, params); };
    using Call = decltype(call);
    run_grid(name, typeid(kernel).name(), reinterpret_cast<const void*>(kernel), grid, block, smem,
             [](void* c) { (*static_cast<Call*>(c))(); }, &call);
  }
};

template <typename... P>
Launch<P...> make_launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem,
                         cudaStream_t /*stream: launches run synchronously*/) {
  return {name, kernel, grid, block, smem};
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "a shuffle moves at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

// ---- introspection for the tests (entry.cpp exports them) ----
enum class Schedule { kInOrder = 0, kReversed = 1, kRandom = 2 };
void set_schedule(Schedule schedule, uint64_t seed);
const char* last_error_message();   // the most recent launch error, "" if none
const char* launch_log();           // kernel names launched since the last clear, one per line
void clear_launch_log();

}  // namespace online_softmax::host_runtime

#define threadIdx (::online_softmax::host_runtime::current().thread_idx)
#define blockIdx (::online_softmax::host_runtime::current().block_idx)
#define blockDim (::online_softmax::host_runtime::current().block_dim)
#define gridDim (::online_softmax::host_runtime::current().grid_dim)

#define OSM_LAUNCH(grid, block, smem_bytes, stream, ...) \
  ::online_softmax::host_runtime::make_launch(#__VA_ARGS__, __VA_ARGS__, grid, block, smem_bytes, stream)
#define OSM_DYNAMIC_SHARED(name) unsigned char* const name = ::online_softmax::host_runtime::dynamic_shared()

// cuda_runtime.h declares this overload for nvcc only.
template <typename T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}
template <typename T>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T* entry) {
  return ::cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(entry));
}

// ---- device functions the kernels call ----

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::online_softmax::host_runtime::syncthreads(file, line);
}

#define OSM_HOST_SHUFFLE(fn, kind, argname)                                                            \
  template <typename T>                                                                                \
  inline T fn(unsigned mask, T var, int argname, int width = 32, const char* file = __builtin_FILE(), \
              int line = __builtin_LINE()) {                                                           \
    using ::online_softmax::host_runtime::from_bits;                                                   \
    using ::online_softmax::host_runtime::to_bits;                                                     \
    return from_bits<T>(::online_softmax::host_runtime::shuffle(                                       \
        ::online_softmax::host_runtime::ShuffleKind::kind, mask, to_bits(var), int(argname), width,    \
        file, line));                                                                                  \
  }
OSM_HOST_SHUFFLE(__shfl_xor_sync, kXor, lane_mask)
OSM_HOST_SHUFFLE(__shfl_sync, kIdx, src_lane)
OSM_HOST_SHUFFLE(__shfl_down_sync, kDown, delta)
OSM_HOST_SHUFFLE(__shfl_up_sync, kUp, delta)
#undef OSM_HOST_SHUFFLE

// A ballot as xor shuffles of each lane's bit: the shuffle checks (every named lane arrives, the
// same call site) apply. Only full-warp masks are used by the kernels.
inline unsigned __ballot_sync(unsigned mask, int predicate, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  const auto& c = ::online_softmax::host_runtime::current();
  const unsigned lane = (c.thread_idx.x + c.thread_idx.y * c.block_dim.x +
                         c.thread_idx.z * c.block_dim.x * c.block_dim.y) % 32;
  unsigned bits = predicate ? 1u << lane : 0u;
  for (int offset = 16; offset > 0; offset /= 2) bits |= __shfl_xor_sync(mask, bits, offset, 32, file, line);
  return bits & mask;
}
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __ffs(int v) { return __builtin_ffs(v); }

// Threads never run at the same time, so a read-modify-write is atomic as it stands.
template <typename T>
inline T atomicAdd(T* address, T value) {
  const T old = *address;
  *address = old + value;
  return old;
}
template <typename T>
inline T atomicMax(T* address, T value) {
  const T old = *address;
  if (value > old) *address = value;
  return old;
}

inline float __int_as_float(int v) { return ::online_softmax::host_runtime::from_bits<float>(uint32_t(v)); }
inline int __float_as_int(float v) { return int(uint32_t(::online_softmax::host_runtime::to_bits(v))); }
inline double __longlong_as_double(long long v) {
  return ::online_softmax::host_runtime::from_bits<double>(uint64_t(v));
}
inline long long __double_as_longlong(double v) { return (long long)::online_softmax::host_runtime::to_bits(v); }
