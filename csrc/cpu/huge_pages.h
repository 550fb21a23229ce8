// Large fresh outputs: ask Linux for transparent huge pages before the first write.
//
// A freshly allocated multi-megabyte tensor is backed by 4 KiB pages that the kernel zeroes on
// first touch; on this project's 2-core machine that costs more than the softmax itself (a 128 MiB
// clone: 63 ms, a copy into an existing buffer: 14 ms). With THP in "madvise" mode (the common
// default) the advice turns 512 faults into one. torch offers the same for all its allocations
// behind THP_MEM_ALLOC_ENABLE=1; this does it only for the outputs of these ops.
// Only blocks of 32 MiB and more: glibc serves smaller ones from recycled heap memory, where the
// pages are already mapped and the advice only costs. ONLINE_SOFTMAX_HUGE_PAGES=0 turns it off.
// The cross-entropy gradient does without it: in a training step it follows the frees of other
// logits-sized buffers, and the advice then often stalled in compaction (csrc/cpu/cross_entropy.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace online_softmax::cpu {

inline bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("ONLINE_SOFTMAX_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t bytes = static_cast<uintptr_t>(t.nbytes());
  if (!huge_pages_enabled() || bytes < (uintptr_t(32) << 20) || !t.device().is_cpu()) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (p + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // advice only
#else
  (void)t;
#endif
}

// at::empty for a large result that is about to be written once, front to back.
inline at::Tensor empty_output(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor t = at::empty(shape, options);
  advise_huge_pages(t);
  return t;
}

}  // namespace online_softmax::cpu
