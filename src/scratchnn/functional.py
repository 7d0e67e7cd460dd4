"""Numerically stable element-wise functions that several layers share.

Plain NumPy functions, no state: the layers call these and keep what their
``backward`` needs.
"""

from __future__ import annotations

import math

import numpy as np

_erfc = np.frompyfunc(math.erfc, 1, 1)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function 1 / (1 + exp(-z)), without overflow for any finite z.

    With e = exp(-|z|), which lies in (0, 1] and cannot overflow:
    sigmoid(z) = 1 / (1 + e) for z >= 0 and e / (1 + e) for z < 0. Both forms
    are accurate to a few units in the last place, including the far negative
    tail where the textbook form 1 / (1 + exp(-z)) overflows.

    >>> print(sigmoid(np.array([-40.0, 0.0, 40.0])))
    [4.24835426e-18 5.00000000e-01 1.00000000e+00]
    """
    z = np.asarray(z)
    if z.dtype.kind != "f":
        z = z.astype(np.float64)
    # In place, one scratch array and the result: each temporary of NumPy's
    # expression style would cost a pass over memory and a fresh allocation.
    e = np.empty_like(z)
    np.abs(z, out=e)
    np.negative(e, out=e)
    np.exp(e, out=e)  # exp(-|z|) in (0, 1]: it cannot overflow
    y = np.add(e, 1.0, out=np.empty_like(z))
    # The numerator, 1 where z >= 0 and e elsewhere, is max(e, z >= 0) since e <= 1:
    # np.where would take a branch per element, mispredicted half the time.
    np.maximum(e, np.greater_equal(z, 0), out=e)
    return np.divide(e, y, out=y)


def softplus(z: np.ndarray) -> np.ndarray:
    """log(1 + exp(z)) = max(z, 0) + log1p(exp(-|z|)), stable for any finite z.

    >>> print(softplus(np.array([-800.0, 0.0, 800.0])))
    [0.00000000e+00 6.93147181e-01 8.00000000e+02]
    """
    return np.asarray(np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z))))


def erfc(z: np.ndarray) -> np.ndarray:
    """The complementary error function, element-wise, from the C library's ``erfc``.

    NumPy has no ``erf``; ``math.erfc`` is exact to about one unit in the last
    place, and keeps its relative accuracy in the tails where 1 - erf(z)
    would cancel.

    >>> print(erfc(np.array([0.0, 3.0])))
    [1.0000000e+00 2.2090497e-05]
    """
    return np.asarray(_erfc(z), dtype=z.dtype)
