"""check_layer: a learner's own layer, checked and reported.

Oracles: PyTorch autograd supplies exact gradients for layers written here,
so a right backward must pass and a backward wrong by a known factor at a
known element must be reported there with the error that factor implies;
the seed notebook's Relu (verbatim in tests/test_seed.py) is known to write
into ``dout``; book-style layers are written here as the book writes them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from test_seed import SeedRelu, SeedSigmoid

import scratchnn as snn
from scratchnn import check_layer

torch = pytest.importorskip("torch", reason="PyTorch (the test oracle) is not installed")

FUNCTIONS = {
    "tanh": torch.tanh,
    "softplus": torch.nn.functional.softplus,
    "x*sigmoid(x)": lambda t: t * torch.sigmoid(t),
    "softmax": lambda t: torch.softmax(t, dim=-1),
}


class AutogradLayer:
    """A layer whose backward is PyTorch autograd's, optionally wrong by ``factor`` at ``index``."""

    def __init__(self, fn: Any, factor: float = 1.0, index: tuple[int, ...] = (0, 0)) -> None:
        self.fn, self.factor, self.index = fn, factor, index
        self.x: Any = None
        self.out: Any = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.x = torch.tensor(x, dtype=torch.float64, requires_grad=True)
        self.out = self.fn(self.x)
        return self.out.detach().numpy().copy()

    def backward(self, dout: np.ndarray) -> np.ndarray:
        (dx,) = torch.autograd.grad(self.out, self.x, torch.tensor(dout))
        dx = dx.numpy().copy()
        dx[self.index] *= self.factor
        return dx


@pytest.mark.parametrize("name", FUNCTIONS)
def test_an_exact_backward_passes(name: str) -> None:
    x = np.random.default_rng(1).standard_normal((3, 4))
    report = check_layer(AutogradLayer(FUNCTIONS[name]), x)
    assert report.passed, str(report)
    assert report.gradients["x"].max_relative_error < 1e-8
    assert report.gradients["x"].checked == 12


@pytest.mark.parametrize("name", FUNCTIONS)
def test_a_backward_wrong_at_one_element_is_found_there(name: str) -> None:
    x = np.random.default_rng(2).standard_normal((3, 4))
    report = check_layer(AutogradLayer(FUNCTIONS[name], factor=1.001, index=(2, 1)), x)
    worst = report.gradients["x"]
    assert not report.passed
    assert worst.index == (2, 1)
    # |a(1+d) - a| / (|a(1+d)| + |a|) = d / (2 + d)
    assert worst.max_relative_error == pytest.approx(0.001 / 2.001, rel=1e-4)
    assert "FAIL  dx matches central differences" in str(report)


class SoftmaxAsIfElementwise:
    """A learner's slip: Softmax's backward taken as y(1 - y), as for a sigmoid."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        self.out = e / e.sum(axis=-1, keepdims=True)
        return self.out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        return dout * self.out * (1 - self.out)


def test_softmax_taken_as_elementwise_is_caught() -> None:
    x = np.random.default_rng(10).standard_normal((4, 5))
    report = check_layer(SoftmaxAsIfElementwise(), x)
    assert not report.passed and report.gradients["x"].max_relative_error > 0.1
    assert check_layer(snn.Softmax(), x).passed


def test_a_nan_gradient_fails() -> None:
    report = check_layer(AutogradLayer(torch.tanh, factor=float("nan")), np.ones((2, 2)))
    assert not report.passed and np.isnan(report.gradients["x"].max_relative_error)


def test_the_seeds_relu_is_caught_writing_into_dout() -> None:
    x = np.array([[1.0, -0.5], [-2.0, 3.0], [0.25, -0.75]])
    report = check_layer(SeedRelu(), x)
    finding = next(f for f in report.findings if f.check == "backward leaves dout as it was")
    assert not finding.passed and not report.passed
    assert finding.detail == "it wrote into dout (3 of 6 elements changed)"  # the 3 with x <= 0
    assert report.gradients["x"].max_relative_error < 1e-8  # its gradient itself is right
    assert check_layer(snn.Relu(), x).passed
    assert check_layer(SeedSigmoid(), x).passed


class BookMulLayer:
    """The book's MulLayer, with the classic slip available: dx and dy exchanged."""

    def __init__(self, swapped: bool = False) -> None:
        self.swapped = swapped
        self.x: Any = None
        self.y: Any = None

    def forward(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        self.x, self.y = x, y
        return x * y

    def backward(self, dout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dx, dy = dout * self.y, dout * self.x
        return (dy, dx) if self.swapped else (dx, dy)


def test_two_inputs_each_checked_and_a_swap_found() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal(5), rng.standard_normal(5)
    assert check_layer(BookMulLayer(), x, y).passed
    report = check_layer(BookMulLayer(swapped=True), x, y)
    assert not report.passed
    assert report.gradients["x0"].max_relative_error > 1e-2
    assert report.gradients["x1"].max_relative_error > 1e-2
    assert "forward leaves x0 and x1 as they were" in str(report)
    assert check_layer(snn.MulLayer(), x, y).passed


class BookAffine:
    """An Affine written as the book writes it: W, b and, after backward, dW, db."""

    def __init__(self, W: np.ndarray, b: np.ndarray, db_slip: float = 1.0) -> None:
        self.W, self.b, self.db_slip = W, b, db_slip
        self.x: Any = None
        self.dW: Any = None
        self.db: Any = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.x = x
        return x @ self.W + self.b

    def backward(self, dout: np.ndarray) -> np.ndarray:
        self.dW = self.x.T @ dout
        self.db = np.sum(dout, axis=0) * self.db_slip
        return dout @ self.W.T


def test_book_style_parameters_are_found_checked_and_put_back() -> None:
    rng = np.random.default_rng(4)
    W, b, x = rng.standard_normal((3, 2)), rng.standard_normal(2), rng.standard_normal((4, 3))
    W_before, b_before = W.copy(), b.copy()
    report = check_layer(BookAffine(W, b), x)
    assert report.passed, str(report)
    assert set(report.gradients) == {"x", "W", "b"}
    assert report.gradients["W"].checked == 6 and report.gradients["b"].checked == 2
    assert np.array_equal(W, W_before) and np.array_equal(b, b_before)  # bit for bit
    wrong = check_layer(BookAffine(W, b, db_slip=2.0), x)
    assert [f.check for f in wrong.findings if not f.passed] == ["db matches central differences"]

    class ForgetsdW(BookAffine):
        def backward(self, dout: np.ndarray) -> np.ndarray:
            dx = super().backward(dout)
            self.dW = None
            return dx

    failed = [f for f in check_layer(ForgetsdW(W, b), x).findings if not f.passed]
    assert [f.detail for f in failed] == ["no gradient for parameter W after backward"]

    class SumsdbOverTheWrongAxis(BookAffine):
        def backward(self, dout: np.ndarray) -> np.ndarray:
            dx = super().backward(dout)
            self.db = np.sum(dout, axis=1)
            return dx

    failed = [f for f in check_layer(SumsdbOverTheWrongAxis(W, b), x).findings if not f.passed]
    assert [f.detail for f in failed] == ["the gradient of b has shape (4,), b (2,)"]
    shapes = next(f for f in report.findings if f.check == "each gradient has its array's shape")
    assert shapes.detail == "dx (4, 3), dW (3, 2), db (2,)"


def test_the_layer_is_left_at_the_point_checked() -> None:
    rng = np.random.default_rng(5)
    W, b, x = rng.standard_normal((3, 2)), np.zeros(2), rng.standard_normal((4, 3))
    layer = snn.Affine(W, b)
    dout = rng.standard_normal((4, 2))
    check_layer(layer, x, dout=dout)
    np.testing.assert_array_equal(layer.dW, x.T @ dout)


def test_running_statistics_end_as_they_were() -> None:
    layer = snn.BatchNorm(3, dtype=np.float64)
    x = np.random.default_rng(6).standard_normal((5, 3))
    layer.forward(x)  # running statistics away from their start
    mean, var = layer.running_mean.copy(), layer.running_var.copy()
    assert check_layer(layer, x).passed
    assert np.array_equal(layer.running_mean, mean) and np.array_equal(layer.running_var, var)


class WritesIntoInput:
    def forward(self, x: np.ndarray) -> np.ndarray:
        np.tanh(x, out=x)
        self.out = x
        return x

    def backward(self, dout: np.ndarray) -> np.ndarray:
        return dout * (1 - self.out**2)


class WrongShape:
    def forward(self, x: np.ndarray) -> np.ndarray:
        return x * 2

    def backward(self, dout: np.ndarray) -> np.ndarray:
        return np.sum(dout, axis=0) * 2


def test_input_written_and_wrong_shapes_are_reported() -> None:
    x = np.random.default_rng(7).standard_normal((3, 2))
    report = check_layer(WritesIntoInput(), x)
    assert [f.detail for f in report.findings if not f.passed] == ["it wrote into its input"]
    report = check_layer(WrongShape(), x)
    failed = [f for f in report.findings if not f.passed]
    assert len(failed) == 1 and failed[0].detail == "dx has shape (2,), x (3, 2)"
    assert report.gradients == {}  # nothing to compare element by element


def test_a_loss_layer_takes_its_labels_as_target() -> None:
    x = np.random.default_rng(8).standard_normal((4, 3))
    t = np.array([0, 2, 1, 2])
    report = check_layer(snn.SoftmaxWithLoss(), x, target=t)
    assert report.passed and set(report.gradients) == {"x"}


def test_max_per_array_samples_that_many_elements() -> None:
    x = np.random.default_rng(9).standard_normal((10, 10))
    report = check_layer(snn.Tanh(), x, max_per_array=7)
    assert report.gradients["x"].checked == 7


def test_arguments_it_cannot_check_are_refused() -> None:
    x = np.ones((2, 2))
    with pytest.raises(TypeError, match="forward and backward methods; got int"):
        check_layer(3, x)
    with pytest.raises(TypeError, match="give the layer's input"):
        check_layer(snn.Tanh())
    with pytest.raises(ValueError, match="must be finite"):
        check_layer(snn.Tanh(), np.array([1.0, np.inf]))
    with pytest.raises(ValueError, match="Dropout in training mode"):
        check_layer(snn.Dropout(0.5, rng=np.random.default_rng(0)), x)
    dropout = snn.Dropout(0.5, rng=np.random.default_rng(0))
    dropout.training = False
    assert check_layer(dropout, x).passed
    with pytest.raises(ValueError, match="parameter W is float32; build the layer in float64"):
        check_layer(snn.Affine(np.ones((2, 2), np.float32), np.zeros(2, np.float32)), x)
    with pytest.raises(ValueError, match=r"dout has shape \(3,\), the layer's output \(2, 2\)"):
        check_layer(snn.Tanh(), x, dout=np.ones(3))
    with pytest.raises(ValueError, match="h must be positive"):
        check_layer(snn.Tanh(), x, h=0.0)
    with pytest.raises(TypeError, match="x must be a NumPy array or a number, got str"):
        check_layer(snn.Tanh(), "1.0")
