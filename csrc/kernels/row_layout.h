// A tensor seen as [outer, size, inner] around its softmax dim: rows of `size` elements, `inner`
// apart. Plain C++ with no framework header, because every layer takes it: the CUDA launchers and
// their plans (launch_plan.h), the per-ISA CPU kernels (which see no ATen tensor) and the op layers
// that compute it from a tensor (common/checks.h).
#pragma once

#include <cstdint>

namespace online_softmax {

struct RowLayout {
  int64_t outer = 1;
  int64_t size = 1;
  int64_t inner = 1;
  int64_t rows() const { return outer * inner; }
};

}  // namespace online_softmax
