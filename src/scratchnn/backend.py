"""The array module and the dtype rules, in one place.

Every layer asks this module which array library its inputs belong to and which
dtype its computation runs in, so that those rules are written once.

* ``float16``, ``float32`` and ``float64`` arrays keep their dtype.
* Integer and bool arrays become ``float64`` (the precision of the book's
  code), except in layers that keep integer dtypes (``Relu``, as the book's
  code does).
* Complex, object, string and other dtypes raise ``TypeError``; big-endian
  arrays are converted to the machine's byte order.
* ``float16`` is computed in ``float32`` and rounded at the end, as PyTorch's
  CPU kernels do ("opmath"). That is a second rounding: a float32 result
  within its own rounding of a float16 midpoint can round the wrong way, so
  the sigmoid and erfc (``scratchnn.functional``, and the ``Sigmoid`` layer)
  go through ``float64``, where that cannot happen, and are correctly rounded.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Any

import numpy as np

_FLOAT32, _FLOAT64 = np.dtype(np.float32), np.dtype(np.float64)
FLOAT_DTYPES: tuple[np.dtype[Any], ...] = (
    np.dtype(np.float16),
    np.dtype(np.float32),
    np.dtype(np.float64),
)


DEVICES = ("cpu", "cuda")

_INSTALL_HINT = "pip install scratchnn[gpu]"


def _module_kind(array: object) -> str:
    """The top-level package of an array's type ("numpy", "cupy", ...)."""
    return type(array).__module__.split(".")[0]


def get_array_module(*arrays: object) -> ModuleType:
    """Return the array module (NumPy, or CuPy for CuPy arrays) of ``arrays``.

    CuPy is imported only when one of the arrays comes from it, so the library
    works without CuPy installed. Mixing NumPy and CuPy arrays raises
    ``TypeError``; Python numbers and NumPy scalars go with either.

    >>> get_array_module(np.zeros(3)).__name__
    'numpy'
    """
    # A loop, not a set of kinds: this runs a few dozen times a training step.
    for a in arrays:
        if type(a) is not np.ndarray and _module_kind(a) == "cupy" and hasattr(a, "__array__"):
            break
    else:
        return np
    if len(arrays) > 1 and any(isinstance(a, np.ndarray) for a in arrays):
        raise TypeError(
            "cannot mix NumPy (cpu) and CuPy (cuda) arrays in one call; move them to one "
            "device first, e.g. with scratchnn.backend.to_device(array, 'cuda') or "
            "network.to('cuda')"
        )
    return sys.modules["cupy"]  # imported: one of its arrays is here


def may_share_memory(a: Any, b: Any) -> bool:
    """``np.may_share_memory(a, b)`` of two arrays of one device; for CuPy arrays CuPy's own,
    called directly (through NumPy, its dispatch to CuPy costs more than the check)."""
    if type(a) is np.ndarray:
        return bool(np.may_share_memory(a, b))
    return bool(get_array_module(a).may_share_memory(a, b))


def cupy_array_type() -> Any:
    """``cupy.ndarray`` where CuPy is imported, else None: ``type(x) is cupy_array_type()``
    tells a CuPy array in a dictionary look-up (a layer's forward asks it on every call).
    Where no CuPy array can exist yet, CuPy is not imported for the answer."""
    cupy = sys.modules.get("cupy")
    return None if cupy is None else getattr(cupy, "ndarray", None)


class DeviceUnavailableError(RuntimeError):
    """Device "cuda" was asked for, but CuPy or a CUDA GPU is missing."""


def import_cupy() -> ModuleType:
    """CuPy, imported on first use, once a CUDA GPU is known to answer.

    Raises ``DeviceUnavailableError`` (a ``RuntimeError``) saying how to install CuPy when it is missing, or
    that no GPU is visible when CuPy is there but CUDA finds no device.
    """
    try:
        import cupy
    except ImportError as error:
        raise DeviceUnavailableError(
            f"device 'cuda' needs CuPy and an NVIDIA GPU; install it with `{_INSTALL_HINT}` "
            f"(import cupy failed: {error})"
        ) from None
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as error:  # CuPy raises its own CUDA error types when no driver answers
        raise DeviceUnavailableError(
            f"device 'cuda': CuPy is installed but CUDA found no usable GPU ({error}); "
            f"see `{_INSTALL_HINT}` and the NVIDIA driver"
        ) from None
    if count < 1:
        raise DeviceUnavailableError("device 'cuda': CuPy is installed but CUDA sees no GPU")
    return cupy


def check_device(device: str) -> str:
    """``device`` if it is "cpu" or "cuda", else ``ValueError``."""
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose from {', '.join(DEVICES)}")
    return device


def device_of(array: object) -> str:
    """ "cuda" for a CuPy array, "cpu" for anything else (NumPy arrays, numbers).

    >>> device_of(np.zeros(2))
    'cpu'
    """
    return "cuda" if _module_kind(array) == "cupy" else "cpu"


def is_array(value: object) -> bool:
    """True for a NumPy or CuPy array (not for scalars, lists or dtypes)."""
    return isinstance(value, np.ndarray) or (
        _module_kind(value) == "cupy" and hasattr(value, "shape")
    )


def to_device(array: Any, device: str) -> Any:
    """``array`` on ``device`` ("cpu": a NumPy array; "cuda": a CuPy array).

    An array already there is returned as it is, not copied; anything that is
    not an array (a number, None) is returned unchanged. "cuda" without CuPy or
    a GPU raises ``RuntimeError`` saying how to install it.

    >>> x = np.arange(3.0)
    >>> to_device(x, "cpu") is x
    True
    """
    check_device(device)
    if not is_array(array):
        return array
    if device_of(array) == device:
        return array
    if device == "cpu":
        return get_array_module(array).asnumpy(array)
    return import_cupy().asarray(array)


def to_host(array: Any) -> Any:
    """``to_device(array, "cpu")``: a NumPy array for checkpoints, printing and plotting."""
    return to_device(array, "cpu")


def move_arrays(obj: object, device: str, moved: dict[int, Any] | None = None) -> None:
    """Move every array attribute of ``obj`` to ``device``, in place.

    Arrays held directly (``W``, ``dW``, kept caches) are rebound to their moved
    copies, and so are those in a tuple; dicts and lists of arrays (an
    optimiser's ``v``, ``m``) are updated in place. Objects inside ``obj`` are
    not followed: a layer that holds layers moves them in its own ``to``. It is
    what ``Layer.to`` and ``Optimizer.to`` call; move a layer with its ``to``.

    An array held at two places (``self.W`` and ``self.params["W"]``) moves once
    and stays one array; ``moved`` (by the original's id) carries that across
    several objects moved together (it holds each original beside its copy).
    """
    if check_device(device) == "cuda":
        import_cupy()  # a clear error without CuPy, also for an object with no arrays yet
    moved = {} if moved is None else moved

    def move(array: Any) -> Any:
        if id(array) not in moved:
            # The original is kept beside its copy: while it lives, no other array has its id.
            view = _moved_view(array, moved)
            moved[id(array)] = (array, to_device(array, device) if view is None else view)
        return moved[id(array)][1]

    for name, value in list(_attributes(obj).items()):
        if is_array(value):
            setattr(obj, name, move(value))
        elif isinstance(value, dict):
            for key, item in list(value.items()):
                if is_array(item):
                    value[key] = move(item)
        elif type(value) is list:
            for i, item in enumerate(value):  # in place: whoever holds the list sees it
                if is_array(item):
                    value[i] = move(item)
        elif type(value) is tuple and any(is_array(item) for item in value):
            setattr(obj, name, tuple(move(v) if is_array(v) else v for v in value))


def _attributes(obj: object) -> dict[str, Any]:
    """``obj``'s attributes: its ``__dict__``, or what its ``__slots__`` hold."""
    found = getattr(obj, "__dict__", None)
    if found is not None:
        return dict(found)
    names = []
    for cls in type(obj).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        names += [slots] if isinstance(slots, str) else list(slots)
    return {name: getattr(obj, name) for name in names if hasattr(obj, name)}


def _moved_view(array: Any, moved: dict[int, tuple[Any, Any]]) -> Any:
    """``array``'s copy made from an array moved already, where ``array`` views the same
    elements (``W[:]``) or its transpose (the sequel's tied ``W.T``); else None."""
    from scratchnn.parameters import layout  # (it reads addresses of both modules' arrays)

    for original, copy in moved.values():
        if type(original) is type(array) and original.dtype == array.dtype:
            found = layout(array, original)
            if found is not None:
                if copy is original:  # not moved (already there): the view stays itself
                    return array
                return copy if found == "same" else copy.T
    return None


def as_result(value: Any) -> Any:
    """An operation's result as an array of its own module.

    NumPy turns 0-d results into scalars; those become 0-d arrays. CuPy arrays
    pass unchanged (``np.asarray`` would try to copy them to the host).
    """
    if type(value) is np.ndarray:
        return value
    return np.asarray(value) if get_array_module(value) is np else value


def as_array(value: object, *, who: str, what: str = "input") -> np.ndarray:
    """Convert an array-like to an array and check that its dtype is numeric.

    ``who`` names the layer in error messages; ``what`` names the argument.
    Bool, integer and float16/32/64 arrays pass (in the machine's byte order:
    big-endian ones are converted); anything else (complex, object, string,
    datetime, ``longdouble``) raises ``TypeError``.
    """
    if type(value) is np.ndarray:  # the common case, without the module look-up
        array = value
    elif isinstance(value, np.ndarray):  # a subclass: np.memmap, np.matrix, a masked array
        if isinstance(value, np.ma.MaskedArray):
            # np.asarray would drop the mask, and the masked entries would count silently.
            raise TypeError(
                f"{who}: {what} is a masked array; fill it first (x.filled(value)) or "
                "pass its compressed values"
            )
        # A matrix's operators are not the arrays' (* multiplies matrices): its plain 2-d
        # values. Other subclasses (np.memmap) stay the very array the caller gave.
        array = np.asarray(value) if isinstance(value, np.matrix) else value
    else:
        xp = get_array_module(value)
        array = value if isinstance(value, xp.ndarray) else _rectangular(xp, value, who, what)
    dtype = array.dtype
    if not dtype.isnative and dtype.kind in "biuf":
        # Big-endian data (a file's ">f4"): the same numbers in the machine's byte order,
        # which the kernels and the bit tricks of the float paths assume.
        array = array.astype(dtype.newbyteorder("="))
        dtype = array.dtype
    if dtype.kind in "biu" or dtype in FLOAT_DTYPES:
        return array
    raise TypeError(
        f"{who}: unsupported {what} dtype {dtype}; "
        "expected float16, float32, float64, an integer or a bool dtype"
    )


def _rectangular(xp: Any, value: object, who: str, what: str) -> Any:
    """``xp.asarray(value)``, with a ragged nested list named as the caller's mistake."""
    try:
        return xp.asarray(value)
    except ValueError as error:
        # NumPy's "inhomogeneous shape" message names neither the layer nor the argument.
        raise ValueError(f"{who}: {what} is not a rectangular array: {error}") from None


def float_dtype_of(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The floating dtype a layer's result has for an input of ``dtype`` (in the
    machine's byte order: a big-endian ``>f4`` gives float32).

    >>> float_dtype_of(np.dtype("int32")), float_dtype_of(np.dtype("float16"))
    (dtype('float64'), dtype('float16'))
    """
    native = dtype.newbyteorder("=")
    return native if native in FLOAT_DTYPES else np.dtype(np.float64)


def compute_dtype_of(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype in which a result of ``dtype`` is computed: float16 runs in float32.

    >>> compute_dtype_of(np.dtype("float16"))
    dtype('float32')
    """
    result = float_dtype_of(dtype)
    return np.dtype(np.float32) if result == np.float16 else result


def to_compute(x: np.ndarray) -> np.ndarray:
    """``x`` in the dtype its computation runs in (float16 is lifted to float32)."""
    if x.dtype == _FLOAT32 or x.dtype == _FLOAT64:  # the common case, returned as it is
        return x
    return x.astype(compute_dtype_of(x.dtype), copy=False)
