"""Whole convolutional networks: a gradient check, learning Fashion-MNIST, save, load, resume, the CLI."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

import scratchnn as snn
from scratchnn.checkpoint import load_model
from scratchnn.cli import main
from scratchnn.data import find_dataset_files, load_fashion_mnist
from scratchnn.optim import Adam
from scratchnn.runs import RunConfig, load_network, preset_config, train_run

try:
    find_dataset_files("fashion-mnist")
    HAVE_DATA = True
except FileNotFoundError:
    HAVE_DATA = False
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="Fashion-MNIST is not installed")


def test_gradcheck_of_a_tiny_cnn() -> None:
    rng = np.random.default_rng(0)
    net = snn.Sequential(
        [
            snn.Conv2d(2, 3, 3, padding=1, rng=rng, dtype=np.float64),
            snn.BatchNorm(3, dtype=np.float64),
            snn.Tanh(),
            snn.MaxPool2d(2),
            snn.Conv2d(3, 4, (2, 3), stride=(1, 2), padding=(0, 1), rng=rng, dtype=np.float64),
            snn.AvgPool2d(2, stride=1),
            snn.Flatten(),
            snn.Affine(0.3 * rng.standard_normal((4, 5)), 0.1 * rng.standard_normal(5)),
            snn.BatchNorm(5, dtype=np.float64),
        ]
    )
    net.params["gamma1"][...] = rng.uniform(0.5, 1.5, 3)
    net.params["b1"][...] = rng.standard_normal(3)
    x = rng.standard_normal((4, 2, 6, 8))
    t = rng.integers(0, 5, 4)
    result = snn.gradcheck(net, x, t)
    assert result.checked == sum(p.size for p in net.params.values())
    # b1 and b3 feed batch norms, which remove any constant: their gradient is 0 and the
    # central differences give rounding noise (~1e-11), 1e-6 of the floor
    assert result.max_relative_error < 1e-5, str(result)


def test_cnn_parameters_are_named_as_in_the_book() -> None:
    net = snn.models.cnn(rng=np.random.default_rng(0), channels=(2, 3), hidden=4, dropout=0.5)
    assert list(net.params) == [
        "W1", "b1", "gamma1", "beta1", "W2", "b2", "gamma2", "beta2", "W3", "b3", "W4", "b4",
    ]  # fmt: skip
    assert net.params["W3"].shape == (3 * 7 * 7, 4)
    assert {"running_mean1", "running_var2"} <= set(net.state())
    net.eval()
    assert not any(getattr(layer, "training", False) for layer in net.layers)
    x = np.random.default_rng(1).standard_normal((2, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(net.predict(x), net.predict(x))  # no dropout in evaluation


@needs_data
def test_a_small_cnn_learns_a_slice_of_fashion_mnist() -> None:
    (x, t), _ = load_fashion_mnist(normalize=True, flatten=False, one_hot_label=False)
    x, t = x[:1000].astype(np.float32), t[:1000]
    net = snn.models.cnn(rng=np.random.default_rng(0), channels=(4, 8), hidden=32, dropout=0.1)
    optimizer = Adam(lr=3e-3)
    rng = np.random.default_rng(1)
    losses = []
    for _ in range(40):
        index = rng.choice(len(x), 50, replace=False)
        optimizer.update(net.params, net.gradient(x[index], t[index]))
        losses.append(net.last_loss)
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
    net.eval()
    assert net.accuracy(x, t) > 0.6  # chance is 0.1


def small_cnn_config(**overrides: object) -> RunConfig:
    settings: dict[str, object] = {
        "channels": [2, 4], "hidden": [8], "dropout": 0.2, "limit": 300, "batch_size": 100,
    }  # fmt: skip
    settings.update(overrides)
    return preset_config("cnn", **settings)


@needs_data
def test_cnn_run_resumes_bit_identical_and_loads(tmp_path: Path) -> None:
    train_run(small_cnn_config(epochs=2), tmp_path / "straight", stream=io.StringIO())
    train_run(small_cnn_config(epochs=1), tmp_path / "split", stream=io.StringIO())
    history = train_run(None, tmp_path / "split", resume=True, epochs=2, stream=io.StringIO())
    assert history.epoch == [1, 2]
    straight, config = load_model(tmp_path / "straight" / "model.safetensors")
    split, _ = load_model(tmp_path / "split" / "model.safetensors")
    assert config["model"] == "cnn" and "running_var2" in straight
    assert all(np.array_equal(straight[k], split[k]) for k in straight)

    network, loaded_config = load_network(tmp_path / "straight" / "model.safetensors")
    assert loaded_config.model == "cnn" and isinstance(network.layers[0], snn.Conv2d)
    (x, _), _ = load_fashion_mnist(normalize=True, flatten=False, one_hot_label=False)
    network.eval()
    scores = network.predict(x[:5].astype(np.float32))
    assert scores.shape == (5, 10) and np.isfinite(scores).all()


@needs_data
def test_train_model_cnn_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    args = ["--model", "cnn", "--channels", "2,2", "--hidden", "8", "--limit", "200"]
    assert main(["train", *args, "--epochs", "1", "--out", str(out)]) == 0
    _, config = load_model(out / "model.safetensors")
    assert config["model"] == "cnn" and config["channels"] == [2, 2]
    assert config["lr_decay"] == preset_config("cnn").lr_decay  # --model cnn chose the cnn preset
    assert main(["evaluate", str(out / "model.safetensors")]) == 0
    assert "test accuracy" in capsys.readouterr().out


def test_bad_cnn_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="one hidden Affine layer"):
        preset_config("cnn", hidden=[8, 8])
    with pytest.raises(ValueError, match="unknown model"):
        preset_config("default", model="rnn")
    with pytest.raises(ValueError, match="dropout"):
        preset_config("cnn", dropout=1.0)
