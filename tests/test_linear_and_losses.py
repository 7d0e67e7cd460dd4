"""Affine and the loss layers against PyTorch (Linear, cross_entropy, mse_loss, BCE with logits)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from conformance import numerical_gradient

import scratchnn as snn

torch = pytest.importorskip("torch", reason="PyTorch (the test oracle) is not installed")
TF = torch.nn.functional


def make_affine(
    n_in: int = 6, n_out: int = 4, dtype: Any = np.float64, seed: int = 0
) -> snn.Affine:
    rng = np.random.default_rng(seed)
    return snn.Affine(
        rng.standard_normal((n_in, n_out)).astype(dtype), rng.standard_normal(n_out).astype(dtype)
    )


# -- Affine ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5, 6), (5, 2, 3), (5, 1, 2, 3), (6,), (0, 6)], ids=str)
def test_affine_matches_torch_linear(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(1)
    layer = make_affine()
    x = rng.standard_normal(shape)
    out = layer.forward(x)
    dout = rng.standard_normal(out.shape)
    dx = layer.backward(dout)

    xt = torch.tensor(x, requires_grad=True)
    W = torch.tensor(layer.W, requires_grad=True)
    b = torch.tensor(layer.b, requires_grad=True)
    flat = xt.reshape(-1, 6) if xt.ndim > 1 else xt
    yt = TF.linear(flat, W.T, b)
    yt.backward(torch.tensor(dout))
    np.testing.assert_allclose(out, yt.detach().numpy(), rtol=1e-12, atol=1e-14)
    assert dx.shape == x.shape
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(layer.dW, W.grad.numpy(), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(layer.db, b.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_affine_numerical_gradients() -> None:
    rng = np.random.default_rng(2)
    layer = make_affine()
    x = rng.standard_normal((3, 6))
    dout = rng.standard_normal((3, 4))
    layer.forward(x)
    dx = layer.backward(dout)

    def through(values: np.ndarray) -> float:
        return float(np.sum(layer.forward(values) * dout))

    np.testing.assert_allclose(dx, numerical_gradient(through, x.copy()), rtol=1e-7)
    np.testing.assert_allclose(
        layer.dW, numerical_gradient(lambda _: through(x), layer.W), rtol=1e-7
    )
    np.testing.assert_allclose(
        layer.db, numerical_gradient(lambda _: through(x), layer.b), rtol=1e-7
    )


def test_affine_keeps_the_arrays_it_is_given() -> None:
    W, b = np.ones((2, 3)), np.zeros(3)
    layer = snn.Affine(W, b)
    assert layer.W is W and layer.b is b and layer.params["W"] is W
    W *= 2.0  # an optimiser updates the params dict in place
    np.testing.assert_array_equal(layer.forward(np.ones((1, 2))), [[4.0, 4.0, 4.0]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_affine_dtypes_and_no_mutation(dtype: Any) -> None:
    layer = make_affine(dtype=dtype)
    x = np.random.default_rng(3).standard_normal((4, 6)).astype(dtype)
    dout = np.ones((4, 4), dtype=np.float64)
    x0, d0 = x.copy(), dout.copy()
    out = layer.forward(x)
    x[...] = 0.0  # the caller reuses its buffer: backward must still use the original x
    dx = layer.backward(dout)
    assert (
        out.dtype == dtype
        and dx.dtype == dtype
        and layer.dW is not None
        and layer.dW.dtype == dtype
    )
    np.testing.assert_allclose(layer.dW, x0.T.astype(np.float64) @ d0, rtol=1e-5)
    np.testing.assert_array_equal(dout, d0)


def test_affine_bad_input() -> None:
    with pytest.raises(ValueError, match=r"W.*\(in, out\)"):
        snn.Affine(np.ones(3), np.ones(3))
    with pytest.raises(TypeError, match="float"):
        snn.Affine(np.ones((2, 2), dtype=np.float32), np.ones(2))
    layer = make_affine()
    with pytest.raises(ValueError, match=r"\(batch, 6\).*\(5, 7\)"):
        layer.forward(np.ones((5, 7)))
    with pytest.raises(RuntimeError, match="Affine"):
        make_affine().backward(np.ones((1, 4)))
    layer.forward(np.ones((2, 6)))
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        layer.backward(np.ones((2, 5)))


# -- losses: one parametrized suite -------------------------------------------------------


def one_hot(t: np.ndarray, k: int) -> np.ndarray:
    return np.eye(k)[t]


LOSSES: list[
    tuple[
        str,
        Callable[[], snn.Loss],
        Callable[[np.random.Generator, tuple[int, ...]], np.ndarray],
        Callable[[Any, Any], Any],
    ]
] = [
    (
        "SoftmaxWithLoss(labels)",
        snn.SoftmaxWithLoss,
        lambda rng, shape: rng.integers(0, shape[-1], shape[:-1]),
        lambda x, t: TF.cross_entropy(x.reshape(-1, x.shape[-1]), t.reshape(-1)),
    ),
    (
        "SoftmaxWithLoss(one-hot)",
        snn.SoftmaxWithLoss,
        lambda rng, shape: one_hot(rng.integers(0, shape[-1], shape[:-1]), shape[-1]),
        lambda x, t: TF.cross_entropy(x.reshape(-1, x.shape[-1]), t.reshape(-1, x.shape[-1])),
    ),
    (
        "MeanSquaredError",
        snn.MeanSquaredError,
        lambda rng, shape: rng.standard_normal(shape),
        TF.mse_loss,
    ),
    (
        "SigmoidWithLoss",
        snn.SigmoidWithLoss,
        lambda rng, shape: rng.uniform(0, 1, shape),
        TF.binary_cross_entropy_with_logits,
    ),
]


@pytest.fixture(params=LOSSES, ids=lambda c: c[0])
def loss_case(request: pytest.FixtureRequest) -> Any:
    return request.param


def torch_loss(
    fn: Callable[[Any, Any], Any], x: np.ndarray, t: np.ndarray, dout: float = 1.0
) -> tuple[float, np.ndarray]:
    xt = torch.tensor(x, requires_grad=True)
    value = fn(xt, torch.tensor(t))
    (value * dout).backward()
    return float(value.detach()), xt.grad.numpy()


@pytest.mark.parametrize("shape", [(8, 5), (5,), (1, 3)], ids=str)
def test_loss_matches_torch(loss_case: Any, shape: tuple[int, ...]) -> None:
    _, make, target, fn = loss_case
    rng = np.random.default_rng(4)
    x = 3 * rng.standard_normal(shape)
    t = target(rng, shape)
    loss = make()
    value = loss.forward(x, t)
    dx = loss.backward(0.7)
    want_value, want_dx = torch_loss(fn, x, t, 0.7)
    assert isinstance(value, float)
    assert value == pytest.approx(want_value, rel=1e-12)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-10, atol=1e-15)


def test_loss_numerical_gradient(loss_case: Any) -> None:
    _, make, target, _ = loss_case
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3))
    t = target(rng, x.shape)
    loss = make()
    loss.forward(x, t)
    dx = loss.backward()
    np.testing.assert_allclose(
        dx, numerical_gradient(lambda v: make().forward(v, t), x.copy()), rtol=1e-6, atol=1e-10
    )


def test_loss_stable_for_huge_logits(loss_case: Any) -> None:
    _, make, target, fn = loss_case
    rng = np.random.default_rng(6)
    x = 1e4 * rng.standard_normal((6, 4))
    t = target(rng, x.shape)
    loss = make()
    with warnings.catch_warnings(), np.errstate(over="raise", divide="raise", invalid="raise"):
        warnings.simplefilter("error")
        value = loss.forward(x, t)
        dx = loss.backward()
    assert np.isfinite(value) and np.all(np.isfinite(dx))
    want_value, want_dx = torch_loss(fn, x, t)
    assert value == pytest.approx(want_value, rel=1e-12)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_loss_dtypes_and_no_mutation(loss_case: Any, dtype: Any) -> None:
    _, make, target, _ = loss_case
    rng = np.random.default_rng(7)
    x = rng.standard_normal((4, 3)).astype(dtype)
    t = target(rng, x.shape)
    x0, t0 = x.copy(), t.copy()
    loss = make()
    loss.forward(x, t)
    dx = loss.backward()
    assert dx.dtype == dtype and dx.shape == x.shape
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(t, t0)


def test_loss_errors(loss_case: Any) -> None:
    _, make, target, _ = loss_case
    loss = make()
    with pytest.raises(RuntimeError, match=type(loss).__name__):
        loss.backward()
    with pytest.raises(ValueError, match="shape"):
        loss.forward(np.ones((4, 3)), np.ones((4, 2)))
    with pytest.raises(TypeError, match="complex"):
        loss.forward(np.ones((2, 3), dtype=complex), target(np.random.default_rng(0), (2, 3)))
    loss.forward(np.ones((2, 3)), target(np.random.default_rng(0), (2, 3)))
    with pytest.raises(ValueError, match="scalar"):
        loss.backward(np.ones(3))


def test_softmax_with_loss_rejects_bad_labels() -> None:
    loss = snn.SoftmaxWithLoss()
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        loss.forward(np.ones((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        loss.forward(np.ones((2, 3)), np.array([-1, 0]))
    with pytest.raises(ValueError, match="integer"):
        loss.forward(np.ones((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="shape"):
        loss.forward(np.ones((2, 3)), np.array([0, 1, 2]))


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint8])
@pytest.mark.parametrize("n_classes", [5, 127, 128, 129, 200, 255, 256, 300])
def test_every_label_outside_the_classes_is_refused_whatever_its_dtype(
    dtype: Any, n_classes: int
) -> None:
    # int8 -57 read as unsigned is 199: a valid class of 200 once, used as an index from
    # the end. PyTorch raises for any label outside [0, C).
    info = np.iinfo(dtype)
    candidates = {info.min, -128, -57, -1, 0, n_classes - 1, n_classes, info.max}
    for label in sorted(v for v in candidates if info.min <= v <= info.max):
        t = np.array([0, label], dtype=dtype)
        x = np.zeros((2, n_classes))
        if 0 <= label < n_classes:
            snn.SoftmaxWithLoss().forward(x, t)
        else:
            with pytest.raises(ValueError, match=rf"\[0, {n_classes}\)"):
                snn.SoftmaxWithLoss().forward(x, t)


def test_logits_at_the_ends_of_the_float_range_raise_no_warning() -> None:
    # -1e308 below its row's maximum 1e308 is 2e308 below, beyond float64: its probability
    # is 0 and the loss exact, with no overflow warning (on both paths), as PyTorch's.
    torch = pytest.importorskip("torch")
    x, t = np.array([[1e308, -1e308, 0.0], [-1e308, 5.0, 1e308]]), np.array([0, 2])
    loss = snn.SoftmaxWithLoss()
    with warnings.catch_warnings(), np.errstate(over="raise", divide="raise", invalid="raise"):
        warnings.simplefilter("error")
        value, dx = loss.forward(x, t), loss.backward()
    tx = torch.tensor(x, requires_grad=True)
    expected = torch.nn.functional.cross_entropy(tx, torch.tensor(t))
    expected.backward()
    assert value == expected.item() == 0.0
    np.testing.assert_array_equal(dx, tx.grad.numpy())


@pytest.mark.parametrize("alpha", [1.5, -2.0, 0.0])
def test_leaky_relu_raises_no_warning_where_its_output_is_exact(alpha: float) -> None:
    # alpha x overflows for |alpha| > 1 (or is 0 * inf) where x itself is the output.
    torch = pytest.importorskip("torch")
    big = np.finfo(np.float64).max
    x = np.array([big, -big, np.inf, -np.inf, 1.0, -1.0, 0.0])
    layer = snn.LeakyRelu(alpha)
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise"):
        warnings.simplefilter("error")
        y = layer.forward(x)
    expected = torch.nn.functional.leaky_relu(torch.tensor(x), alpha).numpy()
    np.testing.assert_array_equal(y, expected)  # the infinities and NaN where PyTorch has them


def test_sigmoid_with_loss_rejects_targets_outside_0_1() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        snn.SigmoidWithLoss().forward(np.zeros(2), np.array([0.5, 2.0]))


def test_sigmoid_with_loss_keeps_the_tiny_loss_of_a_confident_answer() -> None:
    import mpmath

    # A right answer at logit 40 has loss log(1 + exp(-40)) = 4.2e-18; softplus(x) - x t
    # rounds it to 0 (PyTorch gives 0 for x = -40, t = 0). Soft targets as well.
    x = np.array([40.0, -40.0, 9.0, -9.0, 0.3, 700.0, -700.0, 2.5, -2.5])
    t = np.array([1.0, 0.0, 1.0, 0.0, 0.2, 1.0, 0.0, 0.7, 0.3])
    for xi, ti in zip(x, t):
        value = snn.SigmoidWithLoss().forward(np.array([xi]), np.array([ti]))
        xm, tm = mpmath.mpf(float(xi)), mpmath.mpf(float(ti))
        exact = tm * mpmath.log1p(mpmath.exp(-xm)) + (1 - tm) * mpmath.log1p(mpmath.exp(xm))
        assert value == pytest.approx(float(exact), rel=1e-14, abs=0), (xi, ti)


@pytest.mark.parametrize(
    "make, target",
    [
        (snn.SoftmaxWithLoss, lambda rng: rng.integers(0, 4, 6)),
        (snn.SoftmaxWithLoss, lambda rng: np.eye(4)[rng.integers(0, 4, 6)]),
        (snn.SigmoidWithLoss, lambda rng: (rng.random((6, 4)) < 0.5).astype(float)),
        (snn.MeanSquaredError, lambda rng: rng.standard_normal((6, 4))),
    ],
    ids=["labels", "one-hot", "sigmoid", "mse"],
)
def test_changing_the_target_after_forward_does_not_change_backward(
    make: Any, target: Any
) -> None:
    rng = np.random.default_rng(13)
    x, t = rng.standard_normal((6, 4)), target(rng)
    expected = make()
    expected.forward(x, t.copy())
    loss = make()
    loss.forward(x, t)
    t[...] = t[::-1]  # the caller reuses its batch array
    np.testing.assert_array_equal(loss.backward(), expected.backward())


def test_softmax_with_loss_on_rows_that_do_not_sum_to_one_matches_torch() -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(14)
    x = rng.standard_normal((4, 5))
    t = np.array([np.eye(5)[1], np.zeros(5), 2 * np.eye(5)[3], rng.random(5)])  # sums 1, 0, 2, ~2.5
    loss = snn.SoftmaxWithLoss()
    value = loss.forward(x, t)
    dx = loss.backward(0.5)
    xt = torch.tensor(x, requires_grad=True)
    want = torch.nn.functional.cross_entropy(xt, torch.tensor(t))
    (want * 0.5).backward()
    assert value == pytest.approx(want.item(), rel=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("one_hot", [False, True])
def test_softmax_with_loss_averages_over_every_leading_axis(one_hot: bool) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(15)
    x, labels = rng.standard_normal((3, 4, 5)), rng.integers(0, 5, (3, 4))
    t = np.eye(5)[labels] if one_hot else labels
    loss = snn.SoftmaxWithLoss()
    value, dx = loss.forward(x, t), loss.backward()
    xt = torch.tensor(x.reshape(12, 5), requires_grad=True)
    want = torch.nn.functional.cross_entropy(xt, torch.tensor(labels.reshape(12)))
    want.backward()
    assert value == pytest.approx(want.item(), rel=1e-12)
    np.testing.assert_allclose(dx.reshape(12, 5), xt.grad.numpy(), rtol=1e-12, atol=1e-15)


def test_a_failed_forward_leaves_nothing_for_backward() -> None:
    loss = snn.SoftmaxWithLoss()
    loss.forward(np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="labels must lie in"):
        loss.forward(np.zeros((2, 3)), np.array([0, 7]))
    with pytest.raises(RuntimeError, match="before forward"):
        loss.backward()
