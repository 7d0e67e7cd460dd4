"""The optional compiled kernels: one fused pass where NumPy makes several, NumPy as the fallback.

The C files in ``src/ckernels/`` (one per concept; ``ckernels.h`` lists
them) hold, over float32 or float64 arrays, a forward and a backward loop
for each activation (vectorised through glibc's libmvec), Softmax by rows
(with log-softmax for SoftmaxWithLoss), the SGD and Adam steps, Conv2d's
im2col and col2im, max pooling and BatchNorm's training pass; calls of
``THREADS_FROM`` elements or more run on two threads (one where the process
may use one CPU only). They are built as the
extension module ``scratchnn._ckernels`` when scratchnn is installed on a
machine with a C compiler (see ``setup.py``).

The layers call :func:`run` (Conv2d :func:`conv`, MaxPool2d :func:`pool`,
BatchNorm :func:`batchnorm`) on their C-contiguous arrays of any shape, or :func:`apply` for a new output
of the input's shape; these return False (None) whenever the kernels cannot
take the call (not built, switched off, another dtype, layout or array
type), and the caller then runs its NumPy passes, which stay the reference.
``SCRATCHNN_KERNELS=0`` in the environment, or ``ENABLED = False`` here,
switches the kernels off.

The kernels never raise or warn: where the NumPy path overflows harmlessly
(and ignores it under its own ``np.errstate``), they give the same values
without touching NumPy's floating-point state, so ``np.errstate(all="raise")``
around a layer raises only on the NumPy path.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType

import numpy as np

from scratchnn import _buffers

_LOAD_ERROR = ""  # why the kernels did not load, for status()


def _load() -> ModuleType | None:
    global _LOAD_ERROR
    try:
        from scratchnn import _ckernels  # type: ignore[attr-defined]
    except ImportError as error:  # not built here (no compiler), or built for another machine
        _LOAD_ERROR = str(error)
        return None
    return _ckernels


def _usable_cpus() -> int:
    """The CPUs this process may run on: ``taskset -c 0`` leaves one, whatever the machine
    has (a second thread would then spin on the same CPU as the first)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


_ON, _OFF = ("", "1", "true", "on", "yes"), ("0", "false", "off", "no")


def _kernels_wanted() -> bool:
    """``SCRATCHNN_KERNELS``: 0, false, off or no turn the compiled kernels off; 1, true,
    on, yes or nothing leave them on; anything else warns and leaves them on."""
    raw = os.environ.get("SCRATCHNN_KERNELS", "")
    value = raw.strip().lower()
    if value in _OFF:
        return False
    if value not in _ON:
        warnings.warn(
            f"SCRATCHNN_KERNELS={raw!r} is neither on (1, true, on, yes) nor off (0, false, "
            "off, no); the compiled kernels stay on",
            RuntimeWarning,
            stacklevel=2,
        )
    return True


_MODULE = _load()
# A call of THREADS_FROM elements or more runs on THREADS threads, the caller
# and one worker in C taking blocks of BLOCK elements in turn (see
# src/ckernels/threads.c). PyTorch splits its element-wise loops from 32768
# elements; measured here (docs/benchmarks.md) the second thread pays from
# about THREADS_FROM.
THREADS = min(2, _usable_cpus())
THREADS_FROM = 1 << 16
# Bytes from which Relu writes its output and dx with non-temporal stores (relu_stream.c).
# Measured with the next layer reading each result (so that the cached copy an ordinary
# store leaves is worth something): the stores take 1.04 x the time at 8 MB, 0.91 x at
# 16 MB and 0.87 x at 64 MB per array.
STREAM_FROM = 1 << 24
BLOCK = 1 << 14
_INDEX: dict[str, int] = {name: i for i, name in enumerate(_MODULE.NAMES)} if _MODULE else {}
ENABLED = _MODULE is not None and _kernels_wanted()
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def available() -> bool:
    """Whether the compiled kernels were built and load on this machine."""
    return _MODULE is not None


def status() -> str:
    """Whether the layers use the compiled kernels, in words: ``on``, or why not.

    Said by ``scratchnn --version``, and by ``scratchnn train`` when they are not
    built, since a pip install without a C compiler succeeds silently.
    """
    if _MODULE is None:
        return f"not built ({_LOAD_ERROR or 'no module'})"
    if not ENABLED:
        return f"off (SCRATCHNN_KERNELS={os.environ.get('SCRATCHNN_KERNELS', '')})"
    return "on"


# The outputs beyond ``out`` that a kernel writes, and the masks it reads
# (src/ckernels/elementwise.c; the packed and streaming Relu kernels of relu_packed.c
# and relu_stream.c as their plain twins). The C side points a missing array at
# ``out``, or has none for the packed ones: a call without one would write over
# ``out``, read garbage, or crash.
WRITES: dict[str, tuple[str, ...]] = {
    "relu": ("mask_out",),
    "leaky_relu": ("mask_out",),
    "elu": ("out2",),
    "silu": ("out2",),
    "gelu_tanh": ("out2",),
    "gelu": ("out2",),
    "adam": ("out2", "out3"),
    "relu_stream": ("mask_out",),
    "relu_packed": ("mask_out",),
    "relu_packed_stream": ("mask_out",),
}
READS: dict[str, tuple[str, ...]] = {
    "relu_grad": ("mask_in",),
    "leaky_relu_grad": ("mask_in",),
    "relu_grad_stream": ("mask_in",),
    "relu_packed_grad": ("mask_in",),
    "relu_packed_stream_grad": ("mask_in",),
}


def run(
    name: str,
    out: np.ndarray,
    x: np.ndarray | None = None,
    g: np.ndarray | None = None,
    h: np.ndarray | None = None,
    mask_in: np.ndarray | None = None,
    out2: np.ndarray | None = None,
    mask_out: np.ndarray | None = None,
    param: float | tuple[float, ...] = 0.0,
    out3: np.ndarray | None = None,
) -> bool:
    """Run kernel ``name`` over C-contiguous arrays of one size; False if it cannot.

    ``x``, ``g`` and ``h`` are the float inputs, ``mask_in`` and ``mask_out``
    bool arrays (True where ``x <= 0``; uint8 packed bits for the packed Relu),
    ``out``, ``out2`` and ``out3`` the float outputs (the optimisers' steps
    read them too: parameter and state), ``param`` the layer's alpha or beta,
    or a tuple of up to 6 scalars. Large arrays run on two threads
    (``THREADS_FROM``), bit for bit as on one. ``out`` sets the dtype (float32
    or float64), which the other float arrays share; every array is
    C-contiguous with ``out``'s size, or the call returns False untouched.
    Only ``out``, ``out2``, ``out3`` and ``mask_out`` are written; a kernel
    that writes one of the last three (``WRITES``), or reads a mask
    (``READS``), gets False without it.
    """
    if not ENABLED or type(out) is not np.ndarray:
        return False
    given = {"out2": out2, "out3": out3, "mask_out": mask_out, "mask_in": mask_in}
    if any(given[a] is None for a in (*WRITES.get(name, ()), *READS.get(name, ()))):
        return False
    assert _MODULE is not None
    params = tuple(map(float, param)) if isinstance(param, tuple) else (float(param),)
    # The extension checks dtypes, sizes and contiguity through the buffer
    # protocol, in about a microsecond for all the arrays together.
    threads = THREADS if out.size >= THREADS_FROM else 1
    return bool(
        _MODULE.run(
            _INDEX[name], out, x, g, h, mask_in, out2, out3, mask_out, params, threads, BLOCK
        )
    )


def apply(name: str, x: np.ndarray, *more: np.ndarray, param: float = 0.0) -> np.ndarray | None:
    """A new array of ``x``'s shape and dtype computed by kernel ``name`` from ``x``
    and up to two more arrays (its ``g`` and ``h``); None if the kernels cannot
    take them (see :func:`run`).

    The short path for the layers' common call, one NumPy array in and one out:
    the arrays may have any shape, as long as they are C-contiguous.
    """
    if not ENABLED or type(x) is not np.ndarray or x.dtype not in _DTYPES or len(more) > 2:
        return None
    if name in WRITES or name in READS:  # more outputs than the one made here, or a mask
        return None
    assert _MODULE is not None
    g, h = (*more, None, None)[:2]
    out = _buffers.empty_like(x)
    threads = THREADS if x.size >= THREADS_FROM else 1
    arrays = (out, x, g, h, None, None, None, None)
    if _MODULE.run(_INDEX[name], *arrays, (float(param),), threads, BLOCK):
        return out
    return None


def conv(which: str, src: np.ndarray, dst: np.ndarray, dims: tuple[int, ...]) -> bool:
    """im2col (``which="im2col"``: ``src`` x, ``dst`` col) or col2im (``"col2im"``: ``src``
    dcol, ``dst`` dx) for Conv2d; False, touching nothing, if the kernels cannot take them.

    ``dims`` is (N, C, H, W, kh, kw, stride_h, stride_w, pad_h, pad_w, OH, OW); x and dx
    are (N, C, H, W), col and dcol (C, kh, kw, N, OH, OW), all C-contiguous arrays of one
    float dtype (see src/ckernels/convolution.c).
    """
    if not ENABLED or type(src) is not np.ndarray or type(dst) is not np.ndarray:
        return False
    assert _MODULE is not None
    threads = THREADS if dst.size >= THREADS_FROM else 1
    return bool(_MODULE.conv(0 if which == "im2col" else 1, src, dst, dims, threads))


def pool(
    which: str, src: np.ndarray, dst: np.ndarray, argmax: np.ndarray, dims: tuple[int, ...]
) -> bool:
    """Max pooling (``which="max"``: ``src`` x, ``dst`` out, ``argmax`` written) or its
    gradient (``"max_grad"``: ``src`` dout, ``argmax`` read, ``dst`` dx) for MaxPool2d;
    False, touching nothing, if the kernels cannot take them.

    ``dims`` is (N, C, H, W, kh, kw, stride_h, stride_w, OH, OW): windows that do not
    overlap (strides at least the kernel), no padding, at most 256 pixels; x and dx
    are (N, C, H, W), out and dout (N, C, OH, OW), C-contiguous arrays of one float
    dtype, argmax uint8 of out's shape (see src/ckernels/pooling.c).
    """
    if not ENABLED or not all(type(a) is np.ndarray for a in (src, dst, argmax)):
        return False
    assert _MODULE is not None
    threads = THREADS if max(src.size, dst.size) >= THREADS_FROM else 1
    return bool(_MODULE.pool(0 if which == "max" else 1, src, dst, argmax, dims, threads))


def batchnorm(
    which: str,
    src: np.ndarray,
    xhat: np.ndarray,
    dst: np.ndarray,
    stats: np.ndarray,
    dims: tuple[int, int, int],
    eps: float,
) -> bool:
    """BatchNorm's training forward (``which="forward"``: ``src`` x; ``xhat`` and ``dst``
    out written) or backward (``"backward"``: ``src`` dout, ``xhat`` read, ``dst`` dx),
    per channel; False, touching nothing, if the kernels cannot take them.

    ``dims`` is (N, C, H W): the images are (N, C, H, W), C-contiguous, of one float
    dtype, and ``stats`` (C, 5) of that dtype: gamma, beta (forward) or gamma and
    inv_std (backward, at 0 and 4) in, the mean, variance and inv_std (forward, at
    2 to 4) or the sums of dout and of dout xhat (backward, at 2 and 3) out (see
    src/ckernels/batchnorm.c).
    """
    arrays = (src, xhat, dst, stats)
    if not ENABLED or not all(type(a) is np.ndarray for a in arrays):
        return False
    assert _MODULE is not None
    threads = THREADS if src.size >= THREADS_FROM else 1
    code = 0 if which == "forward" else 1
    return bool(_MODULE.batchnorm(code, src, xhat, dst, stats, dims, float(eps), threads))
