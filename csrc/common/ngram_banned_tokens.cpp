// ngram_banned_tokens for every backend without a kernel of its own (CompositeExplicitAutograd;
// the CPU has one, csrc/cpu/ngram_banned_tokens.cpp), in tensor ops: each window of n tokens whose
// first n - 1 equal the row's last n - 1 bans its last token.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/ngram_banned_tokens.h"

namespace online_softmax {
namespace {

at::Tensor ngram_banned_tokens_composite(const at::Tensor& sequences, int64_t n) {
  check_ngram_banned_tokens(sequences, n);
  const int64_t rows = sequences.size(0), len = sequences.size(1);
  if (len < n) return at::empty({rows, 0}, sequences.options());
  const at::Tensor windows = sequences.unfold(1, n, 1);  // (rows, len - n + 1, n)
  const at::Tensor last = windows.select(2, n - 1);
  if (n == 1) return last.clone();
  const at::Tensor match =
      windows.narrow(2, 0, n - 1).eq(sequences.narrow(1, len - n + 1, n - 1).unsqueeze(1)).all(-1);
  return at::where(match, last, at::full({}, -1, sequences.options()));
}

}  // namespace
}  // namespace online_softmax

TORCH_LIBRARY_IMPL(online_softmax, CompositeExplicitAutograd, m) {
  m.impl("ngram_banned_tokens", &online_softmax::ngram_banned_tokens_composite);
}
