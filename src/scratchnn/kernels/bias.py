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
    """The CUDA C source of both kernels for arrays of ``dtype``.

    ``add_bias(h, b, rows, cols)`` adds ``b`` to each row of ``h``: a block a
    row at a time, its threads along the row (any grid). ``column_sum(g, out,
    rows, cols)`` writes each column's sum into ``out``, summed in double in a
    fixed order (the same on every run; the double sum's own error is far below
    a float32 ulp); launch it with blocks of 256 threads, one block for every
    32 columns.
    """
    return f"""typedef {_C_TYPES[np.dtype(dtype)]} T;

extern "C" __global__ void add_bias(T* __restrict__ h, const T* __restrict__ b,
                                    const long long rows, const long long cols)
{{
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {{
        T* row = h + r * cols;
        for (long long c = threadIdx.x; c < cols; c += blockDim.x) row[c] += b[c];
    }}
}}

extern "C" __global__ void column_sum(const T* __restrict__ g, T* __restrict__ out,
                                      const int rows, const int cols)
{{
    __shared__ double part[{_ROW_SETS}][{_COLUMNS_PER_BLOCK}];
    const int lane = threadIdx.x % {_COLUMNS_PER_BLOCK}, set = threadIdx.x / {_COLUMNS_PER_BLOCK};
    const int col = blockIdx.x * {_COLUMNS_PER_BLOCK} + lane;
    double s = 0.0;
    if (col < cols)
        for (int r = set; r < rows; r += {_ROW_SETS}) s += (double)g[(long long)r * cols + col];
    part[set][lane] = s;
    __syncthreads();  // every set's partial sum written before set 0 adds them up
    if (set == 0 && col < cols) {{
        double total = 0.0;
        for (int k = 0; k < {_ROW_SETS}; ++k) total += part[k][lane];
        out[col] = (T)total;
    }}
}}
"""


_kernels: dict[tuple[str, str], Any] = {}


def _kernel(cupy: Any, dtype: Any, name: str) -> Any:
    """Kernel ``name`` of :func:`source` for ``dtype``; compiled once (both kernels), kept."""
    key = (np.dtype(dtype).str, name)
    kernel = _kernels.get(key)
    if kernel is None:
        module = cupy.RawModule(code=source(dtype))
        for each in ("add_bias", "column_sum"):
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


def add_bias(out: Any, b: Any) -> None:
    """``out += b`` in place, ``out`` of shape (rows, cols), ``b`` of shape (cols,)."""
    cupy = _cupy_with_kernels(out)
    if (
        cupy is None
        or type(b) is not type(out)
        or b.shape != out.shape[1:]
        or b.dtype != out.dtype
        or not b.flags.c_contiguous
        or out.size == 0
    ):
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
