"""``backward(dout, input_grad=False)``: the parameter gradients alone, as a first layer needs."""

from __future__ import annotations

import numpy as np

import scratchnn as snn
from scratchnn.models import mlp


def test_affine_without_input_grad_sets_the_same_parameter_gradients() -> None:
    rng = np.random.default_rng(0)
    W, b = rng.standard_normal((4, 3)), rng.standard_normal(3)
    x, dout = rng.standard_normal((5, 4)), rng.standard_normal((5, 3))
    full, params_only = snn.Affine(W, b), snn.Affine(W, b)
    full.forward(x)
    full.backward(dout)
    params_only.forward(x)
    assert params_only.backward(dout, input_grad=False) is None
    np.testing.assert_array_equal(params_only.dW, full.dW)
    np.testing.assert_array_equal(params_only.db, full.db)


def test_a_layer_without_parameters_returns_none_and_still_checks_dout() -> None:
    relu = snn.Relu()
    relu.forward(np.array([1.0, -1.0]))
    assert relu.backward(np.ones(2), input_grad=False) is None
    try:
        relu.backward(np.ones(3), input_grad=False)
    except ValueError:
        pass
    else:
        raise AssertionError("a dout of the wrong shape must raise")


def test_sequential_gradient_equals_a_full_backward() -> None:
    rng = np.random.default_rng(1)
    net = mlp([6, 5, 3], rng=rng, dtype=np.float64)
    x, t = rng.standard_normal((4, 6)), np.array([0, 1, 2, 1])
    grads = {k: v.copy() for k, v in net.gradient(x, t).items()}
    net.loss(x, t)
    dout = net.last_layer.backward(1.0)
    for layer in reversed(net.layers):
        dout = layer.backward(dout)
    for key, grad in net.grads.items():
        np.testing.assert_array_equal(grads[key], grad)
