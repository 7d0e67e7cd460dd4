"""check_layer: a learner's own layer, checked and reported.

Oracles: PyTorch autograd supplies exact gradients for layers written here,
so a right backward must pass and a backward wrong by a known factor at a
known element must be reported there with the error that factor implies;
the seed notebook's Relu (verbatim in tests/test_seed.py) is known to write
into ``dout``; book-style layers are written here as the book writes them.
"""

from __future__ import annotations

import re
import warnings
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
    assert "forward and backward leave x0 and x1 as they were" in str(report)
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

    # dW = ... where self.dW = ... belongs: the book's skeleton leaves self.dW None.
    failed = [f for f in check_layer(ForgetsdW(W, b), x).findings if not f.passed]
    assert [f.detail for f in failed] == ["no gradient for parameter W after backward"]

    class SumsdbOverTheWrongAxis(BookAffine):
        def backward(self, dout: np.ndarray) -> np.ndarray:
            dx = super().backward(dout)
            self.db = np.sum(dout, axis=1)
            return dx

    failed = [f for f in check_layer(SumsdbOverTheWrongAxis(W, b), x).findings if not f.passed]
    assert [f.detail for f in failed] == ["the gradient of b has shape (4,), b (2,)"]
    shapes = next(f for f in report.findings if f.check == "each gradient is there, with its array's shape")
    assert shapes.detail == "dx (4, 3), dW (3, 2), db (2,)"


def test_the_layer_given_is_not_changed() -> None:
    # check_layer works on a copy: parameters, gradients and caches stay the caller's.
    rng = np.random.default_rng(5)
    W, b, x = rng.standard_normal((3, 2)), np.zeros(2), rng.standard_normal((4, 3))
    layer = snn.Affine(W, b)
    W_before = W.copy()
    assert check_layer(layer, x).passed
    assert layer.dW is None and layer.x is None and layer.W is W
    assert np.array_equal(W, W_before)


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
    assert [f.detail for f in report.findings if not f.passed] == ["wrote into x"]
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
    with pytest.raises(ValueError, match="Dropout draws a new mask each forward"):
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


# -- what a learner's layer does that a check must not miss or misread --------------


class LazyAffine:
    """Affine whose dW and db first appear in backward, optionally wrong."""

    def __init__(self, W: np.ndarray, b: np.ndarray, factor: float = 1.0) -> None:
        self.W, self.b, self.factor = W, b, factor

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.x = x
        return x @ self.W + self.b

    def backward(self, dout: np.ndarray) -> np.ndarray:
        self.dW = self.factor * self.x.T @ dout
        self.db = self.factor * dout.sum(axis=0)
        return dout @ self.W.T


def test_parameters_whose_gradients_appear_only_in_backward_are_checked() -> None:
    rng = np.random.default_rng(11)
    W, b, x = rng.standard_normal((4, 3)), rng.standard_normal(3), rng.standard_normal((5, 4))
    assert set(check_layer(LazyAffine(W, b), x).gradients) == {"x", "W", "b"}
    report = check_layer(LazyAffine(W, b, factor=2.0), x)
    assert not report.passed
    assert report.gradients["W"].max_relative_error > 0.3


def test_an_array_kept_without_its_gradient_is_named_not_skipped() -> None:
    class LowerCase(LazyAffine):  # dw, not dW: W would go unchecked
        def backward(self, dout: np.ndarray) -> np.ndarray:
            dx = super().backward(dout)
            self.dw = 5 * self.dW
            del self.dW
            return dx

    rng = np.random.default_rng(12)
    report = check_layer(LowerCase(rng.standard_normal((4, 3)), np.zeros(3)), rng.standard_normal((5, 4)))
    assert report.notes == ("W has no dW: taken as constant, not checked",)
    assert "note  W has no dW: taken as constant, not checked" in str(report)


class MatMul:
    """The sequel book's style: params and grads as lists, gradients written in place."""

    def __init__(self, W: np.ndarray, factor: float = 1.0) -> None:
        self.params, self.grads, self.factor = [W], [np.zeros_like(W)], factor
        self.x: Any = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.x = x
        return x @ self.params[0]

    def backward(self, dout: np.ndarray) -> np.ndarray:
        self.grads[0][...] = self.factor * self.x.T @ dout
        return dout @ self.params[0].T


def test_the_sequels_params_and_grads_lists_are_checked() -> None:
    rng = np.random.default_rng(13)
    W, x = rng.standard_normal((4, 3)), rng.standard_normal((5, 4))
    report = check_layer(MatMul(W), x)
    assert report.passed and set(report.gradients) == {"x", "params[0]"}
    assert not check_layer(MatMul(W, factor=5.0), x).passed


def test_a_gradient_that_accumulates_is_found() -> None:
    class Accumulates(LazyAffine):
        def __init__(self, W: np.ndarray, b: np.ndarray) -> None:
            super().__init__(W, b)
            self.dW, self.db = np.zeros_like(W), np.zeros_like(b)

        def backward(self, dout: np.ndarray) -> np.ndarray:
            self.dW += self.x.T @ dout  # never reset: right once, twice its value the next time
            self.db += dout.sum(axis=0)
            return dout @ self.W.T

    rng = np.random.default_rng(14)
    layer = Accumulates(rng.standard_normal((4, 3)), np.zeros(3))
    report = check_layer(layer, rng.standard_normal((5, 4)))
    failed = [f for f in report.findings if not f.passed]
    assert [f.check for f in failed] == ["after earlier use, the gradients match a fresh layer's"]
    assert "does backward add to dW instead of setting it?" in failed[0].detail
    assert not layer.dW.any()  # the layer given was not run


def test_a_backward_that_updates_its_parameters_is_found() -> None:
    class UpdatesInBackward(LazyAffine):
        def backward(self, dout: np.ndarray) -> np.ndarray:
            dx = super().backward(dout)
            self.W -= 0.1 * self.dW
            return dx

    rng = np.random.default_rng(15)
    W = rng.standard_normal((4, 3))
    W_before = W.copy()
    report = check_layer(UpdatesInBackward(W, np.zeros(3)), rng.standard_normal((5, 4)))
    finding = next(f for f in report.findings if f.check.endswith("the parameters as they were"))
    assert not finding.passed and finding.detail == "W changed (an update belongs to the optimiser)"
    assert np.array_equal(W, W_before)


def test_a_correct_layer_passes_every_time_it_is_checked() -> None:
    class KeepsItsGradients(BookMulLayer):  # dx and dy as attributes too, as some write it
        def backward(self, dout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            self.dx, self.dy = super().backward(dout)
            return self.dx, self.dy

    layer = KeepsItsGradients()
    x, y = np.array([100.0, 150.0]), np.array([2.0, 3.0])
    layer.forward(x, y)
    layer.backward(np.ones(2))  # used before: its cached arrays are not parameters
    for _ in range(2):
        report = check_layer(layer, x, y)
        assert report.passed, str(report)
        assert set(report.gradients) == {"x0", "x1"}


def test_a_forward_that_reuses_its_output_buffer_is_checked_correctly() -> None:
    class ReusesOut:
        def __init__(self) -> None:
            self.out: Any = None

        def forward(self, x: np.ndarray) -> np.ndarray:
            if self.out is None or self.out.shape != x.shape:
                self.out = np.empty_like(x)
            np.tanh(x, out=self.out)
            return self.out

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return dout * (1 - self.out**2)

    assert check_layer(ReusesOut(), np.random.default_rng(16).standard_normal((2, 3))).passed


class BookSoftmaxWithLoss:
    """The book's SoftmaxWithLoss, whose backward takes dout=1 and ignores it."""

    def forward(self, x: np.ndarray, t: np.ndarray) -> float:
        e = np.exp(x - x.max(axis=1, keepdims=True))
        self.y, self.t = e / e.sum(axis=1, keepdims=True), t
        return float(-np.mean(np.log(self.y[np.arange(len(x)), t] + 1e-7)))

    def backward(self, dout: float = 1) -> np.ndarray:
        dx = self.y.copy()
        dx[np.arange(len(self.t)), self.t] -= 1
        return dx / len(self.t)


def test_a_loss_is_checked_with_the_books_dout_of_one() -> None:
    x, t = np.random.default_rng(17).standard_normal((4, 10)), np.array([3, 0, 9, 3])
    assert check_layer(BookSoftmaxWithLoss(), x, target=t).passed
    # Integer labels given as an input are passed as they are, not differentiated.
    report = check_layer(BookSoftmaxWithLoss(), x, t)
    assert report.passed and set(report.gradients) == {"x0"}
    assert check_layer(snn.SoftmaxWithLoss(), x, t).passed
    one_hot = np.eye(10)[t]  # float labels as an input would be differentiated: refused
    with pytest.raises(TypeError, match="second input is its labels; pass them as target=t"):
        check_layer(BookSoftmaxWithLoss(), x, one_hot)
    with pytest.raises(TypeError, match="pass them as target=t"):
        check_layer(snn.SoftmaxWithLoss(), x, one_hot)


def test_dropout_in_training_mode_is_refused_whatever_its_masks_happen_to_be() -> None:
    class Dropout:  # the book's, which has no evaluation mode of its own
        def __init__(self, ratio: float) -> None:
            self.ratio, self.rng = ratio, np.random.default_rng(0)

        def forward(self, x: np.ndarray) -> np.ndarray:
            self.mask = self.rng.random(x.shape) > self.ratio
            return x * self.mask

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return dout * self.mask

    x = np.random.default_rng(18).standard_normal((2, 3))
    for seed in range(20):  # p = 0.1 on 6 elements: two masks often agree by chance
        with pytest.raises(ValueError, match="Dropout draws a new mask"):
            check_layer(snn.Dropout(0.1, rng=np.random.default_rng(seed)), x)
    with pytest.raises(ValueError, match="Dropout draws a new mask"):
        check_layer(Dropout(0.1), x)


def test_what_backward_returns_that_is_not_a_gradient_is_named() -> None:
    class ForgetsReturn:
        def forward(self, x: np.ndarray) -> np.ndarray:
            self.out = np.tanh(x)
            return self.out

        def backward(self, dout: np.ndarray) -> None:
            dout * (1 - self.out**2)

    class ReturnsParamGradsToo(LazyAffine):
        def backward(self, dout: np.ndarray) -> Any:
            dx = super().backward(dout)
            return dx, self.dW, self.db

    class NoneForOne(BookMulLayer):
        def backward(self, dout: np.ndarray) -> Any:
            return dout * self.y, None

    rng = np.random.default_rng(19)
    x = rng.standard_normal((5, 4))

    def failures(report: Any) -> list[str]:
        return [f.detail for f in report.findings if not f.passed]

    assert failures(check_layer(ForgetsReturn(), x)) == [
        "backward returned None (a forgotten `return dx`?)"
    ]
    assert failures(check_layer(ReturnsParamGradsToo(rng.standard_normal((4, 3)), np.zeros(3)), x)) == [
        "backward returned 3 values for 1 input: return dx only (a layer keeps its "
        "parameters' gradients, dW and db, on itself)"
    ]
    assert failures(check_layer(NoneForOne(), x, x)) == ["backward returned None for x1"]


def test_seeds_and_inputs_that_are_not_numbers() -> None:
    x = np.random.default_rng(20).standard_normal((2, 3))
    assert check_layer(snn.Tanh(), x, rng=7).gradients == check_layer(
        snn.Tanh(), x, rng=np.random.default_rng(7)
    ).gradients
    with pytest.raises(TypeError, match=r"rng must be a numpy\.random\.Generator or a seed"):
        check_layer(snn.Tanh(), x, rng="seven")
    with pytest.raises(TypeError, match="x must be a NumPy array or a number, got NoneType"):
        check_layer(snn.Tanh(), None)
    with pytest.raises(TypeError, match="x must be real numbers, got dtype complex128"):
        check_layer(snn.Tanh(), np.array([1 + 5j]))
    empty = check_layer(snn.Tanh(), np.zeros((0, 3)))
    assert empty.passed and "x has no elements" in str(empty)


# -- the second round: what a rewrite of the check must also see ----------------------


def test_a_forward_that_returns_nothing_or_too_much_is_named() -> None:
    class NoReturn:
        def forward(self, x: np.ndarray) -> None:
            self.out = np.tanh(x)

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return dout * (1 - self.out**2)

    class ReturnsCache(NoReturn):
        def forward(self, x: np.ndarray) -> Any:  # type: ignore[override]
            super().forward(x)
            return self.out, x

    x = np.random.default_rng(21).standard_normal((2, 3))
    for layer, detail in [
        (NoReturn(), "forward returned None (a forgotten `return out`?)"),
        (ReturnsCache(), "forward returned a tuple of 2 values; return only the output"),
    ]:
        report = check_layer(layer, x)
        assert not report.passed and report.findings[0].detail.startswith(detail)


class SequelAffine:
    """The sequel's Affine, with its two classic slips available."""

    def __init__(self, W: np.ndarray, b: np.ndarray, slip: str = "") -> None:
        self.params, self.grads = [W, b], [np.zeros_like(W), np.zeros_like(b)]
        self.slip, self.x = slip, None

    def forward(self, x: np.ndarray) -> np.ndarray:
        W, b = self.params
        self.x = x
        return x @ W + b

    def backward(self, dout: np.ndarray) -> np.ndarray:
        W = self.params[0]
        if self.slip == "rebinds grads":
            self.grads[0] = self.x.T @ dout  # the optimiser keeps the old, zero array
        else:
            self.grads[0][...] = self.x.T @ dout
        self.grads[1][...] = dout.sum(axis=0)
        if self.slip == "updates params":
            self.params[0] = W - 0.1 * self.grads[0]
        return dout @ W.T


def test_the_sequels_slips_are_found() -> None:
    rng = np.random.default_rng(22)
    W, b, x = rng.standard_normal((5, 3)), rng.standard_normal(3), rng.standard_normal((4, 5))
    assert check_layer(SequelAffine(W, b), x).passed
    rebinds = check_layer(SequelAffine(W, b, "rebinds grads"), x)
    assert [f.detail for f in rebinds.findings if not f.passed] == [
        "backward replaced grads[0] instead of writing into it (grads[0][...] = ...; the "
        "optimiser holds the old array)"
    ]
    updates = check_layer(SequelAffine(W, b, "updates params"), x)
    assert [f.detail for f in updates.findings if not f.passed] == [
        "backward replaced params[0] (an update belongs to the optimiser)"
    ]


def test_parameters_made_in_forward_or_kept_as_floats_are_checked() -> None:
    class PRelu:
        def __init__(self, slip: float = 1.0) -> None:
            self.a, self.slip = 0.25, slip  # a float parameter beside its gradient da

        def forward(self, x: np.ndarray) -> np.ndarray:
            self.x = x
            return np.where(x > 0, x, self.a * x)

        def backward(self, dout: np.ndarray) -> np.ndarray:
            self.da = self.slip * np.sum(dout * np.minimum(self.x, 0))
            return dout * np.where(self.x > 0, 1.0, self.a)

    class MadeInForward(LazyAffine):
        def __init__(self, factor: float = 1.0) -> None:
            self.factor, self.W, self.b = factor, None, None

        def forward(self, x: np.ndarray) -> np.ndarray:
            if self.W is None:
                self.W = np.random.default_rng(0).standard_normal((x.shape[1], 2))
                self.b = np.zeros(2)
            return super().forward(x)

    x = np.random.default_rng(23).standard_normal((3, 4)) + 0.05
    assert set(check_layer(PRelu(), x).gradients) == {"x", "a"}
    assert check_layer(PRelu(), x).passed
    assert not check_layer(PRelu(slip=3.0), x).passed
    assert set(check_layer(MadeInForward(), x).gradients) == {"x", "W", "b"}
    assert not check_layer(MadeInForward(factor=3.0), x).passed


def test_writes_into_the_input_or_the_output_by_backward_are_found() -> None:
    class WritesX:
        def forward(self, x: np.ndarray) -> np.ndarray:
            self.x = x
            return np.maximum(x, 0)

        def backward(self, dout: np.ndarray) -> np.ndarray:
            self.x[...] = self.x > 0  # the caller's array, which another layer may hold
            return dout * self.x

    class WritesOut:
        def forward(self, x: np.ndarray) -> np.ndarray:
            self.out = np.tanh(x)
            return self.out

        def backward(self, dout: np.ndarray) -> np.ndarray:
            self.out *= self.out  # the output the next layer was given
            return dout * (1 - self.out)

    x = np.random.default_rng(24).standard_normal((2, 3))
    assert [f.detail for f in check_layer(WritesX(), x).findings if not f.passed] == [
        "wrote into x (by backward)"
    ]
    failed = [f.check for f in check_layer(WritesOut(), x).findings if not f.passed]
    assert "backward leaves forward's output as it was" in failed


def test_constants_state_and_inner_layers_are_notes_not_failures() -> None:
    class Scale:
        def __init__(self) -> None:
            self.scale = np.array([0.5, 2.0, -1.0])

        def forward(self, x: np.ndarray) -> np.ndarray:
            return x * self.scale

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return dout * self.scale

    x = np.random.default_rng(25).standard_normal((2, 3))
    report = check_layer(Scale(), x)
    assert report.passed and report.notes == ("scale has no dscale: taken as constant, not checked",)
    rng = np.random.default_rng(26)
    chain = snn.Chain([snn.Affine(rng.standard_normal((3, 2)), np.zeros(2)), snn.Tanh()])
    report = check_layer(chain, x)
    assert report.passed
    assert report.notes == ("nodes holds layers: their parameters are not checked here; check each alone",)
    bn = snn.BatchNorm(3, dtype=np.float64)  # running statistics, written in place: no note
    assert check_layer(bn, x).notes == ()


def test_integer_inputs_are_indices_not_differentiated() -> None:
    class Embedding:  # the sequel's
        def __init__(self, W: np.ndarray) -> None:
            self.params, self.grads, self.idx = [W], [np.zeros_like(W)], None

        def forward(self, idx: np.ndarray) -> np.ndarray:
            self.idx = idx
            return self.params[0][idx]

        def backward(self, dout: np.ndarray) -> None:
            dW = self.grads[0]
            dW[...] = 0
            np.add.at(dW, self.idx, dout)  # dW[self.idx] = dout would lose the repeated 3

    W = np.random.default_rng(27).standard_normal((7, 3))
    report = check_layer(Embedding(W), np.array([0, 3, 3, 6]))
    assert report.passed and set(report.gradients) == {"params[0]"}
    assert report.notes == ("x is taken as indices, labels or a mask: not differentiated",)
    # Integers the layer takes as numbers (typed as np.array([[1, 2, 3]])) are differentiated.
    assert set(check_layer(snn.Relu(), np.array([[1, -2], [3, 4]])).gradients) == {"x"}

    class WrongAffine(LazyAffine):  # dx with W where W.T belongs: W is square, so no shape error
        def backward(self, dout: np.ndarray) -> np.ndarray:
            super().backward(dout)
            return dout @ self.W

    square = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    wrong = check_layer(WrongAffine(square, np.zeros(3)), np.array([[1, 2, 3], [4, 5, 6]]))
    assert not wrong.passed and "x" in wrong.gradients
    with pytest.raises(ValueError, match="nothing to differentiate"):
        check_layer(snn.Relu(), np.array([[True, False]]))


def test_forward_keywords_reach_forward_and_advice_follows_them() -> None:
    class BookDropout:
        def __init__(self) -> None:
            self.rng = np.random.default_rng(0)

        def forward(self, x: np.ndarray, train_flg: bool = True) -> np.ndarray:
            self.mask = self.rng.random(x.shape) > 0.5 if train_flg else np.ones(x.shape, bool)
            return x * self.mask

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return dout * self.mask

    x = np.random.default_rng(28).standard_normal((2, 3))
    with pytest.raises(ValueError, match="check by hand that backward multiplies dout by the mask"):
        check_layer(BookDropout(), x)
    assert check_layer(BookDropout(), x, forward_kwargs={"train_flg": False}).passed


def test_state_that_forward_changes_and_a_backward_without_dout_are_named() -> None:
    class Decays(LazyAffine):
        def forward(self, x: np.ndarray) -> np.ndarray:
            self.W *= 0.999
            return super().forward(x)

    class NoDout:
        def forward(self, x: np.ndarray) -> np.ndarray:
            return x * 2

        def backward(self) -> np.ndarray:
            return np.full(3, 2.0)

    rng = np.random.default_rng(29)
    x = rng.standard_normal((2, 3))
    with pytest.raises(ValueError, match=r"forward changes what the layer keeps \(W\)"):
        check_layer(Decays(rng.standard_normal((3, 2)), np.zeros(2)), x)
    with pytest.raises(TypeError, match="backward must take the upstream gradient dout"):
        check_layer(NoDout(), x)


def test_a_cache_filled_once_is_found() -> None:
    class StaleMask:
        def __init__(self) -> None:
            self.mask: Any = None

        def forward(self, x: np.ndarray) -> np.ndarray:
            if self.mask is None:  # right for the first batch only
                self.mask = x <= 0
            return np.where(self.mask, 0.0, x)

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return np.where(self.mask, 0.0, dout)

    report = check_layer(StaleMask(), np.random.default_rng(30).standard_normal((2, 3)))
    assert [f.detail for f in report.findings if not f.passed] == [
        "dx differs (a cache that forward fills once and not again?)"
    ]
    # Inputs of one sign keep it in any shuffle, and so did the stale mask: it passed. The
    # same values with their signs turned find it.
    for x in (np.random.default_rng(31).random((3, 4)) + 0.1, np.array([0.7]), -np.ones(3)):
        report = check_layer(StaleMask(), x)
        assert [f.detail for f in report.findings if not f.passed] == [
            "dx differs (a cache that forward fills once and not again?)"
        ], x


def test_inputs_of_one_sign_turned_only_where_the_layer_takes_them() -> None:
    # A log takes positive inputs only: their signs turned, it would warn and give NaN, so
    # that comparison is left out and the layer passes, as the right layer it is.
    class Log:
        def forward(self, x: np.ndarray) -> np.ndarray:
            self.x = x
            return np.log(x)

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return dout / self.x

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_layer(Log(), np.random.default_rng(32).random((3, 4)) + 0.5).passed
        assert check_layer(snn.Relu(), np.random.default_rng(33).random((3, 4)) + 0.1).passed


def test_elements_on_a_kink_are_skipped_and_named() -> None:
    # Ties in a max-pool window (zeros, as after a ReLU): the slopes from either side
    # differ, so no derivative exists there to compare.
    x = np.array([[[[0.3, 0.8, 0.0, 0.0], [0.9, 0.4, 0.0, 0.0],
                    [0.4, 0.2, 0.1, 0.5], [0.0, 0.7, 0.6, 0.2]]]])
    report = check_layer(snn.MaxPool2d(2), x)
    assert report.passed
    assert "4 on or within the step of a kink skipped (x[0, 0, 0, 2], x[0, 0, 0, 3], x[0, 0, 1, 2], ...:" in str(report)
    assert report.gradients["x"].checked == 12
    on_kinks = check_layer(snn.Relu(), np.zeros(3))
    assert not on_kinks.passed and "every element checked sits on or within the step of a kink" in str(on_kinks)


def test_numpy_seeds_and_a_module_kept_on_the_layer() -> None:
    class KeepsXp:
        def __init__(self) -> None:
            self.xp = np  # the book's GPU-ready layers keep their array module

        def forward(self, x: np.ndarray) -> np.ndarray:
            self.out = self.xp.tanh(x)
            return self.out

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return dout * (1 - self.out**2)

    x = np.random.default_rng(31).standard_normal((2, 3))
    assert check_layer(KeepsXp(), x, rng=np.int64(3)).passed


# -- the third round -------------------------------------------------------------------


def test_zeros_after_a_relu_are_kinks_not_failures() -> None:
    rng = np.random.default_rng(32)
    x = np.maximum(0.0, rng.standard_normal((64, 100)))  # half exact zeros, as after a ReLU
    report = check_layer(snn.Relu(), x, max_per_array=500)
    assert report.passed, str(report)
    pooled = np.maximum(0.0, rng.standard_normal((20, 8, 12, 12)))
    assert check_layer(snn.MaxPool2d(2), pooled, max_per_array=1000, rng=1).passed


def test_curvature_is_not_a_kink() -> None:
    # At a perfect prediction MSE's slopes from either side differ in sign: curvature,
    # which halves with the step, not a kink. Near 1/x's pole the plain difference is
    # off by h^2/x^2; the extrapolated one is not.
    t = np.array([[0, 0, 1, 0, 0, 0, 0, 0, 0, 0.0]])
    perfect = check_layer(snn.MeanSquaredError(), t.copy(), target=t)
    assert perfect.passed and "kink" not in str(perfect)
    for v in (0.002, 0.0005):
        report = check_layer(snn.ReciprocalLayer(), np.array([[v, 0.5]]))
        assert report.passed and "kink" not in str(report), str(report)


def test_a_scalar_output_that_is_not_a_loss_gets_a_random_dout() -> None:
    class ForgetsDout:  # the apple example's MulLayer, with dout forgotten
        def forward(self, x: float, y: float) -> float:
            self.x, self.y = x, y
            return x * y

        def backward(self, dout: float) -> tuple[float, float]:
            return self.y, self.x

    assert not check_layer(ForgetsDout(), 100.0, 2.0).passed
    assert check_layer(BookMulLayer(), np.array(100.0), np.array(2.0)).passed


def test_weights_drawn_at_the_first_forward_are_not_a_stale_cache() -> None:
    class Dense:
        def __init__(self) -> None:
            self.W: Any = None

        def forward(self, x: np.ndarray) -> np.ndarray:
            if self.W is None:
                self.W = 0.1 * np.random.default_rng().standard_normal((x.shape[1], 3))  # unseeded
            self.x = x
            return x @ self.W

        def backward(self, dout: np.ndarray) -> np.ndarray:
            self.dW = self.x.T @ dout
            return dout @ self.W.T

    report = check_layer(Dense(), np.random.default_rng(33).standard_normal((5, 4)))
    assert report.passed, str(report)


def test_a_parameter_reshaped_in_forward_is_named_as_unchecked() -> None:
    class ReshapesGamma:
        def __init__(self) -> None:
            self.gamma = np.array([1.0, 2.0, 3.0])

        def forward(self, x: np.ndarray) -> np.ndarray:
            self.gamma = self.gamma.reshape(1, 3)
            self.x = x
            return x * self.gamma

        def backward(self, dout: np.ndarray) -> np.ndarray:
            self.dgamma = 2 * np.sum(dout * self.x, axis=0)  # wrong, and cannot be checked
            return dout * self.gamma

    report = check_layer(ReshapesGamma(), np.random.default_rng(34).standard_normal((2, 3)))
    assert report.notes == (
        "gamma rebound by each forward, so not checked as a parameter: right for a state such "
        "as the sequel's h; a parameter reshaped in forward should stay as it is, reshaped "
        "into a local variable",
    )


def test_inner_layers_sharing_their_arrays_through_params_are_not_noted() -> None:
    class Outer:  # the sequel's composite layers: the inner layer's arrays are in params
        def __init__(self, W: np.ndarray) -> None:
            self.inner = MatMul(W)
            self.params, self.grads = self.inner.params, self.inner.grads

        def forward(self, x: np.ndarray) -> np.ndarray:
            return self.inner.forward(x)

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return self.inner.backward(dout)

    rng = np.random.default_rng(35)
    report = check_layer(Outer(rng.standard_normal((4, 3))), rng.standard_normal((2, 4)))
    assert report.passed and report.notes == ()


def test_messages_for_tuples_and_labels() -> None:
    class OneTuple:
        def forward(self, x: np.ndarray) -> np.ndarray:
            return 2 * x

        def backward(self, dout: np.ndarray) -> tuple[np.ndarray]:
            return (2 * dout,)

    class MeanSquared:
        def forward(self, y: np.ndarray, y_true: np.ndarray) -> float:
            self.y, self.y_true = y, y_true
            return float(0.5 * np.sum((y - y_true) ** 2))

        def backward(self, dout: float = 1) -> np.ndarray:
            return dout * (self.y - self.y_true)

    x = np.random.default_rng(36).standard_normal((2, 3))
    assert [f.detail for f in check_layer(OneTuple(), x).findings if not f.passed] == [
        "backward returned a tuple (dx,): return dx itself"
    ]
    with pytest.raises(TypeError, match="second input is its labels; pass them as target=t"):
        check_layer(MeanSquared(), x, np.eye(3)[[0, 2]])


# -- the fourth round ------------------------------------------------------------------


def test_book_style_arrays_beside_declared_params_are_checked() -> None:
    class EmptyParamsAffine(LazyAffine):  # the sequel's boilerplate kept, W and b book-style
        def __init__(self, W: np.ndarray, b: np.ndarray, factor: float = 1.0) -> None:
            super().__init__(W, b, factor)
            self.params, self.grads = [], []

    class MatMulBias(MatMul):  # a bias added book-style to the sequel's MatMul
        def __init__(self, W: np.ndarray, b: np.ndarray, slip: float = 1.0) -> None:
            super().__init__(W)
            self.b, self.slip = b, slip

        def forward(self, x: np.ndarray) -> np.ndarray:
            return super().forward(x) + self.b

        def backward(self, dout: np.ndarray) -> np.ndarray:
            self.db = self.slip * dout.sum(axis=0)
            return super().backward(dout)

    rng = np.random.default_rng(37)
    W, b, x = rng.standard_normal((4, 3)), rng.standard_normal(3), rng.standard_normal((5, 4))
    assert set(check_layer(EmptyParamsAffine(W, b), x).gradients) == {"x", "W", "b"}
    assert not check_layer(EmptyParamsAffine(W, b, factor=2.0), x).passed
    report = check_layer(MatMulBias(W, b), x)
    assert report.passed and set(report.gradients) == {"x", "params[0]", "b"}
    assert not check_layer(MatMulBias(W, b, slip=0.0), x).passed


def test_inputs_within_the_step_of_a_kink_or_near_a_pole_pass() -> None:
    x = np.random.default_rng(38).standard_normal((8, 10)) * 1e-3
    x[0, 0], x[0, 1] = -3.4e-6, 6.1e-6  # within h = 1e-5 of ReLU's kink
    assert check_layer(snn.Relu(), x).passed
    assert check_layer(snn.ReciprocalLayer(), np.array([1e-4, -3e-4, 0.5])).passed


def test_rounding_noise_is_that_of_the_outputs_an_element_moves() -> None:
    class NoDx(LazyAffine):
        def backward(self, dout: np.ndarray) -> np.ndarray:
            super().backward(dout)
            return np.zeros_like(self.x)  # a learner's dx left at zero

    class NodW(LazyAffine):
        def backward(self, dout: np.ndarray) -> np.ndarray:
            dx = super().backward(dout)
            self.dW = np.zeros_like(self.W)
            return dx

    rng = np.random.default_rng(39)
    W, b = rng.standard_normal((100, 100)), rng.standard_normal(100)
    assert not check_layer(NoDx(W, b), 1e6 * rng.standard_normal((50, 100)), max_per_array=50).passed
    small = 1e-8 * rng.standard_normal((50, 100))
    assert not check_layer(NodW(W, 0.1 * np.ones(100)), small, max_per_array=50).passed


def test_index_inputs_the_layer_rounds_and_int_scores_with_int_labels() -> None:
    class RoundingEmbedding:
        def __init__(self, W: np.ndarray) -> None:
            self.params, self.grads = [W], [np.zeros_like(W)]

        def forward(self, idx: np.ndarray) -> np.ndarray:
            self.idx = idx.astype(int)  # floats work too: moving them changes nothing
            return self.params[0][self.idx]

        def backward(self, dout: np.ndarray) -> None:
            self.grads[0][...] = 0
            np.add.at(self.grads[0], self.idx, dout)

    report = check_layer(RoundingEmbedding(np.ones((5, 2))), np.array([0, 2, 2]))
    assert report.passed and set(report.gradients) == {"params[0]"}
    scores = np.array([[1, 2, 0], [0, 3, 1]])  # typed as integers, taken as numbers
    report = check_layer(snn.SoftmaxWithLoss(), scores, np.array([2, 1]))
    assert report.passed and set(report.gradients) == {"x0"}


def test_the_random_scalar_dout_is_shown_where_a_gradient_fails() -> None:
    class HalfSquares:  # a loss without labels, whose backward ignores dout as the book's do
        def forward(self, x: np.ndarray) -> float:
            self.x = x
            return float(0.5 * np.sum(x**2))

        def backward(self, dout: float = 1) -> np.ndarray:
            return self.x

    report = check_layer(HalfSquares(), np.random.default_rng(40).standard_normal((2, 2)))
    assert not report.passed
    assert "with dout = " in report.findings[0].detail
    assert "give dout=1 if this is a loss" in report.findings[0].detail
    assert check_layer(HalfSquares(), np.ones((2, 2)), dout=1.0).passed


def test_float32_scalars_and_float_hyperparameters() -> None:
    class Float32Loss:
        def forward(self, x: np.ndarray) -> np.float32:
            self.x = x
            return np.float32(np.sum(x**2))

        def backward(self, dout: float = 1) -> np.ndarray:
            return 2 * dout * self.x

    class LooksUpItsSlope:  # a float hyperparameter used as a dict key stays a float
        def __init__(self) -> None:
            self.alpha = 0.1

        def forward(self, x: np.ndarray) -> np.ndarray:
            self.x = x
            return np.where(x > 0, x, {0.1: 0.1, 0.2: 0.2}[self.alpha] * x)

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return np.where(self.x > 0, dout, self.alpha * dout)

    x = np.random.default_rng(41).standard_normal((2, 3))
    with pytest.raises(ValueError, match="forward's output is float32; the check needs float64 outputs"):
        check_layer(Float32Loss(), x)
    assert check_layer(LooksUpItsSlope(), x).passed


# -- the fifth round -------------------------------------------------------------------


def test_confident_losses_pass_where_a_change_is_below_an_ulp_of_the_loss() -> None:
    # At large logits a gradient of 1e-10 moves the loss by less than half an ulp: the
    # difference is exactly zero, and the rounding floor must still cover it.
    for seed in range(6):
        rng = np.random.default_rng(seed)
        logits, t = 30 * rng.standard_normal((32, 10)), rng.integers(0, 10, 32)
        assert check_layer(snn.SoftmaxWithLoss(), logits, target=t).passed
        scores, t01 = 100 * rng.standard_normal((8, 3)), rng.integers(0, 2, (8, 3)).astype(float)
        assert check_layer(snn.SigmoidWithLoss(), scores, target=t01).passed


def test_nan_outputs_and_inputs_beyond_the_step_are_named_as_such() -> None:
    class Log:
        def forward(self, x: np.ndarray) -> np.ndarray:
            self.x = x
            with np.errstate(invalid="ignore"):
                return np.log(x)

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return dout / self.x

    report = check_layer(Log(), np.array([[0.5, -1.0], [2.0, 3.0]]))
    assert not report.passed and "numerical nan" in report.findings[0].detail
    assert "kink" not in str(report)
    with pytest.raises(ValueError, match=r"h = 1e-05 is below the resolution .* give a larger h"):
        check_layer(snn.MulConstLayer(2.0), np.array([2e11, 1.0]))


def test_inputs_a_fifth_of_the_step_from_a_kink_are_compared() -> None:
    for d in (1e-6, 1.9e-6, 5e-6):
        report = check_layer(snn.Relu(), np.array([d, -d, 1.0]))
        assert report.passed and report.gradients["x"].checked == 3, str(report)


def test_a_module_beside_a_float_and_negative_indices() -> None:
    class LeakyXp:
        def __init__(self) -> None:
            self.xp, self.alpha = np, 0.01

        def forward(self, x: np.ndarray) -> np.ndarray:
            self.x = x
            return self.xp.where(x > 0, x, self.alpha * x)

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return self.xp.where(self.x > 0, dout, self.alpha * dout)

    class TruncatingEmbedding:
        def __init__(self) -> None:
            self.params, self.grads = [np.arange(12.0).reshape(6, 2)], [np.zeros((6, 2))]

        def forward(self, idx: np.ndarray) -> np.ndarray:
            self.idx = idx.astype(int)  # truncates toward zero: -3.25 is -3
            return self.params[0][self.idx]

        def backward(self, dout: np.ndarray) -> None:
            self.grads[0][...] = 0
            np.add.at(self.grads[0], self.idx, dout)

    x = np.random.default_rng(42).standard_normal((2, 3))
    assert check_layer(LeakyXp(), x).passed
    report = check_layer(TruncatingEmbedding(), np.array([0, -1, -3, 2]))
    assert report.passed and set(report.gradients) == {"params[0]"}


# -- the sixth round -------------------------------------------------------------------


def test_a_dout_drawn_like_the_learners_x_would_hide_a_forgotten_dout() -> None:
    class ForgetsDout:  # returns the mask times out: right only where dout is x itself
        def forward(self, x: np.ndarray) -> np.ndarray:
            self.out = np.maximum(x, 0.0)
            return self.out

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return self.out

    x = np.random.default_rng(0).standard_normal((3, 4))  # the exercises' own first draw
    assert not check_layer(ForgetsDout(), x).passed
    assert not check_layer(ForgetsDout(), x, rng=0).passed  # even given that very seed


def test_one_over_x_passes_near_its_pole_and_large_inputs_show_small_slips() -> None:
    for seed in range(5):
        x = 1e-4 * np.random.default_rng(seed).standard_normal((4, 8))
        x = np.where(np.abs(x) < 2e-5, 2e-5, x)  # more than h from the pole
        assert check_layer(snn.ReciprocalLayer(), x).passed

    class ForgetsAlpha:  # LeakyRelu whose backward forgets alpha
        def forward(self, x: np.ndarray) -> np.ndarray:
            self.x = x
            return np.where(x > 0, x, 0.01 * x)

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return np.where(self.x > 0, dout, 0.0)

    big = 1e7 * np.random.default_rng(43).standard_normal((32, 100))
    assert not check_layer(ForgetsAlpha(), big, max_per_array=200).passed


def test_near_a_pole_an_error_of_a_ten_thousandth_is_found() -> None:
    class SlightlyWrongReciprocal:  # 1/x, its gradient 1.0001 times the truth at one element
        def forward(self, x: np.ndarray) -> np.ndarray:
            self.x = x
            return 1.0 / x

        def backward(self, dout: np.ndarray) -> np.ndarray:
            dx = -dout / self.x**2
            dx[1, 2] *= 1.0001
            return dx

    for seed in range(5):
        x = np.random.default_rng(seed).uniform(0.5, 2.0, (2, 4))
        x[1, 2] = 1.3e-4  # the plain difference errs by (h/x)**2 = 6e-3 here
        assert not check_layer(SlightlyWrongReciprocal(), x).passed
        assert check_layer(snn.ReciprocalLayer(), x).passed


# -- several outputs (the sequel's LSTM) -------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


class SequelLSTM:
    """One LSTM step written as the sequel writes its layers: ``params`` and ``grads``
    lists, ``forward(x, h_prev, c_prev) -> h_next, c_next`` and
    ``backward(dh_next, dc_next) -> dx, dh_prev, dc_prev``; gates f, g, i, o in that
    order along the columns of Wx, Wh and b. ``slip`` names a mistake to make."""

    def __init__(self, Wx: np.ndarray, Wh: np.ndarray, b: np.ndarray, slip: str = "") -> None:
        self.params = [Wx, Wh, b]
        self.grads = [np.zeros_like(Wx), np.zeros_like(Wh), np.zeros_like(b)]
        self.slip = slip

    def forward(
        self, x: np.ndarray, h_prev: np.ndarray, c_prev: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        Wx, Wh, b = self.params
        H = h_prev.shape[1]
        A = x @ Wx + h_prev @ Wh + b
        f, g = _sigmoid(A[:, :H]), np.tanh(A[:, H : 2 * H])
        i, o = _sigmoid(A[:, 2 * H : 3 * H]), _sigmoid(A[:, 3 * H :])
        c_next = f * c_prev + g * i
        h_next = o * np.tanh(c_next)
        self.cache = (x, h_prev, c_prev, f, g, i, o, c_next)
        return h_next, c_next

    def backward(
        self, dh_next: np.ndarray, dc_next: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x, h_prev, c_prev, f, g, i, o, c_next = self.cache
        # The slip reuses forward's returned c_next as tanh's buffer.
        tanh_c = np.tanh(c_next, out=c_next if self.slip == "writes into c_next" else None)
        if self.slip == "writes into dh_next":
            dh_next *= o
            ds = dc_next + dh_next * (1 - tanh_c**2)
        elif self.slip == "forgets dc_next":
            ds = dh_next * o * (1 - tanh_c**2)
        else:
            ds = dc_next + dh_next * o * (1 - tanh_c**2)
        dA = np.hstack((
            ds * c_prev * f * (1 - f),
            ds * i * (1 - g**2),
            ds * g * i * (1 - i),
            dh_next * tanh_c * o * (1 - o),
        ))
        Wx, Wh, _ = self.params
        self.grads[0][...] = x.T @ dA
        self.grads[1][...] = h_prev.T @ dA
        self.grads[2][...] = dA.sum(axis=0)
        return dA @ Wx.T, dA @ Wh.T, ds * f


def _lstm_case(seed: int, slip: str = "") -> tuple[SequelLSTM, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    N, D, H = 3, 4, 2
    layer = SequelLSTM(
        rng.standard_normal((D, 4 * H)), rng.standard_normal((H, 4 * H)),
        rng.standard_normal(4 * H), slip,
    )  # fmt: skip
    inputs = [rng.standard_normal((N, D)), rng.standard_normal((N, H)), rng.standard_normal((N, H))]
    return layer, inputs


def _torch_lstm_gradients(
    layer: SequelLSTM, inputs: list[np.ndarray], dh: np.ndarray, dc: np.ndarray
) -> list[np.ndarray]:
    """The gradients of sum(h * dh + c * dc) in x, h_prev, c_prev, Wx, Wh, b by autograd."""
    leaves = [torch.tensor(a, requires_grad=True) for a in (*inputs, *layer.params)]
    x, h_prev, c_prev, Wx, Wh, b = leaves
    H = h_prev.shape[1]
    A = x @ Wx + h_prev @ Wh + b
    f, g = torch.sigmoid(A[:, :H]), torch.tanh(A[:, H : 2 * H])
    i, o = torch.sigmoid(A[:, 2 * H : 3 * H]), torch.sigmoid(A[:, 3 * H :])
    c = f * c_prev + g * i
    h = o * torch.tanh(c)
    grads = torch.autograd.grad((h, c), leaves, (torch.tensor(dh), torch.tensor(dc)))
    return [grad.numpy() for grad in grads]


def test_the_sequels_lstm_with_two_outputs_passes_and_matches_pytorch() -> None:
    layer, inputs = _lstm_case(50)
    report = check_layer(layer, *inputs)
    assert report.passed, str(report)
    assert set(report.gradients) == {"x0", "x1", "x2", "params[0]", "params[1]", "params[2]"}
    assert all(result.max_relative_error < 1e-7 for result in report.gradients.values())
    titles = [finding.check for finding in report.findings]
    assert "backward leaves dh_next and dc_next as they were" in titles
    assert "backward leaves forward's outputs as they were" in titles
    # The layer's own backward (the oracle for check_layer's verdict) agrees with
    # autograd for a dout of each output.
    rng = np.random.default_rng(51)
    dh, dc = rng.standard_normal((3, 2)), rng.standard_normal((3, 2))
    layer.forward(*inputs)
    ours = [*layer.backward(dh.copy(), dc.copy()), *layer.grads]
    for mine, theirs in zip(ours, _torch_lstm_gradients(layer, inputs, dh, dc)):
        np.testing.assert_allclose(mine, theirs, rtol=1e-12, atol=1e-12)


def test_a_backward_that_forgets_one_outputs_gradient_fails() -> None:
    layer, inputs = _lstm_case(52, slip="forgets dc_next")
    report = check_layer(layer, *inputs)
    failed = {f.check for f in report.findings if not f.passed}
    # dc_next reaches every input and parameter but h_prev's and the output gate's
    # own path, so dc_prev, dx and dWx are all wrong.
    assert {"dx0 matches central differences", "dx2 matches central differences",
            "dparams[0] matches central differences"} <= failed  # fmt: skip
    assert "backward leaves dh_next and dc_next as they were" not in failed


def test_a_backward_that_writes_into_one_of_its_douts_is_named() -> None:
    layer, inputs = _lstm_case(53, slip="writes into dh_next")
    report = check_layer(layer, *inputs)
    (written,) = [f for f in report.findings if f.check.startswith("backward leaves dh_next")]
    assert not written.passed
    assert written.detail == "it wrote into dh_next (6 of 6 elements changed)"


def test_a_backward_that_writes_into_one_of_forwards_outputs_is_named() -> None:
    layer, inputs = _lstm_case(57, slip="writes into c_next")
    report = check_layer(layer, *inputs)
    assert [f.check for f in report.findings if not f.passed] == [
        "backward leaves forward's outputs as they were"
    ]


def test_several_outputs_of_different_shapes_are_joined_and_split() -> None:
    class ValueAndTotal:  # y = x**2 and s = sum(x): a 0-d output beside a matrix
        def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            self.x = x
            return x**2, np.sum(x)

        def backward(self, dy: np.ndarray, ds: np.ndarray) -> np.ndarray:
            return 2 * self.x * dy + ds

    class SwapsThem(ValueAndTotal):  # takes its douts in the wrong order
        def backward(self, dy: np.ndarray, ds: np.ndarray) -> np.ndarray:
            return 2 * self.x * np.mean(ds) + dy

    x = np.random.default_rng(54).standard_normal((2, 3))
    assert check_layer(ValueAndTotal(), x).passed
    assert not check_layer(SwapsThem(), x).passed
    dout = (np.random.default_rng(55).standard_normal((2, 3)), np.array(0.7))
    assert check_layer(ValueAndTotal(), x, dout=dout).passed
    with pytest.raises(TypeError, match=r"2 outputs; give dout as a tuple of 2 arrays \(dy, ds\)"):
        check_layer(ValueAndTotal(), x, dout=dout[0])
    with pytest.raises(ValueError, match=r"ds has shape \(2,\), its output \(\)"):
        check_layer(ValueAndTotal(), x, dout=(dout[0], np.ones(2)))


def test_a_backward_taking_two_douts_needs_two_outputs() -> None:
    class OneOutput:
        def forward(self, x: np.ndarray) -> np.ndarray:
            return 2 * x

        def backward(self, dh: np.ndarray, dc: np.ndarray) -> np.ndarray:
            return 2 * dh

    class ThreeOutputs(OneOutput):
        def forward(self, x: np.ndarray) -> Any:
            return 2 * x, x, x

    x = np.random.default_rng(56).standard_normal((2, 3))
    for layer, got in ((OneOutput(), "one output"), (ThreeOutputs(), "a tuple of 3 values")):
        report = check_layer(layer, x)
        assert [f.detail for f in report.findings] == [
            f"backward takes 2 upstream gradients (dh, dc), one per output, but forward returned {got}"
        ]


def test_how_many_outputs_is_settled_by_forward_as_far_as_backward_takes_them() -> None:
    class Cell:  # y = tanh(x), z = x**2
        def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            self.x = x
            return np.tanh(x), x**2

        def backward(self, dh: np.ndarray, dc: Any = None) -> np.ndarray:
            return dh * (1 - np.tanh(self.x) ** 2) + 2 * self.x * dc

    class StarCell(Cell):
        def backward(self, *douts: np.ndarray) -> np.ndarray:  # type: ignore[override]
            return super().backward(*douts)

    class KeywordCell(Cell):
        def backward(self, dh: np.ndarray, *, dc: np.ndarray) -> np.ndarray:  # type: ignore[override]
            return super().backward(dh, dc)

    class ForgetsC(Cell):
        def forward(self, x: np.ndarray) -> Any:
            self.x = x
            return np.tanh(x), None

    class ForgetsDcPrev(SequelLSTM):
        def backward(self, dh_next: np.ndarray, dc_next: np.ndarray) -> Any:
            return super().backward(dh_next, dc_next)[:2]

    x = np.random.default_rng(58).standard_normal((2, 3))
    assert check_layer(Cell(), x).passed
    report = check_layer(StarCell(), x)
    assert report.passed and "backward leaves douts[0] and douts[1] as they were" in str(report)
    with pytest.raises(TypeError, match="backward takes dc by keyword only"):
        check_layer(KeywordCell(), x)
    assert [f.detail for f in check_layer(ForgetsC(), x).findings] == [
        "forward's output 2 of 2 (for dc) is None (a forgotten value?)"
    ]
    layer, inputs = _lstm_case(59)
    short = ForgetsDcPrev(*layer.params)
    assert [f.detail for f in check_layer(short, *inputs).findings if not f.passed] == [
        "backward returned 2 gradients for 3 inputs"  # no labels hint: c_prev is a state
    ]


def test_random_scalar_douts_of_several_outputs_are_shown_with_a_failure() -> None:
    class Moments:  # the mean and the mean square, two scalars
        def forward(self, x: np.ndarray) -> tuple[float, float]:
            self.x = x
            return float(np.mean(x)), float(np.mean(x**2))

        def backward(self, dmean: float, dsquare: float) -> np.ndarray:
            return (1 + 2 * self.x) / self.x.size  # forgets both douts

    report = check_layer(Moments(), np.random.default_rng(60).standard_normal((2, 3)))
    (failed,) = [f for f in report.findings if not f.passed]
    assert re.search(r"with dmean = -?\d\.\d+, dsquare = -?\d\.\d+ \(random: scalar outputs\)$", failed.detail)
