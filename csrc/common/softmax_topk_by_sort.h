// softmax_topk written over other ops (a stable sort and the library's stats op), for any backend
// and any k: the path of the k that a fused top-k kernel's buffer cannot hold. Slower than a fused
// kernel, same answers.
#pragma once

#include <ATen/ATen.h>

#include "common/op_args.h"

namespace online_softmax {

// Fills a's values, indices, max and sumexp (a from topk_args, a.rows > 0).
void softmax_topk_by_sort(TopKArgs& a, int64_t k, bool log, double temperature);

}  // namespace online_softmax
