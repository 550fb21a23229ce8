"""transformers' own ``model.generate()`` on online_softmax: one keyword.

    out = model.generate(input_ids, attention_mask=mask, num_beams=4, repetition_penalty=1.2,
                         custom_generate=online_softmax.hf.generate)

generate() does all of its own preparation (generation config and defaults, the prepared
``LogitsProcessorList`` and ``StoppingCriteriaList``, the cache, encoder outputs, the attention
mask) and then calls :func:`generate` in place of its decoding loop. The loop here drives the model
with generate()'s own per-step methods, so every model generate() supports runs alike, and selects
tokens with the fused ops:

- **beam search**: the fused :func:`~online_softmax.beam_search_step` (log-softmax, the processors
  that are sparse edits, beam scores and the top candidates in one read of the logits);
- **sampling**: :func:`~online_softmax.sample` (temperature, top-k, top-p and min-p warpers without
  materializing the softmax);
- **greedy search**: the processors, then the arg-max (one read, as in transformers);
- **speculative decoding** (``assistant_model=`` or ``prompt_lookup_num_tokens=``, greedy or
  sampling, any batch size): drafts verified by :func:`~online_softmax.rejection_sample`
  (hf_speculative.py, whose docstring describes how each row keeps its own length).

The model is called as transformers calls it: greedy search and sampling run their decode steps
through the model's compiled forward exactly when transformers' ``_sample`` does (a
``compile_config``, or a compileable static cache on an accelerator); beam search and speculative
decoding call the model itself, as transformers' do.

A processor the fused step cannot express (any class not listed in docs/decoding.md, a user's own,
or a warper that is not at the end of the list) makes that step run the whole list densely, in
transformers' order, so the result is the same; so does asking for ``output_scores``, which are the
processed scores of every step. Sampling draws by inverse CDF from ``torch.rand`` (seeded runs
reproduce), so its tokens follow transformers' distribution but not its random stream.

transformers is imported only when a function here runs: ``import online_softmax`` never needs it.
"""

from typing import Optional

import torch

from .._checks import fail
from .beam_search import BeamStep
from .decoder import Beams
from .rules import DecodingRules
from .sampling import sample

_OP = "hf.generate"


def generate(model, input_ids: torch.LongTensor, logits_processor, stopping_criteria, generation_config,
             synced_gpus: bool = False, streamer=None, **model_kwargs):
    """The decoding loop for ``model.generate(..., custom_generate=online_softmax.hf.generate)``:
    greedy search, sampling, beam search and beam sampling, and speculative decoding (an
    ``assistant_model`` or ``prompt_lookup_num_tokens``, greedy or sampling, at any batch size), with
    generate()'s arguments and its return value (a LongTensor, or the ``Generate*Output`` that
    ``return_dict_in_generate`` asks for)."""
    # generate() keeps assistant_model to itself (a callable gets only the keywords _sample lacks);
    # should a later version forward it, it must not reach the model's forward.
    assistant = model_kwargs.pop("assistant_model", None) or _given_to_generate("assistant_model")
    mode = _mode(generation_config, synced_gpus, assistant)
    if streamer is None:
        streamer = _given_to_generate("streamer")
    if mode == "speculative decoding":
        from .hf_speculative import speculative_generate

        return speculative_generate(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                    streamer, assistant, model_kwargs)
    run = _Run(model, generation_config, model_kwargs, compiled_steps=mode in ("greedy search", "sampling"))
    if mode in ("greedy search", "sampling"):
        return _one_beam(run, input_ids, logits_processor, stopping_criteria, streamer)
    if streamer is not None:
        raise fail(_OP, f"{mode} with a streamer: transformers does not support it either")
    return _beam_search(run, input_ids, logits_processor, stopping_criteria)


def _given_to_generate(name: str):
    """A local variable of the generate() call that runs this loop (``streamer``,
    ``assistant_model``). generate() passes a callable custom_generate only the keywords that
    ``_sample`` lacks, so what it was given for its own modes (the streamer, to which it has already
    sent the prompt; the assistant model) is read from its frame: two frames up, generate() calling
    :func:`generate` calling this."""
    import inspect

    from transformers.generation.utils import GenerationMixin

    frame = inspect.currentframe()
    try:
        caller = frame.f_back.f_back
        if caller is not None and caller.f_code is GenerationMixin.generate.__wrapped__.__code__:
            return caller.f_locals.get(name)
        return None
    finally:
        del frame


def _mode(config, synced_gpus, assistant=None) -> str:
    """The decoding mode, or a ValueError naming what this loop does not run."""
    from transformers.generation.configuration_utils import GenerationMode

    if synced_gpus:
        raise fail(_OP, "synced_gpus (generation across ranks in lockstep) is not supported; drop "
                        "custom_generate to use transformers' own loop")
    mode = config.get_generation_mode(assistant)
    if mode == GenerationMode.ASSISTED_GENERATION:
        # transformers' candidate generators, in its order of precedence: the ones drafting from the
        # model itself (early exit, multi-token prediction) and DFlash are not run here.
        other = [name for name in ("assistant_early_exit", "use_mtp") if getattr(config, name, None)]
        if getattr(config, "speculation_type", None) == "dflash":
            other.append("speculation_type='dflash'")
        if other or (config.prompt_lookup_num_tokens is None and assistant is None):
            raise fail(_OP, f"assisted generation with {', '.join(other) or 'this draft'} is not supported by "
                            "online_softmax.hf.generate (it drafts with assistant_model or prompt_lookup_num_tokens); "
                            "drop custom_generate to use transformers' own loop")
        return "speculative decoding"
    names = {GenerationMode.GREEDY_SEARCH: "greedy search", GenerationMode.SAMPLE: "sampling",
             GenerationMode.BEAM_SEARCH: "beam search", GenerationMode.BEAM_SAMPLE: "beam sampling"}
    if mode not in names:
        raise fail(_OP, f"{getattr(mode, 'value', mode)} is not supported by online_softmax.hf.generate; "
                        "drop custom_generate to use transformers' own loop")
    return names[mode]


class _Run:
    """The model and what one generate() call asked for: the forward steps, and the optional
    outputs (scores, logits, attentions, hidden states) collected as transformers collects them."""

    def __init__(self, model, config, model_kwargs, compiled_steps=False):
        self.model, self.config, self.kwargs = model, config, model_kwargs
        # transformers' _sample runs its decode steps through the model's compiled forward when
        # generate() would compile (a compile_config, or a compileable static cache on an
        # accelerator); its beam search and its prefill (unchunked) call the model itself.
        self.step_forward = model.__call__
        if compiled_steps and model._valid_auto_compile_criteria(model_kwargs, config):
            self.step_forward = model.get_compiled_call(config.compile_config)
        self.enc_dec = bool(model.config.is_encoder_decoder)
        want = config.return_dict_in_generate
        self.scores = () if want and config.output_scores else None
        self.logits = () if want and config.output_logits else None
        self.attentions = () if want and config.output_attentions else None
        self.cross_attentions = () if want and config.output_attentions and self.enc_dec else None
        self.hidden = () if want and config.output_hidden_states else None
        self.prefilled = False

    def forward(self, input_ids):
        """One model step over ``input_ids`` (the prompt first, then one new token per row)."""
        model = self.model
        if not self.prefilled:
            out = model._prefill(input_ids, self.config, self.kwargs, is_first_iteration=not self.config.is_assistant)
            self.prefilled = True
        else:
            step_len = 1 if self.kwargs["use_cache"] else None
            inputs = model.prepare_inputs_for_generation(input_ids, next_sequence_length=step_len, **self.kwargs)
            out = self.step_forward(**inputs, return_dict=True)
        self.kwargs = model._update_model_kwargs_for_generation(out, self.kwargs, is_encoder_decoder=self.enc_dec)
        logits = out.logits[:, -1]
        # transformers copies the last position out of the output. A decode step's output holds that
        # position alone, so the view already is a whole (rows, vocab) float32 tensor: a copy would
        # cost more than the fused step reading it (a fresh 200 KB per row, at every step).
        if logits.dtype != torch.float32 or logits.device != input_ids.device or not logits.is_contiguous():
            logits = logits.to(copy=True, dtype=torch.float32, device=input_ids.device)
        if self.logits is not None:
            self.logits += (logits.clone(),)
        if self.attentions is not None:
            self.attentions += ((out.decoder_attentions,) if self.enc_dec else (out.attentions,))
            if self.enc_dec:
                self.cross_attentions += (out.cross_attentions,)
        if self.hidden is not None:
            self.hidden += ((out.decoder_hidden_states,) if self.enc_dec else (out.hidden_states,))
        return logits

    def decoding(self):
        """transformers' context for its decode steps (a faster expert kernel for mixture-of-experts
        models on accelerators), where the installed version has one."""
        import contextlib

        return getattr(self.model, "_optimize_model_for_decode", contextlib.nullcontext)()

    def cache(self):
        from transformers.generation.utils import ALL_CACHE_NAMES

        return next((self.kwargs[k] for k in ALL_CACHE_NAMES if k in self.kwargs), None)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        from transformers.generation.utils import ALL_CACHE_NAMES

        key = next((k for k in ALL_CACHE_NAMES if k in self.kwargs), None)
        if key is None:
            return
        if hasattr(self.model, "_reorder_cache"):
            self.kwargs[key] = self.model._reorder_cache(self.kwargs[key], beam_idx)
        elif hasattr(self.kwargs[key], "reorder_cache"):
            self.kwargs[key].reorder_cache(beam_idx)
        else:
            raise fail(_OP, f"{type(self.model).__name__}'s cache cannot be reordered, so beam search cannot use it")

    def result(self, sequences, beam_scores=None, beam_indices=None):
        """What generate() returns: the sequences alone, or its output class for the mode."""
        from transformers.generation import utils as gu

        if not self.config.return_dict_in_generate:
            return sequences
        fields = dict(sequences=sequences, scores=self.scores, logits=self.logits, past_key_values=self.cache())
        if beam_indices is not None:
            fields.update(sequences_scores=beam_scores if self.config.output_scores else None,
                          beam_indices=beam_indices)
        if self.enc_dec:
            enc = self.kwargs["encoder_outputs"]
            fields.update(encoder_attentions=enc.get("attentions") if self.config.output_attentions else None,
                          encoder_hidden_states=enc.get("hidden_states") if self.config.output_hidden_states
                          else None,
                          decoder_attentions=self.attentions, cross_attentions=self.cross_attentions,
                          decoder_hidden_states=self.hidden)
            cls = gu.GenerateBeamEncoderDecoderOutput if beam_indices is not None else gu.GenerateEncoderDecoderOutput
        else:
            fields.update(attentions=self.attentions, hidden_states=self.hidden)
            cls = gu.GenerateBeamDecoderOnlyOutput if beam_indices is not None else gu.GenerateDecoderOnlyOutput
        return cls(**fields)


_WARPERS = ("TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper")


def _split_warpers(processors):
    """(dense prefix, fused warper arguments): the trailing run of temperature, top-k, top-p and
    min-p warpers, in that order and with their default filter and min_tokens_to_keep=1, becomes
    :func:`sample`'s arguments; everything before it runs densely."""
    from transformers.generation import logits_process as lp

    classes = [getattr(lp, n) for n in _WARPERS]
    procs = list(processors)
    cut, last_kind = len(procs), len(classes)
    while cut > 0:
        p = procs[cut - 1]
        kind = next((i for i, c in enumerate(classes) if type(p) is c), None)
        if kind is None or kind >= last_kind or getattr(p, "min_tokens_to_keep", 1) != 1 or \
                getattr(p, "filter_value", float("-inf")) != float("-inf"):
            break
        cut, last_kind = cut - 1, kind
    args = {}
    for p in procs[cut:]:
        if isinstance(p, lp.TemperatureLogitsWarper):
            args["temperature"] = float(p.temperature)
        elif isinstance(p, lp.TopKLogitsWarper):
            args["top_k"] = int(p.top_k)
        elif isinstance(p, lp.TopPLogitsWarper):
            args["top_p"] = float(p.top_p)
        else:
            args["min_p"] = float(p.min_p)
    return procs[:cut], args


def _one_beam(run: _Run, input_ids, processors, stopping_criteria, streamer):
    """Greedy search and sampling: one token per row per step until the stopping criteria hold."""
    config = run.config
    sampling = bool(config.do_sample)
    dense, warpers = _split_warpers(processors) if sampling else (list(processors), {})
    if run.scores is not None:  # the processed scores are an output: run the whole list densely
        dense, warpers = list(processors), {}
    pad = config._pad_token_tensor
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    logits = run.forward(input_ids)  # the prefill, before the decode steps' context, as in transformers
    with run.decoding():
        while True:
            scores = logits
            for p in dense:
                scores = p(input_ids, scores)
            if run.scores is not None:
                run.scores += (scores,)
            if sampling:
                tokens = sample(scores, **warpers).token_ids[:, 0]
                if bool((tokens < 0).any()):
                    raise fail(_OP, "a row's processed scores hold no distribution (NaN, +inf, or every token -inf)")
            else:
                tokens = scores.argmax(-1)
            if has_eos:  # finished rows continue with padding
                tokens = tokens * unfinished + pad.to(tokens.device) * (1 - unfinished)
            input_ids = torch.cat([input_ids, tokens[:, None]], -1)
            unfinished = unfinished & ~stopping_criteria(input_ids, run.scores)
            if streamer is not None:
                streamer.put(tokens.cpu())
            if not bool(unfinished.any()):
                break
            logits = run.forward(input_ids)
    if streamer is not None:
        streamer.end()
    return run.result(input_ids)


def _beam_search(run: _Run, input_ids, processors, stopping_criteria):
    """Beam search (and beam sampling) with transformers' bookkeeping, the fused step at its core."""
    config = run.config
    nb = config.num_beams
    rows, prompt = input_ids.shape
    batch = rows // nb
    eos = config._eos_token_tensor
    n_eos = 0 if eos is None else eos.reshape(-1).shape[0]
    pad = config._pad_token_tensor
    fill = (int(pad) if pad is not None and int(pad) != 0 else int(eos.reshape(-1)[0])) if eos is not None else -1
    beams = Beams(input_ids.view(batch, nb, prompt)[:, 0], nb, config.max_length, fill, config.length_penalty,
                  config.early_stopping, keep=max(2, 1 + n_eos) * nb)
    rules = None if run.scores is not None or config.do_sample else DecodingRules.from_processors(processors)
    while True:
        flat = beams.running_sequences()
        logits = run.forward(flat)
        if rules is not None:
            step = _fused_step(logits, beams, rules, flat)
        else:
            step = _dense_step(run, logits, beams, processors, flat)
        candidates = beams.candidates(step)
        hits = stopping_criteria(candidates[:, :, :beams.cur_len + 1].reshape(batch * beams.keep, -1), run.scores)
        beam_idx = beams.advance(step, candidates, hits.view(batch, beams.keep))
        run.reorder_cache(beam_idx)
        if not beams.keep_going():
            break
    best, indices = beams.best(config.num_return_sequences)
    return run.result(best.sequences, best.sequences_scores, indices)


def _fused_step(logits, beams: Beams, rules: DecodingRules, flat) -> BeamStep:
    edits = rules.edits(flat, beams.prompt, beams.max_length)
    # The op itself, without beam_search_step's argument checks: every argument here is this
    # loop's own (the op still checks the token lists), and each Python call counts at 64 steps.
    return BeamStep(*torch.ops.online_softmax.beam_search_step(
        logits, beams.running_scores, beams.nb, beams.keep, 1.0, edits.banned(), edits.penalized,
        float(rules.penalty)))


def _dense_step(run: _Run, logits, beams: Beams, processors, flat) -> BeamStep:
    """The processors on materialized log-probabilities, then the candidates: the top ones, or, in
    beam sampling, ``keep`` drawn without replacement in proportion to the scores' softmax."""
    log_probs = processors(flat, torch.log_softmax(logits, -1))
    if run.scores is not None:
        run.scores += (log_probs.clone(),)
    vocab = log_probs.shape[-1]
    scores = (log_probs.view(beams.batch, beams.nb, vocab) + beams.running_scores[..., None]).view(beams.batch, -1)
    if run.config.do_sample:
        flat_idx = _draw_without_replacement(scores, beams.keep)
    else:
        # The fused top-k's order (ties to the lower flat index): the log-softmax of a row keeps its order.
        flat_idx = torch.ops.online_softmax.softmax_topk(scores, beams.keep, -1, True, 1.0)[1]
    return BeamStep(scores.gather(1, flat_idx), flat_idx % vocab, flat_idx // vocab)


def _draw_without_replacement(scores: torch.Tensor, k: int, generator: Optional[torch.Generator] = None):
    """k indices per row drawn without replacement with probabilities softmax(scores), in drawing
    order (what torch.multinomial(softmax(scores), k) draws): the k largest of scores + Gumbel noise,
    sorted, have that distribution."""
    u = torch.rand(scores.shape, dtype=torch.float64, device=scores.device, generator=generator)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
    keys = torch.where(torch.isfinite(scores), scores.double() + gumbel, scores.double())
    return torch.topk(keys, k, dim=-1).indices
