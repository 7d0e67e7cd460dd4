"""The fully connected layer of the book, ``Affine``."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from scratchnn import kernels
from scratchnn.backend import FLOAT_DTYPES, as_array, may_share_memory
from scratchnn.kernels import bias, products
from scratchnn.layers.base import WeightBiasLayer


class Affine(WeightBiasLayer):
    """Fully connected layer: ``out = x W + b``, as in the book.

    Forward: ``x`` of shape (batch, in), or of any rank (batch, d1, d2, ...)
    with ``d1 * d2 * ... = in``, which is flattened to (batch, in); a 1-d ``x``
    of shape (in,) is one example and gives an output of shape (out,).
    Backward: ``dx = dout W^T`` (in the input's shape), ``dW = x^T dout``,
    ``db = sum(dout, axis=0)``; ``dW`` and ``db`` are kept on the layer.

    It keeps the very arrays ``W`` and ``b`` it is given, not copies, so code
    that updates a params dict in place (``params["W1"] -= lr * grad``), as the
    book's ``TwoLayerNet`` does, trains the layer. The output has ``W``'s
    dtype; ``dx`` has the input's.

    Keeps ``x`` (flattened; a private copy when the caller owns it).

    >>> layer = Affine(np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), np.array([0.5, -0.5]))
    >>> print(layer.forward(np.array([[1.0, 0.0, -1.0]])))
    [[-3.5 -4.5]]
    >>> print(layer.backward(np.array([[1.0, 1.0]])))
    [[ 3.  7. 11.]]
    >>> print(layer.dW.T, layer.db)
    [[ 1.  0. -1.]
     [ 1.  0. -1.]] [1. 1.]
    """

    def __init__(self, W: Any, b: Any) -> None:
        super().__init__()
        W = as_array(W, who="Affine", what="W")
        b = as_array(b, who="Affine", what="b")
        if W.dtype not in FLOAT_DTYPES or b.dtype != W.dtype:
            raise TypeError(
                f"Affine: W and b must share one float dtype, got {W.dtype} and {b.dtype}"
            )
        if W.ndim != 2 or b.shape != (W.shape[1],):
            raise ValueError(
                f"Affine: W must have shape (in, out) and b shape (out,); "
                f"got W {W.shape} and b {b.shape}"
            )
        self.W = W
        self.b = b
        self.x: np.ndarray | None = None
        self.dW: np.ndarray | None = None
        self.db: np.ndarray | None = None
        self._x_shape: tuple[int, ...] = ()

    def __repr__(self) -> str:
        n_in, n_out = self.W.shape
        return f"Affine({n_in}, {n_out}, dtype={self.W.dtype})"

    def _forward_gpu(self, x: Any, *, defer_bias: bool = False) -> Any:
        """``_forward`` on CuPy arrays. ``defer_bias=True`` (``Sequential``, with a (batch,
        in) matrix) leaves the bias out of the product, for the kernel after it to add: a
        Relu's (``Relu._forward_gpu(h, bias=b)``) or the loss's (``bias=b``)."""
        # (the keyword only when deferring: a subclass's own _forward(x) keeps working)
        return self._forward(x, add_bias=False) if defer_bias else self._forward(x)

    def _forward(self, x: np.ndarray, add_bias: bool = True) -> np.ndarray:
        W = self.W
        n_in = W.shape[0]
        single = x.ndim == 1
        if x.ndim == 2 and x.shape[1] == n_in:  # (batch, in), the common case: no reshape
            flat = x
        else:
            features = x.shape[0] if single else math.prod(x.shape[1:])
            if x.ndim == 0 or features != n_in:
                raise ValueError(
                    f"Affine: expected input of shape (batch, {n_in}), (batch, ...) with "
                    f"{n_in} features per example, or ({n_in},); got {x.shape}"
                )
            flat = x.reshape(1 if single else x.shape[0], n_in)
        self._x_shape = x.shape
        self.x = self._keep_input(flat) if flat is x or may_share_memory(flat, x) else flat
        xw = self.x if self.x.dtype == W.dtype else self.x.astype(W.dtype)
        # Not np.matmul and np.add: on CuPy arrays they would go through NumPy's dispatch.
        out = products.matmul(xw, W)  # (NumPy's @; on the GPU cuBLAS's gemm, called directly)
        if not add_bias:
            assert out.ndim == 2, "Affine: a deferred bias is for a (batch, in) matrix"
            return out
        if type(out) is np.ndarray:
            out += self.b  # in place: the product is a new array
        else:  # CuPy: a kernel of our own, one launch, for less host time than CuPy's ufunc
            bias.add_bias(out, self.b)  # (docs/benchmarks.md, "Affine's bias on the GPU")
        return out[0] if single else out

    def _backward(self, dout: np.ndarray, relu_mask: Any = None) -> np.ndarray:
        g = self._param_grads(dout, relu_mask)
        return products.matmul(g, self.W.T).reshape(self._x_shape)

    def _backward_gpu(self, dout: Any, *, relu_mask: Any = None) -> Any:
        """``_backward`` on CuPy arrays. ``relu_mask`` (``Sequential``, for an Affine
        followed by a Relu): ``dout`` is the Relu's, which this backward passes through
        the Relu first (``where(relu_mask, 0, dout)``), in the kernel that sums ``db``."""
        return self._backward(dout) if relu_mask is None else self._backward(dout, relu_mask)

    def _backward_params(self, dout: np.ndarray, *, relu_mask: Any = None) -> None:
        if relu_mask is None:
            self._param_grads(dout)
        else:
            self._param_grads(dout, relu_mask)

    def _param_grads(self, dout: np.ndarray, relu_mask: Any = None) -> np.ndarray:
        """Set ``dW`` and ``db``; return ``dout`` as a (batch, out) matrix in W's dtype
        (through the ReLU of ``relu_mask`` first, where given)."""
        assert self.x is not None
        W = self.W
        g = dout if dout.ndim == 2 else dout.reshape(-1, W.shape[1])
        if g.dtype != W.dtype:
            g = g.astype(W.dtype)
        x = self.x if self.x.dtype == W.dtype else self.x.astype(W.dtype)
        db = None
        if relu_mask is not None:
            fused = bias.relu_column_sum(g, relu_mask)
            if fused is None:  # (no kernel for these arrays: the Relu's own, then the sum)
                g = kernels.run("relu_backward", g, relu_mask)[0]
            else:
                g, db = fused
        self.dW = products.matmul(x.T, g)
        if db is None:
            # NumPy: g.sum(axis=0) without np.sum's Python wrapper. CuPy: a kernel of our
            # own, one launch, for less host time than CuPy's reduction.
            db = np.add.reduce(g, axis=0) if type(g) is np.ndarray else bias.column_sum(g)
        self.db = db
        return g
