"""A network's parameters: found in each layer in the style it was written in, numbered as
the book numbers them, and held once where two layers share an array.

Three styles, as a learner meets them:

- scratchnn's: a ``params`` dict and a ``grads`` dict of the same names;
- the book's: each parameter an array attribute ``W`` beside an attribute ``dW``
  that backward sets (``gamma`` beside ``dgamma``); ``running_mean`` and
  ``running_var`` are saved with them;
- the sequel's: ``params`` and ``grads`` lists, named here ``params[0]``, ...

In the book's style a cache (``x`` kept for backward) looks like a parameter when a
``dx`` sits beside it. What tells them apart is what forward does: it assigns its
caches, and leaves its parameters as they are. So forward and backward of a user's
layer run through :func:`forward_in_mode` and :func:`backward_noted`, which note on
the layer (in ``_scratchnn_assigned``, carried by copies of the layer) what each
assigned. An attribute is a cache while the last forward assigned it (or it holds
that forward's input: the same batch every full-batch step), and for good once two
forwards have assigned it; one that a first forward made or cast, and later ones
leave, is a parameter from the second forward on. A layer keeps its number (first
given when the network is built) while the network's layers stay the same, so a
parameter made late takes a new key and moves no other (an optimiser's state stays
with its array). :func:`bindings` and :func:`rebind` put a user's layers'
attributes back after an evaluation (a stateful layer's ``h``). Layers whose
attributes sit in ``__slots__`` cannot be noted: in the book's style they are
refused by name.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

import numpy as np

from scratchnn.backend import get_array_module, is_array
from scratchnn.layers.base import Layer

# The book's BatchNormalization keeps these beside its parameters; a saved model needs them.
BOOK_BUFFERS = ("running_mean", "running_var")
NOTES = "_scratchnn_assigned"


@dataclasses.dataclass(frozen=True)
class Assigned:
    """What a user's layer's forward and backward assigned, by attribute name."""

    # Assigned by the last forward, or holding its input: caches now (a parameter made
    # or cast by a first forward keeps still from the second on).
    latest: frozenset[str] = frozenset()
    # Assigned by two forwards or more: caches for good, also after a forward that
    # leaves them (an evaluation that keeps no x).
    caches: frozenset[str] = frozenset()
    # Assigned by exactly one forward so far.
    once: frozenset[str] = frozenset()
    gradients: frozenset[str] = frozenset()  # X whose dX a backward set


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter of a network: its key, its array, the layer and the name it has
    there, and, for an array already held under an earlier key, that key and whether
    it is held transposed."""

    key: str
    array: Any
    layer: Any
    name: str
    tie: tuple[str, bool] | None


# -- running a user's layer ---------------------------------------------------------------


def is_ours(layer: Any) -> bool:
    """Whether ``layer`` is one of scratchnn's own (a user's subclass of ``Layer`` is not)."""
    kind = type(layer)
    if kind in _our_classes:  # asked of each layer twice a step: remembered for ours
        return True
    ours = issubclass(kind, Layer) and kind.__module__.startswith("scratchnn.")
    if ours:  # (a user's classes are not kept: a notebook may define thousands)
        _our_classes.add(kind)
    return ours


_our_classes: set[type] = set()


def forward_in_mode(layer: Any, x: Any, training: bool) -> Any:
    """A layer's forward; the book's ``forward(x, train_flg=True)`` gets the mode, and a
    user's layer has what its forward assigned noted on it."""
    if is_ours(layer):  # its mode is its training attribute
        return layer.forward(x)
    try:
        takes_mode = "train_flg" in inspect.signature(layer.forward).parameters
    except (TypeError, ValueError):  # no signature to read
        takes_mode = False
    found = getattr(layer, "__dict__", None)
    before = dict(found) if found is not None else {}
    out = layer.forward(x, train_flg=training) if takes_mode else layer.forward(x)
    if found is not None:
        _note_forward(found, before, x)
    return out


def backward_noted(layer: Any, dout: Any) -> Any:
    """A layer's backward; a user's layer has the gradients it set noted on it."""
    if is_ours(layer):
        return layer.backward(dout)
    found = getattr(layer, "__dict__", None)
    before = dict(found) if found is not None else {}
    dx = layer.backward(dout)
    if found is not None:
        set_now = {name[1:] for name, value in found.items() if name[:1] == "d" and before.get(name) is not value}
        notes = found.get(NOTES, Assigned())
        found[NOTES] = dataclasses.replace(notes, gradients=notes.gradients | set_now)
    return dx


def bindings(layers: Sequence[Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """What each user's layer's attributes are bound to now, to :func:`rebind` them to
    later: a stateful layer (the sequel's ``TimeLSTM(stateful=True)`` keeps ``h``)
    carries each forward's state into the next, which an evaluation must not."""
    return [
        (layer.__dict__, dict(layer.__dict__))
        for layer in layers
        if not is_ours(layer) and hasattr(layer, "__dict__")
    ]


def rebind(saved: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """Each user's layer's attributes back to what :func:`bindings` saw: rebound to the
    same objects, and those made since (caches, notes, a parameter made late) gone."""
    for found, was in saved:
        for name in [name for name in found if name not in was]:
            del found[name]
        for name, value in was.items():
            if found.get(name, _MISSING) is not value:
                found[name] = value


def _note_forward(found: dict[str, Any], before: dict[str, Any], x: Any) -> None:
    # Anything assigned, arrays and numbers alike (a cached std is an np.float64).
    assigned = {
        name for name, value in found.items()
        if name != NOTES and before.get(name, _MISSING) is not value
    }  # fmt: skip
    # The same input every step (full-batch training) is never rebound: held input.
    holding = {
        name for name, value in found.items()
        if is_array(value) and is_array(x) and type(value) is type(x) and _may_overlap(value, x)
    }  # fmt: skip
    notes = found.get(NOTES, Assigned())
    caches = notes.caches | (assigned & notes.once)  # a second assignment: for good
    found[NOTES] = Assigned(
        latest=frozenset(assigned | holding),
        caches=caches,
        once=(notes.once | assigned) - caches,
        gradients=notes.gradients,
    )


_MISSING = object()


# -- what a layer holds ---------------------------------------------------------------------


def parameters_of(layer: Any) -> dict[str, Any]:
    """A layer's learnable arrays by name, the layer's own objects (see the module's
    docstring for the three styles). ``TypeError`` for a parameter that is not a float
    array, which no optimiser could update in place."""
    params = getattr(layer, "params", None)
    if is_ours(layer):  # a dict of float arrays, or none
        return params if isinstance(params, dict) else {}
    if isinstance(params, dict):
        for name, value in params.items():
            _require_float_array(layer, f"params[{name!r}]", value)
        return params
    if isinstance(params, (list, tuple)):
        named = {f"params[{j}]": array for j, array in enumerate(params)}
        for name, value in named.items():
            _require_float_array(layer, name, value)
        return named
    if params is not None:
        raise TypeError(
            f"{type(layer).__name__}.params must be a dict of arrays by name (or a list, as "
            f"the book's sequel keeps them), got {type(params).__name__}"
        )
    found = getattr(layer, "__dict__", None)
    if found is None:
        _refuse_slots(layer)
        return {}
    notes = found.get(NOTES, Assigned())
    found_params = {}
    for name, value in found.items():
        if f"d{name}" not in found or name in notes.latest or name in notes.caches:
            continue
        if is_array(value) and value.dtype.kind == "f":
            found_params[name] = value
        elif name in notes.gradients:  # backward sets its gradient: a parameter, misheld
            _require_float_array(layer, name, value)
    return found_params


def _refuse_slots(layer: Any) -> None:
    """A layer in the book's style whose arrays sit in ``__slots__`` cannot have its
    caches told from its parameters (nothing can be noted on it): ``TypeError``."""
    slots = {name for cls in type(layer).__mro__ for name in getattr(cls, "__slots__", ())}
    paired = sorted(name for name in slots if f"d{name}" in slots)
    if paired:
        raise TypeError(
            f"{type(layer).__name__} keeps {paired[0]} beside d{paired[0]} in __slots__: give "
            "it a __dict__ (no __slots__), or a params dict and a grads dict"
        )


def _require_float_array(layer: Any, name: str, value: Any) -> None:
    if not (is_array(value) and value.dtype.kind == "f"):
        what = f"an array of {value.dtype}" if is_array(value) else f"a {type(value).__name__}"
        raise TypeError(
            f"{type(layer).__name__} keeps its parameter {name} as {what}: keep it as a float "
            "array (np.array(..., dtype=float)), which an optimiser updates in place"
        )


def gradients_of(layer: Any) -> dict[str, Any]:
    """The gradients of :func:`parameters_of`'s arrays, by the same names (None before
    the first backward)."""
    params = getattr(layer, "params", None)
    if isinstance(params, dict):
        return dict(layer.grads)
    if isinstance(params, (list, tuple)):
        grads = getattr(layer, "grads", None)
        if not isinstance(grads, (list, tuple)) or len(grads) != len(params):
            raise TypeError(
                f"{type(layer).__name__}: a params list needs a grads list of its length "
                f"beside it, got {type(grads).__name__}"
            )
        return {f"params[{j}]": grad for j, grad in enumerate(grads)}
    found = getattr(layer, "__dict__", {})
    return {name[1:]: value for name, value in found.items() if name[:1] == "d"}


def buffers_of(layer: Any) -> dict[str, Any]:
    """The arrays a saved model needs beside the parameters (running statistics)."""
    buffers = getattr(layer, "buffers", None)
    if isinstance(buffers, dict):
        return buffers
    if getattr(layer, "params", None) is not None or not parameters_of(layer):
        return {}
    found = getattr(layer, "__dict__", {})
    return {name: found[name] for name in BOOK_BUFFERS if is_array(found.get(name))}


# -- a network's parameters -----------------------------------------------------------------


def numbered_key(name: str, k: int) -> str:
    """``W`` of the second such layer is ``W2``; the sequel's ``params[0]``, ``params2[0]``."""
    base, bracket, index = name.partition("[")
    return f"{base}{k}{bracket}{index}"


def parameter_table(
    per_layer: Sequence[tuple[Any, dict[str, Any]]], kept: dict[int, int] | None = None
) -> tuple[list[Entry], dict[int, int]]:
    """Every parameter of the layers (each with :func:`parameters_of`'s dict), keyed as
    the book keys them, and each layer's number (by id).

    A layer's number is one more than the last number any of its names had, so that
    ``W1, b1, gamma1, beta1, W2, b2, ...`` come out as the book's
    ``MultiLayerNetExtend`` numbers them and layers of other kinds never share a key.
    ``kept`` are the numbers the same layers had before (when only their parameters
    changed): those layers keep them, so that a parameter a layer makes late takes a
    new key and moves no other (an optimiser's state stays with its array).
    """
    kept = kept or {}
    last: dict[str, int] = {}
    for layer, params in per_layer:  # the numbers kept are taken, wherever they stand
        if id(layer) in kept:
            for name in params:
                last[name] = max(last.get(name, 0), kept[id(layer)])
    numbers: dict[int, int] = {}
    owner: dict[str, int] = {}
    entries: list[Entry] = []
    seen: dict[str, Any] = {}
    for i, (layer, params) in enumerate(per_layer):
        if not params:
            continue
        k = kept.get(id(layer), 0)
        if not k or any(owner.get(numbered_key(name, k), i) != i for name in params):
            k = 1 + max(last.get(name, 0) for name in params)
        for name in params:
            last[name] = max(last.get(name, 0), k)
        numbers[id(layer)] = k
        for name, array in params.items():
            key = numbered_key(name, k)
            if key in owner:  # "W" of layer 11 and a "W1" of layer 1
                raise ValueError(
                    f"Sequential: layers {owner[key]} and {i} would both name a parameter "
                    f"{key!r}; give the custom layer's parameters other names"
                )
            owner[key] = i
            tie = _tied(key, array, seen)
            if tie is None:
                seen[key] = array
            entries.append(Entry(key, array, layer, name, tie))
    return entries, numbers


def _tied(key: str, array: Any, seen: dict[str, Any]) -> tuple[str, bool] | None:
    """The key under which ``array`` is already held (as it is, or transposed); a
    ``ValueError`` for an array that overlaps another any other way."""
    for other_key, other in seen.items():
        if other is array:
            return other_key, False
        if type(other) is not type(array) or other.dtype != array.dtype:
            continue
        if layout(array, other) is not None:
            return other_key, layout(array, other) == "transposed"
        if _may_overlap(array, other):
            raise ValueError(
                f"Sequential: parameters {other_key} and {key} share memory without being "
                "one array or its transpose; an optimiser would step the shared part twice"
            )
    return None


def layout(a: Any, b: Any) -> str | None:
    """``"same"`` where ``a`` and ``b`` are views of the same elements in the same order,
    ``"transposed"`` where ``a`` is ``b.T`` (2-d), else None."""
    if _address(a) != _address(b):
        return None
    if a.shape == b.shape and a.strides == b.strides:
        return "same"
    if a.ndim == 2 and a.shape == b.shape[::-1] and a.strides == b.strides[::-1]:
        return "transposed"
    return None


def _address(array: Any) -> int:
    if isinstance(array, np.ndarray):
        return int(array.__array_interface__["data"][0])
    return int(array.data.ptr)  # CuPy


def _may_overlap(a: Any, b: Any) -> bool:
    return bool(get_array_module(a, b).may_share_memory(a, b))
