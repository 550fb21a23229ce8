"""Streaming chunks: chunked softmax / log-softmax / top-k equal the single-tensor ops, sources are
read the right number of times, and memory stays bounded by a chunk on a file larger than it."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import online_softmax as osm
from testlib import FLOAT_DTYPES, LOW_PRECISION, random_logits


def split(x, sizes, dim):
    return list(torch.split(x, sizes, dim=dim))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("dim", [-1, 0, 1])
def test_chunked_equals_whole(device, dtype, dim):
    x = random_logits((6, 101, 5), dtype, device)
    x[0, 3, 1] = float("-inf")
    n = x.shape[dim]
    sizes = [1, 7, n - 8] if n > 8 else [n]
    for fn, chunked in ((osm.softmax, osm.chunked_softmax), (osm.log_softmax, osm.chunked_log_softmax)):
        for t in (1.0, 0.5):
            whole = fn(x, dim=dim, temperature=t)
            pieces = list(chunked(split(x, sizes, dim), dim=dim, temperature=t))
            assert [p.shape for p in pieces] == [c.shape for c in split(x, sizes, dim)]
            got = torch.cat(pieces, dim=dim)
            tol = 1e-2 if dtype in LOW_PRECISION else (1e-12 if dtype == torch.float64 else 1e-5)
            torch.testing.assert_close(got, whole, rtol=tol, atol=tol)


def test_special_rows_match_torch():
    inf, nan = float("inf"), float("nan")
    x = random_logits((4, 30), torch.float32)
    x[0] = -inf
    x[1, 20] = inf
    x[2, 3] = nan
    got = torch.cat(list(osm.chunked_softmax(split(x, [10, 10, 10], -1))), -1)
    want = torch.softmax(x, -1)
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_chunked_topk_equals_fused(device, log, k):
    x = random_logits((3, 1000), torch.float32, device)
    x[:, 500:510] = x.max() + 1  # ties across a chunk boundary go to the lower global index
    want_v, want_i = osm.softmax_topk(x, k, log=log)
    got_v, got_i = osm.chunked_softmax_topk(split(x, [3, 497, 11, 489], -1), k, log=log)
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_v, want_v)


def test_chunked_topk_nan_and_chunks_shorter_than_k():
    x = random_logits((2, 50), torch.float32)
    x[1, 33] = float("nan")
    v, i = osm.chunked_softmax_topk(split(x, [2] * 25, -1), 6)
    want_v, want_i = osm.softmax_topk(x, 6)
    assert torch.equal(i, want_i)
    torch.testing.assert_close(v, want_v, equal_nan=True)


def test_array_and_memmap_sources(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 10007)).astype(np.float32) * 3
    path = tmp_path / "logits.f32"
    a.tofile(path)
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=a.shape)
    want = torch.softmax(torch.from_numpy(a).double(), -1)
    for source in (osm.ArrayChunks(mm, 1000), osm.FileChunks(path, a.shape, np.float32, 999),
                   osm.ArrayChunks(torch.from_numpy(a), 4096)):
        got = torch.cat(list(osm.chunked_softmax(source)), -1)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
        v, i = osm.chunked_softmax_topk(source, 3)
        assert torch.equal(i, want.topk(3).indices)
    st = osm.chunk_state(osm.ArrayChunks(mm, 512))
    torch.testing.assert_close(st.logsumexp().double(), torch.logsumexp(torch.from_numpy(a).double(), -1),
                               rtol=1e-6, atol=1e-6)


def test_callable_source_is_read_twice_and_generators_are_rejected():
    x = random_logits((2, 40), torch.float32)
    calls = []

    def source():
        calls.append(1)
        return iter(split(x, [15, 25], -1))

    out = torch.cat(list(osm.chunked_softmax(source)), -1)
    assert len(calls) == 2
    torch.testing.assert_close(out, torch.softmax(x, -1))
    with pytest.raises(TypeError, match="one-shot"):
        osm.chunked_softmax(c for c in split(x, [15, 25], -1))
    with pytest.raises(TypeError, match="ArrayChunks"):
        osm.chunked_softmax(x)


def test_bad_chunks_raise():
    x = random_logits((2, 40), torch.float32)
    with pytest.raises(ValueError, match="does not match"):
        list(osm.chunked_softmax([x[:, :10], x[:1, 10:]]))
    with pytest.raises(ValueError, match="empty"):
        list(osm.chunked_softmax([]))
    with pytest.raises(ValueError, match="larger than the total length"):
        osm.chunked_softmax_topk([x[:, :3]], 5)
    with pytest.raises(ValueError, match="k must"):
        osm.chunked_softmax_topk([x], 0)
    with pytest.raises(TypeError, match="numpy"):
        list(osm.chunked_softmax([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="chunk_size"):
        osm.ArrayChunks(x, 0)


def test_row_larger_than_the_memory_it_may_use(tmp_path):
    """A 256 MiB row streamed in 4 MiB chunks from a file, output written back to a file chunk by
    chunk: the process's peak RSS grows by far less than the row (budget: 64 MiB)."""
    n = 64 * 1024 * 1024  # float32: 256 MiB
    path, out_path = tmp_path / "row.f32", tmp_path / "probs.f32"
    script = textwrap.dedent(f"""
        import resource, numpy as np, torch, online_softmax as osm
        torch.set_num_threads(1)
        n, chunk = {n}, 1 << 20
        # Write the row without holding it: a ramp with a known softmax.
        with open({str(path)!r}, "wb") as f:
            for s in range(0, n, chunk):
                f.write((np.arange(s, min(n, s + chunk), dtype=np.float64) % 1000 / 100).astype(np.float32).tobytes())
        src = osm.FileChunks({str(path)!r}, (1, n), np.float32, chunk)
        list(osm.chunked_softmax([torch.randn(1, chunk), torch.randn(1, chunk)]))  # warm up the allocator
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        total = 0.0
        with open({str(out_path)!r}, "wb") as f:
            for piece in osm.chunked_softmax(src):
                total += piece.double().sum().item()
                f.write(piece.numpy().tobytes())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        v, i = osm.chunked_softmax_topk(src, 2)
        print(total, (peak - base) / 1024, i.tolist())
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    total, grown_mib, idx = proc.stdout.split(maxsplit=2)
    assert abs(float(total) - 1.0) < 1e-4
    assert float(grown_mib) < 64, f"peak RSS grew by {grown_mib} MiB for a 256 MiB row"
    assert os.path.getsize(out_path) == 4 * n
    # The ramp's maximum 9.99 first occurs at index 999, then every 1000 elements.
    assert idx.strip() == "[[999, 1999]]"


def test_source_dim_must_match_and_passes_must_agree():
    x = random_logits((6, 9), torch.float32)
    with pytest.raises(ValueError, match="cuts its chunks along dim 0"):
        list(osm.chunked_softmax(osm.ArrayChunks(x, 3, dim=0), dim=-1))
    got = torch.cat(list(osm.chunked_softmax(osm.ArrayChunks(x, 4, dim=0), dim=0)), 0)
    torch.testing.assert_close(got, torch.softmax(x, 0))
    pieces = split(x, [4, 5], -1)
    g = iter(pieces)
    with pytest.raises(ValueError, match="second pass"):
        list(osm.chunked_softmax(lambda: g))  # the same generator twice: the second pass is empty


def test_chunked_topk_is_not_differentiable():
    x = random_logits((2, 7), torch.float32).requires_grad_()
    v, i = osm.chunked_softmax_topk([x[:, :3], x[:, 3:]], 2)
    assert not v.requires_grad
