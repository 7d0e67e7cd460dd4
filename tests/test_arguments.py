"""Constructor arguments and calls that would give a silent wrong answer raise, naming what.

The checks live in one place (scratchnn._checks); these tests go through the
public classes, as a user calls them.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import scratchnn as snn
from scratchnn.models import mlp
from scratchnn.optim import SGD, Adam

RNG = np.random.default_rng(0)

# (what is built, the exception, words the message must hold)
BAD: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    (
        "float kernel",
        lambda: snn.MaxPool2d(2.0),
        TypeError,
        "MaxPool2d: kernel_size must be an int",
    ),  # type: ignore[arg-type]
    ("float conv kernel", lambda: snn.Conv2d(3, 4, 3.0, rng=RNG), TypeError, "Conv2d: kernel_size"),  # type: ignore[arg-type]
    ("three sizes", lambda: snn.MaxPool2d((2, 2, 2)), ValueError, "a pair of ints"),  # type: ignore[arg-type]
    ("zero stride", lambda: snn.AvgPool2d(2, 0), ValueError, "stride must be >= 1"),
    ("float channels", lambda: snn.Conv2d(3.0, 4, 3, rng=RNG), TypeError, "in_channels"),  # type: ignore[arg-type]
    ("no channels", lambda: snn.Conv2d(3, 0, 3, rng=RNG), ValueError, "out_channels must be >= 1"),
    (
        "float features",
        lambda: snn.BatchNorm(3.5),
        TypeError,
        "BatchNorm: num_features must be an int",
    ),  # type: ignore[arg-type]
    ("text features", lambda: snn.BatchNorm("3"), TypeError, "num_features"),  # type: ignore[arg-type]
    ("negative eps", lambda: snn.BatchNorm(3, eps=-1.0), ValueError, "eps must be positive"),
    (
        "momentum 2",
        lambda: snn.BatchNorm(3, momentum=2.0),
        ValueError,
        "momentum must be in [0, 1]",
    ),
    ("text p", lambda: snn.Dropout("0.5", rng=RNG), TypeError, "Dropout: p must be a real number"),  # type: ignore[arg-type]
    ("p above 1", lambda: snn.Dropout(1.5, rng=RNG), ValueError, "p must be in [0, 1]"),
    ("bool p", lambda: snn.Dropout(True, rng=RNG), TypeError, "p must be a real number"),
    (
        "nan alpha",
        lambda: snn.LeakyRelu(float("nan")),
        ValueError,
        "LeakyRelu: alpha must be finite",
    ),
    ("text alpha", lambda: snn.Elu("1"), TypeError, "Elu: alpha must be a real number"),  # type: ignore[arg-type]
    ("huge int alpha", lambda: snn.LeakyRelu(10**400), ValueError, "beyond the float range"),
    ("zero beta", lambda: snn.Softplus(0.0), ValueError, "Softplus: beta must be positive"),
    ("negative lr", lambda: SGD(-0.1), ValueError, "SGD: lr must be >= 0"),
    ("beta1 of 1", lambda: Adam(beta1=1.0), ValueError, "Adam: beta1 must be in [0, 1)"),
    # 10**20 reached NumPy's index arithmetic as an OverflowError
    ("huge stride", lambda: snn.MaxPool2d(2, stride=10**20), ValueError, "stride is too large"),
    ("huge features", lambda: snn.BatchNorm(10**20), ValueError, "num_features is too large"),
]


@pytest.mark.parametrize(("build", "error", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_constructor_arguments_raise_naming_the_class_and_argument(
    build: Callable[[], Any], error: type[Exception], words: str
) -> None:
    with pytest.raises(error) as raised:
        build()
    assert words in str(raised.value)


def test_numpy_scalars_are_accepted_as_python_numbers() -> None:
    assert snn.MaxPool2d(np.int64(2)).kernel_size == (2, 2)
    assert snn.BatchNorm(np.int32(3)).num_features == 3
    assert snn.Dropout(np.float32(0.25), rng=RNG).p == 0.25
    assert SGD(np.float64(0.5)).lr == 0.5


def network_and_labels() -> tuple[Any, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    net = mlp([4, 3], rng=rng, dtype=np.float64)
    x = rng.standard_normal((200, 4))
    return net, x, net.predict(x).argmax(-1)


def test_accuracy_takes_indices_or_one_hot_rows_and_refuses_other_shapes() -> None:
    net, x, t = network_and_labels()
    assert net.accuracy(x, t) == 1.0 and net.accuracy(x, np.eye(3)[t]) == 1.0
    # (N, 1) labels once read as one-hot rows: every label became 0, a silent wrong answer
    for labels in (t.reshape(-1, 1), np.eye(5)[t]):
        with pytest.raises(ValueError, match="neither class indices of shape"):
            net.accuracy(x, labels)


@pytest.mark.parametrize(
    ("value", "error", "words"),
    [
        ("1e3", TypeError, "dtype <U3, not a real number type"),
        (1 + 1j, TypeError, "complex128, not a real number type"),
        (True, TypeError, "dtype bool"),
        (1e300, ValueError, "beyond the range of float32"),
    ],
)
def test_load_state_refuses_what_it_would_change_and_changes_nothing(
    value: Any, error: type[Exception], words: str
) -> None:
    net = mlp([2, 3, 2], rng=np.random.default_rng(0))
    before = {key: array.copy() for key, array in net.state().items()}
    state = {key: array.copy() for key, array in before.items()}
    state["b2"] = np.full(state["b2"].shape, value)  # the last array: the others are fine
    with pytest.raises(error, match=f"b2 has .*{words[:12]}"):
        net.load_state(state)
    for key, array in net.state().items():
        assert np.array_equal(array, before[key])
    net.load_state({key: array.astype(np.float64) for key, array in before.items()})  # fits


def test_softmax_with_loss_needs_a_class_axis() -> None:
    with pytest.raises(ValueError, match="needs a class axis, got a scalar"):
        snn.SoftmaxWithLoss().forward(np.float64(1.0), np.array(0))


def test_an_optimizer_names_a_read_only_parameter_and_changes_nothing() -> None:
    params = {"W": np.ones(3), "b": np.zeros(2)}
    params["b"].flags.writeable = False
    with pytest.raises(ValueError, match="parameter 'b' is read-only"):
        SGD(0.1).update(params, {"W": np.ones(3), "b": np.ones(2)})
    assert np.array_equal(params["W"], np.ones(3))



def test_a_masked_array_is_refused_and_a_matrix_read_as_its_values() -> None:
    # np.asarray drops a mask: the masked entries would be computed as if they were data.
    masked = np.ma.array([[1.0, 2.0], [3.0, 4.0]], mask=[[1, 0], [0, 0]])
    with pytest.raises(TypeError, match="AddConstLayer: input is a masked array"):
        snn.AddConstLayer(10.0).forward(masked)
    with pytest.raises(TypeError, match="Sigmoid: input is a masked array"):
        snn.Sigmoid().forward(masked)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)  # NumPy's, on np.matrix
        matrix = np.matrix([[1.0, -2.0], [3.0, -4.0]])
    out = snn.Relu().forward(matrix)
    assert type(out) is np.ndarray
    np.testing.assert_array_equal(out, [[1.0, 0.0], [3.0, 0.0]])


@pytest.mark.parametrize(
    ("build", "words"),
    [
        (lambda: snn.BatchNorm(3, dtype=None), "BatchNorm: dtype must be float16, float32 or float64, got None"),
        (lambda: snn.BatchNorm(3, dtype="abc"), "BatchNorm: dtype must be"),
        (lambda: mlp([4, 2], rng=RNG, dtype=None), "mlp: dtype must be"),
        (lambda: snn.Conv2d(1, 2, 3, rng=RNG, dtype=None), "dtype must be"),
        (lambda: snn.Relu(packed="no"), "Relu: packed must be True or False, got 'no'"),
        (lambda: mlp([4, 2], rng=RNG).train("no"), "Sequential.train: mode must be True or False"),
    ],
)  # fmt: skip
def test_a_dtype_or_flag_that_is_not_one_is_refused(build: Callable[[], Any], words: str) -> None:
    # NumPy reads dtype None as float64 and Python any non-empty string as True: both would
    # pass unnoticed.
    with pytest.raises(TypeError, match=re.escape(words)):
        build()


def test_iterate_minibatches_flags_must_be_bools() -> None:
    from scratchnn.data import iterate_minibatches

    for flag in ("shuffle", "drop_last"):
        with pytest.raises(TypeError, match=f"iterate_minibatches: {flag} must be True or False"):
            iterate_minibatches(np.ones((4, 2)), np.zeros(4), 2, **{flag: "no"})


def test_accuracy_refuses_complex_targets_and_fit_a_history_that_is_not_one() -> None:
    from scratchnn.train import fit

    net = snn.Sequential([snn.Identity()])
    with pytest.raises(TypeError, match=r"Sequential\.accuracy: unsupported targets dtype complex"):
        net.accuracy(np.ones((2, 3)), np.ones((2, 3), complex))
    x, t = np.ones((4, 3)), np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="fit: the network has no parameters to train"):
        fit(net, SGD(0.1), (x, t), epochs=1, batch_size=2, rng=RNG)
    net = snn.Sequential([snn.Affine(np.eye(3), np.zeros(3))])
    with pytest.raises(TypeError, match="fit: history must be a History or None, got str"):
        fit(net, SGD(0.1), (x, t), epochs=1, batch_size=2, rng=RNG, history="abc")  # type: ignore[arg-type]


def test_cnn_channels_as_bytes_are_refused() -> None:
    from scratchnn.models import cnn

    with pytest.raises(TypeError, match="cnn: channels must be a sequence of ints"):
        cnn(rng=RNG, channels=b"ab")  # type: ignore[arg-type]
