"""The registry of layers that join the conformance suite, and the oracles they are held to.

Adding a single-input layer to the suite costs one line in ``CASES``: a name, a
factory for a fresh layer, and the PyTorch function it must agree with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import scratchnn as snn

torch = pytest.importorskip("torch", reason="PyTorch (the test oracle) is not installed")
TF = torch.nn.functional


@dataclass(frozen=True)
class Case:
    """One layer in the suite.

    ``kinks`` are inputs where the derivative is undefined; test inputs are kept
    away from them. ``keeps_int`` marks layers that keep integer dtypes.
    """

    name: str
    make: Callable[[], Any]
    torch_fn: Callable[[Any], Any]
    kinks: tuple[float, ...] = ()
    keeps_int: bool = False
    scale: float = 3.0
    # Absolute slack, in units of the dtype's epsilon, in comparisons with
    # PyTorch for layers where PyTorch's own formula is the less accurate one
    # (those layers are held to mpmath in test_accuracy.py instead).
    torch_atol_eps: float = 0.0
    # False for primitive nodes that overflow by design (exp, 1/x).
    finite_everywhere: bool = True

    def torch_atol(self, dtype: Any) -> float:
        return self.torch_atol_eps * float(np.finfo(dtype).eps)

    def __str__(self) -> str:
        return self.name


CASES: list[Case] = [
    Case("Relu", snn.Relu, torch.relu, kinks=(0.0,), keeps_int=True),
    Case("Relu(packed)", lambda: snn.Relu(packed=True), torch.relu, kinks=(0.0,), keeps_int=True),
    Case("Sigmoid", snn.Sigmoid, torch.sigmoid),
    Case("Tanh", snn.Tanh, torch.tanh),
    Case("LeakyRelu", snn.LeakyRelu, lambda t: TF.leaky_relu(t, 0.01), kinks=(0.0,)),
    Case(
        "LeakyRelu(0.2)", lambda: snn.LeakyRelu(0.2), lambda t: TF.leaky_relu(t, 0.2), kinks=(0.0,)
    ),
    Case("LeakyRelu(0)", lambda: snn.LeakyRelu(0.0), lambda t: TF.leaky_relu(t, 0.0), kinks=(0.0,)),
    Case("Elu", snn.Elu, TF.elu, kinks=(0.0,)),
    Case("Elu(0.5)", lambda: snn.Elu(0.5), lambda t: TF.elu(t, 0.5), kinks=(0.0,)),
    # PyTorch computes Phi(x) as (1 + erf(x/sqrt 2))/2, which cancels in the left
    # tail (absolute error ~1e-16); ours uses erfc and is held to mpmath instead.
    Case("Gelu", snn.Gelu, TF.gelu, torch_atol_eps=8),
    # PyTorch's tanh form also cancels in 1 + tanh(u); ours is x * sigmoid(2u).
    Case(
        "Gelu(tanh)",
        lambda: snn.Gelu("tanh"),
        lambda t: TF.gelu(t, approximate="tanh"),
        torch_atol_eps=8,
    ),
    # PyTorch's softplus switches to y = x above beta*x > 20; its logaddexp is
    # the same function without that cut-off, which is what ours computes.
    Case("Softplus", snn.Softplus, lambda t: torch.logaddexp(t, torch.zeros_like(t))),
    Case(
        "Softplus(2)",
        lambda: snn.Softplus(2.0),
        lambda t: torch.logaddexp(2 * t, torch.zeros_like(t)) / 2,
    ),
    Case("Silu", snn.Silu, TF.silu),
    Case("Softmax", snn.Softmax, lambda t: torch.softmax(t, dim=-1)),
    Case("Softmax(axis=0)", lambda: snn.Softmax(axis=0), lambda t: torch.softmax(t, dim=0)),
    Case("Identity", snn.Identity, lambda t: t * 1),
    # The seed's computational-graph nodes. exp and 1/x are the primitive nodes
    # whose overflow the fused Sigmoid exists to avoid, so they are exempt from
    # the range-ends test (tests/test_graph.py shows where they break).
    Case("MulConstLayer(-1)", lambda: snn.MulConstLayer(-1.0), lambda t: t * -1.0),
    Case("AddConstLayer(1)", lambda: snn.AddConstLayer(1.0), lambda t: t + 1.0),
    Case("ExpLayer", snn.ExpLayer, torch.exp, finite_everywhere=False),
    Case(
        "ReciprocalLayer",
        snn.ReciprocalLayer,
        torch.reciprocal,
        kinks=(0.0,),
        scale=1.0,
        finite_everywhere=False,
    ),
]

FLOAT_DTYPES = [np.float16, np.float32, np.float64]
TORCH_DTYPE = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
}


def away_from_kinks(x: np.ndarray, kinks: tuple[float, ...], margin: float = 1e-2) -> np.ndarray:
    """Move entries of ``x`` that lie within ``margin`` of a kink to ``margin`` away."""
    for k in kinks:
        x = np.where(np.abs(x - k) < margin, k + np.where(x >= k, margin, -margin), x)
    return np.asarray(x)


def random_input(case: Case, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    return away_from_kinks(case.scale * rng.standard_normal(shape), case.kinks)


def torch_forward_backward(
    case: Case, x: np.ndarray, dout: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Output and input gradient from PyTorch autograd, in ``x``'s dtype."""
    xt = torch.tensor(x, dtype=TORCH_DTYPE[x.dtype], requires_grad=True)
    yt = case.torch_fn(xt)
    yt.backward(torch.tensor(dout, dtype=TORCH_DTYPE[x.dtype]))
    assert xt.grad is not None
    return yt.detach().numpy(), xt.grad.numpy()


def numerical_gradient(
    f: Callable[[np.ndarray], float], x: np.ndarray, h: float = 1e-6
) -> np.ndarray:
    """Central differences of a scalar function, element by element, in float64."""
    grad = np.zeros_like(x, dtype=np.float64)
    flat_x, flat_grad = x.reshape(-1), grad.reshape(-1)
    for i in range(flat_x.size):
        saved = flat_x[i]
        flat_x[i] = saved + h
        upper = f(x)
        flat_x[i] = saved - h
        lower = f(x)
        flat_x[i] = saved
        flat_grad[i] = (upper - lower) / (2 * h)
    return grad


def float_extremes(dtype: type) -> np.ndarray:
    """Finite values at the ends of a float dtype's range, subnormals and signed zeros."""
    info = np.finfo(dtype)
    values = [
        info.max, -info.max, info.max / 2, -info.max / 2,
        info.smallest_normal, -info.smallest_normal,
        info.smallest_subnormal, -info.smallest_subnormal,
        0.0, -0.0, 1.0, -1.0, 20.0, -20.0, 50.0, -50.0,
        88.7, -88.7, 709.0, -709.0, 745.0, -745.0, 1e4, -1e4,
    ]  # fmt: skip
    with np.errstate(over="ignore"):
        array = np.array(values, dtype=np.float64).astype(dtype)
    return array[np.isfinite(array)]
