// Every schema of the online_softmax library, in one place, and nothing else. Backends register
// implementations in csrc/cpu/register.cpp (CPU), csrc/cuda/register.cpp (CUDA) and csrc/common
// (composites); fake kernels and autograd live in Python (online_softmax/ops.py); the _C Python
// module that loads them all is csrc/python_module.cpp.
#include <torch/library.h>

TORCH_LIBRARY(online_softmax, m) {
  // softmax(x / temperature) or log_softmax(x / temperature) along dim; dtype casts on read.
  m.def("forward(Tensor x, int dim, bool log=False, float temperature=1.0, ScalarType? dtype=None) -> Tensor");
  // softmax or log_softmax of x * scale (+ an additive mask) along dim, as models call it: a second
  // op rather than arguments of forward, so the bare softmax keeps its short schema and fast path.
  // mask: None, bool (True takes part, as in scaled_dot_product_attention) or floating (added to
  // x * scale; -inf takes a position out), any shape that broadcasts to x, read through its
  // broadcast strides (never expanded in memory). causal: key j of query i (x's last two dims; dim
  // must be the last) takes part only where j <= i + causal_offset. A row in which no position
  // takes part gives zeros (log: -inf); masked positions are always 0 (-inf), and a row whose
  // positions taking part are all -inf, or hold NaN/+inf, is NaN there, as torch.softmax. The
  // gradient is the unmasked softmax's (masked positions have zero probability): the backward op.
  m.def("masked_forward(Tensor x, Tensor? mask=None, bool causal=False, SymInt causal_offset=0, bool log=False, float scale=1.0, int dim=-1, ScalarType? dtype=None) -> Tensor");
  // Gradient of forward with respect to x, from the forward's output only:
  //   softmax: dx = y * (dy - sum(dy * y)) / temperature;  log: dx = (dy - exp(y) * sum(dy)) / temperature.
  // input_dtype is the dtype of forward's x (the gradient's dtype); None means out's dtype.
  m.def("backward(Tensor grad_out, Tensor out, int dim, bool log=False, float temperature=1.0, ScalarType? input_dtype=None) -> Tensor");
  // The same gradient written over grad_out itself (grad_out and out: one dtype, the gradient's, and
  // contiguous): the autograd nodes of forward and masked_forward call it where the incoming
  // gradient is theirs alone, so no gradient-sized buffer is allocated (and first touched). Each
  // row is reduced before any of it is written. On CUDA it is computed out of place and copied.
  m.def("backward_(Tensor(a!) grad_out, Tensor out, int dim, bool log=False, float temperature=1.0) -> ()");
  // The per-row online state of x / temperature along dim: (max, sum of exp(x/t - max)), dim removed.
  // float32 for float32/float16/bfloat16 input, float64 for float64 input.
  m.def("stats(Tensor x, int dim, float temperature=1.0) -> (Tensor max, Tensor sumexp)");
  // Fused online softmax + top-k: reads x once. Returns the k largest probabilities (or
  // log-probabilities) sorted descending (ties to the lower index), their int64 indices, and the
  // per-row state (max, sumexp) that the backward needs instead of the full softmax.
  m.def("softmax_topk(Tensor x, int k, int dim, bool log=False, float temperature=1.0) -> (Tensor values, Tensor indices, Tensor max, Tensor sumexp)");
  // Gradient of softmax_topk's values with respect to x, recomputing probabilities from x and the state.
  m.def("softmax_topk_backward(Tensor grad_values, Tensor x, Tensor indices, Tensor max, Tensor sumexp, int dim, bool log=False, float temperature=1.0) -> Tensor");
  // One beam-search step: log_softmax(logits / t) + beam_scores[..., None] over (batch, num_beams *
  // vocab), its top num_candidates, split into token and beam ids. Equal scores go to the lower
  // beam * vocab + token among each beam's own best num_candidates log-probabilities.
  // logits: (batch * num_beams, vocab); beam_scores: (batch, num_beams). Reads the logits once.
  // Optional post-normalization edits per row, as transformers' logits processors make them to
  // log-probabilities: penalized_tokens (rows, n) get lp * repetition_penalty where lp < 0, else
  // lp / repetition_penalty; banned_tokens (rows, n) get -inf; -1 entries pad the lists.
  m.def("beam_search_step(Tensor logits, Tensor beam_scores, int num_beams, int num_candidates, float temperature=1.0, Tensor? banned_tokens=None, Tensor? penalized_tokens=None, float repetition_penalty=1.0) -> (Tensor scores, Tensor token_ids, Tensor beam_ids)");
  // no_repeat_ngram_size's bans (transformers' NoRepeatNGramLogitsProcessor) for the next token of
  // each row of sequences (rows, length) int64: out[r, j] = sequences[r, j + n - 1] where
  // sequences[r, j : j + n - 1] equals the row's last n - 1 tokens, else -1; shape (rows,
  // max(length - n + 1, 0)), a banned_tokens list for beam_search_step.
  m.def("ngram_banned_tokens(Tensor sequences, int n) -> Tensor");
  // Beam search's bookkeeping after one step, as transformers' vectorized beam search (5.x) keeps it,
  // on fixed-size state: running and finished sequences (batch, num_beams, max_length) int64, their
  // scores (batch, num_beams) and flat beam indices (batch, num_beams, max_length - prompt_len) int32
  // (-1 past the end), is_finished (batch, num_beams) and improvable (batch, 1) bool. The step's
  // candidates (batch, keep, max_length) carry their new token at cur_len; candidate_scores,
  // candidate_beams (the beam each continues) and stopped (the caller's stopping criteria) are
  // (batch, keep). The best num_beams candidates that did not stop run on; those among the top
  // num_beams that stopped join the finished hypotheses with score / (cur_len + 1 -
  // prompt_len) ** length_penalty (scores are -1e9-offset where a slot takes no part);
  // early_stopping is 0, 1 or 2 for False, True and "never". Returns the new state, the flat
  // (batch * num_beams,) int64 beam each new running row continues (for the model's cache), and
  // keep_going, a 0-d bool: whether any entry can still change. Selections are torch.topk's.
  m.def("beam_search_advance(Tensor running, Tensor running_scores, Tensor running_beam_indices, Tensor finished, Tensor finished_scores, Tensor finished_beam_indices, Tensor is_finished, Tensor improvable, Tensor candidates, Tensor candidate_scores, Tensor candidate_beams, Tensor stopped, int cur_len, int prompt_len, float length_penalty, int early_stopping) -> (Tensor running, Tensor running_scores, Tensor running_beam_indices, Tensor finished, Tensor finished_scores, Tensor finished_beam_indices, Tensor is_finished, Tensor improvable, Tensor beam_idx, Tensor keep_going)");
  // One draw per uniform from softmax(x / temperature) of each row of x (rows, vocab), restricted
  // to the tokens with (x - max) / temperature >= min_log_ratio (p >= exp(min_log_ratio) p_max:
  // log(min_p) for min-p, top_p_threshold's cut for top-p): the first token whose cumulative
  // probability exceeds u. temperature, min_log_ratio: (rows,) float64; uniforms: (rows,
  // num_samples) float64 in [0, 1). Returns int64 tokens and their log-probabilities under the
  // distribution drawn from (float32, float64 for float64 x); a row with NaN, +inf or only -inf
  // gives -1, NaN. Reads x once (twice with min_log_ratio) and writes nothing of its size.
  // edit_ids (rows, E) int64 and edit_values (rows, E) in the accumulation dtype, both or neither:
  // sparse replacements of logits (bans, biases, penalties) read instead of x wherever x is read:
  // row r's logit at edit_ids[r, j] is edit_values[r, j] (before the temperature: -inf bans the
  // token, +inf or NaN leave the row no distribution). Each row's real ids are strictly ascending in
  // [0, vocab), then -1 padding (E may be 0). The outputs are exactly those of the op on the dense
  // edited copy x.to(acc).scatter(1, ids, values) (real entries only), which is never written.
  m.def("sample_categorical(Tensor x, Tensor temperature, Tensor? min_log_ratio, Tensor uniforms, Tensor? edit_ids=None, Tensor? edit_values=None) -> (Tensor tokens, Tensor log_probs)");
  // Speculative decoding's verification (chain layout): target_logits (batch, n + 1, vocab) scored
  // at the n draft positions and one more; draft_token_ids (batch, n) int64 in [0, vocab);
  // draft_probs (batch, n, vocab) in float32 or target_logits' dtype, or None for a deterministic
  // draft (q one-hot at the draft token); num_draft_tokens (batch,) int64 in [0, n]: row b verifies
  // its first n_b drafts and takes its bonus token from position n_b. temperature (batch,) float64,
  // 0 for a greedy row; min_log_ratio (batch, n + 1) float64 or None: target position i keeps the
  // tokens with (x - max) / t >= it, as sample_categorical. uniforms (batch, n + 1) float64 in
  // [0, 1): [b, i] tests draft i, [b, n] draws the final token. A sampled row accepts draft v at i
  // when u * q(v) < p(v), stops at the first rejection and draws from max(p - q, 0) normalized (from
  // p itself when that mass rounds to zero), or after n_b acceptances draws a bonus token from
  // position n_b. A greedy row accepts while the draft is the arg-max (ties to the lowest index)
  // and emits the arg-max. Returns token_ids (batch, n + 1) int64 padded with -1, num_accepted
  // (batch,) int64, and log_probs (batch, n + 1): each emitted token's log-probability under the
  // target distribution (a greedy row: log_softmax of the logits), NaN where no token. A position
  // with no distribution (NaN, +inf, all -inf) emits -1 with NaN and ends its row. Reads target
  // positions 0..n_b once each for their states (twice with a cut); at a rejection, that target row
  // and its draft row once more.
  m.def("rejection_sample(Tensor target_logits, Tensor draft_token_ids, Tensor? draft_probs, Tensor num_draft_tokens, Tensor temperature, Tensor? min_log_ratio, Tensor uniforms) -> (Tensor token_ids, Tensor num_accepted, Tensor log_probs)");
  // Prompt log-probabilities: one read of each row of x (rows, vocab), nothing of its size written.
  // token_ids (rows,) int64 in [0, vocab) names the scored token of each row; its value v is
  // x[r, token_ids[r]], or token_values[r] (accumulation dtype: float32, float64 for float64 x)
  // when given (edited logits). log_probs: v's log-softmax of x / temperature, (v - max_raw) / t -
  // log(sumexp) as softmax_topk computes log values. rank (int64): 1 + the number of entries of the
  // row ranked ahead of (v, token) in softmax_topk's order (larger first, NaN above every number,
  // -0 == +0, equal values to the lower index), on the raw values. top_ids, top_log_probs (rows,
  // top_n): softmax_topk(x, top_n, -1, log=True, temperature) (top_n in [0, vocab]; 0 selects
  // nothing). max, sumexp: the row's online state as stats(x, -1, temperature) gives it (the
  // backward needs them). entropy: -sum p log p of softmax(x / t), from S = sum e (x - m) / t
  // carried beside sumexp (a -inf entry adds 0). A row with no distribution (NaN, +inf, all -inf)
  // has NaN log_probs and entropy; the other outputs are as softmax_topk and stats give them.
  // Accumulation-dtype outputs: log_probs, top_log_probs, max, sumexp, entropy.
  m.def("token_logprobs(Tensor x, Tensor token_ids, int top_n=0, float temperature=1.0, Tensor? token_values=None) -> (Tensor log_probs, Tensor rank, Tensor top_ids, Tensor top_log_probs, Tensor max, Tensor sumexp, Tensor entropy)");
  // transformers' top-p cut of softmax(x / temperature) per row, as the log_ratio (x - max) /
  // temperature of the smallest token it keeps (the largest value whose tokens at or above it hold
  // >= top_p); status 0 found, 1 several tokens tied at the cut within float resolution, 2 no
  // distribution (NaN, +inf, all -inf). Reads x from memory once; narrowing passes hit the cache.
  // edit_ids, edit_values: sparse logit replacements, as sample_categorical takes them (the cut is
  // that of the dense edited copy, exactly).
  m.def("top_p_threshold(Tensor x, Tensor temperature, Tensor top_p, Tensor? edit_ids=None, Tensor? edit_values=None) -> (Tensor log_ratio, Tensor status)");
  // The gradient of a cross-entropy loss with respect to its logits x (rows, classes), in one read
  // of x and one write: out[i, c] = p_scale[i] * exp(x[i, c] - max[i]) / sumexp[i] - [c == target[i]] *
  // target_scale[i] - smooth_scale[i] * weight[c] (weight 1 when None; no term without
  // smooth_scale). max and sumexp are the row's online state (as the stats op gives it): the softmax
  // comes from them, never through a rounded lse = max + log(sumexp), which loses the low bits of
  // x - lse at large logits. max, sumexp and the per-row scales are in the accumulation dtype
  // (float32, float64 for float64 x), target int64 in [0, classes); out has x's dtype. The per-row
  // scales carry the reduction, the target's class weight, label smoothing and z-loss
  // (online_softmax/losses).
  m.def("cross_entropy_backward(Tensor x, Tensor max, Tensor sumexp, Tensor target, Tensor p_scale, Tensor target_scale, Tensor? smooth_scale=None, Tensor? weight=None) -> Tensor");
  // The same gradient written over x itself (contiguous), as flash-attention's xentropy does with
  // inplace_backward: no second logits-sized buffer. Each element is read before it is written.
  m.def("cross_entropy_backward_(Tensor(a!) x, Tensor max, Tensor sumexp, Tensor target, Tensor p_scale, Tensor target_scale, Tensor? smooth_scale=None, Tensor? weight=None) -> ()");
  // The gradient of token_logprobs' log_probs and entropy with respect to its x (rows, vocab), in
  // one read of x and one write, for the row's token_ids[r] (int64 in [0, vocab)):
  //   dx[r, j] = s * (g_lp[r] * ([j == tok_r] - p_rj) - g_H[r] * p_rj * (log p_rj + H_r)),  s = 1 / temperature,
  // with p and log p of softmax(x / t) from the row's online state (max, sumexp of x / t, as the stats
  // op gives it), never through a rounded lse (see cross_entropy_backward); a p = 0 term is 0 (an x
  // of -inf adds nothing, not 0 * -inf). entropy is the forward's H. grad_log_probs, grad_entropy
  // (None: no entropy term), max, sumexp and entropy are (rows,) in the accumulation dtype (float32,
  // float64 for float64 x); the result has x's dtype.
  m.def("token_logprobs_backward(Tensor grad_log_probs, Tensor? grad_entropy, Tensor x, Tensor token_ids, Tensor max, Tensor sumexp, Tensor entropy, float temperature=1.0) -> Tensor");
  // The same gradient written over x itself (contiguous): each element is read before it is written.
  m.def("token_logprobs_backward_(Tensor(a!) x, Tensor grad_log_probs, Tensor? grad_entropy, Tensor token_ids, Tensor max, Tensor sumexp, Tensor entropy, float temperature=1.0) -> ()");
  // Knowledge distillation, per row of student and teacher logits (rows, vocab), same dtype and
  // shape, contiguous: with p = softmax(student / T), q = softmax(teacher / T), kind "kl" is
  // KL(q || p), "reverse_kl" KL(p || q), "jsd" beta KL(q || m) + (1 - beta) KL(p || m) with m =
  // beta q + (1 - beta) p (0 < beta < 1); a zero-probability term is 0. With target (rows,) int64 in
  // [0, vocab) or == ignore_index, a row's loss is hard_weight * CE(student at T = 1, target) + (1 -
  // hard_weight) * divergence, and an ignore_index row's is 0 (hard_weight in [0, 1] is read only
  // with a target). A row in which either side has no distribution (NaN, +inf, all -inf) is NaN.
  // Oracle: online_softmax/reference/distillation.py. loss (rows,) and stats (rows, 7) are in the
  // accumulation dtype (float32, float64 for float64). stats columns (distillation_math.h): 0 the
  // student's raw max ms, 1 sum e^((s - ms) / T), 2 the teacher's raw max mt, 3 sum e^((t - mt) / T),
  // 4 sum e^(s - ms) (T = 1), 5 L = log(column 1 / column 3) (summed so that it keeps its digits when
  // the two are close), 6 U: KL(p || q) for reverse_kl, KL(p || m) for jsd, 0 for kl; an ignored
  // row's stats are 0. Reads each row once (jsd: twice, the second from cache), in a fixed order.
  m.def("distillation_forward(Tensor student, Tensor teacher, Tensor? target=None, str kind=\"kl\", float beta=0.5, float temperature=1.0, float hard_weight=0.0, int ignore_index=-100) -> (Tensor loss, Tensor stats)");
  // d(sum_i grad_loss[i] * loss[i]) / d student from the forward's stats, one read of the student and
  // teacher rows and one write, in student's dtype: with a target, grad_loss * (hard_weight *
  // (softmax(s) - onehot) + (1 - hard_weight) * D'), without, grad_loss * D', where (T the
  // temperature, delta = log p - log q, h = log m - log p) D' is (p - q) / T for kl, p (delta - U) / T
  // for reverse_kl and (1 - beta) p (-h - U) / T for jsd (a p = 0 term is 0); ignored rows get 0.
  // grad_loss (rows,) in the accumulation dtype.
  m.def("distillation_backward(Tensor grad_loss, Tensor student, Tensor teacher, Tensor? target, Tensor stats, str kind=\"kl\", float beta=0.5, float temperature=1.0, float hard_weight=0.0, int ignore_index=-100) -> Tensor");
  // The same gradient written over student itself (contiguous): each element is read before it is
  // written, so a chunked loss keeps no second logits-sized buffer.
  m.def("distillation_backward_(Tensor(a!) student, Tensor grad_loss, Tensor teacher, Tensor? target, Tensor stats, str kind=\"kl\", float beta=0.5, float temperature=1.0, float hard_weight=0.0, int ignore_index=-100) -> ()");
}
