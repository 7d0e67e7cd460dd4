"""``check_layer``: one layer's backward checked as a learner wants it checked, and reported.

It works on a copy of the layer, so the layer given is never changed. The
copy's parameters are found as scratchnn names them (``params`` and
``grads`` dicts), as the book's sequel does (``params`` and ``grads``
lists, gradients written in place), or as the book does: an attribute
``W`` (an array or a float) beside a gradient ``dW`` that backward sets,
where ``W`` is not rebound by each forward, as the cached ``x`` is.
"""

from __future__ import annotations

import copy
import inspect
import types
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from scratchnn import _checks
from scratchnn.gradient_check import GradcheckResult

if TYPE_CHECKING:
    from scratchnn._layer_run import Outputs


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
    the parameters by name. ``notes`` say what was not checked, and why.
    """

    layer: str
    findings: tuple[Finding, ...]
    gradients: dict[str, GradcheckResult]
    notes: tuple[str, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return all(finding.passed for finding in self.findings)

    def __str__(self) -> str:
        head = f"check_layer({self.layer}): {'passed' if self.passed else 'FAILED'}"
        lines = [head, *(f"  {finding}" for finding in self.findings)]
        return "\n".join(lines + [f"  note  {note}" for note in self.notes])


def check_layer(
    layer: Any,
    *inputs: Any,
    target: Any = None,
    dout: Any = None,
    forward_kwargs: dict[str, Any] | None = None,
    h: float = 1e-5,
    tolerance: float = 1e-5,
    max_per_array: int | None = None,
    rng: np.random.Generator | int | None = None,
) -> LayerCheck:
    """Check one layer's ``backward`` and report what holds and what does not.

    ``layer`` is any object with ``forward(*inputs)`` and ``backward(dout)``:
    a scratchnn layer, or one written as the book or its sequel writes them.
    A layer with several outputs takes one upstream gradient for each (the
    sequel's LSTM: ``forward(x, h_prev, c_prev)`` returns ``h_next, c_next``,
    ``backward(dh_next, dc_next)``); ``dout`` is then a tuple, one array per
    output, and the outputs are compared as one (``sum`` over all of
    ``output * dout``).
    A loss takes its labels as ``target`` (``forward(x, target)``);
    ``forward_kwargs`` go to every forward call (``{"train_flg": False}``).
    Float inputs are differentiated, and so are integer ones the layer takes
    as numbers (``np.array([[1, 2, 3]])``); integers it takes as indices or
    labels (it fails on them as floats) are passed as they are, not
    differentiated, and named in a note. A copy of the layer runs in float64
    with the upstream gradient ``dout``: by default 1 for a loss (a scalar
    output of a layer given labels, as the book's ``backward(dout=1)``) and
    else drawn from ``rng``'s standard normal (ones would hide errors:
    Softmax's true gradient is then zero; a backward that ignores ``dout``
    passes with 1). It reports:

    - for each float input and each parameter, the worst relative error
      ``|a - n| / max(|a| + |n|, floor)`` between backward's gradient ``a``
      and the central difference ``n`` of ``sum(forward(inputs) * dout)``
      with step ``h``, over ``max_per_array`` random elements of each array
      or all; it holds below ``tolerance``. The ``floor`` keeps the
      differences' rounding noise, about ``eps * sum|y * dout| / h``
      absolute over the outputs the element moves, from failing gradients
      near zero (that noise times 100 over ``tolerance``, and at least
      1e-5). Where the slopes from either side differ, the step is halved:
      on a kink (ReLU's 0, a tie in a max) the difference stays and the
      element is skipped and named; from curvature it halves, and
      Richardson's extrapolation gives the derivative; a kink within the
      step but farther than about ``h/100`` is left behind by a smaller
      step (nearer, the element is skipped with it);
    - that backward returns one gradient per input (not None, not also
      ``dW`` and ``db``) and sets one per parameter, each of its array's
      shape (in the sequel's style, written into ``grads[i]``, not rebound);
    - that a copy of the layer that has run all these passes gives, at
      another input (``inputs`` shuffled; inputs of one sign also with their
      signs turned, where the layer takes them), the same gradients as a copy of
      the layer as given (a ``dW +=`` never reset, or a cache filled once,
      does not; a layer that had run before it was given is its own
      reference, so check a new instance);
    - that backward leaves ``dout`` as it was, forward and backward the
      inputs, backward forward's output (the seed's ``Relu.backward``
      zeroes the caller's ``dout``), and forward and backward the
      parameters (an update belongs to the optimiser).

    Inputs within ``h`` of a pole or the edge of the domain (1/x at
    ``|x| <= h``) cannot be differenced; features whose mean is a thousand
    times their spread cancel more digits in ``x - mean`` than the floor
    allows. The default ``rng`` is seeded with a constant of its own, not 0
    (a learner's ``x`` drawn with seed 0 would be its ``dout``), and a
    ``dout`` that lies on a line with an input is drawn again.

    Notes name what was not checked: integer inputs taken as indices, an
    array kept without a gradient (taken as a constant), a parameter that
    each forward rebinds (a reshape), layers held inside the layer whose
    arrays were not checked. The layer given is not changed: check_layer
    works on a copy. A layer that draws random
    numbers in forward (Dropout in training mode) is refused.

    >>> from scratchnn import Sigmoid
    >>> report = check_layer(Sigmoid(), np.array([[0.5, -1.0], [2.0, 0.0]]))
    >>> report.passed
    True
    >>> print(report)  # doctest: +ELLIPSIS
    check_layer(Sigmoid()): passed
      ok    dx matches central differences: worst relative error ... at x[...]...
      ok    each gradient is there, with its array's shape: dx (2, 2)
      ok    after earlier use, the gradients match a fresh layer's
      ok    backward leaves dout as it was
      ok    forward and backward leave x as it was
      ok    backward leaves forward's output as it was
    """
    if not _is_layer(layer):
        raise TypeError(
            f"check_layer: the layer must have forward and backward methods; got {type(layer).__name__}"
        )
    if not inputs:
        raise TypeError("check_layer: give the layer's input(s) after the layer")
    if not hasattr(layer, "__dict__"):
        raise TypeError(
            f"check_layer reads a layer's attributes, and {type(layer).__name__} keeps them in "
            "__slots__: check it without __slots__"
        )
    h = _checks.positive("check_layer", "h", h)
    tolerance = _checks.positive("check_layer", "tolerance", tolerance)
    if max_per_array is not None:
        max_per_array = _checks.count("check_layer", "max_per_array", max_per_array)
    if forward_kwargs is None:
        forward_kwargs = {}
    if not isinstance(forward_kwargs, dict):
        raise TypeError(f"check_layer: forward_kwargs must be a dict, got {forward_kwargs!r}")
    outputs = _upstream_slots(layer)
    _refuse_randomness(layer, forward_kwargs)
    names = ["x"] if len(inputs) == 1 else [f"x{i}" for i in range(len(inputs))]
    xs = [_input_copy(x, name) for x, name in zip(inputs, names)]
    xs, indices = _floats_where_taken(layer, xs, names, target, forward_kwargs)
    _refuse_float_labels(layer, xs, target)
    from scratchnn._layer_run import Run  # it imports this module's report types

    run = Run(_copy_of(layer), _copy_of(layer), target, forward_kwargs, names, xs, outputs)
    run.notes += [
        f"{name} is taken as indices, labels or a mask: not differentiated"
        for name in indices
    ]
    return run.check(dout, h, tolerance, max_per_array, _generator(rng), _layer_repr(layer))


# -- arguments -------------------------------------------------------------------------


def _is_layer(value: Any) -> bool:
    """Whether ``value`` has the two methods every layer has."""
    return callable(getattr(value, "forward", None)) and callable(getattr(value, "backward", None))


DEFAULT_SEED = 20_260_529


def _generator(rng: object) -> np.random.Generator:
    if rng is None:
        # Not seed 0: a learner's x drawn from default_rng(0) would be the dout drawn
        # here, and a backward right only for dout proportional to x would pass.
        return np.random.default_rng(DEFAULT_SEED)
    return _checks.generator("check_layer", rng)


def _upstream_slots(layer: Any) -> Outputs:
    """backward's positional parameters, one upstream gradient per output of forward
    (``dout``; the sequel's LSTM: ``dh_next, dc_next``); how many outputs there are is
    settled by forward's result."""
    from scratchnn._layer_run import Outputs

    try:
        signature = inspect.signature(layer.backward)
    except ValueError:  # no signature to read (a builtin): let the call decide
        return Outputs(["dout"], 1, None)
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    parameters = list(signature.parameters.values())
    slots = [p.name for p in parameters if p.kind in positional]
    required = sum(1 for p in parameters if p.kind in positional and p.default is p.empty)
    varargs = next((p.name for p in parameters if p.kind is p.VAR_POSITIONAL), None)
    keyword_only = [p.name for p in parameters if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if keyword_only:
        raise TypeError(
            f"check_layer: backward takes {', '.join(keyword_only)} by keyword only; give it its "
            "upstream gradients as positional parameters, one per output (backward(self, dh, dc))"
        )
    if not slots and varargs is None:
        raise TypeError(
            "check_layer: backward must take the upstream gradient dout (the book writes "
            "backward(self, dout=1) even for a loss)"
        )
    return Outputs(slots, required, varargs)


def _refuse_randomness(layer: Any, forward_kwargs: dict[str, Any]) -> None:
    from scratchnn.layers.regularization import Dropout

    if not (isinstance(layer, Dropout) or "dropout" in type(layer).__name__.lower()):
        return
    flags = ("training", "train_flg", "train", "is_training")
    if any(getattr(layer, flag, True) is False for flag in flags) or any(
        forward_kwargs.get(flag) is False for flag in flags
    ):
        return  # evaluation mode: the identity, which the check can differentiate
    raise ValueError(
        "check_layer: Dropout draws a new mask each forward, so in training mode there is no "
        "one function to differentiate; check by hand that backward multiplies dout by the "
        "mask forward drew (scratchnn's Dropout can also be checked with training = False)"
    )


def _input_copy(value: Any, what: str) -> np.ndarray:
    """A float64 copy of a float input, or a copy of an integer one (not differentiated)."""
    if value is None or isinstance(value, (str, bytes)) or type(value).__module__.startswith("cupy"):
        raise TypeError(
            f"check_layer: {what} must be a NumPy array or a number, got {type(value).__name__}"
        )
    try:
        array = np.array(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"check_layer: {what} must be real numbers: {error}") from None
    if array.dtype.kind in "biu":
        return array
    if array.dtype.kind != "f":
        raise TypeError(f"check_layer: {what} must be real numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise ValueError(f"check_layer: {what} must be finite (central differences of inf are NaN)")
    return array


def _floats_where_taken(
    layer: Any,
    xs: list[np.ndarray],
    names: list[str],
    target: Any,
    forward_kwargs: dict[str, Any],
) -> tuple[list[np.ndarray], list[str]]:
    """Integer inputs as float64, to be differentiated, where the layer takes them as
    numbers (``np.array([[1, 2, 3]])`` typed for an Affine); else as they are, named:
    indices and labels fail as floats (the sequel's Embedding, a loss's t) or are
    rounded (``idx.astype(int)``), so that moving them by less than a half changes nothing."""
    indices = [names[i] for i, x in enumerate(xs) if x.dtype.kind == "b"]
    labels = () if target is None else (target,)

    def output(arrays: list[np.ndarray]) -> np.ndarray:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = _copy_of(layer).forward(
                *(a.copy() for a in arrays), *copy.deepcopy(labels), **forward_kwargs
            )
            parts = out if isinstance(out, (tuple, list)) else (out,)  # several outputs
            return np.concatenate([np.array(part, dtype=np.float64).ravel() for part in parts])

    for i, x in enumerate(xs):
        if x.dtype.kind not in "iu":
            continue
        as_float = [*xs[:i], x.astype(np.float64), *xs[i + 1 :]]
        # Each element moved by its own amount under a half (a softmax ignores a shift
        # of all of them alike; astype(int) undoes any of them).
        shift = 0.25 + 0.2 * np.linspace(0.0, 1.0, x.size).reshape(x.shape)
        shift = np.where(x < 0, -shift, shift)  # away from zero: astype(int) truncates
        moved = [*xs[:i], x.astype(np.float64) + shift, *xs[i + 1 :]]
        try:
            numeric = not np.array_equal(output(as_float), output(moved), equal_nan=True)
        except Exception:  # the layer indexes with them, or checks their dtype
            numeric = False
        if numeric:
            xs = as_float
        else:
            indices.append(names[i])
    return xs, indices


def _refuse_float_labels(layer: Any, xs: list[np.ndarray], target: Any) -> None:
    """One-hot labels given as a second input would be differentiated: say where they go."""
    from scratchnn.layers.losses import Loss

    if target is not None or len(xs) != 2 or xs[1].dtype.kind != "f":
        return
    try:
        parameters = list(inspect.signature(layer.forward).parameters)
    except (TypeError, ValueError):
        parameters = []
    second = parameters[1] if len(parameters) >= 2 else ""
    label_names = ("t", "label", "labels", "target", "targets", "y_true", "t_onehot", "answer")
    if isinstance(layer, Loss) or second in label_names:
        raise TypeError(
            "check_layer: this layer's second input is its labels; pass them as target=t "
            "(labels are not differentiated)"
        )


def _copy_of(layer: Any) -> Any:
    # Modules (self.xp = np, as the book's GPU code keeps) are shared, not copied.
    memo = {id(v): v for v in vars(layer).values() if isinstance(v, types.ModuleType)}
    try:
        return copy.deepcopy(layer, memo)
    except Exception as error:
        raise TypeError(
            f"check_layer works on a copy of the layer, and {type(layer).__name__} cannot be "
            f"copied: {error}"
        ) from None


def _layer_repr(layer: Any) -> str:
    text = repr(layer)
    # An object's default repr (<module.Class object at 0x...>) says less than its name.
    return f"{type(layer).__name__}()" if text.startswith("<") else text
