"""Affine's bias on the GPU: added to each row, and its gradient, the sum of each column.

``out[r, c] += b[c]`` and ``db[c] = sum_r dout[r, c]``: the forward's bias
addition and the backward's bias gradient. CuPy computes both well on the card,
but through its general machinery (a broadcasting ufunc, a reduction), which
costs the host more per call than a launch of a kernel of one's own, and a
small network's training step on a GPU is bound by the host (see "On a GPU" in
docs/benchmarks.md; ``benchmarks/gpu_calls.py`` measures both against these).
Where the kernels do not apply (not CuPy, not float32 or float64, not
C-contiguous, shapes that do not match, more rows than ``MAX_ROWS``), the
functions make CuPy's own calls.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from scratchnn.kernels.cuda import _C_TYPES, BLOCK, compiles, supported_dtype

# column_sum gives each block 32 columns and its 8 warps 8 interleaved sets of rows: one
# thread walks rows / 8 of them. Beyond this, CuPy's reduction, which spreads rows wider.
MAX_ROWS = 4096
_COLUMNS_PER_BLOCK, _ROW_SETS = 32, 8
# add_bias's most blocks (one a row): a few waves on a large card; beyond, blocks take
# more rows each.
_ADD_BLOCKS = 1024


def source(dtype: Any) -> str:
    """The CUDA C source of the kernels for arrays of ``dtype``.

    ``add_bias(h, b, rows, cols)`` adds ``b`` to each row of ``h``: a block a
    row at a time, its threads along the row (any grid). ``column_sum(g, out,
    rows, cols)`` writes each column's sum into ``out``, summed in double in a
    fixed order (the same on every run; the double sum's own error is far below
    a float32 ulp); launch it with blocks of 256 threads, one block for every
    32 columns.

    For an Affine followed by a Relu (``Sequential`` on the GPU), each with the
    ReLU folded in, in the same launch shapes: ``add_bias_relu(h, b, mask, rows,
    cols)`` adds the bias and applies the ReLU in place, writing its mask
    (``True`` where ``h + b <= 0``, as ``relu_forward``); ``relu_column_sum(dout,
    mask, g, out, rows, cols)`` writes ReLU's backward ``g = where(mask, 0,
    dout)`` and sums its columns. The same arithmetic as the separate kernels,
    bit for bit.
    """
    return f"""typedef {_C_TYPES[np.dtype(dtype)]} T;

// Adds b to each row of h; with RELU, then max(., 0) in place and its mask (NaN passes).
template <bool RELU>
__device__ __forceinline__ void add_rows(T* __restrict__ h, const T* __restrict__ b,
                                         unsigned char* __restrict__ mask,
                                         long long rows, long long cols)
{{
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {{
        T* row = h + r * cols;
        for (long long c = threadIdx.x; c < cols; c += blockDim.x) {{
            const T v = row[c] + b[c];
            if (RELU) {{
                const bool off = v <= (T)0;
                mask[r * cols + c] = off;
                row[c] = off ? (T)0 : v;
            }} else {{
                row[c] = v;
            }}
        }}
    }}
}}

// Each column's sum of g into out; with MASKED, of where(mask, 0, g), written to g_out.
template <bool MASKED>
__device__ __forceinline__ void sum_columns(const T* __restrict__ g,
                                            const unsigned char* __restrict__ mask,
                                            T* __restrict__ g_out, T* __restrict__ out,
                                            int rows, int cols)
{{
    __shared__ double part[{_ROW_SETS}][{_COLUMNS_PER_BLOCK}];
    const int lane = threadIdx.x % {_COLUMNS_PER_BLOCK}, set = threadIdx.x / {_COLUMNS_PER_BLOCK};
    const int col = blockIdx.x * {_COLUMNS_PER_BLOCK} + lane;
    double s = 0.0;
    if (col < cols)
        for (int r = set; r < rows; r += {_ROW_SETS}) {{
            const long long i = (long long)r * cols + col;
            T v = g[i];
            if (MASKED) {{
                v = mask[i] ? (T)0 : v;
                g_out[i] = v;
            }}
            s += (double)v;
        }}
    part[set][lane] = s;
    __syncthreads();  // every set's partial sum written before set 0 adds them up
    if (set == 0 && col < cols) {{
        double total = 0.0;
        for (int k = 0; k < {_ROW_SETS}; ++k) total += part[k][lane];
        out[col] = (T)total;
    }}
}}

extern "C" __global__ void add_bias(T* __restrict__ h, const T* __restrict__ b,
                                    const long long rows, const long long cols)
{{
    add_rows<false>(h, b, nullptr, rows, cols);
}}

extern "C" __global__ void add_bias_relu(T* __restrict__ h, const T* __restrict__ b,
                                         unsigned char* __restrict__ mask,
                                         const long long rows, const long long cols)
{{
    add_rows<true>(h, b, mask, rows, cols);
}}

extern "C" __global__ void column_sum(const T* __restrict__ g, T* __restrict__ out,
                                      const int rows, const int cols)
{{
    sum_columns<false>(g, nullptr, nullptr, out, rows, cols);
}}

extern "C" __global__ void relu_column_sum(const T* __restrict__ dout,
                                           const unsigned char* __restrict__ mask,
                                           T* __restrict__ g, T* __restrict__ out,
                                           const int rows, const int cols)
{{
    sum_columns<true>(dout, mask, g, out, rows, cols);
}}
"""


_kernels: dict[tuple[str, str], Any] = {}
_NAMES = ("add_bias", "add_bias_relu", "column_sum", "relu_column_sum")


def _kernel(cupy: Any, dtype: Any, name: str) -> Any:
    """Kernel ``name`` of :func:`source` for ``dtype``; compiled once (all four), kept."""
    key = (np.dtype(dtype).str, name)
    kernel = _kernels.get(key)
    if kernel is None:
        module = cupy.RawModule(code=source(dtype))
        for each in _NAMES:
            _kernels[(key[0], each)] = module.get_function(each)
        kernel = _kernels[key]
    return kernel


def _cupy_with_kernels(array: Any) -> Any:
    """CuPy, where ``array`` is a float32/float64 C-contiguous CuPy matrix that the
    kernels can take; None otherwise."""
    if type(array) is np.ndarray or not supported_dtype(array.dtype):
        return None
    cupy = sys.modules.get("cupy")
    if cupy is None or type(array) is not getattr(cupy, "ndarray", None) or not compiles(cupy):
        return None
    if array.ndim != 2 or not array.flags.c_contiguous:
        return None
    return cupy


def _adds_bias(out: Any, b: Any) -> Any:
    """CuPy, where a kernel may add ``b`` to each row of ``out`` (see
    :func:`_cupy_with_kernels`; ``b`` a C-contiguous vector of ``out``'s row, kind and
    dtype; ``out`` not empty); None otherwise."""
    cupy = _cupy_with_kernels(out)
    if (
        cupy is None
        or type(b) is not type(out)
        or b.shape != out.shape[1:]
        or b.dtype != out.dtype
        or not b.flags.c_contiguous
        or out.size == 0
    ):
        return None
    return cupy


def add_bias(out: Any, b: Any) -> None:
    """``out += b`` in place, ``out`` of shape (rows, cols), ``b`` of shape (cols,)."""
    cupy = _adds_bias(out, b)
    if cupy is None:
        out += b
        return
    rows, cols = out.shape
    kernel = _kernel(cupy, out.dtype, "add_bias")
    grid = min(rows, _ADD_BLOCKS)
    kernel((grid,), (BLOCK,), (out, b, np.int64(rows), np.int64(cols)))


def column_sum(g: Any) -> Any:
    """``g.sum(axis=0)`` of a matrix ``g``: a new array of ``g.shape[1]`` sums."""
    cupy = _cupy_with_kernels(g)
    rows, cols = g.shape if g.ndim == 2 else (0, 0)
    if cupy is None or not 0 < rows <= MAX_ROWS or not 0 < cols < 2**31:
        return g.sum(axis=0)
    out = cupy.empty(cols, dtype=g.dtype)
    grid = -(-cols // _COLUMNS_PER_BLOCK)
    threads = _COLUMNS_PER_BLOCK * _ROW_SETS
    _kernel(cupy, g.dtype, "column_sum")((grid,), (threads,), (g, out, np.int32(rows), np.int32(cols)))
    return out


# -- an Affine followed by a Relu: the bias and the ReLU in one launch each way -------------


def add_bias_relu(out: Any, b: Any) -> Any:
    """``out = relu(out + b)`` in place, with ReLU's mask (``True`` where ``out + b <= 0``):
    one launch; returns the mask, or None where the kernel does not apply (the caller then
    makes the two separate calls, :func:`add_bias` and ReLU's own kernel)."""
    cupy = _adds_bias(out, b)
    if cupy is None:
        return None
    rows, cols = out.shape
    mask = cupy.empty(out.shape, dtype=np.bool_)
    kernel = _kernel(cupy, out.dtype, "add_bias_relu")
    kernel((min(rows, _ADD_BLOCKS),), (BLOCK,), (out, b, mask, np.int64(rows), np.int64(cols)))
    return mask


def relu_column_sum(dout: Any, mask: Any) -> tuple[Any, Any] | None:
    """ReLU's backward ``g = where(mask, 0, dout)`` and its column sums ``g.sum(axis=0)``:
    one launch; returns both, or None where the kernel does not apply."""
    cupy = _cupy_with_kernels(dout)
    rows, cols = dout.shape if dout.ndim == 2 else (0, 0)
    if (
        cupy is None
        or not 0 < rows <= MAX_ROWS
        or not 0 < cols < 2**31
        or type(mask) is not type(dout)
        or mask.shape != dout.shape
        or mask.dtype != np.bool_
        or not mask.flags.c_contiguous
    ):
        return None
    g = cupy.empty(dout.shape, dtype=dout.dtype)
    out = cupy.empty(cols, dtype=dout.dtype)
    grid = -(-cols // _COLUMNS_PER_BLOCK)
    threads = _COLUMNS_PER_BLOCK * _ROW_SETS
    kernel = _kernel(cupy, dout.dtype, "relu_column_sum")
    kernel((grid,), (threads,), (dout, mask, g, out, np.int32(rows), np.int32(cols)))
    return g, out
