// The dynamic shared memory opt-in of a kernel, set once per device at the device's maximum (less
// the kernel's static shared memory), instead of to each launch's size: two host threads launching
// the same kernel for different row lengths would otherwise race, one lowering the limit between
// the other's attribute call and its launch.
#pragma once

#include <cuda_runtime_api.h>

#include <atomic>
#include <mutex>

#include "kernels/launch_plan.h"

namespace online_softmax::kernels {

constexpr int kMaxDevices = 64;

template <auto Kernel>
cudaError_t opt_in_max_dynamic_smem(DeviceLimits limits) {
  // The limit set on each device; a device's limit never changes, so after the first launch this
  // is one relaxed load. (The host runtime's tests stand in different devices with different
  // limits for one index, hence the compare rather than a once-flag.)
  static std::atomic<int> set_to[kMaxDevices];  // zero-initialized (static storage)
  static std::mutex mutex;
  if (limits.device < 0 || limits.device >= kMaxDevices) return cudaErrorInvalidDevice;
  if (set_to[limits.device].load(std::memory_order_acquire) == limits.max_smem_per_block) return cudaSuccess;
  const std::lock_guard<std::mutex> lock(mutex);
  cudaFuncAttributes attr{};
  cudaError_t err = cudaFuncGetAttributes(&attr, Kernel);
  if (err != cudaSuccess) return err;
  err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             limits.max_smem_per_block - static_cast<int>(attr.sharedSizeBytes));
  if (err == cudaSuccess) set_to[limits.device].store(limits.max_smem_per_block, std::memory_order_release);
  return err;
}

}  // namespace online_softmax::kernels
