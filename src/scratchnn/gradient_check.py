"""Numerical gradient checks for whole networks."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from scratchnn import _checks
from scratchnn.layers.regularization import Dropout


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
    rng: np.random.Generator | None = None,
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
    params = network.params
    if not params:
        raise ValueError("gradcheck: the network has no parameters to check")
    if max_per_param is not None:
        max_per_param = _checks.count("gradcheck", "max_per_param", max_per_param)
    h = _checks.positive("gradcheck", "h", h)
    floor = _checks.positive("gradcheck", "floor", floor)
    for key, array in params.items():
        if array.dtype != np.float64:
            raise ValueError(
                f"gradcheck: parameter {key} is {array.dtype}; build the network in float64 to check it"
            )
    for layer in getattr(network, "layers", ()):
        if isinstance(layer, Dropout) and layer.training and layer.p > 0:
            # Every evaluation of the loss would draw a new mask: the differences would
            # compare two different functions, and report a right gradient as wrong.
            raise ValueError(
                "gradcheck: Dropout draws a new mask each time the loss is computed, so in "
                "training mode there is no one function to differentiate; call "
                "network.eval() first (Dropout off) or check the network without it"
            )
    if max_per_param is not None and rng is None:
        rng = np.random.default_rng(0)
    # Buffers (running statistics) as they were, to put back at the end.
    saved_state = {k: v.copy() for k, v in network.state().items()} if hasattr(network, "state") else None
    try:
        return _check_each(network, x, t, params, h, max_per_param, rng, floor)
    finally:
        if saved_state is not None:
            network.load_state(saved_state)


def _check_each(
    network: Any,
    x: Any,
    t: Any,
    params: dict[str, np.ndarray],
    h: float,
    max_per_param: int | None,
    rng: np.random.Generator | None,
    floor: float,
) -> GradcheckResult:
    analytic = {key: grad.copy() for key, grad in network.gradient(x, t).items()}
    worst = GradcheckResult(0.0, "", (), 0.0, 0.0, 0)
    checked = 0
    for key, array in params.items():
        result = _worst_difference(
            key, array, analytic[key], lambda: network.loss(x, t), h, max_per_param, rng, floor
        )
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
    reduce: Callable[[Any], float] = float,
) -> GradcheckResult:
    """Central differences ``reduce(loss(+h) - loss(-h)) / 2h`` in each (or
    ``max_elements`` random) element of ``array``, moved in place and put back
    exactly, against ``analytic``."""
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
        numeric = reduce(upper - lower) / (2 * h)
        exact = float(analytic[index])
        error = abs(exact - numeric) / max(abs(exact) + abs(numeric), floor)
        worst = _worse(worst, GradcheckResult(error, key, tuple(int(i) for i in index), exact, numeric, 0))
    return dataclasses.replace(worst, checked=len(flat_indices))


# -- one layer, as a learner writes it ------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One check of :func:`check_layer`: what was checked, whether it held, and how."""

    check: str
    passed: bool
    detail: str = ""

    def __str__(self) -> str:
        return f"{'ok  ' if self.passed else 'FAIL'}  {self.check}" + (
            f": {self.detail}" if self.detail else ""
        )


@dataclass(frozen=True)
class LayerCheck:
    """What :func:`check_layer` found; ``passed`` when every finding held.

    ``gradients`` holds the worst disagreement for each checked array: the
    inputs (``x``, or ``x0``, ``x1``, ... for a layer of several inputs) and
    the parameters by name.
    """

    layer: str
    findings: tuple[Finding, ...]
    gradients: dict[str, GradcheckResult]

    @property
    def passed(self) -> bool:
        return all(finding.passed for finding in self.findings)

    def __str__(self) -> str:
        head = f"check_layer({self.layer}): {'passed' if self.passed else 'FAILED'}"
        return "\n".join([head, *(f"  {finding}" for finding in self.findings)])


def _float64_copy(value: Any, what: str) -> np.ndarray:
    if isinstance(value, (str, bytes)) or type(value).__module__.startswith("cupy"):
        raise TypeError(f"check_layer: {what} must be a NumPy array or a number, got {type(value).__name__}")
    try:
        array = np.array(value, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(f"check_layer: {what} must be real numbers: {error}") from None
    if not np.isfinite(array).all():
        raise ValueError(f"check_layer: {what} must be finite (central differences of inf are NaN)")
    return array


def _layer_params(layer: Any) -> dict[str, np.ndarray]:
    """The arrays backward differentiates besides the inputs.

    A scratchnn layer names them in ``params``; a layer written as the book
    writes them keeps each array ``W`` beside its gradient ``dW`` (``b``/``db``,
    ``gamma``/``dgamma``), so every array attribute with a ``d``-partner is one.
    """
    params = getattr(layer, "params", None)
    if isinstance(params, dict):
        return dict(params)
    return {
        name: value
        for name, value in vars(layer).items()
        if isinstance(value, np.ndarray) and hasattr(layer, "d" + name)
    }


def _layer_grads(layer: Any, params: dict[str, np.ndarray]) -> dict[str, Any]:
    grads = getattr(layer, "grads", None)
    if isinstance(grads, dict):
        return {key: grads.get(key) for key in params}
    return {key: getattr(layer, "d" + key, None) for key in params}


def check_layer(
    layer: Any,
    *inputs: Any,
    target: Any = None,
    dout: Any = None,
    h: float = 1e-5,
    tolerance: float = 1e-5,
    max_per_array: int | None = None,
    rng: np.random.Generator | None = None,
) -> LayerCheck:
    """Check one layer's ``backward`` as a learner would want it checked, and report.

    ``layer`` is any object with ``forward(*inputs)`` and ``backward(dout)``,
    a scratchnn layer or one written as the book writes them. It is run in
    float64 on ``inputs`` with an upstream gradient ``dout`` (by default
    drawn from ``rng``'s standard normal: a ``dout`` of ones would hide
    errors, since Softmax's true gradient is then zero). A loss layer takes
    its labels as ``target``: ``forward(x, target)``, not differentiated.
    It reports:

    - for each input and each parameter (``params``, or arrays ``W`` with a
      partner ``dW`` after backward, as in the book), the worst relative
      error ``|a - n| / max(|a| + |n|, floor)`` between backward's gradient
      ``a`` and the central difference ``n`` of ``sum(forward(inputs) * dout)``
      with step ``h`` (over ``max_per_array`` random elements of each array,
      or all); it holds below ``tolerance``. The ``floor`` keeps the
      differences' rounding noise, about ``eps * sum|y * dout| / h``
      absolute, from failing gradients near zero: it is that noise times 100
      over ``tolerance`` (and at least 1e-5);
    - that backward leaves ``dout`` as it was (the seed's ``Relu.backward``
      zeroes the caller's array);
    - that forward leaves its inputs as they were;
    - that backward returns one gradient per input and leaves one per
      parameter, each of its array's shape.

    The layer's parameters end bit for bit as they were, and so do running
    statistics in ``buffers``; the layer is left holding the forward and
    backward pass at ``inputs``. Choose inputs at least ``h`` away from a
    kink (ReLU's 0), where no derivative exists. A forward that gives two
    results for one input (Dropout in training mode) is refused.

    >>> from scratchnn import Sigmoid
    >>> report = check_layer(Sigmoid(), np.array([[0.5, -1.0], [2.0, 0.0]]))
    >>> report.passed
    True
    >>> print(report)  # doctest: +ELLIPSIS
    check_layer(Sigmoid()): passed
      ok    dx matches central differences: worst relative error ... at x[...]...
      ok    backward leaves dout as it was
      ok    forward leaves x as it was
      ok    each gradient has its array's shape: dx (2, 2)
    """
    if not all(callable(getattr(layer, name, None)) for name in ("forward", "backward")):
        raise TypeError(
            f"check_layer: the layer must have forward and backward methods; got {type(layer).__name__}"
        )
    if not inputs:
        raise TypeError("check_layer: give the layer's input(s) after the layer")
    h = _checks.positive("check_layer", "h", h)
    tolerance = _checks.positive("check_layer", "tolerance", tolerance)
    if max_per_array is not None:
        max_per_array = _checks.count("check_layer", "max_per_array", max_per_array)
    if rng is None:
        rng = np.random.default_rng(0)
    labels = () if target is None else (target,)
    names = ["x"] if len(inputs) == 1 else [f"x{i}" for i in range(len(inputs))]
    xs = [_float64_copy(x, name) for x, name in zip(inputs, names)]
    params = _layer_params(layer)
    for key, array in params.items():
        if not isinstance(array, np.ndarray) or array.dtype != np.float64:
            raise ValueError(
                f"check_layer: parameter {key} is {getattr(array, 'dtype', type(array).__name__)}; "
                "build the layer in float64 (central differences in float32 have no digits left)"
            )
    saved_params = {key: array.copy() for key, array in params.items()}
    buffers = getattr(layer, "buffers", None)
    saved_buffers = {k: v.copy() for k, v in buffers.items()} if isinstance(buffers, dict) else {}

    def forward(arrays: list[np.ndarray]) -> np.ndarray:
        # Copies: a forward that writes into its input must not move the point checked.
        return np.asarray(layer.forward(*(a.copy() for a in arrays), *labels), dtype=np.float64)

    try:
        given = [x.copy() for x in xs]
        out = np.asarray(layer.forward(*given, *labels))
        inputs_unchanged = all(np.array_equal(a, b) for a, b in zip(given, xs))
        if out.dtype != np.float64:
            raise ValueError(
                f"check_layer: forward gave {out.dtype} for float64 inputs; the check needs float64 "
                "throughout"
            )
        if not np.array_equal(forward(xs), out, equal_nan=True):
            raise ValueError(
                "check_layer: forward gave two different results for the same input (Dropout in "
                "training mode? call eval() first), so there is no one function to differentiate"
            )
        upstream = rng.standard_normal(out.shape) if dout is None else _float64_copy(dout, "dout")
        if upstream.shape != out.shape:
            raise ValueError(
                f"check_layer: dout has shape {upstream.shape}, the layer's output {out.shape}"
            )
        forward(xs)  # backward must follow a forward at the point checked
        passed_dout = upstream.copy()
        returned = layer.backward(passed_dout)
        dout_unchanged = np.array_equal(passed_dout, upstream)
        changed = int(np.count_nonzero(passed_dout != upstream))
        grads = list(returned) if len(xs) > 1 and isinstance(returned, (tuple, list)) else [returned]
        grads = [np.array(g, dtype=np.float64) for g in grads]
        param_grads = {
            key: None if g is None else np.array(g, dtype=np.float64)
            for key, g in _layer_grads(layer, params).items()
        }
        shape_problems = _shape_problems(names, xs, grads, params, param_grads)

        def output() -> np.ndarray:
            return forward(xs)

        def weigh(difference: np.ndarray) -> float:
            # The outputs' differences are weighted after subtracting: outputs that do
            # not depend on the moved element cancel exactly instead of adding rounding
            # noise of their size to a sum.
            return float(np.sum(difference * upstream))

        noise = float(np.finfo(np.float64).eps * np.sum(np.abs(out * upstream)) / h)
        floor = max(1e-5, 100 * noise / tolerance)
        gradients: dict[str, GradcheckResult] = {}
        if not shape_problems:
            arrays = {**dict(zip(names, xs)), **params}
            analytic = {**dict(zip(names, grads)), **param_grads}
            for key, array in arrays.items():
                gradients[key] = _worst_difference(
                    key, array, analytic[key], output, h, max_per_array, rng, floor, weigh
                )
        # Leave the layer as the user's own forward and backward at this point would.
        forward(xs)
        layer.backward(upstream.copy())
    finally:
        for key, array in params.items():
            array[...] = saved_params[key]
        for key, value in saved_buffers.items():
            buffers[key][...] = value  # type: ignore[index]

    findings = [
        Finding(
            f"d{name} matches central differences",
            result.max_relative_error < tolerance,  # NaN fails
            f"worst relative error {result.max_relative_error:.2e} at {name}{list(result.index)} "
            f"(backprop {result.analytic:.10g}, numerical {result.numeric:.10g})",
        )
        for name, result in gradients.items()
    ]
    findings.append(
        Finding(
            "backward leaves dout as it was",
            dout_unchanged,
            "" if dout_unchanged else f"it wrote into dout ({changed} of {upstream.size} elements changed)",
        )
    )
    what = " and ".join(names) + (" as it was" if len(names) == 1 else " as they were")
    findings.append(
        Finding(
            f"forward leaves {what}",
            inputs_unchanged,
            "" if inputs_unchanged else "it wrote into its input",
        )
    )
    shapes = {**dict(zip(names, xs)), **params}
    findings.append(
        Finding(
            "each gradient has its array's shape",
            not shape_problems,
            "; ".join(shape_problems)
            or ", ".join(f"d{name} {array.shape}" for name, array in shapes.items()),
        )
    )
    return LayerCheck(_layer_repr(layer), tuple(findings), gradients)


def _shape_problems(
    names: list[str],
    xs: list[np.ndarray],
    grads: list[np.ndarray],
    params: dict[str, np.ndarray],
    param_grads: dict[str, np.ndarray | None],
) -> list[str]:
    problems = []
    if len(grads) != len(xs):
        problems.append(f"backward returned {len(grads)} gradients for {len(xs)} inputs")
    for name, x, g in zip(names, xs, grads):
        if g.shape != x.shape:
            problems.append(f"d{name} has shape {g.shape}, {name} {x.shape}")
    for key, array in params.items():
        grad = param_grads[key]
        if grad is None:
            problems.append(f"no gradient for parameter {key} after backward")
        elif grad.shape != array.shape:
            problems.append(f"the gradient of {key} has shape {grad.shape}, {key} {array.shape}")
    return problems


def _layer_repr(layer: Any) -> str:
    text = repr(layer)
    # An object's default repr (<module.Class object at 0x...>) says less than its name.
    return f"{type(layer).__name__}()" if text.startswith("<") else text
