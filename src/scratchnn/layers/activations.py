"""Activation layers: the seed's ``Relu`` and ``Sigmoid``, and the other common ones.

Each layer has the book's interface, ``forward(x)`` and ``backward(dout)``, and
keeps only what its backward pass needs (said in a comment beside it). The
checks that every layer shares live in :class:`scratchnn.layers.base.Layer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from numpy.lib.array_utils import normalize_axis_index

from scratchnn import _buffers, _checks, _fused, kernels
from scratchnn import functional as F
from scratchnn._threads import elementwise, flat, run_blocked
from scratchnn.backend import as_result, cupy_array_type, get_array_module, to_compute
from scratchnn.kernels import bias as bias_kernels
from scratchnn.layers.base import Layer


class Relu(Layer):
    """Rectified linear unit, the seed's "switch".

    Forward: ``y = x`` where ``x > 0``, else ``0``.
    Backward: ``dy/dx = 1`` where ``x > 0``, else ``0`` (so 0 at exactly 0, as in
    the book and PyTorch).

    Keeps ``mask``, a bool array of the input's shape, True where ``x <= 0``.
    With ``packed=True`` the mask is kept at one bit per element (8 times less
    memory than a bool array); ``mask`` still returns the bool array.
    Integer dtypes are kept, as in the book's code; NaN passes through forward.

    Shape: any; the output has the input's shape and dtype.

    >>> relu = Relu()
    >>> x = np.array([[1.0, -0.5], [-2.0, 3.0]])
    >>> print(relu.forward(x))
    [[1. 0.]
     [0. 3.]]
    >>> print(relu.mask)
    [[False  True]
     [ True False]]
    >>> print(relu.backward(np.ones((2, 2))))
    [[1. 0.]
     [0. 1.]]
    """

    keeps_integer_dtype = True
    hyperparameters = ("packed",)

    def __init__(self, packed: bool = False) -> None:
        super().__init__()
        self.packed = _checks.flag("Relu", "packed", packed)
        self._mask: np.ndarray | None = None
        self._mask_shape: tuple[int, ...] = ()

    @property
    def mask(self) -> np.ndarray | None:
        """Bool array, True where the last forward's input was ``<= 0``; None before."""
        if self._mask is None or not self.packed:
            return self._mask
        size = math.prod(self._mask_shape)
        if not isinstance(self._mask, np.ndarray):  # CuPy's unpackbits has no count
            bits = get_array_module(self._mask).unpackbits(self._mask)[:size]
            return bits.reshape(self._mask_shape).view(bool)
        return np.unpackbits(self._mask, count=size).reshape(self._mask_shape).view(bool)

    # -- CuPy: one fused kernel each way (scratchnn.kernels), the mask kept as on the CPU --

    def _forward_gpu(self, x: Any, *, bias: Any = None) -> Any:
        """``_forward`` on CuPy arrays. ``bias`` (``Sequential``, for an Affine followed
        by this Relu): ``x`` is the Affine's product without its bias, ``b``; one kernel
        adds it and applies the ReLU in place (``kernels.bias.add_bias_relu``)."""
        mask = None if bias is None else bias_kernels.add_bias_relu(x, bias)
        if mask is not None:
            y = x
        else:
            if bias is not None:  # (no kernel for these arrays: the two calls it stands for)
                bias_kernels.add_bias(x, bias)
            y, mask = kernels.run("relu_forward", x)
        self._mask = get_array_module(mask).packbits(mask) if self.packed else mask
        self._mask_shape = x.shape
        return y

    def _backward_gpu(self, dout: Any) -> Any:
        return kernels.run("relu_backward", dout, self.mask)[0]

    def _takes_as_paired(self, dout: Any) -> bool:
        """Whether the Affine before this Relu may take ``dout`` for both (``Sequential``'s
        pair): a CuPy array of this forward's output's shape and dtype, which this
        backward would take as it is. Otherwise this backward runs, and names what is wrong."""
        return (
            type(dout) is cupy_array_type()
            and dout.shape == self._out_shape
            and dout.dtype == self._out_dtype
        )

    def _forward(self, x: np.ndarray) -> np.ndarray:
        # Keeps only the mask: the sign pattern is all that backward needs.
        out = _buffers.empty_like(x)
        # Beyond the caches, out is written by non-temporal stores (src/ckernels/relu_stream.c).
        stream = "_stream" if x.nbytes >= _fused.STREAM_FROM else ""
        if self.packed:
            packed = np.empty((x.size + 7) // 8, np.uint8)
            self._mask, self._mask_shape = packed, x.shape
            if _fused.run(f"relu_packed{stream}", out, x, mask_out=packed):
                return self._freeze_mask(out)  # one compiled pass, packing beside it
        else:
            self._mask = _buffers.empty_like(x, bool)
            if _fused.run(f"relu{stream}", out, x, mask_out=self._mask):
                return self._freeze_mask(out)
        # NumPy's passes, block by block, so that each block's mask is still in
        # cache when it is used (and packed).
        xf, out_flat, kept = flat(x), out.reshape(-1), self._mask.reshape(-1)

        def forward_block(start: int, stop: int) -> None:
            if self.packed:
                mask = np.less_equal(xf[start:stop], 0)
                kept[start // 8 : (stop + 7) // 8] = np.packbits(mask)
            else:
                mask = np.less_equal(xf[start:stop], 0, out=kept[start:stop])
            _zero_where(mask, xf[start:stop], out_flat[start:stop])

        run_blocked(forward_block, xf, fused=False)
        return self._freeze_mask(out)

    def _freeze_mask(self, out: np.ndarray) -> np.ndarray:
        """Make the kept mask read-only (``mask`` hands it out; backward reads it) and
        return ``out``."""
        assert self._mask is not None
        self._mask.flags.writeable = False
        return out

    def _backward(self, dout: np.ndarray) -> np.ndarray:
        assert self._mask is not None  # forward ran: the base checks it
        dx = _buffers.empty_like(dout)
        # Beyond the caches, dx is written by non-temporal stores (src/ckernels/relu_stream.c).
        stream = "_stream" if dout.nbytes >= _fused.STREAM_FROM else ""
        kernel = f"relu_packed{stream}_grad" if self.packed else f"relu_grad{stream}"
        if _fused.run(kernel, dx, g=dout, mask_in=self._mask):
            return dx
        g, dx_flat, kept = flat(dout), dx.reshape(-1), self._mask.reshape(-1)

        def backward_block(start: int, stop: int) -> None:
            if self.packed:
                bits = np.unpackbits(kept[start // 8 : (stop + 7) // 8], count=stop - start)
                mask = bits.view(bool)
            else:
                mask = kept[start:stop]
            _zero_where(mask, g[start:stop], dx_flat[start:stop])

        run_blocked(backward_block, g, fused=False)
        return dx


def _zero_where(mask: np.ndarray, values: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[...] = np.where(mask, 0, values)``, bit for bit, in one branch-free pass.

    Why not ``np.where``: on a random mask it mispredicts a branch per element
    and runs about 10 times slower than this. ``values * ~mask`` would be as
    fast but turns an infinite or NaN ``values`` entry under the mask into NaN.
    Here each element's bits are ANDed with 0 (under the mask) or all ones: a
    bool is 0 or 1, so as ``int8`` minus 1 it is -1 (all bits set) or 0, and
    ``bitwise_and`` widens that int8 to the values' width with its sign.
    """
    keep_bits = np.subtract(mask.view(np.int8), np.int8(1))
    as_int = np.dtype(f"i{values.dtype.itemsize}")
    np.bitwise_and(values.view(as_int), keep_bits, out=out.view(as_int))
    return out


class Sigmoid(Layer):
    """Logistic sigmoid, as in the seed.

    Forward: ``y = 1 / (1 + exp(-x))``, computed without overflow for any finite x.
    Backward: ``dy/dx = y (1 - y)``, from the kept output alone.

    Keeps ``out``, the output of forward (handed out read-only, so that an
    in-place edit by the caller cannot corrupt the gradient).

    Shape: any; the output has the input's shape and floating dtype.

    >>> sigmoid = Sigmoid()
    >>> print(sigmoid.forward(np.array([-1.0, 0.0, 2.0])))
    [0.26894142 0.5        0.88079708]
    >>> print(sigmoid.backward(np.ones(3)))
    [0.19661193 0.25       0.10499359]
    """

    def __init__(self) -> None:
        super().__init__()
        self.out: np.ndarray | None = None

    def _forward_gpu(self, x: Any) -> Any:  # CuPy: one fused kernel each way
        self.out = F.sigmoid(x).astype(x.dtype, copy=False)  # float16 through float64
        return self.out

    def _backward_gpu(self, dout: Any) -> Any:
        assert self.out is not None  # forward ran: the base checks it
        return kernels.run("sigmoid_backward", to_compute(dout), to_compute(self.out))[0]

    def _forward(self, x: np.ndarray) -> np.ndarray:
        out = _fused.apply("sigmoid", x)  # one compiled pass, or None: NumPy's passes
        if out is None:  # float16 too, which F.sigmoid rounds once from float64
            out = F.sigmoid(x).astype(x.dtype, copy=False)
        self.out = self._keep_output(out)
        return self.out

    def _backward(self, dout: np.ndarray) -> np.ndarray:
        assert self.out is not None  # forward ran: the base checks it
        y, g = to_compute(self.out), to_compute(dout)
        return elementwise(_sigmoid_grad, y, g, compiled="sigmoid_grad")


def _sigmoid_grad(y: np.ndarray, g: np.ndarray, dx: np.ndarray) -> None:
    np.subtract(1.0, y, out=dx)
    np.multiply(g, dx, out=dx)  # dout * (1 - y) * y, in the result's array
    np.multiply(dx, y, out=dx)


class Tanh(Layer):
    """Hyperbolic tangent.

    Forward: ``y = tanh(x)``. Backward: ``dy/dx = 1 - y**2``, from the kept output.

    Keeps ``out`` (read-only). Shape: any.

    >>> tanh = Tanh()
    >>> print(tanh.forward(np.array([-1.0, 0.0, 2.0])))
    [-0.76159416  0.          0.96402758]
    >>> print(tanh.backward(np.ones(3)))
    [0.41997434 1.         0.07065082]
    """

    def __init__(self) -> None:
        super().__init__()
        self.out: np.ndarray | None = None

    def _forward_gpu(self, x: Any) -> Any:  # CuPy: one fused kernel each way
        self.out = kernels.run("tanh_forward", to_compute(x))[0].astype(x.dtype, copy=False)
        return self.out

    def _backward_gpu(self, dout: Any) -> Any:
        assert self.out is not None  # forward ran: the base checks it
        return kernels.run("tanh_backward", to_compute(dout), to_compute(self.out))[0]

    def _forward(self, x: np.ndarray) -> np.ndarray:
        out = elementwise(_tanh, to_compute(x), compiled="tanh")
        self.out = self._keep_output(out.astype(x.dtype, copy=False))
        return self.out

    def _backward(self, dout: np.ndarray) -> np.ndarray:
        assert self.out is not None  # forward ran: the base checks it
        y, g = to_compute(self.out), to_compute(dout)
        return elementwise(_tanh_grad, y, g, compiled="tanh_grad")


def _tanh(z: np.ndarray, out: np.ndarray) -> None:
    np.tanh(z, out=out)


def _tanh_grad(y: np.ndarray, g: np.ndarray, dx: np.ndarray) -> None:
    np.multiply(y, y, out=dx)
    np.subtract(1.0, dx, out=dx)  # dout * (1 - y**2), in the result's array
    np.multiply(g, dx, out=dx)


class LeakyRelu(Layer):
    """Leaky ReLU with slope ``alpha`` for non-positive inputs (PyTorch's ``negative_slope``).

    Forward: ``y = x`` where ``x > 0``, else ``alpha * x``.
    Backward: ``dy/dx = 1`` where ``x > 0``, else ``alpha``.

    Keeps ``mask``, True where ``x <= 0`` as in ``Relu``, and at NaN, where the
    slope is ``alpha`` as in PyTorch (``Relu`` passes ``dout`` there, as PyTorch's
    does). Shape: any.

    >>> leaky = LeakyRelu(alpha=0.1)
    >>> leaky
    LeakyRelu(alpha=0.1)
    >>> print(leaky.forward(np.array([-2.0, 3.0])))
    [-0.2  3. ]
    >>> print(leaky.backward(np.ones(2)))
    [0.1 1. ]
    """

    hyperparameters = ("alpha",)

    def __init__(self, alpha: float = 0.01) -> None:
        super().__init__()
        self.alpha = _checks.real("LeakyRelu", "alpha", alpha)
        self.mask: np.ndarray | None = None

    def _forward_gpu(self, x: Any) -> Any:  # CuPy: one fused kernel each way
        y, self.mask = kernels.run("leaky_relu_forward", to_compute(x), alpha=self.alpha)
        return y.astype(x.dtype, copy=False)

    def _backward_gpu(self, dout: Any) -> Any:
        return kernels.run("leaky_relu_backward", to_compute(dout), self.mask, alpha=self.alpha)[0]

    def _forward(self, x: np.ndarray) -> np.ndarray:
        z = to_compute(x)
        out, self.mask = _buffers.empty_like(z), _buffers.empty_like(z, bool)
        if _fused.run("leaky_relu", out, z, mask_out=self.mask, param=self.alpha):
            self.mask.flags.writeable = False  # kept for backward: see Relu's
            return out.astype(x.dtype, copy=False)  # one compiled pass, the mask beside it
        zf, out_flat, mask = flat(z), out.reshape(-1), self.mask.reshape(-1)
        # where(x <= 0, alpha x, x) is max(x, alpha x) for alpha <= 1 and min otherwise,
        # value for value, without np.where's mispredicted branch per element.
        pick = np.maximum if self.alpha <= 1.0 else np.minimum

        def forward_block(start: int, stop: int) -> None:
            np.greater(zf[start:stop], 0, out=mask[start:stop])
            np.logical_not(mask[start:stop], out=mask[start:stop])  # NaN's slope is alpha
            # alpha x may overflow (|alpha| > 1) or be 0 * inf where x itself is picked.
            with np.errstate(over="ignore", invalid="ignore"):
                np.multiply(zf[start:stop], self.alpha, out=out_flat[start:stop])
            pick(zf[start:stop], out_flat[start:stop], out=out_flat[start:stop])
            if self.alpha == 0.0:  # max(inf, 0 * inf) is NaN; x > 0 picks x = inf
                np.copyto(out_flat[start:stop], zf[start:stop], where=zf[start:stop] == np.inf)

        run_blocked(forward_block, zf, fused=False)
        self.mask.flags.writeable = False
        return out.astype(x.dtype, copy=False)

    def _backward(self, dout: np.ndarray) -> np.ndarray:
        assert self.mask is not None  # forward ran: the base checks it
        g = to_compute(dout)
        dx = _buffers.empty_like(g)
        if _fused.run("leaky_relu_grad", dx, g=g, mask_in=self.mask, param=self.alpha):
            return dx
        # dout times 1 or alpha, the factor looked up by the mask (0 or 1) as an index.
        factors = np.array([1.0, self.alpha], dtype=g.dtype)

        def kernel(mask: np.ndarray, g: np.ndarray, dx: np.ndarray) -> None:
            np.take(factors, mask.view(np.uint8), out=dx)
            np.multiply(g, dx, out=dx)

        return elementwise(kernel, self.mask, g, dtype=g.dtype)


class Elu(Layer):
    """Exponential linear unit.

    Forward: ``y = x`` where ``x > 0``, else ``alpha * (exp(x) - 1)``.
    Backward: ``dy/dx = alpha * exp(x)`` where ``x <= 0``, else 1 (at NaN too,
    as PyTorch's element-by-element loop has it; its vectorised loop, which
    longer tensors take, gives NaN there).

    Keeps ``slope``, dy/dx at each input, computed in forward beside the
    output (recovering ``alpha * exp(x)`` from the output as ``y + alpha``
    would cancel catastrophically for very negative x); backward is then
    ``dout * slope``. Shape: any.

    >>> elu = Elu()
    >>> print(elu.forward(np.array([-1.0, 2.0])))
    [-0.63212056  2.        ]
    >>> print(elu.backward(np.ones(2)))
    [0.36787944 1.        ]
    """

    hyperparameters = ("alpha",)

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = _checks.real("Elu", "alpha", alpha)
        self.slope: np.ndarray | None = None
        self.x: np.ndarray | None = None  # kept by the GPU path, which recomputes the slope

    def _forward_gpu(self, x: Any) -> Any:  # CuPy: one fused kernel each way
        self.x, self.slope = self._keep_input(x), None  # a CPU slope would be stale
        y = kernels.run("elu_forward", to_compute(x), alpha=self.alpha)[0]
        return y.astype(x.dtype, copy=False)

    def _backward_gpu(self, dout: Any) -> Any:
        if self.x is None:  # forward ran on the CPU; the layer moved to the GPU since
            return _slope_after_move(self.slope, dout)
        z = to_compute(self.x)
        return kernels.run("elu_backward", to_compute(dout), z, alpha=self.alpha)[0]

    def _forward(self, x: np.ndarray) -> np.ndarray:
        alpha = self.alpha

        def kernel(z: np.ndarray, out: np.ndarray, slope: np.ndarray) -> None:
            # exp only of the non-positive part: exp of a large positive x would overflow.
            np.minimum(z, 0, out=slope)
            np.expm1(slope, out=out)
            np.multiply(out, alpha, out=out)
            # max(x, 0) + alpha expm1(min(x, 0)) is where(x > 0, x, alpha expm1(x)), one term
            # being 0 on each side, without np.where's branch per element (exactly, but for
            # the sign of a zero result: -0 + 0 is +0, where PyTorch keeps -0).
            np.add(out, np.maximum(z, 0), out=out)
            np.exp(slope, out=slope)
            np.multiply(slope, alpha, out=slope)  # alpha exp(min(x, 0))
            # 1 where not x <= 0: where x > 0, and at NaN (as PyTorch's element loop gives;
            # its vectorised loop, on longer tensors, gives NaN).
            one = np.less_equal(z, 0)
            np.logical_not(one, out=one)
            if not 0.0 <= alpha <= 1.0:
                slope[...] = np.where(one, 1.0, slope)
                return
            # With 0 <= alpha <= 1 the slope is at most 1 where x <= 0, so fmax(slope, one)
            # is 1 where one is and the slope elsewhere (fmax drops the NaN of a NaN x):
            # the same values, branch-free.
            np.fmax(slope, one, out=slope)

        self.x = None  # a GPU input would be stale
        out, self.slope = _output_and_slope("elu", to_compute(x), kernel, param=alpha)
        return out.astype(x.dtype, copy=False)

    def _backward(self, dout: np.ndarray) -> np.ndarray:
        if self.slope is None:  # forward ran on the GPU; the layer moved to the CPU since
            assert self.x is not None  # forward ran: the base checks it
            self._forward(self.x)
        assert self.slope is not None
        return _times_slope(self.slope, dout)


def _output_and_slope(
    name: str,
    z: np.ndarray,
    kernel: Callable[[np.ndarray, np.ndarray, np.ndarray], None],
    param: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A layer's output and its slope dy/dx, both new arrays of ``z``'s shape and dtype.

    One pass of compiled kernel ``name`` (writing the slope as its ``out2``)
    where it takes ``z``; else ``kernel(z, out, slope)``, NumPy's passes, block by block.
    Why the slope: backward then reads one kept array and multiplies, where
    keeping x would cost a copy of it in forward and the transcendental
    functions again in backward.
    """
    out, slope = _buffers.empty_like(z), _buffers.empty_like(z)
    if not _fused.run(name, out, z, out2=slope, param=param):
        zf, out_flat, slope_flat = flat(z), out.reshape(-1), slope.reshape(-1)

        def kernel_on_block(start: int, stop: int) -> None:
            kernel(zf[start:stop], out_flat[start:stop], slope_flat[start:stop])

        run_blocked(kernel_on_block, zf, fused=False)
    # Read-only, as Sigmoid's out: backward reads it, so an edit would change the gradient.
    slope.flags.writeable = False
    return out, slope


def _slope_after_move(slope: Any, dout: Any) -> Any:
    """``dout * slope`` on the GPU, for a layer moved there between forward and backward."""
    assert slope is not None  # forward ran: the base checks it
    return to_compute(dout) * slope


def _times_slope(slope: np.ndarray, dout: np.ndarray) -> np.ndarray:
    """``dout * slope``, the backward pass of a layer that keeps its slope."""

    def kernel(slope: np.ndarray, g: np.ndarray, dx: np.ndarray) -> None:
        np.multiply(g, slope, out=dx)

    return elementwise(kernel, slope, to_compute(dout), compiled="slope_grad")


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715
# Beyond this |x| the tanh form has saturated to exactly 0 or 1 in every dtype, so
# clipping x there changes nothing but keeps x**3 from overflowing.
_GELU_TANH_CLIP = 100.0
# exp(-x**2 / 2) underflows to 0 in float64 well before |x| = 40.
_GELU_PDF_CLIP = 40.0


class Gelu(Layer):
    """Gaussian error linear unit, exact (``approximate="none"``) or its tanh form.

    Exact: ``y = x * Phi(x)`` with ``Phi(x) = erfc(-x / sqrt(2)) / 2``, the
    standard normal CDF; ``dy/dx = Phi(x) + x * phi(x)`` with
    ``phi(x) = exp(-x**2 / 2) / sqrt(2 pi)``.

    Tanh form: ``y = x/2 * (1 + tanh(u))`` with
    ``u = sqrt(2/pi) * (x + 0.044715 x**3)``, computed as ``x * sigmoid(2u)``
    (the same number, without the cancellation of ``1 + tanh(u)`` in the left
    tail); ``dy/dx = s + 2 x s (1 - s) * sqrt(2/pi) * (1 + 3 * 0.044715 x**2)``
    with ``s = sigmoid(2u)``.

    Keeps ``slope``, dy/dx at each input, computed in forward beside the
    output from the same Phi (or s); backward is then ``dout * slope``,
    with no second erfc or exp. Shape: any.

    >>> gelu = Gelu()
    >>> print(gelu.forward(np.array([-1.0, 0.0, 2.0])))
    [-0.15865525  0.          1.95449974]
    >>> print(gelu.backward(np.ones(3)))
    [-0.08331547  0.5         1.0852318 ]
    >>> Gelu(approximate="tanh")
    Gelu(approximate='tanh')
    """

    hyperparameters = ("approximate",)

    def __init__(self, approximate: Literal["none", "tanh"] = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"Gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate
        self.slope: np.ndarray | None = None
        self.x: np.ndarray | None = None  # kept by the GPU path, which recomputes the slope

    # CuPy: one fused kernel each way; erfc is cheap on a GPU, so x alone is kept.
    def _forward_gpu(self, x: Any) -> Any:
        self.x, self.slope = self._keep_input(x), None  # a CPU slope would be stale
        name = "gelu_tanh_forward" if self.approximate == "tanh" else "gelu_forward"
        return kernels.run(name, to_compute(x))[0].astype(x.dtype, copy=False)

    def _backward_gpu(self, dout: Any) -> Any:
        if self.x is None:  # forward ran on the CPU; the layer moved to the GPU since
            return _slope_after_move(self.slope, dout)
        name = "gelu_tanh_backward" if self.approximate == "tanh" else "gelu_backward"
        return kernels.run(name, to_compute(dout), to_compute(self.x))[0]

    def _forward(self, x: np.ndarray) -> np.ndarray:
        self.x = None  # a GPU input would be stale
        if self.approximate == "tanh":
            out, self.slope = _output_and_slope("gelu_tanh", to_compute(x), _gelu_tanh)
        else:
            out, self.slope = _output_and_slope("gelu", to_compute(x), _gelu)
        return out.astype(x.dtype, copy=False)

    def _backward(self, dout: np.ndarray) -> np.ndarray:
        if self.slope is None:  # forward ran on the GPU; the layer moved to the CPU since
            assert self.x is not None  # forward ran: the base checks it
            self._forward(self.x)
        assert self.slope is not None
        return _times_slope(self.slope, dout)


def _gelu(z: np.ndarray, out: np.ndarray, slope: np.ndarray) -> None:
    """``out = z Phi(z)`` and ``slope = Phi(z) + z phi(z)``, with ``Phi(z) = erfc(-z /
    sqrt 2) / 2``: erfc keeps relative accuracy in the left tail, where ``1 + erf`` cancels."""
    if z.dtype == np.float32:
        _gelu_one_exponential(z, out, slope)
        return
    # float64 (and float16, computed in it): Phi and phi with their arguments carried to
    # twice the precision (functional.ncdf, npdf), within a few ulps in the far left tail.
    # ncdf_into, not ncdf: this runs on one block, maybe in a worker thread already.
    cdf = slope
    F.ncdf_into(z, cdf)
    np.multiply(z, cdf, out=out)
    pdf = F.npdf(z)
    np.multiply(z, pdf, out=pdf)
    np.add(cdf, pdf, out=slope)  # Phi + x phi


def _gelu_one_exponential(z: np.ndarray, out: np.ndarray, slope: np.ndarray) -> None:
    """``_gelu`` in float32 as the compiled kernel computes it: one exponential,
    ``E = exp(-z**2 / 2)``, serves ``phi = E / sqrt(2 pi)`` and ``erfc(|z| / sqrt 2) =
    E R(|z| / sqrt 2)`` (R Cody's middle-interval rational, ``functional.erfc``'s float32
    formula). ``z**2`` is exact in float64, so ``E`` keeps its relative accuracy in the
    tail (rounding ``z / sqrt 2`` first, then squaring, put it 11 ulps off at z = -6.2);
    the kernel splits ``z**2`` in float32 instead, and the two agree within an ulp."""
    a = np.minimum(np.abs(z), _GELU_PDF_CLIP)
    square = np.square(a, dtype=np.float64)
    E = np.exp(np.multiply(square, -0.5, out=square)).astype(np.float32)
    y = np.multiply(a, 1.0 / math.sqrt(2.0), out=a)
    num, den = np.empty_like(y), np.empty_like(y)
    tail = F._rational(F._ERFC_MID_NUM, F._ERFC_MID_DEN, y, num, den)
    np.multiply(E, tail, out=tail)  # erfc(|z| / sqrt 2)
    # Phi(z) is half of that where z < 0, half of 2 minus it elsewhere: (2 - t) / 2 is the
    # kernel's 1 - t / 2, rounded alike. The sign by bits: a masked ufunc is many times slower.
    F._reflect_negative(np.negative(z, out=den), tail, y)
    cdf = np.multiply(tail, 0.5, out=slope)
    np.multiply(z, cdf, out=out)
    pdf = np.divide(E, math.sqrt(2.0 * math.pi), out=E)
    np.multiply(z, pdf, out=pdf)
    np.add(cdf, pdf, out=slope)


def _sigmoid_2u(z: np.ndarray, out: np.ndarray) -> None:
    """``out = sigmoid(2u) = (1 + tanh(u)) / 2``; clipping only keeps ``z**3`` finite."""
    u = np.clip(z, -_GELU_TANH_CLIP, _GELU_TANH_CLIP)
    np.multiply(u, u, out=out)
    np.multiply(out, _GELU_CUBIC, out=out)
    np.multiply(out, u, out=out)
    np.add(u, out, out=u)
    np.multiply(u, 2.0 * _SQRT_2_OVER_PI, out=u)
    F.sigmoid_into(u, out)


def _gelu_tanh(z: np.ndarray, out: np.ndarray, slope: np.ndarray) -> None:
    """``out = z s`` and ``slope = s + z 2 s (1 - s) du`` with ``s = sigmoid(2u)``."""
    s = np.empty_like(z)
    _sigmoid_2u(z, s)
    np.multiply(z, s, out=out)
    du = np.clip(z, -_GELU_TANH_CLIP, _GELU_TANH_CLIP)
    np.multiply(du, du, out=du)
    np.multiply(du, 3.0 * _GELU_CUBIC, out=du)
    np.add(du, 1.0, out=du)
    np.multiply(du, _SQRT_2_OVER_PI, out=du)  # du/dx
    # 2 s (1 - s) du, then times z last: s (1 - s) is exactly 0 wherever z is large
    # enough to overflow.
    np.subtract(1.0, s, out=slope)
    np.multiply(slope, s, out=slope)
    np.multiply(slope, 2.0, out=slope)
    np.multiply(slope, du, out=slope)
    np.multiply(z, slope, out=slope)
    np.add(s, slope, out=slope)


class Softplus(Layer):
    """Softplus, a smooth ReLU: ``y = log(1 + exp(beta x)) / beta``.

    Computed stably as ``max(x, 0) + log1p(exp(-beta |x|)) / beta`` for every
    finite x, with no linear cut-off (PyTorch switches to ``y = x`` above
    ``beta x > 20``; here the exact value is kept).
    Backward: ``dy/dx = sigmoid(beta x) = 1 - exp(-beta y)``, from the kept output.

    Keeps ``out`` (read-only); for float16 input also the output before its
    rounding to float16, from which backward computes the slope (the float16
    output keeps too few digits of a value below 6e-5: at x = -17 the slope
    would be 44 % off). Shape: any.

    >>> softplus = Softplus()
    >>> print(softplus.forward(np.array([-1.0, 0.0, 2.0])))
    [0.31326169 0.69314718 2.12692801]
    >>> print(softplus.backward(np.ones(3)))
    [0.26894142 0.5        0.88079708]
    """

    hyperparameters = ("beta",)

    def __init__(self, beta: float = 1.0) -> None:
        super().__init__()
        self.beta = _checks.positive("Softplus", "beta", beta)
        self.out: np.ndarray | None = None
        self._unrounded: Any = None  # the output in float32, where out is float16

    def _rounded_output(self, y: Any, dtype: np.dtype[Any]) -> Any:
        """``y`` (computed in the compute dtype) as the output of ``dtype``, and the
        unrounded ``y`` kept where the two differ."""
        out = y.astype(dtype, copy=False)
        self._unrounded = y if out is not y else None
        return out

    def _kept_output(self) -> Any:
        assert self.out is not None  # forward ran: the base checks it
        return self._unrounded if self._unrounded is not None else to_compute(self.out)

    def _forward_gpu(self, x: Any) -> Any:  # CuPy: one fused kernel each way
        y = kernels.run("softplus_forward", to_compute(x), beta=self.beta)[0]
        self.out = self._rounded_output(y, x.dtype)
        return self.out

    def _backward_gpu(self, dout: Any) -> Any:
        y = self._kept_output()
        return kernels.run("softplus_backward", to_compute(dout), y, beta=self.beta)[0]

    def _forward(self, x: np.ndarray) -> np.ndarray:
        beta = self.beta

        def kernel(z: np.ndarray, out: np.ndarray) -> None:
            # beta * x may overflow to -inf for huge |x|; exp(-inf) = 0 is then the right
            # limit. In place: max(x, 0) + log1p(exp(-beta |x|)) / beta.
            np.abs(z, out=out)
            with np.errstate(over="ignore"):
                np.multiply(out, -beta, out=out)
                np.exp(out, out=out)
            np.log1p(out, out=out)
            np.divide(out, beta, out=out)
            np.add(out, np.maximum(z, 0), out=out)

        out = elementwise(kernel, to_compute(x), compiled="softplus", param=beta)
        self.out = self._keep_output(self._rounded_output(out, x.dtype))
        return self.out

    def _backward(self, dout: np.ndarray) -> np.ndarray:
        beta = self.beta

        def kernel(y: np.ndarray, g: np.ndarray, slope: np.ndarray) -> None:
            with np.errstate(over="ignore"):
                np.multiply(y, -beta, out=slope)
                np.expm1(slope, out=slope)
            np.negative(slope, out=slope)  # -expm1(-beta y)
            np.multiply(g, slope, out=slope)

        y, g = self._kept_output(), to_compute(dout)
        return elementwise(kernel, y, g, compiled="softplus_grad", param=beta)


class Silu(Layer):
    """Sigmoid-weighted linear unit (swish): ``y = x * sigmoid(x)``.

    Backward: ``dy/dx = s (1 + x (1 - s))`` with ``s = sigmoid(x)``.

    Keeps ``slope``, dy/dx at each input, computed in forward from the same
    ``s`` as the output; backward is then ``dout * slope``. Shape: any.

    >>> silu = Silu()
    >>> print(silu.forward(np.array([-1.0, 0.0, 2.0])))
    [-0.26894142  0.          1.76159416]
    >>> print(silu.backward(np.ones(3)))
    [0.07232949 0.5        1.09078425]
    """

    def __init__(self) -> None:
        super().__init__()
        self.slope: np.ndarray | None = None
        self.x: np.ndarray | None = None  # kept by the GPU path, which recomputes the slope

    def _forward_gpu(self, x: Any) -> Any:  # CuPy: one fused kernel each way
        self.x, self.slope = self._keep_input(x), None  # a CPU slope would be stale
        return kernels.run("silu_forward", to_compute(x))[0].astype(x.dtype, copy=False)

    def _backward_gpu(self, dout: Any) -> Any:
        if self.x is None:  # forward ran on the CPU; the layer moved to the GPU since
            return _slope_after_move(self.slope, dout)
        return kernels.run("silu_backward", to_compute(dout), to_compute(self.x))[0]

    def _forward(self, x: np.ndarray) -> np.ndarray:
        self.x = None  # a GPU input would be stale
        out, self.slope = _output_and_slope("silu", to_compute(x), _silu)
        return out.astype(x.dtype, copy=False)

    def _backward(self, dout: np.ndarray) -> np.ndarray:
        if self.slope is None:  # forward ran on the GPU; the layer moved to the CPU since
            assert self.x is not None  # forward ran: the base checks it
            self._forward(self.x)
        assert self.slope is not None
        return _times_slope(self.slope, dout)


def _silu(z: np.ndarray, out: np.ndarray, slope: np.ndarray) -> None:
    """``out = z s`` and ``slope = s (1 + z (1 - s))``, with ``s = sigmoid(z)``."""
    s = F.sigmoid_into(z, np.empty_like(z))
    np.multiply(z, s, out=out)
    np.subtract(1.0, s, out=slope)
    np.multiply(z, slope, out=slope)
    np.add(1.0, slope, out=slope)
    np.multiply(s, slope, out=slope)


class Softmax(Layer):
    """Softmax along ``axis``: ``y_i = exp(x_i - m) / sum_j exp(x_j - m)``, ``m = max_j x_j``.

    Subtracting the maximum makes it stable for logits of any magnitude.
    Backward: ``dx = y * (dout - sum(dout * y, axis))``, from the kept output.

    Keeps ``out`` (read-only). Shape: any; a 0-d input is one logit (y = 1, NaN if it is not finite).

    >>> softmax = Softmax()
    >>> print(softmax.forward(np.array([1.0, 2.0, 3.0])))
    [0.09003057 0.24472847 0.66524096]
    >>> print(softmax.backward(np.array([1.0, 0.0, 0.0])))
    [ 0.08192507 -0.02203304 -0.05989202]
    """

    hyperparameters = ("axis",)

    def __init__(self, axis: int = -1) -> None:
        super().__init__()
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"Softmax: axis must be an int, got {axis!r}")
        self.axis = int(axis)
        self.out: np.ndarray | None = None

    def _reduction_axis(self, ndim: int) -> int:
        try:
            return normalize_axis_index(self.axis, max(ndim, 1))
        except np.exceptions.AxisError as error:
            raise ValueError(
                f"Softmax: axis {self.axis} is out of range for {ndim}-d input"
            ) from error

    @staticmethod
    def _rows(like: np.ndarray, axis: int) -> np.ndarray | None:
        """A flat output for the compiled row kernels, or None: they take the last axis only."""
        if not _fused.ENABLED or not isinstance(like, np.ndarray) or axis != like.ndim - 1:
            return None
        return _buffers.empty((like.size,), like.dtype)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        axis = self._reduction_axis(x.ndim)
        z = to_compute(x)
        if z.ndim == 0 or z.size == 0:
            with np.errstate(invalid="ignore"):  # exp(z - z) / exp(z - z): 1, or NaN
                out = z - z + 1  # for a NaN or an infinity
        elif (rows := self._rows(z, axis)) is not None and _fused.run(
            "softmax", rows, flat(z), param=z.shape[-1]
        ):
            out = rows.reshape(z.shape)  # the same formula, one compiled pass per row
        else:
            # x - max can overflow to -inf only where the exact exp is 0 anyway.
            # In place, one array: each NumPy temporary would cost a pass and an allocation.
            with np.errstate(over="ignore"):
                e = np.subtract(z, np.max(z, axis=axis, keepdims=True), out=np.empty_like(z))
                np.exp(e, out=e)
            out = np.divide(e, np.sum(e, axis=axis, keepdims=True), out=e)
        self.out = self._keep_output(as_result(out).astype(x.dtype, copy=False))
        return self.out

    def _backward(self, dout: np.ndarray) -> np.ndarray:
        assert self.out is not None  # forward ran: the base checks it
        y, g = to_compute(self.out), to_compute(dout)
        if y.ndim == 0:
            with np.errstate(invalid="ignore"):  # the general formula: 0, or NaN
                return y * (g - g * y)
        axis = self._reduction_axis(y.ndim)
        rows = self._rows(g, axis)
        if rows is not None and _fused.run(
            "softmax_grad", rows, flat(y), flat(g), param=y.shape[-1]
        ):
            return rows.reshape(g.shape)
        dx = np.multiply(g, y, out=np.empty_like(g))  # y * (g - sum(g * y)), in one array
        np.subtract(g, np.sum(dx, axis=axis, keepdims=True), out=dx)
        return np.multiply(y, dx, out=dx)


class Identity(Layer):
    """The identity: ``y = x``, ``dy/dx = 1``. Keeps nothing.

    Returns a read-only view of the input, so that it cannot write into it.

    >>> print(Identity().forward([1.0, 2.0]))
    [1. 2.]
    """

    def _forward(self, x: np.ndarray) -> np.ndarray:
        view = x.view()
        if isinstance(view, np.ndarray):  # CuPy arrays cannot be made read-only
            view.flags.writeable = False
        return view

    def _backward(self, dout: np.ndarray) -> np.ndarray:
        return _buffers.copy(dout) if type(dout) is np.ndarray else dout.copy()
