"""Optimisers with the book's interface: ``update(params, grads)`` updates ``params`` in place.

As in *Deep Learning from Scratch* (``common/optimizer.py``), ``params`` and
``grads`` are dicts of arrays under the same names (``"W1"``, ``"b1"``, ...),
and ``update`` changes the parameter arrays themselves, never the dict: layers
hold references to these arrays, so rebinding ``params[key]`` would leave the
layers training a stale copy.

Each step follows ``torch.optim`` exactly (SGD, SGD with momentum or Nesterov
momentum and ``dampening=0``, Adagrad, RMSprop, Adam), so in float64 the
parameters agree with PyTorch's to rounding, step after step. Where the book's
formulas differ from PyTorch's, the class docstring says how.

Rules every optimiser keeps:

* ``weight_decay`` is L2 regularisation added to the gradient,
  ``g <- g + weight_decay * p``, as ``torch.optim`` does (not AdamW's
  decoupled decay).
* Only the parameters named in ``grads`` change; a parameter without a
  gradient is left as it is (PyTorch's rule for ``p.grad is None``).
* A gradient whose name is not in ``params``, or whose shape differs from its
  parameter's, raises ``ValueError`` naming it, before any parameter changes.
* Parameters keep their dtype: the hyperparameters are Python floats, which
  NumPy 2 does not let promote a float32 array to float64.
* The step runs in place with ``out=`` into one scratch array per parameter,
  allocated on the first step, so a step allocates no parameter-sized arrays.
* ``grads`` is never written to.

The state (velocities, moments, step counts) is exported by ``state_dict()``
as a flat dict of arrays named ``"<slot>/<param>"`` (``"v/W1"``, ``"m/W1"``,
``"step/W1"``), which a checkpoint can store, and read back by
``load_state_dict``; ``make_optimizer("adam", lr=...)`` builds one by name.
The state is kept by parameter name, as the book's optimisers keep theirs:
one optimiser trains one network. Given a second network whose names and
shapes are the same, it would carry the first network's momenta into it;
make a new optimiser for each network (a PyTorch optimiser is tied to its
parameters in the same way).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, MutableMapping
from typing import Any, ClassVar

import numpy as np

from scratchnn import _checks, _fused, kernels
from scratchnn.backend import (
    FLOAT_DTYPES,
    as_array,
    cupy_array_type,
    device_of,
    get_array_module,
    is_array,
    move_arrays,
    to_device,
)

__all__ = [
    "SGD",
    "AdaGrad",
    "Adam",
    "Momentum",
    "Nesterov",
    "Optimizer",
    "RMSprop",
    "make_optimizer",
]


class Optimizer:
    """Base class: validation, weight decay, scratch space and state export.

    A subclass lists its per-parameter state arrays in ``slots`` (each an
    attribute holding a dict from parameter name to array, like the book's
    ``self.v``), its hyperparameters in ``hyperparameter_names``, and writes
    the mathematics in ``_step``.
    """

    slots: ClassVar[tuple[str, ...]] = ()
    # The slots that sum squares of gradients (never negative): checked when state is loaded.
    squares: ClassVar[tuple[str, ...]] = ()
    hyperparameter_names: ClassVar[tuple[str, ...]] = ("lr", "weight_decay")

    def __init__(self, lr: float, weight_decay: float) -> None:
        who = type(self).__name__
        self.lr = _checks.nonnegative(who, "lr", lr)
        self.weight_decay = _checks.nonnegative(who, "weight_decay", weight_decay)
        # Scratch arrays, one per parameter, reused every step; not state.
        self._work: dict[str, np.ndarray] = {}
        self._decayed: dict[str, np.ndarray] = {}
        self._device = "cpu"  # where to() last put the state: loaded state goes there too

    @property
    def lr(self) -> float:
        """The learning rate; checked whenever it is set (schedules set it between epochs)."""
        return self._lr

    @lr.setter
    def lr(self, value: float) -> None:
        self._lr = _checks.nonnegative(type(self).__name__, "lr", value)

    def __repr__(self) -> str:
        args = ", ".join(f"{name}={value!r}" for name, value in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"

    def hyperparameters(self) -> dict[str, float]:
        """The hyperparameters as Python floats, by their constructor names."""
        return {name: float(getattr(self, name)) for name in self.hyperparameter_names}

    # -- the update ------------------------------------------------------------------

    def update(self, params: MutableMapping[str, Any], grads: Mapping[str, Any]) -> None:
        """Update each ``params[key]`` that has a gradient ``grads[key]``, in place."""
        # Check every pair before touching any parameter, so a bad call changes nothing.
        who = f"{type(self).__name__}.update"
        for name, value in (("params", params), ("grads", grads)):
            if type(value) is not dict and not isinstance(value, Mapping):  # (dict: no ABC check)
                raise TypeError(
                    f"{who}: {name} must be a dict of arrays by name, got {type(value).__name__}"
                )
        checked = [self._check(key, params, grad, who) for key, grad in grads.items()]
        on_gpu: dict[tuple[str, np.dtype[Any], tuple[tuple[str, float], ...]], list[list[Any]]] = {}
        for key, param, grad in checked:
            if not isinstance(param, np.ndarray) and self._fusable(key, param):
                # CuPy: each step one fused pass, every parameter with the same step in one
                # launch (kernels.run_many), as PyTorch's multi-tensor steps.
                name, arrays, scalars = self._gpu_step(key, param, grad)
                group = (name, param.dtype, tuple(scalars.items()))
                on_gpu.setdefault(group, []).append(arrays)
                continue
            work = self._scratch(self._work, key, param)
            if self.weight_decay:
                decayed = self._scratch(self._decayed, key, param)
                np.multiply(param, self.weight_decay, out=decayed)
                np.add(decayed, grad, out=decayed)
                grad = decayed
            self._step(key, param, grad, work)
        for (name, _, scalars), tensors in on_gpu.items():
            kernels.run_many(name, tensors, **dict(scalars))

    def _step(self, key: str, param: np.ndarray, grad: np.ndarray, work: np.ndarray) -> None:
        """Change ``param`` in place; ``work`` is scratch of ``param``'s shape and dtype."""
        raise NotImplementedError

    def _fusable(self, key: str, param: Any) -> bool:
        """Whether the GPU's fused kernel takes this step: not for float16 (it steps as on
        the CPU), nor where a subclass wrote its own ``_step`` (the kernel computes the
        class's that it was written beside, not the subclass's)."""
        return param.dtype != np.float16 and _fused_step_is_the_step(type(self))

    def _fused_step(self, key: str, param: Any) -> tuple[str, list[Any], dict[str, float]]:
        """The step as an op of :mod:`scratchnn.kernels`: its name, state arrays and scalars."""
        raise NotImplementedError

    def _gpu_step(
        self, key: str, param: Any, grad: Any
    ) -> tuple[str, list[Any], dict[str, float]]:
        """The step on CuPy arrays as a fused op, decay included: its name, its arrays in
        the op's order and its scalars (one kernel reads and writes each array once)."""
        name, states, scalars = self._fused_step(key, param)
        if self.weight_decay:
            name, scalars = name + "_wd", {**scalars, "weight_decay": self.weight_decay}
        return name, [param, grad, *states], scalars

    def to(self, device: str) -> Optimizer:
        """Move the state (velocities, moments) to ``device``, as ``Sequential.to`` moves a network."""
        move_arrays(self, device)
        self._device = device
        return self

    def _check(
        self, key: str, params: Mapping[str, Any], grad: Any, who: str
    ) -> tuple[str, np.ndarray, np.ndarray]:
        if key not in params:
            raise ValueError(
                f"{who}: gradient {key!r} has no parameter of that name; "
                f"params has {sorted(params)} (a layer that makes its parameters in its "
                "first forward: read the network's params after that forward)"
            )
        param = params[key]
        kind = type(param)
        if not (
            # The common case, two float arrays of one kind (so of one device), needs no
            # conversion: checked in a few look-ups, as this runs for every parameter.
            (kind is np.ndarray or kind is cupy_array_type())
            and type(grad) is kind
            and param.dtype in FLOAT_DTYPES
            and grad.dtype in FLOAT_DTYPES
        ):
            if not is_array(param) or param.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"{who}: parameter {key!r} must be a float16/32/64 array to be updated in "
                    f"place, got {type(param).__module__}.{type(param).__name__}"
                )
            if is_array(grad) and device_of(grad) != device_of(param):
                raise TypeError(
                    f"{who}: gradient {key!r} is on {device_of(grad)}, its parameter on "
                    f"{device_of(param)}"
                )
            if grad is None:  # (it read as "unsupported dtype object")
                raise TypeError(f"{who}: gradient {key!r} is None, not an array")
            grad = as_array(grad, who=who, what=f"gradient {key!r}")
            if grad.dtype == np.bool_:  # a mask passed for a gradient: steps of 0 and 1
                raise TypeError(f"{who}: gradient {key!r} is an array of bools, not of numbers")
        if isinstance(param, np.ndarray) and not param.flags.writeable:
            raise ValueError(f"{who}: parameter {key!r} is read-only; it is updated in place")
        if grad.shape != param.shape:
            raise ValueError(
                f"{who}: gradient {key!r} has shape {grad.shape}, "
                f"its parameter has shape {param.shape}"
            )
        if grad.dtype.kind in "biu":  # squared in its own dtype, an integer would wrap around
            grad = grad.astype(param.dtype)
        self._check_state_of(key, param, who)
        return key, param, grad

    def check_state(self, params: Mapping[str, Any], *, complete: bool = False) -> None:
        """``ValueError`` unless every state array belongs to a parameter of ``params`` of
        its shape and dtype: what a loaded state must satisfy before the first update.

        With ``complete=True`` every parameter must also have every slot: the state of an
        optimiser that has stepped them all (a checkpoint's, after an epoch). A state
        missing there would start from zero moments, and the run would go on otherwise
        than the one saved, without a word.
        """
        who = f"{type(self).__name__}.check_state"
        for slot in self.slots:
            for key in getattr(self, slot):
                if key not in params:
                    raise ValueError(f"{who}: state {slot}/{key} belongs to no parameter")
        for key, param in params.items():
            self._check_state_of(key, param, who)
        if complete:
            missing = [f"{slot}/{key}" for key in params for slot in self.slots
                       if key not in getattr(self, slot)]  # fmt: skip
            if missing:
                shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
                raise ValueError(f"{who}: the optimiser's state lacks {shown}")

    def _check_state_of(self, key: str, param: Any, who: str) -> None:
        for slot in self.slots:
            state = getattr(self, slot).get(key)
            if state is not None and (state.shape != param.shape or state.dtype != param.dtype):
                raise ValueError(
                    f"{who}: state {slot}/{key} has shape {state.shape} and dtype "
                    f"{state.dtype}, its parameter {param.shape} and {param.dtype}"
                )

    @staticmethod
    def _scratch(store: dict[str, np.ndarray], key: str, like: np.ndarray) -> np.ndarray:
        array = store.get(key)
        if (
            array is None
            or type(array) is not type(like)  # the parameters moved to the other device
            or array.shape != like.shape
            or array.dtype != like.dtype
        ):
            array = store[key] = get_array_module(like).empty_like(like)
        return array

    def _state(self, slot: str, key: str, like: np.ndarray) -> np.ndarray:
        """The state array ``slot`` of parameter ``key``, zeros on its first step."""
        store: dict[str, np.ndarray] = getattr(self, slot)
        if key not in store:
            store[key] = get_array_module(like).zeros_like(like)
        elif type(store[key]) is not type(like):  # loaded from a checkpoint on the other device
            store[key] = to_device(store[key], device_of(like))
        return store[key]

    # -- state for checkpoints -------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the state arrays, named ``"<slot>/<param>"`` (``"v/W1"``)."""
        return {
            f"{slot}/{key}": array.copy()
            for slot in self.slots
            for key, array in getattr(self, slot).items()
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the state with copies of ``state`` (as ``state_dict`` gives it).

        Every parameter must have every slot, of one shape and float dtype;
        unknown names raise ``ValueError``. A failed load leaves the state as
        it was. Shapes are checked against the parameters at the next
        ``update``.
        """
        loaded = self._parse_state(state)
        for slot in self.slots:
            setattr(self, slot, loaded.get(slot, {}))
        self._follow_device()

    def _follow_device(self) -> None:
        """Put loaded state where ``to`` put the optimiser, as PyTorch's loader puts it
        beside the parameters (a subclass that skips our __init__ stays on the host)."""
        device = getattr(self, "_device", "cpu")
        if device != "cpu":
            move_arrays(self, device)

    def _parse_state(self, state: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
        who = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state, Mapping):  # (a list of pairs has no .items())
            raise TypeError(f"{who} takes a dict of arrays by name, got {type(state).__name__}")
        loaded: dict[str, dict[str, np.ndarray]] = {}
        for name, value in state.items():
            slot, sep, key = name.partition("/")
            if not sep or not key or slot not in self.slots:
                expected = ", ".join(f"'{s}/<param>'" for s in self.slots) or "nothing"
                raise ValueError(f"{who}: unexpected entry {name!r}; expected {expected}")
            array = as_array(value, who=who, what=f"entry {name!r}")
            if array.dtype not in FLOAT_DTYPES:
                raise ValueError(f"{who}: entry {name!r} must be a float array, not {array.dtype}")
            if slot in self.squares and not bool((array >= 0).all()):  # (NaN fails it too)
                # A sum of squares below 0 has no square root: the next step would make
                # every parameter NaN, silently.
                raise ValueError(
                    f"{who}: entry {name!r} holds a negative value or NaN, but it sums squares"
                )
            loaded.setdefault(slot, {})[key] = array.copy()
        keys = set().union(*(arrays.keys() for arrays in loaded.values()))
        for key in sorted(keys):
            arrays = [(slot, loaded.get(slot, {}).get(key)) for slot in self.slots]
            missing = [slot for slot, array in arrays if array is None]
            if missing:
                names = [f"{slot}/{key}" for slot in missing]
                raise ValueError(f"{who}: parameter {key!r} lacks {names}")
            if len({(a.shape, a.dtype) for _, a in arrays if a is not None}) > 1:
                raise ValueError(f"{who}: the entries of {key!r} differ in shape or dtype")
        return loaded


def _fused_step_is_the_step(cls: type) -> bool:
    """Whether the class that defines ``cls``'s ``_step`` defines its ``_fused_step`` too:
    the kernel then computes that step (an empty subclass of ``Momentum`` keeps it; a
    subclass with its own ``_step`` steps as written, through the array functions)."""
    answer = _fused_is_step.get(cls)
    if answer is None:  # (asked for every parameter at every step: once per class)
        owner = next(klass for klass in cls.__mro__ if "_step" in vars(klass))
        answer = _fused_is_step[cls] = "_fused_step" in vars(owner)
    return answer


# (weak: a notebook that defines its optimiser class again and again keeps none of them)
_fused_is_step: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()


def _compiled_step(
    name: str,
    param: np.ndarray,
    grad: np.ndarray,
    states: tuple[np.ndarray, ...],
    scalars: tuple[float, ...],
) -> bool:
    """Run optimiser step ``name`` of the compiled kernels in place; False if they cannot.

    Every array it writes (``param`` and ``states``) must be C-contiguous, so that
    its flat view is the array itself, and ``grad`` must not share memory with
    ``param`` (the kernels read and write through distinct pointers).
    """
    written = (param, *states)
    if type(param) is not np.ndarray or type(grad) is not np.ndarray:
        return False  # the compiled kernels are the host's (a float16 step on the GPU is not)
    if not _fused.ENABLED or not all(a.flags.c_contiguous for a in written):
        return False
    if np.may_share_memory(param, grad):
        return False
    flats = [a.reshape(-1) for a in written]
    g = np.ascontiguousarray(grad).reshape(-1)
    out2, out3 = [*flats[1:], None, None][:2]
    return _fused.run(name, flats[0], g=g, out2=out2, out3=out3, param=scalars)


class SGD(Optimizer):
    """Stochastic gradient descent: ``p <- p - lr * g``.

    The book's ``SGD``; ``torch.optim.SGD(lr=lr, weight_decay=wd)``.

    >>> params = {"W": np.array([1.0, 2.0])}
    >>> SGD(lr=0.1).update(params, {"W": np.array([1.0, -1.0])})
    >>> params["W"]
    array([0.9, 2.1])
    """

    def __init__(self, lr: float = 0.01, *, weight_decay: float = 0.0) -> None:
        super().__init__(lr, weight_decay)

    def _step(self, key: str, param: np.ndarray, grad: np.ndarray, work: np.ndarray) -> None:
        if _compiled_step("sgd", param, grad, (), (self.lr,)):
            return  # the same two operations in one compiled pass
        np.multiply(grad, self.lr, out=work)
        np.subtract(param, work, out=param)

    def _fused_step(self, key: str, param: Any) -> tuple[str, list[Any], dict[str, float]]:
        return "sgd", [], {"lr": self.lr}


class Momentum(Optimizer):
    """SGD with momentum, in PyTorch's form: ``v <- momentum * v + g``; ``p <- p - lr * v``.

    Matches ``torch.optim.SGD(lr, momentum, dampening=0, weight_decay=wd)``.

    The book writes the velocity with the learning rate inside it:
    ``v <- momentum * v - lr * g``; ``p <- p + v``. That is this ``v`` times
    ``-lr``, so both give the same parameters while ``lr`` stays constant; they
    part when ``lr`` changes during training (PyTorch's velocity is rescaled by
    the new ``lr``, the book's keeps the old one).

    >>> params = {"W": np.array([1.0])}
    >>> opt = Momentum(lr=0.1, momentum=0.5)
    >>> for _ in range(2):
    ...     opt.update(params, {"W": np.array([1.0])})
    >>> params["W"]   # 1 - 0.1 * 1 - 0.1 * (0.5 * 1 + 1)
    array([0.75])
    """

    slots = ("v",)
    hyperparameter_names = ("lr", "momentum", "weight_decay")

    def __init__(
        self, lr: float = 0.01, momentum: float = 0.9, *, weight_decay: float = 0.0
    ) -> None:
        super().__init__(lr, weight_decay)
        self.momentum = _checks.fraction(type(self).__name__, "momentum", momentum)
        self.v: dict[str, np.ndarray] = {}

    def _step(self, key: str, param: np.ndarray, grad: np.ndarray, work: np.ndarray) -> None:
        v = self._state("v", key, param)
        np.multiply(v, self.momentum, out=v)
        np.add(v, grad, out=v)
        np.multiply(v, self.lr, out=work)
        np.subtract(param, work, out=param)

    def _fused_step(self, key: str, param: Any) -> tuple[str, list[Any], dict[str, float]]:
        return "momentum", [self._state("v", key, param)], {"lr": self.lr, "momentum": self.momentum}


class Nesterov(Momentum):
    """Nesterov momentum, in PyTorch's form: ``v <- momentum * v + g``;
    ``p <- p - lr * (g + momentum * v)``.

    Matches ``torch.optim.SGD(lr, momentum, dampening=0, nesterov=True,
    weight_decay=wd)``, and, for a constant ``lr``, the formula of Bengio et
    al. (arXiv:1212.0901) that the book cites, with the book's velocity
    ``u = -lr * v``: ``p <- p + momentum**2 * u - (1 + momentum) * lr * g``,
    then ``u <- momentum * u - lr * g``. The book's published code updates
    ``u`` first and then uses the new ``u`` in the parameter step, which is
    not that formula; this class follows the paper and PyTorch.

    >>> params = {"W": np.array([1.0])}
    >>> opt = Nesterov(lr=0.1, momentum=0.5)
    >>> opt.update(params, {"W": np.array([1.0])})
    >>> params["W"]   # 1 - 0.1 * (1 + 0.5 * 1)
    array([0.85])
    """

    def __init__(
        self, lr: float = 0.01, momentum: float = 0.9, *, weight_decay: float = 0.0
    ) -> None:
        super().__init__(lr, momentum, weight_decay=weight_decay)
        if self.momentum == 0.0:
            raise ValueError("Nesterov: momentum must be > 0 (with 0 it is plain SGD)")

    def _step(self, key: str, param: np.ndarray, grad: np.ndarray, work: np.ndarray) -> None:
        v = self._state("v", key, param)
        np.multiply(v, self.momentum, out=v)
        np.add(v, grad, out=v)
        np.multiply(v, self.momentum, out=work)
        np.add(work, grad, out=work)
        np.multiply(work, self.lr, out=work)
        np.subtract(param, work, out=param)

    def _fused_step(self, key: str, param: Any) -> tuple[str, list[Any], dict[str, float]]:
        return "nesterov", [self._state("v", key, param)], {"lr": self.lr, "momentum": self.momentum}


class AdaGrad(Optimizer):
    """AdaGrad: ``h <- h + g * g``; ``p <- p - lr * g / (sqrt(h) + eps)``.

    The book's ``AdaGrad`` and ``torch.optim.Adagrad(lr, eps=eps,
    weight_decay=wd)`` (with ``lr_decay=0``, ``initial_accumulator_value=0``).
    The default ``eps=1e-7`` is the book's; PyTorch's default is 1e-10.

    >>> params = {"W": np.array([1.0, 1.0])}
    >>> AdaGrad(lr=0.1, eps=0.0).update(params, {"W": np.array([3.0, -0.5])})
    >>> params["W"]   # the first step moves every entry by lr * sign(g)
    array([0.9, 1.1])
    """

    slots = ("h",)
    squares = ("h",)
    hyperparameter_names = ("lr", "eps", "weight_decay")

    def __init__(self, lr: float = 0.01, eps: float = 1e-7, *, weight_decay: float = 0.0) -> None:
        super().__init__(lr, weight_decay)
        self.eps = _checks.nonnegative(type(self).__name__, "eps", eps)
        self.h: dict[str, np.ndarray] = {}

    def _step(self, key: str, param: np.ndarray, grad: np.ndarray, work: np.ndarray) -> None:
        h = self._state("h", key, param)
        np.multiply(grad, grad, out=work)
        np.add(h, work, out=h)
        _descend(param, grad, h, self.lr, self.eps, work)

    def _fused_step(self, key: str, param: Any) -> tuple[str, list[Any], dict[str, float]]:
        return "adagrad", [self._state("h", key, param)], {"lr": self.lr, "eps": self.eps}


class RMSprop(Optimizer):
    """RMSprop: ``h <- decay_rate * h + (1 - decay_rate) * g * g``;
    ``p <- p - lr * g / (sqrt(h) + eps)``.

    The book's ``RMSprop`` and ``torch.optim.RMSprop(lr, alpha=decay_rate,
    eps=eps, weight_decay=wd)`` (``momentum=0``, ``centered=False``). The
    default ``eps=1e-7`` is the book's; PyTorch's default is 1e-8.

    >>> params = {"W": np.array([1.0])}
    >>> RMSprop(lr=0.01, decay_rate=0.75, eps=0.0).update(params, {"W": np.array([2.0])})
    >>> params["W"]   # 1 - 0.01 * 2 / sqrt(0.25 * 4)
    array([0.98])
    """

    slots = ("h",)
    squares = ("h",)
    hyperparameter_names = ("lr", "decay_rate", "eps", "weight_decay")

    def __init__(
        self,
        lr: float = 0.01,
        decay_rate: float = 0.99,
        eps: float = 1e-7,
        *,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr, weight_decay)
        who = type(self).__name__
        self.decay_rate = _checks.fraction(who, "decay_rate", decay_rate)
        self.eps = _checks.nonnegative(who, "eps", eps)
        self.h: dict[str, np.ndarray] = {}

    def _step(self, key: str, param: np.ndarray, grad: np.ndarray, work: np.ndarray) -> None:
        h = self._state("h", key, param)
        np.multiply(h, self.decay_rate, out=h)
        np.multiply(grad, grad, out=work)
        np.multiply(work, 1.0 - self.decay_rate, out=work)
        np.add(h, work, out=h)
        _descend(param, grad, h, self.lr, self.eps, work)

    def _fused_step(self, key: str, param: Any) -> tuple[str, list[Any], dict[str, float]]:
        scalars = {"lr": self.lr, "eps": self.eps, "decay": self.decay_rate}
        scalars["one_minus_decay"] = 1.0 - self.decay_rate
        return "rmsprop", [self._state("h", key, param)], scalars


def _descend(
    param: np.ndarray, grad: np.ndarray, h: np.ndarray, lr: float, eps: float, work: np.ndarray
) -> None:
    """``param -= lr * grad / (sqrt(h) + eps)`` via ``work``: the step AdaGrad and RMSprop share."""
    np.sqrt(h, out=work)
    np.add(work, eps, out=work)
    np.divide(grad, work, out=work)
    np.multiply(work, lr, out=work)
    np.subtract(param, work, out=param)


class Adam(Optimizer):
    """Adam with bias correction, exactly as ``torch.optim.Adam``.

    With ``t`` the parameter's step count (from 1)::

        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g * g
        p <- p - lr / (1 - beta1**t) * m / (sqrt(v / (1 - beta2**t)) + eps)

    ``eps`` is added after the square root of the bias-corrected ``v``, as
    PyTorch does. The book folds the bias correction into the learning rate,
    ``lr_t = lr * sqrt(1 - beta2**t) / (1 - beta1**t)``, and adds its ``eps``
    (1e-7) to ``sqrt(v)`` before correction: the same step when ``eps = 0``,
    and otherwise the book's ``eps`` acts as ``eps / sqrt(1 - beta2**t)``
    here, a few times larger early in training. ``weight_decay`` is L2 (Adam's,
    not AdamW's). Each parameter counts its own steps, as in PyTorch, so a
    parameter that misses an update keeps its own bias correction.

    >>> params = {"W": np.array([1.0, 1.0])}
    >>> Adam(lr=0.1, eps=0.0).update(params, {"W": np.array([5.0, -0.01])})
    >>> params["W"]   # the first step moves every entry by lr * sign(g)
    array([0.9, 1.1])
    """

    slots = ("m", "v")
    squares = ("v",)
    hyperparameter_names = ("lr", "beta1", "beta2", "eps", "weight_decay")

    def __init__(
        self,
        lr: float = 0.001,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        *,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr, weight_decay)
        who = type(self).__name__
        self.beta1 = _checks.fraction(who, "beta1", beta1)
        self.beta2 = _checks.fraction(who, "beta2", beta2)
        self.eps = _checks.nonnegative(who, "eps", eps)
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.steps: dict[str, int] = {}
        # (the inputs and the result of the last _folded_scalars, shared by a step's parameters)
        self._last_scalars: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        # (set by scratchnn.steps while a step reads its bias corrections from the GPU)
        self._scalars_on_device: dict[str, Any] | None = None

    def _step(self, key: str, param: np.ndarray, grad: np.ndarray, work: np.ndarray) -> None:
        m = self._state("m", key, param)
        v = self._state("v", key, param)
        t = self.steps[key] = self.steps.get(key, 0) + 1
        scalars = self._folded_scalars(t)
        if param.dtype == np.float16 or not _fit(scalars, param.dtype):
            self._step_unfolded(param, grad, m, v, work, t)
            return
        inv_scale, eps_scaled = scalars[4:]
        # The same 12 operations in one compiled pass where the kernels take the arrays.
        if not _compiled_step("adam", param, grad, (m, v), scalars):
            self._move_moments(grad, m, v, work)
            np.sqrt(v, out=work)
            np.multiply(work, inv_scale, out=work)
            np.add(work, eps_scaled, out=work)
            np.divide(m, work, out=work)
            np.subtract(param, work, out=param)

        if self.beta1 > 0.0 and t % _flush_interval(self.beta1) == 0:
            _flush_near_subnormal(m, work)

    def _fusable(self, key: str, param: Any) -> bool:
        if not super()._fusable(key, param):
            return False
        # Only a tiny lr can make the folded scalars overflow: skip the check otherwise.
        return self.lr > 1e-30 or _fit(
            self._folded_scalars(self.steps.get(key, 0) + 1), param.dtype
        )

    def _step_unfolded(
        self, param: Any, grad: Any, m: Any, v: Any, work: Any, t: int
    ) -> None:
        """The step unfolded, as PyTorch's, where the folded ``1 / (c2 * step_size)``
        overflows the parameter's dtype: float16 (largest number 65504) once ``lr`` is
        below about 1e-4, float32 below about 1e-38."""
        step_size = self.lr / (1.0 - self.beta1**t)
        sqrt_correction2 = math.sqrt(1.0 - self.beta2**t)
        self._move_moments(grad, m, v, work)
        np.sqrt(v, out=work)
        np.divide(work, sqrt_correction2, out=work)
        np.add(work, self.eps, out=work)
        np.divide(m, work, out=work)
        np.multiply(work, step_size, out=work)
        np.subtract(param, work, out=param)

    def _move_moments(self, grad: Any, m: Any, v: Any, work: Any) -> None:
        """``m <- beta1 m + (1 - beta1) g`` and ``v <- beta2 v + (1 - beta2) g g``, in place."""
        np.multiply(m, self.beta1, out=m)
        np.multiply(grad, 1.0 - self.beta1, out=work)
        np.add(m, work, out=m)
        np.multiply(v, self.beta2, out=v)
        np.multiply(grad, 1.0 - self.beta2, out=work)
        np.multiply(work, grad, out=work)
        np.add(v, work, out=v)

    def _fused_step(self, key: str, param: Any) -> tuple[str, list[Any], dict[str, Any]]:
        # The same folded scalars as _step. No periodic flush of tiny moments: GPUs run
        # subnormals at full speed (and CuPy compiles every kernel with -ftz=true, so in
        # float32 they are zero there anyway).
        m, v = self._state("m", key, param), self._state("v", key, param)
        t = self.steps[key] = self.steps.get(key, 0) + 1
        names = ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "inv_scale", "eps_scaled")
        scalars = dict(zip(names, self._folded_scalars(t)))
        # While scratchnn.steps captures a step into a CUDA graph, the two that change with
        # t are read from the GPU as each replay runs (kernels.cuda.DeviceScalar).
        scalars.update(getattr(self, "_scalars_on_device", None) or {})
        return "adam", [m, v], scalars

    def _folded_scalars(self, t: int) -> tuple[float, ...]:
        """The step's six scalars: beta1, 1 - beta1, beta2, 1 - beta2, and the folded
        ``1 / (c2 * step_size)`` and ``eps / step_size``, where ``step_size = lr / (1 -
        beta1**t)`` and ``c2 = sqrt(1 - beta2**t)``.

        ``step_size * m / (sqrt(v) / c2 + eps)`` is computed as
        ``m / (sqrt(v) / (c2 * step_size) + eps / step_size)``: the scalars fold
        together, which saves a pass over the parameter. With ``lr = 0`` they are 0
        and inf: the moments still move, the parameter does not (m / inf = 0), as
        in PyTorch. Python floats throughout: a NumPy float64 scalar would lift
        float32 work to float64.
        """
        # (floats: a hyperparameter set to a NumPy number and changed in place is seen)
        given = (t, float(self.lr), float(self.beta1), float(self.beta2), float(self.eps))
        last = getattr(self, "_last_scalars", None)  # (a subclass may skip our __init__)
        if last is not None and last[0] == given:
            return last[1]  # every parameter of a step shares them: worked out once a step
        step_size = self.lr / (1.0 - self.beta1**t)
        sqrt_correction2 = math.sqrt(1.0 - self.beta2**t)
        scale = sqrt_correction2 * step_size
        if scale > 0.0:  # (a subnormal lr can make the product 0)
            inv_scale, eps_scaled = 1.0 / scale, self.eps / step_size
        else:
            inv_scale, eps_scaled = 0.0, math.inf
        scalars = (self.beta1, 1.0 - self.beta1, self.beta2, 1.0 - self.beta2, inv_scale, eps_scaled)
        self._last_scalars = (given, scalars)
        return scalars

    def state_dict(self) -> dict[str, np.ndarray]:
        """``m/<param>``, ``v/<param>`` and the step count ``step/<param>`` (0-d int64)."""
        state = super().state_dict()
        for key, t in self.steps.items():
            state[f"step/{key}"] = np.array(t, dtype=np.int64)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """As ``Optimizer.load_state_dict``; each parameter also needs ``step/<param>`` >= 1."""
        who = "Adam.load_state_dict"
        steps: dict[str, int] = {}
        moments: dict[str, Any] = {}
        for name, value in state.items():
            if not name.startswith("step/"):
                moments[name] = value
                continue
            step = np.asarray(value)
            # Below 2**63 - 1: state_dict writes it back as int64, one step later.
            if step.shape != () or step.dtype.kind not in "iu" or not 1 <= int(step) < 2**63 - 1:
                raise ValueError(
                    f"{who}: {name} must be an integer in [1, 2**63 - 1), got {value!r}"
                )
            steps[name[len("step/") :]] = int(step)
        loaded = self._parse_state(moments)
        if set(steps) != set(loaded.get("m", {})):
            raise ValueError(
                f"{who}: step counts for {sorted(steps)} but moments for "
                f"{sorted(loaded.get('m', {}))}; each parameter needs both"
            )
        self.m, self.v, self.steps = loaded.get("m", {}), loaded.get("v", {}), steps
        self._follow_device()


# Entries of a decaying state below 2**_FLUSH_BITS times the smallest normal number are set to 0.
_FLUSH_BITS = 24


def _fit(scalars: tuple[float, ...], dtype: Any) -> bool:
    """Whether Adam's folded scalars ``inv_scale`` and ``eps_scaled`` are finite in
    ``dtype`` (``lr = 0`` folds to 0 and inf on purpose: nothing moves)."""
    largest = float(np.finfo(dtype).max)
    inv_scale, eps_scaled = scalars[4:]
    return inv_scale <= largest and (eps_scaled <= largest or inv_scale == 0.0)


def _flush_interval(decay: float) -> int:
    """Steps between flushes: an entry above the bound at one flush, multiplied by ``decay``
    every step, is still a normal number at the next."""
    return max(1, int(_FLUSH_BITS / -math.log2(decay)))


def _flush_near_subnormal(state: np.ndarray, work: np.ndarray) -> None:
    """Set to 0 the entries of ``state`` below ``2**24 * tiny`` (float32 and float64 only).

    Why: Adam's first moment decays by ``beta1`` every step whose gradient is 0
    (the weights of a dead ReLU unit) and falls into the subnormal numbers after
    about 800 float32 steps; arithmetic on them is tens of times slower, and
    784-256-256-10's Adam step took twice as long after four epochs. The
    flushed entries could not move a float32 parameter by more than about
    ``lr * 1e-7``: ``m < 2e-31`` here, ``sqrt(v)`` of a nonzero ``v`` is at
    least 3.7e-23, and the bias correction at most ``1 / (1 - beta1)``.
    Float16 needs none of this: NumPy computes it in float32.
    """
    if state.dtype not in (np.float32, np.float64):
        return
    bound = float(np.finfo(state.dtype).tiny) * 2.0**_FLUSH_BITS
    np.abs(state, out=work)
    np.copyto(state, 0.0, where=work < bound)


_OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": SGD,
    "momentum": Momentum,
    "nesterov": Nesterov,
    "adagrad": AdaGrad,
    "rmsprop": RMSprop,
    "adam": Adam,
}


def make_optimizer(name: str, **kwargs: Any) -> Optimizer:
    """Build an optimiser by name (any case): ``make_optimizer("adam", lr=1e-3)``.

    Names: ``"sgd"``, ``"momentum"``, ``"nesterov"``, ``"adagrad"``,
    ``"rmsprop"``, ``"adam"``; ``kwargs`` go to the class.

    >>> make_optimizer("Momentum", lr=0.1)
    Momentum(lr=0.1, momentum=0.9, weight_decay=0.0)
    """
    cls = _OPTIMIZERS.get(name.lower()) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {sorted(_OPTIMIZERS)}")
    return cls(**kwargs)
