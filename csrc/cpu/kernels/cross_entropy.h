// CPU kernel of cross_entropy_backward: the gradient of a cross-entropy loss with respect to its
// logits, one read of each row and one write,
//   out[c] = p_scale * exp(x[c] - max) / sumexp - [c == target] * target_scale - smooth_scale * weight[c],
// from the row's online state (max, sumexp): exp(x - max) is exact to the last bit of x - max, where
// exp(x - lse) with a rounded lse = max + log(sumexp) would lose the low bits of x at large logits.
// Rows are independent: they are spread over threads; each row is one vector loop. out may be x
// itself: every element is read before it is written.
// Compiled once per ISA (csrc/cpu/isa/); called through the table of dispatch.h.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "the CPU kernels are compiled through csrc/cpu/isa/<capability>.cpp"
#endif

#include "cpu/kernels/common.h"

namespace online_softmax::cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <typename T>
void cross_entropy_backward_kernel(const CrossEntropyBackwardCall& c) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  using IO = VecIO<T>;
  const T* x = static_cast<const T*>(c.x);
  T* out = static_cast<T*>(c.out);
  const A* row_max = static_cast<const A*>(c.max);
  const A* sumexp = static_cast<const A*>(c.sumexp);
  const A* p_scale = static_cast<const A*>(c.p_scale);
  const A* target_scale = static_cast<const A*>(c.target_scale);
  const A* smooth = static_cast<const A*>(c.smooth_scale);
  const A* weight = static_cast<const A*>(c.weight);
  const int64_t n = c.n;
  at::parallel_for(0, c.rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = c.target[r];
      // Checked here rather than by a separate pass (exceptions leave parallel_for).
      TORCH_CHECK_INDEX(t >= 0 && t < n, "online_softmax.cross_entropy_backward: target must lie in [0, ", n,
                        "), got ", t);
      const T* xr = x + r * n;
      T* outr = out + r * n;
      // p_scale / sumexp once per row: one rounding, as torch's exp(x - max) / sumexp has one.
      const A m = row_max[r], ps = p_scale[r] / sumexp[r], sm = smooth != nullptr ? smooth[r] : A(0);
      const A xt = static_cast<A>(xr[t]);  // before the loop: out may be x itself (the in-place op)
      const V vm(m), vps(ps), vsm(sm);
      auto grad = [&](V v, int64_t i) {
        V g = vexp_keep_nan(v - vm) * vps;
        if (smooth != nullptr) g = g - (weight != nullptr ? V::loadu(weight + i) * vsm : vsm);
        return g;
      };
      int64_t i = 0;
      for (; i + IO::kStep <= n; i += IO::kStep) {
        V a, b;
        IO::load2(xr + i, a, b);
        IO::store2(outr + i, grad(a, i), grad(b, i + IO::kWidth));
      }
      for (; i < n; ++i) {
        A g = std::exp(static_cast<A>(xr[i]) - m) * ps;
        if (smooth != nullptr) g -= (weight != nullptr ? weight[i] : A(1)) * sm;
        outr[i] = static_cast<T>(g);
      }
      // The one-hot, from the same terms as the loop so that the target's gradient rounds once.
      A gt = std::exp(xt - m) * ps - target_scale[r];
      if (smooth != nullptr) gt -= (weight != nullptr ? weight[t] : A(1)) * sm;
      outr[t] = static_cast<T>(gt);
    }
  });
}

void cross_entropy_backward_entry(const CrossEntropyBackwardCall& c) {
  with_dtype(c.x_dtype, "cross_entropy_backward", [&](auto tag) {
    cross_entropy_backward_kernel<decltype(tag)>(c);
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace online_softmax::cpu
