"""Blocked evaluation of element-wise kernels, on two threads for large arrays (where
the process may use two CPUs).

An element-wise layer written as NumPy passes (``out=``, in place) reads and
writes its arrays once per pass. On a large array each pass goes to main
memory; on a block of a few thousand elements the passes after the first run
in the core's cache. And NumPy's ufuncs release the GIL, so two threads can
work on different blocks at once.

:func:`run_blocked` runs a kernel on matching blocks of its arrays: the whole
arrays at once when they are small (the plain single-threaded path, which is
also the reference: the blocks compute the same values, element for element),
block by block on the calling thread and one worker thread when they are
large. The worker runs in a copy of the caller's context, so NumPy's
``errstate`` (which is per context) applies there as it does in the caller:
``np.errstate(all="raise")`` raises from the worker's blocks too, and a
layer's own ``np.errstate(over="ignore")`` inside the kernel applies to every
block.
"""

from __future__ import annotations

import contextvars
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

from scratchnn import _buffers, _fused

# Bytes of one array's block: the kernels keep 3 to 6 block-sized arrays in
# flight, which then stay within a core's 1 to 2 MiB L2 cache.
BLOCK_BYTES = 1 << 17
# Elements from which blocks pay for themselves on one thread, and from which
# a second thread pays. Measured on the project's 2-core Xeon VM (see
# docs/benchmarks.md): blocks pay from about 3e5 elements; its two cores share
# their vector units, so a second thread speeds up no SIMD arithmetic there,
# and pays a little only on the largest arrays, by taking half of the page
# faults of fresh output arrays. On a machine with real cores, lower it.
BLOCKS_FROM = 1 << 18
THREADS_FROM = 1 << 23
THREADS = _fused.THREADS
# A compiled kernel (scratchnn._fused) makes one pass, which blocks do not
# speed up, and splits large arrays over two threads itself, in C: it gets one
# call for the whole array.
_FUSED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

class _Worker:
    """One daemon thread that runs the jobs handed to it, each with a ``Future``.

    A daemon, not a ``ThreadPoolExecutor``'s thread: the interpreter joins those at
    exit, and one whose start a Ctrl-C interrupted is never told to stop, so the
    process would never end. A job in flight at exit needs no finishing: whoever
    wanted its result is gone.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], object], Future[object]]] = (
            queue.SimpleQueue()
        )
        threading.Thread(target=self._serve, name="scratchnn", daemon=True).start()

    def submit(self, job: Callable[[], object]) -> Future[object]:
        future: Future[object] = Future()
        self._jobs.put((job, future))
        return future

    def _serve(self) -> None:
        while True:
            job, future = self._jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as error:  # handed to the caller, which raises it
                    future.set_exception(error)


_worker: _Worker | None = None
_worker_lock = threading.Lock()


def _the_worker() -> _Worker:
    global _worker
    with _worker_lock:
        if _worker is None:
            _worker = _Worker()
        return _worker


def _forget_worker() -> None:
    # A forked child inherits the worker object but not its thread, and perhaps the lock
    # held by a thread that does not exist there.
    global _worker, _worker_lock
    _worker, _worker_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_worker)


def flat(array: np.ndarray) -> np.ndarray:
    """A 1-d C-order view of ``array`` (a contiguous copy if it is not contiguous)."""
    return np.ascontiguousarray(array).reshape(-1)


def run_blocked(
    kernel: Callable[[int, int], object], like: np.ndarray, fused: bool = True
) -> None:
    """Call ``kernel(start, stop)`` for blocks ``[start, stop)`` that cover ``range(like.size)``.

    The kernel computes the elements ``start:stop`` of its (1-d, contiguous)
    outputs in place from the same elements of its inputs, and of nothing
    else. Small arrays, and arrays of another module than NumPy, get one
    call, ``kernel(0, size)``: the plain single-threaded path. Blocks hold
    ``BLOCK_BYTES`` of ``like``'s items, a multiple of 8 elements (so a
    packed bit mask splits at whole bytes). ``fused``: the kernel calls the
    compiled kernels when they take ``like``'s dtype (float32, float64); they
    then get the whole array in one call and use two threads themselves.
    """
    size = like.size
    compiled = fused and _fused.ENABLED and like.dtype in _FUSED_DTYPES
    if compiled or size < BLOCKS_FROM or type(like) is not np.ndarray:
        kernel(0, size)
        return
    block = BLOCK_BYTES // like.itemsize
    starts = iter(range(0, size, block))

    def work() -> None:
        # Both threads take the next free block from one iterator (its next()
        # holds the GIL), so a thread slowed by other work on its core simply
        # takes fewer blocks.
        for start in starts:
            kernel(start, min(start + block, size))

    if size < THREADS_FROM or THREADS < 2:
        work()
        return
    context = contextvars.copy_context()  # the caller's: its errstate holds in the worker
    helper = _the_worker().submit(lambda: context.run(work))
    try:
        work()
    finally:
        # Wait for the worker even when our blocks failed: nothing may write
        # into the arrays after we return. Its own error, if any, is raised
        # here unless ours is already on its way.
        error = helper.exception()
    if error is not None:
        raise error


def elementwise(
    kernel: Callable[..., object],
    *inputs: np.ndarray,
    dtype: np.dtype | None = None,
    compiled: str | None = None,
    param: float = 0.0,
) -> np.ndarray:
    """A new array ``out`` of ``inputs[0]``'s shape, ``kernel(*inputs, out)`` run blockwise.

    The inputs have one shape; the kernel writes its last argument in place
    from the same elements of the others (see :func:`run_blocked`). ``out``
    has ``dtype``, by default ``inputs[0]``'s. ``compiled`` names the compiled
    kernel that computes the same from the inputs as its x, g and h (and
    ``param``): where it takes them, it runs instead, in one call, and
    ``kernel`` is the NumPy path.
    """
    if compiled is not None and dtype is None and _fused.ENABLED:
        # (the kernels take C-contiguous arrays of any shape: others are copied once)
        contiguous = [a if a.flags.c_contiguous else np.ascontiguousarray(a) for a in inputs]
        result = _fused.apply(compiled, *contiguous, param=param)
        if result is not None:
            return result
    out = _buffers.empty(inputs[0].shape, dtype or inputs[0].dtype)
    flats, out_flat = [flat(a) for a in inputs], out.reshape(-1)

    def kernel_on_block(start: int, stop: int) -> None:
        kernel(*(a[start:stop] for a in flats), out_flat[start:stop])

    run_blocked(kernel_on_block, out_flat)
    return out
