"""The computational-graph nodes of *Deep Learning from Scratch*, chapter 5.

Each node is a :class:`~scratchnn.layers.base.Layer`: ``forward`` computes and
keeps what ``backward`` needs, ``backward(dout)`` multiplies ``dout`` by the
node's local derivative. ``MulLayer`` and ``AddLayer`` take two inputs and
return ``(dx, dy)``; the others take one. The base class does every check.

The book's apple-and-orange shopping example, through these nodes:

>>> apple, apple_num, orange, orange_num, tax = 100, 2, 150, 3, 1.1
>>> mul_apple_layer, mul_orange_layer = MulLayer(), MulLayer()
>>> add_apple_orange_layer, mul_tax_layer = AddLayer(), MulLayer()
>>> apple_price = mul_apple_layer.forward(apple, apple_num)
>>> orange_price = mul_orange_layer.forward(orange, orange_num)
>>> all_price = add_apple_orange_layer.forward(apple_price, orange_price)
>>> price = mul_tax_layer.forward(all_price, tax)
>>> dall_price, dtax = mul_tax_layer.backward(1)
>>> dapple_price, dorange_price = add_apple_orange_layer.backward(dall_price)
>>> dorange, dorange_num = mul_orange_layer.backward(dorange_price)
>>> dapple, dapple_num = mul_apple_layer.backward(dapple_price)
>>> print(price)
715.0000000000001
>>> print(dapple_num, dapple, dorange, dorange_num, dtax)
110.00000000000001 2.2 3.3000000000000003 165.0 650.0

(The book prints ``650`` for ``dtax``: its nodes keep Python ints, ours compute
in float64.)
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np

from scratchnn import _checks
from scratchnn.backend import as_result, to_compute
from scratchnn.layers.base import Layer


def _sum_to_shape(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``grad`` over the axes that broadcasting added or stretched, to ``shape``.

    Why: an input that was broadcast was used once per copy, so its gradient
    is the sum of the gradients of all copies.

    >>> _sum_to_shape(np.ones((2, 3)), (3,))
    array([2., 2., 2.])
    >>> _sum_to_shape(np.ones((2, 3)), (2, 1))
    array([[3.],
           [3.]])
    """
    if grad.shape == shape:
        return grad
    leading = grad.ndim - len(shape)
    stretched = tuple(
        leading + i for i, n in enumerate(shape) if n == 1 and grad.shape[leading + i] != 1
    )
    summed = grad.sum(axis=tuple(range(leading)) + stretched, keepdims=True)
    return summed.reshape(shape)


class _BinaryNode(Layer):
    """What the × and + nodes share: the output dtype is NumPy's for ``x op y``, in which
    a Python number adapts to the array it meets (NEP 50: float32 × 1.1 stays float32)."""

    n_inputs = 2
    operation: ClassVar[np.ufunc] = np.multiply

    def __init__(self) -> None:
        super().__init__()
        self._python_numbers: tuple[object | None, object | None] = (None, None)

    def forward(self, *inputs: Any) -> Any:
        self._out_shape = None  # a failed forward must not leave the previous graph behind
        # The base turns a Python number into a 0-d float64 array; remember it as it was.
        self._python_numbers = tuple(  # type: ignore[assignment]
            v if type(v) in (bool, int, float) else None for v in inputs
        )
        if len(inputs) == 2:
            try:
                shapes = tuple(np.shape(v) for v in inputs)
            except ValueError as error:  # a ragged list: NumPy's message names no input
                raise ValueError(
                    f"{type(self).__name__}.forward: an input is not a rectangular array: {error}"
                ) from None
            try:
                np.broadcast_shapes(*shapes)
            except ValueError:
                raise ValueError(
                    f"{type(self).__name__}.forward: x of shape {shapes[0]} and y of shape "
                    f"{shapes[1]} do not broadcast together"
                ) from None
        try:
            return super().forward(*inputs)
        finally:
            self._python_numbers = (None, None)

    def _result_dtype(self, x: np.ndarray, y: np.ndarray) -> np.dtype:
        # A Python number as a Python float (bools and integers compute as floats, as
        # the base's inputs do), an array as a 0-d sample of its (prepared) dtype.
        samples: list[Any] = [
            float(number) if number is not None else np.zeros((), a.dtype)  # type: ignore[arg-type]
            for a, number in zip((x, y), self._python_numbers)
        ]
        result: np.dtype = type(self).operation(samples[0], samples[1]).dtype
        return result


class MulLayer(_BinaryNode):
    """The "×" node: ``out = x * y``, with NumPy broadcasting between x and y.

    Derivative: ``d(out)/dx = y`` and ``d(out)/dy = x``: backward "swaps" the
    inputs, ``dx = dout * y`` and ``dy = dout * x``, each summed back to its
    input's shape where broadcasting stretched it.

    Keeps ``x`` and ``y`` (private copies when the caller owns them): the
    gradient of each input is the other input.

    Shape: x and y broadcast together to the output's shape; ``dx`` has x's
    shape, ``dy`` y's. The output dtype is NumPy's promotion of the two, a
    Python number adapting to the array it meets (float32 × 1.1 is float32);
    bools and integers compute as float64, as in every layer.

    The book's apple example (two apples at 100 each, tax 1.1):

    >>> apple, apple_num, tax = 100, 2, 1.1
    >>> mul_apple_layer, mul_tax_layer = MulLayer(), MulLayer()
    >>> apple_price = mul_apple_layer.forward(apple, apple_num)
    >>> price = mul_tax_layer.forward(apple_price, tax)
    >>> print(price)
    220.00000000000003
    >>> dapple_price, dtax = mul_tax_layer.backward(1)
    >>> dapple, dapple_num = mul_apple_layer.backward(dapple_price)
    >>> print(dapple, dapple_num, dtax)
    2.2 110.00000000000001 200.0

    Broadcasting: a row vector times a matrix; its gradient sums over the rows.

    >>> mul = MulLayer()
    >>> print(mul.forward(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([10.0, 100.0])))
    [[ 10. 200.]
     [ 30. 400.]]
    >>> dx, dy = mul.backward(np.ones((2, 2)))
    >>> print(dx, dy)
    [[ 10. 100.]
     [ 10. 100.]] [4. 6.]
    """

    label = "×"

    def __init__(self) -> None:
        super().__init__()
        self.x: np.ndarray | None = None
        self.y: np.ndarray | None = None

    def _forward(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        self.x = self._keep_input(x, 0)
        self.y = self._keep_input(y, 1)
        return as_result(to_compute(x) * to_compute(y)).astype(
            self._result_dtype(x, y), copy=False
        )

    def _backward(self, dout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.x is not None and self.y is not None  # the base ran forward first
        g = to_compute(dout)
        dx = _sum_to_shape(g * to_compute(self.y), self.x.shape)
        dy = _sum_to_shape(g * to_compute(self.x), self.y.shape)
        return dx, dy


class AddLayer(_BinaryNode):
    """The "+" node: ``out = x + y``, with NumPy broadcasting between x and y.

    Derivative: ``d(out)/dx = d(out)/dy = 1``: backward passes ``dout`` on to
    both inputs unchanged, summed back to an input's shape where broadcasting
    stretched it.

    Keeps only the two input shapes: the local derivative is the constant 1.

    Shape: as :class:`MulLayer`.

    >>> add = AddLayer()
    >>> print(add.forward(np.array([[1.0, 2.0], [3.0, 4.0]]), 10.0))
    [[11. 12.]
     [13. 14.]]
    >>> dx, dy = add.backward(np.array([[1.0, 2.0], [3.0, 4.0]]))
    >>> print(dx, dy)
    [[1. 2.]
     [3. 4.]] 10.0
    """

    label = "+"
    operation = np.add

    def __init__(self) -> None:
        super().__init__()
        self._shapes: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())

    def _forward(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        self._shapes = (x.shape, y.shape)
        return as_result(to_compute(x) + to_compute(y)).astype(
            self._result_dtype(x, y), copy=False
        )

    def _backward(self, dout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        g = to_compute(dout)
        return _sum_to_shape(g, self._shapes[0]), _sum_to_shape(g, self._shapes[1])


class MulConstLayer(Layer):
    """The "×c" node, multiplication by a constant: ``out = c * x``.

    Derivative: ``d(out)/dx = c``, so ``dx = c * dout``. In the sigmoid's graph
    ``c = -1`` (the seed's step 4).

    Keeps nothing: the local derivative is the constant ``c``.

    Shape: any; the output has the input's shape and floating dtype.

    >>> neg = MulConstLayer(-1)
    >>> neg
    MulConstLayer(c=-1.0)
    >>> print(neg.forward(np.array([0.5, -2.0])))
    [-0.5  2. ]
    >>> print(neg.backward(np.array([1.0, 3.0])))
    [-1. -3.]
    """

    hyperparameters = ("c",)

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = _checks.real(type(self).__name__, "c", c)

    @property
    def label(self) -> str:
        """The node's symbol in a drawing of the graph, such as ``×-1``."""
        return f"×{self.c:g}"

    def _forward(self, x: np.ndarray) -> np.ndarray:
        return as_result(self.c * to_compute(x)).astype(x.dtype, copy=False)

    def _backward(self, dout: np.ndarray) -> np.ndarray:
        return as_result(self.c * to_compute(dout))


class AddConstLayer(Layer):
    """The "+c" node, addition of a constant: ``out = x + c``.

    Derivative: ``d(out)/dx = 1``, so ``dx = dout`` (the seed's step 2, with c = 1).

    Keeps nothing. Shape: any; the output has the input's shape and floating dtype.

    >>> AddConstLayer(1)
    AddConstLayer(c=1.0)
    >>> plus_one = AddConstLayer(1)
    >>> print(plus_one.forward(np.array([0.5, -2.0])))
    [ 1.5 -1. ]
    >>> print(plus_one.backward(np.array([1.0, 3.0])))
    [1. 3.]
    """

    hyperparameters = ("c",)

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = _checks.real(type(self).__name__, "c", c)

    @property
    def label(self) -> str:
        """The node's symbol in a drawing of the graph, such as ``+1``."""
        # copysign, not c >= 0: -0.0 is >= 0, yet its own sign already prints ("-0").
        return f"+{self.c:g}" if math.copysign(1.0, self.c) > 0 else f"{self.c:g}"

    def _forward(self, x: np.ndarray) -> np.ndarray:
        return as_result(to_compute(x) + self.c).astype(x.dtype, copy=False)

    def _backward(self, dout: np.ndarray) -> np.ndarray:
        return dout  # the base hands back a copy, never dout itself


class ExpLayer(Layer):
    """The "exp" node: ``out = exp(x)``.

    Derivative: ``d(out)/dx = exp(x) = out``, so ``dx = dout * out`` (the seed's
    step 3, where the input is ``-x`` and the factor ``exp(-x)``).

    Keeps ``out``, the output of forward (read-only): it is the derivative.

    This is the primitive node, so it overflows like ``np.exp``: an input above
    ``log(finfo.max)`` (709.78 in float64, 88.72 in float32) gives ``inf`` and
    NumPy's overflow warning. The fused :class:`scratchnn.Sigmoid` avoids that.

    Shape: any; the output has the input's shape and floating dtype.

    >>> exp = ExpLayer()
    >>> print(exp.forward(np.array([0.0, 1.0])))
    [1.         2.71828183]
    >>> print(exp.backward(np.array([1.0, 2.0])))
    [1.         5.43656366]
    >>> with np.errstate(over="ignore"):
    ...     print(ExpLayer().forward(np.array([709.0, 710.0])))
    [8.21840746e+307             inf]
    """

    label = "exp"

    def __init__(self) -> None:
        super().__init__()
        self.out: np.ndarray | None = None

    def _forward(self, x: np.ndarray) -> np.ndarray:
        self.out = self._keep_output(np.exp(to_compute(x)).astype(x.dtype, copy=False))
        return self.out

    def _backward(self, dout: np.ndarray) -> np.ndarray:
        assert self.out is not None  # the base ran forward first
        return to_compute(dout) * to_compute(self.out)


class ReciprocalLayer(Layer):
    """The "/" node: ``out = 1 / x``.

    Derivative: ``d(out)/dx = -1 / x**2 = -out**2``, so ``dx = dout * (-out**2)``
    (the seed's step 1).

    Keeps ``out``, the output of forward (read-only): the derivative needs only it.

    Shape: any; the output has the input's shape and floating dtype. ``x = 0``
    gives ``inf`` and NumPy's divide-by-zero warning, as ``1 / x`` does.

    >>> reciprocal = ReciprocalLayer()
    >>> print(reciprocal.forward(np.array([2.0, 4.0])))
    [0.5  0.25]
    >>> print(reciprocal.backward(np.array([1.0, 1.0])))
    [-0.25   -0.0625]
    """

    label = "/"

    def __init__(self) -> None:
        super().__init__()
        self.out: np.ndarray | None = None

    def _forward(self, x: np.ndarray) -> np.ndarray:
        self.out = self._keep_output(as_result(1.0 / to_compute(x)).astype(x.dtype, copy=False))
        return self.out

    def _backward(self, dout: np.ndarray) -> np.ndarray:
        assert self.out is not None  # the base ran forward first
        y = to_compute(self.out)
        return to_compute(dout) * -(y * y)
