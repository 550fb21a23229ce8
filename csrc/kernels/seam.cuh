// The one seam between the kernel sources and the machine they run on. Everything else in
// csrc/kernels is plain CUDA C++; only these two constructs are written as macros, because the host
// C++ compiler cannot parse their CUDA spelling:
//
//   OSM_LAUNCH(grid, block, smem_bytes, stream, kernel<...>)(args...)
//       a kernel launch: kernel<<<grid, block, smem_bytes, stream>>>(args...)
//   OSM_DYNAMIC_SHARED(name);
//       the block's dynamic shared memory: extern __shared__ __align__(16) unsigned char name[]
//
// nvcc builds get exactly the CUDA spelling. The host build (test-only: kernels/host/, used by
// tests/kernels/test_kernels_host.py) defines ONLINE_SOFTMAX_HOST_KERNELS and force-includes
// kernels/host/runtime.h, which supplies both macros and the rest of the CUDA surface on a CPU.
#pragma once

#if !defined(ONLINE_SOFTMAX_HOST_KERNELS)
#define OSM_LAUNCH(grid, block, smem_bytes, stream, ...) __VA_ARGS__<<<grid, block, smem_bytes, stream>>>
#define OSM_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#elif !defined(OSM_LAUNCH)
#error "host kernel builds must force-include kernels/host/runtime.h"
#endif
