"""docs/from-the-book.md: each silent difference from the book's code, as the page says.

Oracle: the book's formulas (``common/layers.py``, ``common/optimizer.py``),
written out here from the book's text in a few lines each; scratchnn's own
conventions are tested against PyTorch elsewhere. Each test shows the
difference, and that the page's conversion gives the book's numbers.
"""

from __future__ import annotations

import numpy as np
import pytest

import scratchnn as snn
from scratchnn.optim import SGD, Adam, Momentum, Nesterov


def test_batchnorm_momentum_is_the_complement_of_the_books() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 3)) + 4.0
    book_running_mean = 0.9 * np.zeros(3) + (1 - 0.9) * x.mean(axis=0)  # momentum=0.9
    as_ported, converted = (snn.BatchNorm(3, momentum=m, dtype=np.float64) for m in (0.9, 0.1))
    for layer in (as_ported, converted):
        layer.forward(x)
    np.testing.assert_allclose(converted.running_mean, book_running_mean, rtol=1e-12)
    assert not np.allclose(as_ported.running_mean, book_running_mean, rtol=0.5)
    assert converted.eps == 1e-5 and np.array_equal(snn.BatchNorm(3).running_var, np.ones(3))


def test_maxpool_2_2_strides_by_its_window_where_the_books_pooling_2_2_strides_by_one() -> None:
    x = np.random.default_rng(1).standard_normal((1, 1, 4, 4))
    windows = np.lib.stride_tricks.sliding_window_view(x, (2, 2), axis=(2, 3))
    book_pooling_2_2 = windows.max(axis=(-2, -1))  # stride 1: 3x3
    assert snn.MaxPool2d(2, 2).forward(x).shape == (1, 1, 2, 2) != book_pooling_2_2.shape
    np.testing.assert_array_equal(snn.MaxPool2d(2, stride=1).forward(x), book_pooling_2_2)
    np.testing.assert_array_equal(snn.MaxPool2d(2).forward(x), book_pooling_2_2[:, :, ::2, ::2])


def test_dropout_is_inverted() -> None:
    x = np.ones((4, 8))
    layer = snn.Dropout(0.5, rng=np.random.default_rng(2))
    out = layer.forward(x)
    np.testing.assert_array_equal(out, x * layer.mask / 0.5)  # the book's: x * mask
    layer.training = False
    np.testing.assert_array_equal(layer.forward(x), x)  # the book's: x * (1 - 0.5)


def test_softmax_with_loss_takes_no_1e_7() -> None:
    x = np.array([[0.0, 12.0]])  # the right class 0 has probability 6e-6
    t = np.array([0])
    y = np.exp(x - x.max()) / np.exp(x - x.max()).sum()
    book = -np.log(y[0, 0] + 1e-7)
    ours = snn.SoftmaxWithLoss().forward(x, t)
    assert ours == pytest.approx(-np.log(y[0, 0]), rel=1e-12)
    assert abs(ours - book) == pytest.approx(np.log1p(1e-7 / y[0, 0]), rel=1e-6)  # about 1e-7/y


def _book_adam(grads: list[float], lr: float = 0.001) -> float:
    W, m, v = 0.0, 0.0, 0.0
    for i, g in enumerate(grads, start=1):
        lr_t = lr * np.sqrt(1 - 0.999**i) / (1 - 0.9**i)
        m += (1 - 0.9) * (g - m)
        v += (1 - 0.999) * (g**2 - v)
        W -= lr_t * m / (np.sqrt(v) + 1e-7)
    return W


@pytest.mark.parametrize(("g", "close"), [(1.0, True), (1e-6, False)])
def test_adams_eps_matters_only_for_tiny_gradients(g: float, close: bool) -> None:
    params, optimizer = {"W": np.zeros(1)}, Adam()
    for _ in range(3):
        optimizer.update(params, {"W": np.array([g])})
    ratio = float(params["W"][0]) / _book_adam([g] * 3)
    assert bool(abs(ratio - 1) < 1e-5) is close and (close or ratio > 3)


def test_nesterov_is_pytorchs_not_the_books_rearrangement() -> None:
    W, v = np.ones(1), np.zeros(1)
    v *= 0.9  # the book's Nesterov.update, one step with gradient 1
    v -= 0.01 * 1.0
    W += 0.9 * 0.9 * v
    W -= (1 + 0.9) * 0.01 * 1.0
    params = {"W": np.ones(1)}
    Nesterov(0.01, 0.9).update(params, {"W": np.ones(1)})
    assert params["W"][0] == pytest.approx(0.981) and W[0] == pytest.approx(0.9729)


def test_momentum_agrees_at_a_constant_rate_and_not_after_it_changes() -> None:
    def book(rates: list[float]) -> float:
        W, v = 1.0, 0.0
        for lr in rates:
            v = 0.9 * v - lr * 1.0
            W += v
        return W

    for rates in ([0.1] * 4, [0.1, 0.1, 0.01, 0.01]):
        params, optimizer = {"W": np.ones(1)}, Momentum(0.1, 0.9)
        for lr in rates:
            optimizer.lr = lr
            optimizer.update(params, {"W": np.ones(1)})
        same = bool(float(params["W"][0]) == pytest.approx(book(rates), rel=1e-12))
        assert same is (len(set(rates)) == 1)


def test_weight_decay_reaches_the_biases_where_the_books_reaches_the_weights_only() -> None:
    params = {"W1": np.ones(1), "b1": np.ones(1)}
    SGD(0.1, weight_decay=0.1).update(params, {"W1": np.zeros(1), "b1": np.zeros(1)})
    assert params["b1"][0] == pytest.approx(1 - 0.1 * 0.1)  # the book's bias stays at 1


def test_a_network_starts_in_training_mode_and_mse_is_a_mean() -> None:
    net = snn.mlp([4, 3], rng=np.random.default_rng(3))
    assert net.training and net.params["W1"].dtype == np.float32  # the book: float64
    y, t = np.array([[0.5, 0.25]]), np.array([[1.0, 0.0]])
    book_sum_squared_error = 0.5 * np.sum((y - t) ** 2)
    assert snn.MeanSquaredError().forward(y, t) * y.size / 2 == pytest.approx(book_sum_squared_error)
