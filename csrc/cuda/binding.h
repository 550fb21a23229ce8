// What every CUDA binding needs between the argument checks and the one launcher call: the CUDA
// element type of an ATen scalar type, the device's limits, scratch memory from the caching
// allocator, and a clear error when a launch fails.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <mutex>

#include "common/checks.h"
#include "kernels/launchers.h"
#include "kernels/smem_opt_in.cuh"

namespace online_softmax::cuda {

// at::Half / at::BFloat16 share their layout with __half / __nv_bfloat16.
template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };
template <typename T> using cuda_t = typename CudaType<T>::type;

template <typename T>
inline const cuda_t<T>* cptr(const at::Tensor& t) { return reinterpret_cast<const cuda_t<T>*>(t.const_data_ptr<T>()); }
template <typename T>
inline cuda_t<T>* mptr(at::Tensor& t) { return reinterpret_cast<cuda_t<T>*>(t.mutable_data_ptr<T>()); }

// Read once per device: attributes never change, and cudaDeviceGetAttribute per call is not free.
inline kernels::DeviceLimits device_limits(const at::Tensor& t) {
  static std::once_flag once[kernels::kMaxDevices];
  static kernels::DeviceLimits cached[kernels::kMaxDevices];
  const int device = t.device().index();
  TORCH_CHECK(device >= 0 && device < kernels::kMaxDevices, "online_softmax: CUDA device index ", device,
              " beyond the ", kernels::kMaxDevices, " supported");
  std::call_once(once[device], [device] {
    kernels::DeviceLimits limits;
    int l2 = 0, major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.num_sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.max_smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    limits.l2_bytes = l2;
    limits.cc = major * 10 + minor;
    limits.device = device;
    cached[device] = limits;
  });
  return cached[device];
}

// Scratch bytes on t's device, from the caching allocator (ordered on the current stream).
inline at::Tensor workspace(size_t bytes, const at::Tensor& t) {
  return at::empty({static_cast<int64_t>(bytes)}, t.options().dtype(at::kByte));
}

inline void* workspace_ptr(at::Tensor& ws) { return ws.numel() == 0 ? nullptr : ws.mutable_data_ptr(); }

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "online_softmax.", op, ": CUDA kernel launch failed: ",
              cudaGetErrorString(err));
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                              const char* op) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "online_softmax.", op, ": ", a_name, " is on ", a.device(),
                    " but ", b_name, " is on ", b.device());
}

}  // namespace online_softmax::cuda
