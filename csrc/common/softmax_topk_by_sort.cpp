#include "common/softmax_topk_by_sort.h"

#include "common/op_calls.h"

#include <tuple>

namespace online_softmax {

// A stable descending sort orders NaN first and ties to the lower index, as the fused kernels do.
// Probabilities come from the row state, as (x - M) * s with M = the top-1 (the raw row max), which
// keeps 1e4-scale logits exact, as the kernels do.
void softmax_topk_by_sort(TopKArgs& a, int64_t k, bool log, double temperature) {
  const auto sorted = at::sort(a.x, /*stable=*/true, /*dim=*/-1, /*descending=*/true);
  const at::Tensor top = std::get<0>(sorted).narrow(-1, 0, k);
  a.indices.copy_(std::get<1>(sorted).narrow(-1, 0, k));
  const auto [m, d] = call_stats(a.x, -1, temperature);
  a.max.copy_(m);
  a.sumexp.copy_(d);
  const at::Tensor t = top.to(a.max.scalar_type());
  const at::Tensor z = (t - t.narrow(-1, 0, 1)) * (1.0 / temperature);
  const at::Tensor d_col = d.unsqueeze(-1);
  a.values.copy_(log ? z - d_col.log() : z.exp() / d_col);
}

}  // namespace online_softmax
