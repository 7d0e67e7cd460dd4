"""The array module and the dtype rules, in one place.

Every layer asks this module which array library its inputs belong to and which
dtype its computation runs in, so that those rules are written once.

* ``float16``, ``float32`` and ``float64`` arrays keep their dtype.
* Integer and bool arrays become ``float64`` (NumPy's own promotion for
  ``np.exp`` of an integer array), except in layers that keep integer dtypes
  (``Relu``, as the book's code does).
* Complex, object, string and other dtypes raise ``TypeError``.
* ``float16`` is computed in ``float32`` and rounded once at the end, as
  PyTorch's CPU kernels do ("opmath"), so half precision loses no more than
  its final rounding.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

FLOAT_DTYPES: tuple[np.dtype[Any], ...] = (
    np.dtype(np.float16),
    np.dtype(np.float32),
    np.dtype(np.float64),
)


def get_array_module(*arrays: object) -> ModuleType:
    """Return the array module (NumPy, or CuPy for CuPy arrays) of ``arrays``.

    CuPy is imported only when one of the arrays comes from it, so the library
    works without CuPy installed. Mixing NumPy and CuPy arrays raises
    ``TypeError``.

    >>> get_array_module(np.zeros(3)).__name__
    'numpy'
    """
    kinds = {type(a).__module__.split(".")[0] for a in arrays if hasattr(a, "__array__")}
    if "cupy" in kinds:
        if any(isinstance(a, np.ndarray) for a in arrays):
            raise TypeError("cannot mix NumPy and CuPy arrays in one call; move them to one device")
        import cupy

        return cupy
    return np


def as_array(value: object, *, who: str, what: str = "input") -> np.ndarray:
    """Convert an array-like to an array and check that its dtype is numeric.

    ``who`` names the layer in error messages; ``what`` names the argument.
    Bool, integer and float16/32/64 arrays pass; anything else (complex,
    object, string, datetime, ``longdouble``) raises ``TypeError``.
    """
    if type(value) is np.ndarray:  # the common case, without the module look-up
        array = value
    else:
        xp = get_array_module(value)
        array = value if isinstance(value, xp.ndarray) else xp.asarray(value)
    dtype = array.dtype
    if dtype.kind in "biu" or dtype in FLOAT_DTYPES:
        return array
    raise TypeError(
        f"{who}: unsupported {what} dtype {dtype}; "
        "expected float16, float32, float64, an integer or a bool dtype"
    )


def float_dtype_of(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The floating dtype a layer's result has for an input of ``dtype``.

    >>> float_dtype_of(np.dtype("int32")), float_dtype_of(np.dtype("float16"))
    (dtype('float64'), dtype('float16'))
    """
    return dtype if dtype in FLOAT_DTYPES else np.dtype(np.float64)


def compute_dtype_of(dtype: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype in which a result of ``dtype`` is computed: float16 runs in float32.

    >>> compute_dtype_of(np.dtype("float16"))
    dtype('float32')
    """
    result = float_dtype_of(dtype)
    return np.dtype(np.float32) if result == np.float16 else result


def to_compute(x: np.ndarray) -> np.ndarray:
    """``x`` in the dtype its computation runs in (float16 is lifted to float32)."""
    return x.astype(compute_dtype_of(x.dtype), copy=False)
