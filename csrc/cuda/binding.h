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

#include "common/checks.h"
#include "kernels/launchers.h"

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

inline kernels::DeviceLimits device_limits(const at::Tensor& t) {
  kernels::DeviceLimits limits;
  const int device = t.device().index();
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.num_sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.max_smem_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return limits;
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

inline kernels::RowLayout layout_of(const RowGeometry& g) { return {g.outer, g.size, g.inner}; }

}  // namespace online_softmax::cuda
