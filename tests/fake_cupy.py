"""A stand-in for CuPy on a machine without a GPU, strict where CuPy is strict.

Its arrays wrap NumPy arrays but behave as CuPy's do towards NumPy code:
their type lives in a module named ``cupy``; ``np.asarray`` of one raises
``TypeError`` (CuPy forbids implicit copies to the host); a ufunc or array
function that mixes one with a NumPy array raises ``TypeError``; a NumPy
ufunc that CuPy cannot run (``np.frompyfunc``'s) raises, as do the ufunc
methods CuPy lacks (``np.maximum.reduce``); the ``flags`` are
read-only. NumPy functions called on them dispatch to this module (as CuPy's
``__array_function__`` does), and results stay fake arrays.

So a test that runs the library on these arrays finds, without a GPU, the code
that hard-codes NumPy where CuPy would fail: creation functions without the
array module, ``np.asarray`` of an input, read-only flags, mixed devices.
What it cannot find: functions CuPy lacks or whose keywords differ. Without
``kernels`` it has no ``RawKernel``, so the library takes its path of array
calls; with it, ``fake_cuda`` runs the CUDA kernels on the CPU.
"""

from __future__ import annotations

import ctypes
import sys
import types
from typing import Any

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

# The keywords of NumPy functions that CuPy's versions do not take.
_UNSUPPORTED_KEYWORDS = {"unpackbits": {"count"}}

# The ufunc methods CuPy has, and for which ufuncs (its "Universal functions" page:
# reduce and accumulate for add and multiply only; np.maximum.reduce raises there).
_UFUNC_METHODS = {
    "reduce": {"add", "multiply"},
    "accumulate": {"add", "multiply"},
    "reduceat": {"add"},
    "at": {"add", "subtract", "maximum", "minimum"},
}


# Each read of a device value on the host (``get``, ``float``, ``bool``, ``item``...):
# on a GPU each one waits for the card, so tests count them.
transfers: list[str] = []

# While a fake stream captures a CUDA graph (``install_streams``): the device work
# recorded for its replays (kernel launches, cuBLAS's products by its library), else None.
recording: list[Any] | None = None


def record(work: Any, *keep: Any) -> bool:
    """Record ``work`` (a function of no arguments) for the graph being captured, and
    keep ``keep`` alive with it; False, recording nothing, where no stream captures."""
    if recording is None:
        return False
    recording.append((work, keep))
    return True


def _not_while_capturing(what: str) -> None:
    """The fake runs its array operations at once; a graph would run them at each
    replay. So an operation a capture cannot record here is refused while one runs."""
    if recording is not None:
        raise RuntimeError(f"fake cupy: {what} while a stream captures a graph (it would run "
                           "once now, not at each replay)")  # fmt: skip


# What a capture may call: allocations (a graph's arrays are made while it is captured)
# and what makes views; none of them computes on the device.
_CAPTURE_SAFE = {"empty", "empty_like", "reshape", "view", "transpose", "ravel", "dtype"}
_VIEW_INDICES = (int, slice, type(None), type(Ellipsis))


class _Flags:
    """CuPy's ``ndarray.flags``: three read-only attributes and no ``writeable``, so that
    ``flags.writeable = False`` raises ``AttributeError`` here as it does there."""

    __slots__ = ("c_contiguous", "f_contiguous", "owndata")

    def __init__(self, c_contiguous: bool, f_contiguous: bool) -> None:
        object.__setattr__(self, "c_contiguous", c_contiguous)
        object.__setattr__(self, "f_contiguous", f_contiguous)
        object.__setattr__(self, "owndata", True)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"attribute {name!r} of cupy flags is not writable")


class ndarray(NDArrayOperatorsMixin):
    """A NumPy array pretending to live on a GPU."""

    __slots__ = ("_a",)

    def __init__(self, array: np.ndarray) -> None:
        assert type(array) is np.ndarray
        self._a = array

    # -- what CuPy forbids -------------------------------------------------------------

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        raise TypeError(
            "Implicit conversion to a NumPy array is not allowed. "
            "Please use `.get()` to construct a NumPy array explicitly."
        )

    @property
    def flags(self) -> _Flags:
        flags = self._a.flags
        return _Flags(flags.c_contiguous, flags.f_contiguous)

    # -- dispatch, as CuPy's ---------------------------------------------------------

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        _not_while_capturing(f"the ufunc {ufunc.__name__}")
        if getattr(np, ufunc.__name__, None) is not ufunc:
            raise TypeError(f"fake cupy: cannot run the ufunc {ufunc.__name__!r} on the GPU")
        if method in _UFUNC_METHODS and ufunc.__name__ not in _UFUNC_METHODS[method]:
            raise NotImplementedError(f"fake cupy: {ufunc.__name__}.{method} is not on CuPy")
        if "out" in kwargs:
            kwargs["out"] = tuple(_unwrap(o) for o in kwargs["out"])
        result = getattr(ufunc, method)(*(_unwrap(i) for i in inputs), **kwargs)
        return _wrap(result)

    def __array_function__(self, func: Any, types_: Any, args: Any, kwargs: Any) -> Any:
        if func.__name__ not in _CAPTURE_SAFE:
            _not_while_capturing(f"numpy.{func.__name__}")
        bad = _UNSUPPORTED_KEYWORDS.get(func.__name__, set()) & set(kwargs)
        if bad:
            raise TypeError(f"fake cupy: {func.__name__} takes no {sorted(bad)} on CuPy")
        return _wrap(func(*_unwrap(args), **_unwrap(kwargs)))

    # -- the array's own interface -----------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            # NumPy's protocols (__array_interface__, __array_struct__) would let
            # np.asarray read the host array behind the fake, which CuPy forbids.
            raise AttributeError(name)
        if name in ("item", "tolist"):
            transfers.append(name)
        attribute = getattr(self._a, name)
        if callable(attribute):
            if name == "astype":  # to its own dtype without a copy: the array itself
                return self._astype
            if name == "copy" and recording is not None:  # a device copy, recorded
                return self._recorded_copy
            if name not in _CAPTURE_SAFE:
                _not_while_capturing(f"ndarray.{name}")
            return lambda *a, **k: _wrap(attribute(*_unwrap(a), **_unwrap(k)))
        return _wrap(attribute)

    def _recorded_copy(self, order: str = "C") -> Any:
        source, copied = self._a, np.empty_like(self._a, order=order)
        record(lambda: np.copyto(copied, source), source, copied)
        return _wrap(copied)

    def _astype(self, dtype: Any, copy: bool = True, **kwargs: Any) -> Any:
        if copy or np.dtype(dtype) != self._a.dtype or kwargs:
            _not_while_capturing("ndarray.astype")
        return _wrap(self._a.astype(dtype, copy=copy, **kwargs))

    def __getitem__(self, index: Any) -> Any:
        parts = index if type(index) is tuple else (index,)
        if not all(type(i) in _VIEW_INDICES for i in parts):  # an array's gather: the device's
            _not_while_capturing("indexing by an array")
        return _wrap(self._a[_unwrap(index)])

    def __setitem__(self, index: Any, value: Any) -> None:
        _not_while_capturing("an assignment into an array")
        self._a[_unwrap(index)] = _unwrap(value)

    def __len__(self) -> int:
        return len(self._a)

    def __float__(self) -> float:
        _not_while_capturing("a read to the host")
        transfers.append("__float__")
        return float(self._a)

    def __int__(self) -> int:
        transfers.append("__int__")
        return int(self._a)

    def __index__(self) -> int:
        transfers.append("__index__")
        return self._a.__index__()

    def __bool__(self) -> bool:
        _not_while_capturing("a read to the host")
        transfers.append("__bool__")
        return bool(self._a)

    def __repr__(self) -> str:
        return f"fake_cupy.{self._a!r}"

    def __str__(self) -> str:  # CuPy prints the values, read from the device
        transfers.append("__str__")
        return str(self._a)

    def __format__(self, spec: str) -> str:
        transfers.append("__format__")
        return format(self._a, spec)

    def get(self) -> np.ndarray:
        _not_while_capturing("a read to the host")
        transfers.append("get")
        return self._a.copy()

    @property
    def data(self) -> types.SimpleNamespace:
        """CuPy's memory pointer: ``.ptr`` is the address (alignment checks read it)."""
        return types.SimpleNamespace(ptr=self._a.ctypes.data)

    @property
    def T(self) -> Any:
        return _wrap(self._a.T)


ndarray.__module__ = "cupy"


def _unwrap(value: Any) -> Any:
    """The NumPy arrays inside; a plain NumPy array here is a mix, which CuPy refuses."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, np.ndarray):
        raise TypeError(
            "fake cupy: a NumPy array was mixed with CuPy arrays "
            f"(shape {value.shape}, dtype {value.dtype})"
        )
    if isinstance(value, (list, tuple)):
        return type(value)(_unwrap(v) for v in value)
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    return value


def _wrap(value: Any) -> Any:
    if type(value) is np.ndarray:
        return ndarray(value)
    if isinstance(value, np.generic):  # CuPy's reductions and indexing give 0-d arrays
        return ndarray(np.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def make_module() -> types.ModuleType:
    """A fresh ``cupy`` module (and ``cupyx.scipy.special``) backed by NumPy."""
    module = types.ModuleType("cupy")
    module.ndarray = ndarray  # type: ignore[attr-defined]
    module.__fake__ = True  # type: ignore[attr-defined]

    def asarray(value: Any, dtype: Any = None) -> ndarray:
        if isinstance(value, ndarray):
            return value if dtype is None else ndarray(value._a.astype(dtype, copy=False))
        return ndarray(np.array(value, dtype=dtype))

    def ascontiguousarray(value: Any, dtype: Any = None) -> ndarray:
        if not isinstance(value, ndarray):  # CuPy's takes only its own arrays
            raise TypeError(f"fake cupy: ascontiguousarray takes a cupy.ndarray, got {type(value)}")
        return ndarray(np.ascontiguousarray(_unwrap(asarray(value, dtype))))

    def asnumpy(value: Any) -> np.ndarray:
        return value.get() if isinstance(value, ndarray) else np.asarray(value)

    module.asarray = asarray  # type: ignore[attr-defined]
    module.array = lambda value, dtype=None, copy=True: ndarray(  # type: ignore[attr-defined]
        np.array(_unwrap(value) if isinstance(value, ndarray) else value, dtype=dtype)
    )
    module.ascontiguousarray = ascontiguousarray  # type: ignore[attr-defined]
    module.asnumpy = asnumpy  # type: ignore[attr-defined]
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1)
    module.cuda = types.SimpleNamespace(runtime=runtime)  # type: ignore[attr-defined]

    def missing(name: str) -> Any:
        attribute = getattr(np, name)
        if name == "may_share_memory":  # CuPy's answers on the host, from the arrays' bounds
            return lambda a, b: bool(np.may_share_memory(_unwrap(a), _unwrap(b)))
        if isinstance(attribute, np.ufunc):
            return attribute  # dispatches back through __array_ufunc__
        if callable(attribute) and not isinstance(attribute, type):

            def call(*a: Any, **k: Any) -> Any:
                if name not in _CAPTURE_SAFE:
                    _not_while_capturing(f"cupy.{name}")
                result = _wrap(attribute(*_unwrap(a), **_unwrap(k)))
                # An array made during a capture is the graph's, as its memory pool's block
                # is on a card: alive while the graph is, whatever Python drops.
                record(lambda: None, result)
                return result

            return call
        return attribute

    module.__getattr__ = missing  # type: ignore[attr-defined]
    return module


def make_cupyx() -> tuple[types.ModuleType, types.ModuleType, types.ModuleType]:
    import math

    cupyx = types.ModuleType("cupyx")
    scipy = types.ModuleType("cupyx.scipy")
    special = types.ModuleType("cupyx.scipy.special")
    erfc = np.frompyfunc(math.erfc, 1, 1)
    special.erfc = lambda z: ndarray(  # type: ignore[attr-defined]
        np.asarray(erfc(z._a), dtype=z._a.dtype)
    )
    cupyx.scipy = scipy  # type: ignore[attr-defined]
    scipy.special = special  # type: ignore[attr-defined]
    return cupyx, scipy, special


def install(monkeypatch: Any, kernels: bool = False) -> types.ModuleType:
    """Put a fake ``cupy`` (and ``cupyx``) in ``sys.modules`` for one test; return it.

    With ``kernels``, it also runs CUDA kernels, compiled for the CPU (``fake_cuda``).
    """
    module = make_module()
    # The library caches compiled kernels per process: fresh caches for this test, so that
    # no fake kernel reaches a later test on real CuPy, nor a real one this test
    # (monkeypatch puts the real caches back afterwards).
    from scratchnn.kernels import bias, cross_entropy, cuda, products

    monkeypatch.setattr(products, "_gemms", {})
    monkeypatch.setattr(products, "disabled", {})
    monkeypatch.setattr(products, "_own", {})
    monkeypatch.setattr(sys.modules[__name__], "recording", None)
    monkeypatch.setattr(bias, "_kernels", {})
    monkeypatch.setattr(cross_entropy, "_kernels", {})
    monkeypatch.setattr(cuda, "_kernels", {})
    if kernels:
        import fake_cuda

        fake_cuda.install(module)
        install_cublas(monkeypatch, module)
        install_streams(module)
    cupyx, scipy, special = make_cupyx()
    monkeypatch.setitem(sys.modules, "cupy", module)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx)
    monkeypatch.setitem(sys.modules, "cupyx.scipy", scipy)
    monkeypatch.setitem(sys.modules, "cupyx.scipy.special", special)
    return module


def _column_major(address: int, dtype: np.dtype[Any], rows: int, cols: int, lead: int) -> np.ndarray:
    """The column-major matrix of ``rows`` x ``cols`` (leading dimension ``lead``) that
    lies at ``address``, as cuBLAS reads it: a view, so a write is cuBLAS's."""
    memory = (np.ctypeslib.as_ctypes_type(dtype) * (lead * cols)).from_address(address)
    return np.ctypeslib.as_array(memory).reshape(cols, lead).T[:rows]


def _gemm(dtype: Any, own_handle: int = 1) -> Any:
    """cuBLAS's ``sgemm``/``dgemm`` as CuPy binds them (the handle, the operations 0 = N
    and 1 = T, sizes, the scalars and the matrices by address), computed by NumPy on
    the arrays at those addresses: column-major ``C = op(A) op(B)``, scaled as asked.
    Any other handle than ``own_handle`` is refused. ``gemm.prepare(*args)`` checks the
    call and reads the scalars now, and returns the product to compute later."""
    dtype = np.dtype(dtype)
    scalar = np.ctypeslib.as_ctypes_type(dtype)

    def prepare(handle: int, transa: int, transb: int, m: int, n: int, k: int, alpha: int,
                A: int, lda: int, B: int, ldb: int, beta: int, C: int, ldc: int) -> Any:  # fmt: skip
        if handle != own_handle or transa not in (0, 1) or transb not in (0, 1):
            raise ValueError(f"fake cuBLAS: handle {handle}, operations {transa}, {transb}")
        for lead, rows in ((lda, k if transa else m), (ldb, n if transb else k), (ldc, m)):
            if lead < max(1, rows):  # as cuBLAS's CUBLAS_STATUS_INVALID_VALUE
                raise ValueError(f"fake cuBLAS: leading dimension {lead} < {rows}")
        one, zero = scalar.from_address(alpha).value, scalar.from_address(beta).value

        def compute() -> None:
            a = _column_major(A, dtype, *((k, m) if transa else (m, k)), lda)
            b = _column_major(B, dtype, *((n, k) if transb else (k, n)), ldb)
            c = _column_major(C, dtype, m, n, ldc)
            product = (a.T if transa else a) @ (b.T if transb else b)
            c[...] = one * product + (zero * c if zero else 0)

        return compute

    def gemm(*args: Any) -> None:
        if own_handle == 1 and recording is not None:  # CuPy's binding, as CuPy 14's refuses
            raise NotImplementedError(
                "calling cuBLAS API during stream capture is currently unsupported"
            )
        prepare(*args)()

    gemm.prepare = prepare  # type: ignore[attr-defined]
    return gemm


def install_cublas(monkeypatch: Any, module: types.ModuleType) -> None:
    """Give the fake ``cupy`` CuPy's binding of cuBLAS (``sgemm``, ``dgemm``) and a handle,
    computed on the CPU (what ``scratchnn.kernels.products`` calls)."""
    cublas = types.ModuleType("cupy_backends.cuda.libs.cublas")
    cublas.sgemm = _gemm(np.float32)  # type: ignore[attr-defined]
    cublas.dgemm = _gemm(np.float64)  # type: ignore[attr-defined]
    libs = types.ModuleType("cupy_backends.cuda.libs")
    libs.cublas = cublas  # type: ignore[attr-defined]
    for name in ("cupy_backends", "cupy_backends.cuda"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs", libs)
    monkeypatch.setitem(sys.modules, "cupy_backends.cuda.libs.cublas", cublas)
    module.cuda.device = types.SimpleNamespace(get_cublas_handle=lambda: 1)  # type: ignore[attr-defined]
    from scratchnn.kernels import products

    library = CublasLibrary()
    monkeypatch.setattr(products, "_load_cublas", lambda: library)
    module.cublas_library = library  # type: ignore[attr-defined]  (for the tests to look at)


class CublasLibrary:
    """cuBLAS's C library as ``ctypes`` would give it (``scratchnn.kernels.products``'
    products for a capture): functions returning a status (0 = success), a handle
    created through a pointer, a stream and a workspace set on it; its products are
    :func:`_gemm`'s. It records each product with the stream and workspace it ran with,
    and refuses (status 7, CUBLAS_STATUS_INVALID_VALUE) a product before both are set."""

    HANDLE = 0x5EED

    def __init__(self) -> None:
        self.handles = 0
        self.stream: int | None = None
        self.workspace: tuple[int, int] | None = None
        self.math_mode = 0
        self.products: list[tuple[str, int | None, tuple[int, int] | None]] = []

        def create(pointer: Any) -> int:
            self.handles += 1
            pointer.contents.value = self.HANDLE
            return 0

        def set_stream(handle: int, stream: int) -> int:
            # (cuBLAS's own: setting a stream puts back the default workspace)
            self.stream, self.workspace = stream, None
            return 0 if handle == self.HANDLE else 1

        def set_workspace(handle: int, address: int, size: int) -> int:
            self.workspace = (address, size)
            return 0 if handle == self.HANDLE and size > 0 else 7

        def set_math_mode(handle: int, mode: int) -> int:
            self.math_mode = mode
            return 0 if handle == self.HANDLE else 1

        def product(name: str, dtype: Any) -> Any:
            compute = _gemm(dtype, own_handle=self.HANDLE)

            def gemm(*args: Any) -> int:
                if self.stream is None or self.workspace is None:
                    return 7
                # cuBLAS checks its arguments at the call; a capture records the product,
                # its scalars read now, from the host (cuBLAS's host pointer mode)
                try:
                    work = compute.prepare(*args)
                except ValueError:
                    return 7
                if not record(work):
                    work()
                self.products.append((name, self.stream, self.workspace))
                return 0

            return gemm

        self.cublasCreate_v2 = _CFunction(create)
        self.cublasSetStream_v2 = _CFunction(set_stream)
        self.cublasSetWorkspace_v2 = _CFunction(set_workspace)
        self.cublasSetMathMode = _CFunction(set_math_mode)
        self.cublasSgemm_v2 = _CFunction(product("sgemm", np.float32))
        self.cublasDgemm_v2 = _CFunction(product("dgemm", np.float64))


class _CFunction:
    """A function of a ``ctypes.CDLL`` as ctypes calls it: with ``argtypes`` set, each
    argument goes through its type's ``from_param`` (a wrong type is
    ``ctypes.ArgumentError``), and too few is a TypeError, as ctypes's "this function
    takes at least N arguments". Too many is one here too, where ctypes would pass the
    extra ones to a C function that reads none of them: stricter, never looser."""

    def __init__(self, function: Any) -> None:
        self.function = function
        self.argtypes: list[Any] | None = None
        self.restype: Any = None

    def __call__(self, *args: Any) -> Any:
        if self.argtypes is None:
            return self.function(*args)
        if len(args) != len(self.argtypes):
            raise TypeError(f"this function takes {len(self.argtypes)} arguments "
                            f"({len(args)} given)")  # fmt: skip
        for i, (kind, arg) in enumerate(zip(self.argtypes, args), start=1):
            try:
                kind.from_param(arg)
            except TypeError as error:
                raise ctypes.ArgumentError(f"argument {i}: {error}") from None
        return self.function(*args)


class Graph:
    """A captured CUDA graph: the recorded work, run again at each ``launch``."""

    def __init__(self, work: list[Any]) -> None:
        self.work = work

    def launch(self, stream: Any = None) -> None:
        _not_while_capturing("a graph's launch")
        for work, _ in self.work:
            work()


class Stream:
    """CuPy's ``cuda.Stream`` as far as a capture needs it: ``ptr``, ``with stream:``,
    ``begin_capture`` and ``end_capture`` (which records the kernels and products
    launched meanwhile, refusing what the fake would run at once) and ``synchronize``."""

    made = 0

    def __init__(self, non_blocking: bool = False, null: bool = False) -> None:
        Stream.made += 1
        self.ptr = 0 if null else 0x5000 + Stream.made

    def __enter__(self) -> Stream:
        _streams.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _streams.pop()

    def synchronize(self) -> None:
        _not_while_capturing("a wait for a stream")

    def begin_capture(self) -> None:
        global recording
        if self.ptr == 0:  # as CUDA: the legacy default stream cannot capture
            raise RuntimeError("fake cupy: cannot capture on the null stream")
        _not_while_capturing("a second capture")
        recording = []

    def end_capture(self) -> Graph:
        global recording
        if recording is None:
            raise RuntimeError("fake cupy: end_capture without begin_capture")
        graph, recording = Graph(recording), None
        return graph


_streams: list[Stream] = [Stream(null=True)]


class MemoryPool:
    """A memory pool of its own: here every allocation is NumPy's, so ``malloc`` is only
    what ``cupy.cuda.using_allocator`` is given (it is never called)."""

    def malloc(self, size: int) -> None:
        raise AssertionError("fake cupy: using_allocator is a no-op here")


def install_streams(module: types.ModuleType) -> None:
    """Give the fake ``cupy`` streams that capture CUDA graphs (:class:`Stream`)."""
    import contextlib

    cuda = module.cuda  # type: ignore[attr-defined]
    cuda.Stream = Stream
    cuda.MemoryPool = MemoryPool
    cuda.get_current_stream = lambda: _streams[-1]
    cuda.Device = lambda device=None: types.SimpleNamespace(id=0, synchronize=lambda: None)
    cuda.using_allocator = lambda allocator=None: contextlib.nullcontext()
