"""online_softmax.softmax / log_softmax / OnlineSoftmax take every call form torch.softmax,
torch.nn.functional.softmax and nn.Softmax take, with the same results and the same warnings, on each
device (the `device` fixture; the cuda cases of every call form for one shape)."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import online_softmax as osm
from testlib import random_logits

F64 = torch.float64

# (positional args after the tensor, keyword args, whether the tensor goes by name as input=)
CALL_FORMS = [
    ((1,), {}, False),
    ((-1,), {}, False),
    ((), {"dim": 0}, False),
    ((), {"dim": 1}, True),
    ((1, F64), {}, False),                       # torch.softmax(x, 1, torch.float64); see POSITIONAL_DTYPE
    ((1,), {"dtype": F64}, False),
    ((), {"dim": -1, "dtype": F64}, True),
    ((1, 3, F64), {}, False),                    # F.softmax(x, 1, _stacklevel, dtype)
    ((1,), {"_stacklevel": 3, "dtype": F64}, False),
    ((), {}, False),                             # F.softmax(x): the legacy implicit dim
    ((None,), {}, False),
    ((), {"dim": None, "dtype": F64}, False),
]

# F.softmax's third position is _stacklevel: it takes a dtype there without complaint and ignores
# it. Ours follows torch.softmax, whose third position is the dtype.
POSITIONAL_DTYPE = CALL_FORMS.index(((1, F64), {}, False))

PEERS = {"softmax": (osm.softmax, [torch.softmax, F.softmax]),
         "log_softmax": (osm.log_softmax, [torch.log_softmax, F.log_softmax])}


def _call(fn, x, args, kwargs, by_name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn(input=x, *args, **kwargs) if by_name else fn(x, *args, **kwargs)
    return out, [(w.category, str(w.message), w.filename) for w in caught]


@pytest.mark.parametrize("name", list(PEERS))
@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 3, 5), (2, 3, 4, 5)])
@pytest.mark.parametrize("form", range(len(CALL_FORMS)))
@pytest.mark.cuda_params(shape=[(2, 3, 5)])
def test_every_torch_call_form(device, name, shape, form):
    args, kwargs, by_name = CALL_FORMS[form]
    ours_fn, torch_fns = PEERS[name]
    x = random_logits(shape, torch.float32, device)
    accepted = 0
    for torch_fn in torch_fns:
        if form == POSITIONAL_DTYPE and torch_fn in (F.softmax, F.log_softmax):
            continue
        try:
            want, want_warnings = _call(torch_fn, x, args, kwargs, by_name)
        except TypeError:
            continue  # a form this peer does not take (torch.softmax has no implicit dim)
        except IndexError:  # dim 1 of a 0-d or 1-d tensor: ours refuses it the same way
            with pytest.raises(IndexError, match="dim"):
                _call(ours_fn, x, args, kwargs, by_name)
            accepted += 1
            continue
        accepted += 1
        got, got_warnings = _call(ours_fn, x, args, kwargs, by_name)
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # The same warnings, pointing at the same (the caller's) line.
        assert got_warnings == want_warnings
    assert accepted, "a call form that no torch peer takes tests nothing"


@pytest.mark.parametrize("ndim, legacy_dim", [(0, 0), (1, 0), (2, 1), (3, 0), (4, 1)])
def test_implicit_dim_follows_torch_and_warns(ndim, legacy_dim):
    x = random_logits((3,) * ndim, torch.float32)
    with pytest.warns(UserWarning, match="Implicit dimension choice for softmax"):
        got = osm.softmax(x)
    torch.testing.assert_close(got, torch.softmax(x, legacy_dim))


@pytest.mark.parametrize("dim", [None, 0, 1, -1])
def test_module_matches_nn_softmax(device, dim):
    x = random_logits((2, 3, 5), torch.float32, device)
    with warnings.catch_warnings(record=True) as want_warnings:
        warnings.simplefilter("always")
        want = torch.nn.Softmax(dim)(x)
        want_log = torch.nn.LogSoftmax(dim)(x)
    with warnings.catch_warnings(record=True) as got_warnings:
        warnings.simplefilter("always")
        got = osm.OnlineSoftmax(dim)(x)
        got_log = osm.OnlineLogSoftmax(dim)(x)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_log, want_log)
    assert [(w.message.args, w.filename) for w in got_warnings] == \
        [(w.message.args, w.filename) for w in want_warnings]
    assert len(got_warnings) == (2 if dim is None else 0)


def test_bad_call_forms_raise_naming_the_argument():
    x = random_logits((3, 4), torch.float32)
    with pytest.raises(TypeError, match="dtype given twice"):
        osm.softmax(x, 1, F64, dtype=F64)
    with pytest.raises(TypeError, match="dim must be an int or None"):
        osm.softmax(x, 1.0)
    with pytest.raises(TypeError, match="dim must be an int or None"):
        osm.log_softmax(x, "features")
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
        osm.softmax(x, 1, torch.int64)
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        osm.softmax(input=[1.0, 2.0], dim=0)
    with pytest.raises(TypeError, match="temperature must be a number"):
        osm.softmax(x, 1, temperature="hot")
