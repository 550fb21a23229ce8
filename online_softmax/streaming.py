"""Softmax of rows that never sit in memory whole: chunks streamed along the softmax dim.

    probs = online_softmax.chunked_softmax(source, dim=-1)       # a generator of output chunks
    for out in probs: ...                                        # one chunk in memory at a time

The first pass merges the chunks' (max, sumexp) states; the second normalizes each chunk against
the merged state and yields it. The top-k needs one pass: each chunk's fused top-k and state are
merged as they arrive. Memory is bounded by one chunk (plus O(rows * k) for the top-k).

A source must be readable twice (top-k reads it once): a list or tuple of chunks, a callable that
returns a fresh iterator, or :class:`ArrayChunks` / :class:`FileChunks`, which cut a numpy array,
``numpy.memmap`` or raw binary file into chunks on demand. A one-shot generator is rejected,
because the second pass would silently see nothing.
"""

import os
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from . import _checks as checks
from .api import SoftmaxTopK
from .state import SoftmaxState, merge_topk_candidates, softmax_stats

_ops = torch.ops.online_softmax

ChunkSource = Union[Sequence, Callable[[], Iterable], "ArrayChunks", "FileChunks"]


class ArrayChunks:
    """Chunks of ``chunk_size`` along ``dim`` of an array-like (numpy array, ``numpy.memmap``,
    torch tensor), read on demand and converted to tensors on ``device``. Re-iterable."""

    def __init__(self, array, chunk_size: int, dim: int = -1, device: Optional[Union[str, torch.device]] = None):
        checks.positive_int(chunk_size, "chunk_size", "ArrayChunks")
        ndim = len(array.shape)
        if ndim == 0:
            raise checks.fail("ArrayChunks", "array must have at least one dimension")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise checks.fail("ArrayChunks", f"dim must be an int, got {type(dim).__name__}", TypeError)
        if not -ndim <= dim < ndim:
            raise checks.fail("ArrayChunks", f"dim={dim} is out of range for {ndim} dimension(s)", IndexError)
        self.array, self.chunk_size, self.dim, self.device = array, chunk_size, dim % ndim, device

    def __iter__(self) -> Iterator[torch.Tensor]:
        length = self.array.shape[self.dim]
        for start in range(0, length, self.chunk_size):
            index = [slice(None)] * len(self.array.shape)
            index[self.dim] = slice(start, min(length, start + self.chunk_size))
            piece = self.array[tuple(index)]
            if isinstance(piece, np.ndarray):
                piece = torch.from_numpy(np.array(piece, copy=True))  # one chunk-sized, writable copy
            yield piece.to(self.device) if self.device is not None else piece


class FileChunks:
    """Chunks of a row-major raw binary file of shape ``shape`` and ``dtype``, cut along the last
    dim and read with ``os.pread`` (no memory map), so that only the chunk being processed is
    resident. Re-iterable."""

    def __init__(self, path: Union[str, os.PathLike], shape: Sequence[int], dtype, chunk_size: int,
                 device: Optional[Union[str, torch.device]] = None):
        checks.positive_int(chunk_size, "chunk_size", "FileChunks")
        self.path, self.shape, self.dtype = os.fspath(path), tuple(int(s) for s in shape), np.dtype(dtype)
        self.chunk_size, self.device = chunk_size, device
        expected = int(np.prod(self.shape)) * self.dtype.itemsize
        actual = os.path.getsize(self.path)
        if actual != expected:
            raise checks.fail("FileChunks", f"{self.path} holds {actual} bytes, but shape {self.shape} of "
                              f"{self.dtype} needs {expected}")

    def __iter__(self) -> Iterator[torch.Tensor]:
        rows = int(np.prod(self.shape[:-1]))
        n = self.shape[-1]
        item = self.dtype.itemsize
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for start in range(0, n, self.chunk_size):
                width = min(n, start + self.chunk_size) - start
                out = np.empty((rows, width), dtype=self.dtype)
                for r in range(rows):
                    raw = os.pread(fd, width * item, (r * n + start) * item)
                    out[r] = np.frombuffer(raw, dtype=self.dtype)
                t = torch.from_numpy(out).reshape(*self.shape[:-1], width)
                yield t.to(self.device) if self.device is not None else t
        finally:
            os.close(fd)


def _passes(source: ChunkSource, op: str, dim: int) -> Callable[[], Iterator]:
    """A function that starts a fresh pass over the source's chunks."""
    if isinstance(source, (ArrayChunks, FileChunks)):
        ndim = len(source.array.shape) if isinstance(source, ArrayChunks) else len(source.shape)
        cut = source.dim if isinstance(source, ArrayChunks) else ndim - 1
        if not -ndim <= dim < ndim or dim % ndim != cut:
            raise checks.fail(op, f"the source cuts its chunks along dim {cut}, but the softmax "
                              f"dim is {dim}; they must be the same dim")
    if callable(source) and not isinstance(source, (ArrayChunks, FileChunks, torch.Tensor)):
        return lambda: iter(source())
    if isinstance(source, torch.Tensor):
        raise checks.fail(op, "chunks must be a sequence of tensors, a callable returning an iterator, or "
                              "ArrayChunks/FileChunks; to stream one tensor use ArrayChunks(x, size)", TypeError)
    try:
        it = iter(source)
    except TypeError:
        raise checks.fail(op, f"chunks must be iterable, got {type(source).__name__}", TypeError) from None
    if it is source:
        raise checks.fail(op, "chunks is a one-shot iterator (e.g. a generator), but it must "
                          "be read twice; pass a list, a callable that returns a fresh iterator, or "
                          "ArrayChunks/FileChunks", TypeError)
    return lambda: iter(source)


def _as_tensor(chunk, op: str) -> torch.Tensor:
    if isinstance(chunk, torch.Tensor):
        return chunk
    if isinstance(chunk, np.ndarray):
        return torch.from_numpy(np.array(chunk, copy=True))
    raise checks.fail(op, f"every chunk must be a torch.Tensor or numpy array, got "
                      f"{type(chunk).__name__}", TypeError)


class _ShapeCheck:
    """Chunks must agree on every dim but the softmax dim."""

    def __init__(self, op: str, dim: int):
        checks.dim_type(dim, op)
        self.op, self.dim, self.shape, self.ndim = op, dim, None, None

    def __call__(self, x: torch.Tensor) -> int:
        if x.dim() == 0:
            raise checks.fail(self.op, "every chunk needs at least one dimension (the softmax dim)")
        ndim = x.dim()
        if not -ndim <= self.dim < ndim:
            raise checks.fail(self.op, f"dim={self.dim} is out of range for a chunk with "
                              f"{x.dim()} dimension(s)", IndexError)
        d = self.dim % ndim
        rest = x.shape[:d] + x.shape[d + 1:]
        if self.shape is None:
            self.shape, self.ndim = rest, x.dim()
        elif rest != self.shape or x.dim() != self.ndim:
            raise checks.fail(self.op, f"chunk of shape {list(x.shape)} does not match the "
                              f"others outside dim {self.dim} (expected {list(self.shape)})")
        return d


def chunk_state(source: ChunkSource, dim: int = -1, *, temperature: float = 1.0) -> SoftmaxState:
    """The merged (max, sumexp) state of all chunks: one read of each."""
    state, check = None, _ShapeCheck("chunk_state", dim)
    for chunk in _passes(source, "chunk_state", dim)():
        x = _as_tensor(chunk, "chunk_state")
        check(x)
        st = softmax_stats(x, dim, temperature=temperature)
        state = st if state is None else state.merge(st)
    if state is None:
        raise checks.fail("chunk_state", "chunks is empty")
    return state


def _chunked(source: ChunkSource, dim: int, temperature: float, log: bool, op: str) -> Iterator[torch.Tensor]:
    passes = _passes(source, op, dim)  # validated before the generator starts
    check = _ShapeCheck(op, dim)

    def generate():
        state, lengths = None, []
        for chunk in passes():
            x = _as_tensor(chunk, op)
            lengths.append(x.shape[check(x)])
            st = softmax_stats(x, dim, temperature=temperature)
            state = st if state is None else state.merge(st)
        if state is None:
            raise checks.fail(op, "chunks is empty")
        seen = []
        for chunk in passes():
            x = _as_tensor(chunk, op)
            seen.append(x.shape[check(x)])
            if seen != lengths[:len(seen)]:
                break
            yield state.normalize(x, log=log)
        if seen != lengths:
            raise checks.fail(op, f"the second pass over chunks saw lengths {seen[:8]}..., the "
                              f"first {lengths[:8]}...: a source must yield the same chunks each time it is "
                              "iterated (a callable returning the same generator twice does not)")

    return generate()


def chunked_softmax(source: ChunkSource, dim: int = -1, *, temperature: float = 1.0) -> Iterator[torch.Tensor]:
    """softmax(x / temperature) of the concatenation of the chunks along ``dim``, yielded chunk by
    chunk (same shapes as the input chunks). Reads every chunk twice; holds one at a time."""
    return _chunked(source, dim, temperature, False, "chunked_softmax")


def chunked_log_softmax(source: ChunkSource, dim: int = -1, *, temperature: float = 1.0) -> Iterator[torch.Tensor]:
    """log_softmax of the concatenation of the chunks along ``dim``, yielded chunk by chunk."""
    return _chunked(source, dim, temperature, True, "chunked_log_softmax")


def chunked_softmax_topk(source: ChunkSource, k: int, dim: int = -1, *, log: bool = False,
                         temperature: float = 1.0) -> SoftmaxTopK:
    """The k largest softmax (or log-softmax) values of the concatenated chunks and their global
    indices along ``dim``: one read of each chunk (fused top-k + state per chunk, then merged).
    Ties go to the lower global index, as in :func:`online_softmax.softmax_topk`. Not
    differentiable: the results are computed without autograd."""
    with torch.no_grad():
        return _chunked_softmax_topk(source, k, dim, log, temperature)


def _chunked_softmax_topk(source, k, dim, log, temperature) -> SoftmaxTopK:
    op = "chunked_softmax_topk"
    checks.positive_int(k, "k", op)
    temperature = checks.temperature(temperature, op)
    check = _ShapeCheck(op, dim)
    state, cand_x, cand_i, offset = None, None, None, 0
    d = None
    for chunk in _passes(source, op, dim)():
        x = _as_tensor(chunk, op)
        d = check(x)
        n = x.shape[d]
        if n == 0:
            continue
        kc = min(k, n)
        _v, idx, m, s = _ops.softmax_topk(x, kc, d, False, temperature)
        raw = x.gather(d, idx)
        st = SoftmaxState(m, s, d, temperature)
        state = st if state is None else state.merge(st)
        gidx = idx + offset
        if cand_x is None:
            cand_x, cand_i = raw, gidx
        else:
            cand_x, cand_i = merge_topk_candidates(torch.cat([cand_x, raw], d), torch.cat([cand_i, gidx], d), k, d)
        offset += n
    if state is None:
        raise checks.fail(op, "chunks is empty or every chunk is empty")
    if offset < k:
        raise checks.fail(op, f"k={k} is larger than the total length {offset} along dim {dim}")
    cand_x, cand_i = merge_topk_candidates(cand_x, cand_i, k, d)
    return SoftmaxTopK(state.normalize(cand_x, log=log), cand_i)
