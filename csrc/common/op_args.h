// Argument checking and input preparation shared by the CPU and CUDA bindings, so that both
// backends accept, reject and reshape exactly the same inputs. Each function checks its op's
// arguments (raising exceptions that name them) and returns the tensors the kernels read.
#pragma once

#include <ATen/ATen.h>

#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "common/checks.h"

namespace online_softmax {

// ---- forward ----

struct ForwardArgs {
  at::Tensor x;  // contiguous, in a dtype the kernels read (x's own, or cast first)
  at::ScalarType out_dtype;
  int64_t dim;
};

inline ForwardArgs forward_args(const at::Tensor& x_in, int64_t dim, double temperature,
                                std::optional<at::ScalarType> dtype) {
  ForwardArgs a;
  a.out_dtype = result_dtype(x_in, dtype, "forward");
  a.dim = wrap_dim(dim, x_in, "forward");
  check_temperature(temperature, "forward");
  a.x = readable_input(x_in, a.out_dtype).contiguous();
  return a;
}

// ---- stats ----

struct StatsArgs {
  at::Tensor x;  // contiguous
  int64_t dim;
  std::vector<int64_t> shape;  // of max and sumexp
  at::TensorOptions options;   // of max and sumexp
};

inline StatsArgs stats_args(const at::Tensor& x_in, int64_t dim, double temperature) {
  check_floating(x_in, "x", "stats");
  StatsArgs a;
  a.dim = wrap_dim(dim, x_in, "stats");
  check_temperature(temperature, "stats");
  a.x = x_in.contiguous();
  a.shape = reduced_shape(a.x, a.dim);
  a.options = a.x.options().dtype(state_dtype(a.x.scalar_type()));
  return a;
}

// Results that need no kernel: no rows at all, or an empty softmax dim (the merge identity,
// max = -inf and sumexp = 0). Returns true when m and d are final.
inline bool stats_without_kernel(at::Tensor& m, at::Tensor& d, const at::Tensor& x) {
  if (m.numel() == 0) return true;
  if (x.numel() == 0) {
    m.fill_(-std::numeric_limits<double>::infinity());
    d.zero_();
    return true;
  }
  return false;
}

// ---- backward ----

struct BackwardArgs {
  at::Tensor dy, y;          // contiguous, both in out's dtype
  at::ScalarType x_dtype;    // the gradient's dtype
  at::ScalarType dx_dtype;   // what the kernel writes: x_dtype, or y's dtype then a cast
  int64_t dim;
};

inline BackwardArgs backward_args(const at::Tensor& grad_out, const at::Tensor& out, int64_t dim,
                                  double temperature, std::optional<at::ScalarType> input_dtype) {
  check_floating(out, "out", "backward");
  check_floating(grad_out, "grad_out", "backward");
  TORCH_CHECK_VALUE(grad_out.sizes() == out.sizes(), "online_softmax.backward: grad_out has shape ",
                    grad_out.sizes(), " but out has shape ", out.sizes());
  TORCH_CHECK_VALUE(grad_out.device() == out.device(), "online_softmax.backward: grad_out is on ",
                    grad_out.device(), " but out is on ", out.device());
  BackwardArgs a;
  a.dim = wrap_dim(dim, out, "backward");
  check_temperature(temperature, "backward");
  const at::ScalarType y_dtype = out.scalar_type();
  a.x_dtype = input_dtype.value_or(y_dtype);
  a.y = out.contiguous();
  a.dy = grad_out.to(y_dtype).contiguous();
  // Writes straight into the input's dtype for float32 results of float16/bfloat16 inputs.
  const bool direct = a.x_dtype == y_dtype ||
      (y_dtype == at::kFloat && (a.x_dtype == at::kHalf || a.x_dtype == at::kBFloat16));
  a.dx_dtype = direct ? a.x_dtype : y_dtype;
  return a;
}

// backward_'s checks: grad_out is overwritten by the gradient, so it must match out exactly and
// be contiguous (a dense block the kernels can write); returns dim wrapped.
inline int64_t inplace_backward_args(const at::Tensor& grad_out, const at::Tensor& out, int64_t dim,
                                     double temperature) {
  check_floating(out, "out", "backward_");
  check_floating(grad_out, "grad_out", "backward_");
  TORCH_CHECK_VALUE(grad_out.sizes() == out.sizes(), "online_softmax.backward_: grad_out has shape ",
                    grad_out.sizes(), " but out has shape ", out.sizes());
  TORCH_CHECK_VALUE(grad_out.device() == out.device(), "online_softmax.backward_: grad_out is on ",
                    grad_out.device(), " but out is on ", out.device());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == out.scalar_type(), "online_softmax.backward_: grad_out (",
                   grad_out.scalar_type(), ") must have out's dtype (", out.scalar_type(), ")");
  TORCH_CHECK_VALUE(grad_out.is_contiguous() && out.is_contiguous(),
                    "online_softmax.backward_: grad_out and out must be contiguous");
  check_temperature(temperature, "backward_");
  return wrap_dim(dim, out, "backward_");
}

// ---- top-k ----

// x viewed as [rows, n] with the softmax dim last (a 0-d x is one row of one element).
inline at::Tensor rows_last(const at::Tensor& x, int64_t dim) {
  if (x.dim() == 0) return x.reshape({1, 1});
  return x.movedim(dim, -1).contiguous();
}

// Undo rows_last for a [..., k] result: put k back at dim, and shape like the input.
inline at::Tensor restore_dim(const at::Tensor& t, const at::Tensor& like, int64_t dim) {
  if (like.dim() == 0) return t.reshape({});
  return t.movedim(-1, dim).contiguous();  // a fresh result, like the fake kernel's
}

struct TopKArgs {
  at::Tensor x;  // rows_last(x)
  int64_t dim, n, rows;
  at::Tensor values, indices, max, sumexp;  // allocated results, shaped for rows_last
};

inline TopKArgs topk_args(const at::Tensor& x_in, int64_t k, int64_t dim, double temperature) {
  check_floating(x_in, "x", "softmax_topk");
  TopKArgs a;
  a.dim = wrap_dim(dim, x_in, "softmax_topk");
  check_temperature(temperature, "softmax_topk");
  a.n = x_in.dim() == 0 ? 1 : x_in.size(a.dim);
  check_k(k, a.n, "softmax_topk");
  a.x = rows_last(x_in, a.dim);
  a.rows = a.n == 0 ? 0 : a.x.numel() / a.n;
  auto batch = a.x.sizes().vec();
  batch.pop_back();
  auto vshape = batch;
  vshape.push_back(k);
  a.values = at::empty(vshape, a.x.options());
  a.indices = at::empty(vshape, a.x.options().dtype(at::kLong));
  const auto sopts = a.x.options().dtype(state_dtype(a.x.scalar_type()));
  a.max = at::empty(batch, sopts);
  a.sumexp = at::empty(batch, sopts);
  return a;
}

// The op's results, shaped like x_in again.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_results(const TopKArgs& a,
                                                                               const at::Tensor& x_in) {
  if (x_in.dim() == 0) {
    return {a.values.reshape({}), a.indices.reshape({}), a.max.reshape({}), a.sumexp.reshape({})};
  }
  return {restore_dim(a.values, x_in, a.dim), restore_dim(a.indices, x_in, a.dim), a.max, a.sumexp};
}

struct TopKBackwardArgs {
  at::Tensor x, g, idx, max, sumexp;  // rows_last / contiguous; g in x's dtype; states in state dtype
  int64_t dim, n, rows, k;
};

inline TopKBackwardArgs topk_backward_args(const at::Tensor& grad_values, const at::Tensor& x_in,
                                           const at::Tensor& indices_in, const at::Tensor& max,
                                           const at::Tensor& sumexp, int64_t dim, double temperature) {
  const char* op = "softmax_topk_backward";
  check_floating(x_in, "x", op);
  check_floating(grad_values, "grad_values", op);
  TopKBackwardArgs a;
  a.dim = wrap_dim(dim, x_in, op);
  check_temperature(temperature, op);
  TORCH_CHECK_TYPE(indices_in.scalar_type() == at::kLong, "online_softmax.", op,
                   ": indices must be int64, got ", indices_in.scalar_type());
  TORCH_CHECK_VALUE(grad_values.sizes() == indices_in.sizes(), "online_softmax.", op,
                    ": grad_values has shape ", grad_values.sizes(), " but indices has shape ",
                    indices_in.sizes());
  for (const at::Tensor* t : {&grad_values, &indices_in, &max, &sumexp}) {
    TORCH_CHECK_VALUE(t->device() == x_in.device(), "online_softmax.", op, ": all tensors must be on ",
                      x_in.device(), ", got one on ", t->device());
  }
  a.x = rows_last(x_in, a.dim);
  a.n = a.x.size(-1);
  a.rows = a.n == 0 ? 0 : a.x.numel() / a.n;
  a.g = rows_last(grad_values, a.dim).to(a.x.scalar_type());
  a.idx = rows_last(indices_in, a.dim);
  a.k = a.idx.size(-1);
  TORCH_CHECK_VALUE(a.idx.numel() == a.rows * a.k, "online_softmax.", op, ": indices do not match x");
  const auto sdtype = state_dtype(a.x.scalar_type());
  a.max = max.to(sdtype).contiguous();
  a.sumexp = sumexp.to(sdtype).contiguous();
  TORCH_CHECK_VALUE(a.max.numel() == a.rows && a.sumexp.numel() == a.rows, "online_softmax.", op,
                    ": max and sumexp must hold one value per row (", a.rows, ")");
  return a;
}

inline at::Tensor topk_backward_result(const at::Tensor& dx, const at::Tensor& x_in, int64_t dim) {
  if (x_in.dim() == 0) return dx.reshape({});
  return restore_dim(dx, x_in, dim);
}

// ---- sample_categorical ----

// What both sampling ops take first: x (rows, vocab) made contiguous, and its per-row temperatures.
struct SampleRows {
  at::Tensor x, temperature;
  int64_t rows, n;
  at::Tensor edit_ids, edit_values;  // contiguous (rows, num_edits); undefined without edits
  int64_t num_edits = 0;
  // What the kernels read: null without edits.
  const int64_t* edit_ids_data() const { return num_edits > 0 ? edit_ids.const_data_ptr<int64_t>() : nullptr; }
  const void* edit_values_data() const { return num_edits > 0 ? edit_values.const_data_ptr() : nullptr; }
};

struct SampleArgs : SampleRows {
  at::Tensor min_log_ratio, uniforms;  // contiguous; min_log_ratio undefined when absent
  int64_t num_samples;
  at::Tensor tokens, log_probs;        // allocated results (rows, num_samples)
};

// Checks a (rows,) or (rows, S) float64 parameter tensor and the range of its values (one sync).
inline at::Tensor sample_param(const char* op, const at::Tensor& t, const char* name, const at::Tensor& x,
                               int64_t dims, double lo, double hi, bool lo_open, bool hi_open) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, "online_softmax.", op, ": ", name,
                   " must be a float64 tensor, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dims && t.size(0) == x.size(0), "online_softmax.", op, ": ", name, " must have ",
                    dims == 1 ? "shape (rows,)" : "shape (rows, num_samples)", " with rows = ", x.size(0),
                    ", got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), "online_softmax.", op, ": ", name, " is on ", t.device(),
                    " but x is on ", x.device());
  if (t.numel() > 0) {
    const at::Tensor range = at::stack({t.min(), t.max()}).cpu();
    const double a = range[0].item<double>(), b = range[1].item<double>();
    const bool ok = (lo_open ? a > lo : a >= lo) && (hi_open ? b < hi : b <= hi) && !std::isnan(a) && !std::isnan(b);
    TORCH_CHECK_VALUE(ok, "online_softmax.", op, ": ", name, " must lie in ", lo_open ? "(" : "[", lo, ", ", hi,
                      hi_open ? ")" : "]", ", got values in [", a, ", ", b, "]");
  }
  return t.contiguous();
}

// Checks x (rows, vocab), at least one column, and its (rows,) temperatures. The kernels scale by
// 1 / temperature in float32: it must stay finite.
inline void sample_rows(const char* op, const at::Tensor& x, const at::Tensor& temperature, SampleRows& a) {
  check_floating(x, "x", op);
  TORCH_CHECK_VALUE(x.dim() == 2, "online_softmax.", op, ": x must be 2-D (rows, vocab), got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) >= 1 || x.size(0) == 0, "online_softmax.", op,
                    ": x must have at least one column to draw from, got shape ", x.sizes());
  a.x = x.contiguous();
  a.rows = x.size(0);
  a.n = x.size(1);
  a.temperature = sample_param(op, temperature, "temperature", x, 1, 1.0 / 3.0e38,
                               std::numeric_limits<double>::infinity(), false, true);
}

// The sparse logit edits of both sampling ops: edit_ids (rows, E) int64, each row's real ids strictly
// ascending in [0, vocab) and then -1 padding; edit_values (rows, E) in the accumulation dtype. The
// kernels walk each row's list with a cursor and stop at its first -1, so these properties are what
// keeps their reads in bounds. One sync for the three value checks.
inline void sample_edits(const char* op, const std::optional<at::Tensor>& edit_ids,
                         const std::optional<at::Tensor>& edit_values, SampleRows& a) {
  TORCH_CHECK_VALUE(edit_ids.has_value() == edit_values.has_value(), "online_softmax.", op, ": ",
                    edit_ids.has_value() ? "edit_values" : "edit_ids", " must be given with ",
                    edit_ids.has_value() ? "edit_ids" : "edit_values", " (both or neither)");
  if (!edit_ids.has_value()) return;
  const at::Tensor& ids = *edit_ids;
  const at::Tensor& values = *edit_values;
  const at::ScalarType acc = state_dtype(a.x.scalar_type());
  TORCH_CHECK_TYPE(ids.scalar_type() == at::kLong, "online_softmax.", op, ": edit_ids must be an int64 tensor, got ",
                   ids.scalar_type());
  TORCH_CHECK_TYPE(values.scalar_type() == acc, "online_softmax.", op, ": edit_values must be ",
                   acc == at::kDouble ? "float64" : "float32", " (the accumulation dtype of x), got ",
                   values.scalar_type());
  TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == a.rows, "online_softmax.", op,
                    ": edit_ids must have shape (rows, num_edits) with rows = ", a.rows, ", got shape ", ids.sizes());
  TORCH_CHECK_VALUE(values.sizes() == ids.sizes(), "online_softmax.", op, ": edit_values must have edit_ids' shape ",
                    ids.sizes(), ", got ", values.sizes());
  for (const auto& [t, name] : {std::pair{&ids, "edit_ids"}, std::pair{&values, "edit_values"}}) {
    TORCH_CHECK_VALUE(t->device() == a.x.device(), "online_softmax.", op, ": ", name, " is on ", t->device(),
                      " but x is on ", a.x.device());
  }
  if (ids.numel() > 0) {
    const at::Tensor prev = ids.narrow(1, 0, ids.size(1) - 1), next = ids.narrow(1, 1, ids.size(1) - 1);
    const at::Tensor bad = at::stack({((ids < -1) | (ids >= a.n)).any(),
                                      ((next != -1) & (prev == -1)).any(),
                                      ((next != -1) & (next <= prev)).any()})
                               .cpu();
    const bool* b = bad.const_data_ptr<bool>();
    TORCH_CHECK_VALUE(!b[0], "online_softmax.", op, ": edit_ids must lie in [0, ", a.n, ") (vocab), or be -1 padding");
    TORCH_CHECK_VALUE(!b[1], "online_softmax.", op, ": edit_ids must put its -1 padding after a row's real ids");
    TORCH_CHECK_VALUE(!b[2], "online_softmax.", op, ": edit_ids must be strictly ascending within a row");
  }
  a.edit_ids = ids.contiguous();
  a.edit_values = values.contiguous();
  a.num_edits = ids.size(1);
}

inline SampleArgs sample_args(const at::Tensor& x, const at::Tensor& temperature,
                              const std::optional<at::Tensor>& min_log_ratio, const at::Tensor& uniforms,
                              const std::optional<at::Tensor>& edit_ids = std::nullopt,
                              const std::optional<at::Tensor>& edit_values = std::nullopt) {
  const char* op = "sample_categorical";
  SampleArgs a;
  sample_rows(op, x, temperature, a);
  sample_edits(op, edit_ids, edit_values, a);
  if (min_log_ratio.has_value()) {
    a.min_log_ratio = sample_param(op, *min_log_ratio, "min_log_ratio", x, 1, -std::numeric_limits<double>::infinity(),
                                   0.0, false, false);
  }
  a.uniforms = sample_param(op, uniforms, "uniforms", x, 2, 0.0, 1.0, false, true);
  a.num_samples = uniforms.size(1);
  a.tokens = at::empty({a.rows, a.num_samples}, x.options().dtype(at::kLong));
  a.log_probs = at::empty({a.rows, a.num_samples}, x.options().dtype(state_dtype(x.scalar_type())));
  return a;
}

// ---- top_p_threshold ----

struct TopPArgs : SampleRows {
  at::Tensor top_p;
  at::Tensor log_ratio, status;  // allocated results (rows,)
};

inline TopPArgs top_p_args(const at::Tensor& x, const at::Tensor& temperature, const at::Tensor& top_p,
                           const std::optional<at::Tensor>& edit_ids = std::nullopt,
                           const std::optional<at::Tensor>& edit_values = std::nullopt) {
  const char* op = "top_p_threshold";
  TopPArgs a;
  sample_rows(op, x, temperature, a);
  sample_edits(op, edit_ids, edit_values, a);
  a.top_p = sample_param(op, top_p, "top_p", x, 1, 0.0, 1.0, false, false);
  a.log_ratio = at::empty({a.rows}, x.options().dtype(at::kDouble));
  a.status = at::empty({a.rows}, x.options().dtype(at::kLong));
  return a;
}

// ---- rejection_sample ----

struct RejectionArgs {
  at::Tensor target, draft_ids, draft_probs, num_drafts, temperature, min_log_ratio, uniforms;  // contiguous;
                                                                   // draft_probs, min_log_ratio undefined when absent
  int64_t batch, n, vocab;  // n: draft positions (target_logits has n + 1)
  at::Tensor token_ids, num_accepted, log_probs;  // allocated results
};

// The checks of rejection_sample's arguments: shapes that agree, dtypes, one device, and the values
// the kernels rely on (draft ids in range, counts in [0, n], temperatures, cuts and uniforms in
// range, draft probabilities nonnegative and not NaN). Each value check is one reduction and one sync.
inline RejectionArgs rejection_args(const at::Tensor& target_logits, const at::Tensor& draft_token_ids,
                                    const std::optional<at::Tensor>& draft_probs, const at::Tensor& num_draft_tokens,
                                    const at::Tensor& temperature, const std::optional<at::Tensor>& min_log_ratio,
                                    const at::Tensor& uniforms) {
  const char* op = "rejection_sample";
  check_floating(target_logits, "target_logits", op);
  TORCH_CHECK_VALUE(target_logits.dim() == 3 && target_logits.size(1) >= 1, "online_softmax.", op,
                    ": target_logits must be 3-D (batch, n + 1, vocab) with n + 1 >= 1, got shape ",
                    target_logits.sizes());
  RejectionArgs a;
  a.batch = target_logits.size(0);
  a.n = target_logits.size(1) - 1;
  a.vocab = target_logits.size(2);
  TORCH_CHECK_VALUE(a.vocab >= 1 || a.batch == 0, "online_softmax.", op,
                    ": target_logits must have at least one vocabulary entry, got shape ", target_logits.sizes());
  const auto dev = target_logits.device();
  auto same_device = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.device() == dev, "online_softmax.", op, ": ", name, " is on ", t.device(),
                      " but target_logits is on ", dev);
  };
  // [lo, hi] (open ends where asked) over every value of t, NaN refused: one sync.
  auto in_range = [&](const at::Tensor& t, const char* name, double lo, double hi, bool hi_open) {
    if (t.numel() == 0) return;
    const at::Tensor range = at::stack({t.min().to(at::kDouble), t.max().to(at::kDouble)}).cpu();
    const double lo_seen = range[0].item<double>(), hi_seen = range[1].item<double>();
    const bool ok = lo_seen >= lo && (hi_open ? hi_seen < hi : hi_seen <= hi) && !std::isnan(lo_seen) &&
                    !std::isnan(hi_seen);
    TORCH_CHECK_VALUE(ok, "online_softmax.", op, ": ", name, " must lie in [", lo, ", ", hi, hi_open ? ")" : "]",
                      ", got values in [", lo_seen, ", ", hi_seen, "]");
  };
  auto index_tensor = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "online_softmax.", op, ": ", name, " must be an int64 tensor, got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.sizes() == shape, "online_softmax.", op, ": ", name, " must have shape ", shape, ", got ",
                      t.sizes());
    same_device(t, name);
  };
  auto double_tensor = [&](const at::Tensor& t, const char* name, at::IntArrayRef shape) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble, "online_softmax.", op, ": ", name,
                     " must be a float64 tensor, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.sizes() == shape, "online_softmax.", op, ": ", name, " must have shape ", shape, ", got ",
                      t.sizes());
    same_device(t, name);
  };
  index_tensor(draft_token_ids, "draft_token_ids", {a.batch, a.n});
  in_range(draft_token_ids, "draft_token_ids", 0, double(a.vocab), true);
  if (draft_probs.has_value()) {
    const at::Tensor& q = *draft_probs;
    TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == target_logits.scalar_type(),
                     "online_softmax.", op, ": draft_probs must be float32 or target_logits' dtype (",
                     target_logits.scalar_type(), "), got ", q.scalar_type());
    TORCH_CHECK_VALUE(q.sizes() == at::IntArrayRef({a.batch, a.n, a.vocab}), "online_softmax.", op,
                      ": draft_probs must have shape ", at::IntArrayRef({a.batch, a.n, a.vocab}),
                      " (batch, n, vocab), got ", q.sizes());
    same_device(q, "draft_probs");
    in_range(q, "draft_probs", 0.0, std::numeric_limits<double>::infinity(), true);  // probabilities: no NaN
    a.draft_probs = q.contiguous();
  }
  index_tensor(num_draft_tokens, "num_draft_tokens", {a.batch});
  in_range(num_draft_tokens, "num_draft_tokens", 0, double(a.n), false);
  double_tensor(temperature, "temperature", {a.batch});
  in_range(temperature, "temperature", 0.0, std::numeric_limits<double>::infinity(), true);
  if (temperature.numel() > 0) {
    // The kernels scale by 1 / temperature in float32: a sampled row's must stay finite.
    const bool tiny = ((temperature > 0) & (temperature < 1.0 / 3.0e38)).any().cpu().item<bool>();
    TORCH_CHECK_VALUE(!tiny, "online_softmax.", op, ": temperature must be 0 (greedy) or at least 3.4e-39 ",
                      "(1 / temperature must fit in float32)");
  }
  if (min_log_ratio.has_value()) {
    double_tensor(*min_log_ratio, "min_log_ratio", {a.batch, a.n + 1});
    in_range(*min_log_ratio, "min_log_ratio", -std::numeric_limits<double>::infinity(), 0.0, false);
    a.min_log_ratio = min_log_ratio->contiguous();
  }
  double_tensor(uniforms, "uniforms", {a.batch, a.n + 1});
  in_range(uniforms, "uniforms", 0.0, 1.0, true);
  a.target = target_logits.contiguous();
  a.draft_ids = draft_token_ids.contiguous();
  a.num_drafts = num_draft_tokens.contiguous();
  a.temperature = temperature.contiguous();
  a.uniforms = uniforms.contiguous();
  const auto opts = target_logits.options();
  a.token_ids = at::empty({a.batch, a.n + 1}, opts.dtype(at::kLong));
  a.num_accepted = at::empty({a.batch}, opts.dtype(at::kLong));
  a.log_probs = at::empty({a.batch, a.n + 1}, opts.dtype(state_dtype(target_logits.scalar_type())));
  return a;
}

// ---- token_logprobs ----

struct TokenLogprobsArgs {
  at::Tensor x, token_ids, token_values;  // contiguous; token_values undefined when absent
  int64_t rows, n;
  at::Tensor log_probs, rank, top_ids, top_log_probs, max, sumexp, entropy;  // allocated results
};

inline TokenLogprobsArgs token_logprobs_args(const at::Tensor& x, const at::Tensor& token_ids, int64_t top_n,
                                             double temperature, const std::optional<at::Tensor>& token_values) {
  const char* op = "token_logprobs";
  check_floating(x, "x", op);
  TORCH_CHECK_VALUE(x.dim() == 2, "online_softmax.", op, ": x must be 2-D (rows, vocab), got shape ", x.sizes());
  TokenLogprobsArgs a;
  a.rows = x.size(0);
  a.n = x.size(1);
  TORCH_CHECK_VALUE(a.n >= 1 || a.rows == 0, "online_softmax.", op,
                    ": x must have at least one vocabulary entry, got shape ", x.sizes());
  TORCH_CHECK_TYPE(token_ids.scalar_type() == at::kLong, "online_softmax.", op,
                   ": token_ids must be an int64 tensor, got ", token_ids.scalar_type());
  TORCH_CHECK_VALUE(token_ids.dim() == 1 && token_ids.size(0) == a.rows, "online_softmax.", op,
                    ": token_ids must have shape [", a.rows, "] (one token per row of x), got ", token_ids.sizes());
  TORCH_CHECK_VALUE(token_ids.device() == x.device(), "online_softmax.", op, ": token_ids is on ",
                    token_ids.device(), " but x is on ", x.device());
  if (a.rows > 0) {  // one sync for both ends
    const at::Tensor range = at::stack({token_ids.min(), token_ids.max()}).cpu();
    const int64_t lo = range[0].item<int64_t>(), hi = range[1].item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 0 && hi < a.n, "online_softmax.", op, ": token_ids must lie in [0, ", a.n,
                      "), got values in [", lo, ", ", hi, "]");
  }
  TORCH_CHECK_VALUE(top_n >= 0 && top_n <= std::max<int64_t>(a.n, 0), "online_softmax.", op,
                    ": top_n must satisfy 0 <= top_n <= ", a.n, " (the vocabulary size), got top_n=", top_n);
  check_temperature(temperature, op);
  const at::ScalarType acc = state_dtype(x.scalar_type());
  if (token_values.has_value()) {
    const at::Tensor& v = *token_values;
    TORCH_CHECK_TYPE(v.scalar_type() == acc, "online_softmax.", op, ": token_values must be ", acc,
                     " (the accumulation dtype of x), got ", v.scalar_type());
    TORCH_CHECK_VALUE(v.dim() == 1 && v.size(0) == a.rows, "online_softmax.", op, ": token_values must have shape [",
                      a.rows, "] (one value per row of x), got ", v.sizes());
    TORCH_CHECK_VALUE(v.device() == x.device(), "online_softmax.", op, ": token_values is on ", v.device(),
                      " but x is on ", x.device());
    a.token_values = v.contiguous();
  }
  a.x = x.contiguous();
  a.token_ids = token_ids.contiguous();
  const auto per_row = x.options().dtype(acc);
  a.log_probs = at::empty({a.rows}, per_row);
  a.rank = at::empty({a.rows}, x.options().dtype(at::kLong));
  a.top_ids = at::empty({a.rows, top_n}, x.options().dtype(at::kLong));
  a.top_log_probs = at::empty({a.rows, top_n}, per_row);
  a.max = at::empty({a.rows}, per_row);
  a.sumexp = at::empty({a.rows}, per_row);
  a.entropy = at::empty({a.rows}, per_row);
  return a;
}

// ---- per-row arguments of the elementwise gradient ops (cross_entropy_backward, token_logprobs_backward) ----

// t: (rows,) in the accumulation dtype acc, on x's device; returned contiguous.
inline at::Tensor per_row_arg(const at::Tensor& t, const char* name, const char* op, const at::Tensor& x,
                              at::ScalarType acc, int64_t rows) {
  TORCH_CHECK_TYPE(t.scalar_type() == acc, "online_softmax.", op, ": ", name, " must be ", acc,
                   " (the accumulation dtype of x), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == rows, "online_softmax.", op, ": ", name,
                    " must have shape [", rows, "] (one value per row of x), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), "online_softmax.", op, ": ", name, " is on ", t.device(),
                    " but x is on ", x.device());
  return t.contiguous();
}

// t: (rows,) int64 class or token ids on x's device (their range is the kernels' to check, where
// they read them); returned contiguous.
inline at::Tensor per_row_ids(const at::Tensor& t, const char* name, const char* op, const at::Tensor& x,
                              int64_t rows) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "online_softmax.", op, ": ", name, " must be int64, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == rows, "online_softmax.", op, ": ", name, " must have shape [",
                    rows, "], got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == x.device(), "online_softmax.", op, ": ", name, " is on ", t.device(),
                    " but x is on ", x.device());
  return t.contiguous();
}

// x of an elementwise gradient op: floating, (rows, classes); in place (the op writes over x), x
// must be contiguous already.
inline at::Tensor gradient_logits_arg(const at::Tensor& x, const char* op, bool in_place) {
  check_floating(x, "x", op);
  TORCH_CHECK_VALUE(x.dim() == 2, "online_softmax.", op, ": x must be 2-D (rows, classes), got shape ", x.sizes());
  TORCH_CHECK_VALUE(!in_place || x.is_contiguous(), "online_softmax.", op,
                    ": x must be contiguous to receive its gradient in place");
  return x.contiguous();
}

// ---- cross_entropy_backward ----

struct CrossEntropyBackwardArgs {
  at::Tensor x;                     // (rows, n), contiguous
  at::Tensor max, sumexp, target, p_scale, target_scale;  // (rows,), contiguous
  std::optional<at::Tensor> smooth_scale;          // (rows,) or none
  std::optional<at::Tensor> weight;                // (n,) or none
  int64_t rows, n;
};

// in_place: cross_entropy_backward_, which writes over x, so x must be contiguous already.
inline CrossEntropyBackwardArgs cross_entropy_backward_args(
    const at::Tensor& x, const at::Tensor& max, const at::Tensor& sumexp, const at::Tensor& target,
    const at::Tensor& p_scale, const at::Tensor& target_scale, const std::optional<at::Tensor>& smooth_scale,
    const std::optional<at::Tensor>& weight, bool in_place = false) {
  const char* op = in_place ? "cross_entropy_backward_" : "cross_entropy_backward";
  CrossEntropyBackwardArgs a;
  a.x = gradient_logits_arg(x, op, in_place);
  a.rows = x.size(0);
  a.n = x.size(1);
  const at::ScalarType acc = state_dtype(x.scalar_type());
  auto per_row = [&](const at::Tensor& t, const char* name) { return per_row_arg(t, name, op, x, acc, a.rows); };
  a.max = per_row(max, "max");
  a.sumexp = per_row(sumexp, "sumexp");
  a.p_scale = per_row(p_scale, "p_scale");
  a.target_scale = per_row(target_scale, "target_scale");
  if (smooth_scale.has_value()) a.smooth_scale = per_row(*smooth_scale, "smooth_scale");
  a.target = per_row_ids(target, "target", op, x, a.rows);
  if (weight.has_value()) {
    TORCH_CHECK_TYPE(weight->scalar_type() == acc, "online_softmax.", op, ": weight must be ", acc, ", got ",
                     weight->scalar_type());
    TORCH_CHECK_VALUE(weight->dim() == 1 && weight->size(0) == a.n, "online_softmax.", op,
                      ": weight must have shape [", a.n, "] (one value per class), got ", weight->sizes());
    TORCH_CHECK_VALUE(weight->device() == x.device(), "online_softmax.", op, ": weight is on ", weight->device(),
                      " but x is on ", x.device());
    a.weight = weight->contiguous();
  }
  return a;
}

// ---- token_logprobs_backward ----

struct TokenLogprobsBackwardArgs {
  at::Tensor x;  // (rows, n), contiguous
  at::Tensor grad_log_probs, max, sumexp, entropy, token_ids;  // (rows,), contiguous
  std::optional<at::Tensor> grad_entropy;                      // (rows,) or none
  double temperature;
  int64_t rows, n;
};

// in_place: token_logprobs_backward_, which writes over x, so x must be contiguous already.
inline TokenLogprobsBackwardArgs token_logprobs_backward_args(
    const at::Tensor& grad_log_probs, const std::optional<at::Tensor>& grad_entropy, const at::Tensor& x,
    const at::Tensor& token_ids, const at::Tensor& max, const at::Tensor& sumexp, const at::Tensor& entropy,
    double temperature, bool in_place = false) {
  const char* op = in_place ? "token_logprobs_backward_" : "token_logprobs_backward";
  TokenLogprobsBackwardArgs a;
  a.x = gradient_logits_arg(x, op, in_place);
  a.rows = x.size(0);
  a.n = x.size(1);
  check_temperature(temperature, op);
  a.temperature = temperature;
  const at::ScalarType acc = state_dtype(x.scalar_type());
  auto per_row = [&](const at::Tensor& t, const char* name) { return per_row_arg(t, name, op, x, acc, a.rows); };
  a.grad_log_probs = per_row(grad_log_probs, "grad_log_probs");
  if (grad_entropy.has_value()) a.grad_entropy = per_row(*grad_entropy, "grad_entropy");
  a.max = per_row(max, "max");
  a.sumexp = per_row(sumexp, "sumexp");
  a.entropy = per_row(entropy, "entropy");
  a.token_ids = per_row_ids(token_ids, "token_ids", op, x, a.rows);
  return a;
}

}  // namespace online_softmax
