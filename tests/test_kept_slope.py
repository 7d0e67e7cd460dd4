"""Elu, Silu and Gelu keep their slope dy/dx from forward, not a copy of x.

The kept slope is held to PyTorch's derivative (autograd with dout = 1) in
float64, and backward is dout times it; on both paths (tests/conftest.py).
The far tails are the conformance and accuracy suites' (tests/test_accuracy.py).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

import scratchnn as snn

torch = pytest.importorskip("torch", reason="PyTorch (the test oracle) is not installed")

TF = torch.nn.functional
LAYERS: dict[str, tuple[Callable[[], snn.Layer], Callable[[torch.Tensor], torch.Tensor]]] = {
    "Elu": (snn.Elu, TF.elu),
    "Elu(2)": (lambda: snn.Elu(2.0), lambda t: TF.elu(t, 2.0)),
    "Silu": (snn.Silu, TF.silu),
    "Gelu": (snn.Gelu, TF.gelu),
    "Gelu(tanh)": (lambda: snn.Gelu("tanh"), lambda t: TF.gelu(t, approximate="tanh")),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_slope_is_the_derivative_and_x_is_not_kept(name: str) -> None:
    make, torch_fn = LAYERS[name]
    rng = np.random.default_rng(3)
    x = 3 * rng.standard_normal(200)
    x = x[np.abs(x) > 1e-3]  # away from Elu's kink at 0
    layer = make()
    layer.forward(x)
    assert layer.x is None  # nothing of the caller's input is kept
    slope = layer.slope
    assert slope is not None and slope.shape == x.shape and slope.dtype == np.float64
    xt = torch.from_numpy(x).requires_grad_(True)
    torch_fn(xt).backward(torch.ones_like(xt))
    assert xt.grad is not None
    # (atol: PyTorch's Phi is (1 + erf) / 2, which cancels in Gelu's left tail)
    np.testing.assert_allclose(slope, xt.grad.numpy(), rtol=1e-12, atol=1e-14)
    dout = rng.standard_normal(x.shape)
    np.testing.assert_array_equal(layer.backward(dout), dout * slope)


@pytest.mark.parametrize("name", list(LAYERS))
def test_slope_of_float16_input_is_kept_in_float32(name: str) -> None:
    make, _ = LAYERS[name]
    layer = make()
    layer.forward(np.linspace(-3, 3, 7).astype(np.float16))
    assert layer.slope is not None and layer.slope.dtype == np.float32
    assert layer.backward(np.ones(7, np.float16)).dtype == np.float16


@pytest.mark.parametrize(
    ("make", "kept"),
    [
        (snn.Relu, "mask"),
        (snn.LeakyRelu, "mask"),
        (snn.Elu, "slope"),
        (snn.Silu, "slope"),
        (snn.Gelu, "slope"),
        (lambda: snn.Gelu("tanh"), "slope"),
    ],
    ids=["Relu", "LeakyRelu", "Elu", "Silu", "Gelu", "Gelu(tanh)"],
)
@pytest.mark.parametrize("size", [7, 1 << 19])  # the compiled kernels' and blocked sizes
def test_what_backward_reads_is_read_only_as_sigmoids_out(
    make: Callable[[], snn.Layer], kept: str, size: int
) -> None:
    # An edit of the kept mask or slope would change the next gradient without a word.
    layer = make()
    x = np.random.default_rng(3).standard_normal(size)
    layer.forward(x)
    array = getattr(layer, kept)
    with pytest.raises(ValueError, match="read-only"):
        array[0] = array[1]
    dx = layer.backward(np.ones(size))
    assert dx.flags.writeable  # what backward returns is the caller's to change
