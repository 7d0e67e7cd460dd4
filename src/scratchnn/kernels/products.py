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
call (a CuPy whose binding differs); :data:`disabled` then says why, and CuPy's
own products take over. That the products are right is checked where CuPy
runs: on the CPU against a stand-in for cuBLAS that reads and writes the
arrays at the addresses passed, column-major, as cuBLAS does
(``tests/fake_cupy.py``), and on a card by ``tests/test_gpu_products.py`` and
``benchmarks/gpu.py`` against NumPy in float64. The product is made on the
current device, with its handle, as CuPy's own are (scratchnn's arrays live on
one). With ``CUPY_TF32`` set, float32 products are CuPy's, in the precision it
then chooses.

Within :func:`capturing`, the products are made by cuBLAS's C library itself
(by ``ctypes``), on a handle of scratchnn's own bound to a stream that records
a CUDA graph: CuPy's binding refuses every call while a stream captures.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np

# Why the direct products are not used for a dtype, by its name (empty while they are).
disabled: dict[str, str] = {}
# By (CuPy's array type, dtype): a _Gemm, or None where CuPy's own products take the arrays.
_gemms: dict[tuple[type, np.dtype[Any]], Any] = {}
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_INT_LIMIT = 2**31  # cuBLAS takes its sizes and leading dimensions as int


class _Gemm:
    """``a @ b`` by cuBLAS's gemm for one dtype. Row-major ``C = A B`` is column-major
    ``C^T = B^T A^T``, so ``b`` is cuBLAS's first operand: a C-contiguous matrix is its
    transpose in column-major order, as is wanted (``N``); a transposed view (F-contiguous)
    is read as it lies and transposed by cuBLAS (``T``)."""

    def __init__(self, cupy: Any, dtype: np.dtype[Any], gemm: Any, handle: Any) -> None:
        """``gemm``: cuBLAS's ``sgemm`` or ``dgemm`` for ``dtype``, called with the value
        of ``handle()`` and the rest of cuBLAS's arguments."""
        self.cupy, self.dtype, self.gemm, self.handle = cupy, dtype, gemm, handle
        self.scalars = np.array([1, 0], dtype)  # alpha and beta, read by cuBLAS from the host
        self.one = self.scalars.ctypes.data
        self.zero = self.one + dtype.itemsize

    def __call__(self, a: Any, b: Any, n: int, k: int, m: int,
                 a_t: int, lda: int, b_t: int, ldb: int) -> Any:  # fmt: skip
        """``a`` (n, k) times ``b`` (k, m); ``a_t``, ``b_t``: 1 for a transposed view, and
        the leading dimension of each as it lies."""
        out = self.cupy.empty((n, m), self.dtype)
        self.gemm(self.handle(), b_t, a_t, m, n, k, self.one,
                  b.data.ptr, ldb, a.data.ptr, lda, self.zero, out.data.ptr, m)  # fmt: skip
        return out


def matmul(a: Any, b: Any) -> Any:
    """``a @ b``; for CuPy matrices, by cuBLAS directly where it applies (see the module)."""
    kind = type(a)
    if kind is np.ndarray or type(b) is not kind:
        return a @ b
    key = (kind, a.dtype)
    gemm = _gemms[key] if key in _gemms else _made(key, a)
    if gemm is None or a.ndim != 2 or b.ndim != 2 or b.dtype != a.dtype:
        return a @ b
    (n, k), (k_b, m) = a.shape, b.shape
    if k != k_b or not 0 < min(n, k, m) or max(n, k, m) >= _INT_LIMIT:
        return a @ b  # (CuPy's: its error for shapes that do not match; zeros for empty)
    a_lies, b_lies = _lies(a, k, n), _lies(b, m, k)
    if a_lies is None or b_lies is None:
        return a @ b
    try:
        return gemm(a, b, n, k, m, *a_lies, *b_lies)
    except (TypeError, AttributeError) as error:  # a binding unlike CuPy 14's: CuPy's products
        disabled[a.dtype.name] = f"{type(error).__name__}: {error}"
        _gemms[key] = None
        return a @ b


def _lies(matrix: Any, row_length: int, column_length: int) -> tuple[int, int] | None:
    """How ``matrix`` lies for cuBLAS: (0, its row length) C-contiguous, (1, its column
    length) a transposed view (F-contiguous); None otherwise."""
    flags = matrix.flags  # (made anew at each look, on CuPy's arrays)
    if flags.c_contiguous:
        return 0, row_length
    if flags.f_contiguous:
        return 1, column_length
    return None


def _made(key: tuple[type, np.dtype[Any]], a: Any) -> Any:
    """The direct product for ``a``'s array type and dtype, made at its first use (and
    kept); None where there is none."""
    cupy = sys.modules.get("cupy")
    gemm = None
    if cupy is not None and key[0] is getattr(cupy, "ndarray", None) and key[1] in _DTYPES:
        if key[1] == np.float32 and os.environ.get("CUPY_TF32", "0") not in ("", "0"):
            # CuPy's float32 products then round their inputs to TF32; sgemm would not.
            disabled["float32"] = "CUPY_TF32 is set: CuPy's products, in its precision"
            _gemms[key] = None
            return None
        try:
            from cupy_backends.cuda.libs import cublas  # type: ignore[import-not-found]

            dtype = np.dtype(key[1])
            function = cublas.sgemm if dtype == np.float32 else cublas.dgemm
            gemm = _Gemm(cupy, dtype, function, cupy.cuda.device.get_cublas_handle)
        except (ImportError, AttributeError) as error:  # (no binding, or no handle, where
            # CuPy 14 keeps them: a stand-in for CuPy, or another CuPy)
            disabled[np.dtype(key[1]).name] = f"{type(error).__name__}: {error}"
    _gemms[key] = gemm
    return gemm


# -- products a CUDA graph can record --------------------------------------------------------

# A workspace of the handle's own, which a graph's products then use at each replay (cuBLAS
# advises one of 32 MiB on Hopper for a handle used in a capture; 4 MiB on older cards).
WORKSPACE_BYTES = 32 * 2**20
_DEFAULT_MATH, _TF32_TENSOR_OP_MATH = 0, 3  # cuBLAS's cublasMath_t
# By device: made at the first capture there, kept (every graph made on it reads them).
_own: dict[int, _OwnHandle] = {}
_POINTER, _INT = ctypes.c_void_p, ctypes.c_int
# The C functions a capture calls, and their arguments' types (cublas_api.h).
_SIGNATURES: dict[str, list[Any]] = {
    "cublasCreate_v2": [ctypes.POINTER(ctypes.c_void_p)],  # cublasHandle_t *
    "cublasSetStream_v2": [_POINTER, _POINTER],  # handle, cudaStream_t
    "cublasSetWorkspace_v2": [_POINTER, _POINTER, ctypes.c_size_t],
    "cublasSetMathMode": [_POINTER, _INT],
    # handle, transa, transb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc
    **{name: [_POINTER, _INT, _INT, _INT, _INT, _INT, _POINTER, _POINTER, _INT,
              _POINTER, _INT, _POINTER, _POINTER, _INT]
       for name in ("cublasSgemm_v2", "cublasDgemm_v2")},
}  # fmt: skip


class _OwnHandle:
    """A cuBLAS handle of scratchnn's own, with a workspace of its own, made and called
    through cuBLAS's C library (``library``: a ``ctypes.CDLL``, or a stand-in)."""

    def __init__(self, cupy: Any, library: Any) -> None:
        self.cupy, self.library = cupy, library
        for name, argtypes in _SIGNATURES.items():
            function = getattr(library, name)
            function.argtypes, function.restype = argtypes, ctypes.c_int
        handle = ctypes.c_void_p()
        self._call("cublasCreate_v2", ctypes.pointer(handle))
        self.handle = handle.value
        self.workspace = cupy.empty(WORKSPACE_BYTES, np.uint8)

    def _call(self, name: str, *args: Any) -> None:
        status = getattr(self.library, name)(*args)
        if status != 0:
            raise RuntimeError(f"cuBLAS's {name} returned status {status} (0 is success)")

    def bind(self, stream: Any) -> None:
        """Queue this handle's work on ``stream``, with its own workspace (cuBLAS's
        ``cublasSetStream`` puts back the default one), in the precision CuPy's float32
        products take."""
        self._call("cublasSetStream_v2", self.handle, stream.ptr)
        self._call("cublasSetWorkspace_v2", self.handle, self.workspace.data.ptr, WORKSPACE_BYTES)
        tf32 = os.environ.get("CUPY_TF32", "0") not in ("", "0")
        self._call("cublasSetMathMode", self.handle, _TF32_TENSOR_OP_MATH if tf32 else _DEFAULT_MATH)

    def gemm(self, dtype: np.dtype[Any]) -> _Gemm:
        name = "cublasSgemm_v2" if dtype == np.float32 else "cublasDgemm_v2"

        def gemm(*args: Any) -> None:
            try:
                self._call(name, *args)
            except (TypeError, AttributeError, ctypes.ArgumentError) as error:
                # (matmul takes a TypeError for a binding unlike CuPy's and falls back to
                # CuPy's products, which refuse a capture: the cause is this one)
                raise RuntimeError(f"cuBLAS's {name} by ctypes: {error}") from error

        return _Gemm(self.cupy, dtype, gemm, lambda: self.handle)


def _load_cublas() -> Any:
    """cuBLAS's C library, the one CuPy's binding loaded into this process, by ctypes."""
    from cupy_backends.cuda.libs import cublas

    # CuPy's handle made first: a CuPy that loads cuBLAS at its first use has loaded it.
    version = cublas.getVersion(sys.modules["cupy"].cuda.device.get_cublas_handle())
    with open("/proc/self/maps") as maps:
        names = loaded("libcublas.so", maps.read())
    names.append(f"libcublas.so.{version // 10000}")  # (its version is major * 10000 + ...)
    for name in names:
        with contextlib.suppress(OSError):
            return ctypes.CDLL(name)
    raise RuntimeError(f"cuBLAS's library was not found (tried {', '.join(names)})")


def loaded(prefix: str, maps: str) -> list[str]:
    """The paths of the libraries whose file name starts with ``prefix`` in ``maps`` (the
    text of ``/proc/self/maps``), each once, in the order they appear."""
    paths: list[str] = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        path = fields[5].strip() if len(fields) == 6 else ""
        if os.path.basename(path).startswith(prefix) and path not in paths:
            paths.append(path)
    return paths


@contextlib.contextmanager
def capturing(stream: Any) -> Iterator[None]:
    """Within, float32 and float64 products of CuPy matrices are queued on ``stream`` by
    cuBLAS's C library, on scratchnn's own handle: a CUDA graph captured on ``stream``
    records them (CuPy's binding of cuBLAS raises ``NotImplementedError`` for any call
    while a stream captures). There is one handle a device, for one thread: its
    workspace serves every graph made so, one replayed at a time. Outside, the
    products are as before.

    Raises:
        RuntimeError: where cuBLAS's library cannot be found or refuses a call.
    """
    cupy = sys.modules["cupy"]
    device = cupy.cuda.Device().id
    own = _own.get(device)
    if own is None:
        own = _own[device] = _OwnHandle(cupy, _load_cublas())
    own.bind(stream)
    before = dict(_gemms)
    for dtype in _DTYPES:
        _gemms[(cupy.ndarray, dtype)] = own.gemm(dtype)
    try:
        yield
    finally:
        _gemms.clear()
        _gemms.update(before)
