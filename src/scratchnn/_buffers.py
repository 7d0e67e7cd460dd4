"""Large output arrays reused once nobody holds them, instead of fresh memory each call.

Every ``forward`` and ``backward`` returns a new array, as PyTorch does: the
caller may keep it. But a new large array is new memory: glibc hands arrays
above 32 MiB straight from the kernel (``mmap``) and gives them back on
``free``, and the kernel zeroes every page before the first write touches
it. On the project's machine a fresh 64 MB array costs about as much again
as writing it (``benchmarks/bench_bandwidth.py``: ``x.copy()`` reaches 0.53
of ``np.copyto`` into an existing buffer).

:func:`empty` therefore keeps the memory of large outputs in a small pool and
hands it out again, as a new array, once no array made from it is alive any
more. That is decided by reference count, never by guessing: every array
:func:`empty` returns is a view of one of the pool's buffers and holds a
reference to it, and so does every view, slice or buffer export made from
that array; a buffer is reused only when the pool's own references are the
only ones left. A caller who keeps an output, or any view of it, keeps its
memory out of the pool. The pool holds at most ``POOL_BYTES`` of buffers
(the least recently used beyond it are dropped and freed when their last
array dies); :func:`clear` empties it.

Small arrays are left to NumPy and malloc, which reuse them already.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from typing import Any

import numpy as np

from scratchnn import _fused

# From this many bytes an output comes from the pool; below, NumPy and malloc
# recycle freed arrays well. (malloc's heap also recycles arrays up to 32 MiB
# once one of that size has been freed, its mmap threshold rising to it, but
# may hand their pages back; the pool keeps them.)
MIN_BYTES = 1 << 20
# Most bytes of buffers the pool keeps, in use or free.
POOL_BYTES = 1 << 28
# Where the arrays start: malloc aligns to 16 bytes only.
ALIGNMENT = 64

_buffers: list[np.ndarray] = []  # least recently handed out first
# Reentrant: a fork from a signal handler that interrupted this very thread inside the
# pool must still take it (see the fork handler below).
_lock = threading.RLock()
if hasattr(os, "register_at_fork"):
    # A fork while another thread holds the lock would leave the child's copy held by a
    # thread that does not exist there: its first large output would wait forever. So a
    # fork waits for the pool to be between changes, and both sides release the lock.
    os.register_at_fork(
        before=_lock.acquire, after_in_parent=_lock.release, after_in_child=_lock.release
    )
# References to a free buffer while _take looks at it: the list's, the loop
# variable's and getrefcount's own argument.
_FREE_REFCOUNT = 3


def empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A new, uninitialised C-contiguous array, like ``np.empty(shape, dtype)``.

    Arrays of ``MIN_BYTES`` to ``POOL_BYTES`` reuse the memory of an earlier one of the
    same size that no array uses any more; smaller ones are plain ``np.empty``. From
    ``MIN_BYTES`` up, arrays start on a 64-byte boundary.
    """
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES:
        return np.empty(shape, dtype)
    if nbytes > POOL_BYTES - ALIGNMENT:  # beyond the pool, but aligned as its arrays are
        raw = np.empty(nbytes + ALIGNMENT, np.uint8)
        start = -raw.ctypes.data % ALIGNMENT
        return raw[start : start + nbytes].view(dtype).reshape(shape)
    with _lock:
        buffer = _take(nbytes)
        # The view is made under the lock: until it exists, another thread
        # could find the same buffer free. It starts at a 64-byte boundary (a cache
        # line, an AVX-512 vector: what non-temporal stores need), and its base is
        # the pool's buffer itself (NumPy points a view of a view at the owner).
        start = -buffer.ctypes.data % ALIGNMENT
        return buffer[start : start + nbytes].view(dtype).reshape(shape)


def empty_like(array: np.ndarray, dtype: Any = None) -> np.ndarray:
    """:func:`empty` of ``array``'s shape, and of its dtype unless ``dtype`` is given."""
    dtype = array.dtype if dtype is None else np.dtype(dtype)
    if array.size * dtype.itemsize < MIN_BYTES:  # the common small case, without the lock
        return np.empty(array.shape, dtype)
    return empty(array.shape, dtype)


def copy(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of NumPy array ``array``, its memory from :func:`empty`.

    Float arrays in C order are copied by the compiled kernels where they are
    built, which split large arrays over two threads (``np.copyto`` runs on one).
    """
    if array.size < _fused.THREADS_FROM and array.nbytes < MIN_BYTES:
        return array.copy()  # one thread, fresh small memory: NumPy's own copy
    out = empty(array.shape, array.dtype)
    if not (array.flags.c_contiguous and _fused.run("copy", out.reshape(-1), array.reshape(-1))):
        np.copyto(out, array)
    return out


def _take(nbytes: int) -> np.ndarray:
    """A free buffer of ``nbytes`` and room to align its start (a new one if none is free)."""
    nbytes += ALIGNMENT
    # The most recently used free buffer first: it is the likeliest to be in cache.
    # A plain index loop: enumerate() would hold a reference of its own.
    for index in range(len(_buffers) - 1, -1, -1):
        buffer = _buffers[index]
        if buffer.nbytes == nbytes and sys.getrefcount(buffer) == _FREE_REFCOUNT:
            del _buffers[index]
            _buffers.append(buffer)  # most recently used last
            return buffer
    buffer = np.empty(nbytes, np.uint8)
    _buffers.append(buffer)
    held = sum(b.nbytes for b in _buffers)
    while held > POOL_BYTES:
        # Forget the least recently used: if an array still uses it, its
        # memory is freed when that array dies, as any NumPy array's is.
        held -= _buffers.pop(0).nbytes
    return buffer


def clear() -> None:
    """Drop every buffer of the pool (those in use are freed when their arrays die)."""
    with _lock:
        _buffers.clear()


def held_bytes() -> int:
    """Bytes of the buffers the pool holds now, in use or free."""
    with _lock:
        return sum(b.nbytes for b in _buffers)
