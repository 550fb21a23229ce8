// CPU masked softmax / log-softmax (masked_forward): x * scale, a bool or additive mask read
// through its broadcast strides (never expanded), and a causal limit, over the last dim of
// contiguous rows. Each row is built once into a scratch row of the accumulation type (masked
// positions -inf), which stays in L1/L2 for attention-sized rows; the row's (m, d) and output
// then come from the same functions as the unmasked forward. x and the mask are read once from
// memory, y written once. Rows with no position taking part give zeros (log: -inf); masked
// positions are 0 (-inf) even where the rest of the row is NaN.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "the CPU kernels are compiled through csrc/cpu/isa/<capability>.cpp"
#endif

#include "cpu/kernels/common.h"
#include "cpu/kernels/softmax.h"

namespace online_softmax::cpu {
inline namespace CPU_CAPABILITY {
namespace {

// Where row r's mask starts: its coordinates over c.row_sizes dotted with c.row_strides.
inline int64_t mask_row_offset(const MaskedForwardCall& c, int64_t r) {
  int64_t offset = 0;
  for (int64_t k = c.row_dims - 1; k >= 0 && r > 0; --k) {
    offset += (r % c.row_sizes[k]) * c.row_strides[k];
    r /= c.row_sizes[k];
  }
  return offset;
}

// v[0, len) = x * s, then the mask: -inf where a bool mask is false or an additive one is -inf,
// else + the additive value. Returns whether any position takes part.
template <typename T, typename A>
bool build_masked_row(const MaskedForwardCall& c, const T* x, A* v, int64_t len, int64_t mask_at, A s) {
  using V = Vectorized<A>;
  constexpr A kNegInf = -std::numeric_limits<A>::infinity();
  int64_t j = 0;
  const V vs(s);
  for (; j + VecIO<T>::kStep <= len; j += VecIO<T>::kStep) {
    V a, b;
    VecIO<T>::load2(x + j, a, b);
    (a * vs).store(v + j);
    (b * vs).store(v + j + V::size());
  }
  for (; j < len; ++j) v[j] = static_cast<A>(x[j]) * s;
  if (c.mask_kind == 0) return len > 0;
  if (c.mask_kind == 1) {
    const bool* m = static_cast<const bool*>(c.mask) + mask_at;
    if (c.col_stride == 0) {
      if (!m[0]) std::fill(v, v + len, kNegInf);
      return m[0] && len > 0;
    }
    unsigned char seen = 0;
    for (j = 0; j < len; ++j) {
      const unsigned char keep = m[j];
      seen |= keep;
      v[j] = keep ? v[j] : kNegInf;
    }
    return seen != 0;
  }
  const A* add = static_cast<const A*>(c.mask) + mask_at;
  if (c.col_stride == 0) {
    const A a = add[0];
    for (j = 0; j < len; ++j) v[j] = a == kNegInf ? kNegInf : v[j] + a;
    return a != kNegInf && len > 0;
  }
  unsigned char seen = 0;
  for (j = 0; j < len; ++j) {
    const unsigned char keep = add[j] != kNegInf;
    seen |= keep;
    v[j] = keep ? v[j] + add[j] : kNegInf;
  }
  return seen != 0;
}

// Whether position j of row r (at mask_at) is masked: for the rare rows whose output is NaN.
template <typename A>
bool masked_at(const MaskedForwardCall& c, int64_t mask_at, int64_t j) {
  const int64_t at = mask_at + j * c.col_stride;
  if (c.mask_kind == 1) return !static_cast<const bool*>(c.mask)[at];
  return c.mask_kind == 2 && static_cast<const A*>(c.mask)[at] == -std::numeric_limits<A>::infinity();
}

template <typename T, typename O>
void masked_forward_typed(const MaskedForwardCall& c) {
  using A = acc_t<T>;
  const T* x = static_cast<const T*>(c.x);
  O* y = static_cast<O*>(c.y);
  const A s = static_cast<A>(c.scale);
  const int64_t n = c.n;
  const O off = c.log ? static_cast<O>(-std::numeric_limits<A>::infinity()) : O(0);
  at::parallel_for(0, c.rows, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<A> scratch(n);
    A* v = scratch.data();
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * n;
      O* yr = y + r * n;
      int64_t len = n;
      if (c.causal_rows > 0) {
        const int64_t last = r % c.causal_rows + c.causal_offset;  // the last key query i sees
        len = std::clamp<int64_t>(last + 1, 0, n);
      }
      const int64_t mask_at = c.mask_kind == 0 ? 0 : mask_row_offset(c, r);
      if (!build_masked_row(c, xr, v, len, mask_at, s)) {
        std::fill(yr, yr + n, off);
        continue;
      }
      bool nan_row;
      if (!c.log && std::is_same_v<O, A> && len * int64_t(sizeof(A)) <= kOneExpMaxBytes) {
        // One exp per element: the exps go to y, then are rescaled there. A row without a finite
        // max comes out NaN at every position it computed, so its first output tells.
        softmax_row_one_exp(v, yr, reinterpret_cast<A*>(yr), len, A(1));
        nan_row = std::isnan(static_cast<A>(yr[0]));
      } else {
        const State<A> st = finalize(scan_contiguous(v, len, A(1)));
        write_contiguous(v, yr, len, Normalizer<A>(st), A(1), c.log);
        nan_row = !(st.m > -std::numeric_limits<A>::infinity() && st.m < std::numeric_limits<A>::infinity());
      }
      std::fill(yr + len, yr + n, off);
      if (nan_row && c.mask_kind != 0) {
        // x holds NaN or +inf, or every position taking part is -inf: the row is NaN (torch), but
        // its masked positions still get their 0 (-inf), as on every other row.
        for (int64_t j = 0; j < len; ++j)
          if (masked_at<A>(c, mask_at, j)) yr[j] = off;
      }
    }
  });
}

void masked_forward_entry(const MaskedForwardCall& c) {
  with_dtype(c.x_dtype, "masked_forward", [&](auto tag) {
    using T = decltype(tag);
    if (c.y_dtype == c.x_dtype) {
      masked_forward_typed<T, T>(c);
    } else if constexpr (!std::is_same_v<acc_t<T>, T>) {
      masked_forward_typed<T, float>(c);
    }
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace online_softmax::cpu
