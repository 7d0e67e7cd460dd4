"""Sequential, gradcheck, and the book's chapter-5 TwoLayerNet running on scratchnn's layers."""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest

import scratchnn as snn
from scratchnn.models import cnn, mlp
from scratchnn.optim import SGD, Adam
from scratchnn.train import evaluate

ACTIVATIONS = [
    snn.Relu, snn.Sigmoid, snn.Tanh, snn.LeakyRelu, snn.Elu, snn.Gelu,
    lambda: snn.Gelu("tanh"), snn.Softplus, snn.Silu, snn.Identity, snn.Softmax,
]  # fmt: skip


def small_network(
    activation: Any, rng: np.random.Generator, loss: snn.Loss | None = None
) -> snn.Sequential:
    sizes = [5, 7, 6, 3]
    layers: list[Any] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(
            snn.Affine(
                rng.standard_normal((n_in, n_out)) / np.sqrt(n_in), 0.1 * rng.standard_normal(n_out)
            )
        )
        if i < len(sizes) - 2:
            layers.append(activation())
    return snn.Sequential(layers, loss)


@pytest.mark.parametrize(
    "activation", ACTIVATIONS, ids=lambda a: getattr(a, "__name__", "Gelu(tanh)")
)
def test_gradcheck_networks_of_every_activation(activation: Any) -> None:
    rng = np.random.default_rng(0)
    net = small_network(activation, rng)
    x = rng.standard_normal((8, 5))
    t = rng.integers(0, 3, 8)
    result = snn.gradcheck(net, x, t)
    assert result.checked == sum(p.size for p in net.params.values())
    assert result.max_relative_error < 1e-5, str(result)


@pytest.mark.parametrize("loss", [snn.MeanSquaredError, snn.SigmoidWithLoss])
def test_gradcheck_with_other_losses(loss: Any) -> None:
    rng = np.random.default_rng(1)
    net = small_network(snn.Tanh, rng, loss())
    x = rng.standard_normal((4, 5))
    t = rng.uniform(0, 1, (4, 3))
    assert snn.gradcheck(net, x, t).max_relative_error < 1e-5


def test_gradcheck_finds_a_wrong_gradient() -> None:
    class BrokenSigmoid(snn.Sigmoid):
        def _backward(self, dout: np.ndarray) -> np.ndarray:
            return super()._backward(dout) * 1.01

    rng = np.random.default_rng(2)
    net = small_network(BrokenSigmoid, rng)
    result = snn.gradcheck(net, rng.standard_normal((4, 5)), rng.integers(0, 3, 4))
    assert result.max_relative_error > 1e-3
    assert result.key in net.params and "worst relative error" in str(result)


def test_gradcheck_names_a_network_that_is_not_one() -> None:
    with pytest.raises(TypeError, match="gradcheck: network must have params, gradient"):
        snn.gradcheck(snn.Relu(), np.ones((2, 3)), np.zeros(2, np.int64))


def test_gradcheck_refuses_to_report_on_nothing() -> None:
    rng = np.random.default_rng(4)
    x, t = rng.standard_normal((4, 5)), rng.integers(0, 3, 4)
    with pytest.raises(ValueError, match="no parameters"):
        snn.gradcheck(snn.Sequential([snn.Relu()]), x, t)
    net = small_network(snn.Relu, rng)
    with pytest.raises(ValueError, match="max_per_param must be >= 1"):
        snn.gradcheck(net, x, t, max_per_param=0)
    with pytest.raises(ValueError, match="h must be positive"):
        snn.gradcheck(net, x, t, h=0.0)


def test_gradcheck_samples_distinct_elements() -> None:
    rng = np.random.default_rng(5)
    net = small_network(snn.Relu, rng)
    x, t = rng.standard_normal((4, 5)), rng.integers(0, 3, 4)
    seen: list[tuple[int, ...]] = []
    W1 = net.params["W1"]

    class Spy(np.ndarray):
        def __setitem__(self, index: Any, value: Any) -> None:
            if isinstance(index, tuple):  # an element, as gradcheck moves them
                seen.append(index)
            super().__setitem__(index, value)

    net.layers[0].W = W1.view(Spy)
    result = snn.gradcheck(net, x, t, max_per_param=W1.size - 1, rng=np.random.default_rng(0))
    moved = {tuple(int(i) for i in index) for index in seen}
    assert len(moved) == W1.size - 1  # each chosen once: three writes each (+h, -h, back)
    assert len(seen) == 3 * (W1.size - 1) and result.max_relative_error < 1e-6


def test_gradcheck_requires_float64() -> None:
    net = snn.Sequential([snn.Affine(np.ones((2, 2), np.float32), np.zeros(2, np.float32))])
    with pytest.raises(ValueError, match="float64"):
        snn.gradcheck(net, np.ones((1, 2)), np.array([0]))


def test_params_are_the_layers_own_arrays_and_keyed_like_the_book() -> None:
    rng = np.random.default_rng(3)
    net = small_network(snn.Relu, rng)
    assert list(net.params) == ["W1", "b1", "W2", "b2", "W3", "b3"]
    assert net.params["W2"] is net.layers[2].W
    grads = net.gradient(rng.standard_normal((4, 5)), rng.integers(0, 3, 4))
    assert list(grads) == list(net.params)
    assert all(grads[k].shape == net.params[k].shape for k in grads)


def test_params_follow_changes_to_the_layer_list() -> None:
    rng = np.random.default_rng(4)
    net = small_network(snn.Relu, rng)
    assert list(net.params) == ["W1", "b1", "W2", "b2", "W3", "b3"]
    replacement = snn.Affine(np.ones((5, 7)), np.zeros(7))
    net.layers[0] = replacement
    assert net.params["W1"] is replacement.W
    del net.layers[-2:]
    assert list(net.params) == ["W1", "b1", "W2", "b2"]
    net.layers.append(snn.Affine(np.ones((6, 2)), np.zeros(2)))
    assert list(net.params) == ["W1", "b1", "W2", "b2", "W3", "b3"]
    grads = net.gradient(rng.standard_normal((4, 5)), rng.integers(0, 2, 4))
    assert list(grads) == list(net.params)


def test_gradient_borrows_the_batch_and_forward_still_copies_it() -> None:
    rng = np.random.default_rng(5)
    net = small_network(snn.Relu, rng)
    x = rng.standard_normal((4, 5))
    net.gradient(x, rng.integers(0, 3, 4))
    # forward and backward ran in one call, so nothing could change x in between
    assert net.layers[0].x is x
    net.layers[0].forward(x)
    assert not np.shares_memory(net.layers[0].x, x)


def test_accuracy_with_labels_and_one_hot() -> None:
    net = snn.Sequential([snn.Identity()])
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert net.accuracy(scores, np.array([1, 0, 0])) == pytest.approx(2 / 3)
    assert net.accuracy(scores, np.eye(2)[[1, 0, 0]]) == pytest.approx(2 / 3)


def test_modes_and_repr() -> None:
    class WithMode(snn.Identity):
        training = True

    layer = WithMode()
    net = snn.Sequential([snn.Affine(np.ones((784, 50)), np.zeros(50)), snn.Relu(), layer])
    net.eval()
    assert not layer.training and not net.training
    net.train()
    assert layer.training
    text = repr(net)
    assert "Affine(784, 50" in text and "Relu(" in text and "SoftmaxWithLoss" in text


def test_sequential_rejects_non_layers() -> None:
    with pytest.raises(TypeError, match="layer 0"):
        snn.Sequential([object()])


# -- the book's chapter-5 two_layer_net.py, written against scratchnn -----------------------


def numerical_gradient(f: Any, x: np.ndarray) -> np.ndarray:
    """The book's numerical_gradient: central differences, moving x in place."""
    h = 1e-4
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"], op_flags=[["readwrite"]])
    while not it.finished:
        idx = it.multi_index
        tmp_val = x[idx]
        x[idx] = float(tmp_val) + h
        fxh1 = f(x)
        x[idx] = tmp_val - h
        fxh2 = f(x)
        grad[idx] = (fxh1 - fxh2) / (2 * h)
        x[idx] = tmp_val
        it.iternext()
    return grad


class TwoLayerNet:
    """The book's TwoLayerNet, with scratchnn's layers in place of common.layers."""

    def __init__(
        self, input_size: int, hidden_size: int, output_size: int, weight_init_std: float = 0.01
    ) -> None:
        rng = np.random.default_rng(0)
        self.params = {
            "W1": weight_init_std * rng.standard_normal((input_size, hidden_size)),
            "b1": np.zeros(hidden_size),
            "W2": weight_init_std * rng.standard_normal((hidden_size, output_size)),
            "b2": np.zeros(output_size),
        }
        self.layers: OrderedDict[str, Any] = OrderedDict()
        self.layers["Affine1"] = snn.Affine(self.params["W1"], self.params["b1"])
        self.layers["Relu1"] = snn.Relu()
        self.layers["Affine2"] = snn.Affine(self.params["W2"], self.params["b2"])
        self.lastLayer = snn.SoftmaxWithLoss()

    def predict(self, x: np.ndarray) -> np.ndarray:
        for layer in self.layers.values():
            x = layer.forward(x)
        return x

    def loss(self, x: np.ndarray, t: np.ndarray) -> float:
        return self.lastLayer.forward(self.predict(x), t)

    def accuracy(self, x: np.ndarray, t: np.ndarray) -> float:
        y = np.argmax(self.predict(x), axis=1)
        if t.ndim != 1:
            t = np.argmax(t, axis=1)
        return float(np.sum(y == t) / float(x.shape[0]))

    def numerical_gradient(self, x: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        loss_W = lambda W: self.loss(x, t)  # noqa: E731 - as in the book
        return {
            key: numerical_gradient(loss_W, self.params[key]) for key in ("W1", "b1", "W2", "b2")
        }

    def gradient(self, x: np.ndarray, t: np.ndarray) -> dict[str, np.ndarray]:
        self.loss(x, t)
        dout = self.lastLayer.backward(1)
        for layer in reversed(list(self.layers.values())):
            dout = layer.backward(dout)
        return {
            "W1": self.layers["Affine1"].dW, "b1": self.layers["Affine1"].db,
            "W2": self.layers["Affine2"].dW, "b2": self.layers["Affine2"].db,
        }  # fmt: skip


def separable_data(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.standard_normal((3, 20)) * 2
    t = rng.integers(0, 3, n)
    return centres[t] + rng.standard_normal((n, 20)), np.eye(3)[t]


def test_book_two_layer_net_gradient_check_agrees() -> None:
    rng = np.random.default_rng(4)
    x, t = separable_data(rng, 3)
    network = TwoLayerNet(input_size=20, hidden_size=10, output_size=3)
    grad_numerical = network.numerical_gradient(x, t)
    grad_backprop = network.gradient(x, t)
    for key in grad_numerical:
        diff = np.average(np.abs(grad_backprop[key] - grad_numerical[key]))
        assert diff < 1e-8, (key, diff)  # the book reports about 1e-10 to 1e-13


def test_book_two_layer_net_trains_with_in_place_updates() -> None:
    rng = np.random.default_rng(5)
    x_train, t_train = separable_data(rng, 600)
    network = TwoLayerNet(input_size=20, hidden_size=16, output_size=3, weight_init_std=0.1)
    first_loss = network.loss(x_train, t_train)
    for _ in range(200):
        batch_mask = rng.choice(600, 50)
        grad = network.gradient(x_train[batch_mask], t_train[batch_mask])
        for key in ("W1", "b1", "W2", "b2"):
            network.params[key] -= 0.1 * grad[key]
    assert network.loss(x_train, t_train) < 0.2 * first_loss
    assert network.accuracy(x_train, t_train) > 0.9


def test_gradcheck_reports_a_nan_as_the_worst_error() -> None:
    W = np.random.default_rng(0).standard_normal((3, 2))
    net = snn.Sequential([snn.Affine(W, np.zeros(2)), snn.Sigmoid()])
    x = np.ones((4, 3))
    x[0, 0] = np.nan  # NaN loss and NaN gradients: once taken for a perfect 0.000
    result = snn.gradcheck(net, x, np.array([0, 1, 1, 0]))
    assert np.isnan(result.max_relative_error) and not result.max_relative_error < 1e-7
    assert result.checked == 8 and "nan" in str(result)


def test_gradcheck_puts_the_running_statistics_back() -> None:
    rng = np.random.default_rng(1)
    net = snn.Sequential(
        [
            snn.Affine(rng.standard_normal((4, 5)), np.zeros(5)),
            snn.BatchNorm(5, dtype=np.float64),
            snn.Relu(),
            snn.Affine(rng.standard_normal((5, 3)), np.zeros(3)),
        ]
    )
    x, t = rng.standard_normal((8, 4)), rng.integers(0, 3, 8)
    net.gradient(x, t)  # running statistics away from their start
    before = {key: value.copy() for key, value in net.state().items()}
    assert snn.gradcheck(net, x, t).max_relative_error < 1e-4
    for key, value in net.state().items():  # 2 forward passes per element moved them
        np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_one_layer_at_two_places_is_refused() -> None:
    rng = np.random.default_rng(11)
    shared = snn.Affine(rng.standard_normal((4, 4)), np.zeros(4))
    with pytest.raises(ValueError, match="layer 2 is the same object as layer 0"):
        snn.Sequential([shared, snn.Relu(), shared])
    net = snn.Sequential([shared, snn.Relu()])
    net.layers.append(shared)  # the list is public: checked again when it changes
    with pytest.raises(ValueError, match="same object"):
        _ = net.params


def test_two_layers_naming_one_parameter_alike_are_refused() -> None:
    class Scale(snn.Layer):
        """A custom layer whose one parameter is called gamma, like BatchNorm's."""

        def __init__(self) -> None:
            super().__init__()
            self.gamma = np.ones(3)
            self.dgamma: np.ndarray | None = None

        @property
        def params(self) -> dict[str, np.ndarray]:
            return {"gamma": self.gamma}

        def _forward(self, x: np.ndarray) -> np.ndarray:
            return x * self.gamma

        def _backward(self, dout: np.ndarray) -> np.ndarray:
            return dout * self.gamma

    # Numbered apart: each layer one more than the last number of any of its names.
    net = snn.Sequential([Scale(), snn.BatchNorm(3, dtype=np.float64), Scale()])
    assert list(net.params) == ["gamma1", "gamma2", "beta2", "gamma3"]

    class NamedW1(Scale):  # a name ending in a digit: its key W11 is also the 11th W's
        @property
        def params(self) -> dict[str, np.ndarray]:
            return {"W1": self.gamma}

    affines = [snn.Affine(np.eye(3), np.zeros(3)) for _ in range(11)]
    with pytest.raises(ValueError, match="layers 0 and 11 would both name a parameter 'W11'"):
        _ = snn.Sequential([NamedW1(), *affines]).params


def test_accuracy_runs_in_evaluation_mode_and_moves_nothing() -> None:
    rng = np.random.default_rng(12)
    net = snn.Sequential([
        snn.Affine(rng.standard_normal((6, 8)), np.zeros(8)),
        snn.BatchNorm(8, dtype=np.float64),
        snn.Dropout(0.5, rng=np.random.default_rng(1)),
        snn.Affine(rng.standard_normal((8, 3)), np.zeros(3)),
    ])  # fmt: skip
    x, t = rng.standard_normal((50, 6)), rng.integers(0, 3, 50)
    net.gradient(x, t)  # running statistics away from their start
    state = {k: v.copy() for k, v in net.state().items()}
    scores = [net.accuracy(x, t) for _ in range(3)]
    assert len(set(scores)) == 1  # no dropout: the same answer every time
    assert net.training and all(layer.training for layer in net.layers[1:3])  # mode put back
    for key, value in net.state().items():
        np.testing.assert_array_equal(value, state[key], err_msg=key)  # statistics not moved
    net.eval()
    expected = float(np.mean(np.argmax(net.predict(x), axis=1) == t))
    assert scores[0] == expected


def test_accuracy_of_yes_no_answers_with_sigmoid_with_loss() -> None:
    net = snn.Sequential([snn.Identity()], loss=snn.SigmoidWithLoss())
    logits = np.array([[2.0], [-1.0], [0.5], [-3.0]])
    assert net.accuracy(logits, np.array([[1.0], [1.0], [0.0], [0.0]])) == 0.5
    assert net.accuracy(logits, np.array([1, 0, 1, 0])) == 1.0  # (N,) against (N, 1) scores
    multi = np.array([[2.0, -1.0], [0.5, 0.5]])
    assert net.accuracy(multi, np.array([[1.0, 0.0], [1.0, 0.0]])) == 0.75  # per answer
    softmax_net = snn.Sequential([snn.Identity()])
    with pytest.raises(ValueError, match="fewer than two classes"):
        softmax_net.accuracy(logits, np.array([0, 0, 0, 0]))


def test_gradcheck_refuses_dropout_in_training_mode_and_checks_it_in_eval_mode() -> None:
    rng = np.random.default_rng(13)
    net = snn.Sequential([
        snn.Affine(rng.standard_normal((4, 5)), np.zeros(5)),
        snn.Dropout(0.5, rng=np.random.default_rng(2)),
        snn.Affine(rng.standard_normal((5, 3)), np.zeros(3)),
    ])  # fmt: skip
    x, t = rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    with pytest.raises(ValueError, match="Dropout draws a new mask"):
        snn.gradcheck(net, x, t)
    net.eval()
    assert snn.gradcheck(net, x, t).max_relative_error < 1e-7


def test_accuracy_puts_back_each_layers_own_mode() -> None:
    # A BatchNorm its user froze stays frozen: network.train() would unfreeze it, and the
    # next gradient would move its running statistics.
    rng = np.random.default_rng(14)
    frozen = snn.BatchNorm(5, dtype=np.float64)
    net = snn.Sequential([snn.Affine(rng.standard_normal((4, 5)), np.zeros(5)), frozen,
                          snn.Dropout(0.2, rng=np.random.default_rng(3)),
                          snn.Affine(rng.standard_normal((5, 3)), np.zeros(3))])  # fmt: skip
    frozen.training = False
    x, t = rng.standard_normal((9, 4)), rng.integers(0, 3, 9)
    net.accuracy(x, t)
    evaluate(net, x, t)
    assert net.training and not frozen.training and net.layers[2].training
    before = frozen.running_mean.copy()
    net.gradient(x, t)
    np.testing.assert_array_equal(frozen.running_mean, before)


def test_a_sequential_of_a_generator_keeps_its_layers() -> None:
    rng = np.random.default_rng(15)
    net = snn.Sequential(snn.Affine(rng.standard_normal((2, 2)), np.zeros(2)) for _ in range(2))
    assert len(net.layers) == 2 and sorted(net.params) == ["W1", "W2", "b1", "b2"]


@pytest.mark.parametrize(
    "t", [np.array([0, 3]), np.array([-1, 0]), np.array([0.0, 1.0]), np.array([True, False])],
    ids=["past-the-classes", "negative", "float", "bool"],
)  # fmt: skip
def test_accuracy_refuses_labels_the_loss_refuses(t: np.ndarray) -> None:
    net = snn.Sequential([snn.Identity()])
    x = np.eye(3)[:2]
    with pytest.raises(ValueError):
        net.loss(x, t)
    with pytest.raises(ValueError, match=r"Sequential\.accuracy: "):
        net.accuracy(x, t)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"channels": (2.7,)}, TypeError, "cnn: channels must be an int"),
        ({"channels": (True, 4)}, TypeError, "cnn: channels must be an int"),
        ({"channels": (0,)}, ValueError, "cnn: channels must be >= 1"),
        ({"in_shape": (28, 28)}, ValueError, "cnn: in_shape must be (channels, height, width)"),
        ({"in_shape": (1, 28.0, 28)}, TypeError, "cnn: in_shape must be an int"),
    ],
)
def test_cnn_names_a_bad_size(kwargs: dict[str, Any], error: type, words: str) -> None:
    with pytest.raises(error, match=re.escape(words)):
        cnn(rng=np.random.default_rng(0), **kwargs)


# -- layers of the user's own, in the book's, the sequel's and scratchnn's styles ------------

torch = pytest.importorskip("torch", reason="PyTorch (the test oracle) is not installed")


class BookAffine:
    """The book's chapter-5 Affine, as the book writes it: W and b beside dW and db."""

    def __init__(self, W: np.ndarray, b: np.ndarray) -> None:
        self.W, self.b = W, b
        self.x: Any = None
        self.dW: Any = None
        self.db: Any = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.x = x
        return np.dot(x, self.W) + self.b

    def backward(self, dout: np.ndarray) -> np.ndarray:
        dx = np.dot(dout, self.W.T)
        self.dW = np.dot(self.x.T, dout)
        self.db = np.sum(dout, axis=0)
        return dx


class SequelAffine:
    """The sequel's Affine: params and grads lists, gradients written into grads[i]."""

    def __init__(self, W: np.ndarray, b: np.ndarray) -> None:
        self.params = [W, b]
        self.grads = [np.zeros_like(W), np.zeros_like(b)]
        self.x: Any = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        W, b = self.params
        self.x = x
        return np.dot(x, W) + b

    def backward(self, dout: np.ndarray) -> np.ndarray:
        W, _ = self.params
        self.grads[0][...] = np.dot(self.x.T, dout)
        self.grads[1][...] = np.sum(dout, axis=0)
        return np.dot(dout, W.T)


def _torch_gradients(weights: list[np.ndarray], x: np.ndarray, t: np.ndarray) -> list[np.ndarray]:
    """Gradients of mean cross-entropy(affine-relu-affine) in W1, b1, W2, b2 by autograd."""
    W1, b1, W2, b2 = (torch.tensor(w, requires_grad=True) for w in weights)
    scores = torch.relu(torch.tensor(x) @ W1 + b1) @ W2 + b2
    loss = torch.nn.functional.cross_entropy(scores, torch.tensor(t))
    return [g.numpy() for g in torch.autograd.grad(loss, (W1, b1, W2, b2))]


@pytest.mark.parametrize("style", [BookAffine, SequelAffine])
def test_a_layer_in_the_books_or_the_sequels_style_joins_params_and_trains(style: Any) -> None:
    rng = np.random.default_rng(70)
    weights = [rng.standard_normal((4, 6)), rng.standard_normal(6),
               rng.standard_normal((6, 3)), rng.standard_normal(3)]  # fmt: skip
    x, t = rng.standard_normal((5, 4)), rng.integers(0, 3, 5)
    net = snn.Sequential([style(weights[0].copy(), weights[1].copy()), snn.Relu(),
                          snn.Affine(weights[2].copy(), weights[3].copy())])  # fmt: skip
    first = ["W1", "b1"] if style is BookAffine else ["params1[0]", "params1[1]"]
    grads = net.gradient(x, t)
    # The book's layer numbered with scratchnn's Affine; the sequel's numbered apart.
    keys = [*first, "W2", "b2"] if style is BookAffine else [*first, "W1", "b1"]
    assert list(grads) == keys
    for key, want in zip(keys, _torch_gradients(weights, x, t)):
        np.testing.assert_allclose(grads[key], want, rtol=1e-12, atol=1e-14)
    # Trained in place, as the book's optimisers train: the layer's own W moves.
    before = net.layers[0].W.copy() if style is BookAffine else net.layers[0].params[0].copy()
    SGD(0.1).update(net.params, net.gradient(x, t))
    after = net.layers[0].W if style is BookAffine else net.layers[0].params[0]
    np.testing.assert_allclose(after, before - 0.1 * grads[first[0]], rtol=1e-12)
    assert set(first) <= set(net.state())


def test_the_books_running_statistics_are_saved_with_its_parameters() -> None:
    class BookBatchNorm:  # only what Sequential reads: gamma beside dgamma, running stats
        def __init__(self) -> None:
            self.gamma, self.beta = np.ones(3), np.zeros(3)
            self.dgamma: Any = None
            self.dbeta: Any = None
            self.running_mean, self.running_var = np.full(3, 0.5), np.full(3, 2.0)

        def forward(self, x: np.ndarray, train_flg: bool = True) -> np.ndarray:
            return x * self.gamma + self.beta

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return dout

    net = snn.Sequential([BookBatchNorm()])
    assert sorted(net.state()) == ["beta1", "gamma1", "running_mean1", "running_var1"]
    net.load_state({**net.state(), "running_mean1": np.arange(3.0)})
    assert net.layers[0].running_mean.tolist() == [0.0, 1.0, 2.0]


def test_the_books_dropout_gets_the_networks_mode_as_train_flg() -> None:
    class BookDropout:  # the book's chapter-6 Dropout
        def __init__(self, dropout_ratio: float = 0.5) -> None:
            self.dropout_ratio = dropout_ratio
            self.mask: Any = None

        def forward(self, x: np.ndarray, train_flg: bool = True) -> np.ndarray:
            if train_flg:
                self.mask = np.random.rand(*x.shape) > self.dropout_ratio  # noqa: NPY002 (the book's own call)
                return x * self.mask
            return x * (1.0 - self.dropout_ratio)

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return dout * self.mask

    x = np.random.default_rng(71).standard_normal((50, 4)) + 3.0
    net = snn.Sequential([BookDropout(0.5)]).eval()
    np.testing.assert_array_equal(net.predict(x), 0.5 * x)  # no units dropped
    net.train()
    assert np.count_nonzero(net.predict(x) == 0) > 20  # about half of 200


def test_parameters_a_layer_makes_at_its_first_forward_are_found_then() -> None:
    class LazyScale:
        def __init__(self) -> None:
            self.params: dict[str, np.ndarray] = {}
            self.grads: dict[str, np.ndarray] = {}

        def forward(self, x: np.ndarray) -> np.ndarray:
            if not self.params:
                self.params["s"] = np.ones(x.shape[1])
            self.x = x
            return x * self.params["s"]

        def backward(self, dout: np.ndarray) -> np.ndarray:
            self.grads["s"] = np.sum(dout * self.x, axis=0)
            return dout * self.params["s"]

    rng = np.random.default_rng(72)
    net = snn.Sequential([snn.Affine(rng.standard_normal((4, 3)), np.zeros(3)), LazyScale()])
    assert sorted(net.params) == ["W1", "b1"]  # read (and numbered) before the first forward
    x, t = rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    with pytest.raises(ValueError, match="read the network's params after that forward"):
        SGD(0.1).update(net.params, net.gradient(x, t))
    grads = net.gradient(x, t)
    assert sorted(net.params) == sorted(grads) == ["W1", "b1", "s1"]
    SGD(0.1).update(net.params, grads)
    assert not np.array_equal(net.layers[1].params["s"], np.ones(3))
    assert "s1" in net.state()
    # gradcheck of a fresh network: its first forward renumbers the keys (s1 joins before
    # W2), and every array it moved ends as it was.
    fresh = snn.Sequential([LazyScale(), snn.Affine(rng.standard_normal((4, 3)), np.zeros(3))])
    W = fresh.layers[1].W.copy()
    assert snn.gradcheck(fresh, x, t).max_relative_error < 1e-6
    assert list(fresh.params) == ["s1", "W1", "b1"]
    np.testing.assert_array_equal(fresh.layers[1].W, W)


def test_a_params_list_without_a_grads_list_of_its_length_is_named() -> None:
    layer = SequelAffine(np.ones((2, 2)), np.zeros(2))
    layer.grads = [*layer.grads, np.zeros(2)]
    with pytest.raises(TypeError, match="a params list needs a grads list of its length"):
        snn.Sequential([layer]).gradient(np.ones((1, 2)), np.array([0]))


def test_accuracy_is_nan_where_a_score_is_nan_and_refuses_an_empty_set() -> None:
    rng = np.random.default_rng(73)
    net = small_network(snn.Relu, rng)
    x, t = rng.standard_normal((6, 5)), rng.integers(0, 3, 6)
    assert 0.0 <= net.accuracy(x, t) <= 1.0
    x[2, 0] = np.nan  # one example's scores are all NaN: there is no answer to count
    assert np.isnan(net.accuracy(x, t))
    assert np.isnan(evaluate(net, x, t)[1])
    yes_no = snn.Sequential([snn.Affine(rng.standard_normal((5, 1)), np.zeros(1))], snn.SigmoidWithLoss())
    assert np.isnan(yes_no.accuracy(x, (rng.random((6, 1)) > 0.5).astype(float)))
    with pytest.raises(ValueError, match="no examples to count"):
        net.accuracy(x[:0], t[:0])


class SequelEmbedding:
    """The sequel's Embedding: one weight, integer indices in, no gradient out."""

    def __init__(self, W: np.ndarray) -> None:
        self.params = [W]
        self.grads = [np.zeros_like(W)]
        self.idx: Any = None

    def forward(self, idx: np.ndarray) -> np.ndarray:
        (W,) = self.params
        self.idx = idx
        return W[idx]

    def backward(self, dout: np.ndarray) -> None:
        self.grads[0][...] = 0
        np.add.at(self.grads[0], self.idx, dout)


class ScaleByW:
    """``x * W`` in the book's style: W without a b, its dW set by backward."""

    __slots__: tuple[str, ...] = ()  # (the subclasses say where W lives)
    W: np.ndarray
    dW: Any
    x: np.ndarray

    def __init__(self, n: int = 2) -> None:
        self.W, self.dW = np.ones(n), None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.x = x
        return x * self.W

    def backward(self, dout: np.ndarray) -> np.ndarray:
        self.dW = np.sum(dout * self.x, axis=0)
        return dout * self.W


class BookScale(ScaleByW):
    """The same, with a ``__dict__`` as the book's layers have."""

    __dict__: dict[str, Any]


class LazyScaleByW(ScaleByW):
    """The same, its W made at its first forward, sized by the input."""

    __dict__: dict[str, Any]

    def __init__(self) -> None:
        self.W: Any = None
        self.dW = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        if self.W is None:
            self.W = np.linspace(0.5, 1.5, x.shape[1])
        return super().forward(x)


def test_layers_of_other_kinds_never_share_a_key() -> None:
    rng = np.random.default_rng(74)
    embed_then_affine = snn.Sequential([SequelEmbedding(rng.standard_normal((5, 3))),
                                        SequelAffine(rng.standard_normal((3, 2)), np.zeros(2))])  # fmt: skip
    assert list(embed_then_affine.params) == ["params1[0]", "params2[0]", "params2[1]"]

    net = snn.Sequential([BookScale(3), snn.Affine(np.eye(3), np.zeros(3)), BookScale(3)])
    assert list(net.params) == ["W1", "W2", "b2", "W3"]


def test_what_a_forward_took_or_gave_is_never_a_parameter() -> None:
    class KeepsDx(BookAffine):  # a learner who keeps dx beside the cached x
        def backward(self, dout: np.ndarray) -> np.ndarray:
            self.dx = super().backward(dout)
            return self.dx

    rng = np.random.default_rng(75)
    net = snn.Sequential([KeepsDx(rng.standard_normal((4, 3)), np.zeros(3)),
                          snn.Affine(rng.standard_normal((3, 2)), np.zeros(2))])  # fmt: skip
    x, t = rng.standard_normal((6, 4)), rng.integers(0, 2, 6)
    kept = x.copy()
    for _ in range(3):  # the same x each step, as full-batch training passes it
        SGD(0.1).update(net.params, net.gradient(x, t))
    assert list(net.params) == list(net.state()) == ["W1", "b1", "W2", "b2"]
    np.testing.assert_array_equal(x, kept)  # the caller's data, never stepped as a parameter


def test_tied_weights_are_one_parameter_with_the_summed_gradient() -> None:
    rng = np.random.default_rng(76)
    W = rng.standard_normal((5, 3))  # the sequel's tying: an embedding and its transpose
    net = snn.Sequential([SequelEmbedding(W), snn.Tanh(), SequelAffine(W.T, np.zeros(5))])
    idx, t = rng.integers(0, 5, 4), rng.integers(0, 5, 4)
    grads = net.gradient(idx, t)
    assert list(net.params) == list(grads) == ["params1[0]", "params2[1]"]
    leaf, bias = torch.tensor(W, requires_grad=True), torch.zeros(5, requires_grad=True, dtype=torch.float64)
    scores = torch.tanh(leaf[torch.tensor(idx)]) @ leaf.T + bias
    loss = torch.nn.functional.cross_entropy(scores, torch.tensor(t))
    want_W, want_b = torch.autograd.grad(loss, (leaf, bias))
    np.testing.assert_allclose(grads["params1[0]"], want_W.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(grads["params2[1]"], want_b.numpy(), rtol=1e-12, atol=1e-14)
    # The same array in two layers (not a view): also one parameter.
    shared = rng.standard_normal((3, 3))
    twice = snn.Sequential([SequelAffine(shared, np.zeros(3)), snn.Tanh(), SequelAffine(shared, np.zeros(3))])
    assert list(twice.params) == ["params1[0]", "params1[1]", "params2[1]"]
    assert snn.gradcheck(twice, rng.standard_normal((4, 3)), t % 3).max_relative_error < 1e-6


def test_a_buffer_key_two_layers_would_share_is_refused() -> None:
    class BookNorm:  # parameters named apart from BatchNorm's, running statistics not
        def __init__(self) -> None:
            self.scale, self.dscale = np.ones(3), None
            self.running_mean, self.running_var = np.zeros(3), np.ones(3)

        def forward(self, x: np.ndarray) -> np.ndarray:
            return x * self.scale

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return dout

    net = snn.Sequential([snn.BatchNorm(3, dtype=np.float64), BookNorm()])
    with pytest.raises(ValueError, match="two layers would both save 'running_mean1'"):
        net.state()


def test_gradcheck_of_a_network_whose_first_forward_makes_arrays() -> None:
    class BookBatchNorm:  # the book's: running statistics made at the first forward, rebound
        def __init__(self, gamma: np.ndarray, beta: np.ndarray) -> None:
            self.gamma, self.beta, self.momentum = gamma, beta, 0.9
            self.running_mean: Any = None
            self.running_var: Any = None
            self.dgamma: Any = None
            self.dbeta: Any = None

        def forward(self, x: np.ndarray, train_flg: bool = True) -> np.ndarray:
            if self.running_mean is None:
                self.running_mean, self.running_var = np.zeros(x.shape[1]), np.zeros(x.shape[1])
            if not train_flg:
                return self.gamma * (x - self.running_mean) / np.sqrt(self.running_var + 1e-7) + self.beta
            mu = x.mean(axis=0)
            self.xc = x - mu
            var = np.mean(self.xc**2, axis=0)
            self.std = np.sqrt(var + 1e-7)
            self.xn = self.xc / self.std
            self.running_mean = self.momentum * self.running_mean + (1 - self.momentum) * mu
            self.running_var = self.momentum * self.running_var + (1 - self.momentum) * var
            return self.gamma * self.xn + self.beta

        def backward(self, dout: np.ndarray) -> np.ndarray:
            n = dout.shape[0]
            self.dbeta, self.dgamma = dout.sum(axis=0), np.sum(self.xn * dout, axis=0)
            dxn = self.gamma * dout
            dxc = dxn / self.std
            dstd = -np.sum((dxn * self.xc) / (self.std * self.std), axis=0)
            dxc += (2.0 / n) * self.xc * (0.5 * dstd / self.std)
            return dxc - np.sum(dxc, axis=0) / n

    rng = np.random.default_rng(77)
    net = snn.Sequential([snn.Affine(rng.standard_normal((4, 3)), np.zeros(3)),
                          BookBatchNorm(np.ones(3), np.zeros(3)), snn.Tanh(),
                          snn.Affine(rng.standard_normal((3, 2)), np.zeros(2))])  # fmt: skip
    x, t = rng.standard_normal((8, 4)), rng.integers(0, 2, 8)
    assert snn.gradcheck(net, x, t).max_relative_error < 1e-6  # fresh: no running_mean yet
    assert net.layers[1].running_mean is None  # as it was
    net.gradient(x, t)
    state = {key: array.copy() for key, array in net.state().items()}
    assert "running_mean1" in state
    snn.gradcheck(net, x, t)
    assert all(np.array_equal(net.state()[key], array) for key, array in state.items())


def test_gradcheck_refuses_the_books_dropout_in_training_mode() -> None:
    class Dropout:  # the book's name, its forward's train_flg
        def forward(self, x: np.ndarray, train_flg: bool = True) -> np.ndarray:
            return x

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return dout

    rng = np.random.default_rng(78)
    net = snn.Sequential([snn.Affine(rng.standard_normal((3, 2)), np.zeros(2)), Dropout()])
    with pytest.raises(ValueError, match="Dropout draws a new mask"):
        snn.gradcheck(net, rng.standard_normal((4, 3)), np.array([0, 1, 1, 0]))
    assert snn.gradcheck(net.eval(), rng.standard_normal((4, 3)), np.array([0, 1, 1, 0])).max_relative_error < 1e-6


def test_a_book_style_parameter_kept_as_a_float_is_named() -> None:
    class PRelu:  # a learner's PReLU whose slope is a Python float beside its gradient
        def __init__(self) -> None:
            self.a, self.da = 0.25, None

        def forward(self, x: np.ndarray) -> np.ndarray:
            self.x = x
            return np.where(x > 0, x, self.a * x)

        def backward(self, dout: np.ndarray) -> np.ndarray:
            self.da = float(np.sum(np.where(self.x > 0, 0.0, self.x) * dout))
            return np.where(self.x > 0, dout, self.a * dout)

    net = snn.Sequential([snn.Affine(np.eye(2), np.zeros(2)), PRelu()])
    # Found when its backward sets da (a float t beside a step dt, both set once, is not).
    with pytest.raises(TypeError, match=r"PRelu keeps its parameter a as a float: keep it as a float array"):
        net.gradient(np.array([[1.0, -2.0]]), np.array([0]))
    layer = PRelu()
    layer.a = np.array(0.25)  # as the message says: then it trains
    net = snn.Sequential([snn.Affine(np.eye(2), np.zeros(2)), layer])
    SGD(0.1).update(net.params, net.gradient(np.array([[1.0, -2.0]]), np.array([0])))
    assert list(net.params) == ["W1", "b1", "a1"] and float(layer.a) != 0.25


# -- what forward assigns is a cache; what it leaves is a parameter (third audit) ------------


def test_a_weight_forward_returns_or_data_it_was_sliced_from_stays_a_parameter() -> None:
    class LearnedConstant:  # returns its own weight, whatever comes in
        def __init__(self) -> None:
            self.W, self.dW = np.ones((1, 3)), None

        def forward(self, x: np.ndarray) -> np.ndarray:
            self.n = len(x)
            return np.broadcast_to(self.W, (self.n, 3))

        def backward(self, dout: np.ndarray) -> None:
            self.dW = dout.sum(axis=0, keepdims=True)

    class Prototypes(BookAffine):  # W a slice of the training data, batches other slices
        pass

    rng = np.random.default_rng(79)
    data = rng.standard_normal((300, 4))
    net = snn.Sequential([Prototypes(data[:4, :3].T, np.zeros(4)),  # a view of the data
                          snn.Affine(rng.standard_normal((4, 2)), np.zeros(2))])  # fmt: skip
    for start in (100, 200):
        net.gradient(data[start : start + 50, :3], rng.integers(0, 2, 50))
    assert list(net.params) == ["W1", "b1", "W2", "b2"]
    constant = snn.Sequential([LearnedConstant(), snn.Affine(rng.standard_normal((3, 2)), np.zeros(2))])
    for _ in range(2):
        SGD(0.1).update(constant.params, constant.gradient(data[:5], np.zeros(5, int)))
    assert list(constant.params) == ["W1", "W2", "b2"] and not np.array_equal(constant.layers[0].W, np.ones((1, 3)))


class Transposes:  # hands the next layer a transposed (non-contiguous) array
    def forward(self, x: np.ndarray) -> np.ndarray:
        return x.T.copy().T

    def backward(self, dout: np.ndarray) -> np.ndarray:
        return dout


class KeepsDxCopy(BookAffine):  # keeps a copy of x, and dx beside it
    def forward(self, x: np.ndarray) -> np.ndarray:
        self.x = np.ascontiguousarray(x).reshape(len(x), -1).copy()
        return np.dot(self.x, self.W) + self.b

    def backward(self, dout: np.ndarray) -> np.ndarray:
        self.dx = super().backward(dout)
        return self.dx


def test_a_cache_that_is_a_copy_and_survives_copies_of_the_network() -> None:
    import copy
    import pickle

    rng = np.random.default_rng(80)
    net = snn.Sequential([Transposes(), KeepsDxCopy(rng.standard_normal((4, 3)), np.zeros(3))])
    x, t = rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    for _ in range(2):
        Adam().update(net.params, net.gradient(x, t))
        assert list(net.params) == ["W1", "b1"]
    for twin in (copy.deepcopy(net), pickle.loads(pickle.dumps(net)), snn.Sequential(net.layers)):
        assert list(twin.params) == list(twin.state()) == ["W1", "b1"]


def test_a_parameter_made_at_the_first_forward_counts_from_the_second() -> None:
    class LazyBookScale:
        def __init__(self) -> None:
            self.W: Any = None
            self.dW: Any = None

        def forward(self, x: np.ndarray) -> np.ndarray:
            if self.W is None:
                self.W = np.ones(x.shape[1])
            self.x = x
            return x * self.W

        def backward(self, dout: np.ndarray) -> np.ndarray:
            self.dW = np.sum(dout * self.x, axis=0)
            return dout * self.W

    rng = np.random.default_rng(81)
    net = snn.Sequential([LazyBookScale(), snn.Affine(rng.standard_normal((3, 2)), np.zeros(2))])
    x, t = rng.standard_normal((5, 3)), rng.integers(0, 2, 5)
    assert list(net.gradient(x, t)) == ["W1", "b1"]  # the Affine's: W made just now
    # Kept by the second forward, W joins under a new key; the Affine keeps W1 (and with
    # it an optimiser's state for W1).
    assert list(net.gradient(x, t)) == ["W2", "W1", "b1"]
    fresh = snn.Sequential([LazyBookScale(), snn.Affine(np.eye(3)[:, :2].copy(), np.zeros(2))])
    fresh.predict(x)
    fresh.predict(x)
    # Numbered as the trained one, whenever params is first read: a model saved from
    # one loads into the other, each array into its own layer.
    assert list(fresh.params) == ["W2", "W1", "b1"]
    fresh.load_state(net.state())
    np.testing.assert_array_equal(fresh.layers[0].W, net.layers[0].W)


def test_views_of_one_array_are_one_parameter_and_other_overlaps_are_refused() -> None:
    rng = np.random.default_rng(82)
    W = rng.standard_normal((3, 3))
    same = snn.Sequential([SequelAffine(W, np.zeros(3)), snn.Tanh(), SequelAffine(W[:], np.zeros(3))])
    assert list(same.params) == ["params1[0]", "params1[1]", "params2[1]"]
    wide = rng.standard_normal((3, 4))
    with pytest.raises(ValueError, match=r"params1\[0\] and params2\[0\] share memory without being one array"):
        snn.Sequential([SequelAffine(wide[:, :3], np.zeros(3)), SequelAffine(wide[:, 1:], np.zeros(3))])


def test_parameters_that_are_not_float_arrays_are_named() -> None:
    class FloatInParams:
        def __init__(self) -> None:
            self.params, self.grads = {"s": 0.5}, {"s": None}

        def forward(self, x: np.ndarray) -> np.ndarray:
            return x

        def backward(self, dout: np.ndarray) -> np.ndarray:
            return dout

    class IntegerW(BookAffine):
        pass

    class Clock(BookAffine):  # t and dt, a time and its step: no parameter
        def __init__(self, W: np.ndarray, b: np.ndarray) -> None:
            super().__init__(W, b)
            self.t, self.dt = 0.0, 0.1

    with pytest.raises(TypeError, match=r"FloatInParams keeps its parameter params\['s'\] as a float"):
        _ = snn.Sequential([FloatInParams()]).params
    integer = snn.Sequential([IntegerW(np.ones((2, 2), dtype=int), np.zeros(2))])
    with pytest.raises(TypeError, match="IntegerW keeps its parameter W as an array of int64"):
        integer.gradient(np.ones((1, 2)), np.array([0]))
    clock = snn.Sequential([Clock(np.eye(2), np.zeros(2))])
    assert list(clock.gradient(np.ones((1, 2)), np.array([0]))) == ["W1", "b1"]


def test_gradcheck_puts_each_running_statistic_back_into_its_own_layer() -> None:
    class BookNorm:  # the book's BatchNormalization, made at the first forward if not sized
        def __init__(self, n: int | None = None) -> None:
            self.gamma: Any = None
            self.dgamma: Any = None
            self.dbeta: Any = None
            if n:
                self._make(n)

        def _make(self, n: int) -> None:
            self.gamma, self.beta = np.ones(n), np.zeros(n)
            self.running_mean, self.running_var = np.zeros(n), np.ones(n)

        def forward(self, x: np.ndarray, train_flg: bool = True) -> np.ndarray:
            if self.gamma is None:
                self._make(x.shape[1])
            self.xc = x - x.mean(axis=0)
            self.std = np.sqrt(np.mean(self.xc**2, axis=0) + 1e-7)
            self.running_mean = 0.9 * self.running_mean + 0.1 * x.mean(axis=0)  # rebound
            self.running_var = 0.9 * self.running_var + 0.1 * self.std**2
            return self.gamma * self.xc / self.std + self.beta

        def backward(self, dout: np.ndarray) -> np.ndarray:
            xn, n = self.xc / self.std, len(dout)
            self.dbeta, self.dgamma = dout.sum(axis=0), np.sum(xn * dout, axis=0)
            dxn = self.gamma * dout
            return (dxn - dxn.mean(axis=0) - xn * np.mean(dxn * xn, axis=0)) / self.std * (n / n)

    rng = np.random.default_rng(83)
    lazy, eager = BookNorm(), BookNorm(3)
    eager.running_mean[...] = 7.0
    net = snn.Sequential([lazy, snn.Affine(rng.standard_normal((3, 3)), np.zeros(3)), eager,
                          snn.Tanh(), snn.Affine(rng.standard_normal((3, 2)), np.zeros(2))])  # fmt: skip
    x, t = rng.standard_normal((8, 3)), rng.integers(0, 2, 8)
    assert snn.gradcheck(net, x, t).max_relative_error < 1e-5  # lazy's keys join, checked too
    np.testing.assert_array_equal(eager.running_mean, np.full(3, 7.0))  # its own, put back
    assert lazy.gamma is None and not hasattr(lazy, "running_mean")  # unmade, as it was


# -- fourth audit -----------------------------------------------------------------------------


class SubclassedBookAffine(snn.Layer):
    """A user's layer built on scratchnn's Layer, with forward and backward of its own in
    the book's style (x kept beside a dx) and the book's train_flg."""

    def __init__(self, W: np.ndarray, b: np.ndarray) -> None:
        super().__init__()
        self.W, self.b = W, b
        self.dW: Any = None
        self.db: Any = None
        self.seen_flags: list[bool] = []

    def forward(self, x: np.ndarray, train_flg: bool = True) -> np.ndarray:  # type: ignore[override]
        self.seen_flags.append(train_flg)
        self.x = x
        return np.dot(x, self.W) + self.b

    def backward(self, dout: np.ndarray) -> np.ndarray:  # type: ignore[override]
        self.dW, self.db = np.dot(self.x.T, dout), dout.sum(axis=0)
        self.dx = np.dot(dout, self.W.T)
        return self.dx


def test_a_users_subclass_of_layer_is_run_and_noted_as_a_users_layer() -> None:
    rng = np.random.default_rng(84)
    layer = SubclassedBookAffine(rng.standard_normal((4, 3)), np.zeros(3))
    net = snn.Sequential([layer, snn.Affine(rng.standard_normal((3, 2)), np.zeros(2))])
    x, t = rng.standard_normal((6, 4)), rng.integers(0, 2, 6)
    kept = x.copy()
    for _ in range(2):
        SGD(0.1).update(net.params, net.gradient(x, t))
    assert list(net.params) == ["W1", "b1", "W2", "b2"]
    np.testing.assert_array_equal(x, kept)
    net.accuracy(x, t)
    assert layer.seen_flags == [True, True, False]


def test_a_scalar_cache_and_a_weight_cast_at_the_first_forward() -> None:
    class Standardize:  # keeps std, a NumPy float, beside a dstd its backward sets
        def forward(self, x: np.ndarray) -> np.ndarray:
            self.x, self.std = x, np.sqrt(x.var() + 1e-7)
            return x / self.std

        def backward(self, dout: np.ndarray) -> np.ndarray:
            self.dstd = -np.sum(dout * self.x) / self.std**2
            return dout / self.std  # (not exact: only its caches matter here)

    class CastsOnce(BookAffine):  # casts W and b to the data's dtype at its first forward
        def forward(self, x: np.ndarray) -> np.ndarray:
            if self.W.dtype != x.dtype:
                self.W, self.b = self.W.astype(x.dtype), self.b.astype(x.dtype)
            return super().forward(x)

    rng = np.random.default_rng(85)
    x, t = rng.standard_normal((40, 4)), rng.integers(0, 3, 40)
    W, b = rng.standard_normal((4, 3)).astype(np.float32), np.zeros(3, np.float32)
    net = snn.Sequential([Standardize(), CastsOnce(W, b)])
    from scratchnn.train import fit

    history = fit(net, SGD(0.5), (x, t), epochs=4, batch_size=40, rng=rng)
    assert list(net.params) == ["W1", "b1"] and history.train_loss[-1] < history.train_loss[0]


def test_gradcheck_of_a_fresh_network_checks_a_parameter_made_at_the_first_forward() -> None:
    class LazyDoubled(LazyScaleByW):  # its dW twice the truth
        def backward(self, dout: np.ndarray) -> np.ndarray:
            dx = super().backward(dout)
            self.dW = 2 * self.dW
            return dx

    rng = np.random.default_rng(86)
    net = snn.Sequential([LazyDoubled(), snn.Affine(rng.standard_normal((3, 2)), np.zeros(2))])
    result = snn.gradcheck(net, rng.standard_normal((5, 3)), rng.integers(0, 2, 5))
    assert result.max_relative_error > 0.1 and result.key == "W2"


def test_a_book_style_layer_in_slots_is_refused_and_slots_layers_move_and_are_named() -> None:
    class Slotted(ScaleByW):
        __slots__ = ("W", "dW", "x")

    class SlottedScale:  # scratchnn's style, in slots: fine
        __slots__ = ("grads", "params", "x")

        def __init__(self) -> None:
            self.params, self.grads = {"s": np.ones(2)}, {"s": None}

        def forward(self, x: np.ndarray) -> np.ndarray:
            self.x = x
            return x * self.params["s"]

        def backward(self, dout: np.ndarray) -> np.ndarray:
            self.grads["s"] = np.sum(dout * self.x, axis=0)
            return dout * self.params["s"]

    with pytest.raises(TypeError, match="Slotted keeps W beside dW in __slots__"):
        _ = snn.Sequential([Slotted()]).params
    net = snn.Sequential([SlottedScale()])
    assert net.to("cpu").params["s1"] is net.layers[0].params["s"]
    with pytest.raises(TypeError, match="SlottedScale keeps them in __slots__"):
        snn.check_layer(SlottedScale(), np.ones((1, 2)))


# -- a stateful layer (fifth audit) ------------------------------------------------------------


class StatefulCell:
    """The sequel's stateful recurrence in one step: ``h = tanh(x Wx + h_prev Wh)``, with
    ``h`` kept for the next forward (and ``dh`` beside it, as the sequel keeps it)."""

    def __init__(self, Wx: np.ndarray, Wh: np.ndarray) -> None:
        self.Wx, self.Wh = Wx, Wh
        self.dWx: Any = None
        self.dWh: Any = None
        self.h: Any = None
        self.dh: Any = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.h_prev = np.zeros((len(x), self.Wh.shape[0])) if self.h is None else self.h
        self.x = x
        self.h = np.tanh(x @ self.Wx + self.h_prev @ self.Wh)
        return self.h

    def backward(self, dout: np.ndarray) -> np.ndarray:
        da = dout * (1 - self.h**2)
        self.dWx, self.dWh = self.x.T @ da, self.h_prev.T @ da
        self.dh = da @ self.Wh.T
        return da @ self.Wx.T


def test_a_stateful_layer_trains_and_checks_and_evaluation_leaves_its_state() -> None:
    from scratchnn.train import fit

    rng = np.random.default_rng(87)
    cell = StatefulCell(0.5 * rng.standard_normal((4, 3)), 0.5 * rng.standard_normal((3, 3)))
    net = snn.Sequential([cell, snn.Affine(rng.standard_normal((3, 2)), np.zeros(2))])
    x, t = rng.standard_normal((10, 4)), rng.integers(0, 2, 10)
    history = fit(net, SGD(0.1), (x, t), epochs=3, batch_size=10, rng=rng)  # fit's checks
    assert list(net.params) == ["Wx1", "Wh1", "W1", "b1"] and len(history) == 3  # leave h be
    h = cell.h
    net.accuracy(x, t)
    assert cell.h is h  # an evaluation between steps: the state the next step reads
    # gradcheck: every loss from the state its gradient saw, and the state put back.
    assert snn.gradcheck(net, x, t).max_relative_error < 1e-6
    assert cell.h is h


def test_a_stateful_layer_trains_again_and_gradcheck_takes_late_parameters_alone() -> None:
    from scratchnn.train import fit

    rng = np.random.default_rng(88)
    cell = StatefulCell(0.5 * rng.standard_normal((4, 3)), 0.5 * rng.standard_normal((3, 3)))
    net = snn.Sequential([cell, snn.Affine(rng.standard_normal((3, 2)), np.zeros(2))])
    # (One batch of 4: the epoch's evaluations run the same size, as a state needs.)
    x, t = rng.standard_normal((4, 4)), rng.integers(0, 2, 4)
    history = fit(net, SGD(0.1), (x, t), epochs=1, batch_size=4, rng=rng)
    net.loss(x, t)  # the state now has the batch's size, 4: fit's check takes a batch too
    fit(net, SGD(0.1), (x, t), epochs=2, batch_size=4, rng=rng, history=history)  # again
    assert len(history) == 2

    lazy = snn.Sequential([LazyScaleByW()])  # its only parameter made at its first forward
    assert snn.gradcheck(lazy, rng.standard_normal((5, 3)), rng.integers(0, 3, 5)).max_relative_error < 1e-6


def test_load_state_from_the_networks_own_arrays_swapped() -> None:
    # Copied one by one, W1's new value (W2) was written before W2 read W1: both held W2.
    net = mlp([4, 4, 4], rng=np.random.default_rng(0))
    W1, W2 = net.params["W1"].copy(), net.params["W2"].copy()
    state = net.state()
    state["W1"], state["W2"] = net.params["W2"], net.params["W1"]
    net.load_state(state)
    np.testing.assert_array_equal(net.params["W1"], W2)
    np.testing.assert_array_equal(net.params["W2"], W1)


class _BookAffine:
    """The book's Affine, with one of a learner's slips in its backward."""

    def __init__(self, W: np.ndarray, slip: str) -> None:
        self.W, self.b, self.dW, self.db, self.slip = W, np.zeros(W.shape[1]), None, None, slip

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.x = x
        return x @ self.W + self.b

    def backward(self, dout: np.ndarray) -> np.ndarray:
        dW = dout.T @ self.x if self.slip == "transposed" else self.x.T @ dout
        if self.slip != "dW unset":
            self.dW = dW
        self.db = dout.sum(axis=0, keepdims=self.slip == "db kept 2-d")
        return dout @ self.W.T


@pytest.mark.parametrize(
    ("slip", "error", "message"),
    [
        ("transposed", ValueError, r"the gradient of W1 has shape \(3, 4\), the parameter \(4, 3\)"),
        ("db kept 2-d", ValueError, r"the gradient of b1 has shape \(1, 3\), the parameter \(3,\)"),
        ("dW unset", RuntimeError, r"layer 0 \(_BookAffine\) has no gradient of its W after backward"),
    ],
)
def test_gradcheck_names_a_gradient_of_the_wrong_shape_or_none(
    slip: str, error: type, message: str
) -> None:
    # They were an IndexError, a TypeError of float(), and "no gradients yet; call
    # gradient(x, t) first" right after gradient had run.
    rng = np.random.default_rng(3)
    net = snn.Sequential([_BookAffine(rng.standard_normal((4, 3)), slip)])
    with pytest.raises(error, match=message):
        snn.gradcheck(net, rng.standard_normal((5, 4)), rng.integers(0, 3, 5))


def test_gradcheck_takes_a_seed_as_check_layer_does() -> None:
    rng = np.random.default_rng(4)
    net = mlp([4, 6, 3], rng=rng, dtype=np.float64)
    x, t = rng.standard_normal((5, 4)), rng.integers(0, 3, 5)
    seeded = snn.gradcheck(net, x, t, max_per_param=2, rng=7)
    assert seeded == snn.gradcheck(net, x, t, max_per_param=2, rng=np.random.default_rng(7))
    assert seeded.checked == 8 and seeded.max_relative_error < 1e-6
    with pytest.raises(TypeError, match=r"gradcheck: rng must be a numpy\.random\.Generator or a seed"):
        snn.gradcheck(net, x, t, max_per_param=2, rng="seven")


def test_the_network_code_keeps_no_users_layer_class_alive() -> None:
    # Whether a layer is scratchnn's own is remembered per class for speed, but only for
    # scratchnn's classes: a notebook that defines a layer class again and again keeps none.
    import gc
    import weakref

    from scratchnn.parameters import is_ours

    class Mine(snn.Relu):
        pass

    assert not is_ours(Mine()) and is_ours(snn.Relu())
    net = snn.Sequential([Mine(), snn.Affine(np.ones((3, 2)), np.zeros(2))])
    net.gradient(np.ones((4, 3)), np.array([0, 1, 0, 1]))
    assert not is_ours(Mine())  # asked again: the same answer
    mine = weakref.ref(Mine)
    del Mine, net
    gc.collect()
    assert mine() is None


def test_a_layer_class_in_place_of_a_layer_is_named() -> None:
    # Relu for Relu(): the network built, and its first forward failed naming no layer.
    with pytest.raises(TypeError, match=r"layer 1 is the class Relu, not a layer: make one, Relu\(\.\.\.\)"):
        snn.Sequential([snn.Affine(np.ones((2, 2)), np.zeros(2)), snn.Relu])


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [({"n_classes": 0}, ValueError, "cnn: n_classes"), ({"n_classes": 2.5}, TypeError, "cnn: n_classes"),
     ({"n_classes": True}, TypeError, "cnn: n_classes"), ({"rng": 0}, TypeError, "cnn: rng")],
)  # fmt: skip
def test_cnn_names_a_wrong_argument_before_drawing_a_weight(
    arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    # n_classes was first read by the last layer's initialiser ("he_normal: fan_out"), after
    # the other weights had moved the caller's generator on.
    rng = np.random.default_rng(3)
    before = rng.bit_generator.state
    with pytest.raises(error, match=message):
        cnn(**{"rng": rng, **arguments})
    assert rng.bit_generator.state == before


def test_load_state_names_what_is_not_a_dict_or_not_an_array() -> None:
    net = snn.Sequential([snn.Affine(np.ones((3, 2)), np.zeros(2))])
    state = net.state()
    with pytest.raises(TypeError, match="load_state takes a dict of arrays by name, got list"):
        net.load_state(list(state.items()))  # type: ignore[arg-type]
    for value in (None, "zeros"):
        with pytest.raises(TypeError, match=f"b1 is a {type(value).__name__}, not an array"):
            net.load_state({**state, "b1": value})  # type: ignore[dict-item]
    net.load_state({"W1": [[1.0, 2.0]] * 3, "b1": [0.5, 0.5]})  # lists of numbers still do
    np.testing.assert_array_equal(net.params["b1"], [0.5, 0.5])
