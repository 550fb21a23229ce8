// ngram_banned_tokens on the CPU: a plain loop over each row's windows. The tensor version
// (csrc/common/ngram_banned_tokens.cpp) is about eight small ATen ops, each paid at every step of a
// beam search; here it is one call.
#include <ATen/ATen.h>

#include "common/ngram_banned_tokens.h"
#include "cpu/kernels.h"

namespace online_softmax::cpu {

at::Tensor ngram_banned_tokens(const at::Tensor& sequences, int64_t n) {
  check_ngram_banned_tokens(sequences, n);
  const int64_t rows = sequences.size(0), len = sequences.size(1);
  const int64_t windows = std::max<int64_t>(len - n + 1, 0);
  at::Tensor out = at::empty({rows, windows}, sequences.options());
  if (rows == 0 || windows == 0) return out;
  const at::Tensor seq = sequences.contiguous();
  const int64_t* s = seq.const_data_ptr<int64_t>();
  int64_t* o = out.mutable_data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t* row = s + r * len;
    const int64_t* last = row + len - (n - 1);  // the row's last n - 1 tokens
    for (int64_t j = 0; j < windows; ++j) {
      bool match = true;
      for (int64_t i = 0; i < n - 1 && match; ++i) match = row[j + i] == last[i];
      o[r * windows + j] = match ? row[j + n - 1] : -1;
    }
  }
  return out;
}

}  // namespace online_softmax::cpu
