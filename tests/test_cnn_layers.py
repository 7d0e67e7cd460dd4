"""The conformance suite of the layers with their own shapes: Conv2d, MaxPool2d, AvgPool2d, Flatten, BatchNorm.

Each case is held to the contract of ``tests/test_conformance.py``: forward,
input and parameter gradients against PyTorch in float64, float64 central
differences, float32 and float16 kept, no mutation, the errors. What each
layer has of its own lives in test_conv_pool.py, test_batchnorm.py and
test_dropout.py; whole networks in test_cnn_networks.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from conformance import TORCH_DTYPE, numerical_gradient

import scratchnn as snn

torch = pytest.importorskip("torch", reason="PyTorch (the test oracle) is not installed")
TF = torch.nn.functional


def conv(c_in: int, c_out: int, k: Any, s: Any = 1, p: Any = 0) -> Callable[[Any], snn.Conv2d]:
    def make(dtype: Any) -> snn.Conv2d:
        layer = snn.Conv2d(c_in, c_out, k, s, p, rng=np.random.default_rng(10), dtype=dtype)
        layer.b[...] = np.random.default_rng(11).standard_normal(c_out)  # zeros would test nothing
        return layer

    return make


def batchnorm(c: int, training: bool = True) -> Callable[[Any], snn.BatchNorm]:
    def make(dtype: Any) -> snn.BatchNorm:
        rng = np.random.default_rng(12)
        layer = snn.BatchNorm(c, dtype=dtype)
        layer.gamma[...] = rng.uniform(0.5, 2.0, c)
        layer.beta[...] = rng.standard_normal(c)
        layer.running_mean[...] = rng.standard_normal(c)
        layer.running_var[...] = rng.uniform(0.5, 2.0, c)
        layer.training = training
        return layer

    return make


def torch_batchnorm(layer: snn.BatchNorm, x: Any, p: dict[str, Any]) -> Any:
    mean = torch.tensor(layer.running_mean, dtype=x.dtype)  # fresh copies: torch updates them
    var = torch.tensor(layer.running_var, dtype=x.dtype)
    return TF.batch_norm(x, mean, var, p["gamma"], p["beta"], layer.training, 0.1, 1e-5)


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Any], Any]  # dtype -> a fresh layer
    torch_fn: Callable[[Any, Any, dict[str, Any]], Any]  # (layer, x, params as tensors) -> y
    shape: tuple[int, ...]
    bad_shapes: tuple[tuple[int, ...], ...]

    def __str__(self) -> str:
        return self.name


def conv_fn(layer: snn.Conv2d, x: Any, p: dict[str, Any]) -> Any:
    return TF.conv2d(x, p["W"], p["b"], stride=layer.stride, padding=layer.padding)


CASES = [
    Case("Conv2d(3,4,3,p1)", conv(3, 4, 3, 1, 1), conv_fn, (2, 3, 6, 5), ((2, 4, 6, 5), (3, 6, 5))),
    Case(
        "Conv2d(2,3,(3,2),s(2,1),p(1,0))",
        conv(2, 3, (3, 2), (2, 1), (1, 0)),
        conv_fn,
        (3, 2, 7, 6),
        ((3, 1, 7, 6), (3, 2, 1, 1)),
    ),
    Case("Conv2d(1,2,5,s3,p2)", conv(1, 2, 5, 3, 2), conv_fn, (2, 1, 9, 8), ((2, 1, 9),)),
    # 72 inputs per window, at least PER_IMAGE_BELOW: one product over the batch, not per image
    Case("Conv2d(8,3,3,p1)", conv(8, 3, 3, 1, 1), conv_fn, (2, 8, 5, 4), ((2, 3, 5, 4),)),
    Case(
        "MaxPool2d(2)",
        lambda dtype: snn.MaxPool2d(2),
        lambda layer, x, p: TF.max_pool2d(x, 2),
        (2, 3, 6, 7),
        ((3, 6, 7), (2, 3, 1, 1)),
    ),
    Case(
        "MaxPool2d(3,2,1)",
        lambda dtype: snn.MaxPool2d(3, 2, 1),
        lambda layer, x, p: TF.max_pool2d(x, 3, 2, 1),
        (2, 2, 7, 6),
        ((7, 6),),
    ),
    Case(
        "AvgPool2d(2)",
        lambda dtype: snn.AvgPool2d(2),
        lambda layer, x, p: TF.avg_pool2d(x, 2),
        (2, 3, 6, 7),
        ((2, 3, 6),),
    ),
    Case(
        "AvgPool2d((3,2),(1,2),(1,0))",
        lambda dtype: snn.AvgPool2d((3, 2), (1, 2), (1, 0)),
        lambda layer, x, p: TF.avg_pool2d(x, (3, 2), (1, 2), (1, 0)),
        (2, 2, 5, 6),
        ((2, 2, 5, 1),),
    ),
    Case(
        "Flatten",
        lambda dtype: snn.Flatten(),
        lambda layer, x, p: torch.flatten(x, 1),
        (3, 2, 4, 5),
        ((),),
    ),
    Case(
        "BatchNorm2d(train)",
        batchnorm(3),
        torch_batchnorm,
        (4, 3, 3, 2),
        ((4, 2, 3, 2), (4, 3, 3)),
    ),
    Case("BatchNorm1d(train)", batchnorm(5), torch_batchnorm, (6, 5), ((6, 4), (5,))),
    Case(
        "BatchNorm2d(eval)",
        batchnorm(3, training=False),
        torch_batchnorm,
        (4, 3, 3, 2),
        ((4, 3, 2, 3, 1),),
    ),
    Case("BatchNorm1d(eval)", batchnorm(5, training=False), torch_batchnorm, (6, 5), ((6, 3),)),
]
pytestmark = pytest.mark.parametrize("case", CASES, ids=str)


def params_of(layer: Any) -> dict[str, np.ndarray]:
    return dict(getattr(layer, "params", {}))


def torch_run(
    case: Case, layer: Any, x: np.ndarray, dout: np.ndarray
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """PyTorch's output, input gradient and parameter gradients for the layer's own parameters."""
    dtype = TORCH_DTYPE[x.dtype]
    xt = torch.tensor(x, dtype=dtype, requires_grad=True)
    pt = {
        k: torch.tensor(v.astype(x.dtype), dtype=dtype, requires_grad=True)
        for k, v in params_of(layer).items()
    }
    yt = case.torch_fn(layer, xt, pt)
    yt.backward(torch.tensor(dout, dtype=dtype))
    assert xt.grad is not None
    grads = {k: v.grad.numpy() for k, v in pt.items() if v.grad is not None}
    return yt.detach().numpy(), xt.grad.numpy(), grads


def test_matches_torch_float64(case: Case) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(case.shape)
    layer = case.make(np.float64)
    out = layer.forward(x)
    dout = rng.standard_normal(out.shape)
    dx = layer.backward(dout)
    want_out, want_dx, want_grads = torch_run(case, case.make(np.float64), x, dout)
    np.testing.assert_allclose(out, want_out, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-10, atol=1e-13)
    assert set(want_grads) == set(params_of(layer))
    for name, want in want_grads.items():
        np.testing.assert_allclose(layer.grads[name], want, rtol=1e-10, atol=1e-13, err_msg=name)


@pytest.mark.parametrize(("dtype", "rtol"), [(np.float32, 1e-4), (np.float16, 2e-2)])
def test_lower_precision_dtypes_are_kept_and_close_to_torch(
    case: Case, dtype: Any, rtol: float
) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(case.shape).astype(dtype)
    layer = case.make(dtype)
    out = layer.forward(x)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx = layer.backward(np.asarray(dout, dtype=np.float64))  # a float64 dout must not promote
    assert out.dtype == dtype and dx.dtype == dtype
    for name, grad in getattr(layer, "grads", {}).items():
        assert grad.dtype == layer.params[name].dtype == dtype, name
    # the oracle in float64 from the same rounded inputs and parameters
    want_out, want_dx, _ = torch_run(case, case.make(dtype), x.astype(np.float64), dout)
    scale = max(1.0, float(np.abs(want_out).max()))
    np.testing.assert_allclose(out.astype(np.float64), want_out, rtol=rtol, atol=rtol * scale)
    scale = max(1.0, float(np.abs(want_dx).max()))
    np.testing.assert_allclose(dx.astype(np.float64), want_dx, rtol=rtol, atol=rtol * scale)


def test_numerical_gradients_of_input_and_parameters(case: Case) -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal(case.shape)
    layer = case.make(np.float64)
    dout = rng.standard_normal(layer.forward(x).shape)
    dx = layer.backward(dout)
    grads = {k: v.copy() for k, v in layer.grads.items()} if params_of(layer) else {}

    def loss(values: np.ndarray) -> float:
        probe = case.make(np.float64)
        for name, array in params_of(layer).items():
            probe.params[name][...] = array  # the perturbed parameters, in a fresh layer
        return float(np.sum(probe.forward(values) * dout))

    np.testing.assert_allclose(dx, numerical_gradient(loss, x.copy()), rtol=1e-6, atol=1e-8)
    for name, array in params_of(layer).items():
        numeric = numerical_gradient(lambda _: loss(x), array)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-6, atol=1e-8, err_msg=name)


def test_no_mutation_and_backward_is_repeatable(case: Case) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal(case.shape)
    layer = case.make(np.float64)
    x_before = x.copy()
    out = layer.forward(x)
    dout = rng.standard_normal(out.shape)
    dout_before = dout.copy()
    dx = layer.backward(dout)
    np.testing.assert_array_equal(x, x_before)
    np.testing.assert_array_equal(dout, dout_before)
    assert not np.shares_memory(dx, dout) and not np.shares_memory(dx, x)
    np.testing.assert_array_equal(layer.backward(dout), dx)
    x[...] = 99.0  # the caller reuses its input buffer and edits the output: backward holds
    try:
        out[...] = -7.0
    except ValueError as error:  # a view of the input (Flatten) is handed out read-only
        assert "read-only" in str(error)
    np.testing.assert_array_equal(layer.backward(dout), dx)


def test_backward_before_forward_raises(case: Case) -> None:
    layer = case.make(np.float64)
    with pytest.raises(RuntimeError, match=type(layer).__name__):
        layer.backward(np.ones(case.shape))


def test_wrong_shapes_name_the_layer_and_both_shapes(case: Case) -> None:
    layer = case.make(np.float64)
    name = type(layer).__name__
    for bad in case.bad_shapes:
        expected = rf"^{name}: expected .*\(batch.*got {re.escape(str(bad))}"
        with pytest.raises(ValueError, match=expected):
            layer.forward(np.ones(bad))
    out = layer.forward(np.ones(case.shape))
    with pytest.raises(ValueError, match=rf"{name}.*{re.escape(str(out.shape))}"):
        layer.backward(np.ones((*out.shape, 1)))
