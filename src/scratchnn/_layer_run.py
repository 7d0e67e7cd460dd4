"""The run behind :func:`scratchnn.check_layer`: a copy of the layer, driven as each check
needs it, and the numerical comparison of its gradients."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from scratchnn.gradient_check import GradcheckResult
from scratchnn.layer_check import Finding, LayerCheck, _copy_of, _input_copy, _is_layer

# Central differences agree with an exact gradient to about eps * sum|y * dout| / h
# absolute, summed over the outputs an element moves (and the largest output); the
# floor of the relative error's denominator is that noise times this factor over the
# tolerance, so that rounding alone does not fail a gradient near zero.
NOISE_MARGIN = 100
# Slopes from the left and from the right that differ by more than this (relatively,
# beyond their rounding noise) are looked at with a halved step, at most MAX_HALVINGS
# times: a kink (ReLU's 0, a tie in a max) keeps its jump, curvature halves it.
KINK = 1e-2
MAX_HALVINGS = 10
# A jump that keeps more than this much of itself when the step halves is a kink's
# (exactly all of it for a piecewise-linear one); one that keeps less, a kink within the
# step (a fraction (1 - 2a/s) / (1 - a/s) for a kink at a) or curvature (a half).
KINK_STAYS = 0.99
NOTHING_TO_DIFFERENTIATE = (
    "check_layer: nothing to differentiate: the inputs are indices or labels (integers the "
    "layer does not take as numbers) and the layer has no parameters; give float inputs"
)


class Outputs:
    """A layer's outputs as one vector, and one vector as backward's upstream gradients.

    A layer with one output (any shape, a loss's scalar) is compared as it is; one with
    several (the sequel's LSTM returns ``h_next, c_next`` and its backward takes
    ``dh_next, dc_next``) has them flattened and joined, so that central differences
    of ``sum(outputs * douts)`` take every output's share at once. How many there are
    is settled by forward's first result, as far as backward can take that many.
    """

    def __init__(self, slots: list[str], required: int, varargs: str | None) -> None:
        # backward's positional parameters, how many of them have no default, its *args
        self.slots, self.required, self.varargs = slots, required, varargs
        self.names = ["dout"]  # one per output once settled
        self.shapes: list[tuple[int, ...]] = []

    @property
    def several(self) -> bool:
        return len(self.names) > 1

    def _takes(self, count: int) -> bool:
        return self.required <= count and (count <= len(self.slots) or self.varargs is not None)

    def settle(self, raw: Any) -> str:
        """Decide from forward's result how many outputs there are; what is wrong, or ""."""
        if raw is None:
            return "forward returned None (a forgotten `return out`?)"
        count = len(raw) if isinstance(raw, (tuple, list)) else 1
        if count >= 2 and self._takes(count):
            self.names = [
                self.slots[i] if i < len(self.slots) else f"{self.varargs}[{i - len(self.slots)}]"
                for i in range(count)
            ]
        elif self.required >= 2:
            got = f"a {type(raw).__name__} of {count} values" if count != 1 else "one output"
            return (
                f"backward takes {self.required} upstream gradients "
                f"({', '.join(self.slots[: self.required])}), one per output, but forward "
                f"returned {got}"
            )
        elif isinstance(raw, (tuple, list)):
            return (
                f"forward returned a {type(raw).__name__} of {count} values; return only the "
                "output and keep what backward needs on the layer (a layer with several "
                "outputs takes one upstream gradient for each in backward)"
            )
        for i, part in enumerate(self.parts(raw)):
            what = self.output_name(i)
            if part is None:
                return f"{what} is None (a forgotten value?)"
            try:
                np.array(part, dtype=np.float64)
            except (TypeError, ValueError):
                return f"{what} is a {type(part).__name__}, not an array or a number"
        return ""

    def output_name(self, i: int) -> str:
        if not self.several:
            return "forward's output"
        return f"forward's output {i + 1} of {len(self.names)} (for {self.names[i]})"

    def parts(self, raw: Any) -> list[Any]:
        return list(raw) if self.several else [raw]

    def join(self, raw: Any) -> np.ndarray:
        """Forward's result as one float64 array (a copy); the first call records the
        outputs' shapes."""
        if not self.several:
            return np.array(raw, dtype=np.float64)
        arrays = [np.asarray(part, dtype=np.float64) for part in raw]
        if not self.shapes:
            self.shapes = [a.shape for a in arrays]
        return np.concatenate([a.ravel() for a in arrays])

    def split(self, joined: np.ndarray) -> list[np.ndarray]:
        """One upstream gradient per output, each a copy of its own."""
        if not self.several:
            return [joined.copy()]
        parts, start = [], 0
        for shape in self.shapes:
            size = int(np.prod(shape))
            parts.append(joined[start : start + size].reshape(shape).copy())
            start += size
        return parts

    def backward(self, layer: Any, upstream: np.ndarray) -> Any:
        return layer.backward(*self.split(upstream))


class Run:
    """The copy of the layer, run as the checks need it."""

    def __init__(
        self,
        layer: Any,
        fresh: Any,
        target: Any,
        forward_kwargs: dict[str, Any],
        names: list[str],
        xs: list[np.ndarray],
        outputs: Outputs,
    ) -> None:
        self.layer = layer
        self.outputs = outputs
        self.fresh = fresh  # never run until the repeat check, to compare with
        self.notes: list[str] = []
        self.target = target
        self.kwargs = forward_kwargs
        self.names = names
        self.xs = xs
        self.differentiated = [x.dtype.kind == "f" for x in xs]
        # Float attributes become 0-d arrays, so that a parameter such as PReLU's
        # slope can be moved in place like any array.
        self.scalars = self._float_parameters()
        for copy_ in (layer, fresh):
            for name in self.scalars:
                setattr(copy_, name, np.array(getattr(copy_, name), dtype=np.float64))

    def _float_parameters(self) -> list[str]:
        """Float attributes beside a gradient (PReLU's ``a`` and ``da``), found by one pass
        of a throwaway copy; they become 0-d arrays, which the check can move in place.
        Other floats (hyperparameters) stay as they are."""
        floats = [
            name
            for name, value in vars(self.layer).items()
            if isinstance(value, (float, np.floating)) and not isinstance(value, bool)
        ]
        if not floats:
            return []
        labels = () if self.target is None else (copy.deepcopy(self.target),)
        try:
            probe = _copy_of(self.fresh)
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = probe.forward(*(x.copy() for x in self.xs), *labels, **self.kwargs)
                parts = out if isinstance(out, (tuple, list)) else (out,)  # several outputs
                probe.backward(*(np.ones_like(np.asarray(p, dtype=np.float64)) for p in parts))
        except Exception:  # the check itself will say what is wrong
            return []
        return [name for name in floats if getattr(probe, "d" + name, None) is not None]

    # What the layer holds --------------------------------------------------------------

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            name: value
            for name, value in vars(self.layer).items()
            if isinstance(value, np.ndarray) and value.dtype.kind == "f"
        }

    def declared(self) -> tuple[dict[str, np.ndarray], list[Any] | None]:
        """Parameters the layer names itself: scratchnn's dict or the sequel's list."""
        params = getattr(self.layer, "params", None)
        if isinstance(params, dict):
            items, grads = list(params.items()), None
        elif isinstance(params, (list, tuple)):
            items = [(f"params[{i}]", array) for i, array in enumerate(params)]
            grads = getattr(self.layer, "grads", None)
            grads = list(grads) if isinstance(grads, (list, tuple)) else None
        else:
            return {}, None
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
        return declared, grads

    def current_grad(self, key: str, layer: Any = None) -> np.ndarray | None:
        """The gradient ``layer`` (this copy by default) now holds for parameter ``key``."""
        layer = self.layer if layer is None else layer
        grads = getattr(layer, "grads", None)
        if key.startswith("params["):
            i = int(key[7:-1])
            g = grads[i] if isinstance(grads, (list, tuple)) and i < len(grads) else None
        elif isinstance(grads, dict) and key in grads:
            g = grads[key]
        else:
            g = getattr(layer, "d" + key, None)  # the book's W and dW
        return None if g is None else np.array(g, dtype=np.float64)

    # Forward and backward ---------------------------------------------------------------

    def call_forward_with(self, given: list[np.ndarray], layer: Any = None) -> Any:
        # A copy of the labels, as of the inputs: a loss that writes into them must
        # change neither the caller's nor the next call's.
        labels = () if self.target is None else (copy.deepcopy(self.target),)
        layer = self.layer if layer is None else layer
        return layer.forward(*given, *labels, **self.kwargs)

    def forward(self, xs: list[np.ndarray], layer: Any = None) -> np.ndarray:
        # Fresh inputs in (a forward that writes into them must not move the point
        # checked) and a copy out (one that reuses its output buffer must not make
        # every difference zero).
        return self.outputs.join(self.call_forward_with([x.copy() for x in xs], layer))

    def gradients(self, returned: Any) -> tuple[list[np.ndarray | None] | None, list[str]]:
        """backward's result as one gradient per input (None for integer inputs)."""
        n_float = sum(self.differentiated)
        if returned is None:
            if n_float == 0:
                return [None] * len(self.xs), []
            return None, ["backward returned None (a forgotten `return dx`?)"]
        several = isinstance(returned, (tuple, list))
        values = list(returned) if several else [returned]
        if len(self.xs) == 1 and several:
            if len(values) == 1:
                return None, [f"backward returned a {type(returned).__name__} (dx,): return dx itself"]
            return None, [
                f"backward returned {len(values)} values for 1 input: return dx only "
                "(a layer keeps its parameters' gradients, dW and db, on itself)"
            ]
        if len(values) == n_float < len(self.xs):  # gradients of the float inputs only
            it = iter(values)
            values = [next(it) if f else None for f in self.differentiated]
        if len(values) != len(self.xs):
            noun = "gradient" if len(values) == 1 else "gradients"
            hint = (
                f" (if {self.names[-1]} is the labels, pass it as target=)"
                if len(values) == len(self.xs) - 1 and not self.outputs.several
                else ""
            )
            return None, [f"backward returned {len(values)} {noun} for {len(self.xs)} inputs{hint}"]
        grads: list[np.ndarray | None] = []
        problems = []
        for name, x, g, float_input in zip(self.names, self.xs, values, self.differentiated):
            if not float_input:
                grads.append(None)
                continue
            if g is None:
                problems.append(f"backward returned None for {name}")
                grads.append(None)
                continue
            array = np.array(g, dtype=np.float64)
            if array.shape != x.shape:
                problems.append(f"d{name} has shape {array.shape}, {name} {x.shape}")
            grads.append(array)
        return grads, problems

    # The checks --------------------------------------------------------------------------

    def check(
        self,
        dout: Any,
        h: float,
        tolerance: float,
        max_per_array: int | None,
        rng: np.random.Generator,
        shown_as: str,
    ) -> LayerCheck:
        layer, names, xs = self.layer, self.names, self.xs
        declared, _ = self.declared()
        before = {name: array.copy() for name, array in self.arrays().items()}
        before.update({key: array.copy() for key, array in declared.items()})

        given = [x.copy() for x in xs]
        raw = self.call_forward_with(given)
        problem = self.outputs.settle(raw)
        if problem:
            return LayerCheck(shown_as, (Finding("forward returns the layer's output", False, problem),), {})
        out = self.outputs.join(raw)
        raw_parts = self.outputs.parts(raw)
        if not any(self.differentiated) and all(
            isinstance(part, np.ndarray) and part.dtype.kind in "biu" for part in raw_parts
        ):
            raise ValueError(NOTHING_TO_DIFFERENTIATE)  # integers in, integers out
        for i, part in enumerate(raw_parts):
            if isinstance(part, (np.ndarray, np.generic)) and part.dtype != np.float64:
                raise ValueError(
                    f"check_layer: {self.outputs.output_name(i)} is {part.dtype}; the check needs "
                    "float64 outputs (from float64 inputs and parameters)"
                )
        written = [n for n, a, b in zip(names, given, xs) if not np.array_equal(a, b)]
        first = {name: array.copy() for name, array in self.arrays().items()}
        # References, not ids: a freed array's id is soon another array's.
        first_arrays = self.arrays()
        self._require_one_function(out, first, first_arrays)
        # What a later forward rebinds is a cache (x, out), never a parameter.
        caches = {n for n, a in self.arrays().items() if first_arrays.get(n) is not a}
        upstream = self._upstream(dout, out, rng)

        given = [x.copy() for x in xs]
        returned_output = self.call_forward_with(given)  # what the next layer would hold
        kept_output = self.outputs.join(returned_output)
        given_at_backward = [g.copy() for g in given]
        at_backward = {name: array.copy() for name, array in self.arrays().items()}
        held = self.arrays()
        declared_now, grads_now = self.declared()  # again: forward may have made them
        grads_held = list(grads_now) if grads_now is not None else None
        passed_douts = self.outputs.split(upstream)
        grads, problems = self.gradients(layer.backward(*passed_douts))
        dout_changed = [
            (name, int(np.count_nonzero(passed != kept)), kept.size)
            for name, passed, kept in zip(
                self.outputs.names, passed_douts, self.outputs.split(upstream)
            )
        ]
        written += [
            f"{n} (by backward)"
            for n, a, b in zip(names, given, given_at_backward)
            if not np.array_equal(a, b)
        ]
        output_changed = not np.array_equal(
            self.outputs.join(returned_output), kept_output, equal_nan=True
        )

        params, param_grads, replaced, rebound_grads, notes = self._parameters(
            declared_now, grads_held, caches, held, before
        )
        problems += [f"no gradient for parameter {k} after backward" for k, g in param_grads.items() if g is None]
        problems += [
            f"the gradient of {k} has shape {g.shape}, {k} {params[k].shape}"
            for k, g in param_grads.items()
            if g is not None and g.shape != params[k].shape
        ]
        if not any(self.differentiated) and not params:
            raise ValueError(NOTHING_TO_DIFFERENTIATE)
        problems += rebound_grads
        changed = [
            f"{k} changed" for k in params if k in before and not np.array_equal(params[k], before[k])
        ]
        changed += [
            f"{k} changed" for k in params
            if k not in before and k in at_backward and not np.array_equal(params[k], at_backward[k])
        ]
        changed += replaced
        self._put_back(params, before, at_backward, declared_now)

        repeat = self._repeat(upstream, grads, params, rng)
        self._put_back(params, before, at_backward, declared_now)  # what the repeat moved

        gradients: dict[str, GradcheckResult] = {}
        findings: list[Finding] = []
        if not problems and grads is not None:
            arrays = {n: x for n, x, f in zip(names, xs, self.differentiated) if f}
            arrays.update(params)
            analytic = {n: g for n, g in zip(names, grads) if g is not None}
            analytic.update({k: g for k, g in param_grads.items() if g is not None})
            dout_shown = _random_scalars_shown(dout, upstream, self.outputs)
            for key, array in arrays.items():
                result, kinks = _compare(
                    key, array, analytic[key], lambda: self.forward(xs), out, upstream,
                    h, tolerance, max_per_array, rng,
                )
                gradients[key] = result
                findings.append(_gradient_finding(key, result, kinks, tolerance, dout_shown))
        shapes = {n: x for n, x, f in zip(names, xs, self.differentiated) if f}
        shapes.update(params)
        findings.append(
            Finding(
                "each gradient is there, with its array's shape",
                not problems,
                "; ".join(problems) or ", ".join(f"d{k} {a.shape}" for k, a in shapes.items()),
            )
        )
        findings += _state_findings(
            names, repeat, dout_changed, written, output_changed, params, changed
        )
        return LayerCheck(shown_as, tuple(findings), gradients, tuple(self.notes + notes))

    def _require_one_function(
        self, out: np.ndarray, values: dict[str, np.ndarray], arrays: dict[str, np.ndarray]
    ) -> None:
        for _ in range(2):
            if not np.array_equal(self.forward(self.xs), out, equal_nan=True):
                # Kept arrays (not rebound) whose values forward changed: W *= 0.999.
                moved = [
                    name
                    for name, array in self.arrays().items()
                    if arrays.get(name) is array
                    and not np.array_equal(array, values[name], equal_nan=True)
                ]
                why = (
                    f"forward changes what the layer keeps ({', '.join(moved)})"
                    if moved
                    else "forward draws random numbers or changes the layer's state"
                )
                raise ValueError(
                    f"check_layer: forward gave two different results for the same input: {why}, "
                    "so there is no one function to differentiate"
                )

    def _upstream(self, dout: Any, out: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if dout is not None:
            return self._given_upstream(dout, out)
        is_loss = self.target is not None or not all(self.differentiated)  # it has labels
        if out.ndim == 0 and is_loss:  # the book's backward(dout=1)
            return np.ones((), dtype=np.float64)
        for _ in range(8):
            upstream = rng.standard_normal(out.shape)
            # A dout proportional to an input (both drawn from one seed) would pass a
            # backward that is right only for that dout: draw again.
            parts = self.outputs.split(upstream)
            if not any(_proportional(part, x) for part in parts for x in self.xs):
                break
        return upstream

    def _given_upstream(self, dout: Any, out: np.ndarray) -> np.ndarray:
        """The caller's dout (one array per output for several) as one vector."""
        names, shapes = self.outputs.names, self.outputs.shapes or [out.shape]
        if self.outputs.several and (not isinstance(dout, (tuple, list)) or len(dout) != len(names)):
            raise TypeError(
                f"check_layer: the layer has {len(names)} outputs; give dout as a tuple of "
                f"{len(names)} arrays ({', '.join(names)})"
            )
        given = list(dout) if self.outputs.several else [dout]
        arrays = []
        for name, part, shape in zip(names, given, shapes):
            array = _input_copy(part, name).astype(np.float64)
            if array.shape != shape:
                what = "the layer's output" if len(names) == 1 else "its output"
                raise ValueError(f"check_layer: {name} has shape {array.shape}, {what} {shape}")
            arrays.append(array)
        return np.concatenate([a.ravel() for a in arrays]) if self.outputs.several else arrays[0]

    def _parameters(
        self,
        declared: dict[str, np.ndarray],
        grads_held: list[Any] | None,
        caches: set[str],
        held: dict[str, np.ndarray],
        before: dict[str, np.ndarray],
    ) -> tuple[
        dict[str, np.ndarray], dict[str, np.ndarray | None], list[str], list[str], list[str]
    ]:
        """After backward: the parameters, their gradients, the parameters backward
        rebound, the sequel's grads[i] it rebound, and notes."""
        layer = self.layer
        if isinstance(getattr(layer, "params", None), (dict, list, tuple)):
            replaced, rebound_grads = [], []
            params_now = layer.params
            if isinstance(params_now, (list, tuple)):
                for i, key in enumerate(declared):
                    if i < len(params_now) and params_now[i] is not declared[key]:
                        replaced.append(f"backward replaced {key}")
            grads_after = getattr(layer, "grads", None)
            if grads_held is not None and isinstance(grads_after, (list, tuple)):
                for i, old in enumerate(grads_held):
                    if i < len(grads_after) and grads_after[i] is not old:
                        rebound_grads.append(
                            f"backward replaced grads[{i}] instead of writing into it "
                            f"(grads[{i}][...] = ...; the optimiser holds the old array)"
                        )
            declared_grads: dict[str, np.ndarray | None] = {
                key: self.current_grad(key) for key in declared
            }
            # Arrays kept book-style beside the declared ones (a bias added to the
            # sequel's MatMul, W and b under an empty params list) are checked too.
            extra, extra_grads, extra_replaced, extra_notes = self._book_style(
                caches, held, before, {id(a) for a in declared.values()}
            )
            params = {**declared, **extra}
            return (
                params,
                {**declared_grads, **extra_grads},
                replaced + extra_replaced,
                rebound_grads,
                self._inner_layer_notes(params) + extra_notes,
            )
        params, param_grads, replaced, notes = self._book_style(caches, held, before, set())
        return params, param_grads, replaced, [], self._inner_layer_notes(params) + notes

    def _book_style(
        self,
        caches: set[str],
        held: dict[str, np.ndarray],
        before: dict[str, np.ndarray],
        declared_ids: set[int],
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray | None], list[str], list[str]]:
        """Parameters as the book keeps them: an array W beside a dW that backward sets.
        Constants are noted only where the layer declares no parameters of its own."""
        layer = self.layer
        attributes = vars(layer)
        gradient_names = {n for n in attributes if n[:1] == "d" and n[1:] in attributes}
        params: dict[str, np.ndarray] = {}
        param_grads: dict[str, np.ndarray | None] = {}
        replaced, constants, rebound = [], [], []
        for name, array in self.arrays().items():
            if name in gradient_names or name not in held or id(array) in declared_ids:
                continue  # a gradient, something backward made, or a declared parameter
            has_gradient = ("d" + name) in attributes  # set, or still None: forgotten
            if name in caches:
                # Rebound by each forward: a cache such as x, unless it holds no input (a
                # parameter reshaped in forward, which the check cannot move).
                if has_gradient and name in before and not any(
                    array.shape == x.shape and np.array_equal(array, x) for x in self.xs
                ):
                    rebound.append(name)
                continue
            partner = attributes.get("d" + name)
            if held[name] is not array:
                if partner is not None:
                    replaced.append(f"backward replaced {name}")  # W = W - lr * dW in backward
                continue
            if not has_gradient:
                # A constant (a fixed scale) is as it was before the first forward; state
                # that forward writes into (running statistics, an output buffer) is not.
                if (
                    not declared_ids
                    and name not in self.scalars
                    and name in before
                    and np.array_equal(array, before[name])
                ):
                    constants.append(name)
                continue
            if array.dtype != np.float64:
                raise ValueError(
                    f"check_layer: parameter {name} is {array.dtype}; build the layer in float64 "
                    "(central differences in float32 have no digits left)"
                )
            params[name] = array
            param_grads[name] = None if partner is None else np.array(partner, dtype=np.float64)
        notes = []
        if constants:
            notes.append(
                ", ".join(f"{n} has no d{n}" for n in constants) + ": taken as constant, not checked"
            )
        if rebound:
            notes.append(
                ", ".join(rebound)
                + " rebound by each forward, so not checked as a parameter: right for a state "
                "such as the sequel's h; a parameter reshaped in forward should stay as it is, "
                "reshaped into a local variable"
            )
        return params, param_grads, replaced, notes

    def _inner_layer_notes(self, checked: dict[str, np.ndarray]) -> list[str]:
        """Layers held inside this one whose arrays were not among those checked (the
        sequel's composite layers share theirs through params, and are checked)."""
        checked_ids = {id(array) for array in checked.values()}

        def unchecked(inner: Any) -> bool:
            # Its parameters: as it declares them, or arrays beside a gradient (W, dW);
            # what it caches (out, mask) is none.
            params = getattr(inner, "params", None)
            if isinstance(params, dict):
                arrays = list(params.values())
            elif isinstance(params, (list, tuple)):
                arrays = list(params)
            else:
                fields = vars(inner)
                arrays = [
                    v
                    for n, v in fields.items()
                    if isinstance(v, np.ndarray) and fields.get("d" + n) is not None
                ]
            return any(isinstance(a, np.ndarray) and id(a) not in checked_ids for a in arrays)

        notes = []
        for name, value in vars(self.layer).items():
            if _is_layer(value) and unchecked(value):
                notes.append(
                    f"{name} is a layer inside this one: its parameters are not checked here; "
                    "check it alone"
                )
            elif isinstance(value, (list, tuple)) and any(
                _is_layer(v) and unchecked(v) for v in value
            ):
                notes.append(
                    f"{name} holds layers: their parameters are not checked here; check each alone"
                )
        return notes

    def _put_back(
        self,
        params: dict[str, np.ndarray],
        before: dict[str, np.ndarray],
        at_backward: dict[str, np.ndarray],
        declared: dict[str, np.ndarray],
    ) -> None:
        """Parameters back to the values forward used; rebound ones back to their arrays."""
        for key, array in params.items():
            value = before.get(key, at_backward.get(key))
            if value is not None and not np.array_equal(array, value):
                array[...] = value
        params_list = getattr(self.layer, "params", None)
        if isinstance(params_list, list):
            for i, key in enumerate(declared):
                if i < len(params_list):
                    params_list[i] = declared[key]

    def _repeat(
        self,
        upstream: np.ndarray,
        grads: list[np.ndarray | None] | None,
        params: dict[str, np.ndarray],
        rng: np.random.Generator,
    ) -> list[str]:
        """Forward and backward at another input, by this used copy and by a fresh one;
        what differs (a dW += never reset, a cache filled once and kept)."""
        if grads is None:
            return []
        # The inputs' own values shuffled, and moved a little: inside the layer's domain
        # (a log's positive inputs stay positive), but with signs and maxima elsewhere.
        elsewhere = [
            rng.permutation(x.ravel()).reshape(x.shape) * (1 + 0.1 * rng.standard_normal(x.shape))
            if float_input
            else x
            for x, float_input in zip(self.xs, self.differentiated)
        ]
        # Inputs of one sign keep it in any shuffle, and so would a cache filled at the
        # first forward only (a ReLU's mask of all-positive inputs): the same values with
        # their sign turned show it, where the layer takes them (finite, without a warning).
        mirrored = [-x if f else x for x, f in zip(elsewhere, self.differentiated)]
        one_signed = all(
            bool(np.all(x >= 0) or np.all(x <= 0))
            for x, f in zip(self.xs, self.differentiated)
            if f
        )
        spare = _copy_of(self.fresh) if one_signed and any(self.differentiated) else None
        differ = self._used_against_fresh(self.fresh, elsewhere, upstream, params)
        if not differ and spare is not None and self._takes(spare, mirrored):
            differ = self._used_against_fresh(spare, mirrored, upstream, params)
        return differ

    def _takes(self, fresh: Any, xs: list[np.ndarray]) -> bool:
        """Whether a copy of ``fresh`` runs forward at ``xs`` to finite outputs, silently."""
        probe = _copy_of(fresh)
        try:
            with np.errstate(all="raise"), warnings.catch_warnings():
                warnings.simplefilter("error")
                out = self.forward(xs, probe)
        except Exception:  # outside the layer's domain: nothing to learn there
            return False
        return bool(np.all(np.isfinite(out)))

    def _used_against_fresh(
        self, fresh: Any, xs: list[np.ndarray], upstream: np.ndarray, params: dict[str, np.ndarray]
    ) -> list[str]:
        """Forward and backward at ``xs`` by the used layer and by ``fresh``, never run
        before; the gradients that differ."""
        results = []
        for layer in (fresh, self.layer):
            self.forward(xs, layer)
            if layer is fresh:
                # Weights drawn at the first forward (np.random, unseeded) differ between
                # the copies: the fresh one gets the used one's, then runs again.
                for key, array in params.items():
                    mine = _param_array(layer, key)
                    if isinstance(mine, np.ndarray) and mine.shape == array.shape:
                        mine[...] = array
                self.forward(xs, layer)
            dxs, _ = self.gradients(self.outputs.backward(layer, upstream))
            results.append((dxs, {key: self.current_grad(key, layer) for key in params}))
        (fresh_dxs, fresh_grads), (used_dxs, used_grads) = results
        differ = []
        if fresh_dxs is not None and used_dxs is not None:
            differ += [
                f"d{name} differs (a cache that forward fills once and not again?)"
                for name, first, second in zip(self.names, fresh_dxs, used_dxs)
                if first is not None
                and second is not None
                and not np.array_equal(first, second, equal_nan=True)
            ]
        for key in params:
            first, second = fresh_grads[key], used_grads[key]
            if first is not None and second is not None and not np.array_equal(
                first, second, equal_nan=True
            ):
                differ.append(f"d{key} differs (does backward add to d{key} instead of setting it?)")
        return differ


def _random_scalars_shown(dout: Any, upstream: np.ndarray, outputs: Outputs) -> str:
    """Random scalar douts, for a failing gradient's report: each is a factor that a
    backward ignoring its dout is wrong by."""
    if dout is not None:
        return ""
    if not outputs.several:
        if upstream.ndim != 0 or float(upstream) == 1.0:
            return ""
        return (
            f" with dout = {float(upstream):.6g} (random: a scalar output without labels; "
            "give dout=1 if this is a loss)"
        )
    if any(shape != () for shape in outputs.shapes):
        return ""
    shown = ", ".join(f"{name} = {float(v):.6g}" for name, v in zip(outputs.names, upstream))
    return f" with {shown} (random: scalar outputs)"


def _proportional(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether ``a`` and ``b``, of one shape and more than one element, lie on a line."""
    if a.shape != b.shape or a.size < 2 or b.dtype.kind != "f":
        return False
    a0, b0 = a.ravel() - a.mean(), b.ravel() - b.mean()
    norms = float(np.linalg.norm(a0) * np.linalg.norm(b0))
    return norms > 0 and abs(float(a0 @ b0)) > 0.999 * norms


def _param_array(layer: Any, key: str) -> Any:
    """Parameter ``key`` of ``layer`` as check_layer names it (``W``, ``params[0]``)."""
    params = getattr(layer, "params", None)
    if key.startswith("params[") and isinstance(params, (list, tuple)):
        i = int(key[7:-1])
        return params[i] if i < len(params) else None
    if isinstance(params, dict) and key in params:
        return params[key]
    return getattr(layer, key, None)


def _state_findings(
    names: list[str],
    repeat: list[str],
    dout_changed: list[tuple[str, int, int]],
    written: list[str],
    output_changed: bool,
    params: dict[str, np.ndarray],
    changed: list[str],
) -> list[Finding]:
    """The findings about state: a used layer against a fresh one, and what forward and
    backward wrote into that was not theirs."""
    def as_it_was(names: list[str]) -> str:
        return " and ".join(names) + (" as it was" if len(names) == 1 else " as they were")

    douts_written = [
        f"{name} ({count} of {size} elements changed)" for name, count, size in dout_changed if count
    ]
    several_outputs = len(dout_changed) > 1
    findings = [
        Finding("after earlier use, the gradients match a fresh layer's", not repeat, "; ".join(repeat)),
        Finding(
            f"backward leaves {as_it_was([name for name, _, _ in dout_changed])}",
            not douts_written,
            ("it wrote into " + ", ".join(douts_written)) if douts_written else "",
        ),
        Finding(
            f"forward and backward leave {as_it_was(names)}",
            not written,
            ("wrote into " + ", ".join(written)) if written else "",
        ),
        Finding(
            "backward leaves forward's outputs as they were"
            if several_outputs
            else "backward leaves forward's output as it was",
            not output_changed,
            f"it wrote into {'an array' if several_outputs else 'the array'} forward returned "
            "(which the next layer holds)"
            if output_changed
            else "",
        ),
    ]
    if params or changed:
        findings.append(
            Finding(
                "forward and backward leave the parameters as they were",
                not changed,
                "; ".join(changed) + (" (an update belongs to the optimiser)" if changed else ""),
            )
        )
    return findings


def _compare(
    key: str,
    array: np.ndarray,
    analytic: np.ndarray,
    output: Callable[[], np.ndarray],
    center: np.ndarray,
    upstream: np.ndarray,
    h: float,
    tolerance: float,
    max_elements: int | None,
    rng: np.random.Generator,
) -> tuple[GradcheckResult, list[tuple[int, ...]]]:
    """The worst element of ``array``'s gradient against central differences, and the
    elements on (or within the step of) a kink, skipped."""
    flat_indices = np.arange(array.size)
    if max_elements is not None and array.size > max_elements:
        flat_indices = rng.choice(array.size, size=max_elements, replace=False)
    worst = GradcheckResult(0.0, key, (), 0.0, 0.0, 0)
    kinks: list[tuple[int, ...]] = []
    checked = 0
    for flat in flat_indices:
        index = tuple(int(i) for i in np.unravel_index(int(flat), array.shape))
        exact = float(analytic[index])
        found = _derivative(array, index, exact, output, center, upstream, h, tolerance)
        if found is None:
            kinks.append(index)
            continue
        numeric, error = found
        checked += 1
        if not np.isnan(worst.max_relative_error) and (
            np.isnan(error) or error >= worst.max_relative_error
        ):
            worst = GradcheckResult(error, key, index, exact, numeric, 0)
    return GradcheckResult(
        worst.max_relative_error, key, worst.index, worst.analytic, worst.numeric, checked
    ), kinks


def _derivative(
    array: np.ndarray,
    index: tuple[int, ...],
    exact: float,
    output: Callable[[], np.ndarray],
    center: np.ndarray,
    upstream: np.ndarray,
    h: float,
    tolerance: float,
) -> tuple[float, float] | None:
    """The numerical derivative of ``sum(output * upstream)`` in ``array[index]`` and its
    relative error against ``exact``; None on a kink, or within a step of ``h / 1024``.

    Central differences with step ``h``; where the slopes from either side differ, the
    step is halved, and forward's values alone decide what the difference is: a kink's
    jump stays as the step halves; curvature's halves, twice in a row, and Richardson's
    ``(4 D(s/2) - D(s)) / 3`` is then the derivative to s**4; a kink within the step
    shrinks the jump some other way until a small enough step no longer reaches it.
    ``exact`` only chooses among the estimates, never whether a kink is skipped.
    """
    eps = float(np.finfo(np.float64).eps)
    saved = array[index].copy()

    def difference(step: float) -> tuple[float, float, float, float]:
        """Central difference, the slopes' jump beyond noise, and the rounding noise."""
        array[index] = saved + step
        upper = output()
        array[index] = saved - step
        lower = output()
        array[index] = saved
        # The step as the array holds it (x + h rounds where |x| is large).
        up, down = float((saved + step) - saved), float(saved - (saved - step))
        if up == 0.0 or down == 0.0:
            return np.nan, 0.0, 0.0, 0.0  # x + step == x: no difference to take
        # Rounding noise: of the outputs this element moved, or where it moved none (a
        # change below half an ulp of a loss), of the largest output.
        weighted = np.abs(center * upstream)
        moved = (upper != center) | (lower != center)
        if not moved.any():
            moved = weighted == weighted.max(initial=0.0)  # the largest, all of whose ulp hides it
        noise = eps * float(np.sum(weighted[moved])) / step
        right = float(np.sum((upper - center) * upstream)) / up
        left = float(np.sum((center - lower) * upstream)) / down
        numeric = float(np.sum((upper - lower) * upstream)) / (up + down)
        jump = abs(right - left) - KINK * (abs(right) + abs(left)) - 8 * noise
        return numeric, (max(jump, 0.0) if np.isfinite(jump) else 0.0), noise, up * down

    numeric, jump, noise, resolution = difference(h)
    if resolution == 0.0:
        raise ValueError(
            f"check_layer: h = {h:g} is below the resolution of an element equal to "
            f"{float(saved):g} (x + h == x): give a larger h"
        )
    # One floor for every step: a halved step has more noise, and a floor that grew
    # with it would let halving wash out a real error.
    floor = max(1e-5, NOISE_MARGIN * noise / tolerance)

    def estimate(value: float) -> tuple[float, float]:
        return value, abs(exact - value) / max(abs(exact) + abs(value), floor)

    def smooth_from(step: float, value: float) -> tuple[float, float]:
        """Smooth at this step: its difference, or where that misses the tolerance, the
        extrapolation of it and the half step's (and no smaller steps, so that their
        noise cannot wash out a real error)."""
        if estimate(value)[1] < tolerance:
            return estimate(value)
        half, _, _, _ = difference(step / 2)
        return estimate((4 * half - value) / 3)

    if jump == 0.0:
        return smooth_from(h, numeric)
    step, halved_once, extrapolated = h, False, None
    for _ in range(MAX_HALVINGS):
        half, half_jump, _, resolution = difference(step / 2)
        if resolution == 0.0:
            break  # the step cannot shrink further at this value
        if half_jump == 0.0:
            if extrapolated is not None:  # curvature, already extrapolated: that is better
                return estimate(extrapolated)
            return smooth_from(step / 2, half)  # a kink within the step, left behind
        ratio = half_jump / jump
        if ratio > KINK_STAYS:
            return None  # a kink: its jump does not shrink with the step
        halves = 0.3 <= ratio <= 0.7
        if halves and halved_once:
            # Curvature (the jump halved twice): Richardson's extrapolation, repeated at
            # smaller steps until two agree (near a pole the first still errs by (h/x)**4).
            refined = (4 * half - numeric) / 3
            agree = 0.1 * tolerance * max(abs(refined), floor)
            if extrapolated is not None and abs(refined - extrapolated) <= agree:
                return estimate(refined)
            extrapolated = refined
        else:
            extrapolated = None
        step, numeric, jump, halved_once = step / 2, half, half_jump, halves
    return None if extrapolated is None else estimate(extrapolated)


def _gradient_finding(
    key: str,
    result: GradcheckResult,
    kinks: list[tuple[int, ...]],
    tolerance: float,
    dout_shown: str = "",
) -> Finding:
    check = f"d{key} matches central differences"
    skipped = ""
    if kinks:
        shown = ", ".join(f"{key}{list(k)}" for k in kinks[:3]) + (", ..." if len(kinks) > 3 else "")
        skipped = (
            f"; {len(kinks)} on or within the step of a kink skipped ({shown}: the slopes "
            "from either side differ, so no derivative can be compared there)"
        )
    if result.checked == 0:
        if kinks:
            return Finding(
                check,
                False,
                "every element checked sits on or within the step of a kink; choose inputs "
                "farther from it, or a smaller h" + skipped,
            )
        return Finding(check, True, f"{key} has no elements")
    passed = result.max_relative_error < tolerance  # NaN fails
    return Finding(
        check,
        passed,
        f"worst relative error {result.max_relative_error:.2e} at {key}{list(result.index)} "
        f"(backprop {result.analytic:.10g}, numerical {result.numeric:.10g})"
        + ("" if passed else dout_shown)
        + skipped,
    )
