"""BatchNorm against torch.nn.BatchNorm1d/2d over several steps: outputs, gradients, running statistics."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import scratchnn as snn

torch = pytest.importorskip("torch", reason="PyTorch (the test oracle) is not installed")


@pytest.mark.parametrize(
    "settings", [{}, {"eps": 1e-2, "momentum": 0.3}], ids=["default", "eps 1e-2 momentum 0.3"]
)
@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5, 2)], ids=["1d", "2d"])
def test_training_steps_then_eval_match_torch(
    shape: tuple[int, ...], settings: dict[str, float]
) -> None:
    rng = np.random.default_rng(0)
    ours = snn.BatchNorm(3, dtype=np.float64, **settings)  # type: ignore[arg-type]
    module: Any = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(
        3, **settings
    )
    module = module.double()
    with torch.no_grad():
        module.weight.copy_(torch.tensor([0.5, 1.5, -2.0], dtype=torch.float64))
        module.bias.copy_(torch.tensor([0.1, -0.3, 2.0], dtype=torch.float64))
    ours.gamma[...] = [0.5, 1.5, -2.0]
    ours.beta[...] = [0.1, -0.3, 2.0]
    for step in range(4):
        x = 3.0 * rng.standard_normal(shape) + step  # the statistics move from step to step
        dout = rng.standard_normal(shape)
        xt = torch.tensor(x, requires_grad=True)
        module.zero_grad()
        yt = module(xt)
        yt.backward(torch.tensor(dout))
        out = ours.forward(x)
        dx = ours.backward(dout)
        np.testing.assert_allclose(out, yt.detach().numpy(), rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(ours.dgamma, module.weight.grad.numpy(), rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(ours.dbeta, module.bias.grad.numpy(), rtol=1e-10, atol=1e-13)
        # the unbiased variance in the running estimate, the biased one in the output
        np.testing.assert_allclose(ours.running_mean, module.running_mean.numpy(), rtol=1e-12)
        np.testing.assert_allclose(ours.running_var, module.running_var.numpy(), rtol=1e-12)
    module.eval()
    ours.training = False
    x = rng.standard_normal(shape)
    dout = rng.standard_normal(shape)
    xt = torch.tensor(x, requires_grad=True)
    yt = module(xt)
    yt.backward(torch.tensor(dout))
    mean_before = ours.running_mean.copy()
    np.testing.assert_allclose(ours.forward(x), yt.detach().numpy(), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(ours.backward(dout), xt.grad.numpy(), rtol=1e-10, atol=1e-13)
    np.testing.assert_array_equal(ours.running_mean, mean_before)  # eval updates nothing


def test_running_var_uses_the_unbiased_variance() -> None:
    bn = snn.BatchNorm(1, momentum=1.0, dtype=np.float64)
    out = bn.forward(np.array([[1.0], [3.0]]))
    np.testing.assert_allclose(bn.running_var, [2.0])  # unbiased: 2, biased: 1
    np.testing.assert_allclose(out[:, 0], [-1.0, 1.0], rtol=1e-5)  # normalised by the biased one


def test_sequential_names_and_saves_the_running_statistics() -> None:
    rng = np.random.default_rng(1)
    net = snn.Sequential(
        [
            snn.Affine(rng.standard_normal((4, 3)), np.zeros(3)),
            snn.BatchNorm(3, dtype=np.float64),
            snn.Relu(),
            snn.Affine(rng.standard_normal((3, 2)), np.zeros(2)),
            snn.BatchNorm(2, dtype=np.float64),
        ]
    )
    assert list(net.params) == ["W1", "b1", "gamma1", "beta1", "W2", "b2", "gamma2", "beta2"]
    state = net.state()
    assert {"running_mean1", "running_var1", "running_mean2", "running_var2"} <= set(state)
    x, t = rng.standard_normal((6, 4)), rng.integers(0, 2, 6)
    net.gradient(x, t)
    other = snn.Sequential(
        [
            snn.Affine(np.zeros((4, 3)), np.zeros(3)),
            snn.BatchNorm(3, dtype=np.float64),
            snn.Relu(),
            snn.Affine(np.zeros((3, 2)), np.zeros(2)),
            snn.BatchNorm(2, dtype=np.float64),
        ]
    )
    other.load_state(net.state())
    net.eval()
    other.eval()
    np.testing.assert_array_equal(other.predict(x), net.predict(x))


def test_training_with_one_value_per_channel_raises() -> None:
    with pytest.raises(ValueError, match=r"BatchNorm.*more than one value.*\(1, 3\)"):
        snn.BatchNorm(3).forward(np.ones((1, 3)))
    bn = snn.BatchNorm(3)
    bn.training = False
    assert bn.forward(np.ones((1, 3))).shape == (1, 3)  # evaluation needs no batch statistics


@pytest.mark.parametrize(
    "kwargs",
    [{"num_features": 0}, {"num_features": 2, "eps": 0.0}, {"num_features": 2, "momentum": 1.5}],
)
def test_bad_settings_raise(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="BatchNorm"):
        snn.BatchNorm(**kwargs)


@pytest.mark.parametrize("shape", [(400_000, 4), (2000, 4, 10, 10)], ids=["1d", "2d"])
def test_float32_statistics_of_a_large_batch_are_summed_in_float64(
    shape: tuple[int, ...],
) -> None:
    rng = np.random.default_rng(7)
    x = (3.0 + rng.standard_normal(shape)).astype(np.float32)  # an offset: the hard case
    ours = snn.BatchNorm(4, dtype=np.float32)
    exact = snn.BatchNorm(4, dtype=np.float64)
    error = np.max(np.abs(ours.forward(x) - exact.forward(x.astype(np.float64))))
    assert error < 2e-5  # float32 sums: about 1e-3
    np.testing.assert_allclose(ours.running_mean, exact.running_mean, rtol=1e-6)
    np.testing.assert_allclose(ours.running_var, exact.running_var, rtol=1e-5)


def test_float16_is_computed_in_float32() -> None:
    rng = np.random.default_rng(8)
    x = (2.0 * rng.standard_normal((64, 3))).astype(np.float16)
    dout = rng.standard_normal((64, 3)).astype(np.float16)
    half, wide = snn.BatchNorm(3, dtype=np.float16), snn.BatchNorm(3, dtype=np.float32)
    out, want = half.forward(x), wide.forward(x.astype(np.float32))
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, want.astype(np.float16))  # rounded once at the end
    dx = half.backward(dout)
    np.testing.assert_array_equal(dx, wide.backward(dout.astype(np.float32)).astype(np.float16))


def test_first_in_a_network_its_parameter_gradients_match_torch() -> None:
    # First, BatchNorm computes only dgamma and dbeta (the input's gradient is not needed).
    rng = np.random.default_rng(9)
    net = snn.Sequential([snn.BatchNorm(5, dtype=np.float64), snn.Affine(
        rng.standard_normal((5, 3)), np.zeros(3))])  # fmt: skip
    x, t = rng.standard_normal((16, 5)), rng.integers(0, 3, 16)
    grads = net.gradient(x, t)
    bn, linear = torch.nn.BatchNorm1d(5).double(), torch.nn.Linear(5, 3).double()
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(net.params["W1"].T))
        linear.bias.zero_()
    loss = torch.nn.functional.cross_entropy(linear(bn(torch.tensor(x))), torch.tensor(t))
    loss.backward()
    np.testing.assert_allclose(grads["gamma1"], bn.weight.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(grads["beta1"], bn.bias.grad.numpy(), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("make", [lambda: snn.BatchNorm(3, dtype=np.float64),
                                  lambda: snn.Dropout(0.5, rng=np.random.default_rng(0))],
                         ids=["BatchNorm", "Dropout"])  # fmt: skip
def test_a_mode_switch_between_forward_and_backward_does_not_change_backward(make: Any) -> None:
    rng = np.random.default_rng(10)
    x, dout = rng.standard_normal((6, 3)), rng.standard_normal((6, 3))
    steady, switched = make(), make()
    steady.forward(x)
    switched.forward(x)
    switched.training = False  # backward differentiates the forward that ran: training mode
    np.testing.assert_array_equal(switched.backward(dout), steady.backward(dout))
