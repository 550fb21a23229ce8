"""The ngram_banned_tokens op (no_repeat_ngram_size's bans) against the tensor formula it replaced (on
the CPU), on the device's op (the CPU kernel; on CUDA the composite) and on the composite."""

import pytest
import torch

ops = torch.ops.online_softmax


def reference(seqs: torch.Tensor, n: int) -> torch.Tensor:
    """Every window of n tokens whose first n - 1 equal the row's last n - 1 bans its last token."""
    rows, length = seqs.shape
    if length < n:
        return seqs.new_empty((rows, 0))
    windows = seqs.unfold(1, n, 1)
    match = (windows[:, :, :n - 1] == seqs[:, None, length - n + 1:]).all(-1)
    return torch.where(match, windows[:, :, -1], -1)


def composite(seqs, n):
    return ops.ngram_banned_tokens.default._op_dk(torch._C.DispatchKey.CompositeExplicitAutograd, seqs, n)


@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("rows,length", [(4, 12), (3, 1), (2, 5), (0, 7), (5, 0), (1, 40)])
def test_equals_the_tensor_formula(device, n, rows, length):
    g = torch.Generator().manual_seed(n * 100 + length)
    seqs = torch.randint(0, 3, (rows, length), generator=g)  # three tokens: many repeated n-grams
    repeats = n > 1 and length >= 2 * n - 1
    if repeats:  # the row ends as it began: the first window matches
        seqs[:, length - n + 1:] = seqs[:, :n - 1].clone()
    want = reference(seqs, n)
    on = seqs.to(device)
    for got in (ops.ngram_banned_tokens(on, n), composite(on, n)):
        assert got.dtype == torch.int64 and got.shape == want.shape and got.device == on.device
        assert torch.equal(got.cpu(), want)
    if repeats and rows:
        assert (want[:, 0] >= 0).all()  # the case bans something


def test_non_contiguous_rows_as_the_beams_keep_them(device):
    g = torch.Generator().manual_seed(0)
    running = torch.randint(0, 4, (2, 3, 20), generator=g).to(device)
    seqs = running[:, :, :11].reshape(6, 11)  # a view: rows 20 apart, as Beams.running_sequences()
    assert not seqs.is_contiguous()
    for s in (seqs, running[0, :, 2:15], running[:, 1, ::2]):
        assert torch.equal(ops.ngram_banned_tokens(s, 3).cpu(), reference(s.cpu(), 3))


def test_bad_arguments(device):
    seqs = torch.zeros(2, 5, dtype=torch.int64, device=device)
    with pytest.raises(TypeError, match="sequences must be an int64 tensor"):
        ops.ngram_banned_tokens(seqs.int(), 2)
    with pytest.raises(ValueError, match="sequences must be 2-D"):
        ops.ngram_banned_tokens(seqs[0], 2)
    with pytest.raises(ValueError, match="n must be >= 1"):
        ops.ngram_banned_tokens(seqs, 0)


def test_opcheck_and_compile(device):
    seqs = torch.randint(0, 3, (4, 10), generator=torch.Generator().manual_seed(1))
    torch.library.opcheck(ops.ngram_banned_tokens.default, (seqs.to(device), 3))
    f = torch.compile(lambda s: ops.ngram_banned_tokens(s, 2), fullgraph=True)
    assert torch.equal(f(seqs.to(device)).cpu(), reference(seqs, 2))
