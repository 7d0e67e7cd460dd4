"""Networks: ``Sequential`` with the book's methods, and ready-made MLPs."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from scratchnn import _checks, layers
from scratchnn.backend import (
    FLOAT_DTYPES,
    as_array,
    as_result,
    check_device,
    cupy_array_type,
    device_of,
    get_array_module,
    move_arrays,
    to_device,
)
from scratchnn.layers.losses import DeviceLoss, Loss, SigmoidWithLoss, SoftmaxWithLoss
from scratchnn.parameters import (
    Entry,
    backward_noted,
    bindings,
    buffers_of,
    forward_in_mode,
    gradients_of,
    is_ours,
    numbered_key,
    parameter_table,
    parameters_of,
    rebind,
)

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
    :mod:`scratchnn.parameters` reads them: scratchnn's ``params`` and ``grads``
    dicts; the book's arrays beside their gradients (``W`` beside ``dW``;
    ``running_mean`` and ``running_var`` saved with them), numbered as
    scratchnn's; the sequel's ``params`` and ``grads`` lists, keyed
    ``params1[0]``, ``params1[1]``, ``params2[0]``, .... A layer's number is
    one more than the last number any of its names had, so that layers of
    other kinds never share a key, given when the network is built and kept
    while its layers stay the same. A forward that takes the book's
    ``train_flg`` gets the network's mode. What a forward assigns (the book's
    cached ``x``) is never a parameter, even beside a ``dx``; a parameter a
    layer makes at its first forward counts from its second. One array held
    by two layers (the sequel's tied weights, also as
    a transposed view) is one parameter, under its first key, whose gradient
    is the sum of both layers' (transposed where the view is).

    On the GPU, ``gradient`` runs an ``Affine`` followed by a ``Relu`` (not packed)
    as one pair: the Relu's kernel adds the Affine's bias, and the Affine's backward
    passes its gradient through the Relu in the kernel that sums ``db``. Two launches
    fewer each way, and the same arithmetic, bit for bit; each layer holds what its own
    forward would have left (layers whose ``forward`` or ``backward`` was replaced run
    one by one, as does a ``dout`` the Relu would refuse, which its own backward then
    names). A ``SoftmaxWithLoss``'s forward kernel adds the last Affine's bias to the
    scores, and writes the gradient its backward would then launch a kernel for, bit
    for bit the same. ``fuse_on_gpu = False`` turns all of it off.

    >>> from scratchnn import Affine, Relu
    >>> net = Sequential([Affine(np.eye(2), np.zeros(2)), Relu()])
    >>> sorted(net.params)
    ['W1', 'b1']
    >>> print(net.predict(np.array([[1.0, -1.0]])))
    [[1. 0.]]
    """

    # Whether gradient() fuses on the GPU (each Affine with the Relu after it; the loss's
    # forward with the last Affine's bias and with its own backward): a training step
    # there is bound by the host, which pays for every launch (docs/benchmarks.md).
    fuse_on_gpu: ClassVar[bool] = True

    def __init__(self, layers: Sequence[Any], loss: Loss | None = None) -> None:
        layers = list(layers)  # once: a generator checked first would be empty after
        for i, layer in enumerate(layers):
            if isinstance(layer, type):  # Relu for Relu(): it would fail at the first forward
                raise TypeError(
                    f"Sequential: layer {i} is the class {layer.__name__}, not a layer: "
                    f"make one, {layer.__name__}(...)"
                )
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
        self._last_loss: float | DeviceLoss = math.nan  # see last_loss
        self._backward_ran = False  # has gradient() run? (names a gradient backward left unset)
        # (what the layers hold, the table of parameters and the layers' numbers) as last
        # computed: it is read at least twice a training step. Made now, so that the
        # numbers do not depend on when params is first read (a parameter a layer makes
        # at its first forward takes a new number, in a trained network as in a new one).
        self._table: tuple[list[Any], list[Entry], dict[int, int]] = ([None], [], {})
        self._parameter_table()

    # -- the parameters ------------------------------------------------------------

    def _parameter_table(self) -> tuple[list[Entry], dict[int, int]]:
        """Every parameter (see :func:`scratchnn.parameters.parameter_table`), and each
        layer's number, computed again only when a layer holds other arrays."""
        per_layer = [(layer, parameters_of(layer)) for layer in self.layers]
        # What the layers hold now, by identity (the table keeps the layers and arrays
        # alive, so no id in it is reused while it stands), and by name.
        held: list[Any] = [id(layer) for layer in self.layers]
        for _, params in per_layer:
            held += params
            held += map(id, params.values())
        if held != self._table[0]:
            _check_each_layer_once(self.layers)
            # The same layers, in the same order: they keep their numbers.
            same_layers = held[: len(self.layers)] == self._table[0][: len(self.layers)]
            entries, numbers = parameter_table(per_layer, self._table[2] if same_layers else None)
            self._table = (held, entries, numbers)
        return self._table[1], self._table[2]

    @property
    def params(self) -> dict[str, np.ndarray]:
        """Every learnable array, by book-style key (``W1``, ``b1``, ...): the layers' own
        arrays, each once."""
        entries, _ = self._parameter_table()
        return {entry.key: entry.array for entry in entries if entry.tie is None}

    @property
    def grads(self) -> dict[str, np.ndarray]:
        """The gradients of the last backward, keyed like ``params`` (a tied array's summed)."""
        grads: dict[str, np.ndarray] = {}
        layer_grads: dict[int, dict[str, Any]] = {}
        entries, _ = self._parameter_table()
        for entry in entries:
            if id(entry.layer) not in layer_grads:
                layer_grads[id(entry.layer)] = gradients_of(entry.layer)
            grad = layer_grads[id(entry.layer)].get(entry.name)
            if grad is None and self._backward_ran:
                index = next(i for i, layer in enumerate(self.layers) if layer is entry.layer)
                raise RuntimeError(
                    f"Sequential: layer {index} ({type(entry.layer).__name__}) has no gradient "
                    f"of its {entry.name} after backward: its backward must set it (the "
                    "book's dW beside W, an entry of a grads dict or list)"
                )
            if grad is None:
                raise RuntimeError("Sequential: no gradients yet; call gradient(x, t) first")
            if entry.tie is None:
                grads[entry.key] = grad
            else:  # a new array: the layers' own gradients stay as backward left them
                first, transposed = entry.tie
                grads[first] = grads[first] + (grad.T if transposed else grad)
        return grads

    def state(self) -> dict[str, np.ndarray]:
        """Every array a saved model needs: ``params`` plus non-learned buffers (running statistics)."""
        state = dict(self.params)
        _, numbers = self._parameter_table()
        for layer in self.layers:
            if id(layer) not in numbers:
                continue
            for name, array in buffers_of(layer).items():
                key = numbered_key(name, numbers[id(layer)])
                if key in state:  # a book-style layer's running_mean beside a BatchNorm's
                    raise ValueError(
                        f"Sequential.state: two layers would both save {key!r} (one of them "
                        f"is layer {self.layers.index(layer)}); give its arrays other names"
                    )
                state[key] = array
        return state

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Copy ``arrays`` into the network's own arrays, in place, checking names, shapes and dtypes."""
        if not isinstance(arrays, Mapping):  # (a list of pairs: "unhashable type" below)
            raise TypeError(
                f"Sequential.load_state takes a dict of arrays by name, got {type(arrays).__name__}"
            )
        own = self.state()
        missing, unexpected = sorted(set(own) - set(arrays)), sorted(set(arrays) - set(own))
        if missing or unexpected:
            hint = (
                " (a layer that makes arrays at its first forward, as the book's "
                "BatchNormalization its running_mean, has them after it, and its parameters "
                "count from the second: run net.predict on one example twice first)"
                if unexpected and not missing
                else ""
            )
            raise ValueError(
                f"Sequential.load_state: missing {missing}, unexpected {unexpected}{hint}"
            )
        checked = []  # every array is checked before any is copied: a bad call changes nothing
        for key, target in own.items():
            if arrays[key] is None or isinstance(arrays[key], (str, bytes)):
                # (they read as "has shape ()": the value is no array at all)
                raise TypeError(
                    f"Sequential.load_state: {key} is a {type(arrays[key]).__name__}, not an array"
                )
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
        targets = [target for target, _ in checked]
        for i, (target, cast) in enumerate(checked):
            # A source that is one of the network's own arrays (W1 and W2 swapped) would be
            # overwritten before it is read: such a one is copied first.
            if any(np.may_share_memory(cast, other) for j, other in enumerate(targets) if j != i):
                checked[i] = (target, cast.copy())
        for target, cast in checked:
            target[...] = cast

    # -- the book's methods ----------------------------------------------------------

    def predict(self, x: Any) -> np.ndarray:
        """Run every layer forward; return the scores before the loss layer."""
        for layer in self.layers:
            x = forward_in_mode(layer, x, self.training)
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
        return self._gradient(x, t, wait=True)

    def _gradient(self, x: Any, t: Any, *, wait: bool) -> dict[str, np.ndarray]:
        """``gradient``; ``wait=False`` leaves a loss on the GPU unread (a
        :class:`~scratchnn.layers.losses.DeviceLoss` in ``_last_loss``), so the step
        does not wait for the card: for ``fit``, which checked every label first."""
        layers_, paired = self.layers, set()  # paired: the Affines run with their Relu
        loss, loss_bias = self.last_layer, None  # (the last Affine's bias, for the loss)
        fuses_loss = (
            type(loss) is SoftmaxWithLoss and self.fuse_on_gpu and _runs_as_written(loss, Loss)
        )
        i, last = 0, len(layers_) - 1
        while i <= last:
            layer = layers_[i]
            if i < last and self._pairs_with_next(i, x):
                h = layer._checked_forward((x,), borrowed=True, defer_bias=True)
                x = layers_[i + 1]._checked_forward((h,), borrowed=True, bias=layer.b)
                paired.add(i)
                i += 2
                continue
            if i == last and fuses_loss and self._fuses_affine(i, x):
                # The loss's kernel adds the bias to the scores, as the Affine would.
                x = layer._checked_forward((x,), borrowed=True, defer_bias=True)
                loss_bias = layer.b
            elif is_ours(layer):
                x = layer._checked_forward((x,), borrowed=True)
            else:
                x = forward_in_mode(layer, x, self.training)
            i += 1
        # The loss's forward kernel writes backward(1.0)'s gradient too, where it can.
        fused = {"with_grad": True} if fuses_loss and type(x) is cupy_array_type() else {}
        if loss_bias is not None:
            fused["bias"] = loss_bias
        self._last_loss = loss._checked_forward(
            as_result(x), t, borrowed=True, wait=wait, **fused
        )
        dout = loss.backward(1.0)
        i = len(layers_) - 1
        while i >= 0:
            layer = layers_[i]
            if i - 1 in paired and layer._takes_as_paired(dout):
                # The pair's Affine passes dout through its Relu (the first layer's input
                # is data: nothing needs its gradient).
                relu_mask = layer._mask
                layer, i = layers_[i - 1], i - 1
                dout = layer._checked_backward(dout, input_grad=i > 0, relu_mask=relu_mask)
            elif i == 0 and is_ours(layer):
                # The input is data: nothing needs its gradient, so the first layer skips dx.
                layer.backward(dout, input_grad=False)
            else:
                dout = backward_noted(layer, dout)
            i -= 1
        self._backward_ran = True
        return self.grads

    def _pairs_with_next(self, i: int, x: Any) -> bool:
        """Whether layer ``i``, an ``Affine``, and the ``Relu`` after it run as one pair on
        ``x`` (see the class's docstring; the Relu not packed, its own class's, as written)."""
        after = self.layers[i + 1]
        return (
            type(after) is layers.Relu
            and not after.packed
            and _runs_as_written(after)
            and self._fuses_affine(i, x)
        )

    def _fuses_affine(self, i: int, x: Any) -> bool:
        """Whether layer ``i`` is an ``Affine`` whose bias the kernel after it may add, on
        ``x``: a float CuPy matrix of its width, fusing on, the layer scratchnn's own class
        as written (a subclass, or a hook on its forward, may compute otherwise)."""
        layer = self.layers[i]
        return (
            type(layer) is layers.Affine
            and type(x) is cupy_array_type()
            and self.fuse_on_gpu
            and _runs_as_written(layer)
            and x.ndim == 2
            and x.dtype in FLOAT_DTYPES
            and x.shape[1] == layer.W.shape[0]
        )

    @property
    def last_loss(self) -> float:
        """The loss of the last ``loss`` or ``gradient`` call (NaN before the first)."""
        if type(self._last_loss) is not float:  # left on the GPU by fit's steps: read now
            self._last_loss = float(self._last_loss)
        return self._last_loss

    @last_loss.setter
    def last_loss(self, value: float) -> None:
        self._last_loss = value

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


def _runs_as_written(layer: Any, base: Any = layers.Layer) -> bool:
    """Whether ``layer``'s forward and backward are ``base``'s, not replaced on the layer
    or its class (a hook that clips or logs): what is fused calls neither."""
    kind, own = type(layer), vars(layer)
    return (
        kind.forward is base.forward
        and kind.backward is base.backward
        and "forward" not in own
        and "backward" not in own
    )


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
    get_array_module(scores, t)  # host labels beside device scores: the mixing TypeError, named
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
def evaluation_mode(network: Any, put_back_layers: bool = True) -> Iterator[None]:
    """Run the block with ``network`` in evaluation mode, then put back the mode of the
    network and of each of its layers as it was: a layer its user set apart (a BatchNorm
    frozen with ``training = False``) stays as it was, where ``network.train()`` would
    overwrite it. The attributes of the user's layers are put back too (a stateful
    layer's ``h``, the caches the block's forwards made), so that an evaluation between
    training steps changes nothing of what the next step reads (unless
    ``put_back_layers`` is false)."""
    bound = bindings(getattr(network, "layers", ())) if put_back_layers else []
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
        rebind(bound)


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

    if not isinstance(activation, str):
        raise TypeError(f"mlp: activation must be a name such as 'relu', got {activation!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")
    if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__len__"):
        raise TypeError(f"mlp: sizes must be a list of ints, got {type(sizes).__name__}")
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
    hidden = _checks.count("cnn", "hidden", hidden)
    n_classes = _checks.count("cnn", "n_classes", n_classes)
    _checks.given_generator("cnn", rng)  # all checked before any weight is drawn from it
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
