"""Numerical gradient checks for whole networks (one layer: :mod:`scratchnn.layer_check`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from scratchnn import _checks
from scratchnn.layers.regularization import Dropout
from scratchnn.parameters import bindings, rebind


@dataclass(frozen=True)
class GradcheckResult:
    """The worst disagreement between backpropagation and central differences.

    ``max_relative_error`` is ``|analytic - numeric| / max(|analytic| + |numeric|, floor)``
    at parameter ``key``, element ``index``.
    """

    max_relative_error: float
    key: str
    index: tuple[int, ...]
    analytic: float
    numeric: float
    checked: int

    def __str__(self) -> str:
        return (
            f"worst relative error {self.max_relative_error:.3e} at {self.key}{list(self.index)} "
            f"(backprop {self.analytic:.12g}, numerical {self.numeric:.12g}; {self.checked} elements checked)"
        )


def gradcheck(
    network: Any,
    x: Any,
    t: Any,
    *,
    h: float = 1e-5,
    max_per_param: int | None = None,
    rng: np.random.Generator | int | None = None,
    floor: float = 1e-5,
) -> GradcheckResult:
    """Compare ``network.gradient(x, t)`` with central differences of ``network.loss(x, t)``.

    The network needs float64 parameters (central differences in float32 have
    no digits left to compare). Each checked element ``p`` is moved to
    ``p + h`` and ``p - h`` in place, as the book's ``numerical_gradient``
    does, and restored exactly; so are a ``Sequential``'s buffers (BatchNorm's
    running statistics, which every training-mode forward pass moves).
    ``max_per_param`` limits the check to that many randomly chosen elements of
    each parameter (drawn from ``rng``). A NaN anywhere, in a gradient or in a
    loss, is the worst error there is: the result's ``max_relative_error`` is
    NaN, which fails any ``< tolerance`` test.

    The relative error's denominator is at least ``floor``: central differences
    carry an absolute rounding noise of about ``eps * |loss| / h`` (1e-11 here),
    which would make the relative error of a gradient of 1e-7 meaningless.

    >>> from scratchnn import Affine, Sigmoid, Sequential
    >>> W = np.random.default_rng(0).standard_normal((3, 2))
    >>> net = Sequential([Affine(W, np.zeros(2)), Sigmoid()])
    >>> gradcheck(net, np.ones((4, 3)), np.array([0, 1, 1, 0])).max_relative_error < 1e-7
    True
    """
    if not all(callable(getattr(network, name, None)) for name in ("gradient", "loss")):
        raise TypeError(
            "gradcheck: network must have params, gradient(x, t) and loss(x, t), as a "
            f"Sequential has; got {type(network).__name__}"
        )
    if max_per_param is not None:
        max_per_param = _checks.count("gradcheck", "max_per_param", max_per_param)
    h = _checks.positive("gradcheck", "h", h)
    floor = _checks.positive("gradcheck", "floor", floor)
    for layer in getattr(network, "layers", ()):
        # scratchnn's Dropout by its mode; the book's by its name, in a training network.
        books = "dropout" in type(layer).__name__.lower() and getattr(network, "training", False)
        if (isinstance(layer, Dropout) and layer.training and layer.p > 0) or (
            books and not isinstance(layer, Dropout)
        ):
            # Every evaluation of the loss would draw a new mask: the differences would
            # compare two different functions, and report a right gradient as wrong.
            raise ValueError(
                "gradcheck: Dropout draws a new mask each time the loss is computed, so in "
                "training mode there is no one function to differentiate; call "
                "network.eval() first (scratchnn's Dropout off; the book's backward needs a "
                "training mask, so check a network with it left out)"
            )
    if rng is not None:
        rng = _checks.generator("gradcheck", rng)  # a seed too, as check_layer takes
    elif max_per_param is not None:
        rng = np.random.default_rng(0)
    # Weights and buffers (running statistics) as they were, and what a user's layers
    # hold (a stateful layer's h), to put back at the end.
    saved = _places(network)
    at_start = bindings(getattr(network, "layers", ()))
    try:
        return _check_each(network, x, t, h, max_per_param, rng, floor)
    finally:
        rebind(at_start)
        for layer, name, array, values in saved:
            # Where the layer holds it now: the book's BatchNormalization rebinds its
            # running_mean; keys would not do, as a first forward may renumber them.
            now = getattr(layer, name, None) if layer is not None else array
            if isinstance(now, np.ndarray) and now.shape == values.shape:
                now[...] = values


def _places(network: Any) -> list[tuple[Any, str, Any, np.ndarray]]:
    """(layer, attribute, array, a copy of its values) for each array of the network's
    state, found by identity among its layers' attributes; (None, "", array, copy) for
    one held otherwise (in a list, as the sequel's params). Arrays a first forward makes
    did not exist before: they stay as they end."""
    if not hasattr(network, "state"):
        return []
    state = {id(array): array for array in network.state().values()}
    places: list[tuple[Any, str, Any, np.ndarray]] = []
    for layer in getattr(network, "layers", ()):
        for name, value in getattr(layer, "__dict__", {}).items():
            if id(value) in state:
                places.append((layer, name, value, value.copy()))
                del state[id(value)]
    places += [(None, "", array, array.copy()) for array in state.values()]
    return places


def _check_each(
    network: Any,
    x: Any,
    t: Any,
    h: float,
    max_per_param: int | None,
    rng: np.random.Generator | None,
    floor: float,
) -> GradcheckResult:
    # Two forwards before params are read: a parameter a layer makes at its first
    # forward counts from its second (see scratchnn.parameters).
    network.loss(x, t)
    # Every loss from the same state: a stateful layer (the sequel's h) would carry
    # each forward's into the next, and the differences would compare two functions.
    at_gradient = bindings(getattr(network, "layers", ()))
    analytic = {key: grad.copy() for key, grad in network.gradient(x, t).items()}
    params = network.params
    if not params:
        raise ValueError("gradcheck: the network has no parameters to check")
    for key, array in params.items():
        if array.dtype != np.float64:
            raise ValueError(
                f"gradcheck: parameter {key} is {array.dtype}; build the network in float64 to check it"
            )
        # A gradient of another shape (dout.T @ x for x.T @ dout, a sum kept 2-d or over
        # the other axis) has no element to compare with each of the parameter's.
        gradient_shape = getattr(analytic.get(key), "shape", None)
        if gradient_shape != array.shape:
            raise ValueError(
                f"gradcheck: the gradient of {key} has shape {gradient_shape}, "
                f"the parameter {array.shape}: backward computes it wrongly"
            )

    def loss() -> Any:
        rebind(at_gradient)
        return network.loss(x, t)

    worst = GradcheckResult(0.0, "", (), 0.0, 0.0, 0)
    checked = 0
    for key, array in params.items():
        result = _worst_difference(key, array, analytic[key], loss, h, max_per_param, rng, floor)
        checked += result.checked
        worst = _worse(worst, result)
    return dataclasses.replace(worst, checked=checked)


def _worse(a: GradcheckResult, b: GradcheckResult) -> GradcheckResult:
    """The worse of two results; NaN compares false with everything, so it wins explicitly."""
    if math.isnan(a.max_relative_error):
        return a
    if math.isnan(b.max_relative_error) or b.max_relative_error >= a.max_relative_error:
        return b
    return a


def _worst_difference(
    key: str,
    array: np.ndarray,
    analytic: np.ndarray,
    loss: Callable[[], Any],
    h: float,
    max_elements: int | None,
    rng: np.random.Generator | None,
    floor: float,
) -> GradcheckResult:
    """Central differences ``(loss(+h) - loss(-h)) / 2h`` in each (or ``max_elements``
    random) element of ``array``, moved in place and put back exactly, against
    ``analytic``."""
    flat_indices = np.arange(array.size)
    if max_elements is not None and array.size > max_elements:
        assert rng is not None
        flat_indices = rng.choice(array.size, size=max_elements, replace=False)
    worst = GradcheckResult(0.0, key, (), 0.0, 0.0, 0)
    for flat in flat_indices:
        index = np.unravel_index(int(flat), array.shape)
        saved = array[index]
        array[index] = saved + h
        upper = loss()
        array[index] = saved - h
        lower = loss()
        array[index] = saved
        numeric = float((upper - lower) / (2 * h))
        exact = float(analytic[index])
        error = abs(exact - numeric) / max(abs(exact) + abs(numeric), floor)
        worst = _worse(worst, GradcheckResult(error, key, tuple(int(i) for i in index), exact, numeric, 0))
    return dataclasses.replace(worst, checked=len(flat_indices))

