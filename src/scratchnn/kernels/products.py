"""Matrix products of CuPy matrices by cuBLAS directly, for a training step's host time.

``matmul(a, b)`` is ``a @ b``. For two float32 or float64 CuPy matrices, each
C-contiguous or the transposed view of one (F-contiguous), it calls cuBLAS's
``sgemm`` or ``dgemm`` through CuPy's own binding
(``cupy_backends.cuda.libs.cublas``) on CuPy's handle and current stream: what
``cupy.matmul`` does for such arrays, without the Python around its call (the
dtype promotion, the layout checks, the compute type's look-up, an import at
each call). A small network's training step on a GPU is bound by the host,
and makes eight products (docs/benchmarks.md, "On a GPU").

Anything else is ``a @ b``, as is every product where the binding is missing
(the tests' stand-in for CuPy without its stand-in for cuBLAS) or refuses the
call (a CuPy whose binding differs: :data:`disabled` then says why, and CuPy's
own products take over). That the products are right is checked where CuPy
runs: on the CPU against a stand-in for cuBLAS that reads and writes the
arrays at the addresses passed, column-major, as cuBLAS does
(``tests/fake_cupy.py``), and on a card by ``tests/test_gpu.py`` and
``benchmarks/gpu.py`` against NumPy in float64.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

# Why the direct products are not used for a dtype, by its name (empty while they are).
disabled: dict[str, str] = {}
_gemms: dict[tuple[int, str], Any] = {}  # (id of the cupy module, dtype): a _Gemm or None
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_INT_LIMIT = 2**31  # cuBLAS takes its sizes and leading dimensions as int


class _Gemm:
    """``a @ b`` by cuBLAS's gemm for one dtype. Row-major ``C = A B`` is column-major
    ``C^T = B^T A^T``, so ``b`` is cuBLAS's first operand: a C-contiguous matrix is its
    transpose in column-major order, as is wanted (``N``); a transposed view (F-contiguous)
    is read as it lies and transposed by cuBLAS (``T``)."""

    def __init__(self, cupy: Any, dtype: np.dtype[Any]) -> None:
        from cupy_backends.cuda.libs import cublas  # type: ignore[import-not-found]

        self.cupy, self.dtype = cupy, dtype
        self.gemm = cublas.sgemm if dtype == np.float32 else cublas.dgemm
        self.device = cupy.cuda.device
        self.scalars = np.array([1, 0], dtype)  # alpha and beta, read by cuBLAS from the host
        self.one = self.scalars.ctypes.data
        self.zero = self.one + dtype.itemsize

    def __call__(self, a: Any, b: Any) -> Any:
        (n, k), m = a.shape, b.shape[1]
        out = self.cupy.empty((n, m), self.dtype)
        # (transposed?, leading dimension) of each operand as it lies in memory
        b_t, ldb = (0, m) if b.flags.c_contiguous else (1, k)
        a_t, lda = (0, k) if a.flags.c_contiguous else (1, n)
        self.gemm(self.device.get_cublas_handle(), b_t, a_t, m, n, k, self.one,
                  b.data.ptr, ldb, a.data.ptr, lda, self.zero, out.data.ptr, m)  # fmt: skip
        return out


def matmul(a: Any, b: Any) -> Any:
    """``a @ b``; for CuPy matrices, by cuBLAS directly where it applies (see the module)."""
    kind = type(a)
    if kind is np.ndarray or type(b) is not kind or a.ndim != 2 or b.ndim != 2:
        return a @ b
    gemm = _gemm(a)
    if (
        gemm is None
        or b.dtype != a.dtype
        or not (a.flags.c_contiguous or a.flags.f_contiguous)
        or not (b.flags.c_contiguous or b.flags.f_contiguous)
        or not 0 < max(a.shape) < _INT_LIMIT
        or not 0 < min(a.shape) * min(b.shape)
        or not b.shape[1] < _INT_LIMIT
        or a.shape[1] != b.shape[0]
    ):
        return a @ b
    try:
        return gemm(a, b)
    except (TypeError, AttributeError) as error:  # a binding unlike CuPy 14's: CuPy's products
        disabled[a.dtype.name] = f"{type(error).__name__}: {error}"
        _gemms[(id(sys.modules["cupy"]), a.dtype.str)] = None
        return a @ b


def _gemm(a: Any) -> Any:
    """The direct product for ``a``'s module and dtype, made at its first use; None where
    there is none."""
    cupy = sys.modules.get("cupy")
    if cupy is None or type(a) is not getattr(cupy, "ndarray", None):
        return None
    key = (id(cupy), a.dtype.str)
    if key in _gemms:
        return _gemms[key]
    gemm = None
    if np.dtype(a.dtype) in _DTYPES:
        try:
            gemm = _Gemm(cupy, np.dtype(a.dtype))
        except ImportError:  # (no binding of cuBLAS: a stand-in for CuPy)
            gemm = None
        except AttributeError as error:  # (no handle where CuPy 14 keeps it)
            disabled[np.dtype(a.dtype).name] = f"{type(error).__name__}: {error}"
            gemm = None
    _gemms[key] = gemm
    return gemm
