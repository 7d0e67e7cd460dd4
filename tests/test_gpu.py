"""The GPU path: every layer, optimiser and network on CuPy against NumPy float64.

Each test runs on the ``gpu`` fixture's devices (tests/conftest.py): ``fake``
(tests/fake_cupy.py, CuPy's strictness on NumPy arrays, so it runs everywhere
and finds NumPy hard-coded where CuPy would fail), ``fake-kernels`` (the same
with the CUDA kernels compiled for the CPU, tests/fake_cuda.py) and ``cuda``
(real CuPy and the fused CUDA kernels), which skips with its reason where no
GPU is present. Inputs are fresh random numbers, never zeros. The other GPU
tests: test_gpu_kernels.py (the CUDA kernels themselves), test_gpu_products.py
(Affine's bias kernels, cuBLAS products, the Affine and Relu pair),
test_gpu_steps.py (fit's steps replayed from a CUDA graph),
test_gpu_benchmarks.py (the GPU benchmarks' checks and counts).
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import fake_cuda
import fake_cupy
import numpy as np
import pytest
from conformance import CASES, Case, away_from_kinks
from gpu_support import blobs, real_cupy_reason, require_fashion_mnist

import scratchnn as snn
from scratchnn.backend import device_of, get_array_module, move_arrays, to_device, to_host
from scratchnn.models import cnn
from scratchnn.optim import SGD, make_optimizer

# -- every element-wise layer on the device -------------------------------------------------


_ON_DEVICE = {
    "Relu", "Relu(packed)", "Sigmoid", "Tanh", "LeakyRelu", "LeakyRelu(0.2)", "Elu", "Elu(0.5)",
    "Gelu", "Gelu(tanh)", "Softplus", "Softplus(2)", "Silu", "Softmax", "Softmax(axis=0)",
    "Identity", "MulConstLayer(-1)", "AddConstLayer(1)", "ExpLayer", "ReciprocalLayer",
}  # fmt: skip


DEVICE_CASES = [case for case in CASES if case.name in _ON_DEVICE]


TOLERANCE = {np.float64: (1e-12, 1e-14), np.float32: (2e-6, 1e-6)}


def _inputs(case: Case, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = away_from_kinks(case.scale * rng.standard_normal(shape), case.kinks)
    return x, rng.standard_normal(shape)


def _close(actual: Any, expected: np.ndarray, dtype: Any) -> None:
    rtol, atol = TOLERANCE[dtype]
    np.testing.assert_allclose(to_host(actual).astype(np.float64), expected, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(7, 33), (4, 256), (3,)], ids=str)
@pytest.mark.parametrize("case", DEVICE_CASES, ids=str)
def test_layer_on_device_matches_numpy_float64(
    case: Case, shape: tuple[int, ...], dtype: Any, gpu: Any
) -> None:
    x, dout = _inputs(case, shape, seed=len(case.name) * 1000 + shape[0])
    reference = case.make()
    y64, dx64 = reference.forward(x), reference.backward(dout)
    layer = case.make()
    y = layer.forward(gpu.asarray(x.astype(dtype)))
    dx = layer.backward(gpu.asarray(dout.astype(dtype)))
    for result in (y, dx):
        assert device_of(result) == "cuda" and result.dtype == dtype and result.shape == shape
    _close(y, y64, dtype)
    _close(dx, dx64, dtype)
    if hasattr(reference, "mask") and reference.mask is not None:
        assert (to_host(layer.mask) == reference.mask).all()


@pytest.mark.parametrize("case", DEVICE_CASES, ids=str)
def test_non_contiguous_device_input(case: Case, gpu: Any) -> None:
    x, dout = _inputs(case, (6, 40), seed=7)
    reference = case.make()
    y64, dx64 = reference.forward(x[:, ::2]), reference.backward(dout[:, ::2])
    layer = case.make()
    y = layer.forward(gpu.asarray(x)[:, ::2])
    dx = layer.backward(gpu.asarray(dout)[:, ::2])
    _close(y, y64, np.float64)
    _close(dx, dx64, np.float64)


@pytest.mark.parametrize("case", DEVICE_CASES, ids=str)
def test_device_input_at_an_unaligned_address(case: Case, gpu: Any) -> None:
    # A contiguous view one element in: the kernels' 16-byte vector loads must not be used
    # there (a GPU faults on a misaligned vector access; so does the CPU stand-in).
    x, dout = _inputs(case, (241,), seed=9)
    x32, dout32 = x.astype(np.float32), dout.astype(np.float32)
    reference = case.make()
    y32, dx32 = reference.forward(x32[1:]), reference.backward(dout32[1:])
    layer = case.make()
    y = layer.forward(gpu.asarray(x32)[1:])
    dx = layer.backward(gpu.asarray(dout32)[1:])
    np.testing.assert_allclose(to_host(y), y32, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(to_host(dx), dx32, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("make", [snn.MulLayer, snn.AddLayer], ids=lambda m: m.__name__)
def test_the_graphs_two_input_nodes_on_device(make: Any, gpu: Any) -> None:
    # x (3, 4) against y broadcast from (4,), and against a Python number.
    rng = np.random.default_rng(24)
    x, y, dout = rng.standard_normal((3, 4)), rng.standard_normal(4), rng.standard_normal((3, 4))
    for other in (y, 2.5):
        host, device = make(), make()
        want = host.forward(x, other)
        got = device.forward(to_device(x, "cuda"), to_device(other, "cuda"))
        want_dx, want_dy = host.backward(dout)
        dx, dy = device.backward(to_device(dout, "cuda"))
        assert device_of(got) == device_of(dx) == "cuda"
        np.testing.assert_allclose(to_host(got), want, rtol=1e-15)
        np.testing.assert_allclose(to_host(dx), want_dx, rtol=1e-15)
        # dy sums over the broadcast axis: CuPy's reduction adds in another order than
        # NumPy's ((a + c) + b for three rows), a few ulps apart.
        np.testing.assert_allclose(to_host(dy), want_dy, rtol=1e-13, atol=1e-15)


def test_the_chain_of_the_seeds_figures_refuses_device_arrays(gpu: Any) -> None:
    from scratchnn.graph.chain import sigmoid_chain

    chain = sigmoid_chain()
    with pytest.raises(TypeError, match="Chain runs on the CPU"):
        chain.forward(to_device(np.array([-1.0, 0.5]), "cuda"))
    chain.forward(np.array([-1.0, 0.5]))
    with pytest.raises(TypeError, match="Chain runs on the CPU"):
        chain.backward(to_device(np.ones(2), "cuda"))


def test_integer_relu_on_device(gpu: Any) -> None:
    x = np.random.default_rng(3).integers(-5, 5, (4, 5)).astype(np.int32)
    y = snn.Relu().forward(gpu.asarray(x))
    assert y.dtype == np.int32 and (to_host(y) == np.maximum(x, 0)).all()


# -- every other layer and loss on the device ---------------------------------------------

# name -> (a maker of the layer in float64 from a seed, the input shape). Two calls with
# one seed make equal layers, so the CPU run is the oracle of the device run.
_LAYERS: dict[str, tuple[Any, tuple[int, ...]]] = {
    "Affine": (lambda r: snn.Affine(r.standard_normal((12, 5)), r.standard_normal(5)), (6, 12)),
    "Affine(4-d x)": (lambda r: snn.Affine(r.standard_normal((18, 4)), r.standard_normal(4)),
                      (3, 2, 3, 3)),
    "Conv2d": (lambda r: snn.Conv2d(3, 4, 3, padding=1, rng=r, dtype=np.float64), (2, 3, 6, 5)),
    "Conv2d(stride 2)": (lambda r: snn.Conv2d(2, 3, (3, 2), stride=2, rng=r, dtype=np.float64),
                         (2, 2, 7, 6)),
    "MaxPool2d": (lambda r: snn.MaxPool2d(2), (2, 3, 6, 6)),
    "MaxPool2d(3, 2, 1)": (lambda r: snn.MaxPool2d(3, 2, 1), (2, 2, 7, 5)),
    "AvgPool2d": (lambda r: snn.AvgPool2d(2), (2, 3, 6, 6)),
    "AvgPool2d(3, 2, 1)": (lambda r: snn.AvgPool2d(3, 2, 1), (2, 2, 7, 5)),
    "Flatten": (lambda r: snn.Flatten(), (3, 2, 4)),
    "BatchNorm(2-d)": (lambda r: snn.BatchNorm(5, dtype=np.float64), (8, 5)),
    "BatchNorm(4-d)": (lambda r: snn.BatchNorm(3, dtype=np.float64), (4, 3, 5, 5)),
    "Dropout": (lambda r: snn.Dropout(0.4, rng=r), (6, 20)),
}  # fmt: skip


@pytest.mark.parametrize("name", list(_LAYERS))
def test_every_layer_on_device_matches_the_cpu(name: str, gpu: Any) -> None:
    make, shape = _LAYERS[name]
    rng = np.random.default_rng(31)
    x, dout_rng = rng.standard_normal(shape), np.random.default_rng(32)
    results = []
    for device in ("cpu", "cuda"):
        layer = make(np.random.default_rng(33))
        move_arrays(layer, device)
        y = layer.forward(to_device(x, device))
        dx = layer.backward(to_device(dout_rng.standard_normal(y.shape), device))
        dout_rng = np.random.default_rng(32)  # the same dout for the second device
        grads = {k: to_host(v) for k, v in getattr(layer, "grads", {}).items()}
        assert device_of(y) == device_of(dx) == device
        results.append((to_host(y), to_host(dx), grads))
    (y64, dx64, grads64), (y, dx, grads) = results
    np.testing.assert_allclose(y, y64, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, dx64, rtol=1e-12, atol=1e-14)
    assert grads.keys() == grads64.keys()
    for key in grads64:
        np.testing.assert_allclose(grads[key], grads64[key], rtol=1e-12, atol=1e-14, err_msg=key)


@pytest.mark.parametrize(
    "make",
    [snn.Elu, lambda: snn.Gelu(), lambda: snn.Gelu("tanh"), snn.Silu, snn.Sigmoid, snn.LeakyRelu],
    ids=["Elu", "Gelu", "Gelu(tanh)", "Silu", "Sigmoid", "LeakyRelu"],
)
@pytest.mark.parametrize("route", ["cpu, cuda | cpu", "cpu | cuda", "cuda | cpu"])
def test_a_layer_moved_between_forward_and_backward_differentiates_its_last_input(
    make: Any, route: str, gpu: Any
) -> None:
    # "a, b | c": forward on a, then on b, then the layer moves to c for backward.
    rng = np.random.default_rng(51)
    first, last, dout = (rng.standard_normal(9) for _ in range(3))
    reference = make()
    reference.forward(last)
    expected = reference.backward(dout)
    forwards, backward_device = route.split(" | ")
    devices = forwards.split(", ")
    layer = make()
    for device, x in zip(devices, [first, last][-len(devices) :]):
        move_arrays(layer, device)
        layer.forward(to_device(x, device))
    move_arrays(layer, backward_device)
    dx = layer.backward(to_device(dout, backward_device))
    assert device_of(dx) == backward_device
    np.testing.assert_allclose(to_host(dx), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize(
    "make",
    [snn.SoftmaxWithLoss, snn.SigmoidWithLoss, snn.MeanSquaredError],
    ids=lambda m: m.__name__,
)
def test_every_loss_on_device_matches_the_cpu(make: Any, one_hot: bool, gpu: Any) -> None:
    rng = np.random.default_rng(41)
    x = rng.standard_normal((7, 5))
    labels = rng.integers(0, 5, 7)
    if make is snn.SoftmaxWithLoss and not one_hot:
        t = labels
    elif make is snn.SigmoidWithLoss:
        t = (rng.random((7, 5)) < 0.5).astype(np.float64)
    else:
        t = np.eye(5)[labels]
    results = []
    for device in ("cpu", "cuda"):
        loss = make()
        value = loss.forward(to_device(x, device), to_device(t, device))
        dx = loss.backward(1.0)
        assert device_of(dx) == device
        results.append((float(value), to_host(dx)))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-12)
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("route", ["cuda | cpu", "cpu | cuda", "cuda | cpu | cuda"])
def test_softmax_cross_entropy_moved_between_forward_and_backward(route: str, gpu: Any) -> None:
    # "a | b | c": forward on a, then the layer's arrays move to b (and c) before backward.
    # The kernels forward chose must not be handed host arrays, nor be missed back on the card.
    rng = np.random.default_rng(43)
    x, t = rng.standard_normal((6, 4)), rng.integers(0, 4, 6)
    reference = snn.SoftmaxWithLoss()
    expected_loss = reference.forward(x, t)
    expected = reference.backward(1.0)
    first, *moves = route.split(" | ")
    loss = snn.SoftmaxWithLoss()
    value = loss.forward(to_device(x, first), to_device(t, first))
    for device in moves:
        move_arrays(loss, device)
    dx = loss.backward(1.0)
    assert device_of(dx) == moves[-1]
    assert value == pytest.approx(expected_loss, rel=1e-12)
    np.testing.assert_allclose(to_host(dx), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("case", DEVICE_CASES, ids=str)
def test_backward_refuses_dout_on_the_other_device(case: Case, gpu: Any) -> None:
    x, dout = _inputs(case, (3, 4), 8)
    for forward_on, dout_on in [("cuda", "cpu"), ("cpu", "cuda")]:
        layer = case.make()
        layer.forward(to_device(x, forward_on))
        with pytest.raises(TypeError, match=f"dout is on {dout_on}, but the layer's arrays are on"):
            layer.backward(to_device(dout, dout_on))


@pytest.mark.parametrize("label_dtype", [np.int64, np.int32, np.uint8, np.int8])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(600, 10), (3, 1), (7,), (2, 3, 4)], ids=str)
def test_softmax_cross_entropy_on_class_indices_matches_float64(
    shape: tuple[int, ...], dtype: Any, label_dtype: Any, gpu: Any
) -> None:
    rng = np.random.default_rng(sum(shape))
    x = 4 * rng.standard_normal(shape)
    t = rng.integers(0, shape[-1], shape[:-1]).astype(label_dtype)
    expected = snn.SoftmaxWithLoss()
    want = expected.forward(x, t)
    want_dx = expected.backward(0.7)
    loss = snn.SoftmaxWithLoss()
    got = loss.forward(to_device(x.astype(dtype), "cuda"), to_device(t, "cuda"))
    dx = loss.backward(0.7)
    assert got == pytest.approx(want, rel=TOLERANCE[dtype][0])
    assert dx.dtype == dtype and device_of(dx) == "cuda"
    _close(dx, want_dx, dtype)
    _close(loss.y, expected.y, dtype)


@pytest.mark.parametrize("bad", [5, -1, 200])
def test_softmax_cross_entropy_refuses_labels_out_of_range_on_the_device(
    bad: int, gpu: Any
) -> None:
    rng = np.random.default_rng(3)
    x, t = rng.standard_normal((9, 5)), rng.integers(0, 5, 9)
    t[4] = bad
    with pytest.raises(ValueError) as on_cpu:
        snn.SoftmaxWithLoss().forward(x, t)
    loss = snn.SoftmaxWithLoss()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\), got values from") as raised:
        loss.forward(to_device(x, "cuda"), to_device(t, "cuda"))
    assert str(raised.value) == str(on_cpu.value)  # the values themselves, not their repr
    with pytest.raises(RuntimeError, match="before forward"):
        loss.backward()


def test_softmax_cross_entropy_refuses_host_labels_beside_a_device_prediction(gpu: Any) -> None:
    x, t = np.random.default_rng(4).standard_normal((6, 3)), np.array([0, 1, 2, 0, 1, 2])
    with pytest.raises(TypeError):
        snn.SoftmaxWithLoss().forward(to_device(x, "cuda"), t)


def test_softmax_cross_entropy_keeps_nan_and_infinity_as_the_cpu(gpu: Any) -> None:
    x = np.array([[1.0, np.nan, 2.0], [np.inf, 0.0, 1.0], [-np.inf, 0.0, 1.0], [1e4, -1e4, 0.0]])
    t = np.array([0, 1, 2, 0])
    results = []
    for device in ("cpu", "cuda"):
        loss = snn.SoftmaxWithLoss()
        with np.errstate(invalid="ignore"):
            value = loss.forward(to_device(x, device), to_device(t, device))
            results.append((value, to_host(loss.y), to_host(loss.backward())))
    (cpu_loss, cpu_y, cpu_dx), (loss_value, y, dx) = results
    assert np.isnan(cpu_loss) and np.isnan(loss_value)
    np.testing.assert_allclose(y, cpu_y, rtol=1e-15)  # NaN in the same places
    np.testing.assert_allclose(dx, cpu_dx, rtol=1e-15)


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_a_training_step_on_the_device_waits_for_the_card_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = fake_cupy.install(monkeypatch, kernels=True)
    rng = np.random.default_rng(5)
    net = snn.mlp([20, 16, 16, 4], rng=rng).to("cuda")
    optimizer = make_optimizer("sgd", lr=0.1)
    x, t = fake.asarray(rng.standard_normal((40, 20))), fake.asarray(rng.integers(0, 4, 40))
    optimizer.update(net.params, net.gradient(x, t))  # first use: buffers, compilation
    fake_cupy.transfers.clear()
    fake_cuda.launches.clear()
    optimizer.update(net.params, net.gradient(x, t))
    assert fake_cupy.transfers == ["get"]  # the loss and the labels' check, together
    # One launch for the loss, the last Affine's bias added in it and its gradient
    # written beside it (none for backward).
    assert [n for n in fake_cuda.launches if "xent" in n] == ["softmax_xent_bias_grad"]
    assert [n for n in fake_cuda.launches if n.startswith("sgd")] == ["sgd_x6"]  # one step


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_fits_steps_on_the_device_leave_their_losses_unread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # fit checked every label before its first step, so no step waits for the card: the
    # losses are read together when the bar draws and at the end of the epoch.
    from scratchnn.train import fit

    fake = fake_cupy.install(monkeypatch, kernels=True)
    x, t = blobs(300, 6)
    runs = []
    for device, stream in (("cpu", _Terminal()), ("cuda", _Terminal()), ("cuda", io.StringIO())):
        net = snn.mlp([20, 16, 10], rng=np.random.default_rng(0), dtype=np.float64).to(device)
        optimizer = make_optimizer("sgd", lr=0.1)
        reads_at_steps: list[int] = []
        update = optimizer.update

        def counted(
            params: Any, grads: Any, update: Any = update, reads: list[int] = reads_at_steps
        ) -> None:
            update(params, grads)
            reads.append(len(fake_cupy.transfers))

        optimizer.update = counted  # type: ignore[method-assign]
        data = (to_device(x.astype(np.float64), device), to_device(t, device))
        fake_cupy.transfers.clear()
        fit(net, optimizer, data, epochs=1, batch_size=20, rng=np.random.default_rng(5),
            train_eval_size=100, progress_stream=stream)  # fmt: skip
        runs.append((stream.getvalue(), net, reads_at_steps))
    (cpu_bar, cpu_net, _), (bar, _, _), (quiet, net, reads_at_steps) = runs
    # The bar's running mean of every step's loss, as on the CPU (the bar reads the losses
    # when it draws: at most 20 times a second).
    assert bar.rsplit(" loss ", 1)[1].split()[0] == cpu_bar.rsplit(" loss ", 1)[1].split()[0]
    # No bar to draw: no step read anything.
    assert quiet == "" and len(reads_at_steps) == 15 and len(set(reads_at_steps)) == 1
    fake_cupy.transfers.clear()
    assert net.last_loss == pytest.approx(cpu_net.last_loss, rel=1e-12)
    assert net.last_loss == pytest.approx(cpu_net.last_loss, rel=1e-12)
    assert fake_cupy.transfers == ["get"]  # read once, then kept
    assert fake.asarray(1.0).get() == 1.0  # (the fake device in use above)


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_a_loss_left_on_the_device_checks_the_labels_when_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from scratchnn.layers.losses import DeviceLoss, read_losses

    fake = fake_cupy.install(monkeypatch, kernels=True)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((6, 4))
    good, bad = np.array([0, 1, 2, 3, 0, 1]), np.array([0, 1, 7, 3, 0, 1])
    cpu_loss = snn.SoftmaxWithLoss().forward(x, good)
    losses = []
    for t in (good, bad):
        loss = snn.SoftmaxWithLoss()
        unread = loss._checked_forward(fake.asarray(x), fake.asarray(t), borrowed=True, wait=False)
        assert type(unread) is DeviceLoss
        losses.append(unread)
    fake_cupy.transfers.clear()
    assert read_losses([0.5, losses[0], 1.5, losses[0]]) == pytest.approx(
        [0.5, cpu_loss, 1.5, cpu_loss], rel=1e-12
    )
    assert fake_cupy.transfers == ["get"]  # several, one wait
    with pytest.raises(ValueError, match=r"SoftmaxWithLoss: labels must lie in \[0, 4\), got "
                       r"values from 0 to 7"):  # fmt: skip
        float(losses[1])
    with pytest.raises(ValueError, match="labels must lie in"):
        read_losses([losses[0], losses[1]])
    # Waiting (forward, Sequential.gradient), the bad labels raise at once and backward
    # after it refuses, as on the CPU.
    loss = snn.SoftmaxWithLoss()
    with pytest.raises(ValueError, match="labels must lie in"):
        loss.forward(fake.asarray(x), fake.asarray(bad))
    with pytest.raises(RuntimeError, match="before forward"):
        loss.backward()


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_fit_still_checks_the_labels_of_the_losses_it_left_unread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Labels out of range never reach a step (fit checks them first); were that check
    # missing, the epoch's read of its losses would still refuse them.
    from scratchnn import train

    fake = fake_cupy.install(monkeypatch, kernels=True)
    x, t = blobs(60, 7)
    t[45] = 10  # beyond the batch that fit runs first: found by the check of every label
    net = snn.mlp([20, 8, 10], rng=np.random.default_rng(0)).to("cuda")
    data = (fake.asarray(x), fake.asarray(t))
    with pytest.raises(ValueError, match=r"fit: the training set: labels must lie in \[0, 10\)"):
        train.fit(net, SGD(0.1), data, epochs=1, batch_size=20, rng=np.random.default_rng(0))
    monkeypatch.setattr(train, "_check_set", lambda *args: True)  # "checked"
    monkeypatch.setattr(train, "evaluate", lambda *args: (0.0, 0.0))  # (which would wait)
    with pytest.raises(ValueError, match=r"SoftmaxWithLoss: labels must lie in \[0, 10\)"):
        train.fit(net, SGD(0.1), data, epochs=1, batch_size=20, rng=np.random.default_rng(0))


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_fit_waits_for_each_loss_where_it_could_not_check_the_labels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One class: no answers to count, so fit's check of every label leaves it to the loss.
    # Each step then reads its loss, and the batch with a bad label stops the run there,
    # before its step, not at the end of the epoch.
    from scratchnn.train import fit

    fake = fake_cupy.install(monkeypatch, kernels=True)
    x, t = blobs(60, 8)
    t[:] = 0
    t[45] = 1
    net = snn.mlp([20, 8, 1], rng=np.random.default_rng(0)).to("cuda")
    optimizer = SGD(0.1)
    steps: list[int] = []
    update = optimizer.update

    def counted(params: Any, grads: Any) -> None:
        steps.append(1)
        update(params, grads)

    optimizer.update = counted  # type: ignore[method-assign]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 1\)"):
        fit(net, optimizer, (fake.asarray(x), fake.asarray(t)), epochs=1, batch_size=20,
            rng=np.random.default_rng(0))  # fmt: skip
    assert len(steps) < 3


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_evaluate_on_the_device_takes_large_batches_and_gives_the_cpus_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each batch costs its launches there: 2500 examples are 3 batches, not 20.
    from scratchnn.train import DEVICE_EVAL_BATCH, evaluate

    fake = fake_cupy.install(monkeypatch, kernels=True)
    rng = np.random.default_rng(10)
    net = snn.mlp([12, 8, 4], rng=rng, dtype=np.float64)
    x, t = rng.standard_normal((2500, 12)), rng.integers(0, 4, 2500)
    want = evaluate(net, x, t)
    net.to("cuda")
    x_device, t_device = fake.asarray(x), fake.asarray(t)
    fake_cuda.launches.clear()
    fake_cupy.transfers.clear()
    got = evaluate(net, x_device, t_device)
    assert fake_cuda.launches.count("softmax_xent") == -(-2500 // DEVICE_EVAL_BATCH) == 3
    # No wait per batch: the losses are read together at the end, then the correct answers.
    assert fake_cupy.transfers == ["get", "__float__"]
    assert got[1] == want[1]
    assert got[0] == pytest.approx(want[0], rel=1e-12)


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_softmax_cross_entropy_of_a_wide_row_keeps_float32s_digits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One thread sums each row in order: in float32 a row of 65536 classes lost about
    # five digits of the softmax (9e-5); summed in double it keeps float32's.
    from scratchnn.kernels import cross_entropy

    fake = fake_cupy.install(monkeypatch, kernels=True)
    monkeypatch.setattr(cross_entropy, "MAX_CLASSES", 1 << 16)
    rng = np.random.default_rng(8)
    x, t = rng.standard_normal((2, 1 << 16)), rng.integers(0, 1 << 16, 2)
    fake_cuda.launches.clear()
    loss = snn.SoftmaxWithLoss()
    value = loss.forward(fake.asarray(x.astype(np.float32)), fake.asarray(t))
    assert fake_cuda.launches == ["softmax_xent"]
    expected = snn.SoftmaxWithLoss()
    want = expected.forward(x.astype(np.float32).astype(np.float64), t)
    assert value == pytest.approx(want, rel=1e-6)
    np.testing.assert_allclose(loss.y.get(), expected.y, rtol=2e-6)


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_softmax_cross_entropy_of_rows_wider_than_the_kernels_uses_array_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from scratchnn.kernels import cross_entropy

    fake = fake_cupy.install(monkeypatch, kernels=True)
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, cross_entropy.MAX_CLASSES + 1))
    t = rng.integers(0, x.shape[1], 3)
    fake_cuda.launches.clear()
    loss = snn.SoftmaxWithLoss()
    value = loss.forward(fake.asarray(x), fake.asarray(t))
    assert "softmax_xent" not in fake_cuda.launches
    assert value == pytest.approx(snn.SoftmaxWithLoss().forward(x, t), rel=1e-12)


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_softmax_cross_entropy_beyond_one_block_uses_array_calls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from scratchnn.kernels import cross_entropy

    fake = fake_cupy.install(monkeypatch, kernels=True)
    monkeypatch.setattr(cross_entropy, "MAX_ELEMENTS", 50)
    rng = np.random.default_rng(6)
    x, t = rng.standard_normal((11, 5)), rng.integers(0, 5, 11)
    fake_cuda.launches.clear()
    loss = snn.SoftmaxWithLoss()
    value = loss.forward(fake.asarray(x), fake.asarray(t))
    dx = loss.backward()
    assert "softmax_xent" not in fake_cuda.launches
    expected = snn.SoftmaxWithLoss()
    assert value == pytest.approx(expected.forward(x, t), rel=1e-12)
    np.testing.assert_allclose(dx.get(), expected.backward(), rtol=1e-12)


# -- optimisers ---------------------------------------------------------------------------


OPTIMIZERS = ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_refuses_a_gradient_on_the_other_device(name: str, gpu: Any) -> None:
    for param_on, grad_on in [("cuda", "cpu"), ("cpu", "cuda")]:
        params = {"W": to_device(np.ones(3), param_on), "b": to_device(np.ones(2), param_on)}
        grads = {"W": to_device(np.ones(3), param_on), "b": to_device(np.ones(2), grad_on)}
        with pytest.raises(TypeError, match=f"gradient 'b' is on {grad_on}, its parameter on"):
            make_optimizer(name, lr=0.1).update(params, grads)
        assert np.all(to_host(params["W"]) == 1.0)  # checked before anything moved


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_follows_parameters_that_move_between_devices(name: str, gpu: Any) -> None:
    # The optimiser itself is not moved: its state and scratch follow the parameters.
    rng = np.random.default_rng(20)
    start, grads = rng.standard_normal(6), [rng.standard_normal(6) for _ in range(3)]
    moving, staying = {"w": start.copy()}, {"w": start.copy()}
    a, b = make_optimizer(name, lr=0.1), make_optimizer(name, lr=0.1)
    for step, device in enumerate(["cpu", "cuda", "cpu"]):
        moving["w"] = to_device(moving["w"], device)
        a.update(moving, {"w": to_device(grads[step], device)})
        b.update(staying, {"w": grads[step]})
        np.testing.assert_allclose(to_host(moving["w"]), staying["w"], rtol=1e-13)


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "sgd"])  # SGD keeps none
def test_state_loaded_into_an_optimizer_on_the_device_lands_there(name: str, gpu: Any) -> None:
    # As PyTorch's load_state_dict puts state beside the parameters.
    rng = np.random.default_rng(22)
    params = {"w": rng.standard_normal(5)}
    source = make_optimizer(name, lr=0.1)
    source.update(params, {"w": rng.standard_normal(5)})
    state = source.state_dict()
    target = make_optimizer(name, lr=0.1).to("cuda")
    target.load_state_dict(state)
    arrays = [v for k, v in target.state_dict().items() if not k.startswith("step/")]
    assert arrays and all(device_of(a) == "cuda" for a in arrays)
    for key, value in target.state_dict().items():
        np.testing.assert_array_equal(to_host(value), state[key], err_msg=key)


@pytest.mark.parametrize(("dtype", "lr"), [(np.float16, 3e-5), (np.float32, 1e-39)])
def test_adam_unfolded_on_the_device_as_on_the_host(dtype: Any, lr: float, gpu: Any) -> None:
    # Where the folded scalars overflow the dtype (float16, or float32 at a tiny lr).
    rng = np.random.default_rng(21)
    start = rng.standard_normal(40).astype(dtype) * (dtype == np.float16)
    # float32: some entries' gradients all 0 (inf * 0 = NaN, folded). Not float16, where
    # eps = 1e-8 is 0 and 0 / 0 is NaN for PyTorch too.
    zeros = (np.arange(40) % 4 == 0) & (dtype == np.float32)
    grads = [(rng.standard_normal(40) * ~zeros).astype(dtype) for _ in range(4)]
    host, device = {"w": start.copy()}, {"w": to_device(start, "cuda")}
    a, b = make_optimizer("adam", lr=lr), make_optimizer("adam", lr=lr)
    for grad in grads:
        a.update(host, {"w": grad})
        b.update(device, {"w": to_device(grad, "cuda")})
    assert np.any(host["w"] != start) and not np.isnan(host["w"]).any()
    expected = host["w"]
    if not getattr(gpu, "__fake__", False) and dtype == np.float32:
        # CuPy compiles every kernel, its own and ours, with -ftz=true: float32 subnormals
        # (all of these weights, at lr = 1e-39) are zero on the GPU.
        expected = np.where(np.abs(expected) < np.finfo(np.float32).smallest_normal, 0, expected)
    np.testing.assert_array_equal(to_host(device["w"]), expected)


class SignSGD(snn.optim.SGD):
    """A user's optimiser: its own step, the sign of the gradient."""

    def _step(self, key: str, param: Any, grad: Any, work: Any) -> None:
        np.sign(grad, out=work)
        np.multiply(work, self.lr, out=work)
        np.subtract(param, work, out=param)


class MyMomentum(snn.optim.Momentum):
    """A user's subclass that changes nothing of the step."""


@pytest.mark.parametrize("make", [lambda: SignSGD(lr=0.1), lambda: MyMomentum(lr=0.1),
                                  lambda: SignSGD(lr=0.1, weight_decay=0.01)],
                         ids=["own step", "inherited step", "own step, decay"])  # fmt: skip
def test_a_users_optimiser_steps_on_the_device_as_on_the_host(make: Any, gpu: Any) -> None:
    # The GPU took the parent's fused kernel: SignSGD stepped as plain SGD, without a word,
    # and a subclass of Momentum named a kernel that did not exist.
    rng = np.random.default_rng(12)
    params = {"W": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(3)]
    on_host = {k: v.copy() for k, v in params.items()}
    on_device = {k: gpu.asarray(v) for k, v in params.items()}
    host_opt, device_opt = make(), make()
    for step in grads:
        host_opt.update(on_host, step)
        device_opt.update(on_device, {k: gpu.asarray(v) for k, v in step.items()})
    for key in params:
        np.testing.assert_allclose(to_host(on_device[key]), on_host[key], rtol=1e-12, atol=1e-14)
    if isinstance(host_opt, SignSGD) and not host_opt.weight_decay:  # the oracle: its formula
        expected = params["W"] - 0.1 * sum(np.sign(step["W"]) for step in grads)
        np.testing.assert_allclose(on_host["W"], expected, rtol=1e-12)


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_optimizer_on_device_matches_numpy_float64(
    name: str, weight_decay: float, dtype: Any, gpu: Any
) -> None:
    rng = np.random.default_rng(11)
    params = {"W": rng.standard_normal((5, 7)), "b": rng.standard_normal(7)}
    grads = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(3)]
    on_host = {k: v.copy() for k, v in params.items()}
    on_device = {k: gpu.asarray(v.astype(dtype)) for k, v in params.items()}
    host_opt = make_optimizer(name, lr=0.05, weight_decay=weight_decay)
    device_opt = make_optimizer(name, lr=0.05, weight_decay=weight_decay)
    for step in grads:
        host_opt.update(on_host, step)
        device_opt.update(on_device, {k: gpu.asarray(v.astype(dtype)) for k, v in step.items()})
    for key in params:
        assert device_of(on_device[key]) == "cuda"
        rtol, atol = (1e-12, 1e-14) if dtype == np.float64 else (1e-5, 1e-6)
        np.testing.assert_allclose(to_host(on_device[key]), on_host[key], rtol=rtol, atol=atol)
    state = device_opt.state_dict()
    assert all(device_of(v) == "cuda" or v.ndim == 0 for v in state.values())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_steps_many_parameters_in_few_launches(name: str, gpu: Any) -> None:
    # Eleven parameters: one empty, one 0-d, one at an address no vector load may use
    # (a contiguous view one element in), odd and vector-sized lengths.
    rng = np.random.default_rng(22)
    shapes = [(5, 7), (7,), (0,), (), (33,), (4, 4), (1,), (3, 5, 2), (16,), (9,), (2, 2)]
    host = {
        f"p{i}": rng.standard_normal(shape).astype(np.float32) for i, shape in enumerate(shapes)
    }
    device = {k: gpu.asarray(v) for k, v in host.items()}
    wide = gpu.asarray(np.concatenate([[0.0], host["p4"]]).astype(np.float32))
    device["p4"] = wide[1:]
    grads = [{k: rng.standard_normal(v.shape).astype(np.float32) for k, v in host.items()}
             for _ in range(3)]  # fmt: skip
    a, b = make_optimizer(name, lr=0.05, weight_decay=0.01), make_optimizer(
        name, lr=0.05, weight_decay=0.01)  # fmt: skip
    fake_cuda.launches.clear()
    for step in grads:
        a.update(host, step)
        b.update(device, {k: gpu.asarray(v) for k, v in step.items()})
    for key in host:
        np.testing.assert_allclose(to_host(device[key]), host[key], rtol=1e-5, atol=1e-6)
    if gpu.__name__ == "cupy" and hasattr(gpu, "__fake__") and hasattr(gpu, "RawKernel"):
        # ten non-empty parameters: a launch of eight and one of two, per step
        assert sorted(set(fake_cuda.launches)) == [f"{name}_wd_x2", f"{name}_wd_x8"]
        assert len(fake_cuda.launches) == 2 * len(grads)


def test_adam_groups_parameters_by_dtype_and_step_count_on_the_device(gpu: Any) -> None:
    # float32 and float64 parameters, and one that skipped a step (its own bias correction):
    # each group its own launch, every parameter as on the host.
    rng = np.random.default_rng(23)
    host = {"a": rng.standard_normal(10).astype(np.float32), "b": rng.standard_normal(7),
            "c": rng.standard_normal(5).astype(np.float32)}  # fmt: skip
    device = {k: gpu.asarray(v) for k, v in host.items()}
    a, b = make_optimizer("adam", lr=0.1), make_optimizer("adam", lr=0.1)
    for step in range(3):
        keys = ["a", "b"] if step == 0 else ["a", "b", "c"]  # c misses the first step
        grads = {k: rng.standard_normal(host[k].shape).astype(host[k].dtype) for k in keys}
        a.update(host, grads)
        b.update(device, {k: gpu.asarray(v) for k, v in grads.items()})
    for key in host:
        rtol = 1e-12 if host[key].dtype == np.float64 else 1e-5
        np.testing.assert_allclose(to_host(device[key]), host[key], rtol=rtol, atol=1e-6)


# -- networks, devices, training, checkpoints ----------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "gelu", "softplus"])
def test_network_gradient_on_device_matches_cpu(activation: str, gpu: Any) -> None:
    x, t = blobs(64, 1)
    net = snn.mlp(
        [20, 16, 10], activation=activation, rng=np.random.default_rng(0), dtype=np.float64
    )
    expected = {k: v.copy() for k, v in net.gradient(x.astype(np.float64), t).items()}
    expected_loss = net.last_loss
    net.to("cuda")
    assert all(device_of(v) == "cuda" for v in net.params.values())
    grads = net.gradient(gpu.asarray(x.astype(np.float64)), gpu.asarray(t))
    assert net.last_loss == pytest.approx(expected_loss, rel=1e-12)
    for key, value in expected.items():
        np.testing.assert_allclose(to_host(grads[key]), value, rtol=1e-9, atol=1e-12)
    net.to("cpu")
    assert all(isinstance(v, np.ndarray) for v in net.params.values())
    assert all(isinstance(v, np.ndarray) for v in net.grads.values())


@pytest.mark.parametrize("first", [snn.Relu, snn.Tanh, snn.Sigmoid, snn.Identity])
def test_a_network_whose_first_layer_has_no_parameters_differentiates_on_device(
    first: Any, gpu: Any
) -> None:
    # The first layer's backward skips dx (input_grad=False); one without parameters of its
    # own still ran its backward on the host's path, which CuPy arrays cannot take.
    x, t = blobs(32, 2)
    rng = np.random.default_rng(5)
    W, b = rng.standard_normal((20, 10)), rng.standard_normal(10)
    net = snn.Sequential([first(), snn.Affine(W, b)]).eval()
    expected = {k: v.copy() for k, v in net.gradient(x.astype(np.float64), t).items()}
    net.to("cuda")
    grads = net.gradient(gpu.asarray(x.astype(np.float64)), gpu.asarray(t))
    for key, value in expected.items():
        np.testing.assert_allclose(to_host(grads[key]), value, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", [snn.Relu, snn.Sigmoid, snn.Gelu, snn.Softplus, snn.Elu])
def test_a_0d_input_on_device_keeps_its_shape(make: Any, gpu: Any) -> None:
    # As on the CPU: a 0-d input gives a 0-d output, and backward takes a 0-d dout.
    x, dout = np.array(-0.75), np.array(2.0)
    reference = make()
    expected_y, expected_dx = reference.forward(x), reference.backward(dout)
    layer = make().to("cuda")
    y = layer.forward(gpu.asarray(x))
    dx = layer.backward(gpu.asarray(dout))
    assert y.shape == () and dx.shape == ()
    np.testing.assert_allclose(to_host(y), expected_y, rtol=1e-12)
    np.testing.assert_allclose(to_host(dx), expected_dx, rtol=1e-12)


def test_training_on_device_follows_the_cpu_run(gpu: Any) -> None:
    from scratchnn.train import fit

    (x, t), (xt, tt) = blobs(400, 2), blobs(100, 3)
    runs = []
    for device in ("cpu", "cuda"):
        net = snn.mlp([20, 16, 10], rng=np.random.default_rng(0), dtype=np.float64).to(device)
        optimizer = make_optimizer("adam", lr=0.01).to(device)
        data = [to_device(a, device) for a in (x.astype(np.float64), t, xt.astype(np.float64), tt)]
        history = fit(
            net, optimizer, (data[0], data[1]), (data[2], data[3]),
            epochs=2, batch_size=50, rng=np.random.default_rng(5), train_eval_size=300,
        )  # fmt: skip
        runs.append((history, {k: to_host(v) for k, v in net.params.items()}))
    (cpu_history, cpu_params), (gpu_history, gpu_params) = runs
    assert gpu_history.test_acc == pytest.approx(cpu_history.test_acc, abs=1e-9)
    for key, value in cpu_params.items():
        np.testing.assert_allclose(gpu_params[key], value, rtol=1e-8, atol=1e-10)


def test_checkpoint_written_on_device_loads_on_cpu_and_back(gpu: Any, tmp_path: Path) -> None:
    from scratchnn.checkpoint import load_checkpoint, save_checkpoint

    x, t = blobs(50, 4)
    net = snn.mlp([20, 8, 10], rng=np.random.default_rng(0)).to("cuda")
    optimizer = make_optimizer("momentum", lr=0.1)
    optimizer.update(net.params, net.gradient(gpu.asarray(x), gpu.asarray(t)))
    save_checkpoint(
        tmp_path / "c.safetensors", params=net.state(), optimizer_state=optimizer.state_dict(),
        rng=np.random.default_rng(1), epoch=1, config={}, metadata={},
    )  # fmt: skip
    loaded = load_checkpoint(tmp_path / "c.safetensors")
    on_cpu = snn.mlp([20, 8, 10], rng=np.random.default_rng(9))
    on_cpu.load_state(loaded.params)
    for key, value in net.state().items():
        assert isinstance(loaded.params[key], np.ndarray)
        np.testing.assert_array_equal(on_cpu.state()[key], to_host(value))
    back = snn.mlp([20, 8, 10], rng=np.random.default_rng(9)).to("cuda")
    back.load_state(loaded.params)
    assert all(device_of(v) == "cuda" for v in back.state().values())
    resumed = make_optimizer("momentum", lr=0.1)
    resumed.load_state_dict(loaded.optimizer_state)
    resumed.update(back.params, back.gradient(gpu.asarray(x), gpu.asarray(t)))  # host state moves


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_cnn_gradient_on_device_matches_cpu(dropout: float, gpu: Any) -> None:
    rng = np.random.default_rng(8)
    x, t = rng.standard_normal((4, 1, 28, 28)), rng.integers(0, 10, 4)
    nets = []
    for device in ("cpu", "cuda"):
        net = cnn(
            rng=np.random.default_rng(0), channels=(3, 4), hidden=8, dropout=dropout,
            dtype=np.float64,
        ).to(device)  # fmt: skip
        grads = net.gradient(to_device(x, device), to_device(t, device))
        nets.append(({k: to_host(v) for k, v in grads.items()}, net.last_loss))
        net.eval()
        nets.append(({"scores": to_host(net.predict(to_device(x, device)))}, 0.0))
    for (expected, expected_loss), (actual, loss) in [(nets[0], nets[2]), (nets[1], nets[3])]:
        assert loss == pytest.approx(expected_loss, rel=1e-12)
        for key, value in expected.items():
            np.testing.assert_allclose(actual[key], value, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["he", "xavier", "glorot_normal", "glorot_uniform", 0.01])
def test_initializers_give_the_same_weights_on_every_device(name: Any, gpu: Any) -> None:
    from scratchnn.init import make_initializer, zeros

    initializer = make_initializer(name)
    on_host = initializer(30, 20, np.random.default_rng(4))
    on_device = initializer(30, 20, np.random.default_rng(4), device="cuda")
    assert device_of(on_device) == "cuda" and on_device.dtype == np.float32
    np.testing.assert_array_equal(to_host(on_device), on_host)
    assert device_of(zeros(5, device="cuda")) == "cuda"


def test_cli_trains_on_the_device_and_resumes_on_the_cpu(
    gpu: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scratchnn.checkpoint import load_model
    from scratchnn.cli import main

    require_fashion_mnist()
    argv = ["train", "--hidden", "16", "--limit", "500", "--out", str(tmp_path)]
    assert main([*argv, "--device", "cuda", "--epochs", "1"]) == 0
    assert main(["train", "--resume", "--out", str(tmp_path), "--epochs", "2"]) == 0
    params, _ = load_model(tmp_path / "model.safetensors")
    assert all(isinstance(v, np.ndarray) for v in params.values())
    assert "epoch   2/2" in capsys.readouterr().out


def test_cli_evaluates_on_the_device_as_on_the_cpu(
    gpu: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scratchnn.cli import main

    require_fashion_mnist()
    argv = ["train", "--hidden", "16", "--limit", "500", "--epochs", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    capsys.readouterr()
    model = str(tmp_path / "model.safetensors")
    assert main(["evaluate", model]) == 0
    on_cpu = capsys.readouterr().out
    assert main(["evaluate", model, "--device", "cuda"]) == 0
    on_device = capsys.readouterr().out
    assert "test accuracy" in on_cpu
    # Same report; its counts the same but for an image or two whose two best scores
    # are within float32's rounding (cuBLAS sums in another order than OpenBLAS).
    number = r"\d+(?:\.\d+)?"
    # Numbers out, and the spaces that align them (a count of 9 against 10 pads apart).
    assert re.sub(rf"\s*{number}", " #", on_device) == re.sub(rf"\s*{number}", " #", on_cpu)
    moved = [abs(float(a) - float(b)) for a, b in
             zip(re.findall(number, on_device), re.findall(number, on_cpu))]  # fmt: skip
    assert sum(moved) <= 8, f"more than two images differ:\n{on_cpu}\n{on_device}"


@pytest.mark.parametrize("c_in", [1, 8], ids=["per image", "one product"])
def test_conv_moved_to_the_device_between_forward_and_backward(c_in: int, gpu: Any) -> None:
    """Conv2d decides how to multiply from where its kept col lives, not from the forward."""

    rng = np.random.default_rng(9)
    x, dout = rng.standard_normal((3, c_in, 5, 6)), rng.standard_normal((3, 2, 5, 6))
    layer = snn.Conv2d(c_in, 2, 3, padding=1, rng=np.random.default_rng(0), dtype=np.float64)
    layer.forward(x)
    want = [layer.backward(dout), layer.dW, layer.db]
    layer.forward(x)
    move_arrays(layer, "cuda")
    got = [layer.backward(to_device(dout, "cuda")), layer.dW, layer.db]
    for g, w in zip(got, want):
        assert device_of(g) == "cuda"
        np.testing.assert_allclose(to_host(g), w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("route", ["cpu | cuda", "cuda | cpu"])
def test_a_cnn_moved_between_forward_and_backward_takes_dout_on_its_new_device(
    route: str, gpu: Any
) -> None:
    # Flatten, pooling and the like keep no arrays: only the layer's own record of its
    # device said where backward's dout belongs, and Sequential.to did not update it.
    before, after = route.split(" | ")
    rng = np.random.default_rng(52)
    x, t = rng.standard_normal((3, 1, 8, 8)), rng.integers(0, 10, 3)

    def build() -> snn.Sequential:
        return cnn(rng=np.random.default_rng(1), channels=[2], hidden=4, dtype=np.float64,
                   in_shape=(1, 8, 8))  # fmt: skip

    expected = build().gradient(x, t)
    net = build()
    net.to(before)
    net.loss(to_device(x, before), to_device(t, before))
    net.to(after)
    dout = net.last_layer.backward()
    assert device_of(dout) == after
    for layer in reversed(net.layers):
        dout = layer.backward(dout)
    for key, value in net.grads.items():
        np.testing.assert_allclose(to_host(value), expected[key], rtol=1e-10, atol=1e-14)


def test_a_layer_moved_to_the_device_names_a_host_input_or_dout(gpu: Any) -> None:
    layer = snn.Affine(np.ones((3, 2)), np.zeros(2))
    layer.forward(np.ones((4, 3)))
    layer.to("cuda")
    with pytest.raises(TypeError, match=r"Affine\.backward: dout is on cpu"):
        layer.backward(np.ones((4, 2)))
    with pytest.raises(TypeError, match=r"Affine\.forward: an input is on cpu"):
        layer.forward(np.ones((4, 3)))


def test_to_moves_arrays_in_lists_and_tuples_and_a_layer_moves_the_layers_it_holds(
    gpu: Any,
) -> None:
    class Residual(snn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.inner = snn.Affine(np.eye(2), np.zeros(2))
            self.scales = [np.ones(2), np.full(2, 2.0)]
            self.pair = (np.zeros(2), "label")
            self.outer = self  # a cycle: moving must not follow it

        def to(self, device: str) -> Residual:
            super().to(device)
            self.inner.to(device)  # the layers it holds are its to move
            return self

        @property
        def params(self) -> dict[str, Any]:
            return self.inner.params

        def _forward(self, x: Any) -> Any:
            return x + self.inner.forward(x) * self.scales[1]

        def _backward(self, dout: Any) -> Any:
            return dout + self.inner.backward(dout * self.scales[1])

    block = Residual()
    scales = block.scales
    net = snn.Sequential([block]).to("cuda")
    assert device_of(block.inner.W) == "cuda"
    assert block.scales is scales  # updated in place: whoever holds the list sees the move
    assert [device_of(a) for a in block.scales] == ["cuda", "cuda"]
    assert device_of(block.pair[0]) == "cuda" and block.pair[1] == "label"
    out = net.predict(to_device(np.ones((1, 2)), "cuda"))
    np.testing.assert_array_equal(to_host(out), [[3.0, 3.0]])


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_evaluate_on_the_device_refuses_bad_labels_when_it_reads_its_losses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The losses stay on the card until the end; their labels are checked then.
    from scratchnn.train import evaluate

    fake = fake_cupy.install(monkeypatch, kernels=True)
    rng = np.random.default_rng(12)
    net = snn.mlp([12, 8, 4], rng=rng).to("cuda")
    x, t = rng.standard_normal((2500, 12)).astype(np.float32), rng.integers(0, 4, 2500)
    t[2200] = 4
    with pytest.raises(ValueError, match=r"SoftmaxWithLoss: labels must lie in \[0, 4\)"):
        evaluate(net, fake.asarray(x), fake.asarray(t))


def test_accuracy_of_a_network_on_the_device_names_host_labels(gpu: Any) -> None:
    # As loss and gradient do: scratchnn's mixing error, not the array library's own.
    net = snn.mlp([4, 3], rng=np.random.default_rng(0), dtype=np.float64).to("cuda")
    x = gpu.asarray(np.ones((2, 4)))
    for labels in (np.array([0, 1]), [0, 1]):
        with pytest.raises(TypeError, match=r"cannot mix NumPy \(cpu\) and CuPy \(cuda\)"):
            net.accuracy(x, labels)
    assert net.accuracy(x, gpu.asarray(np.array([0, 1]))) in (0.0, 0.5, 1.0)


# -- CPU-only behaviour: imports, errors, the command line --------------------------------------


def test_importing_scratchnn_does_not_import_cupy() -> None:
    code = (
        "import sys, scratchnn, scratchnn.kernels, scratchnn.kernels.cuda, scratchnn.cli, "
        "scratchnn.runs, scratchnn.checkpoint\n"
        "print('cupy' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_cuda_without_cupy_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy now raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install scratchnn\[gpu\]"):
        to_device(np.zeros(3), "cuda")
    with pytest.raises(RuntimeError, match=r"pip install scratchnn\[gpu\]"):
        snn.mlp([4, 2], rng=np.random.default_rng(0)).to("cuda")
    # Nothing to move yet: still the same clear error, not a silent success.
    for empty in (snn.Sequential([snn.Flatten(), snn.Relu()]), snn.optim.Adam(), snn.Relu()):
        with pytest.raises(RuntimeError, match=r"pip install scratchnn\[gpu\]"):
            empty.to("cuda")


def test_cuda_without_a_gpu_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    module = fake_cupy.install(monkeypatch)
    module.cuda.runtime.getDeviceCount = lambda: 0
    with pytest.raises(RuntimeError, match="no GPU"):
        to_device(np.zeros(3), "cuda")


def test_mixing_numpy_and_cupy_arrays_raises_type_error(gpu: Any) -> None:
    with pytest.raises(TypeError, match="cannot mix NumPy"):
        get_array_module(np.zeros(2), gpu.zeros(2))
    net = snn.mlp([4, 3], rng=np.random.default_rng(0)).to("cuda")
    with pytest.raises(TypeError, match=r"Affine\.forward: an input is on cpu, but the layer"):
        net.predict(np.ones((2, 4), np.float32))


def test_an_array_held_twice_by_a_users_layer_moves_as_one(gpu: Any) -> None:
    class Scale:  # its parameter held as an attribute and in its params dict
        def __init__(self) -> None:
            self.s = np.ones(3)
            self.params = {"s": self.s}
            self.grads: dict[str, Any] = {"s": None}

        def forward(self, x: Any) -> Any:
            self.x = x
            return x * self.s

        def backward(self, dout: Any) -> Any:
            self.grads["s"] = (dout * self.x).sum(axis=0)
            return dout * self.s

    rng = np.random.default_rng(90)
    scale = Scale()
    net = snn.Sequential([scale, snn.Affine(rng.standard_normal((3, 2)), np.zeros(2))]).to("cuda")
    assert scale.params["s"] is scale.s and isinstance(scale.s, gpu.ndarray)
    x, t = gpu.asarray(rng.standard_normal((4, 3))), gpu.asarray(rng.integers(0, 2, 4))
    SGD(0.5).update(net.params, net.gradient(x, t))
    assert not np.array_equal(to_host(scale.s), np.ones(3))  # forward's s is the one trained


def test_an_array_two_layers_hold_moves_as_one(gpu: Any) -> None:
    from test_models import SequelAffine

    rng = np.random.default_rng(91)
    affine = snn.Affine(rng.standard_normal((3, 3)), np.zeros(3))
    tied = SequelAffine(affine.W, np.zeros(3))  # a user's layer sharing scratchnn's W
    net = snn.Sequential([affine, snn.Tanh(), tied]).to("cuda")
    assert tied.params[0] is affine.W and isinstance(affine.W, gpu.ndarray)
    assert list(net.params) == ["W1", "b1", "params1[1]"]


def test_a_tie_through_a_transposed_view_survives_moves_both_ways(gpu: Any) -> None:
    from test_models import SequelAffine, SequelEmbedding

    rng = np.random.default_rng(92)
    W = rng.standard_normal((5, 3))
    net = snn.Sequential([SequelEmbedding(W), snn.Tanh(), SequelAffine(W.T, np.zeros(5))])
    for device in ("cuda", "cpu"):
        net.to(device)
        assert list(net.params) == ["params1[0]", "params2[1]"]  # still one array
        embedding, affine = net.layers[0].params[0], net.layers[2].params[0]
        embedding[0, 0] = 42.0
        assert float(affine[0, 0]) == 42.0  # the transpose sees the write


def test_unknown_device_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown device"):
        to_device(np.zeros(2), "tpu")


def test_to_cpu_is_a_no_op_on_cpu() -> None:
    net = snn.mlp([4, 3], rng=np.random.default_rng(0))
    W = net.params["W1"]
    assert net.to("cpu") is net and net.params["W1"] is W
    x = np.ones(3)
    assert to_device(x, "cpu") is x and to_host(x) is x and device_of(x) == "cpu"


def test_cli_device_cuda_without_cupy_fails_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from scratchnn.cli import main

    monkeypatch.setitem(sys.modules, "cupy", None)
    assert main(["train", "--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "pip install scratchnn[gpu]" in err and len(err.strip().splitlines()) == 1


def test_cli_device_cpu_trains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from scratchnn.cli import main

    require_fashion_mnist()
    argv = ["train", "--device", "cpu", "--hidden", "16", "--limit", "500", "--epochs", "1"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "model.safetensors").exists()


def test_cli_evaluate_on_cuda_without_cupy_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from scratchnn.cli import main

    monkeypatch.setitem(sys.modules, "cupy", None)
    code = main(["evaluate", str(tmp_path / "model.safetensors"), "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install scratchnn[gpu]" in err and len(err.strip().splitlines()) == 1


def test_the_gpu_fixture_fails_instead_of_skipping_when_a_gpu_is_required(
    tmp_path: Path,
) -> None:
    if real_cupy_reason() is None:
        pytest.skip("a GPU is present: the fixture has nothing to refuse")
    env = {**os.environ, "SCRATCHNN_REQUIRE_GPU": "1"}
    here = Path(__file__).resolve().with_name("test_gpu.py")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={here.parents[1]}",
         f"{here}::test_integer_relu_on_device"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-2000:]
    assert " 1 error" in result.stdout and "SCRATCHNN_REQUIRE_GPU is set" in result.stdout
