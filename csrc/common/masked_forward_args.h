// masked_forward's argument checks and input preparation, shared by the CPU op and the composite.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <vector>

#include "common/checks.h"

namespace online_softmax {

struct MaskedForwardArgs {
  at::Tensor x;           // the softmax dim last, contiguous, in a dtype the kernels read
  at::ScalarType out_dtype;
  int64_t dim;            // the softmax dim of the caller's x
  at::Tensor mask;        // undefined, bool, or additive in the accumulation dtype; broadcast
                          // (expanded, not copied) to x's moved shape, last stride 0 or 1
  int64_t causal_rows;    // x.size(-2) when causal (query positions), else 0
};

inline MaskedForwardArgs masked_forward_args(const at::Tensor& x_in, const std::optional<at::Tensor>& mask_in,
                                             bool causal, int64_t dim, double scale,
                                             std::optional<at::ScalarType> dtype) {
  constexpr const char* op = "masked_forward";
  MaskedForwardArgs a;
  a.out_dtype = result_dtype(x_in, dtype, op);
  a.dim = wrap_dim(dim, x_in, op);
  TORCH_CHECK_VALUE(std::isfinite(scale), "online_softmax.masked_forward: scale must be finite, got ", scale);
  const int64_t nd = x_in.dim();
  if (causal) {
    TORCH_CHECK_VALUE(nd >= 2, "online_softmax.masked_forward: causal needs x of at least 2 dims (..., queries, "
                      "keys), got shape ", x_in.sizes());
    TORCH_CHECK_VALUE(a.dim == nd - 1, "online_softmax.masked_forward: causal masks keys j > i + causal_offset, so "
                      "the softmax must run over the last dim (the keys), got dim ", dim);
    a.causal_rows = x_in.size(nd - 2);
  } else {
    a.causal_rows = 0;
  }
  const at::Tensor x_cast = readable_input(x_in, a.out_dtype);
  a.x = (nd == 0 ? x_cast : x_cast.movedim(a.dim, -1)).contiguous();
  if (!mask_in.has_value()) return a;
  at::Tensor m = *mask_in;
  TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()),
                   "online_softmax.masked_forward: mask must be bool (True takes part) or floating (added to "
                   "x * scale), got ", m.scalar_type());
  TORCH_CHECK_VALUE(m.device() == x_in.device(), "online_softmax.masked_forward: mask must be on x's device ",
                    x_in.device(), ", got ", m.device());
  TORCH_CHECK_VALUE(m.dim() <= nd, "online_softmax.masked_forward: mask of shape ", m.sizes(),
                    " does not broadcast to x's shape ", x_in.sizes());
  for (int64_t i = 0; i < m.dim(); ++i) {
    const int64_t ms = m.size(m.dim() - 1 - i), xs = x_in.size(nd - 1 - i);
    TORCH_CHECK_VALUE(ms == xs || ms == 1, "online_softmax.masked_forward: mask of shape ", m.sizes(),
                      " does not broadcast to x's shape ", x_in.sizes());
  }
  if (m.scalar_type() != at::kBool) m = m.to(state_dtype(a.x.scalar_type()));
  if (nd == 0) return a.mask = m.expand({}), a;
  std::vector<int64_t> padded(nd - m.dim(), 1);
  padded.insert(padded.end(), m.sizes().begin(), m.sizes().end());
  m = m.reshape(padded).movedim(a.dim, -1);  // the mask's own size, never x's
  if (m.size(-1) > 1 && m.stride(-1) != 1) m = m.contiguous();
  a.mask = m.expand(a.x.sizes());
  return a;
}

// The mask's row addressing over x's rows (x's moved shape without its last dim) with adjacent dims
// merged where the mask's strides allow it and size-1 dims dropped: the same offsets, in as few dims
// as possible (the CUDA kernels take at most 8).
struct MaskRows {
  std::vector<int64_t> sizes, strides;
  int64_t col_stride = 0;
};

inline MaskRows mask_rows(const at::Tensor& x, const at::Tensor& mask) {
  MaskRows r;
  if (x.dim() == 0) return r;
  r.col_stride = mask.stride(-1);
  for (int64_t k = 0; k < x.dim() - 1; ++k) {
    const int64_t size = x.size(k), stride = mask.stride(k);
    if (size == 1) continue;
    if (!r.sizes.empty() && r.strides.back() == stride * size) {
      r.sizes.back() *= size;
      r.strides.back() = stride;
    } else {
      r.sizes.push_back(size);
      r.strides.push_back(stride);
    }
  }
  return r;
}

}  // namespace online_softmax
