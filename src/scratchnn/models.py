"""Networks: ``Sequential`` with the book's methods, and ready-made MLPs."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from scratchnn import _checks, layers
from scratchnn.backend import (
    as_array,
    as_result,
    check_device,
    device_of,
    get_array_module,
    is_array,
    move_arrays,
    to_device,
)
from scratchnn.layers.losses import Loss, SigmoidWithLoss, SoftmaxWithLoss

# The activations a ready-made network can use, by the name the command line takes.
ACTIVATIONS: dict[str, Any] = {
    "relu": layers.Relu,
    "sigmoid": layers.Sigmoid,
    "tanh": layers.Tanh,
    "leaky-relu": layers.LeakyRelu,
    "elu": layers.Elu,
    "gelu": layers.Gelu,
    "gelu-tanh": lambda: layers.Gelu(approximate="tanh"),
    "softplus": layers.Softplus,
    "silu": layers.Silu,
    "softmax": layers.Softmax,
    "identity": layers.Identity,
}


class Sequential:
    """A stack of layers and a loss layer, with the book's network methods.

    ``predict(x)`` runs the layers forward; ``loss(x, t)`` adds the loss layer;
    ``accuracy(x, t)`` compares the arg-max of the prediction with the labels;
    ``gradient(x, t)`` runs forward and backward and returns the gradients in a
    dict keyed like ``params``.

    ``params`` names each layer's arrays as the book's ``MultiLayerNet`` does:
    ``W1``, ``b1`` for the first layer with weights (``Affine`` or ``Conv2d``),
    ``W2``, ``b2`` for the second, and so on; batch normalisation layers are
    numbered apart, ``gamma1``, ``beta1``, as in ``MultiLayerNetExtend``. The
    dict holds the layers' own arrays, so an optimiser that updates it in place
    trains the network.

    ``train()`` and ``eval()`` set the mode of layers that have one (a
    ``training`` attribute, as dropout and batch normalisation have).

    Layers of the user's own join in any of three styles, as
    :func:`parameters_of` reads them: scratchnn's ``params`` and ``grads``
    dicts; the book's arrays beside their gradients (``W`` beside ``dW``;
    ``running_mean`` and ``running_var`` saved with them), numbered as
    scratchnn's; the sequel's ``params`` and ``grads`` lists, keyed
    ``params1[0]``, ``params1[1]``, ``params2[0]``, .... A layer's number is
    one more than the last number any of its names had, so that layers of
    other kinds never share a key. A forward that takes the book's
    ``train_flg`` gets the network's mode. An array that a forward received
    or returned (the book's cached ``x``) is never a parameter, even beside a
    ``dx``. One array held by two layers (the sequel's tied weights, also as
    a transposed view) is one parameter, under its first key, whose gradient
    is the sum of both layers' (transposed where the view is).

    >>> from scratchnn import Affine, Relu
    >>> net = Sequential([Affine(np.eye(2), np.zeros(2)), Relu()])
    >>> sorted(net.params)
    ['W1', 'b1']
    >>> print(net.predict(np.array([[1.0, -1.0]])))
    [[1. 0.]]
    """

    def __init__(self, layers: Sequence[Any], loss: Loss | None = None) -> None:
        layers = list(layers)  # once: a generator checked first would be empty after
        for i, layer in enumerate(layers):
            if not (
                callable(getattr(layer, "forward", None))
                and callable(getattr(layer, "backward", None))
            ):
                raise TypeError(
                    f"Sequential: layer {i} ({layer!r}) has no forward/backward methods"
                )
        if loss is not None and not isinstance(loss, Loss):
            raise TypeError(f"Sequential: loss must be a Loss layer, got {loss!r}")
        _check_each_layer_once(layers)
        self.layers = layers
        self.last_layer: Loss = loss if loss is not None else SoftmaxWithLoss()
        self.training = True
        self.last_loss = math.nan  # the loss of the last ``loss``/``gradient`` call
        # (the layers and their names, their numbering) as last computed
        self._numbered: tuple[tuple[Any, ...], list[tuple[int, Any]]] = ((), [])
        # Per layer of the user's own (by id), the attributes that held what its forward
        # took or gave: caches, never parameters, whatever sits beside them.
        self._caches: dict[int, set[str]] = {}

    # -- the parameters ------------------------------------------------------------

    def _parametrized(self) -> list[tuple[int, Any]]:
        """(1-based number, layer) for each layer that has parameters.

        Layers are numbered per kind of parameters, as the book's
        ``MultiLayerNetExtend``: ``W1, b1, gamma1, beta1, W2, b2, gamma2, ...``.
        """
        # The names too: a layer may make its parameters at its first forward.
        current = tuple((layer, tuple(self._parameters_of(layer))) for layer in self.layers)
        if current == self._numbered[0]:  # compares layer by layer, identity first
            return self._numbered[1]
        _check_each_layer_once(self.layers)
        last: dict[str, int] = {}  # the last number each name had
        numbered = []
        owner: dict[str, int] = {}
        for i, (layer, names) in enumerate(current):
            if names:
                k = 1 + max(last.get(name, 0) for name in names)
                last.update(dict.fromkeys(names, k))
                numbered.append((k, layer))
                for name in names:
                    key = _numbered_key(name, k)
                    if key in owner:  # "W" of layer 11 and a "W1" of layer 1
                        raise ValueError(
                            f"Sequential: layers {owner[key]} and {i} would both name a "
                            f"parameter {key!r}; give the custom layer's parameters other names"
                        )
                    owner[key] = i
        self._numbered = (current, numbered)
        return numbered

    def _parameters_of(self, layer: Any) -> dict[str, Any]:
        return parameters_of(layer, caches=self._caches.get(id(layer), ()))

    def _each_parameter(self) -> Iterator[tuple[str, Any, Any, str, tuple[str, bool] | None]]:
        """(key, array, layer, name, tie) for every parameter; ``tie`` names the earlier
        key the array is held under (and whether as its transpose), or is None."""
        seen: dict[str, Any] = {}
        for k, layer in self._parametrized():
            for name, array in self._parameters_of(layer).items():
                key = _numbered_key(name, k)
                tie = _tied(array, seen)
                if tie is None:
                    seen[key] = array
                yield key, array, layer, name, tie

    @property
    def params(self) -> dict[str, np.ndarray]:
        """Every learnable array, by book-style key (``W1``, ``b1``, ...): the layers' own
        arrays, each once."""
        return {key: array for key, array, _, _, tie in self._each_parameter() if tie is None}

    @property
    def grads(self) -> dict[str, np.ndarray]:
        """The gradients of the last backward, keyed like ``params`` (a tied array's summed)."""
        grads: dict[str, np.ndarray] = {}
        layer_grads: dict[int, dict[str, Any]] = {}
        for key, _, layer, name, tie in self._each_parameter():
            if id(layer) not in layer_grads:
                layer_grads[id(layer)] = gradients_of(layer)
            grad = layer_grads[id(layer)].get(name)
            if grad is None:
                raise RuntimeError("Sequential: no gradients yet; call gradient(x, t) first")
            if tie is None:
                grads[key] = grad
            else:  # a new array: the layers' own gradients stay as backward left them
                first, transposed = tie
                grads[first] = grads[first] + (grad.T if transposed else grad)
        return grads

    def state(self) -> dict[str, np.ndarray]:
        """Every array a saved model needs: ``params`` plus non-learned buffers (running statistics)."""
        state = dict(self.params)
        for k, layer in self._parametrized():
            for name, array in buffers_of(layer).items():
                key = _numbered_key(name, k)
                if key in state:  # a book-style layer's running_mean beside a BatchNorm's
                    raise ValueError(
                        f"Sequential.state: two layers would both save {key!r} (one of them "
                        f"is layer {self.layers.index(layer)}); give its arrays other names"
                    )
                state[key] = array
        return state

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Copy ``arrays`` into the network's own arrays, in place, checking names, shapes and dtypes."""
        own = self.state()
        missing, unexpected = sorted(set(own) - set(arrays)), sorted(set(arrays) - set(own))
        if missing or unexpected:
            hint = (
                " (a layer that makes arrays at its first forward, as the book's "
                "BatchNormalization its running_mean, has them after one: run net.predict on "
                "one example first)"
                if unexpected and not missing
                else ""
            )
            raise ValueError(
                f"Sequential.load_state: missing {missing}, unexpected {unexpected}{hint}"
            )
        checked = []  # every array is checked before any is copied: a bad call changes nothing
        for key, target in own.items():
            # A checkpoint's host arrays go to the network's device (and back).
            source = to_device(as_result(arrays[key]), device_of(target))
            if source.shape != target.shape:
                raise ValueError(
                    f"Sequential.load_state: {key} has shape {source.shape}, the network's {target.shape}"
                )
            if source.dtype.kind not in "iuf":
                raise TypeError(
                    f"Sequential.load_state: {key} has dtype {source.dtype}, not a real number type"
                )
            xp = get_array_module(source)
            with np.errstate(over="ignore"):
                cast = source.astype(target.dtype, copy=False)
            if bool((xp.isinf(cast) & xp.isfinite(source)).any()):
                raise ValueError(
                    f"Sequential.load_state: {key} has values beyond the range of {target.dtype}"
                )
            checked.append((target, cast))
        for target, cast in checked:
            target[...] = cast

    # -- the book's methods ----------------------------------------------------------

    def predict(self, x: Any) -> np.ndarray:
        """Run every layer forward; return the scores before the loss layer."""
        for layer in self.layers:
            x = self._forward(layer, x)
        return as_result(x)

    def loss(self, x: Any, t: Any) -> float:
        """The loss of the prediction for ``x`` against ``t``."""
        self.last_loss = self.last_layer.forward(self.predict(x), t)
        return self.last_loss

    def accuracy(self, x: Any, t: Any) -> float:
        """The fraction of examples whose arg-max prediction equals the label (index or one-hot).

        Runs in evaluation mode, as the book's ``accuracy`` (``train_flg=False``):
        no dropout, batch normalisation by its running statistics, which it does
        not move; the network's mode is put back afterwards. With a
        ``SigmoidWithLoss`` the scores are logits of independent yes/no answers:
        the fraction of answers right (logit > 0 against target >= 0.5).
        NaN where a score is NaN (a network that diverged has no answers to count);
        ``ValueError`` for no examples.
        """
        with evaluation_mode(self):
            scores = self.predict(x)
        right, answers = count_right(self.last_layer, scores, t, who="Sequential.accuracy")
        if not answers:
            raise ValueError("Sequential.accuracy: no examples to count (an empty set)")
        return float(right) / answers

    def gradient(self, x: Any, t: Any) -> dict[str, np.ndarray]:
        """Forward and backward; return the gradients keyed like ``params``.

        The layers keep views of ``x`` and of the arrays between them, not copies:
        nothing can change them between this call's forward and backward.
        """
        for layer in self.layers:
            if isinstance(layer, layers.Layer):
                x = layer._checked_forward((x,), borrowed=True)
            else:
                x = self._forward(layer, x)
        self.last_loss = self.last_layer._checked_forward(as_result(x), t, borrowed=True)
        dout = self.last_layer.backward(1.0)
        for i in reversed(range(len(self.layers))):
            layer = self.layers[i]
            if i == 0 and isinstance(layer, layers.Layer):
                # The input is data: nothing needs its gradient, so the first layer skips dx.
                layer.backward(dout, input_grad=False)
            else:
                dout = layer.backward(dout)
        return self.grads

    def _forward(self, layer: Any, x: Any) -> Any:
        """A layer's forward in the network's mode; what a user's layer keeps of its input
        or output is noted as a cache."""
        out = forward_in_mode(layer, x, self.training)
        if not isinstance(layer, layers.Layer):
            kept = {
                name
                for name, value in getattr(layer, "__dict__", {}).items()
                if is_array(value) and (_same_memory(value, x) or _same_memory(value, out))
            }
            if kept:
                self._caches.setdefault(id(layer), set()).update(kept)
        return out

    # -- modes and display -----------------------------------------------------------

    def train(self, mode: bool = True) -> Sequential:
        """Put the network (and every layer that has a mode) in training mode."""
        self.training = _checks.flag("Sequential.train", "mode", mode)
        for layer in self.layers:
            if hasattr(layer, "training"):
                layer.training = self.training
        return self

    def eval(self) -> Sequential:
        """Put the network in evaluation mode."""
        return self.train(False)

    def to(self, device: str) -> Sequential:
        """Move every layer's arrays (parameters, gradients, buffers, caches) to ``device``.

        ``"cuda"`` needs CuPy and a GPU (``pip install scratchnn[gpu]``); ``"cpu"``
        brings them back as NumPy arrays. Returns the network, moved in place:
        ``params`` then holds the moved arrays, so build the optimiser's view of
        them after moving (its own state moves with ``optimizer.to``).

        >>> from scratchnn import Affine
        >>> Sequential([Affine(np.eye(2), np.zeros(2))]).to("cpu").params["W1"].shape
        (2, 2)
        """
        check_device(device)
        moved: dict[int, Any] = {}  # an array held twice (by two layers, or as W and in
        for layer in [*self.layers, self.last_layer]:  # params) moves once
            if isinstance(layer, layers.Layer):
                # A subclass's own to(device) (moving the layers it holds) is called as it is.
                shares = "moved" in inspect.signature(layer.to).parameters
                layer.to(device, moved=moved) if shares else layer.to(device)
            else:  # a layer of the user's own, not built on Layer
                move_arrays(layer, device, moved)
        return self

    def __repr__(self) -> str:
        lines = [f"  ({i}): {layer!r}" for i, layer in enumerate(self.layers)]
        lines.append(f"  loss: {self.last_layer!r}")
        return "Sequential(\n" + "\n".join(lines) + "\n)"


# -- a layer's parameters, in the styles a learner writes them ------------------------

# The book's BatchNormalization keeps these beside its parameters; a saved model needs them.
BOOK_BUFFERS = ("running_mean", "running_var")


def parameters_of(layer: Any, caches: Iterable[str] = ()) -> dict[str, Any]:
    """A layer's learnable arrays by name, the layer's own objects.

    scratchnn's layers (and any layer with a ``params`` dict) name them in that
    dict; the book's sequel keeps a ``params`` list, named here ``params[0]``,
    ``params[1]``, ...; the book keeps each array beside its gradient (``W`` and
    ``dW``, ``gamma`` and ``dgamma``), found as a float array attribute ``X``
    beside an attribute ``dX`` (None until the first backward), unless its name
    is among ``caches`` (what a forward took or gave: ``x`` beside a ``dx``).
    """
    params = getattr(layer, "params", None)
    if isinstance(params, dict):
        return params
    if isinstance(params, (list, tuple)):
        return {f"params[{j}]": array for j, array in enumerate(params)}
    if params is not None:
        raise TypeError(
            f"{type(layer).__name__}.params must be a dict of arrays by name (or a list, as "
            f"the book's sequel keeps them), got {type(params).__name__}"
        )
    found = getattr(layer, "__dict__", {})
    caches = set(caches)
    scalars = [
        name
        for name, value in found.items()
        if isinstance(value, (float, np.floating)) and f"d{name}" in found and name not in caches
    ]
    if scalars:  # check_layer takes them; an optimiser can move only an array, in place
        raise TypeError(
            f"{type(layer).__name__} keeps its parameter {scalars[0]} as a float: keep it as an "
            f"array (self.{scalars[0]} = np.array(...)), which an optimiser updates in place"
        )
    return {
        name: value
        for name, value in found.items()
        if is_array(value) and value.dtype.kind == "f" and f"d{name}" in found
        and name not in caches
    }  # fmt: skip


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


def _numbered_key(name: str, k: int) -> str:
    """``W`` of the second such layer is ``W2``; the sequel's ``params[0]``, ``params2[0]``."""
    base, bracket, index = name.partition("[")
    return f"{base}{k}{bracket}{index}"


def forward_in_mode(layer: Any, x: Any, training: bool) -> Any:
    """A layer's forward; the book's ``forward(x, train_flg=True)`` gets the mode."""
    if isinstance(layer, layers.Layer):  # its mode is its training attribute
        return layer.forward(x)
    try:
        takes_mode = "train_flg" in inspect.signature(layer.forward).parameters
    except (TypeError, ValueError):  # no signature to read
        takes_mode = False
    return layer.forward(x, train_flg=training) if takes_mode else layer.forward(x)


def _same_memory(a: Any, b: Any) -> bool:
    """Whether ``a`` is ``b`` or a view of the same memory (the book keeps a reshape of x)."""
    if a is b:
        return True
    base_a, base_b = getattr(a, "base", None), getattr(b, "base", None)
    return (base_a is not None and (base_a is b or base_a is base_b)) or base_b is a


def _tied(array: Any, seen: dict[str, Any]) -> tuple[str, bool] | None:
    """The key under which ``array`` (or its transpose, as a view) is already held."""
    for key, other in seen.items():
        if other is array:
            return key, False
        if (
            array.ndim == 2 and other.ndim == 2 and array.shape == other.shape[::-1]
            and array.strides == other.strides[::-1] and _address(array) == _address(other)
            and type(array) is type(other)
        ):  # fmt: skip
            return key, True
    return None


def _address(array: Any) -> int:
    if isinstance(array, np.ndarray):
        return int(array.__array_interface__["data"][0])
    return int(array.data.ptr)  # CuPy


def has_answers(last_layer: Any, scores: Any) -> bool:
    """Whether ``scores`` hold answers to count: yes/no logits (``SigmoidWithLoss``), or
    scores of two classes or more (a regression's single output has none)."""
    return isinstance(last_layer, SigmoidWithLoss) or (scores.ndim > 0 and scores.shape[-1] > 1)


def count_right(
    last_layer: Any, scores: Any, t: Any, *, who: str, labels_checked: bool = False
) -> tuple[Any, int]:
    """The number of right answers in ``scores`` for targets ``t``, and of answers.

    Class scores: the arg-max against class indices or one-hot rows, one answer
    per example. With a ``SigmoidWithLoss`` the scores are logits of independent
    yes/no answers: logit > 0 against target >= 0.5, one answer per score. Where
    a score is NaN the count is NaN: NumPy's arg-max of a NaN row is the NaN's
    place, and a diverged network would score a believable accuracy. The
    count stays where the scores are (a 0-d array: on a GPU, reading it waits
    for the card); class-index labels the loss would refuse raise ``ValueError``,
    unless ``labels_checked`` says the loss has just taken them (a check on a GPU
    waits); yes/no targets are compared with 0.5 as they are.
    """
    # As the losses take targets: a masked array refused (not unmasked), complex refused.
    t = as_array(t, who=who, what="targets")
    if isinstance(last_layer, SigmoidWithLoss):
        if t.shape != scores.shape and (*t.shape, 1) != scores.shape:
            raise ValueError(f"{who}: targets have shape {t.shape}, scores {scores.shape}")
        right = (scores.reshape(t.shape) > 0) == (t >= 0.5)
        return _nan_if_any_nan(np.sum(right), scores), right.size
    if not has_answers(last_layer, scores):
        raise ValueError(
            f"{who}: scores of shape {scores.shape} have fewer than two classes to choose "
            "from (a yes/no network needs SigmoidWithLoss)"
        )
    y = np.argmax(scores, axis=-1)
    if t.ndim == y.ndim + 1:
        if t.shape != scores.shape:  # (N, 1) labels are not one-hot rows
            raise ValueError(
                f"{who}: labels of shape {t.shape} are neither class indices "
                f"of shape {y.shape} nor one-hot rows of shape {scores.shape}"
            )
        t = np.argmax(t, axis=-1)
    if t.shape != y.shape:
        raise ValueError(f"{who}: labels have shape {t.shape}, predictions {y.shape}")
    # The labels the loss takes, and no others: a label 7 of three classes, or 1.5,
    # would otherwise count as a wrong answer rather than as a mistake in the data.
    if t.dtype.kind not in "iu":
        raise ValueError(f"{who}: class-index labels must have an integer dtype, got {t.dtype}")
    if not labels_checked and t.size and _checks.labels_out_of_range(t, scores.shape[-1]):
        raise _checks.label_error(who, t, scores.shape[-1])
    return _nan_if_any_nan(np.sum(y == t), scores), y.size


def _nan_if_any_nan(count: Any, scores: Any) -> Any:
    """``count``, or NaN where any score is NaN; on the scores' device, without a wait."""
    if scores.dtype.kind != "f":
        return count
    xp = get_array_module(scores)
    return xp.where(xp.isnan(scores).any(), xp.nan, count)


@contextlib.contextmanager
def evaluation_mode(network: Any) -> Iterator[None]:
    """Run the block with ``network`` in evaluation mode, then put back the mode of the
    network and of each of its layers as it was: a layer its user set apart (a BatchNorm
    frozen with ``training = False``) stays as it was, where ``network.train()`` would
    overwrite it."""
    saved = [
        (layer, layer.training)
        for layer in getattr(network, "layers", ())
        if hasattr(layer, "training")
    ]
    was_training = getattr(network, "training", None)
    network.eval()
    try:
        yield
    finally:
        if was_training is not None:
            network.training = was_training
        for layer, mode in saved:
            layer.training = mode


def _check_each_layer_once(layers: Sequence[Any]) -> None:
    """A layer keeps its last forward for backward, so one object at two places would
    differentiate the wrong input (and be updated twice): ``ValueError``."""
    seen: dict[int, int] = {}
    for i, layer in enumerate(layers):
        if id(layer) in seen:
            raise ValueError(
                f"Sequential: layer {i} is the same object as layer {seen[id(layer)]}; "
                "each place needs its own layer object (build a new one)"
            )
        seen[id(layer)] = i


def mlp(
    sizes: Sequence[int],
    *,
    activation: str = "relu",
    init: str | float = "he",
    rng: np.random.Generator,
    dtype: Any = np.float32,
    loss: Loss | None = None,
) -> Sequential:
    """A multi-layer perceptron: ``Affine`` layers of ``sizes`` with ``activation`` between them.

    ``init`` names a weight initialiser of :mod:`scratchnn.init` ("he",
    "xavier", ...) or is a fixed standard deviation, the book's
    ``weight_init_std``; biases start at zero. Weights are drawn from ``rng``.

    >>> net = mlp([784, 50, 10], rng=np.random.default_rng(0))
    >>> print(net)
    Sequential(
      (0): Affine(784, 50, dtype=float32)
      (1): Relu(packed=False)
      (2): Affine(50, 10, dtype=float32)
      loss: SoftmaxWithLoss()
    )
    """
    from scratchnn.init import make_initializer

    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")
    if len(sizes) < 2:
        raise ValueError(f"an MLP needs at least an input and an output size, got {list(sizes)}")
    initializer = make_initializer(init)
    dtype = _checks.float_dtype("mlp", dtype)
    stack: list[Any] = []
    sizes = [_checks.count("mlp", "a layer size", n) for n in sizes]  # 2.7 is no size
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        W = initializer(n_in, n_out, rng, dtype)
        stack.append(layers.Affine(W, np.zeros(n_out, dtype=dtype)))
        if i < len(sizes) - 2:
            stack.append(ACTIVATIONS[activation]())
    return Sequential(stack, loss)


def cnn(
    *,
    rng: np.random.Generator,
    channels: Sequence[int] = (16, 32),
    hidden: int = 128,
    dropout: float = 0.0,
    in_shape: tuple[int, int, int] = (1, 28, 28),
    n_classes: int = 10,
    dtype: Any = np.float32,
    loss: Loss | None = None,
) -> Sequential:
    """A small convolutional network for (N, 1, 28, 28) images, the book's ``SimpleConvNet`` grown.

    One block per entry of ``channels``: ``Conv2d`` 3×3 (padding 1, so the
    size is kept), ``MaxPool2d(2)`` (halving the size), ``BatchNorm``,
    ``Relu``; then ``Flatten``, ``Affine`` to ``hidden`` units, ``Relu``,
    and ``Affine`` to the classes. With ``dropout > 0``, a ``Dropout(dropout)``
    comes before each ``Affine``: on the convolutional features and on the
    hidden units (the book's chapter 6 drops after every hidden layer).
    He initialisation from ``rng`` (which the dropout layer also draws from).

    Pooling comes straight after the convolution: max pooling commutes with
    ReLU, and batch normalisation and ReLU then run on a quarter of the
    pixels, which makes a training step about a fifth faster.

    >>> print(cnn(rng=np.random.default_rng(0), dropout=0.25))
    Sequential(
      (0): Conv2d(1, 16, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dtype=float32)
      (1): MaxPool2d(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0))
      (2): BatchNorm(16, eps=1e-05, momentum=0.1, dtype=float32)
      (3): Relu(packed=False)
      (4): Conv2d(16, 32, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dtype=float32)
      (5): MaxPool2d(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0))
      (6): BatchNorm(32, eps=1e-05, momentum=0.1, dtype=float32)
      (7): Relu(packed=False)
      (8): Flatten()
      (9): Dropout(p=0.25)
      (10): Affine(1568, 128, dtype=float32)
      (11): Relu(packed=False)
      (12): Dropout(p=0.25)
      (13): Affine(128, 10, dtype=float32)
      loss: SoftmaxWithLoss()
    )
    """
    from scratchnn.init import he_normal

    dtype = _checks.float_dtype("cnn", dtype)
    dropout = _checks.fraction("cnn", "dropout", dropout)  # -0.5 would mean none, silently
    if not isinstance(in_shape, tuple) or len(in_shape) != 3:
        raise ValueError(f"cnn: in_shape must be (channels, height, width), got {in_shape!r}")
    c_in, h, w = (_checks.count("cnn", "in_shape", n) for n in in_shape)
    if isinstance(channels, (str, bytes)):  # b"ab" would be 97 and 98 channels
        raise TypeError(f"cnn: channels must be a sequence of ints, got {channels!r}")
    channels = [_checks.count("cnn", "channels", n) for n in channels]
    if min(h, w) >> len(channels) < 1:
        # Each block's pooling halves the image: checked before any weight is drawn.
        raise ValueError(
            f"cnn: {len(channels)} conv blocks (channels {list(channels)}) halve {h}x{w} "
            f"images to nothing; at most {min(h, w).bit_length() - 1} fit"
        )
    stack: list[Any] = []
    for c_out in channels:
        stack += [
            layers.Conv2d(c_in, int(c_out), 3, padding=1, rng=rng, dtype=dtype),
            layers.MaxPool2d(2),
            layers.BatchNorm(int(c_out), dtype=dtype),
            layers.Relu(),
        ]
        c_in, h, w = int(c_out), h // 2, w // 2
    stack.append(layers.Flatten())
    if dropout > 0:
        stack.append(layers.Dropout(dropout, rng=rng))
    stack += [
        layers.Affine(he_normal(c_in * h * w, hidden, rng, dtype), np.zeros(hidden, dtype)),
        layers.Relu(),
    ]
    if dropout > 0:
        stack.append(layers.Dropout(dropout, rng=rng))
    stack.append(
        layers.Affine(he_normal(hidden, n_classes, rng, dtype), np.zeros(n_classes, dtype))
    )
    return Sequential(stack, loss)
