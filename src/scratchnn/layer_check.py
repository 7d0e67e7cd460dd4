"""``check_layer``: one layer's backward checked as a learner wants it checked, and reported.

It works on a copy of the layer, so the layer given is never changed. The
copy's parameters are found as scratchnn names them (``params`` and
``grads`` dicts), as the book's sequel does (``params`` and ``grads``
lists), or as the book does: an array attribute ``W`` that forward and
backward keep (not rebind, as they rebind the cached ``x``) beside a
gradient ``dW`` that backward sets.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np

from scratchnn import _checks
from scratchnn.gradient_check import GradcheckResult, _worst_difference

# Central differences agree with an exact gradient to about eps * sum|y * dout| / h
# absolute; the floor of the relative error's denominator is that noise times this
# factor over the tolerance, so rounding alone never fails a gradient near zero.
NOISE_MARGIN = 100


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

    ``gradients`` holds the worst disagreement for each array compared: the
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


def check_layer(
    layer: Any,
    *inputs: Any,
    target: Any = None,
    dout: Any = None,
    h: float = 1e-5,
    tolerance: float = 1e-5,
    max_per_array: int | None = None,
    rng: np.random.Generator | int | None = None,
) -> LayerCheck:
    """Check one layer's ``backward`` and report what holds and what does not.

    ``layer`` is any object with ``forward(*inputs)`` and ``backward(dout)``,
    a scratchnn layer or one written as the book writes them; a loss takes
    its labels as ``target`` (``forward(x, target)``, not differentiated).
    A copy of the layer runs in float64 on ``inputs`` with the upstream
    gradient ``dout``: by default 1 for a scalar output (a loss, as the
    book's ``backward(dout=1)``) and else drawn from ``rng``'s standard
    normal (ones would hide errors: Softmax's true gradient is then zero).
    It reports:

    - for each input and each parameter, the worst relative error
      ``|a - n| / max(|a| + |n|, floor)`` between backward's gradient ``a``
      and the central difference ``n`` of ``sum(forward(inputs) * dout)``
      with step ``h``, over ``max_per_array`` random elements of each array
      or all; it holds below ``tolerance``. The ``floor`` keeps the
      differences' rounding noise, about ``eps * sum|y * dout| / h``
      absolute, from failing gradients near zero (that noise times 100 over
      ``tolerance``, and at least 1e-5);
    - that backward returns one gradient per input (not None, not also
      ``dW`` and ``db``) and sets one per parameter, each of its array's shape;
    - that a second forward and backward give the same gradients (a
      ``dW +=`` that is never reset does not);
    - that backward leaves ``dout``, and forward its inputs, as they were
      (the seed's ``Relu.backward`` zeroes the caller's ``dout``);
    - that forward and backward leave the parameters as they were (an
      update belongs to the optimiser);
    - that every array the layer keeps has its gradient (a ``W`` without a
      ``dW`` after backward was not checked).

    The layer given is not changed: check_layer works on a copy. Choose
    inputs at least ``h`` away from a kink (ReLU's 0), where no derivative
    exists. A layer that draws random numbers in forward (Dropout in
    training mode) is refused: there is no one function to differentiate.

    >>> from scratchnn import Sigmoid
    >>> report = check_layer(Sigmoid(), np.array([[0.5, -1.0], [2.0, 0.0]]))
    >>> report.passed
    True
    >>> print(report)  # doctest: +ELLIPSIS
    check_layer(Sigmoid()): passed
      ok    dx matches central differences: worst relative error ... at x[...]...
      ok    each gradient has its array's shape: dx (2, 2)
      ok    a second forward and backward give the same gradients
      ok    backward leaves dout as it was
      ok    forward leaves x as it was
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
    rng = _generator(rng)
    _refuse_labels_as_input(layer, inputs, target)
    _refuse_randomness(layer)
    names = ["x"] if len(inputs) == 1 else [f"x{i}" for i in range(len(inputs))]
    xs = [_float64_copy(x, name) for x, name in zip(inputs, names)]
    labels = () if target is None else (target,)
    try:
        work = copy.deepcopy(layer)
    except Exception as error:
        raise TypeError(
            f"check_layer works on a copy of the layer, and {type(layer).__name__} cannot be "
            f"copied: {error}"
        ) from None
    run = _Run(work, labels)
    return run.check(names, xs, dout, h, tolerance, max_per_array, rng, _layer_repr(layer))


def _generator(rng: object) -> np.random.Generator:
    if rng is None:
        return np.random.default_rng(0)
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, int) and not isinstance(rng, bool):
        return np.random.default_rng(rng)
    raise TypeError(f"check_layer: rng must be a numpy.random.Generator or a seed, got {rng!r}")


def _refuse_labels_as_input(layer: Any, inputs: tuple[Any, ...], target: Any) -> None:
    """Labels given as a second input would be differentiated as floats: say where they go."""
    from scratchnn.layers.losses import Loss

    if target is not None or len(inputs) < 2:
        return
    try:
        parameters = list(inspect.signature(layer.forward).parameters)
    except (TypeError, ValueError):
        parameters = []
    # The book names a loss's labels t; scratchnn's losses are Loss.
    labelled = isinstance(layer, Loss) or (len(parameters) >= 2 and parameters[1] == "t")
    if labelled:
        raise TypeError(
            "check_layer: this layer's second input is its labels; pass them as target=t "
            "(labels are not differentiated)"
        )


def _refuse_randomness(layer: Any) -> None:
    from scratchnn.layers.regularization import Dropout

    in_training = getattr(layer, "training", True) is not False
    if (isinstance(layer, Dropout) or "dropout" in type(layer).__name__.lower()) and in_training:
        raise ValueError(
            "check_layer: Dropout draws a new mask each forward, so in training mode there is "
            "no one function to differentiate; check it with training = False, or check "
            "that backward multiplies dout by forward's mask by hand"
        )


def _float64_copy(value: Any, what: str) -> np.ndarray:
    if value is None or isinstance(value, (str, bytes)) or type(value).__module__.startswith("cupy"):
        raise TypeError(
            f"check_layer: {what} must be a NumPy array or a number, got {type(value).__name__}"
        )
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"check_layer: {what} must be real numbers: {error}") from None
    if array.dtype.kind not in "biuf":
        raise TypeError(f"check_layer: {what} must be real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)  # a copy: the caller's array is never moved
    if not np.isfinite(array).all():
        raise ValueError(f"check_layer: {what} must be finite (central differences of inf are NaN)")
    return array


def _layer_repr(layer: Any) -> str:
    text = repr(layer)
    # An object's default repr (<module.Class object at 0x...>) says less than its name.
    return f"{type(layer).__name__}()" if text.startswith("<") else text


def _float_arrays(layer: Any) -> dict[str, np.ndarray]:
    return {
        name: value
        for name, value in vars(layer).items()
        if isinstance(value, np.ndarray) and value.dtype.kind == "f"
    }


class _Run:
    """The copy of the layer, and the findings about it, gathered in order."""

    def __init__(self, layer: Any, labels: tuple[Any, ...]) -> None:
        self.layer = layer
        self.labels = labels
        self.findings: list[Finding] = []

    def forward(self, xs: list[np.ndarray]) -> np.ndarray:
        # Fresh copies in, a copy out: a forward that writes into its input must not
        # move the point checked, nor one that reuses its output buffer the differences.
        out = self.layer.forward(*(x.copy() for x in xs), *self.labels)
        return np.array(out, dtype=np.float64)

    def gradients(self, dout: np.ndarray, names: list[str], xs: list[np.ndarray]) -> Any:
        returned = self.layer.backward(dout)
        if returned is None:
            return None, ["backward returned None (a forgotten `return dx`?)"]
        several = isinstance(returned, (tuple, list))
        if len(xs) == 1 and several:
            return None, [
                f"backward returned {len(returned)} values for 1 input: return dx only "
                "(a layer keeps its parameters' gradients, dW and db, on itself)"
            ]
        grads = list(returned) if several else [returned]
        if len(grads) != len(xs):
            return None, [f"backward returned {len(grads)} gradients for {len(xs)} inputs"]
        problems = []
        arrays = []
        for name, x, g in zip(names, xs, grads):
            if g is None:
                problems.append(f"backward returned None for {name}")
                continue
            array = np.array(g, dtype=np.float64)
            if array.shape != x.shape:
                problems.append(f"d{name} has shape {array.shape}, {name} {x.shape}")
            arrays.append(array)
        return (None if problems else arrays), problems

    def check(
        self,
        names: list[str],
        xs: list[np.ndarray],
        dout: Any,
        h: float,
        tolerance: float,
        max_per_array: int | None,
        rng: np.random.Generator,
        shown_as: str,
    ) -> LayerCheck:
        layer = self.layer
        dict_params = isinstance(getattr(layer, "params", None), dict)
        list_params = isinstance(getattr(layer, "params", None), (list, tuple))
        kept = _float_arrays(layer)
        declared = self._declared_params()
        snapshot = {key: array.copy() for key, array in declared.items()}
        snapshot.update({name: array.copy() for name, array in kept.items()})

        given = [x.copy() for x in xs]
        raw = layer.forward(*given, *self.labels)
        out = np.array(raw, dtype=np.float64)
        inputs_unchanged = all(np.array_equal(a, b) for a, b in zip(given, xs))
        if out.dtype != np.float64 or (isinstance(raw, np.ndarray) and raw.dtype != np.float64):
            raise ValueError(
                f"check_layer: forward gave {getattr(raw, 'dtype', type(raw).__name__)} for "
                "float64 inputs; the check needs float64 throughout"
            )
        for _ in range(2):
            if not np.array_equal(self.forward(xs), out, equal_nan=True):
                raise ValueError(
                    "check_layer: forward gave two different results for the same input (it "
                    "draws random numbers?), so there is no one function to differentiate"
                )
        # What forward rebinds it caches (x, out); what it keeps may be a parameter.
        by_forward = {name for name, array in kept.items() if getattr(layer, name, None) is not array}
        upstream = self._upstream(dout, out, rng)

        self.forward(xs)
        passed_dout = upstream.copy()
        grads, problems = self.gradients(passed_dout, names, xs)
        dout_unchanged = np.array_equal(passed_dout, upstream)
        changed = int(np.count_nonzero(passed_dout != upstream))
        by_backward = {
            name
            for name, array in kept.items()
            if name not in by_forward and getattr(layer, name, None) is not array
        }
        params, param_grads, unchecked, replaced = self._params(
            kept, by_forward, by_backward, declared, list_params
        )
        problems += [
            f"no gradient for parameter {key} after backward"
            for key, g in param_grads.items()
            if g is None
        ]
        problems += [
            f"the gradient of {key} has shape {g.shape}, {key} {params[key].shape}"
            for key, g in param_grads.items()
            if g is not None and g.shape != params[key].shape
        ]
        moved = [key for key in params if not np.array_equal(params[key], snapshot[key])]
        for name in replaced:  # put back what backward rebound, so the copy is checked as given
            setattr(layer, name, kept[name])
        for key in moved:
            params[key][...] = snapshot[key]

        repeat = self._repeat(xs, upstream, names, grads, params, param_grads, snapshot)
        for name in replaced:
            setattr(layer, name, kept[name])
        gradients: dict[str, GradcheckResult] = {}
        if not problems and grads is not None:
            noise = float(np.finfo(np.float64).eps * np.sum(np.abs(out * upstream)) / h)
            floor = max(1e-5, NOISE_MARGIN * noise / tolerance)
            arrays = {**dict(zip(names, xs)), **params}
            analytic = {**dict(zip(names, grads)), **param_grads}

            def output() -> np.ndarray:
                return self.forward(xs)

            def weigh(difference: np.ndarray) -> float:
                # Differences weighted after subtracting: outputs that do not depend on the
                # moved element cancel exactly instead of adding their rounding noise.
                return float(np.sum(difference * upstream))

            for key, array in arrays.items():
                gradients[key] = _worst_difference(
                    key, array, analytic[key], output, h, max_per_array, rng, floor, weigh
                )

        findings = [_gradient_finding(key, result, tolerance) for key, result in gradients.items()]
        shapes = {**dict(zip(names, xs)), **params}
        findings.append(
            Finding(
                "each gradient has its array's shape",
                not problems,
                "; ".join(problems) or ", ".join(f"d{k} {a.shape}" for k, a in shapes.items()),
            )
        )
        findings.append(
            Finding(
                "a second forward and backward give the same gradients", not repeat, "; ".join(repeat)
            )
        )
        findings.append(
            Finding(
                "backward leaves dout as it was",
                dout_unchanged,
                "" if dout_unchanged
                else f"it wrote into dout ({changed} of {upstream.size} elements changed)",
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
        altered = [f"backward replaced {name}" for name in replaced] + [
            f"{key} changed" for key in moved
        ]
        if params or altered:
            findings.append(
                Finding(
                    "forward and backward leave the parameters as they were",
                    not altered,
                    "; ".join(altered) + (" (an update belongs to the optimiser)" if altered else ""),
                )
            )
        if unchecked and not dict_params:
            findings.append(
                Finding(
                    "every array the layer keeps has its gradient",
                    False,
                    ", ".join(f"{name} has no d{name} after backward" for name in unchecked)
                    + ", so it was not checked",
                )
            )
        return LayerCheck(shown_as, tuple(findings), gradients)

    def _declared_params(self) -> dict[str, np.ndarray]:
        """The parameters a layer names itself: scratchnn's dict, or the sequel's list."""
        params = getattr(self.layer, "params", None)
        if isinstance(params, dict):
            items = list(params.items())
        elif isinstance(params, (list, tuple)):
            items = [(f"params[{i}]", array) for i, array in enumerate(params)]
        else:
            return {}
        declared = {}
        for key, array in items:
            if not isinstance(array, np.ndarray):
                continue  # a hyperparameter kept beside the arrays (lr, momentum)
            if array.dtype != np.float64:
                raise ValueError(
                    f"check_layer: parameter {key} is {array.dtype}; build the layer in float64 "
                    "(central differences in float32 have no digits left)"
                )
            declared[key] = array
        return declared

    def _params(
        self,
        kept: dict[str, np.ndarray],
        by_forward: set[str],
        by_backward: set[str],
        declared: dict[str, np.ndarray],
        list_params: bool,
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray | None], list[str], list[str]]:
        """After the first backward: the parameters, their gradients, the kept arrays
        left unchecked, and the parameters backward rebound."""
        layer = self.layer
        if declared or isinstance(getattr(layer, "params", None), dict):
            grads = getattr(layer, "grads", None)
            if list_params and isinstance(grads, (list, tuple)):
                found = {f"params[{i}]": g for i, g in enumerate(grads)}
            elif isinstance(grads, dict):
                found = dict(grads)
            else:
                found = {}
            declared_grads = {
                key: None if found.get(key) is None else np.array(found[key], dtype=np.float64)
                for key in declared
            }
            return dict(declared), declared_grads, [], []
        gradient_names = {name for name in kept if name[:1] == "d" and name[1:] in vars(layer)}
        params: dict[str, np.ndarray] = {}
        param_grads: dict[str, np.ndarray | None] = {}
        replaced: list[str] = []
        unchecked: list[str] = []
        for name, array in kept.items():
            if name in gradient_names:
                continue
            partner = getattr(layer, "d" + name, None)
            if name in by_forward:
                continue  # a cache, such as x
            if name in by_backward:
                if partner is not None:
                    replaced.append(name)  # W = W - lr * dW inside backward
                continue
            if partner is None:
                unchecked.append(name)
                continue
            if array.dtype != np.float64:
                raise ValueError(
                    f"check_layer: parameter {name} is {array.dtype}; build the layer in float64 "
                    "(central differences in float32 have no digits left)"
                )
            params[name] = array
            param_grads[name] = np.array(partner, dtype=np.float64)
        return params, param_grads, unchecked, replaced

    def _upstream(self, dout: Any, out: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if dout is not None:
            upstream = _float64_copy(dout, "dout")
            if upstream.shape != out.shape:
                raise ValueError(
                    f"check_layer: dout has shape {upstream.shape}, the layer's output {out.shape}"
                )
            return upstream
        if out.ndim == 0:  # a loss: the book's backward(dout=1)
            return np.ones((), dtype=np.float64)
        return rng.standard_normal(out.shape)

    def _repeat(
        self,
        xs: list[np.ndarray],
        upstream: np.ndarray,
        names: list[str],
        grads: list[np.ndarray] | None,
        params: dict[str, np.ndarray],
        param_grads: dict[str, np.ndarray | None],
        snapshot: dict[str, np.ndarray],
    ) -> list[str]:
        """A second forward and backward at the same point; what differs from the first."""
        if grads is None:
            return []
        self.forward(xs)
        again, _ = self.gradients(upstream.copy(), names, xs)
        differ = []
        if again is not None:
            differ += [
                f"d{name} differs"
                for name, first, second in zip(names, grads, again)
                if not np.array_equal(first, second, equal_nan=True)
            ]
        for key in params:
            first, second = param_grads.get(key), self._current_grad(key)
            if first is not None and second is not None and not np.array_equal(
                first, second, equal_nan=True
            ):
                differ.append(f"d{key} differs (does backward add to d{key} instead of setting it?)")
            if not np.array_equal(params[key], snapshot[key]):
                params[key][...] = snapshot[key]
        return differ

    def _current_grad(self, key: str) -> np.ndarray | None:
        layer = self.layer
        grads = getattr(layer, "grads", None)
        if key.startswith("params[") and isinstance(grads, (list, tuple)):
            g = grads[int(key[7:-1])]
        elif isinstance(grads, dict):
            g = grads.get(key)
        else:
            g = getattr(layer, "d" + key, None)
        return None if g is None else np.array(g, dtype=np.float64)


def _gradient_finding(key: str, result: GradcheckResult, tolerance: float) -> Finding:
    if result.checked == 0:
        return Finding(f"d{key} matches central differences", True, f"{key} has no elements")
    return Finding(
        f"d{key} matches central differences",
        result.max_relative_error < tolerance,  # NaN fails
        f"worst relative error {result.max_relative_error:.2e} at {key}{list(result.index)} "
        f"(backprop {result.analytic:.10g}, numerical {result.numeric:.10g})",
    )


