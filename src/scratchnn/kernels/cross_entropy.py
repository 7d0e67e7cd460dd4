"""Softmax with cross-entropy on class indices, as two CUDA kernels for CuPy arrays.

On the GPU the loss is the one place a training step waits for the card, since
``SoftmaxWithLoss.forward`` returns a Python float. Built from CuPy calls, its
forward is about a dozen launches and two waits (the labels' range check, then
the loss); its backward four launches. Here the forward is one launch and one
wait: a single block walks the rows, writes the softmax and sums both the loss
and the count of labels out of range, which come back to the host together.
The backward is one launch: ``dx = (y - onehot(t)) * scale``; a training step
(``Sequential.gradient``) has the forward's launch write it too. The two numbers
stay on the card until they are read, so a training loop whose labels were
checked beforehand (``fit``) need not wait for each step's loss.

The formulas are those of the NumPy path of :class:`scratchnn.SoftmaxWithLoss`:
``y = exp(x - max) / total`` and, per row, ``-log y[t] = log(total) - (x[t] - max)``;
a NaN in a row makes the row's softmax and the loss NaN, as there.

As in :mod:`scratchnn.kernels.cuda`, nothing here imports CuPy at module
import; :func:`source` is plain text, compiled by CuPy on first use.
"""

from __future__ import annotations

from typing import Any

import numpy as np

BLOCK = 256
# One block does the forward: right for a batch (512 x 10 is two rows a thread), still
# right for an evaluation set (10 000 x 10); larger arrays take the path of CuPy calls,
# which uses the whole card.
MAX_ELEMENTS = 1 << 21
# One thread walks a row, three times: right for class counts up to about a thousand.
# Wider rows (a language model's vocabulary) take the CuPy calls' tree reductions.
MAX_CLASSES = 1024

_FLOAT_TYPES = {np.dtype(np.float32): ("float", "expf"),
                np.dtype(np.float64): ("double", "exp")}  # fmt: skip
_LABEL_TYPES = {
    np.dtype(np.int8): "signed char", np.dtype(np.int16): "short",
    np.dtype(np.int32): "int", np.dtype(np.int64): "long long",
    np.dtype(np.uint8): "unsigned char", np.dtype(np.uint16): "unsigned short",
    np.dtype(np.uint32): "unsigned int", np.dtype(np.uint64): "unsigned long long",
}  # fmt: skip


def supported(x: Any, t: Any) -> bool:
    """Whether the kernels take predictions ``x`` (N, K) and class indices ``t`` (N,)."""
    return (
        np.dtype(x.dtype) in _FLOAT_TYPES
        and np.dtype(t.dtype) in _LABEL_TYPES
        and x.ndim >= 1
        and t.shape == x.shape[:-1]
        and 0 < x.size <= MAX_ELEMENTS
        and x.shape[-1] <= MAX_CLASSES
    )


def source(dtype: Any, label_dtype: Any) -> str:
    """The CUDA C source of both kernels for predictions of ``dtype`` and labels of ``label_dtype``.

    ``softmax_xent(x, t, y, result, rows, classes)`` writes the softmax into
    ``y`` and ``result[0]`` = the summed loss over rows with a valid label,
    ``result[1]`` = the number of labels outside ``[0, classes)`` (both double).
    Launch it as one block of ``BLOCK`` threads. ``softmax_xent_grad(x, t, y,
    result, rows, classes, dx, scale)`` does the same and writes the backward's
    ``dx`` too, as ``softmax_xent_backward`` would from this ``y``, bit for bit;
    ``softmax_xent_bias_grad(..., dx, scale, b)`` takes the scores as ``x + b``
    (the bias of the Affine before, added as it would add it).
    ``softmax_xent_backward(y, t, dx, scale, n, classes)`` writes ``dx``; any grid.
    """
    c_type, exp = _FLOAT_TYPES[np.dtype(dtype)]
    label_type = _LABEL_TYPES[np.dtype(label_dtype)]
    return f"""typedef {c_type} T;
typedef {label_type} L;
#define BLOCK {BLOCK}

// The rows of one thread: its share of the loss and of the labels out of range; with
// GRAD, also the backward's dx = (y - onehot(t)) * scale, as softmax_xent_backward writes it;
// with BIAS, the scores are x + b (b added to each row, as the Affine before would add it).
template <bool GRAD, bool BIAS>
__device__ __forceinline__ void xent_rows(
    const T* __restrict__ x, const L* __restrict__ t, T* __restrict__ y,
    T* __restrict__ dx, const T scale, const T* __restrict__ b,
    const long long rows, const int classes, const int thread, const int threads,
    double* loss_part, long long* bad_part)
{{
    double loss = 0.0;
    long long bad = 0;
    for (long long r = thread; r < rows; r += threads) {{
        const T* xr = x + r * classes;
        T* yr = y + r * classes;
        T top = BIAS ? xr[0] + b[0] : xr[0];  // the row's maximum; a NaN anywhere makes it NaN
        for (int k = 1; k < classes; ++k) {{
            const T v = BIAS ? xr[k] + b[k] : xr[k];
            if (top == top && (v != v || v > top)) top = v;
        }}
        // Summed in double: one thread adds the row in order, and a float sum of a wide
        // row would lose digits that NumPy's pairwise sum keeps.
        double total = 0.0;
        for (int k = 0; k < classes; ++k) {{
            const T e = {exp}((BIAS ? xr[k] + b[k] : xr[k]) - top);
            yr[k] = e;
            total += (double)e;
        }}
        for (int k = 0; k < classes; ++k) yr[k] = (T)((double)yr[k] / total);
        const L label = t[r];
        if (GRAD) {{
            T* dr = dx + r * classes;
            for (int k = 0; k < classes; ++k) {{
                const T hit = (long long)label == k ? (T)1 : (T)0;
                dr[k] = (yr[k] - hit) * scale;
            }}
        }}
        // As unsigned, a negative label is huge: one comparison checks both ends.
        if ((unsigned long long)label >= (unsigned long long)classes) {{
            ++bad;
            continue;
        }}
        loss += log(total) - (double)((BIAS ? xr[label] + b[label] : xr[label]) - top);
    }}
    loss_part[thread] = loss;
    bad_part[thread] = bad;
}}

// The threads' shares summed in a fixed order, so the loss is the same on every run.
__device__ __forceinline__ void xent_total(
    const double* loss_part, const long long* bad_part, const int threads, double* result)
{{
    double loss = 0.0;
    long long bad = 0;
    for (int i = 0; i < threads; ++i) {{
        loss += loss_part[i];
        bad += bad_part[i];
    }}
    result[0] = loss;
    result[1] = (double)bad;
}}

// One block: the rows among its threads, then their shares summed by thread 0.
template <bool GRAD, bool BIAS>
__device__ __forceinline__ void xent_block(
    const T* __restrict__ x, const L* __restrict__ t, T* __restrict__ y,
    double* __restrict__ result, const long long rows, const int classes,
    T* __restrict__ dx, const T scale, const T* __restrict__ b)
{{
    __shared__ double loss_part[BLOCK];
    __shared__ long long bad_part[BLOCK];
    xent_rows<GRAD, BIAS>(x, t, y, dx, scale, b, rows, classes, threadIdx.x, blockDim.x,
                          loss_part, bad_part);
    __syncthreads();
    if (threadIdx.x == 0) xent_total(loss_part, bad_part, blockDim.x, result);
}}

extern "C" __global__ void softmax_xent(
    const T* __restrict__ x, const L* __restrict__ t, T* __restrict__ y,
    double* __restrict__ result, const long long rows, const int classes)
{{
    xent_block<false, false>(x, t, y, result, rows, classes, nullptr, (T)0, nullptr);
}}

extern "C" __global__ void softmax_xent_grad(
    const T* __restrict__ x, const L* __restrict__ t, T* __restrict__ y,
    double* __restrict__ result, const long long rows, const int classes,
    T* __restrict__ dx, const T scale)
{{
    xent_block<true, false>(x, t, y, result, rows, classes, dx, scale, nullptr);
}}

extern "C" __global__ void softmax_xent_bias_grad(
    const T* __restrict__ x, const L* __restrict__ t, T* __restrict__ y,
    double* __restrict__ result, const long long rows, const int classes,
    T* __restrict__ dx, const T scale, const T* __restrict__ b)
{{
    xent_block<true, true>(x, t, y, result, rows, classes, dx, scale, b);
}}

extern "C" __global__ void softmax_xent_backward(
    const T* __restrict__ y, const L* __restrict__ t, T* __restrict__ dx,
    const T scale, const long long n, const int classes)
{{
    const long long stride = (long long)blockDim.x * gridDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {{
        const long long r = i / classes;
        const T hit = (long long)t[r] == i - r * classes ? (T)1 : (T)0;
        dx[i] = (y[i] - hit) * scale;
    }}
}}
"""


_kernels: dict[tuple[str, str, str], Any] = {}
_NAMES = ("softmax_xent", "softmax_xent_grad", "softmax_xent_bias_grad", "softmax_xent_backward")


def _kernel(cupy: Any, dtype: Any, label_dtype: Any, name: str) -> Any:
    """Kernel ``name`` of :func:`source` for these dtypes; compiled once, kept."""
    key = (np.dtype(dtype).str, np.dtype(label_dtype).str, name)
    kernel = _kernels.get(key)
    if kernel is None:
        module = cupy.RawModule(code=source(dtype, label_dtype))
        for each in _NAMES:
            _kernels[(key[0], key[1], each)] = module.get_function(each)
        kernel = _kernels[key]
    return kernel


def forward(
    cupy: Any, x: Any, t: Any, grad_scale: float | None = None, bias: Any = None
) -> tuple[Any, Any, Any]:
    """Softmax ``y`` of ``x`` over its last axis, and ``result``, on the card: the summed
    loss and the count of labels out of range (two float64 numbers); with
    ``grad_scale``, also what :func:`backward` would return for that scale (a training
    step's, computed in the same pass), else None. With ``bias`` (and ``grad_scale``),
    the scores are ``x + bias``, each row (:func:`takes_bias` says where it may be given).

    One launch; nothing waits for the card until ``result`` is read.
    """
    x = cupy.ascontiguousarray(x)
    t = cupy.ascontiguousarray(t)
    classes = x.shape[-1]
    y = cupy.empty_like(x)
    result = cupy.empty(2, dtype=np.float64)
    args: tuple[Any, ...] = (x, t, y, result, np.int64(x.size // classes), np.int32(classes))
    if grad_scale is None:
        if bias is not None:
            raise TypeError("cross_entropy.forward: a bias for the scores goes with grad_scale")
        _kernel(cupy, x.dtype, t.dtype, "softmax_xent")((1,), (BLOCK,), args)
        return y, result, None
    dx = cupy.empty_like(x)
    args += (dx, x.dtype.type(grad_scale))
    if bias is None:
        _kernel(cupy, x.dtype, t.dtype, "softmax_xent_grad")((1,), (BLOCK,), args)
    else:
        _kernel(cupy, x.dtype, t.dtype, "softmax_xent_bias_grad")((1,), (BLOCK,), (*args, bias))
    return y, result, dx


def takes_bias(x: Any, bias: Any) -> bool:
    """Whether :func:`forward` may add ``bias`` to the scores ``x`` (N, K): a C-contiguous
    vector of K of ``x``'s kind and dtype."""
    return (
        type(bias) is type(x)
        and bias.shape == x.shape[-1:]
        and bias.dtype == x.dtype
        and bias.flags.c_contiguous
    )


def backward(cupy: Any, y: Any, t: Any, scale: float) -> Any:
    """``(y - onehot(t)) * scale`` in one launch; ``t`` holds valid class indices."""
    t = cupy.ascontiguousarray(t)
    dx = cupy.empty_like(y)
    n = y.size
    blocks = max(1, min(-(-n // BLOCK), 1024))
    kernel = _kernel(cupy, y.dtype, t.dtype, "softmax_xent_backward")
    kernel((blocks,), (BLOCK,), (y, t, dx, y.dtype.type(scale), np.int64(n), np.int32(y.shape[-1])))
    return dx
