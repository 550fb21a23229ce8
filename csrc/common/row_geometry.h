// A tensor seen as [outer, size, inner] around its softmax dim: rows of `size` elements, `inner`
// apart. Plain data, so the per-ISA CPU kernels (csrc/cpu/kernels) can take it without ATen.
#pragma once

#include <cstdint>

namespace online_softmax {

struct RowGeometry {
  int64_t outer = 1;
  int64_t size = 1;
  int64_t inner = 1;
  int64_t rows() const { return outer * inner; }
};

}  // namespace online_softmax
