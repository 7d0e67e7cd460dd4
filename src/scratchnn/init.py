"""Weight initialisers, drawn from a ``numpy.random.Generator`` the caller passes.

Each initialiser returns a new array of shape ``(fan_in, fan_out)``, the
book's ``W`` layout (``out = x W + b``), in ``dtype`` (float32 by default).
The numbers are drawn in float64 and rounded once to ``dtype``, so one seed
gives the same weights in every dtype, up to that rounding.

``device="cuda"`` returns the weights as a CuPy array on the GPU; they are
still drawn on the host from ``rng``, so one seed gives the same weights on
every device.

Randomness comes only from the ``rng`` argument, never from NumPy's global
state (``np.random.randn``, as the book uses): a run is reproducible from its
seed, and code elsewhere that draws from the global state is not disturbed.
Anything other than a ``Generator`` (a seed, ``None``, a legacy
``RandomState``) raises ``TypeError``.

The book's choices of scale (``MultiLayerNet(weight_init_std=...)``):

* ``"he"`` or ``"relu"``: standard deviation ``sqrt(2 / fan_in)``, for ReLU
  (He et al. 2015);
* ``"xavier"`` or ``"sigmoid"``: ``sqrt(1 / fan_in)``, for sigmoid and tanh;
* a number such as 0.01: that standard deviation (the book's ``weight_init_std``).

The book's "Xavier" keeps only the input side, ``1 / fan_in``. Glorot and
Bengio's own definition, which ``torch.nn.init.xavier_normal_`` and
``xavier_uniform_`` use (gain 1), averages both sides:
``glorot_normal`` has standard deviation ``sqrt(2 / (fan_in + fan_out))`` and
``glorot_uniform`` draws from ``U(-a, a)`` with ``a = sqrt(6 / (fan_in + fan_out))``.
``he_normal`` equals ``torch.nn.init.kaiming_normal_(mode="fan_in",
nonlinearity="relu")``.

``fans=(fan_in, fan_out)``, keyword-only, computes the scale from other fans
than the drawn matrix's shape: ``Conv2d`` draws a ``(C_in*kh*kw, C_out)``
matrix whose fans are ``(C_in*kh*kw, C_out*kh*kw)``, as ``torch.nn.init``
computes them for a convolution's kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from numpy.typing import DTypeLike

from scratchnn import _checks
from scratchnn.backend import check_device, import_cupy, to_device

__all__ = [
    "Initializer",
    "glorot_normal",
    "glorot_uniform",
    "he_normal",
    "make_initializer",
    "normal_std",
    "xavier_normal",
    "zeros",
]


class Initializer(Protocol):
    """What ``make_initializer`` returns: ``(fan_in, fan_out, rng, dtype) -> W``."""

    def __call__(
        self,
        fan_in: int,
        fan_out: int,
        rng: np.random.Generator,
        dtype: DTypeLike = ...,
        *,
        device: str = ...,
        fans: tuple[int, int] | None = ...,
    ) -> Any: ...


def he_normal(
    fan_in: int,
    fan_out: int,
    rng: np.random.Generator,
    dtype: DTypeLike = np.float32,
    *,
    device: str = "cpu",
    fans: tuple[int, int] | None = None,
) -> Any:
    """Normal weights with standard deviation ``sqrt(2 / fan_in)``: the book's "he"/"relu".

    >>> W = he_normal(784, 100, np.random.default_rng(0))
    >>> W.shape, W.dtype
    ((784, 100), dtype('float32'))
    >>> round(float(W.std()), 3)   # sqrt(2 / 784) = 0.0505
    0.051
    """
    return _normal(
        fan_in,
        fan_out,
        rng,
        dtype,
        "he_normal",
        lambda n_in, n_out: math.sqrt(2.0 / n_in),
        device,
        fans,
    )


def xavier_normal(
    fan_in: int,
    fan_out: int,
    rng: np.random.Generator,
    dtype: DTypeLike = np.float32,
    *,
    device: str = "cpu",
    fans: tuple[int, int] | None = None,
) -> Any:
    """Normal weights with standard deviation ``sqrt(1 / fan_in)``: the book's "xavier"/"sigmoid".

    Not PyTorch's ``xavier_normal_``, which is ``glorot_normal`` here.

    >>> W = xavier_normal(400, 300, np.random.default_rng(0))
    >>> round(float(W.std()), 3)   # sqrt(1 / 400) = 0.05
    0.05
    """
    return _normal(
        fan_in,
        fan_out,
        rng,
        dtype,
        "xavier_normal",
        lambda n_in, n_out: math.sqrt(1.0 / n_in),
        device,
        fans,
    )


def glorot_normal(
    fan_in: int,
    fan_out: int,
    rng: np.random.Generator,
    dtype: DTypeLike = np.float32,
    *,
    device: str = "cpu",
    fans: tuple[int, int] | None = None,
) -> Any:
    """Normal weights with standard deviation ``sqrt(2 / (fan_in + fan_out))``.

    As ``torch.nn.init.xavier_normal_`` with gain 1.

    >>> W = glorot_normal(300, 500, np.random.default_rng(0))
    >>> round(float(W.std()), 3)   # sqrt(2 / 800) = 0.05
    0.05
    """
    return _normal(
        fan_in,
        fan_out,
        rng,
        dtype,
        "glorot_normal",
        lambda n_in, n_out: math.sqrt(2.0 / (n_in + n_out)),
        device,
        fans,
    )


def glorot_uniform(
    fan_in: int,
    fan_out: int,
    rng: np.random.Generator,
    dtype: DTypeLike = np.float32,
    *,
    device: str = "cpu",
    fans: tuple[int, int] | None = None,
) -> Any:
    """Uniform weights on ``[-a, a]``, ``a = sqrt(6 / (fan_in + fan_out))``.

    As ``torch.nn.init.xavier_uniform_`` with gain 1; the standard deviation is
    ``a / sqrt(3) = sqrt(2 / (fan_in + fan_out))``, as for ``glorot_normal``.

    >>> W = glorot_uniform(300, 300, np.random.default_rng(0))
    >>> bool(abs(W).max() <= 0.1)   # a = sqrt(6 / 600)
    True
    """
    who = "glorot_uniform"
    fan_in, fan_out, out_dtype = _check(who, fan_in, fan_out, rng, dtype, device)
    scale_in, scale_out = _fans(who, fans, fan_in, fan_out)
    bound = math.sqrt(6.0 / (scale_in + scale_out))
    return to_device(_cast(who, rng.uniform(-bound, bound, size=(fan_in, fan_out)), out_dtype), device)


def normal_std(
    fan_in: int,
    fan_out: int,
    rng: np.random.Generator,
    dtype: DTypeLike = np.float32,
    *,
    std: float = 0.01,
    device: str = "cpu",
    fans: tuple[int, int] | None = None,
) -> Any:
    """Normal weights with a fixed standard deviation: the book's ``weight_init_std * randn``.

    ``std`` is keyword-only so that the positional arguments are those of
    every other initialiser, ``(fan_in, fan_out, rng, dtype)``.

    >>> W = normal_std(2, 3, np.random.default_rng(0), std=0.01)
    >>> W.shape, bool(abs(W).max() < 0.05)
    ((2, 3), True)
    """
    checked = _check_std("normal_std", std)
    return _normal(
        fan_in, fan_out, rng, dtype, "normal_std", lambda n_in, n_out: checked, device, fans
    )


def zeros(size: int, dtype: DTypeLike = np.float32, *, device: str = "cpu") -> Any:
    """A bias vector of ``size`` zeros, as the book starts every ``b``.

    >>> zeros(3)
    array([0., 0., 0.], dtype=float32)
    """
    bias = np.zeros(_checks.count("zeros", "size", size), dtype=_float_dtype("zeros", dtype))
    return to_device(bias, device)


_BY_NAME: dict[str, Initializer] = {
    "he": he_normal,
    "relu": he_normal,
    "xavier": xavier_normal,
    "sigmoid": xavier_normal,
    "glorot_normal": glorot_normal,
    "glorot_uniform": glorot_uniform,
}


def make_initializer(name_or_std: str | float) -> Initializer:
    """The initialiser for a name (any case) or a fixed standard deviation.

    Names: ``"he"`` and ``"relu"`` (``he_normal``), ``"xavier"`` and
    ``"sigmoid"`` (``xavier_normal``), ``"glorot_normal"``,
    ``"glorot_uniform"``; a number gives ``normal_std`` with that ``std``, as
    the book's ``weight_init_std`` does.

    >>> make_initializer("ReLU") is he_normal
    True
    >>> make_initializer(0.01)(2, 2, np.random.default_rng(0)).dtype
    dtype('float32')
    """
    if isinstance(name_or_std, str):
        initializer = _BY_NAME.get(name_or_std.lower())
        if initializer is None:
            raise ValueError(
                f"unknown initializer {name_or_std!r}; expected one of {sorted(_BY_NAME)} "
                "or a standard deviation"
            )
        return initializer
    std = _check_std("make_initializer", name_or_std)

    def fixed_std(
        fan_in: int,
        fan_out: int,
        rng: np.random.Generator,
        dtype: DTypeLike = np.float32,
        *,
        device: str = "cpu",
        fans: tuple[int, int] | None = None,
    ) -> Any:
        # fans do not change a fixed std, but are checked as every initialiser checks them
        return normal_std(fan_in, fan_out, rng, dtype, std=std, device=device, fans=fans)

    fixed_std.__qualname__ = fixed_std.__name__ = f"normal_std(std={std!r})"
    return fixed_std


# -- checks, in one place ---------------------------------------------------------------


def _normal(
    fan_in: int,
    fan_out: int,
    rng: np.random.Generator,
    dtype: DTypeLike,
    who: str,
    std_of: Callable[[int, int], float],
    device: str = "cpu",
    fans: tuple[int, int] | None = None,
) -> Any:
    """Draw a ``(fan_in, fan_out)`` matrix from ``N(0, std_of(*fans)**2)`` (``fans``
    defaulting to that shape) once the arguments are checked."""
    fan_in, fan_out, out_dtype = _check(who, fan_in, fan_out, rng, dtype, device)
    std = std_of(*_fans(who, fans, fan_in, fan_out))
    before = rng.bit_generator.state
    weights = rng.standard_normal((fan_in, fan_out))
    weights *= std
    try:
        return to_device(_cast(who, weights, out_dtype), device)
    except ValueError:  # weights beyond the dtype: the caller's generator as it was
        rng.bit_generator.state = before
        raise


def _fans(who: str, fans: object, fan_in: int, fan_out: int) -> tuple[int, int]:
    """The fans a scale is computed from: ``fans`` where given, else the matrix's shape."""
    if fans is None:
        return fan_in, fan_out
    if not isinstance(fans, tuple) or len(fans) != 2:
        raise TypeError(f"{who}: fans must be a pair of ints (fan_in, fan_out), got {fans!r}")
    return _checks.count(who, "fans[0]", fans[0]), _checks.count(who, "fans[1]", fans[1])


def _cast(who: str, weights: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """``weights`` in ``dtype``; ``ValueError`` where they do not fit it (a std of 1e300 in float32)."""
    with np.errstate(over="ignore"):
        result = weights.astype(dtype)
    if not np.isfinite(result).all():
        raise ValueError(f"{who}: the weights overflow {dtype}; use a smaller std")
    return result


def _check(
    who: str, fan_in: object, fan_out: object, rng: object, dtype: DTypeLike, device: str = "cpu"
) -> tuple[int, int, np.dtype[Any]]:
    if check_device(device) == "cuda":
        import_cupy()  # before drawing: a failed call must not advance the caller's generator
    _checks.given_generator(who, rng)
    return (
        _checks.count(who, "fan_in", fan_in),
        _checks.count(who, "fan_out", fan_out),
        _float_dtype(who, dtype),
    )


def _float_dtype(who: str, dtype: DTypeLike) -> np.dtype[Any]:
    return _checks.float_dtype(who, dtype)


def _check_std(who: str, std: object) -> float:
    return _checks.nonnegative(who, "std", std)
