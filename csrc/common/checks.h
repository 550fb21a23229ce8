// Argument checks and shape bookkeeping shared by every backend's binding layer. Each check raises
// a Python exception (IndexError / ValueError / TypeError) whose message names the argument.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "kernels/row_layout.h"

#include <cmath>
#include <optional>

namespace online_softmax {

inline void check_floating(const at::Tensor& t, const char* name, const char* op) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type()),
                   "online_softmax.", op, ": ", name, " must be a floating-point tensor "
                   "(float32, float64, float16 or bfloat16), got ", t.scalar_type());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble ||
                       t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
                   "online_softmax.", op, ": ", name, " has unsupported dtype ", t.scalar_type(),
                   "; use float32, float64, float16 or bfloat16");
}

// Wraps a possibly negative dim; a 0-d tensor accepts dim 0 and -1 like torch.softmax.
inline int64_t wrap_dim(int64_t dim, const at::Tensor& x, const char* op) {
  const int64_t ndim = std::max<int64_t>(x.dim(), 1);
  TORCH_CHECK_INDEX(dim >= -ndim && dim < ndim, "online_softmax.", op, ": dim=", dim,
                    " is out of range for a tensor with ", x.dim(), " dimension(s) (expected ",
                    -ndim, " <= dim <= ", ndim - 1, ")");
  return dim < 0 ? dim + ndim : dim;
}

inline void check_temperature(double temperature, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, "online_softmax.", op,
                    ": temperature must be a finite number > 0, got ", temperature);
  // The kernels multiply by 1 / temperature in float32; it must not overflow.
  TORCH_CHECK_VALUE(1.0 / temperature <= 3.0e38, "online_softmax.", op,
                    ": temperature must be at least 3.4e-39 (1 / temperature must fit in float32), got ",
                    temperature);
}

inline void check_k(int64_t k, int64_t size, const char* op) {
  TORCH_CHECK_VALUE(k >= 1 && k <= size, "online_softmax.", op, ": k must satisfy 1 <= k <= ",
                    size, " (the size of the softmax dim), got k=", k);
}

// softmax(x, dtype=...) semantics: the result has `dtype`; integer x is accepted only with a
// floating dtype (cast first, like torch.softmax).
inline at::ScalarType result_dtype(const at::Tensor& x, std::optional<at::ScalarType> dtype,
                                   const char* op) {
  if (dtype.has_value()) {
    TORCH_CHECK_TYPE(*dtype == at::kFloat || *dtype == at::kDouble || *dtype == at::kHalf ||
                         *dtype == at::kBFloat16,
                     "online_softmax.", op, ": dtype must be float32, float64, float16 or "
                     "bfloat16, got ", *dtype);
    TORCH_CHECK_TYPE(!at::isComplexType(x.scalar_type()), "online_softmax.", op,
                     ": x must be a real tensor, got ", x.scalar_type());
    return *dtype;
  }
  check_floating(x, "x", op);
  return x.scalar_type();
}

// A contiguous tensor seen as [outer, size, inner] around the softmax dim.
inline RowLayout row_layout(const at::Tensor& x, int64_t dim) {
  RowLayout g;
  if (x.dim() == 0) return g;
  for (int64_t i = 0; i < dim; ++i) g.outer *= x.size(i);
  g.size = x.size(dim);
  for (int64_t i = dim + 1; i < x.dim(); ++i) g.inner *= x.size(i);
  return g;
}

// Shape of x with `dim` removed (the shape of the per-row state).
inline std::vector<int64_t> reduced_shape(const at::Tensor& x, int64_t dim) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  if (!shape.empty()) shape.erase(shape.begin() + dim);
  return shape;
}

inline at::ScalarType state_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// x in a dtype the forward kernels read for a result of out_dtype: x itself when the kernels cast
// it on read (the same dtype, or float16/bfloat16 into float32), else converted first, as
// torch.softmax(dtype=) does for other casts.
inline at::Tensor readable_input(const at::Tensor& x, at::ScalarType out_dtype) {
  const at::ScalarType in = x.scalar_type();
  const bool cast_on_read = in == out_dtype || (out_dtype == at::kFloat && (in == at::kHalf || in == at::kBFloat16));
  return cast_on_read ? x : x.to(out_dtype);
}

}  // namespace online_softmax
