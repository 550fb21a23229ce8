// CUDA token_logprobs_backward: the gradient of token_logprobs' log-probabilities and entropy with
// respect to its logits,
//   dx[r, j] = -s * p_rj * (K_r + g_H[r] * z_rj) + [j == tok_r] * s * g_lp[r],
//   z = x * s - m (= log p + log d),  K = g_lp + g_H * (H - log d),
// (s = 1 / temperature, (m, d) the row's online state of x / t) from the saved state, never through
// a rounded lse: one read of x and one write of out, each in 16-byte granules; a p = 0 term is 0
// (not 0 * -inf). z is (x - R) * s + c with R = m / s (the raw max: x - R is exact near it) and c =
// R * s - m by one fma, so 1e4-scale logits keep their digits. The thread mapping is
// plan_token_logprobs_backward's (launch_plan.h), the kernels' bodies row_gradient.cuh's.
#include "kernels/launchers.h"
#include "kernels/online_state.cuh"
#include "kernels/row_gradient.cuh"
#include "kernels/vec_io.cuh"

namespace online_softmax::kernels {
namespace {

template <typename T>
using A_t = acc_t<T>;

template <typename T>
struct TokenLogprobsArgs {
  const T* x;
  const int64_t* token_ids;
  const A_t<T>* grad_log_probs;
  const A_t<T>* grad_entropy;  // may be null: no entropy term
  const A_t<T>* max;
  const A_t<T>* sumexp;
  const A_t<T>* entropy;
  T* out;
  int64_t rows;
  int64_t n;
  A_t<T> s;                    // 1 / temperature, as the forward rounded it
  int* error;                  // may be null
};

// One row's scalars, read once per row (or chunk) and applied to every granule of it.
template <typename T>
struct TokenTerms {
  using A = A_t<T>;
  A R, shift, inv_d, K, gh, tok_grad;  // tok_grad: s * g_lp, added at the token
  int64_t tok;  // -1 when out of range: no column matches, and *error is set

  __device__ TokenTerms(const TokenLogprobsArgs<T>& a, int64_t row, bool report) {
    // A row without a finite max (all -inf, +inf, NaN) gets NaN factors: NaN gradients, as torch.
    const Normalizer<A> nz(State<A>{a.max[row], a.sumexp[row]}, a.s);
    R = nz.m / a.s;
    shift = fma(R, a.s, -nz.m);
    inv_d = nz.inv_d;
    const A log_d = nz.log_d;
    const A gl = a.grad_log_probs[row];
    gh = a.grad_entropy != nullptr ? a.grad_entropy[row] : A(0);
    K = a.grad_entropy != nullptr ? gl + gh * (a.entropy[row] - log_d) : gl;
    tok_grad = a.s * gl;
    tok = a.token_ids[row];
    if (tok < 0 || tok >= a.n) {
      // Never a write at the bad column: the binding turns the flag into a device-side assert.
      if (report && a.error != nullptr) *a.error = 1;
      tok = -1;
    }
  }

  // Columns [i0, i0 + V) of the row: v holds x, and gets the gradient.
  template <int V>
  __device__ __forceinline__ void apply(const TokenLogprobsArgs<T>& a, int64_t i0, A (&v)[V]) const {
    const A log2e = Exp<A>::scale(A(1)), ms = -a.s;
    const bool with_entropy = a.grad_entropy != nullptr;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const A z = (v[j] - R) * a.s + shift;
      const A p = Exp<A>::of(z * log2e) * inv_d;
      // p = 0 (x = -inf) adds nothing: not 0 * -inf. (A NaN row keeps its NaN p.)
      A g = with_entropy ? (p == A(0) ? A(0) : p * (K + gh * z) * ms) : p * K * ms;
      g += (i0 + j == tok) ? tok_grad : A(0);
      v[j] = g;
    }
  }
};

OSM_ROW_GRADIENT_KERNELS(token_logprobs_backward, TokenLogprobsArgs, TokenTerms)

}  // namespace

template <typename T>
cudaError_t token_logprobs_backward(const T* x, const int64_t* token_ids, const A_t<T>* grad_log_probs,
                                    const A_t<T>* grad_entropy, const A_t<T>* max, const A_t<T>* sumexp,
                                    const A_t<T>* entropy, double scale, T* out, int64_t rows, int64_t n, int* error,
                                    DeviceLimits limits, cudaStream_t stream) {
  const LaunchPlan plan = plan_token_logprobs_backward(rows, n, elem_bytes<T>(), grad_entropy != nullptr, limits);
  const TokenLogprobsArgs<T> a{x,   token_ids, grad_log_probs, grad_entropy, max, sumexp, entropy,
                               out, rows,      n,              static_cast<A_t<T>>(scale), error};
  return token_logprobs_backward_launch(plan, a, stream);
}

#define ONLINE_SOFTMAX_TOKEN_LOGPROBS(T)                                                                      \
  template cudaError_t token_logprobs_backward<T>(const T*, const int64_t*, const A_t<T>*, const A_t<T>*,     \
                                                  const A_t<T>*, const A_t<T>*, const A_t<T>*, double, T*,    \
                                                  int64_t, int64_t, int*, DeviceLimits, cudaStream_t);
ONLINE_SOFTMAX_TOKEN_LOGPROBS(float)
ONLINE_SOFTMAX_TOKEN_LOGPROBS(double)
ONLINE_SOFTMAX_TOKEN_LOGPROBS(__half)
ONLINE_SOFTMAX_TOKEN_LOGPROBS(__nv_bfloat16)
#undef ONLINE_SOFTMAX_TOKEN_LOGPROBS

}  // namespace online_softmax::kernels
