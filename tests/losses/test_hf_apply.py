"""online_softmax.hf.apply(model): a transformers causal LM's labelled forward computes its loss
with linear_cross_entropy (no logits), with the same loss and the same gradient of every parameter
as the unpatched model, in each family; everything else unchanged, and revert() undoes it."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import online_softmax as osm  # noqa: E402
from testlib import peak_rise_mib  # noqa: E402

VOCAB = 61
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _config(name, **kw):
    return getattr(transformers, name)(**{**SMALL, **kw})


CONFIGS = {
    "gpt2": lambda **kw: transformers.GPT2Config(**{**dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=1,
                                                           n_head=2, bos_token_id=1, eos_token_id=2), **kw}),
    "llama": lambda **kw: _config("LlamaConfig", **kw),
    "mistral": lambda **kw: _config("MistralConfig", head_dim=16, **kw),
    "qwen2": lambda **kw: _config("Qwen2Config", **kw),
    "qwen3": lambda **kw: _config("Qwen3Config", head_dim=16, **kw),
    "gemma2": lambda **kw: _config("Gemma2Config", head_dim=16, final_logit_softcapping=3.0, **kw),
    "gemma3": lambda **kw: _config("Gemma3TextConfig", head_dim=16, final_logit_softcapping=3.0, **kw),
    "phi3": lambda **kw: _config("Phi3Config", **kw),
    "cohere": lambda **kw: _config("CohereConfig", logit_scale=0.5, **kw),
    "granite": lambda **kw: _config("GraniteConfig", logits_scaling=3.0, **kw),
    # A mixture of experts that adds its router's loss to the one loss_function returns.
    "mixtral": lambda **kw: _config("MixtralConfig", head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                    output_router_logits=True, router_aux_loss_coef=0.1, **kw),
}
CLASSES = {"gpt2": "GPT2LMHeadModel", "gemma3": "Gemma3ForCausalLM"}


def tiny(family, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    config = CONFIGS[family](**kw)
    cls = getattr(transformers, CLASSES.get(family, type(config).__name__.replace("Config", "ForCausalLM")))
    model = cls(config).to(dtype).eval()  # no dropout: both forwards see the same values
    with torch.no_grad():  # logits large enough that the softcaps and scales matter
        model.get_output_embeddings().weight.mul_(8)
    return model


def batch(b=3, t=9, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    labels[-1, -2:] = -100  # padding
    return ids.to(device), labels.to(device)


def loss_and_grads(model, *args, **kw):
    model.zero_grad()
    out = model(*args, **kw)
    loss = out.loss if not isinstance(out, tuple) else out[0]
    loss.backward()
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper names them _orig_mod.*
    return out, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def tolerance(dtype):
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=4e-3)


def assert_same_training(model, *args, keep_logits=False, **kw):
    """The labelled forward of ``model`` unpatched and patched: the same float32 loss and gradients."""
    want_out, want, want_grads = loss_and_grads(model, *args, **kw)
    with osm.hf.applied(model, keep_logits=keep_logits):
        got_out, got, got_grads = loss_and_grads(model, *args, **kw)
    assert got.dtype == want.dtype == torch.float32
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else next(model.parameters()).dtype
    torch.testing.assert_close(got, want, **tolerance(dtype))
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 5
    for name in want_grads:
        assert_grad_close(got_grads[name], want_grads[name], dtype, name)
    return want_out, got_out


def assert_grad_close(got, want, dtype, name):
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, **tolerance(dtype), msg=name)
        return
    # bfloat16: both are rounded at every layer, so single elements drift; the whole gradient does not.
    err = (got.float() - want.float()).norm() / want.float().norm().clamp(min=1e-6)
    assert err < 2e-2, f"{name}: relative error {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_each_family_trains_alike_without_logits(family, dtype):
    model = tiny(family, dtype=dtype)
    want, got = assert_same_training(model, *batch()[:1], labels=batch()[1])
    assert want.logits is not None and got.logits is None and "logits" not in got.keys()
    assert type(got) is type(want) and got.past_key_values is not None


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_loss_kwargs(family):
    """num_items_in_batch (Trainer's gradient accumulation), shift_labels, ignore_index and
    logits_to_keep (with labels of the kept length, as transformers' own loss requires)."""
    model = tiny(family)
    ids, labels = batch()
    assert_same_training(model, ids, labels=labels, num_items_in_batch=torch.tensor(7))
    assert_same_training(model, ids, labels=labels, num_items_in_batch=11)
    shift = torch.roll(labels, -1, 1)
    shift[:, -1] = -100
    assert_same_training(model, ids, labels=labels, shift_labels=shift)
    assert_same_training(model, ids, labels=labels.masked_fill(labels == -100, 5), ignore_index=5)
    assert_same_training(model, ids, labels=labels[:, -4:], logits_to_keep=4)


def test_labels_given_positionally_and_without_grad():
    model = tiny("llama")
    ids, labels = batch()
    with torch.no_grad():
        want = model(ids, labels=labels).loss
    assert_same_training(model, ids, None, None, None, None, labels)  # LlamaForCausalLM's sixth parameter
    with osm.hf.applied(model), torch.no_grad():
        out = model(ids, labels=labels)
    assert out.logits is None and not out.loss.requires_grad
    torch.testing.assert_close(out.loss, want)


def test_tied_and_untied_heads_and_a_head_with_bias():
    tied = tiny("llama", tie_word_embeddings=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert_same_training(tied, batch()[0], labels=batch()[1])
    torch.manual_seed(3)
    head = torch.nn.Linear(32, VOCAB, bias=True)
    with torch.no_grad():
        head.bias.normal_(0, 2)
    for family in ("llama", "cohere"):  # Cohere's scale applies to the bias as to the rest of the logits
        model = tiny(family, tie_word_embeddings=False)
        model.lm_head = head
        assert model.get_output_embeddings() is head and head.weight is not model.model.embed_tokens.weight
        assert_same_training(model, batch()[0], labels=batch()[1])


def test_return_dict_false_gives_the_tuple_without_logits():
    model = tiny("llama")
    ids, labels = batch()
    want, got = assert_same_training(model, ids, labels=labels, return_dict=False)
    assert isinstance(got, tuple) and len(got) == len(want) - 1
    assert torch.is_tensor(want[1]) and type(got[1]) is type(want[2])  # the cache follows the loss


def test_keep_logits_gives_the_family_logits():
    for family in ("gemma2", "cohere"):
        model = tiny(family)
        want, got = assert_same_training(model, batch()[0], labels=batch()[1], keep_logits=True)
        assert torch.equal(got.logits, want.logits)


def test_without_labels_and_generate_are_unchanged_and_revert_restores_everything():
    model = tiny("gpt2")
    ids, _ = batch()
    with torch.no_grad():
        want = model(ids).logits
    gen = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    want_gen = model.generate(ids, **gen)
    head = model.get_output_embeddings()
    own_loss = transformers.loss.loss_utils.ForCausalLMLoss
    before = dict(forward=model.forward, head_forward=head.forward)
    for set_loss in (False, True):
        if set_loss:  # an instance that had its loss_function set keeps that very object
            model.loss_function = own_loss
        osm.hf.apply(model)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want)
        assert torch.equal(model.generate(ids, **gen), want_gen)
        osm.hf.revert(model)
        assert "forward" not in model.__dict__ and "forward" not in head.__dict__
        assert model.forward == before["forward"] and head.forward == before["head_forward"]
        assert ("_loss_function" in model.__dict__) == set_loss
        assert model.loss_function is own_loss
        with torch.no_grad():
            assert torch.equal(model(ids).logits, want)


def test_signature_deepcopy_and_misuse():
    import inspect

    model = tiny("llama")
    want = inspect.signature(model.forward)
    osm.hf.apply(model)
    assert inspect.signature(model.forward) == want
    with pytest.raises(RuntimeError, match="applied to this LlamaForCausalLM already"):
        osm.hf.apply(model)
    twin = copy.deepcopy(model)  # a patched copy that drives the copy, not the original
    ids, labels = batch()
    with torch.no_grad():
        twin.lm_head.weight.mul_(2)
    assert not torch.equal(twin(ids, labels=labels).loss, model(ids, labels=labels).loss)
    osm.hf.revert(twin)
    osm.hf.revert(model)
    with pytest.raises(RuntimeError, match="was not applied"):
        osm.hf.revert(model)
    with pytest.raises(TypeError, match="no output head"):
        osm.hf.apply(transformers.LlamaModel(CONFIGS["llama"]()))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        osm.hf.apply(torch.nn.Linear(2, 3))
    bert = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                                num_attention_heads=2, intermediate_size=48))
    with pytest.raises(NotImplementedError, match="BertForMaskedLM's loss_function is ForMaskedLMLoss"):
        osm.hf.apply(bert)


def test_a_family_doing_something_else_raises():
    # An instance whose logit scale changed after apply() (as a family we do not model would).
    model = osm.hf.apply(tiny("cohere"))
    model.logit_scale = 0.25
    ids, labels = batch()
    with pytest.raises(NotImplementedError, match=r"CohereForCausalLM transforms its head's logits .*scale 0.5"):
        model(ids, labels=labels)
    # T5 computes its loss itself, from the logits.
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=1, num_heads=2,
                                   decoder_start_token_id=0)
    t5 = osm.hf.apply(transformers.T5ForConditionalGeneration(config).eval())
    with pytest.raises(NotImplementedError, match="T5ForConditionalGeneration"):
        t5(ids, labels=labels.clamp(min=0))


def test_torch_compile_same_loss_and_grads():
    model = tiny("llama")
    ids, labels = batch()
    _, want, want_grads = loss_and_grads(model, ids, labels=labels)
    torch._dynamo.reset()
    compiled = torch.compile(osm.hf.apply(model))
    for _ in range(2):
        out, got, got_grads = loss_and_grads(compiled, ids, labels=labels)
        assert out.logits is None
        torch.testing.assert_close(got, want)
        for name in want_grads:
            torch.testing.assert_close(got_grads[name], want_grads[name], msg=name)


def test_autocast_bfloat16():
    model = tiny("gemma2")
    ids, labels = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_same_training(model, ids, labels=labels)


def test_on_device(device):
    model = tiny("gemma2").to(device)
    ids, labels = batch(device=device)
    assert_same_training(model, ids, labels=labels, num_items_in_batch=torch.tensor(7, device=device))
    model = tiny("llama", dtype=torch.bfloat16).to(device)
    assert_same_training(model, ids, labels=labels)


class _Data(torch.utils.data.Dataset):
    def __init__(self, n=8, t=12):
        g = torch.Generator().manual_seed(5)
        self.ids = torch.randint(3, VOCAB, (n, t), generator=g)
        self.lengths = torch.randint(4, t + 1, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        labels = self.ids[i].clone()
        labels[self.lengths[i]:] = -100  # rows of different lengths: num_items_in_batch differs from a mean
        return {"input_ids": self.ids[i], "labels": labels}


def _train(tmp_path, patched, accumulation):
    model = tiny("llama")
    seen = []
    if patched:
        osm.hf.apply(model)
        loss_function = model.loss_function

        def spy(*args, **kwargs):
            seen.append(kwargs.get("num_items_in_batch"))
            return loss_function(*args, **kwargs)
        model.loss_function = spy
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3,
                                          gradient_accumulation_steps=accumulation, learning_rate=1e-2,
                                          logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                                          seed=0, data_seed=0, disable_tqdm=True,
                                          optim="sgd")  # Adam would magnify rounding in near-zero gradients
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}, seen


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer(tmp_path, accumulation):
    want, want_params, _ = _train(tmp_path, False, accumulation)
    got, got_params, seen = _train(tmp_path, True, accumulation)
    assert len(want) == len(got) == 3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for name in want_params:
        torch.testing.assert_close(got_params[name], want_params[name], rtol=1e-4, atol=1e-5, msg=name)
    assert len(seen) == 3 * accumulation and all(torch.is_tensor(n) for n in seen)


PEAK_SETUP = """
import transformers
config = transformers.LlamaConfig(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1)
model = transformers.LlamaForCausalLM(config)
ids = torch.randint(0, 32000, (4, 256))
if PATCHED:
    osm.hf.apply(model)
g = [torch.ones_like(p) for p in model.parameters()]  # the gradients' own memory, in the baseline
del g
"""


def test_peak_memory_of_a_training_step():
    """At a vocabulary where the logits dominate (1024 x 32000 float32: 125 MiB each), a patched
    forward and backward rise far less above the model's own memory than unpatched."""
    step = "model(ids, labels=ids).loss.backward()"
    plain = peak_rise_mib(PEAK_SETUP.replace("PATCHED", "False"), step)
    ours = peak_rise_mib(PEAK_SETUP.replace("PATCHED", "True"), step)
    assert plain > 300 and ours < 0.3 * plain, (plain, ours)


def test_revert_after_trainer_wrapped_the_forward(tmp_path):
    """Trainer's bf16=True makes accelerate wrap model.forward in autocast after apply(): revert
    leaves that wrapper and makes ours inside it a plain call."""
    model = tiny("llama")
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=1,
                                          report_to="none", use_cpu=True, save_strategy="no", bf16=True,
                                          disable_tqdm=True)
    with osm.hf.applied(model):
        transformers.Trainer(model=model, args=args, train_dataset=_Data()).train()
        assert model.forward is not model.__dict__[osm.losses.hf_patch._STATE].forward  # accelerate's now
    assert "_loss_function" not in model.__dict__ and "forward" not in model.lm_head.__dict__
    ids, labels = batch()
    want, want_loss, want_grads = loss_and_grads(model, ids, labels=labels)  # under accelerate's bfloat16 autocast
    assert want.logits is not None
    with osm.hf.applied(model):  # applies again, over accelerate's wrapper
        got, got_loss, got_grads = loss_and_grads(model, ids, labels=labels)
    assert got.logits is None
    torch.testing.assert_close(got_loss, want_loss, **tolerance(torch.bfloat16))
    for name in want_grads:
        assert_grad_close(got_grads[name], want_grads[name], torch.bfloat16, name)
