"""Numerically stable element-wise functions that several layers share.

Plain NumPy functions, no state: the layers call these and keep what their
``backward`` needs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from scratchnn import _buffers, _fused, kernels
from scratchnn._threads import flat, run_blocked
from scratchnn.backend import as_array, as_result


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function 1 / (1 + exp(-z)), without overflow for any finite z.

    With e = exp(-|z|), which lies in (0, 1] and cannot overflow:
    sigmoid(z) = 1 / (1 + e) for z >= 0 and e / (1 + e) for z < 0. Both forms
    are accurate to a few units in the last place, including the far negative
    tail where the textbook form 1 / (1 + exp(-z)) overflows.

    >>> print(sigmoid(np.array([-40.0, 0.0, 40.0])))
    [4.24835426e-18 5.00000000e-01 1.00000000e+00]
    """
    z = _float_argument(z, "sigmoid")
    if z.dtype == np.float16:
        # In float64, then rounded once: a float32 sigmoid near 0.5 can round onto a
        # float16 midpoint (0.5 + x/4 loses its -x**3/48) and then round the wrong way.
        return sigmoid(z.astype(np.float64)).astype(np.float16)
    if type(z) is not np.ndarray:
        return kernels.run("sigmoid_forward", z)[0]  # CuPy: one fused kernel
    out = _buffers.empty(z.shape, z.dtype)
    zf, of = flat(z), out.reshape(-1)
    run_blocked(lambda lo, hi: sigmoid_into(zf[lo:hi], of[lo:hi]), zf)
    return out


def sigmoid_into(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[...] = sigmoid(z)`` (see :func:`sigmoid`), for float arrays of one shape and
    dtype; ``out`` may be ``z`` itself, or overlap it otherwise. Returns ``out``."""
    if out is not z and np.may_share_memory(out, z):
        # Overlapping otherwise (z shifted by an element), the passes would read what they
        # have already written: z is read from a copy.
        z = z.copy()
    if _fused.run("sigmoid", out, z):  # the same formula in one compiled pass
        return out
    # In place, one scratch array and the result: each temporary of NumPy's
    # expression style would cost a pass over memory and a fresh allocation.
    e = np.empty_like(z)
    np.abs(z, out=e)
    np.negative(e, out=e)
    np.exp(e, out=e)  # exp(-|z|) in (0, 1]: it cannot overflow
    # The numerator, 1 where z >= 0 and e elsewhere, is max(e, z >= 0) since e <= 1:
    # np.where would take a branch per element, mispredicted half the time. It is
    # written first, so that z is read before out (which may be z) is written.
    np.maximum(e, np.greater_equal(z, 0), out=out)
    np.add(e, 1.0, out=e)
    return np.divide(out, e, out=out)


def _float_argument(z: object, who: str) -> np.ndarray:
    """``z`` as a NumPy or CuPy array of a float dtype (integers and bools in float64).

    Complex, object and string input raise ``TypeError``, as the layers' does.
    """
    z = as_array(z, who=who)
    return z if z.dtype.kind == "f" else z.astype(np.float64)


def softplus(z: np.ndarray) -> np.ndarray:
    """log(1 + exp(z)) = max(z, 0) + log1p(exp(-|z|)), stable for any finite z.

    >>> print(softplus(np.array([-800.0, 0.0, 800.0])))
    [0.00000000e+00 6.93147181e-01 8.00000000e+02]
    """
    z = _float_argument(z, "softplus")
    if z.dtype == np.float16:  # in float64, rounded once (float16 arithmetic is 1 ulp off)
        return softplus(z.astype(np.float64)).astype(np.float16)
    return as_result(np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z))))


def erfc(z: np.ndarray) -> np.ndarray:
    """The complementary error function ``erfc(z) = 2/sqrt(pi) * integral_z^inf exp(-t**2) dt``.

    Element-wise and vectorised (NumPy has no erf), in the input's float dtype;
    its derivative is ``-2/sqrt(pi) * exp(-z**2)``. W. J. Cody's rational
    Chebyshev approximations (Math. Comp. 23, 1969) in three intervals of
    ``|z|``, with ``exp(-z**2)`` split so that the tail keeps its full
    relative accuracy: within a few units in the last place of the exact
    value over the whole float64 range, where ``1 - erf(z)`` would cancel.

    >>> print(erfc(np.array([-1.0, 0.0, 3.0, 26.0])))
    [1.84270079e+000 1.00000000e+000 2.20904970e-005 5.66319241e-296]
    """
    z = _float_argument(z, "erfc")
    if z.dtype == np.float16:
        # Its range overflows the polynomials; in float64, rounded once (through float32,
        # a value near a float16 midpoint can round the wrong way).
        return erfc(z.astype(np.float64)).astype(np.float16)
    if type(z) is not np.ndarray:
        import cupyx.scipy.special  # CuPy: its own element-wise erfc kernel

        return cupyx.scipy.special.erfc(z)
    out = _buffers.empty(z.shape, z.dtype)
    zf, of = flat(z), out.reshape(-1)
    run_blocked(lambda lo, hi: erfc_into(zf[lo:hi], of[lo:hi]), zf, fused=False)
    return out


# -z / sqrt 2 to twice float64's precision: sqrt(1/2) = _SQRT_HALF + _SQRT_HALF_LOW, and
# -_SQRT_HALF split in halves of 26 bits (Dekker's exact product takes z times each half).
_SQRT_HALF = 0.7071067811865476
_SQRT_HALF_LOW = -4.833646656726457e-17
_MINUS_SQRT_HALF_HIGH, _MINUS_SQRT_HALF_LOW = -0.7071067839860916, 2.7995440410322203e-09
_TWO_OVER_SQRT_PI = 1.1283791670955126
_INV_SQRT_2PI = 0.3989422804014327
_SPLITTER = 134217729.0  # 2**27 + 1: Veltkamp's split of a float64 in two 26-bit halves


def ncdf(z: np.ndarray) -> np.ndarray:
    """The standard normal CDF, ``Phi(z) = erfc(-z / sqrt 2) / 2``, in the input's float dtype.

    erfc magnifies a relative error in its argument h by about ``2 h**2``, so
    rounding ``-z / sqrt 2`` alone put Phi 1,857 ulps off at z = -37. Here the
    argument is carried to twice the precision, ``h + l = -z / sqrt 2``
    (Dekker's exact product, and the rounding of sqrt(1/2) itself), and its
    low part enters through erfc's derivative:
    ``Phi = (erfc(h) - 2/sqrt(pi) exp(-h**2) l) / 2``, within a few ulps over the
    float64 range. float16 and float32 are computed in float64 and rounded once.
    Its derivative is the density ``phi(z) = exp(-z**2 / 2) / sqrt(2 pi)``.

    >>> print(ncdf(np.array([-38.0, -1.0, 0.0, 2.0])))
    [2.88542835e-316 1.58655254e-001 5.00000000e-001 9.77249868e-001]
    """
    z = _float_argument(z, "ncdf")
    if z.dtype != np.float64:
        return ncdf(z.astype(np.float64)).astype(z.dtype)
    if type(z) is not np.ndarray:  # CuPy: whole-array operations, its own erfc
        return _ncdf_of(z, erfc)
    out = _buffers.empty(z.shape, z.dtype)
    zf, of = flat(z), out.reshape(-1)
    run_blocked(lambda lo, hi: ncdf_into(zf[lo:hi], of[lo:hi]), zf, fused=False)
    return out


def ncdf_into(z: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = ncdf(z)`` for 1-d contiguous float64 arrays of one size, in the calling
    thread (a layer's block: :func:`ncdf` itself hands blocks to the worker threads)."""

    def erfc_in_this_thread(h: np.ndarray) -> np.ndarray:
        erfc_into(h, h)
        return h

    out[...] = _ncdf_of(z, erfc_in_this_thread)


def _ncdf_of(z: Any, erfc_of: Callable[[Any], Any]) -> Any:
    """:func:`ncdf`'s arithmetic on float64 ``z``, with ``erfc_of`` as erfc (which may
    overwrite its argument)."""
    # Beyond |z| = 40, Phi is 0 or 1 in float64 and the correction's exp(-h**2) is 0: the
    # clip only keeps the split's products finite.
    c = np.clip(z, -40.0, 40.0)
    high = np.multiply(c, -_SQRT_HALF)
    c_high = c * _SPLITTER
    c_high -= c_high - c
    c_low = c - c_high
    low = c_high * _MINUS_SQRT_HALF_HIGH - high
    low += c_high * _MINUS_SQRT_HALF_LOW
    low += c_low * _MINUS_SQRT_HALF_HIGH
    low += c_low * _MINUS_SQRT_HALF_LOW
    low -= c * _SQRT_HALF_LOW  # -c sqrt(1/2) = high + low, to about 2**-104 of it
    h = np.multiply(z, -_SQRT_HALF)  # unclipped: erfc takes the whole range
    correction = np.exp(-(high * high)) * low * _TWO_OVER_SQRT_PI
    return (erfc_of(h) - correction) * 0.5


def npdf(z: np.ndarray) -> np.ndarray:
    """The standard normal density, ``phi(z) = exp(-z**2 / 2) / sqrt(2 pi)``, in the
    input's float dtype.

    ``z**2`` is carried to twice the precision (Dekker's exact product), its
    low part entering as ``exp(-l/2) = 1 - l/2``: rounding ``z**2`` alone put
    phi 700 ulps off at z = -38. float16 and float32 are computed in float64
    and rounded once; ``|z|`` is clipped at 40, where phi has underflowed.

    >>> print(npdf(np.array([-38.0, 0.0, 1.0])))
    [1.09722105e-314 3.98942280e-001 2.41970725e-001]
    """
    z = _float_argument(z, "npdf")
    if z.dtype != np.float64:
        return npdf(z.astype(np.float64)).astype(z.dtype)
    c = np.minimum(np.abs(z), 40.0)
    square = c * c
    c_high = c * _SPLITTER
    c_high -= c_high - c
    c_low = c - c_high
    square_low = c_high * c_high - square
    square_low += 2.0 * (c_high * c_low)
    square_low += c_low * c_low  # c*c = square + square_low exactly
    return np.exp(square * -0.5) * (1.0 - 0.5 * square_low) * _INV_SQRT_2PI


# Cody's coefficients, highest power first, each list as his CALERF loop builds
# it: numerator then monic denominator. Interval 1, |z| <= 0.46875:
# erf(z) = z P(z**2) / Q(z**2).
_ERF_SMALL_NUM = (1.85777706184603153e-1, 3.16112374387056560e00, 1.13864154151050156e02,
                  3.77485237685302021e02, 3.20937758913846947e03)  # fmt: skip
_ERF_SMALL_DEN = (2.36012909523441209e01, 2.44024637934444173e02, 1.28261652607737228e03,
                  2.84423683343917062e03)  # fmt: skip
# Interval 2, 0.46875 < |z| <= 4: erfc(z) = exp(-z**2) P(z) / Q(z).
_ERFC_MID_NUM = (2.15311535474403846e-8, 5.64188496988670089e-1, 8.88314979438837594e00,
                 6.61191906371416295e01, 2.98635138197400131e02, 8.81952221241769090e02,
                 1.71204761263407058e03, 2.05107837782607147e03, 1.23033935479799725e03)  # fmt: skip
_ERFC_MID_DEN = (1.57449261107098347e01, 1.17693950891312499e02, 5.37181101862009858e02,
                 1.62138957456669019e03, 3.29079923573345963e03, 4.36261909014324716e03,
                 3.43936767414372164e03, 1.23033935480374942e03)  # fmt: skip
# Interval 3, |z| > 4: erfc(z) = exp(-z**2)/z (1/sqrt(pi) + t P(t) / Q(t)), t = 1/z**2.
_ERFC_BIG_NUM = (1.63153871373020978e-2, 3.05326634961232344e-1, 3.60344899949804439e-1,
                 1.25781726111229246e-1, 1.60837851487422766e-2, 6.58749161529837803e-4)  # fmt: skip
_ERFC_BIG_DEN = (2.56852019228982242e00, 1.87295284992346725e00, 5.27905102951428412e-1,
                 6.05183413124413191e-2, 2.33520497626869185e-3)  # fmt: skip
_ONE_OVER_SQRT_PI = 5.6418958354775628695e-1
_ERF_SMALL, _ERFC_BIG = 0.46875, 4.0
# erfc(27.5) is below half the smallest float64 subnormal: 0 in every dtype.
# Clipping there keeps inf out of the exponent split (inf - inf would be NaN).
_ERFC_ZERO_BEYOND = 27.5
_ERFC_ZERO_BEYOND_32 = 10.5  # erfc(10.5) is below the smallest float32 subnormal


def _rational(num: tuple[float, ...], den: tuple[float, ...], t: np.ndarray,
              out: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """``out = num(t) / den(t)`` by Horner's rule, ``den`` monic; both arrays are overwritten."""
    np.multiply(t, num[0], out=out)
    for c in num[1:-1]:
        np.add(out, c, out=out)
        np.multiply(out, t, out=out)
    np.add(out, num[-1], out=out)
    np.add(t, den[0], out=scratch)
    for c in den[1:]:
        np.multiply(scratch, t, out=scratch)
        np.add(scratch, c, out=scratch)
    return np.divide(out, scratch, out=out)


def _times_exp_minus_square(y: np.ndarray, out: np.ndarray, a: np.ndarray,
                            b: np.ndarray) -> None:
    """``out *= exp(-y**2)`` for ``0 <= y <= 27.5``, without the rounding of ``y**2``.

    ``y**2`` rounded would carry an absolute error up to 2**-53 * y**2, a
    relative error of that size in ``exp``: 100 ulps at y = 10. With
    ``h = trunc(16 y) / 16``, ``h**2`` is exact and
    ``y**2 = h**2 + (y - h)(y + h)`` with the small second term rounded only
    relative to itself; ``exp(-h**2) exp(-(y - h)(y + h))`` is then as
    accurate as two exponentials.
    """
    np.multiply(y, 16.0, out=a)
    np.trunc(a, out=a)  # k = 16 h, an integer
    np.multiply(a, -1.0 / 256.0, out=b)
    np.multiply(b, a, out=b)  # -h**2 = -k**2 / 256, exactly
    np.exp(b, out=b)
    np.multiply(out, b, out=out)
    np.multiply(a, 1.0 / 16.0, out=a)  # h, exactly
    np.add(y, a, out=b)
    np.subtract(a, y, out=a)
    np.multiply(b, a, out=b)  # -(y - h)(y + h)
    np.exp(b, out=b)
    np.multiply(out, b, out=out)


def erfc_into(z: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = erfc(z)`` for 1-d contiguous float arrays of one size (see :func:`erfc`);
    ``out`` may be ``z`` itself.

    float64 uses Cody's three intervals, the middle one on every element and
    the outer two only on the elements in them. float32 uses the middle
    interval's formula alone on all of ``[0, 10.5]``: outside its interval it
    is still within 5e-10 (relative) of erfc, far below float32's rounding,
    and a single formula spares the gathers.
    """
    if np.may_share_memory(z, out):  # in place: the signs of z are read after out is written
        z = z.copy()
    y = np.abs(z)
    wide = z.dtype == np.float64
    # Beyond the clip erfc is 0 in the dtype; inf would make NaN in the split below.
    np.minimum(y, _ERFC_ZERO_BEYOND if wide else _ERFC_ZERO_BEYOND_32, out=y)
    a, b = np.empty_like(y), np.empty_like(y)
    _rational(_ERFC_MID_NUM, _ERFC_MID_DEN, y, out, a)
    small = np.flatnonzero(y <= _ERF_SMALL) if wide else None
    big = np.flatnonzero(y > _ERFC_BIG) if wide else None
    if big is not None and big.size:
        yb = y[big]
        t = np.divide(1.0, yb * yb)
        tail = _rational(_ERFC_BIG_NUM, _ERFC_BIG_DEN, t, np.empty_like(t), np.empty_like(t))
        np.multiply(tail, t, out=tail)
        np.subtract(_ONE_OVER_SQRT_PI, tail, out=tail)
        out[big] = np.divide(tail, yb, out=tail)
    _times_exp_minus_square(y, out, a, b)
    _reflect_negative(z, out, a)
    if small is not None and small.size:
        zs = z[small]
        t = zs * zs
        erf = _rational(_ERF_SMALL_NUM, _ERF_SMALL_DEN, t, np.empty_like(t), np.empty_like(t))
        np.multiply(erf, zs, out=erf)
        out[small] = np.subtract(1.0, erf, out=erf)


def _reflect_negative(z: np.ndarray, out: np.ndarray, scratch: np.ndarray) -> None:
    """``out = 2 - out`` where ``z``'s sign bit is set, ``out`` elsewhere (``out >= 0``).

    Why bits: ``np.where`` or a masked ufunc takes a branch per element (10 to
    50 times slower), ``np.copysign`` is not vectorised. With ``sign`` the
    sign bit of ``z`` (0 or 100...0), ``out ^ sign`` is ``-out`` or ``out``
    and ``sign >> 1`` is the bit pattern of 2.0 (010...0) or of 0.0: their
    sum is ``2 - out`` or ``out + 0``, rounded once.
    """
    as_uint = np.dtype(f"u{z.dtype.itemsize}")
    sign = scratch.view(as_uint)
    np.bitwise_and(z.view(as_uint), as_uint.type(1 << (8 * z.dtype.itemsize - 1)), out=sign)
    np.bitwise_xor(out.view(as_uint), sign, out=out.view(as_uint))
    np.right_shift(sign, as_uint.type(1), out=sign)
    np.add(out, scratch, out=out)
