"""Loss layers: ``forward(x, t)`` returns the mean loss as a float, ``backward(dout=1)`` returns ``dx``.

The checks every loss shares (the prediction's dtype, the target's shape and
values, backward before forward) live in :class:`Loss`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from scratchnn import _checks, _fused
from scratchnn import functional as F
from scratchnn.backend import (
    FLOAT_DTYPES,
    as_array,
    as_result,
    cupy_array_type,
    float_dtype_of,
    get_array_module,
    is_array,
    to_compute,
)
from scratchnn.kernels import bias as bias_kernels
from scratchnn.kernels import cross_entropy, cuda  # (plain text and NumPy: they import no CuPy)


class DeviceLoss:
    """A batch's mean loss still on the GPU, where :class:`SoftmaxWithLoss`'s kernel left it.

    ``float()`` reads it (one wait for the card) and raises ``ValueError``, as
    ``forward`` does, if the batch had labels out of range; :func:`read_losses`
    reads many with one wait. ``Sequential.gradient`` reads it at once; ``fit``,
    which checked every label before its first step, reads its steps' losses
    together, when its progress bar draws and at the end of the epoch.
    """

    __slots__ = ("classes", "labels", "result", "rows", "who")

    def __init__(self, result: Any, rows: int, labels: Any, classes: int, who: str) -> None:
        self.result = result  # the summed loss and the count of bad labels, float64
        self.rows, self.labels, self.classes, self.who = rows, labels, classes, who

    def __float__(self) -> float:
        return read_losses([self])[0]

    def __repr__(self) -> str:
        return f"DeviceLoss(rows={self.rows}, classes={self.classes}, unread)"


def read_losses(losses: Sequence[float | DeviceLoss]) -> list[float]:
    """Each loss as a float; those still on the GPU are read together, with one wait.

    ``ValueError`` names the first batch whose labels were out of range.
    """
    pending = [loss for loss in losses if type(loss) is DeviceLoss]
    if not pending:
        return [float(loss) for loss in losses]
    if len(pending) == 1:
        read = pending[0].result.get()[np.newaxis]
    else:  # one launch to gather them, one transfer
        read = get_array_module(pending[0].result).stack([loss.result for loss in pending]).get()
    numbers = iter(read.tolist())
    values = []
    for loss in losses:
        if type(loss) is not DeviceLoss:
            values.append(float(loss))
            continue
        total, bad = next(numbers)
        if bad:
            raise _checks.label_error(loss.who, loss.labels, loss.classes)
        values.append(total / loss.rows)
    return values


class Loss:
    """Base class of the loss layers: validation around ``_forward`` and ``_backward``.

    ``target_kind`` says what ``t`` may be: "labels" (class indices, or rows of
    class probabilities such as one-hot rows) or "values" (the prediction's shape).
    """

    target_kind: ClassVar[str] = "values"

    def __init__(self) -> None:
        self._x_shape: tuple[int, ...] | None = None
        self._x_dtype: np.dtype[Any] | None = None

    def __call__(self, x: Any, t: Any) -> float:
        """``loss(x, t)`` is ``loss.forward(x, t)``."""
        return self.forward(x, t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def forward(self, x: Any, t: Any) -> float:
        """The mean loss of predictions ``x`` against targets ``t``.

        A target the caller still holds is copied before it is kept, so that
        changing it afterwards cannot change ``backward``.
        """
        return float(self._checked_forward(x, t, borrowed=False))

    def _checked_forward(
        self,
        x: Any,
        t: Any,
        *,
        borrowed: bool,
        wait: bool = True,
        with_grad: bool = False,
        bias: Any = None,
    ) -> float | DeviceLoss:
        """``forward``; ``borrowed=True`` promises that ``t`` stays unchanged until
        ``backward`` (``Sequential.gradient`` runs both in one call), so it is kept as is.
        ``wait=False`` may return a :class:`DeviceLoss` unread: for a caller that checked
        the labels' range itself, since this forward then does not (``fit``).
        ``with_grad=True`` (``Sequential.gradient`` on the GPU, for a loss whose
        ``_forward`` takes it) asks for ``backward(1.0)``'s gradient in the same pass;
        ``bias`` (with it) is the last Affine's, left out of ``x`` for the loss to add."""
        name = type(self).__name__
        self._x_shape = None
        x = as_array(x, who=name, what="prediction")
        if x.dtype not in FLOAT_DTYPES:
            x = x.astype(float_dtype_of(x.dtype))
        given = t
        t = as_array(t, who=name, what="target")
        if x.size == 0:
            raise ValueError(f"{name}: the prediction is empty, shape {x.shape}")
        t = self._check_target(x, t)
        if not borrowed and is_array(given) and np.may_share_memory(t, given):
            t = t.copy()
        computed = to_compute(x)
        if bias is not None and computed.dtype != x.dtype:
            # (computed in a wider dtype: the scores first, rounded as the Affine makes them)
            computed, bias = to_compute(_scores(x, bias)), None
        forward: Any = self._forward  # (with_grad: only for a loss whose _forward takes it)
        if with_grad:
            loss = forward(computed, t, with_grad=True, bias=bias)
        else:
            if bias is not None:  # (Sequential passes both or neither)
                raise TypeError(f"{name}: a bias for the scores goes with with_grad")
            loss = forward(computed, t)
        if wait or type(loss) is not DeviceLoss:
            loss = float(loss)  # labels out of range raise here, before backward may run
        self._x_shape, self._x_dtype = x.shape, x.dtype
        return loss

    def backward(self, dout: Any = 1.0) -> np.ndarray:
        """The gradient of ``dout * loss`` with respect to the prediction."""
        name = type(self).__name__
        if self._x_shape is None or self._x_dtype is None:
            raise RuntimeError(f"{name}.backward() called before forward()")
        if type(dout) is not float:  # a Python float, backward(1.0), needs no checks
            dout = as_array(dout, who=f"{name}.backward", what="dout")
            if dout.size != 1:
                raise ValueError(f"{name}.backward: dout must be a scalar, got shape {dout.shape}")
            dout = float(dout.reshape(()))
        dx = self._backward(dout)
        return as_result(dx).reshape(self._x_shape).astype(self._x_dtype, copy=False)

    # -- for subclasses --------------------------------------------------------

    def _checks_labels(self, x: np.ndarray, t: np.ndarray) -> bool:
        """Whether ``_forward`` checks the class indices' range itself (on the GPU, in its kernel)."""
        return False

    def _forward(self, x: np.ndarray, t: np.ndarray) -> float | DeviceLoss:
        raise NotImplementedError

    def _backward(self, dout: float) -> np.ndarray:
        raise NotImplementedError

    def _check_target(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        name = type(self).__name__
        if self.target_kind == "labels" and x.ndim == 0:
            raise ValueError(f"{name}: the prediction needs a class axis, got a scalar")
        if self.target_kind == "labels" and t.shape == x.shape[:-1]:
            if t.dtype.kind not in "iu":
                raise ValueError(
                    f"{name}: class-index labels must have an integer dtype, got {t.dtype}"
                )
            n_classes = x.shape[-1]
            if (
                t.size
                and not self._checks_labels(x, t)
                and _checks.labels_out_of_range(t, n_classes)
            ):
                raise _checks.label_error(name, t, n_classes)
            return t
        if t.shape != x.shape:
            expected = (
                f"{x.shape[:-1]} (class indices) or {x.shape}"
                if self.target_kind == "labels"
                else f"{x.shape}"
            )
            raise ValueError(f"{name}: target has shape {t.shape}, expected {expected}")
        return t.astype(x.dtype, copy=False)


def _scores(x: Any, bias: Any) -> Any:
    """The scores an Affine that deferred its ``bias`` would have made from its product
    ``x``: a copy, the bias added in place as the Affine adds it (so in ``x``'s dtype,
    whatever the bias's)."""
    scores = x.copy()
    bias_kernels.add_bias(scores, bias)
    return scores


def _cuda_kernels(x: Any, t: Any) -> Any:
    """The CUDA kernels of softmax with cross-entropy when they take ``x`` and ``t``, else None."""
    kind = type(x)
    if kind is np.ndarray:
        return None
    if kind is cupy_array_type() and type(t) is kind:  # (asked three times a step: the
        xp = sys.modules["cupy"]  # common case, both CuPy's, in two look-ups)
    else:
        xp = get_array_module(x, t)  # a NumPy t beside a CuPy x: the mixing TypeError
    if not cuda.compiles(xp):
        return None
    return cross_entropy if cross_entropy.supported(to_compute(x), t) else None


class SoftmaxWithLoss(Loss):
    """Softmax followed by the cross-entropy error, as one layer (the book's ``SoftmaxWithLoss``).

    Forward: ``L = -(1/N) sum_n sum_k t_nk log y_nk`` with ``y = softmax(x)``
    over the last axis, computed as a stable log-softmax (finite for logits of
    any magnitude, unlike ``log(y + 1e-7)``). ``t`` holds class indices of
    shape (N,) or rows of class probabilities (one-hot) of shape (N, K); a
    single unbatched example (x of shape (K,)) has N = 1.
    Backward: ``dx = dout * (y - t) / N`` (``dout * (y sum_k t_k - t) / N`` for
    rows of ``t`` that do not sum to 1).

    Keeps ``y`` (the softmax) and ``t`` (as given: class indices or rows), as
    the book does. On a GPU, class indices take two CUDA kernels of their own
    (:mod:`scratchnn.kernels.cross_entropy`; up to 1,024 classes and 2**21
    scores, beyond which CuPy's reductions): the forward waits for the card
    once, for the loss and the labels' range check together.

    >>> loss = SoftmaxWithLoss()
    >>> round(loss.forward(np.array([[2.0, 1.0, 0.1]]), np.array([0])), 6)
    0.41703
    >>> print(loss.backward())
    [[-0.34099886  0.24243297  0.09856589]]
    """

    target_kind = "labels"

    def __init__(self) -> None:
        super().__init__()
        self.y: np.ndarray | None = None
        self.t: np.ndarray | None = None
        # backward(1.0)'s gradient, where the forward's kernel wrote it (with_grad): kept
        # until that backward takes it, or the next forward.
        self._grad_of_one: Any = None

    def _checks_labels(self, x: np.ndarray, t: np.ndarray) -> bool:
        return _cuda_kernels(x, t) is not None

    def _forward(
        self, x: np.ndarray, t: np.ndarray, with_grad: bool = False, bias: Any = None
    ) -> float | DeviceLoss:
        self._grad_of_one = None
        kernels = _cuda_kernels(x, t)
        if bias is not None and (kernels is None or not kernels.takes_bias(x, bias)):
            x = _scores(x, bias)
            bias = None
        if kernels is not None:
            # On the GPU: one launch; the loss and the labels' check come back together,
            # when the loss is read. With with_grad, the launch writes backward(1.0)'s
            # gradient too (its scale as _backward makes it), where backward would launch,
            # and adds the last Affine's bias to the scores where it is given.
            classes = x.shape[-1]
            rows = x.size // classes
            y, result, self._grad_of_one = kernels.forward(
                sys.modules["cupy"], x, t, 1.0 / rows if with_grad else None, bias
            )
            self.y, self.t = y, t
            return DeviceLoss(result, rows, t, classes, type(self).__name__)
        # The arrays are small (batch x classes): the time goes into NumPy calls, not
        # passes, so each step below is the cheapest call found for short rows.
        n_classes = x.shape[-1]
        x2 = x.reshape(-1, n_classes)
        xp = get_array_module(x)  # NumPy or CuPy: index and sum arrays on x's device
        rows = xp.arange(len(x2))
        if _fused.ENABLED and type(x2) is np.ndarray:
            y, log_y = np.empty_like(x2), np.empty_like(x2)
            if _fused.run("softmax", y, x2, out2=log_y, param=n_classes):
                # One compiled pass over the rows gives y and log y: the loss is a gather.
                self.y, self.t = y.reshape(x.shape), t
                if t.shape != x.shape:
                    return float(-log_y[rows, t.reshape(-1)].sum() / len(x2))
                return float(-(t.reshape(x2.shape) * log_y).sum() / len(x2))
        # The row maxima through argmax and a gather: a third of the time of np.max along
        # a short last axis, and the same values (a NaN, which argmax picks, included).
        # A logit beyond the float range below its row's maximum (-1e308 beside 1e308)
        # overflows to -inf here, and its probability is 0, as it should be.
        with np.errstate(over="ignore"):
            shifted = x2 - x2[rows, x2.argmax(axis=1)][:, np.newaxis]
        y = np.exp(shifted)
        total = y @ xp.ones(n_classes, y.dtype)  # the row sums, again faster than np.sum
        y /= total[:, np.newaxis]
        self.y, self.t = y.reshape(x.shape), t
        if t.shape != x.shape:  # class indices: -log y at each label is log(total) - shifted
            picked = shifted[rows, t.reshape(-1)]
            return float((np.log(total).sum() - picked.sum()) / len(x2))
        log_y = shifted - np.log(total)[:, np.newaxis]
        return float(-(t.reshape(x2.shape) * log_y).sum() / len(x2))

    def _backward(self, dout: float) -> np.ndarray:
        assert self.y is not None and self.t is not None
        if dout == 1.0 and self._grad_of_one is not None:  # written by the forward's launch
            dx, self._grad_of_one = self._grad_of_one, None
            return dx
        y, t = self.y, self.t
        n = y.size // y.shape[-1]
        if t.shape == y.shape:
            # The gradient of -sum t log y is y sum(t) - t: y - t when each row of t sums
            # to 1 (one-hot rows, probabilities), right for any other rows too (as PyTorch).
            return (y * t.sum(axis=-1, keepdims=True) - t) * (dout / n)
        kernels = _cuda_kernels(y, t)
        if kernels is not None:
            return kernels.backward(sys.modules["cupy"], y, t, dout / n)
        # y minus the one-hot rows of the labels, without building those rows.
        dx = y.copy()
        dx.reshape(-1, y.shape[-1])[get_array_module(y).arange(n), t.reshape(-1)] -= 1.0
        dx *= dout / n
        return dx


class MeanSquaredError(Loss):
    """Mean squared error over all elements: ``L = mean((x - t)**2)``, as PyTorch's ``mse_loss``.

    (The book's ``mean_squared_error`` is ``0.5 * sum((y - t)**2)``; this is the
    PyTorch convention.) Backward: ``dx = dout * 2 (x - t) / size``.

    Keeps ``diff = x - t``.

    >>> loss = MeanSquaredError()
    >>> loss.forward(np.array([1.0, 2.0]), np.array([0.0, 4.0]))
    2.5
    >>> print(loss.backward())
    [ 1. -2.]
    """

    def __init__(self) -> None:
        super().__init__()
        self.diff: np.ndarray | None = None

    def _forward(self, x: np.ndarray, t: np.ndarray) -> float:
        self.diff = x - t
        return float(np.mean(self.diff * self.diff))

    def _backward(self, dout: float) -> np.ndarray:
        assert self.diff is not None
        return self.diff * (2.0 * dout / self.diff.size)


class SigmoidWithLoss(Loss):
    """Sigmoid followed by binary cross-entropy, on logits (PyTorch's ``binary_cross_entropy_with_logits``).

    Forward: ``L = mean(t softplus(-x) + (1 - t) softplus(x))``, which equals
    ``mean(-t log y - (1 - t) log(1 - y))`` with ``y = sigmoid(x)`` but stays
    finite for logits of any magnitude and keeps the tiny loss of a confident
    right answer (4.2e-18 for x = 40, t = 1). ``t`` has the shape of ``x``, values in [0, 1].
    Backward: ``dx = dout * (y - t) / size``.

    Keeps ``y`` and ``t``.

    >>> loss = SigmoidWithLoss()
    >>> round(loss.forward(np.array([0.0, 2.0]), np.array([1.0, 0.0])), 6)
    1.410038
    >>> print(loss.backward())
    [-0.25        0.44039854]
    """

    def __init__(self) -> None:
        super().__init__()
        self.y: np.ndarray | None = None
        self.t: np.ndarray | None = None

    def _check_target(self, x: np.ndarray, t: np.ndarray) -> np.ndarray:
        t = super()._check_target(x, t)
        if t.size and not (np.all(t >= 0) and np.all(t <= 1)):
            raise ValueError(f"{type(self).__name__}: targets must lie in [0, 1]")
        return t

    def _forward(self, x: np.ndarray, t: np.ndarray) -> float:
        self.y, self.t = F.sigmoid(x), t.astype(x.dtype, copy=False)
        # softplus(x) - x t written as t softplus(-x) + (1 - t) softplus(x): the same
        # number, but a confident right answer (x = 40, t = 1) keeps its tiny loss,
        # which the difference of two numbers near 40 would round to 0.
        t = self.t
        return float(np.mean(t * F.softplus(-x) + (1 - t) * F.softplus(x)))

    def _backward(self, dout: float) -> np.ndarray:
        assert self.y is not None and self.t is not None
        return (self.y - self.t) * (dout / self.y.size)
