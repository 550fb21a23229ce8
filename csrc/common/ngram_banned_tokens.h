// ngram_banned_tokens' argument checks, shared by the CPU kernel and the composite.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace online_softmax {

inline void check_ngram_banned_tokens(const at::Tensor& sequences, int64_t n) {
  TORCH_CHECK_TYPE(sequences.scalar_type() == at::kLong, "online_softmax.ngram_banned_tokens: sequences must be an "
                   "int64 tensor, got ", sequences.scalar_type());
  TORCH_CHECK_VALUE(sequences.dim() == 2, "online_softmax.ngram_banned_tokens: sequences must be 2-D (rows, length), "
                    "got shape ", sequences.sizes());
  TORCH_CHECK_VALUE(n >= 1, "online_softmax.ngram_banned_tokens: n must be >= 1, got ", n);
}

}  // namespace online_softmax
