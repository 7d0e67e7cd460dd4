"""The element-wise functions of scratchnn.functional at the edges of their input.

Oracles: the same function on the native-order float64 array, PyTorch, and
mpmath (in test_accuracy.py). Runs on both kernel paths (tests/conftest.py).
"""

from __future__ import annotations

from typing import Any

import fake_cupy
import numpy as np
import pytest

import scratchnn as snn
import scratchnn.functional as F
from scratchnn.backend import compute_dtype_of, float_dtype_of, to_compute

torch = pytest.importorskip("torch", reason="PyTorch (the test oracle) is not installed")

FUNCTIONS = [F.sigmoid, F.softplus, F.erfc]
VALUES = np.array([-40.0, -3.0, -1.0, -0.3, -0.0, 0.0, 0.3, 1.0, 12.0, 40.0])


@pytest.mark.parametrize("function", FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [">f8", ">f4", ">f2"])
def test_big_endian_input_gives_the_values_of_native_input(function: Any, dtype: str) -> None:
    big = VALUES.astype(dtype)
    native = big.astype(big.dtype.newbyteorder("="))
    np.testing.assert_array_equal(function(big), function(native))


@pytest.mark.parametrize("dtype", [">f8", ">f4", ">f2", ">i4"])
def test_the_dtype_rules_read_big_endian_dtypes_as_their_native_twins(dtype: str) -> None:
    big = np.dtype(dtype)
    native = big.newbyteorder("=")
    assert float_dtype_of(big) == float_dtype_of(native)
    assert compute_dtype_of(big) == compute_dtype_of(native)
    assert to_compute(VALUES.astype(big)).dtype == compute_dtype_of(native)


def test_a_ragged_list_is_named_as_the_layers_input() -> None:
    with pytest.raises(ValueError, match="Relu: input is not a rectangular array"):
        snn.Relu().forward([[1.0, 2.0], [3.0]])


@pytest.mark.parametrize("function", FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int64, np.bool_])
def test_integer_and_bool_input_is_computed_in_float64(function: Any, dtype: Any) -> None:
    x = np.array([0, 1, 3, 100, 127], dtype=np.int64)
    if dtype is np.int8:
        x = np.array([-128, -3, 0, 3, 127])
    x = x.astype(dtype)
    y = function(x)
    assert y.dtype == np.float64
    np.testing.assert_array_equal(y, function(x.astype(np.float64)))


@pytest.mark.parametrize("function", FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "bad", [np.array([1 + 2j]), np.array(["a"]), np.array([1.0], dtype=np.longdouble)], ids=str
)
def test_unsupported_dtypes_raise_type_error(function: Any, bad: np.ndarray) -> None:
    with pytest.raises(TypeError, match=f"{function.__name__}: unsupported input dtype"):
        function(bad)


def test_softplus_layer_float16_gradient_is_right_far_left() -> None:
    # From the float16 output the slope 1 - exp(-y) keeps few digits once y < 6e-5
    # (x < -10): 44 % off at x = -17 with dout = 1000 (a loss-scaled gradient).
    x = np.arange(0, 1 << 16, dtype=np.uint16).view(np.float16)
    x = x[np.isfinite(x) & (x > -30) & (x < 30)]
    layer = snn.Softplus()
    layer.forward(x)
    dout = np.full(x.shape, 1000, np.float16)
    got = layer.backward(dout)
    want = torch.sigmoid(torch.as_tensor(x.astype(np.float64))).numpy() * 1000
    assert got.dtype == np.float16
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-7)


def test_softplus_float16_is_the_rounded_float64_value() -> None:
    x = np.arange(0, 1 << 16, dtype=np.uint16).view(np.float16)
    x = x[np.isfinite(x)]
    with np.errstate(over="raise", invalid="raise"):
        y = F.softplus(x)
    assert y.dtype == np.float16
    want = torch.nn.functional.softplus(torch.as_tensor(x.astype(np.float64))).numpy()
    np.testing.assert_array_equal(y, want.astype(np.float16))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_into_functions_may_write_over_their_input(dtype: Any) -> None:
    z = np.random.default_rng(1).uniform(-6, 6, 1000).astype(dtype)
    for into, function in [(F.sigmoid_into, F.sigmoid), (F.erfc_into, F.erfc)]:
        expected = function(z)
        in_place = z.copy()
        into(in_place, in_place)
        np.testing.assert_array_equal(in_place, expected, err_msg=into.__name__)


@pytest.mark.parametrize("function", FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [np.int64, np.float16])
def test_on_the_device_integers_and_float16_as_on_the_host(
    function: Any, dtype: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = fake_cupy.install(monkeypatch)
    x = (VALUES[VALUES >= 0] if dtype is np.int64 else VALUES).astype(dtype)
    y = function(fake.asarray(x))
    assert type(y) is fake.ndarray and y.dtype == function(x).dtype
    # erfc on the device is CuPy's own (here math.erfc), not Cody's: an ulp apart.
    np.testing.assert_allclose(y.get(), function(x), rtol=4e-16)


def test_sigmoid_layer_in_float16_is_the_functional_sigmoid() -> None:
    x = np.arange(0, 1 << 16, dtype=np.uint16).view(np.float16)
    x = x[np.isfinite(x)]
    np.testing.assert_array_equal(snn.Sigmoid().forward(x), F.sigmoid(x))


@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_of_rows_with_infinities_and_nan_matches_torch(axis: int) -> None:
    # Where test_conformance's non-finite test keeps Softmax to a finite input: rows holding +-inf or NaN, one
    # at a time and together, along either axis, forward and backward.
    x = np.array([[0.0, 1.0, 2.0], [np.inf, 0, 1], [-np.inf, 0, 1], [np.nan, 0, 1],
                  [-np.inf, -np.inf, 0], [np.inf, np.inf, 0], [-np.inf, -np.inf, -np.inf],
                  [1e308, -1e308, 0]])  # fmt: skip
    x = x if axis == -1 else x.T.copy()
    dout = np.linspace(0.5, 1.5, x.size).reshape(x.shape)
    layer = snn.Softmax(axis=axis)
    with np.errstate(invalid="ignore", over="ignore"):
        out, dx = layer.forward(x), layer.backward(dout)
    xt = torch.tensor(x, requires_grad=True)
    torch.softmax(xt, dim=axis).backward(torch.tensor(dout))
    want = torch.softmax(torch.tensor(x), dim=axis).numpy()
    np.testing.assert_allclose(out, want, rtol=1e-15, atol=1e-15)  # NaN exactly where torch's
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-13, atol=1e-16)


@pytest.mark.parametrize("size", [64, 70_000])  # one block, and the two-thread kernel
@pytest.mark.parametrize("shift", [1, -1])
def test_sigmoid_into_an_output_that_overlaps_its_input(size: int, shift: int) -> None:
    # out = z shifted by one element: the compiled pass read values it had written
    # (errors of 0.44); the NumPy path did not. Now both read z first.
    buffer = np.linspace(-5.0, 5.0, size + 1)
    z, out = (buffer[:-1], buffer[1:]) if shift == 1 else (buffer[1:], buffer[:-1])
    want = 1.0 / (1.0 + np.exp(-z.copy()))
    F.sigmoid_into(z, out)
    np.testing.assert_allclose(out, want, rtol=1e-14)
