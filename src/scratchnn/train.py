"""The training loop: ``fit`` a network with an optimiser, and its history.

``fit`` runs epochs of shuffled mini-batches (shuffled by a seeded
``numpy.random.Generator``, so the same seed gives the same run bit for bit),
evaluates on the training and test sets after each epoch, shows a progress
bar on a terminal and calls back once per epoch, which is where the command
line writes its checkpoints. The training-set metrics are taken on a fixed
subset of 10,000 examples by default (``train_eval_size``), the test set is
always evaluated whole.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

import numpy as np

from scratchnn import _checks
from scratchnn.backend import as_array, device_of, to_device
from scratchnn.data.batches import minibatch_rows
from scratchnn.layers.losses import DeviceLoss, Loss, read_losses
from scratchnn.models import Sequential, count_right, evaluation_mode, has_answers
from scratchnn.progress import ProgressBar
from scratchnn.steps import TrainingStep

HISTORY_KEYS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "seconds")
# How many training examples fit evaluates after each epoch, unless told otherwise.
TRAIN_EVAL_SIZE = 10_000
#: evaluate's batch size for arrays on a GPU (CuPy).
DEVICE_EVAL_BATCH = 1024


@dataclass
class History:
    """Per-epoch metrics, one list per metric (the layout of Keras's ``History.history``).

    ``train_loss`` and ``train_acc`` are measured after each epoch, in evaluation
    mode, on the fixed subset of the training set that ``fit`` evaluates (by
    default 10,000 examples, the same ones every epoch; all of them with
    ``train_eval_size=None``); ``test_loss`` and ``test_acc`` on the whole test set.
    """

    epoch: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def append(self, **row: float) -> None:
        """Add one epoch's metrics (every key of ``HISTORY_KEYS``, and no other): the
        next epoch number, then numbers (NaN for a metric not measured)."""
        if set(row) != set(HISTORY_KEYS):
            raise TypeError(
                f"History.append: needs exactly the keys {list(HISTORY_KEYS)}, got {sorted(row)}"
            )
        epoch = row["epoch"]
        if (
            isinstance(epoch, (bool, np.bool_))
            or not isinstance(epoch, numbers.Integral)
            or epoch != len(self.epoch) + 1
        ):
            raise ValueError(f"History.append: epoch must be {len(self.epoch) + 1}, got {epoch!r}")
        for key in HISTORY_KEYS[1:]:
            _checks.real_or_nan("History.append", key, row[key])
        for key in HISTORY_KEYS:
            value = row[key]
            getattr(self, key).append(int(value) if key == "epoch" else float(value))

    def to_dict(self) -> dict[str, list[Any]]:
        return {key: list(getattr(self, key)) for key in HISTORY_KEYS}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        """Rebuild a history, checking every metric: a list of one length for all, whole
        epoch numbers 1, 2, ..., and numbers (``None``, as ``to_json`` writes NaN, reads
        back as NaN) for the rest."""
        if not isinstance(data, dict) or set(HISTORY_KEYS) - set(data):
            raise ValueError(f"history must have the keys {list(HISTORY_KEYS)}")
        for key in HISTORY_KEYS:
            if not isinstance(data[key], list):
                raise ValueError(f"history: {key} must be a list, got {type(data[key]).__name__}")
        lengths = {len(data[key]) for key in HISTORY_KEYS}
        if len(lengths) != 1:
            raise ValueError("history lists have different lengths")
        if data["epoch"] != list(range(1, len(data["epoch"]) + 1)) or any(
            type(epoch) is not int for epoch in data["epoch"]
        ):
            raise ValueError(f"history: epoch must be 1, 2, 3, ..., got {data['epoch'][:10]}")
        history = cls(epoch=list(data["epoch"]))
        for key in HISTORY_KEYS[1:]:
            values = getattr(history, key)
            for value in data[key]:
                if value is not None and (
                    isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real)
                ):
                    raise ValueError(f"history: {key} holds {value!r}, not a number")
                try:
                    values.append(math.nan if value is None else float(value))
                except OverflowError:  # an integer of 400 digits, in a hand-edited file
                    raise ValueError(
                        f"history: {key} holds a number beyond the float range"
                    ) from None
        return history

    def to_json(self) -> str:
        """Strict JSON: a NaN or infinite metric (a diverged run) is written as ``null``."""
        finite = {
            key: [v if key == "epoch" or math.isfinite(v) else None for v in values]
            for key, values in self.to_dict().items()
        }
        return json.dumps(finite, indent=2, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> History:
        """The history that ``to_json`` wrote (``null`` reads back as NaN)."""
        try:
            data = _checks.strict_json(text)
        except (ValueError, RecursionError) as error:
            # RecursionError: nesting deeper than the parser's stack (a hostile file).
            raise ValueError(f"history is not JSON: {error}") from None
        return cls.from_dict(data)

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(HISTORY_KEYS)
        for i in range(len(self.epoch)):
            writer.writerow([getattr(self, key)[i] for key in HISTORY_KEYS])
        return buffer.getvalue()

    def __len__(self) -> int:
        return len(self.epoch)


def evaluate(
    network: Any, x: np.ndarray, t: np.ndarray, *, batch_size: int | None = None
) -> tuple[float, float]:
    """Mean loss and accuracy of ``network`` on ``(x, t)``, in evaluation mode, in batches.

    By default batches of 128 on the CPU: a CNN's im2col matrices then stay in
    the processor's cache, and evaluation runs about twice as fast as in
    batches of 1,000. On a GPU, batches of ``DEVICE_EVAL_BATCH``: there each
    batch costs its kernel launches, not cache misses, and nothing waits for
    the card until the end: the losses stay there (``DeviceLoss``) and are read
    together, their labels checked then; the correct answers are counted there
    and read once. The results are the same but for the rounding of the sums.
    """
    x, t = as_array(x, who="evaluate", what="data"), as_array(t, who="evaluate", what="labels")
    if batch_size is None:
        batch_size = 128 if device_of(x) == "cpu" else DEVICE_EVAL_BATCH
    batch_size = _checks.count("evaluate", "batch_size", batch_size)  # a Python int
    _check_pairs("evaluate", x, t)
    right, answers, n = 0, 0, len(x)
    losses: list[float | DeviceLoss] = []
    last_layer = network.last_layer
    with evaluation_mode(network):
        for start in range(0, n, batch_size):
            xb, tb = x[start : start + batch_size], t[start : start + batch_size]
            scores = network.predict(xb)
            if isinstance(last_layer, Loss):  # on a GPU the loss stays there, unread
                losses.append(last_layer._checked_forward(scores, tb, borrowed=True, wait=False))
            else:  # a loss layer of the user's own
                losses.append(last_layer.forward(scores, tb))
            if not has_answers(last_layer, scores):
                continue  # a regression network (MeanSquaredError, one output): no accuracy
            # Counted as accuracy counts (yes/no answers too), where the scores are: on a
            # GPU, no wait for the card per batch. The loss checks the labels (on a GPU,
            # when read below: evaluate changes nothing, so a late error loses nothing).
            batch_right, batch_answers = count_right(
                last_layer, scores, tb, who="evaluate", labels_checked=True
            )
            right, answers = right + batch_right, answers + batch_answers
    total_loss = 0.0
    for start, loss in zip(range(0, n, batch_size), read_losses(losses)):
        total_loss += loss * min(batch_size, n - start)  # each batch weighs what it holds
    return total_loss / n, (float(right) / answers if answers else math.nan)


def _pair(data: Any, what: str) -> tuple[Any, Any]:
    """``(inputs, labels)``, or a ``ValueError`` naming the set."""
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        got = f"{len(data)} parts" if isinstance(data, (tuple, list)) else type(data).__name__
        raise ValueError(f"fit: the {what} must be a pair (inputs, labels), got {got}")
    return data[0], data[1]


def _check_pairs(who: str, x: Any, t: Any, what: str = "data") -> None:
    """``ValueError`` unless ``x`` and ``t`` hold the same, non-zero number of examples."""
    if len(x) != len(t):
        raise ValueError(f"{who}: the {what} has {len(x)} inputs but {len(t)} labels")
    if len(x) == 0:
        raise ValueError(f"{who}: the {what} is empty")


class RunningLoss:
    """The mean loss per example over an epoch's steps so far, as the progress bar shows it.

    A short last batch weighs what it holds. Losses still on the GPU
    (:class:`~scratchnn.layers.losses.DeviceLoss`) are kept unread and read
    together when ``mean()`` is called: one wait for the card per call, not
    one per step.
    """

    def __init__(self) -> None:
        self.value, self.seen = 0.0, 0
        self.pending: list[tuple[float | DeviceLoss, int]] = []

    def add(self, loss: float | DeviceLoss, count: int) -> None:
        self.pending.append((loss, count))
        if type(loss) is float and len(self.pending) == 1:
            self.mean()  # nothing to wait for: fold it in now, keeping the list short

    def mean(self) -> float:
        if self.pending:
            losses = read_losses([loss for loss, _ in self.pending])
            for loss, (_, count) in zip(losses, self.pending):
                self.seen += count
                self.value += (loss - self.value) * count / self.seen
            self.pending.clear()
        return self.value


def _check_set(network: Any, x: Any, t: Any, what: str, batch_size: int) -> bool:
    """A batch of the set through the network and its loss, in evaluation mode (a
    batch, not one example: a stateful layer's state has the batch's size), and every
    label against the classes: what the network cannot take fails now, named.
    Returns whether the labels were checked (class indices against two classes or more)."""
    try:
        with evaluation_mode(network):
            scores = network.predict(x[:batch_size])
            network.last_layer.forward(scores, t[:batch_size])
    except (TypeError, ValueError) as error:  # the layer that raised stays in the traceback
        kind = TypeError if isinstance(error, TypeError) else ValueError
        raise kind(f"fit: the {what}: {error}") from error
    class_indices = t.ndim == scores.ndim - 1 and t.dtype.kind in "iu"
    if class_indices and has_answers(network.last_layer, scores):
        if _checks.labels_out_of_range(t, scores.shape[-1]):
            raise _checks.label_error(f"fit: the {what}", t, scores.shape[-1])
        return True
    return False


def fit(
    network: Any,
    optimizer: Any,
    train_data: tuple[np.ndarray, np.ndarray],
    test_data: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    epochs: int,
    batch_size: int,
    rng: np.random.Generator,
    max_iterations: int | None = None,
    lr_decay: float = 1.0,
    history: History | None = None,
    callbacks: Iterable[Callable[[int, History], None]] = (),
    progress_stream: TextIO | None = None,
    train_eval_size: int | None = TRAIN_EVAL_SIZE,
    train_eval_seed: int = 0,
) -> History:
    """Train ``network`` with ``optimizer`` and return the history.

    Each epoch shuffles ``train_data`` with ``rng`` and takes one optimiser step
    per mini-batch; then it records the loss and accuracy on the training and
    test data and the epoch's seconds, and calls every callback with
    ``(epoch, history)``. A ``history`` passed in (from a checkpoint) is
    continued: training starts at epoch ``len(history) + 1`` (a history of more
    than ``epochs`` epochs raises ``ValueError``). Each epoch trains in training
    mode: ``network.train()`` sets every layer's mode, as PyTorch's
    ``model.train()`` does (a BatchNorm set to ``training = False`` trains again;
    the evaluations after each epoch put every layer's own mode back).
    ``max_iterations`` stops after that many optimiser steps in all (the
    book's ``iters_num``); the last epoch may then be partial. (A history
    passed in counts each of its epochs as whole: continue a run that the cap
    ended mid-epoch with the same cap, as ``scratchnn train --resume`` does.)
    ``lr_decay``
    multiplies the optimiser's learning rate by that factor after every epoch
    (epoch k runs at ``lr * lr_decay**(k - 1)``, a function of the epoch alone,
    so a resumed run continues the same schedule).

    The training-set loss and accuracy of each epoch are those of a fixed
    subset: ``train_eval_size`` examples drawn without replacement by
    ``numpy.random.default_rng(train_eval_seed)``, in their order in the data;
    the whole training set when ``train_eval_size`` is None or not smaller
    than it. Evaluating all 60,000 images of Fashion-MNIST would cost a CNN
    about a third of each epoch, and 10,000 examples estimate the accuracy to
    about ±0.3 percentage points (one standard error). The subset has its own
    generator, so it never moves ``rng``: a resumed run shuffles as one that
    was never stopped.
    """
    # Each argument checked before any work, naming it: a wrong one must not be ignored
    # (rng=None would shuffle unseeded), nor fail an epoch in.
    if isinstance(optimizer, type) or not callable(getattr(optimizer, "update", None)):
        raise TypeError(
            "fit: optimizer must be an optimiser object with update(params, grads), such as "
            f"SGD(lr=0.1) or make_optimizer('adam'), got {optimizer!r}"
        )
    _checks.given_generator("fit", rng)
    if isinstance(lr_decay, (bool, np.bool_)) or not isinstance(lr_decay, numbers.Real):
        raise TypeError(f"fit: lr_decay must be a number, got {lr_decay!r}")
    if not 0.0 < lr_decay <= 1.0:
        raise ValueError(f"fit: lr_decay must lie in (0, 1], got {lr_decay}")
    lr_decay = float(lr_decay)
    base_lr = getattr(optimizer, "lr", None)
    if lr_decay != 1.0 and base_lr is None:
        raise TypeError("fit: lr_decay needs an optimiser with an `lr` attribute")
    # Python ints from here on: epochs + 1 of an int8 127 would wrap to -128.
    epochs = _checks.count("fit", "epochs", epochs)
    batch_size = _checks.count("fit", "batch_size", batch_size)
    if max_iterations is not None:
        max_iterations = _checks.count("fit", "max_iterations", max_iterations)
    if callable(callbacks):
        raise TypeError("fit: callbacks must be a list of functions; for one, give [function]")
    callbacks = list(callbacks)  # once: each epoch calls them all, a generator once only
    for callback in callbacks:
        if not callable(callback):
            raise TypeError(f"fit: each callback must be a function, got {callback!r}")
    if progress_stream is not None and not callable(getattr(progress_stream, "write", None)):
        raise TypeError(
            f"fit: progress_stream must be a text stream (sys.stderr), got {progress_stream!r}"
        )
    if history is not None and not isinstance(history, History):
        raise TypeError(f"fit: history must be a History or None, got {type(history).__name__}")
    if history is not None:
        try:  # one length for all, epochs 1, 2, ...
            History.from_dict(history.to_dict())
        except ValueError as error:
            raise ValueError(f"fit: the history passed in: {error}") from None
        if len(history) > epochs:
            raise ValueError(
                f"fit: the history passed in has {len(history)} epochs already, more than "
                f"epochs={epochs}"
            )
    # Arrays, once (lists too: the training subset below indexes with an array).
    x_train, t_train = (
        as_array(a, who="fit", what="training set") for a in _pair(train_data, "training set")
    )
    # Both sets checked before the first step: a bad test set must not fail an epoch in.
    _check_pairs("fit", x_train, t_train, "training set")
    labels_checked = _check_set(network, x_train, t_train, "training set", batch_size)
    for _ in range(2):
        if not hasattr(network, "params") or network.params:
            break
        # A parameter a layer makes (or casts) at its first forward counts from its second:
        # forwards that keep what they make.
        with evaluation_mode(network, put_back_layers=False):
            network.predict(x_train[:1])
    if hasattr(network, "params") and not network.params:
        raise ValueError(
            "fit: the network has no parameters to train (a layer of your own in the book's "
            "style keeps each W, a float array, beside a dW that its backward sets)"
        )
    if test_data is not None:
        x_test, t_test = _pair(test_data, "test set")
        test_data = (as_array(x_test, who="fit", what="test set"),
                     as_array(t_test, who="fit", what="test set"))  # fmt: skip
        _check_pairs("fit", *test_data, "test set")
        _check_set(network, *test_data, "test set", batch_size)
    if train_eval_size is not None:
        train_eval_size = _checks.count("fit", "train_eval_size", train_eval_size)
    # A seed, not None: the subset must be the same every epoch and every run. (Any
    # non-negative int, as NumPy's generators take: not a count, so no upper bound.)
    if isinstance(train_eval_seed, bool) or not isinstance(train_eval_seed, numbers.Integral):
        raise TypeError(f"fit: train_eval_seed must be an int, got {train_eval_seed!r}")
    if train_eval_seed < 0:
        raise ValueError(f"fit: train_eval_seed must be >= 0, got {train_eval_seed}")
    x_eval, t_eval = x_train, t_train
    if train_eval_size is not None and train_eval_size < len(x_train):
        chosen = np.random.default_rng(train_eval_seed).choice(
            len(x_train), train_eval_size, replace=False
        )
        chosen.sort()
        chosen = to_device(chosen, device_of(x_train))  # CuPy indexes only with its own arrays
        x_eval, t_eval = x_train[chosen], t_train[chosen]
    history = history if history is not None else History()
    try:
        return _epochs(
            network, optimizer, (x_train, t_train), (x_eval, t_eval), test_data, history,
            epochs, batch_size, max_iterations, lr_decay, base_lr, rng, callbacks, progress_stream,
            labels_checked,
        )  # fmt: skip
    finally:
        # Interrupted or not, the optimiser keeps its base rate: the schedule is a function
        # of the epoch alone, and a continued fit must start from the same base.
        if lr_decay != 1.0:
            optimizer.lr = base_lr


def _epochs(
    network: Any,
    optimizer: Any,
    train_data: tuple[Any, Any],
    eval_data: tuple[Any, Any],
    test_data: tuple[Any, Any] | None,
    history: History,
    epochs: int,
    batch_size: int,
    max_iterations: int | None,
    lr_decay: float,
    base_lr: float | None,
    rng: Any,
    callbacks: Any,
    progress_stream: Any,
    labels_checked: bool,
) -> History:
    """fit's epochs, once its arguments are checked."""
    (x_train, t_train), (x_eval, t_eval) = train_data, eval_data
    batches_per_epoch = math.ceil(len(x_train) / batch_size)
    # Where every label was checked before the first step (_check_set), a Sequential's
    # steps may leave their losses on the GPU unread: no step waits for the card. (Not
    # where its gradient is another's: a subclass's, or one set on the network.)
    unread = labels_checked and getattr(network.gradient, "__func__", None) is Sequential.gradient
    iterations_done = len(history) * batches_per_epoch
    for epoch in range(len(history) + 1, epochs + 1):
        if max_iterations is not None and iterations_done >= max_iterations:
            break
        started = time.perf_counter()
        if base_lr is not None and lr_decay != 1.0:
            optimizer.lr = base_lr * lr_decay ** (epoch - 1)
        network.train()
        steps = batches_per_epoch
        if max_iterations is not None:
            steps = min(steps, max_iterations - iterations_done)
        bar = ProgressBar(steps, prefix=f"epoch {epoch}/{epochs}", stream=progress_stream)
        running = RunningLoss()
        # Made anew each epoch, after the rate is set: on a GPU its steps may replay a
        # CUDA graph, which holds the rate as it was captured (scratchnn.steps), and
        # gather each batch's rows straight into the arrays the graph reads.
        train_step = TrainingStep(network, optimizer) if unread else None
        batch_rows = minibatch_rows(x_train, t_train, batch_size, shuffle=True, rng=rng)
        try:
            for step, rows in enumerate(batch_rows, start=1):
                if train_step is not None:
                    running.add(train_step.on_rows(x_train, t_train, rows), len(rows))
                else:
                    xb, tb = x_train[rows], t_train[rows]
                    grads = network.gradient(xb, tb)
                    running.add(network.last_loss, len(xb))
                    optimizer.update(network.params, grads)
                bar.update(loss=running.mean)  # read only when the bar draws
                if step == steps:
                    break
            running.mean()  # the losses left on the GPU are read, and their labels checked
        finally:  # Ctrl-C too: the terminal line is left clean for what is printed next
            bar.close()
        iterations_done += steps
        train_loss, train_acc = evaluate(network, x_eval, t_eval)
        test_loss, test_acc = (
            evaluate(network, *test_data) if test_data is not None else (math.nan, math.nan)
        )
        history.append(
            epoch=epoch,
            train_loss=train_loss,
            train_acc=train_acc,
            test_loss=test_loss,
            test_acc=test_acc,
            seconds=time.perf_counter() - started,
        )
        for callback in callbacks:
            callback(epoch, history)
    return history
