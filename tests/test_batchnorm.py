"""BatchNorm against torch.nn.BatchNorm1d/2d over several steps: outputs, gradients, running statistics."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import scratchnn as snn

torch = pytest.importorskip("torch", reason="PyTorch (the test oracle) is not installed")


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5, 2)], ids=["1d", "2d"])
def test_training_steps_then_eval_match_torch(shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    ours = snn.BatchNorm(3, dtype=np.float64)
    module: Any = (torch.nn.BatchNorm1d if len(shape) == 2 else torch.nn.BatchNorm2d)(3)
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
