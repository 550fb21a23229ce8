// Picks the CPU kernel table (see dispatch.h). The per-ISA tables exist when setup.py compiled
// csrc/cpu/isa/<capability>.cpp, which it says with ONLINE_SOFTMAX_CPU_<CAPABILITY>.
#include "cpu/dispatch.h"

#include <ATen/Version.h>

#include <atomic>

namespace online_softmax::cpu {
namespace DEFAULT { extern const KernelTable kKernels; }
#if defined(ONLINE_SOFTMAX_CPU_AVX2)
namespace AVX2 { extern const KernelTable kKernels; }
#endif
#if defined(ONLINE_SOFTMAX_CPU_AVX512)
namespace AVX512 { extern const KernelTable kKernels; }
#endif

namespace {

// Lowest first, as the capabilities nest.
std::vector<const KernelTable*> compiled() {
  return {
      &DEFAULT::kKernels,
#if defined(ONLINE_SOFTMAX_CPU_AVX2)
      &AVX2::kKernels,
#endif
#if defined(ONLINE_SOFTMAX_CPU_AVX512)
      &AVX512::kKernels,
#endif
  };
}

int rank(const std::string& capability) {
  if (capability == "AVX512") return 2;
  if (capability == "AVX2") return 1;
  return 0;  // DEFAULT, and non-x86 names (VSX, ZVECTOR, SVE...): our portable build
}

const KernelTable* automatic() {
  // torch's choice: what this CPU supports, lowered by ATEN_CPU_CAPABILITY if set.
  const int want = rank(at::get_cpu_capability());
  const KernelTable* best = &DEFAULT::kKernels;
  for (const KernelTable* t : compiled()) {
    if (rank(t->capability) <= want) best = t;
  }
  return best;
}

std::atomic<const KernelTable*> chosen{nullptr};

}  // namespace

const KernelTable& kernels() {
  const KernelTable* t = chosen.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = automatic();
    chosen.store(t, std::memory_order_release);
  }
  return *t;
}

std::vector<std::string> compiled_capabilities() {
  std::vector<std::string> names;
  for (const KernelTable* t : compiled()) names.emplace_back(t->capability);
  return names;
}

// Whether this CPU can run a capability's instructions (the override must not pick one it lacks).
bool cpu_runs(const std::string& capability) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (capability == "AVX512") {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  }
  if (capability == "AVX2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return capability == "DEFAULT";
}

bool override_capability(const std::string& capability) {
  if (capability.empty()) {
    chosen.store(automatic(), std::memory_order_release);
    return true;
  }
  if (!cpu_runs(capability)) return false;
  for (const KernelTable* t : compiled()) {
    if (capability == t->capability) {
      chosen.store(t, std::memory_order_release);
      return true;
    }
  }
  return false;
}

}  // namespace online_softmax::cpu
