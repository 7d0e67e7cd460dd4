"""Pooling over NCHW images (``MaxPool2d``, ``AvgPool2d``) and ``Flatten``, as in the book's chapter 7.

Both pools slide the windows of :mod:`scratchnn.layers.convolution` but need
no im2col matrix: they visit the kh × kw kernel offsets one at a time, each
an array of the output's shape, so their memory is that of the output.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from scratchnn import _buffers, _fused
from scratchnn.backend import get_array_module, to_compute
from scratchnn.layers.base import Layer
from scratchnn.layers.convolution import check_images, output_size, pad_images, pair, window_slice


class _Pool2d(Layer):
    """What both pools share: hyperparameters, shape checks and the window offsets."""

    hyperparameters = ("kernel_size", "stride", "padding")

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__()
        who = type(self).__name__
        self.kernel_size = pair(kernel_size, "kernel_size", who)
        self.stride = self.kernel_size if stride is None else pair(stride, "stride", who)
        self.padding = pair(padding, "padding", who, minimum=0)
        # PyTorch's rule: a window must never lie wholly in the padding.
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size)):
            raise ValueError(
                f"{who}: padding must be at most half the kernel size, got padding "
                f"{self.padding} for kernel {self.kernel_size}"
            )
        self._x_shape: tuple[int, ...] = ()

    def _offsets(self, x_shape: tuple[int, ...]) -> list[tuple[int, slice, slice]]:
        """(offset number, row slice, column slice) of each kernel offset in the padded input."""
        oh, ow = self._out_hw(x_shape)
        kh, kw = self.kernel_size
        return [
            (p * kw + q, window_slice(p, oh, self.stride[0]), window_slice(q, ow, self.stride[1]))
            for p in range(kh)
            for q in range(kw)
        ]

    def _out_hw(self, x_shape: tuple[int, ...]) -> tuple[int, int]:
        return (
            output_size(x_shape[2], self.kernel_size[0], self.stride[0], self.padding[0]),
            output_size(x_shape[3], self.kernel_size[1], self.stride[1], self.padding[1]),
        )

    def _check(self, x: np.ndarray) -> None:
        check_images(type(self).__name__, x, None, self.kernel_size, self.padding)
        self._x_shape = x.shape

    def _crop(self, dxp: np.ndarray) -> np.ndarray:
        ph, pw = self.padding
        h, w = self._x_shape[2:]
        return dxp[:, :, ph : ph + h, pw : pw + w]


class MaxPool2d(_Pool2d):
    """Max pooling: the largest value in each window.

    Forward: ``out[n, c, i, j] = max_{p, q} xp[n, c, i*s + p, j*s + q]``, with
    ``xp`` padded by ``-inf``, as PyTorch.
    Backward: ``dout`` goes to the one input that was the maximum (the first in
    row-major order on ties, as PyTorch's CPU kernel), never to the padding,
    not even where every input of the window is ``-inf``; windows that overlap add.
    NaN propagates: a window holding NaN outputs NaN, and its gradient goes to
    the first NaN (PyTorch's CPU kernel sends it to the last one; the outputs
    agree).

    Keeps ``argmax``: for each output, which of the kh × kw offsets held the
    maximum (uint8 when kh kw <= 256), the whole of what backward needs.

    Shapes: (N, C, H, W) → (N, C, OH, OW), ``OH = (H + 2 pad - kh) // stride + 1``;
    ``stride`` defaults to ``kernel_size``.

    >>> pool = MaxPool2d(2)
    >>> x = np.array([[[[1.0, 2.0, 5.0, 0.0], [3.0, 4.0, 1.0, 1.0]]]])
    >>> print(pool.forward(x))
    [[[[4. 5.]]]]
    >>> print(pool.backward(np.array([[[[10.0, 20.0]]]])))
    [[[[ 0.  0. 20.  0.]
       [ 0. 10.  0.  0.]]]]
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        super().__init__(kernel_size, stride, padding)
        self.argmax: np.ndarray | None = None

    def _compiled_dims(self) -> tuple[int, ...] | None:
        """The compiled kernels' dims for this input: windows that do not overlap, no
        padding, at most 256 pixels (the usual 2×2); None where the NumPy path runs."""
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        if self.padding != (0, 0) or sh < kh or sw < kw or kh * kw > 256:
            return None
        return (*self._x_shape, kh, kw, sh, sw, *self._out_hw(self._x_shape))

    def _forward(self, x: np.ndarray) -> np.ndarray:
        self._check(x)
        dims = self._compiled_dims()
        if dims is not None and isinstance(x, np.ndarray):
            n, c, oh, ow = dims[0], dims[1], dims[8], dims[9]
            out = _buffers.empty((n, c, oh, ow), x.dtype)
            argmax = _buffers.empty((n, c, oh, ow), np.uint8)
            if _fused.pool("max", np.ascontiguousarray(x), out, argmax, dims):
                self.argmax = argmax  # one compiled pass: the maxima and which offset won
                return out
        xp = pad_images(x, self.padding, -np.inf)
        windows = [xp[:, :, rows, cols] for _, rows, cols in self._offsets(x.shape)]
        out = windows[0].copy()
        for window in windows[1:]:
            np.maximum(out, window, out=out)  # propagates NaN, as PyTorch's max pooling
        # Backward needs which offset won: the first that equals the maximum (PyTorch's choice
        # on ties), or the first NaN. argmax counts the offsets before the first winner.
        nan = np.isnan(out)
        any_nan = bool(nan.any())
        # +0 and -0 tie: out takes the first winner's zero, as the kernels and PyTorch do
        # (np.maximum's choice on a tie differs between dtypes).
        zero = out == 0
        any_zero = bool(zero.any())
        module = get_array_module(out)  # NumPy or CuPy
        argmax = module.zeros(out.shape, dtype=np.min_scalar_type(len(windows) - 1))
        not_yet = module.ones(out.shape, dtype=bool)
        inside = self._inside(x.shape, module) if self.padding != (0, 0) else None
        for window, mask in zip(windows[:-1], inside or [None] * len(windows)):
            won = window == out
            if mask is not None:
                # A padding cell (-inf) never wins, even where every input of the window is
                # -inf: then the first input does, as in PyTorch.
                won &= mask
            if any_nan:
                won |= nan & np.isnan(window)
            if any_zero:
                np.copyto(out, window, where=not_yet & won & zero)
            np.greater(not_yet, won, out=not_yet)  # for bools, a > b is a and not b
            argmax += not_yet
        if any_zero:  # where no earlier offset won, the last one did
            np.copyto(out, windows[-1], where=not_yet & zero)
        self.argmax = argmax
        return out

    def _inside(self, x_shape: tuple[int, ...], module: Any) -> list[Any]:
        """For each kernel offset, an (OH, OW) mask of the outputs whose pixel at that
        offset lies in the image, not in the padding."""
        oh, ow = self._out_hw(x_shape)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        rows, cols = module.arange(oh) * sh - ph, module.arange(ow) * sw - pw
        return [
            ((rows + p >= 0) & (rows + p < x_shape[2]))[:, None]
            & ((cols + q >= 0) & (cols + q < x_shape[3]))[None, :]
            for p in range(kh)
            for q in range(kw)
        ]

    def _backward(self, dout: np.ndarray) -> np.ndarray:
        assert self.argmax is not None  # forward ran: the base checks it
        g = to_compute(dout)
        n, c, h, w = self._x_shape
        dims = self._compiled_dims()
        if dims is not None and isinstance(g, np.ndarray):
            dx = _buffers.empty((n, c, h, w), g.dtype)
            if _fused.pool("max_grad", np.ascontiguousarray(g), dx, self.argmax, dims):
                return dx
        ph, pw = self.padding
        # Windows that do not overlap can write their share directly instead of adding; when
        # they also tile the input exactly (the usual 2×2), every pixel is written and the
        # zeros would be a wasted pass over dx.
        disjoint = all(s >= k for s, k in zip(self.stride, self.kernel_size))
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        tiled = (sh, sw) == (kh, kw) and (ph, pw) == (0, 0) and h % kh == 0 and w % kw == 0
        module = get_array_module(g)  # NumPy or CuPy
        dxp = (module.empty if tiled else module.zeros)(
            (n, c, h + 2 * ph, w + 2 * pw), dtype=g.dtype
        )
        for k, rows, cols in self._offsets(self._x_shape):
            if disjoint:
                # Selected, as PyTorch scatters dout: dout * (argmax == k) would make an
                # infinite or NaN dout NaN on the pixels that lost.
                window = dxp[:, :, rows, cols]
                module.copyto(window, 0)
                module.copyto(window, g, where=self.argmax == k)
            else:
                dxp[:, :, rows, cols] += np.where(self.argmax == k, g, 0)
        return self._crop(dxp)


class AvgPool2d(_Pool2d):
    """Average pooling: the mean of each window.

    Forward: ``out[n, c, i, j] = sum_{p, q} xp[n, c, i*s + p, j*s + q] / (kh kw)``,
    with ``xp`` zero-padded; padding counts in the mean (PyTorch's default,
    ``count_include_pad=True``).
    Backward: each input of a window receives ``dout / (kh kw)``; overlaps add.

    Keeps nothing but the input's shape: the gradient does not depend on ``x``.
    Shapes as ``MaxPool2d``.

    >>> pool = AvgPool2d(2)
    >>> x = np.array([[[[1.0, 2.0, 5.0, 0.0], [3.0, 4.0, 1.0, 2.0]]]])
    >>> print(pool.forward(x))
    [[[[2.5 2. ]]]]
    >>> print(pool.backward(np.array([[[[4.0, 8.0]]]])))
    [[[[1. 1. 2. 2.]
       [1. 1. 2. 2.]]]]
    """

    def _forward(self, x: np.ndarray) -> np.ndarray:
        self._check(x)
        xp = pad_images(to_compute(x), self.padding)
        offsets = self._offsets(x.shape)
        _, rows, cols = offsets[0]
        total = xp[:, :, rows, cols].copy()
        for _, rows, cols in offsets[1:]:
            total += xp[:, :, rows, cols]
        total *= 1.0 / math.prod(self.kernel_size)
        return total.astype(x.dtype, copy=False)

    def _backward(self, dout: np.ndarray) -> np.ndarray:
        g = to_compute(dout) * (1.0 / math.prod(self.kernel_size))
        n, c, h, w = self._x_shape
        ph, pw = self.padding
        dxp = get_array_module(g).zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=g.dtype)
        for _, rows, cols in self._offsets(self._x_shape):
            dxp[:, :, rows, cols] += g
        return self._crop(dxp)


class Flatten(Layer):
    """Flatten every axis but the first: (N, d1, d2, ...) → (N, d1 d2 ...).

    Backward reshapes ``dout`` back to the input's shape. Keeps only that
    shape. The output is a read-only view of the input when the input is
    contiguous (no copy, and no way to write into the caller's array).

    >>> flat = Flatten()
    >>> flat.forward(np.zeros((2, 3, 4, 5))).shape
    (2, 60)
    >>> flat.backward(np.ones((2, 60))).shape
    (2, 3, 4, 5)
    """

    def __init__(self) -> None:
        super().__init__()
        self._x_shape: tuple[int, ...] = ()

    def _forward(self, x: np.ndarray) -> np.ndarray:
        if x.ndim < 2:  # (a 1-d array, labels say, would silently become a column)
            raise ValueError(f"Flatten: expected input of shape (batch, d1, ...); got {x.shape}")
        self._x_shape = x.shape
        view = x.reshape(x.shape[0], -1) if x.shape[0] else x.reshape(0, math.prod(x.shape[1:]))
        if np.may_share_memory(view, x):
            view = view.view()
            if isinstance(view, np.ndarray):  # CuPy arrays cannot be made read-only
                view.flags.writeable = False
        return view

    def _backward(self, dout: np.ndarray) -> np.ndarray:
        return dout.reshape(self._x_shape)
