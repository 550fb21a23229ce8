// CPU kernel of token_logprobs_backward: the gradient of token_logprobs' log-probabilities and
// entropy with respect to its logits, one read of each row and one write,
//   dx[j] = s * (g_lp * ([j == tok] - p_j) - g_H * p_j * (log p_j + H))
//         = -s * p_j * (K + g_H * z_j) + [j == tok] * s * g_lp,   K = g_lp + g_H * (H - log d),
// with z_j = x_j * s - m (m = the state's max of x / t). z is taken as (x_j - R) * s + c, R = m / s
// (the raw max, near every x that carries probability, so x - R is exact) and c = R * s - m by one
// fma: x * s - m directly would round x * s at the scale of x (1e-3 at 1e4-scale float32 logits).
// Rows are independent: they are spread over threads; each row is one vector loop. out may be x
// itself: every element is read before it is written.
// Compiled once per ISA (csrc/cpu/isa/); called through the table of dispatch.h.
#pragma once

#if !defined(CPU_CAPABILITY)
#error "the CPU kernels are compiled through csrc/cpu/isa/<capability>.cpp"
#endif

#include <cmath>

#include "cpu/kernels/common.h"

namespace online_softmax::cpu {
inline namespace CPU_CAPABILITY {
namespace {

template <typename T>
void token_logprobs_backward_kernel(const TokenLogprobsBackwardCall& c) {
  using A = acc_t<T>;
  using V = Vectorized<A>;
  using IO = VecIO<T>;
  const T* x = static_cast<const T*>(c.x);
  T* out = static_cast<T*>(c.out);
  const A* row_max = static_cast<const A*>(c.max);
  const A* sumexp = static_cast<const A*>(c.sumexp);
  const A* entropy = static_cast<const A*>(c.entropy);
  const A* grad_lp = static_cast<const A*>(c.grad_log_probs);
  const A* grad_h = static_cast<const A*>(c.grad_entropy);
  const A s = static_cast<A>(1.0 / c.temperature);  // the forward's (stats') scale, bit for bit
  const int64_t n = c.n;
  at::parallel_for(0, c.rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t tok = c.token_ids[r];
      // Checked here rather than by a separate pass (exceptions leave parallel_for).
      TORCH_CHECK_INDEX(tok >= 0 && tok < n, "online_softmax.token_logprobs_backward: token_ids must lie in [0, ",
                        n, "), got ", tok);
      const T* xr = x + r * n;
      T* outr = out + r * n;
      // A row without a finite max (all -inf, +inf, NaN) gets NaN factors: NaN gradients, as torch.
      const Normalizer<A> nz(State<A>{row_max[r], sumexp[r]});
      const A R = nz.m / s, shift = std::fma(R, s, -nz.m);
      const A gl = grad_lp[r], gh = grad_h != nullptr ? grad_h[r] : A(0);
      const A K = gl + gh * (entropy[r] - nz.log_d), inv_d = nz.inv_d, ms = -s;
      const A xt = static_cast<A>(xr[tok]);  // before the loop: out may be x itself (the in-place op)
      const V vR(R), vs(s), vshift(shift), vK(K), vgh(gh), vinv(inv_d), vms(ms), zero(A(0));
      auto grad = [&](V v) {
        const V z = (v - vR) * vs + vshift;
        const V p = vexp_keep_nan(z) * vinv;
        if (grad_h == nullptr) return p * vK * vms;
        // p = 0 (x = -inf) adds nothing: not 0 * -inf. (A NaN row keeps its NaN p.)
        return V::blendv(p * (vK + vgh * z) * vms, zero, p == zero);
      };
      auto grad1 = [&](A v) {
        const A z = (v - R) * s + shift;
        const A p = std::exp(z) * inv_d;
        if (grad_h == nullptr) return p * K * ms;
        return p == A(0) ? A(0) : p * (K + gh * z) * ms;
      };
      int64_t i = 0;
      for (; i + IO::kStep <= n; i += IO::kStep) {
        V a, b;
        IO::load2(xr + i, a, b);
        IO::store2(outr + i, grad(a), grad(b));
      }
      for (; i < n; ++i) outr[i] = static_cast<T>(grad1(static_cast<A>(xr[i])));
      // The one-hot, from the same terms as the loop so that the token's gradient rounds once.
      outr[tok] = static_cast<T>(grad1(xt) + s * gl);
    }
  });
}

void token_logprobs_backward_entry(const TokenLogprobsBackwardCall& c) {
  with_dtype(c.x_dtype, "token_logprobs_backward", [&](auto tag) {
    token_logprobs_backward_kernel<decltype(tag)>(c);
  });
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace online_softmax::cpu
