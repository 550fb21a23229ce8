"""model.loss_function = online_softmax.losses.causal_lm_loss trains a transformers causal LM with
the same loss and the same gradients of every parameter as transformers' own ForCausalLMLoss."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from online_softmax.losses import causal_lm_loss  # noqa: E402
from testlib import tiny_gpt2  # noqa: E402


def loss_and_grads(model, ids, labels, **kw):
    model.zero_grad()
    loss = model(ids, labels=labels, **kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("num_items_in_batch", [None, 37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_loss_and_gradients_as_transformers(num_items_in_batch, dtype):
    model = tiny_gpt2(0).to(dtype).eval()  # no dropout: both forwards see the same logits
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 48, (3, 9), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    labels[2, -2:] = -100
    kw = {} if num_items_in_batch is None else {"num_items_in_batch": torch.tensor(num_items_in_batch)}
    want, want_grads = loss_and_grads(model, ids, labels, **kw)
    model.loss_function = causal_lm_loss
    got, got_grads = loss_and_grads(model, ids, labels, **kw)
    assert got.dtype == want.dtype == torch.float32
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(got, want, **tol)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 5
    for name in want_grads:
        torch.testing.assert_close(got_grads[name].float(), want_grads[name].float(), **tol, msg=name)


def test_shift_labels_given(device):
    logits = torch.randn(2, 5, 11, device=device, requires_grad=True)
    shift = torch.randint(0, 11, (2, 5), device=device)
    shift[1, 0] = -100
    from transformers.loss.loss_utils import ForCausalLMLoss

    got = causal_lm_loss(logits, None, 11, shift_labels=shift)
    want = ForCausalLMLoss(logits, None, 11, shift_labels=shift)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, logits), torch.autograd.grad(want, logits)):
        torch.testing.assert_close(a, b)
