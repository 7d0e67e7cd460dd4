"""Convolution, as in the book's chapter 7: ``Conv2d`` over NCHW images, by im2col.

The helpers here (``pair``, ``output_size``, ``check_images``, ``pad_images``)
are shared with the pooling layers, which slide the same windows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from scratchnn import _buffers, _checks, _fused
from scratchnn.backend import (
    FLOAT_DTYPES,
    as_array,
    compute_dtype_of,
    get_array_module,
    to_compute,
)
from scratchnn.layers.base import WeightBiasLayer


def pair(value: int | tuple[int, int], what: str, who: str, minimum: int = 1) -> tuple[int, int]:
    """``value`` as ``(height, width)``: an int is used for both; checks ``>= minimum``."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ValueError(f"{who}: {what} must be an int or a pair of ints, got {value!r}")
        height, width = value
    else:
        height = width = value
    return _checks.count(who, what, height, minimum), _checks.count(who, what, width, minimum)


def output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Windows along one axis: ``(size + 2 pad - kernel) // stride + 1`` (the book's formula)."""
    return (size + 2 * pad - kernel) // stride + 1


def check_images(
    who: str, x: np.ndarray, channels: int | None, kernel: tuple[int, int], pad: tuple[int, int]
) -> None:
    """Raise ``ValueError`` unless ``x`` is (batch, channels, H, W) with room for one window."""
    c = "C" if channels is None else str(channels)
    if x.ndim != 4 or (channels is not None and x.shape[1] != channels):
        raise ValueError(f"{who}: expected input of shape (batch, {c}, H, W); got {x.shape}")
    if x.shape[2] == 0 or x.shape[3] == 0:
        # Every window would lie in the padding: an output of padding alone, as PyTorch refuses.
        raise ValueError(f"{who}: the images are empty (H and W must be at least 1); got {x.shape}")
    for axis, k, p in ((2, kernel[0], pad[0]), (3, kernel[1], pad[1])):
        if x.shape[axis] + 2 * p < k:
            raise ValueError(
                f"{who}: expected input of shape (batch, {c}, H, W) with H + 2*pad >= "
                f"{kernel[0]} and W + 2*pad >= {kernel[1]} (kernel {kernel}, padding {pad}); "
                f"got {x.shape}"
            )


def pad_images(x: np.ndarray, pad: tuple[int, int], value: float = 0.0) -> np.ndarray:
    """``x`` with ``pad`` rows and columns of ``value`` around each image (``x`` itself if none)."""
    if pad == (0, 0):
        return x
    n, c, h, w = x.shape
    padded = get_array_module(x).full((n, c, h + 2 * pad[0], w + 2 * pad[1]), value, dtype=x.dtype)
    padded[:, :, pad[0] : pad[0] + h, pad[1] : pad[1] + w] = x
    return padded


def window_slice(start: int, count: int, stride: int) -> slice:
    """The slice of a padded axis that kernel offset ``start`` reads in each of ``count`` windows."""
    return slice(start, start + stride * (count - 1) + 1, stride)


# Below this many inputs per window (C_in kh kw), as a first layer on grey or colour
# images has, the matrix products are thin: moving their memory, not their arithmetic,
# is their cost, and the transposes between col's (C, N, OH, OW) order and NCHW cost
# more than the products. There (on the CPU) each image's product runs on its slice of
# col and reads or writes NCHW directly. Measured at batch 128 (docs/benchmarks.md):
# 27 inputs, forward + dW 1.4 to 1.9 times faster; 72 even; 288 1.3 times slower.
PER_IMAGE_BELOW = 64
# Wide convolutions on the CPU compute their products in pieces of whole images, each
# used while still in the cache: forward's product (C_out, N OH OW) in pieces of about
# PRODUCT_PIECE_BYTES, each copied to NCHW, and backward's dcol (C_in kh kw, N OH OW) in
# pieces of about DCOL_PIECE_BYTES, each summed into dx. conv2 of the cnn preset (batch
# 128), 4 pieces each: forward product and copy 0.73, dcol and col2im 0.82 of one piece.
PRODUCT_PIECE_BYTES = 2 << 20
DCOL_PIECE_BYTES = 8 << 20


def _per_image(col: Any) -> bool:
    """Whether the products with ``col`` run image by image: see PER_IMAGE_BELOW.

    Decided from ``col`` itself, so a layer moved to another device between forward
    and backward multiplies as its arrays allow."""
    return isinstance(col, np.ndarray) and col.shape[0] - 1 < PER_IMAGE_BELOW


def _images_per_piece(n: int, image_bytes: int, piece_bytes: int, on_cpu: bool) -> int:
    """How many of ``n`` images make a piece of about ``piece_bytes``, pieces evened out."""
    if not on_cpu:
        return max(n, 1)
    pieces = max(1, -(-n * image_bytes // piece_bytes))
    return max(1, -(-n // pieces))


class Conv2d(WeightBiasLayer):
    """2-d convolution (cross-correlation, as in the book and PyTorch) over NCHW images.

    Forward: ``out[n, o, i, j] = b[o] + sum_{c, p, q} W[o, c, p, q] *
    xp[n, c, i*s + p, j*s + q]``, where ``xp`` is ``x`` zero-padded by
    ``padding`` and ``s`` is the stride.
    Backward: ``dW[o, c, p, q] = sum_{n, i, j} dout[n, o, i, j] xp[n, c, i*s + p, j*s + q]``,
    ``db[o] = sum_{n, i, j} dout[n, o, i, j]``, and ``dx`` scatters
    ``sum_o W[o, c, p, q] dout[n, o, i, j]`` back to the pixel each window read
    (col2im), cropped of the padding.

    Shapes: ``x`` (N, C_in, H, W) → ``out`` (N, C_out, OH, OW) with
    ``OH = (H + 2 pad - kh) // stride + 1`` (likewise OW). ``W`` is
    (C_out, C_in, kh, kw) and ``b`` (C_out,), PyTorch's layout.

    How: im2col, as the book's, with one copy per kernel offset (a loop over
    kh × kw, never over the batch or the output pixels) into a matrix
    ``col`` of shape (C_in kh kw, N OH OW), with a row of ones under it for
    the bias; then one matrix product each for the output (``[W | b] col``,
    the bias added), ``dW`` and ``db`` (``dout col^T``: db is the column of
    the ones) and ``dcol``. ``col`` is what backward keeps: ``dW`` needs
    exactly it, and rebuilding it would cost a second im2col.

    Weights are drawn from ``rng`` with ``init`` (default He: standard
    deviation ``sqrt(2 / (C_in kh kw))``), biases start at zero. Like
    ``Affine``, the layer keeps the arrays ``W`` and ``b`` themselves, so an
    optimiser updating ``params`` in place trains it; the output has ``W``'s
    dtype (float16 is computed in float32) and ``dx`` the input's.

    >>> conv = Conv2d(1, 2, 3, padding=1, rng=np.random.default_rng(0), dtype=np.float64)
    >>> conv
    Conv2d(1, 2, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), dtype=float64)
    >>> conv.W[...] = 0.0
    >>> conv.W[0, 0, 1, 1] = 1.0   # channel 0 copies the input
    >>> conv.W[1, 0, 1, 2] = 1.0   # channel 1 shifts it left by one pixel
    >>> x = np.arange(6.0).reshape(1, 1, 2, 3)
    >>> print(conv.forward(x))
    [[[[0. 1. 2.]
       [3. 4. 5.]]
    <BLANKLINE>
      [[1. 2. 0.]
       [4. 5. 0.]]]]
    >>> conv.backward(np.ones((1, 2, 2, 3))).shape, conv.dW.shape, conv.db
    ((1, 1, 2, 3), (2, 1, 3, 3), array([6., 6.]))
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        *,
        rng: np.random.Generator,
        init: str | float = "he",
        dtype: DTypeLike = np.float32,
    ) -> None:
        from scratchnn.init import make_initializer

        super().__init__()
        in_channels = _checks.count("Conv2d", "in_channels", in_channels)
        out_channels = _checks.count("Conv2d", "out_channels", out_channels)
        kh, kw = pair(kernel_size, "kernel_size", "Conv2d")
        pair(stride, "stride", "Conv2d")  # checked before the weights are drawn: a failed
        pair(padding, "padding", "Conv2d", minimum=0)  # call leaves the generator as it was
        # The fans of torch.nn.init and Glorot & Bengio: each output of a kernel window
        # reads in_channels*kh*kw inputs, and each input feeds out_channels*kh*kw outputs.
        fan_in, fan_out = in_channels * kh * kw, out_channels * kh * kw
        # The initialisers draw (fan_in, n) matrices, the im2col layout of W transposed.
        W = make_initializer(init)(fan_in, out_channels, rng, dtype, fans=(fan_in, fan_out))
        W = np.ascontiguousarray(W.T).reshape(out_channels, in_channels, kh, kw)
        self._setup(W, np.zeros(out_channels, dtype=W.dtype), stride, padding)

    @classmethod
    def from_weights(
        cls,
        W: Any,
        b: Any,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
    ) -> Conv2d:
        """A layer that uses the given arrays, as the book's ``Convolution(W, b, stride, pad)``.

        >>> Conv2d.from_weights(np.ones((4, 3, 5, 5)), np.zeros(4), stride=2)
        Conv2d(3, 4, kernel_size=(5, 5), stride=(2, 2), padding=(0, 0), dtype=float64)
        """
        layer = cls.__new__(cls)
        WeightBiasLayer.__init__(layer)
        W = as_array(W, who="Conv2d", what="W")
        b = as_array(b, who="Conv2d", what="b")
        if W.dtype not in FLOAT_DTYPES or b.dtype != W.dtype:
            raise TypeError(
                f"Conv2d: W and b must share one float dtype, got {W.dtype} and {b.dtype}"
            )
        if W.ndim != 4 or b.shape != (W.shape[0],) or 0 in W.shape:
            raise ValueError(
                "Conv2d: W must have shape (out_channels, in_channels, kh, kw) and b shape "
                f"(out_channels,); got W {W.shape} and b {b.shape}"
            )
        layer._setup(W, b, stride, padding)
        return layer

    def _setup(
        self,
        W: np.ndarray,
        b: np.ndarray,
        stride: int | tuple[int, int],
        padding: int | tuple[int, int],
    ) -> None:
        self.W, self.b = W, b
        self.stride = pair(stride, "stride", "Conv2d")
        self.padding = pair(padding, "padding", "Conv2d", minimum=0)
        self.dW: np.ndarray | None = None
        self.db: np.ndarray | None = None
        self.col: np.ndarray | None = None
        self._x_shape: tuple[int, ...] = ()

    @property
    def kernel_size(self) -> tuple[int, int]:
        return int(self.W.shape[2]), int(self.W.shape[3])

    def __repr__(self) -> str:
        out_c, in_c = self.W.shape[:2]
        return (
            f"Conv2d({in_c}, {out_c}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dtype={self.W.dtype})"
        )

    def _forward(self, x: np.ndarray) -> np.ndarray:
        out_c, in_c, kh, kw = self.W.shape
        check_images("Conv2d", x, in_c, (kh, kw), self.padding)
        n, _, h, w = x.shape
        oh = output_size(h, kh, self.stride[0], self.padding[0])
        ow = output_size(w, kw, self.stride[1], self.padding[1])
        work = compute_dtype_of(np.result_type(x.dtype, self.W.dtype))
        xw = x.astype(work, copy=False)
        # Keeps col, (C kh kw + 1, N OH OW): dW is col times dout. It is a new array, never
        # the caller's. Its last row is ones, the input that the bias multiplies: the matrix
        # products then add the bias and sum db, instead of a pass of their own each.
        xp = get_array_module(x)
        on_cpu = isinstance(x, np.ndarray)
        k = in_c * kh * kw
        shape = (k + 1, n * oh * ow)
        col = _buffers.empty(shape, work) if on_cpu else xp.empty(shape, work)
        windows = col[:k].reshape(in_c, kh, kw, n, oh, ow)
        dims = (n, in_c, h, w, kh, kw, *self.stride, *self.padding, oh, ow)
        # The compiled im2col reads the padding as zeros, without a padded copy.
        if not (on_cpu and _fused.conv("im2col", np.ascontiguousarray(xw), windows, dims)):
            padded = pad_images(xw, self.padding)
            for p in range(kh):
                rows = window_slice(p, oh, self.stride[0])
                for q in range(kw):
                    cols = window_slice(q, ow, self.stride[1])
                    windows[:, p, q] = padded[:, :, rows, cols].transpose(1, 0, 2, 3)
        col[k] = 1.0
        self.col = col
        self._x_shape = x.shape
        weights = xp.empty((out_c, k + 1), work)  # [W | b]
        weights[:, :k] = self.W.reshape(out_c, k)
        weights[:, k] = self.b
        if _per_image(col):
            # Each image's product, on its slice of col: (N, C_out, OH OW), NCHW already.
            product = np.matmul(weights, col.reshape(k + 1, n, oh * ow).transpose(1, 0, 2))
            return product.reshape(n, out_c, oh, ow).astype(self.W.dtype, copy=False)
        # The product (C_out, N OH OW), the bias added, in pieces of about
        # PRODUCT_PIECE_BYTES, each copied to NCHW while in cache (on the GPU, one piece).
        out = xp.empty((n, out_c, oh, ow), dtype=self.W.dtype)
        pixels = oh * ow
        step = _images_per_piece(n, out_c * pixels * col.itemsize, PRODUCT_PIECE_BYTES, on_cpu)
        for start in range(0, n, step):
            stop = min(n, start + step)
            product = weights @ col[:, start * pixels : stop * pixels]
            xp.copyto(out[start:stop], product.reshape(out_c, -1, oh, ow).transpose(1, 0, 2, 3))
        return out

    def _param_grads(self, dout: np.ndarray) -> np.ndarray:
        """Set ``dW`` and ``db``; return ``dout`` as the (C_out, N OH OW) matrix that
        ``dcol`` takes (per image: (N, C_out, OH OW), its own layout)."""
        col = self.col
        assert col is not None  # forward ran: the base checks it
        n, out_c, oh, ow = dout.shape
        g = to_compute(dout).astype(col.dtype, copy=False)
        # The last column of the products, from col's row of ones, is db: dout summed over
        # N, OH and OW.
        if _per_image(col):
            g = np.ascontiguousarray(g).reshape(n, out_c, oh * ow)
            images = col.reshape(col.shape[0], n, oh * ow).transpose(1, 2, 0)  # (N, OH OW, K + 1)
            grads = np.matmul(g, images).sum(axis=0)
        else:
            g = get_array_module(g).ascontiguousarray(g.transpose(1, 0, 2, 3)).reshape(out_c, -1)
            # col @ g.T rather than g @ col.T: OpenBLAS runs this orientation about 1.5 times
            # faster.
            grads = (col @ g.T).T
        self.dW = grads[:, :-1].reshape(self.W.shape).astype(self.W.dtype)
        self.db = grads[:, -1].astype(self.W.dtype)
        return g

    def _backward_params(self, dout: np.ndarray) -> None:
        self._param_grads(dout)

    def _backward(self, dout: np.ndarray) -> np.ndarray:
        g = self._param_grads(dout)
        out_c, in_c = self.W.shape[:2]
        n, _, h, w = self._x_shape
        out_size = dout.shape[2:]
        pixels = out_size[0] * out_size[1]
        weights_t = self.W.reshape(out_c, -1).astype(g.dtype, copy=False).T
        k = weights_t.shape[0]
        xp = get_array_module(g)
        dx = xp.empty((n, in_c, h, w), dtype=g.dtype)
        if _per_image(self.col):  # each image's dcol, into its slice of (C kh kw, N OH OW)
            dcol = np.empty((k, n, pixels), g.dtype)
            np.matmul(weights_t, g, out=dcol.transpose(1, 0, 2))
            self._col2im(dcol.reshape(k, n * pixels), dx, out_size)
            return dx
        # dcol in pieces of about DCOL_PIECE_BYTES, each summed into its images' dx while
        # it is still in cache (on the GPU, one piece).
        on_cpu = isinstance(g, np.ndarray)
        step = _images_per_piece(n, k * pixels * g.dtype.itemsize, DCOL_PIECE_BYTES, on_cpu)
        for start in range(0, n, step):
            stop = min(n, start + step)
            piece = weights_t @ g[:, start * pixels : stop * pixels]
            self._col2im(piece, dx[start:stop], out_size)
        return dx

    def _col2im(self, dcol: np.ndarray, dx: np.ndarray, out_size: tuple[int, ...]) -> None:
        """Write into ``dx`` (N, C, H, W) the sums of ``dcol`` (C kh kw, N OH OW), its images'."""
        n, in_c, h, w = dx.shape
        kh, kw = self.kernel_size
        ph, pw = self.padding
        oh, ow = out_size
        if isinstance(dcol, np.ndarray):
            # The compiled col2im adds in the same order, straight into NCHW.
            dims = (n, in_c, h, w, kh, kw, *self.stride, ph, pw, oh, ow)
            if _fused.conv("col2im", np.ascontiguousarray(dcol), dx, dims):
                return
        windows = dcol.reshape(in_c, kh, kw, n, oh, ow)
        # Scatter in col's own (C, N, H, W) order, so each add is contiguous; transpose once at the end.
        dxp = get_array_module(dcol).zeros((in_c, n, h + 2 * ph, w + 2 * pw), dtype=dcol.dtype)
        for p in range(kh):
            rows = window_slice(p, oh, self.stride[0])
            for q in range(kw):
                cols = window_slice(q, ow, self.stride[1])
                dxp[:, :, rows, cols] += windows[:, p, q]
        dx[...] = dxp[:, :, ph : ph + h, pw : pw + w].transpose(1, 0, 2, 3)
