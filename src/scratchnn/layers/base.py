"""The contract every layer keeps, checked in one place.

A layer is one node of a computational graph, as in *Deep Learning from
Scratch*: ``forward`` computes the output and keeps what ``backward`` needs;
``backward(dout)`` takes the upstream gradient and returns the gradient with
respect to each input. Subclasses write only the mathematics, in
``_forward`` and ``_backward``; this base class does the checking around it:

* inputs become arrays; unsupported dtypes raise ``TypeError`` naming the layer;
* floating dtypes are kept, integer inputs become float64 unless the layer keeps
  integer dtypes (``Relu``);
* ``backward`` before ``forward`` raises ``RuntimeError``; a ``dout`` of another
  shape than the output raises ``ValueError`` (no silent broadcasting);
* ``backward`` returns new arrays of the inputs' dtypes and never writes into
  ``dout``; ``backward(dout, input_grad=False)`` computes only the layer's own
  parameter gradients and returns None (a network's first layer, whose input
  is data, as PyTorch skips inputs that do not require grad).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np

from scratchnn import _buffers
from scratchnn.backend import (
    FLOAT_DTYPES,
    as_array,
    as_result,
    cupy_array_type,
    device_of,
    float_dtype_of,
    is_array,
    may_share_memory,
    move_arrays,
    to_device,
)


class Layer:
    """Base class of every layer: validation around ``_forward`` and ``_backward``.

    Subclasses set ``n_inputs`` (1 for activations, 2 for ``MulLayer`` and
    ``AddLayer``), list their hyperparameters in ``hyperparameters`` for
    ``repr``, and implement ``_forward(*xs)`` and ``_backward(dout)``.
    """

    n_inputs: ClassVar[int] = 1
    keeps_integer_dtype: ClassVar[bool] = False
    hyperparameters: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._out_shape: tuple[int, ...] | None = None
        self._out_dtype: np.dtype[Any] | None = None
        self._in_dtypes: tuple[np.dtype[Any], ...] = ()
        self._caller_owned: tuple[bool, ...] = ()
        self._gpu_forward = False  # whether the last forward ran on CuPy arrays
        self._device = "cpu"  # where to() last put the layer's arrays

    # -- the public contract -------------------------------------------------

    def __call__(self, *inputs: Any) -> Any:
        """``layer(x)`` is ``layer.forward(x)``."""
        return self.forward(*inputs)

    def forward(self, *inputs: Any) -> Any:
        """Compute the output from the input(s) and keep what ``backward`` needs."""
        return self._checked_forward(inputs, borrowed=False)

    def _checked_forward(self, inputs: tuple[Any, ...], *, borrowed: bool, **fused: Any) -> Any:
        """``forward``; ``borrowed=True`` promises that the inputs stay unchanged until
        ``backward``, so the layer may keep them without a copy.

        ``Sequential.gradient`` borrows: it runs forward and backward in one call,
        and the arrays between its layers never reach its caller. It also passes
        ``fused`` options to ``_forward_gpu`` where it runs two layers' kernels as one
        (an Affine and the Relu after it), and only for one float CuPy array.
        """
        self._out_shape = None  # a failure below must not leave a stale graph behind
        if len(inputs) != self.n_inputs:
            name = type(self).__name__
            raise TypeError(f"{name}.forward takes {self.n_inputs} input(s), got {len(inputs)}")
        x = inputs[0]
        single = len(inputs) == 1
        on_host = getattr(self, "_device", "cpu") == "cpu"  # (a subclass may skip our __init__)
        if single and type(x) is np.ndarray and x.dtype in FLOAT_DTYPES and on_host:
            # The CPU's common case, one float NumPy array: nothing to check or convert.
            self._caller_owned = (not borrowed,)
            out = self._forward(x)
            self._in_dtypes = (x.dtype,)
        elif single and type(x) is cupy_array_type() and x.dtype in FLOAT_DTYPES:
            # The GPU's: one float CuPy array, nothing to convert, and no device to check
            # (a layer moved to "cuda" takes it; one left on "cpu" takes any array).
            self._caller_owned = (not borrowed,)
            out = self._forward_gpu(x, **fused)
            self._in_dtypes = (x.dtype,)
        else:
            assert not fused, f"{type(self).__name__}: fused options for a CuPy array only"
            if not on_host:
                self._check_input_device(inputs)
            out = self._general_forward(inputs, borrowed)
        kind = type(out)
        if kind is not np.ndarray and kind is not cupy_array_type():
            out = as_result(out)  # np.asarray would pull a CuPy array to the host
        self._out_shape = out.shape
        self._out_dtype = out.dtype
        self._gpu_forward = type(out) is not np.ndarray
        return out

    def _general_forward(self, inputs: tuple[Any, ...], borrowed: bool) -> Any:
        xs = [self._prepare_input(x) for x in inputs]
        if len(xs) > 1 and any(not isinstance(x, np.ndarray) for x in xs):
            # A Python number (or list) goes with the CuPy array it meets, as NumPy's does;
            # a NumPy array beside a CuPy one stays, for the mixing TypeError.
            xs = [p if is_array(x) else to_device(p, "cuda") for x, p in zip(inputs, xs)]
        if borrowed:
            self._caller_owned = (False,) * len(xs)
        else:
            self._caller_owned = tuple(
                prepared is x or (is_array(x) and np.may_share_memory(x, prepared))
                for x, prepared in zip(inputs, xs)
            )
        # CuPy inputs take the layer's GPU path (fused kernels), beside the CPU one.
        forward = self._forward if isinstance(xs[0], np.ndarray) else self._forward_gpu
        out = forward(*xs)
        self._in_dtypes = tuple([x.dtype for x in xs])
        return out

    def backward(self, dout: Any = 1.0, *, input_grad: bool = True) -> Any:
        """Return the gradient of the loss with respect to the input(s), given ``dout``.

        With ``input_grad=False``, compute only the gradients of the layer's own
        parameters (``dW``, ``db``) and return None.
        """
        return self._checked_backward(dout, input_grad=input_grad)

    def _checked_backward(self, dout: Any, *, input_grad: bool, **fused: Any) -> Any:
        """``backward``; ``Sequential.gradient`` passes ``fused`` options to the GPU path
        (``_backward_gpu``, ``_backward_params``) where it runs two layers' kernels as one."""
        if self._out_shape is None or self._out_dtype is None:
            raise RuntimeError(
                f"{type(self).__name__}.backward() called before forward(): "
                "run forward first so that the layer has something to differentiate"
            )
        kind = type(dout)
        if self._gpu_forward is (kind is np.ndarray):
            self._check_dout_device(dout)
        if not (
            (kind is np.ndarray or kind is cupy_array_type()) and dout.dtype == self._out_dtype
        ):
            # (the common case, an array of the output's dtype, needs no conversion)
            dout = as_array(dout, who=f"{type(self).__name__}.backward", what="dout")
            if self._out_dtype.kind == "f":
                dout = dout.astype(self._out_dtype, copy=False)
        if dout.shape != self._out_shape:
            raise ValueError(
                f"{type(self).__name__}.backward: dout has shape {dout.shape}, but the "
                f"output of forward has shape {self._out_shape}"
            )
        if not input_grad:
            self._backward_params(dout, **fused)
            return None
        if isinstance(dout, np.ndarray):  # (a NumPy subclass, np.memmap say, included)
            assert not fused, f"{type(self).__name__}: fused options for a CuPy array only"
            grads = self._backward(dout)
        else:
            grads = self._backward_gpu(dout, **fused)
        if self.n_inputs == 1:
            return self._finish_grad(grads, self._in_dtypes[0], dout)
        return tuple(self._finish_grad(g, dtype, dout) for g, dtype in zip(grads, self._in_dtypes))

    def to(self, device: str, *, moved: dict[int, Any] | None = None) -> Layer:
        """Move the layer's arrays (parameters, gradients, what forward kept) to
        ``device``, in place, and return the layer: a backward after the move then
        takes a ``dout`` on the new device. ``Sequential.to`` calls it for each layer,
        with one ``moved`` for the whole network (an array two layers hold moves once)."""
        move_arrays(self, device, moved)
        self._device = device
        if getattr(self, "_out_shape", None) is not None:  # forward ran: its graph moved too
            self._gpu_forward = device == "cuda"
        return self

    def _check_input_device(self, inputs: tuple[Any, ...]) -> None:
        """Refuse an input array on another device than the one ``to`` moved the layer to."""
        for x in inputs:
            if is_array(x) and device_of(x) != self._device:
                raise TypeError(
                    f"{type(self).__name__}.forward: an input is on {device_of(x)}, but the "
                    f"layer was moved to {self._device}; move the input with "
                    "scratchnn.backend.to_device, or the layer back with .to()"
                )

    def _check_dout_device(self, dout: Any) -> None:
        """Refuse a ``dout`` on another device than the layer's arrays (``TypeError``).

        The layer's device is where its arrays are now (it may have moved since
        forward), or, when it keeps none, where forward ran.
        """
        dout_device = device_of(dout) if is_array(dout) else "cpu"  # lists, numbers: host
        kept = [value for value in vars(self).values() if is_array(value)]
        layer_device = device_of(kept[0]) if kept else ("cuda" if self._gpu_forward else "cpu")
        if dout_device != layer_device:
            raise TypeError(
                f"{type(self).__name__}.backward: dout is on {dout_device}, but the layer's "
                f"arrays are on {layer_device}; move dout with scratchnn.backend.to_device"
            )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.hyperparameters)
        return f"{type(self).__name__}({args})"

    # -- for subclasses --------------------------------------------------------

    # The layer's mathematics: ``_forward(*xs)`` returns the output and keeps what
    # backward needs; ``_backward(dout)`` returns the input gradient(s).
    _forward: Callable[..., np.ndarray]
    _backward: Callable[[np.ndarray], Any]

    def _forward_gpu(self, *xs: Any, **fused: Any) -> Any:
        """``_forward`` for CuPy arrays; by default the same code, written against the
        array module. (``fused``: ``_checked_forward``'s options, which a layer that takes
        them names as keywords; the others are never given any.)"""
        return self._forward(*xs)

    def _backward_gpu(self, dout: Any) -> Any:
        """``_backward`` for CuPy arrays; by default the same code."""
        return self._backward(dout)

    def _backward_params(self, dout: np.ndarray) -> None:
        """Compute the parameters' gradients without the input's; by default, all of backward.

        A layer with parameters overrides it to skip the input gradient.
        """
        if isinstance(dout, np.ndarray):
            self._backward(dout)
        else:  # CuPy: the GPU path (a network's first layer on the card, an activation say)
            self._backward_gpu(dout)

    def _keep_input(self, x: np.ndarray, index: int = 0) -> np.ndarray:
        """Return ``x`` safe to keep for ``backward``: a copy if the caller owns it.

        Why: if we kept a view of the caller's array and the caller edited it
        after ``forward``, ``backward`` would silently use the edited values.
        """
        if not self._caller_owned[index]:
            return x
        return _buffers.copy(x) if type(x) is np.ndarray else x.copy()

    @staticmethod
    def _keep_output(out: np.ndarray) -> np.ndarray:
        """Mark an output that ``backward`` needs read-only, and return it.

        Why: the caller gets this very array; an in-place edit of it would
        silently corrupt the gradient, so it raises instead.
        """
        out = as_result(out)
        if isinstance(out, np.ndarray):  # CuPy arrays cannot be made read-only
            out.flags.writeable = False
        return out

    # -- helpers -----------------------------------------------------------------

    def _prepare_input(self, x: Any) -> np.ndarray:
        if type(x) is np.ndarray and x.dtype in FLOAT_DTYPES:
            return x  # the common case, a float array: nothing to check or convert
        array = as_array(x, who=type(self).__name__)
        if self.keeps_integer_dtype and array.dtype.kind in "biu":
            return array
        return array.astype(float_dtype_of(array.dtype), copy=False)

    @staticmethod
    def _finish_grad(grad: np.ndarray, in_dtype: np.dtype[Any], dout: np.ndarray) -> np.ndarray:
        kind = type(grad)
        if kind is not np.ndarray and kind is not cupy_array_type():
            grad = as_result(grad)
        if in_dtype.kind == "f" and grad.dtype != in_dtype:
            grad = grad.astype(in_dtype)
        if may_share_memory(grad, dout):
            grad = grad.copy()
        return grad


class WeightBiasLayer(Layer):
    """A layer whose learnable arrays are a weight ``W`` and a bias ``b`` (Affine, Conv2d).

    After ``backward`` it holds their gradients in ``dW`` and ``db``.
    """

    W: np.ndarray
    b: np.ndarray
    dW: np.ndarray | None
    db: np.ndarray | None

    @property
    def params(self) -> dict[str, np.ndarray]:
        """The learnable arrays, by name: ``{"W": W, "b": b}`` (the same objects)."""
        return {"W": self.W, "b": self.b}

    @property
    def grads(self) -> dict[str, np.ndarray | None]:
        """The gradients of the last backward, named like ``params``."""
        return {"W": self.dW, "b": self.db}
