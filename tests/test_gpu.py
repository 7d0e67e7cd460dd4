"""The GPU path: every layer, optimiser and network on CuPy against NumPy float64.

Each test runs twice: on ``fake`` (tests/fake_cupy.py, CuPy's strictness on
NumPy arrays, so it runs everywhere and finds NumPy hard-coded where CuPy
would fail) and on ``cuda`` (real CuPy and the fused CUDA kernels), which
skips with its reason where no GPU is present. Inputs are fresh random
numbers, never zeros.
"""

from __future__ import annotations

import ctypes
import functools
import io
import math
import os
import re
import shutil
import subprocess
import sys
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fake_cuda
import fake_cupy
import numpy as np
import pytest
from conformance import CASES, Case, away_from_kinks

import scratchnn as snn
from scratchnn.backend import device_of, get_array_module, move_arrays, to_device, to_host
from scratchnn.kernels import OPS
from scratchnn.kernels.cuda import next_row_source, source, source_many
from scratchnn.models import cnn
from scratchnn.optim import SGD, make_optimizer


def _real_cupy_reason() -> str | None:
    """Why the real-CuPy tests cannot run here, or None when they can."""
    try:
        with warnings.catch_warnings():  # CuPy's own (a version note) fail nothing here
            warnings.simplefilter("ignore")
            import cupy
    except ImportError:
        return "CuPy is not installed (pip install scratchnn[gpu]); GPU tests need an NVIDIA GPU"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy is installed but CUDA sees no GPU"
    except Exception as error:
        return f"CuPy is installed but CUDA is not usable: {error}"
    return None


@pytest.fixture(params=["fake", "fake-kernels", "cuda"])
def gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The array module of the device under test: the fake CuPy, with or without the
    CUDA kernels run on the CPU (tests/fake_cuda.py), or the real one."""
    if request.param == "fake":
        return fake_cupy.install(monkeypatch)
    if request.param == "fake-kernels":
        reason = fake_cuda.available()
        if reason is not None:
            print(f"skipping the CPU run of the CUDA kernels: {reason}")
            pytest.skip(reason)
        return fake_cupy.install(monkeypatch, kernels=True)
    reason = _real_cupy_reason()
    if reason is not None and os.environ.get("SCRATCHNN_REQUIRE_GPU"):
        pytest.fail(f"SCRATCHNN_REQUIRE_GPU is set, but {reason}")
    if reason is not None:
        print(f"skipping the real-GPU run: {reason}")
        pytest.skip(reason)
    import cupy

    return cupy


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


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
@pytest.mark.parametrize("barrier", ["", "__syncthreads();"])
def test_the_cpu_stand_in_for_cuda_starts_shared_memory_as_garbage(
    barrier: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A kernel that reads its shared memory before writing it reads garbage on a GPU; the
    # stand-in must not hand it the values an earlier block or launch left there, whether
    # it runs a block's threads one after another or (a kernel that synchronises) the same
    # OS threads block after block.
    fake = fake_cupy.install(monkeypatch, kernels=True)
    code = f"""typedef float T;
extern "C" __global__ void peek(T* out) {{
    __shared__ T seen[4];
    out[blockIdx.x * 4 + threadIdx.x] = seen[threadIdx.x];
    {barrier}
    seen[threadIdx.x] = (T)1;
}}"""
    kernel = fake.RawKernel(code, "peek")
    out = fake.zeros(12, np.float32)
    kernel((3,), (4,), (out,))
    assert np.isnan(out.get()).all()  # later blocks included: not the 1 the first left


# SoftmaxWithLoss on class indices runs two CUDA kernels of its own (kernels/cross_entropy.py).


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
    x, t = _blobs(300, 6)
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
    x, t = _blobs(60, 7)
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
    x, t = _blobs(60, 8)
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


def _blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = 3 * np.random.default_rng(123).standard_normal((10, 20))
    t = rng.integers(0, 10, n)
    return (centres[t] + rng.standard_normal((n, 20))).astype(np.float32), t


@pytest.mark.parametrize("activation", ["relu", "sigmoid", "gelu", "softplus"])
def test_network_gradient_on_device_matches_cpu(activation: str, gpu: Any) -> None:
    x, t = _blobs(64, 1)
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
    x, t = _blobs(32, 2)
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

    (x, t), (xt, tt) = _blobs(400, 2), _blobs(100, 3)
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

    x, t = _blobs(50, 4)
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


def require_fashion_mnist() -> None:
    """Skip, saying why, where Debian's Fashion-MNIST is not installed."""
    from scratchnn.data import find_dataset_files

    try:
        find_dataset_files("fashion-mnist")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


def test_cli_device_cpu_trains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from scratchnn.cli import main

    require_fashion_mnist()
    argv = ["train", "--device", "cpu", "--hidden", "16", "--limit", "500", "--epochs", "1"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "model.safetensors").exists()


# -- the CUDA sources: compiled without a GPU where nvcc is installed ------------------------------


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_kernel_source_compiles(dtype: Any, tmp_path: Path) -> None:
    from scratchnn.kernels import bias, cross_entropy

    # Each source in its own namespace, so one nvcc run checks them all; the kernel names
    # are extern "C", so the cross-entropy ones, the same for each label type, get a suffix.
    sources = {name: source(op, dtype) for name, op in OPS.items()}
    for name, op in OPS.items():  # the optimisers' steps over eight tensors at once
        if set(op.outputs) <= set(op.inputs):
            sources[f"{name}_x8"] = source_many(op, dtype, 8)
    # Adam's step as a graph replays it, its bias corrections read from memory, and the
    # kernel that fills them in from a table.
    folded = frozenset({"inv_scale", "eps_scaled"})
    sources["adam_wd_x8_at"] = source_many(OPS["adam_wd"], dtype, 8, from_memory=folded
                                           ).replace("adam_wd_x8(", "adam_wd_x8_at(")  # fmt: skip
    sources["next_row"] = next_row_source(dtype)
    for label in (np.int64, np.int32, np.uint8, np.int8):
        name = np.dtype(label).name
        sources[f"xent_{name}"] = cross_entropy.source(dtype, label).replace(
            "softmax_xent", f"softmax_xent_{name}"
        )
    sources["bias"] = bias.source(dtype)
    path = tmp_path / "kernels.cu"
    path.write_text("\n".join(f"namespace k_{name} {{\n{code}}}" for name, code in sources.items()))
    result = subprocess.run(
        # A cubin for the H100/H200 (sm_90): ptxas checks registers and shared memory too.
        ["nvcc", "-cubin", "-arch=sm_90", "-o", os.devnull, str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]


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


# -- benchmarks/gpu.py: its no-GPU exit and its correctness checks, on the fake device ------------


def _load_script(relative_path: str, name: str) -> Any:
    """A script of the checkout (benchmarks/, scripts/) as the module ``name``."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _benchmark_module() -> Any:
    return _load_script("benchmarks/gpu.py", "benchmark_gpu")


def test_gpu_benchmark_without_a_gpu_says_so_and_exits_0() -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    code = (
        "import sys, runpy; sys.modules['cupy'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "no GPU to measure here" in result.stdout


@pytest.mark.parametrize("kernels", [False, True], ids=["fake", "fake-kernels"])
def test_gpu_benchmark_correctness_checks_pass_on_the_fake_device(
    kernels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kernels and fake_cuda.available() is not None:
        pytest.skip(str(fake_cuda.available()))
    fake_cupy.install(monkeypatch, kernels=kernels)
    fake_cuda.launches.clear()
    benchmark = _benchmark_module()
    # Seeded here: the benchmark itself draws fresh inputs on every run.
    checks = benchmark.check_all(
        "cuda", shapes=(((50, 37), 1), ((4096,), 1), ((8, 26), 2)), seed=20261129
    )
    failed = [(c.name, c.error) for c in checks if not c.ok]
    assert not failed and len(checks) > 100
    # fit's steps: replayed from a graph where the stand-in records one, else eager
    replays = [c.name for c in checks if "steps as fit takes them" in c.name]
    assert len(replays) == 6
    assert all(("(replayed)" if kernels else "(eager: this CuPy captures no graphs)") in name
               for name in replays)  # fmt: skip
    launched = set(fake_cuda.launches)
    # (the networks' gradients take the fused kernels: checked on the card too)
    fused = {"add_bias_relu", "relu_column_sum", "softmax_xent_bias_grad"}
    assert not kernels or {"relu_forward", *fused} <= launched
    assert not kernels or any(name.startswith("adam_x") for name in launched)


def test_gpu_benchmark_without_a_gpu_fails_when_one_is_required() -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    code = (
        "import sys, runpy; sys.modules['cupy'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path), "--require-gpu"], capture_output=True, text=True
    )
    assert result.returncode == 3, result.stderr
    assert "no GPU to measure here" in result.stdout


def test_the_gpu_fixture_fails_instead_of_skipping_when_a_gpu_is_required(
    tmp_path: Path,
) -> None:
    if _real_cupy_reason() is None:
        pytest.skip("a GPU is present: the fixture has nothing to refuse")
    env = {**os.environ, "SCRATCHNN_REQUIRE_GPU": "1"}
    here = Path(__file__).resolve()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={here.parents[1]}",
         f"{here}::test_integer_relu_on_device"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-2000:]
    assert " 1 error" in result.stdout and "SCRATCHNN_REQUIRE_GPU is set" in result.stdout


def test_the_gpu_benchmark_times_the_train_command_on_the_fake_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_fashion_mnist()
    fake_cupy.install(monkeypatch)
    benchmark = _benchmark_module()
    row = benchmark.time_train_command(None, 1, torch_epoch_s=1e9, torch_acc=0.5, limit=300)
    assert row.what == "scratchnn train --device cuda, epoch" and row.ours > 0
    assert row.verdict in ("met (<= 1)", "MISSED (<= 1)")
    assert "test acc" in row.note


class _HostEvent:
    """A CUDA event's record/synchronize on the host clock, for the timings' dry runs."""

    def record(self) -> None:
        self.at = time.perf_counter()

    def synchronize(self) -> None:
        pass


class _HostClock:
    """benchmarks/gpu.py's CudaClock on the host: PyTorch on its CPU device."""

    torch_device = "cpu"

    def cupy_ms(self, fn: Any, repeats: int) -> float:
        return float(_benchmark_module().median_ms(fn, _HostEvent, _host_ms, repeats, warmup=1))

    torch_ms = cupy_ms

    def wait_cupy(self) -> None:
        pass

    wait_torch = wait_cupy


def _host_ms(start: _HostEvent, stop: _HostEvent) -> float:
    return 1e3 * (stop.at - start.at)


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_the_gpu_benchmarks_timings_run_through_on_the_fake_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A dry run of every timing, small, before a lent GPU's few minutes run them for real:
    # the Python of each (the layers' calls, PyTorch's copies, the rows) works.
    torch = pytest.importorskip("torch")
    require_fashion_mnist()
    fake = fake_cupy.install(monkeypatch, kernels=True)
    benchmark = _benchmark_module()
    clock = _HostClock()
    rows = benchmark.time_activations(fake, torch, 2, clock, n=4096)
    assert [r.what.split()[0] for r in rows] == ["device"] + [a[0] for a in benchmark.ACTIVATIONS]
    assert all(r.ours > 0 and r.torch and r.verdict for r in rows[1:])
    replays = _replays_counted(monkeypatch)
    rows = benchmark.time_mlp_step(fake, torch, 2, clock, sizes=(20, 16, 16, 10), batch=32)
    assert replays  # the step as fit takes it: replayed from the stand-in's graph
    assert [r.what for r in rows] == ["MLP step 20-16-16-10 b32 SGD, as fit",
                                      "MLP step 20-16-16-10 b32 SGD, eager",
                                      "MLP step 20-16-16-10 b32 SGD, CuPy's products",
                                      "MLP step 20-16-16-10 b32 SGD, layers apart",
                                      "MLP step 20-16-16-10 b32 SGD, bias by CuPy's calls",
                                      "MLP step 20-16-16-10 b32 SGD, read",
                                      "MLP step 20-16-16-10 b32 SGD, host side"]  # fmt: skip
    assert all(r.ours > 0 and r.torch for r in rows)
    assert [bool(r.verdict) for r in rows] == [True, False, False, False, False, False, False]
    from scratchnn.kernels import bias

    assert bias.add_bias.__module__ == "scratchnn.kernels.bias"  # put back after its row
    assert snn.Sequential.fuse_on_gpu is True  # and the pairs
    from scratchnn.kernels import products

    assert products.matmul.__module__ == "scratchnn.kernels.products"  # and the products
    net = snn.mlp([6, 5, 3], rng=np.random.default_rng(0)).to("cuda")
    x, t = fake.ones((4, 6), dtype=np.float32), fake.zeros(4, dtype=np.int64)
    fake_cuda.launches.clear()
    with benchmark.layers_apart():  # the other A/B row's other side: no pairs
        net.gradient(x, t)
    assert "add_bias_relu" not in fake_cuda.launches and "relu_forward" in fake_cuda.launches
    fake_cuda.launches.clear()
    net.gradient(x, t)
    assert "add_bias_relu" in fake_cuda.launches and "relu_forward" not in fake_cuda.launches
    out, b = fake.ones((4, 3), dtype=np.float32), fake.arange(3, dtype=np.float32)
    fake_cuda.launches.clear()
    with benchmark.cupy_bias_calls():  # the A/B row's other side: no kernel of ours
        bias.add_bias(out, b)
        sums = bias.column_sum(out)
    assert fake_cuda.launches == []
    np.testing.assert_array_equal(to_host(sums), [4.0, 8.0, 12.0])
    rows = benchmark.time_epochs(fake, torch, None, 1, clock, limit=300)
    assert [r.what for r in rows] == ["Fashion-MNIST epoch 784-256-128-10 Adam b128",
                                      "scratchnn train --device cuda, epoch"]  # fmt: skip
    # The same weights and batches: after one epoch of 300 images, both nets answer alike.
    ours, theirs = (float(p) for p in re.findall(r"(\d+\.\d+)%", rows[0].note))
    assert abs(ours - theirs) <= 1.0


def test_a_broken_timing_is_reported_and_the_others_still_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    benchmark = _benchmark_module()

    def broken() -> list[Any]:
        raise RuntimeError("no such kernel")

    rows, failed = benchmark.timings([
        ("first", lambda: [benchmark.Row("first row", 2.0, 4.0, target=1.0)]),
        ("second", broken),
        ("third", lambda: [benchmark.Row("third row", 3.0, 1.0)]),
    ])  # fmt: skip
    assert failed
    assert [r.what for r in rows] == [
        "first row", "second: FAILED, RuntimeError: no such kernel", "third row"
    ]  # fmt: skip
    out, err = capsys.readouterr()
    assert "first row" in out and "met (<= 1)" in out and "third row" in out
    assert "RuntimeError: no such kernel" in err  # the traceback


def test_gpu_benchmark_builds_the_same_network_in_pytorch() -> None:
    torch = pytest.importorskip("torch")
    benchmark = _benchmark_module()
    rng = np.random.default_rng(0)
    net = snn.mlp([30, 16, 10], rng=rng)
    model = benchmark._torch_mlp(torch, net, "cpu")
    x, t = rng.standard_normal((8, 30)).astype(np.float32), rng.integers(0, 10, 8)
    expected = torch.nn.functional.cross_entropy(model(torch.as_tensor(x)), torch.as_tensor(t))
    assert net.loss(x, t) == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_kernels_launch_a_block_for_every_256_threads_of_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As PyTorch launches its element-wise kernels: a grid sized to the card left its last
    # blocks a second, mostly empty wave wherever fewer blocks than planned fit an SM. A
    # thread takes vectors_per_thread vectors: four for a forward (one array read), one for
    # a backward.
    from scratchnn.kernels import cuda

    fake = fake_cupy.install(monkeypatch, kernels=True)
    grids: list[tuple[str, int]] = []
    call = fake.RawKernel.__call__

    def recorded(kernel: Any, grid: Any, block: Any, args: Any, **options: Any) -> Any:
        assert block == (cuda.BLOCK,)
        grids.append((kernel.name, grid[0]))
        return call(kernel, grid, block, args, **options)

    monkeypatch.setattr(fake.RawKernel, "__call__", recorded)
    rng = np.random.default_rng(3)
    x = fake.asarray(rng.standard_normal(4 * 256 * 10 + 3, dtype=np.float32))
    dout = fake.asarray(rng.standard_normal(x.size, dtype=np.float32))
    layer = snn.Sigmoid()
    layer.forward(x)  # 2560 vectors of four, four a thread, and a scalar tail of 3
    layer.backward(dout)  # 2560 vectors, one a thread
    snn.Sigmoid().forward(x[1:])  # one element in: unaligned, 10242 elements one at a time
    monkeypatch.setattr(cuda, "MAX_BLOCKS", 2)
    y = snn.Sigmoid().forward(x)  # the grid-stride loops cover what 2 blocks do not
    np.testing.assert_allclose(y.get(), snn.Sigmoid().forward(x.get()), rtol=1e-6)
    assert grids == [("sigmoid_forward", 3), ("sigmoid_backward", 10), ("sigmoid_forward", 41),
                     ("sigmoid_forward", 2)]  # fmt: skip


# The CUDA sources run on the CPU (tests/fake_cuda.py). With launches set by hand, this checks
# each kernel's indexing (vector path, scalar tail, grid-stride loop) and its translated
# formula against the op's NumPy evaluation.
@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_kernel_source_computes_its_op_on_the_cpu(
    dtype: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scratchnn.kernels.ops import evaluate

    fake = fake_cupy.install(monkeypatch, kernels=True)
    rng = np.random.default_rng(12)
    for name, op in OPS.items():
        kernel = fake.RawKernel(source(op, dtype), op.name)
        for n, vec, grid, block in [(103, 1, 3, 4), (103, 0, 2, 5), (8, 1, 1, 1), (1, 1, 2, 2)]:
            arrays = []
            for array_name in op.inputs:
                if array_name in op.masks:
                    arrays.append(rng.random(n) < 0.5)
                elif array_name in ("h", "v") and not name.startswith(("silu", "sigmoid", "gelu")):
                    arrays.append(rng.random(n).astype(dtype))  # second moments are >= 0
                else:
                    arrays.append((3 * rng.standard_normal(n)).astype(dtype))
            if n >= 8 and "x" in op.inputs:
                # NaN and the infinities must come out as the formula says (the NaN-keeping
                # min and max, exp of -inf); -0.0 keeps its sign.
                arrays[op.inputs.index("x")][:5] = [np.nan, np.inf, -np.inf, -0.0, 0.0]
            scalars = {s: float(rng.uniform(0.1, 0.9)) for s in op.scalars}
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is NaN by design
                expected = evaluate(op, np, [a.copy() for a in arrays], scalars)
            on_device = {a: fake.asarray(array.copy()) for a, array in zip(op.inputs, arrays)}
            for o in op.outputs:
                on_device.setdefault(o, fake.empty(n, bool if o in op.masks else dtype))
            names = [*op.inputs, *(o for o in op.outputs if o not in op.inputs)]
            args = [on_device[a] for a in names] + [dtype(scalars[s]) for s in op.scalars]
            kernel((grid,), (block,), (*args, np.int64(n), np.int32(vec)))
            for output, want in zip(op.outputs, expected):
                rtol = 1e-12 if dtype == np.float64 else 2e-6
                np.testing.assert_allclose(
                    on_device[output].get(), want, rtol=rtol, atol=rtol, err_msg=f"{name} {output}"
                )


def test_kernels_refuse_a_wrong_count_of_arrays(gpu: Any) -> None:
    # A kernel takes its arguments by position (and CuPy does not count them): one array too
    # many or too few would shift all the later ones, so the count is checked first.
    from scratchnn import kernels

    x = gpu.asarray(np.ones(8))
    with pytest.raises(TypeError, match=r"relu_backward takes 2 arrays \(dout, mask\), got 1"):
        kernels.run("relu_backward", x)
    with pytest.raises(TypeError, match="sgd takes 2 arrays"):
        kernels.run_many("sgd", [[x, x], [x, x, x]], lr=0.1)
    assert np.array_equal(to_host(x), np.ones(8))  # refused before any step


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_step_reads_scalars_from_the_gpu_as_it_runs(dtype: Any, gpu: Any) -> None:
    # Adam's step with its two folded bias corrections read from GPU memory (as a replayed
    # graph takes them) is the step with them given by value; next_row fills them in from
    # a table, row by row, and counts the rows. Another dtype is refused, and so is a
    # DeviceScalar where the fused kernel cannot run (NumPy arrays).
    from scratchnn import kernels
    from scratchnn.kernels.cuda import DeviceScalar, next_row

    if not hasattr(gpu, "RawModule"):
        pytest.skip("the fake CuPy without kernels runs no CUDA kernels")
    rng = np.random.default_rng(13)
    tensors = [[rng.standard_normal(n).astype(dtype) for _ in range(4)] for n in (37, 8, 1000)]
    for arrays in tensors:
        arrays[3] = np.abs(arrays[3])  # (v, a sum of squares)
    given = {"beta1": 0.9, "one_minus_beta1": 0.1, "beta2": 0.999, "one_minus_beta2": 1e-3}
    table = np.array([[31.25, 0.5], [0.0, 0.0], [17.5, 0.25]], dtype)
    results = []
    for by_value in (True, False):
        on_gpu = [[gpu.asarray(a.copy()) for a in arrays] for arrays in tensors]
        if by_value:
            kernels.run_many("adam", on_gpu, **given, inv_scale=17.5, eps_scaled=0.25)
        else:
            rows, row = gpu.asarray(table), gpu.asarray(np.full(2, np.nan, dtype))
            index = gpu.asarray(np.array([1], np.int64))
            next_row(gpu, rows, row, index)
            next_row(gpu, rows, row, index)  # rows 1 then 2
            assert to_host(index).tolist() == [3] and to_host(row).tolist() == [17.5, 0.25]
            at = {"inv_scale": DeviceScalar(row[0:1]), "eps_scaled": DeviceScalar(row[1:2])}
            kernels.run_many("adam", on_gpu, **given, **at)
        results.append([[to_host(a) for a in arrays] for arrays in on_gpu])
    for got, want in zip(results[1], results[0]):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(results[0][0][0], tensors[0][0])  # a step was taken
    other = np.float64 if dtype == np.float32 else np.float32
    wrong = DeviceScalar(gpu.asarray(np.ones(1, other)))
    arrays = [gpu.asarray(a) for a in tensors[0]]
    with pytest.raises(TypeError, match=f"one element of the kernel's dtype {np.dtype(dtype)}"):
        kernels.run_many("adam", [arrays], **given, inv_scale=wrong, eps_scaled=0.25)
    with pytest.raises(TypeError, match="scalars read from the GPU take its fused CUDA kernel"):
        kernels.run_many("adam", [tensors[0]], **given, inv_scale=wrong, eps_scaled=0.25)


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


def test_cli_evaluate_on_cuda_without_cupy_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from scratchnn.cli import main

    monkeypatch.setitem(sys.modules, "cupy", None)
    code = main(["evaluate", str(tmp_path / "model.safetensors"), "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install scratchnn[gpu]" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("c_in", [1, 8], ids=["per image", "one product"])
def test_conv_moved_to_the_device_between_forward_and_backward(c_in: int, gpu: Any) -> None:
    """Conv2d decides how to multiply from where its kept col lives, not from the forward."""
    from scratchnn.backend import move_arrays

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
    from scratchnn.models import cnn

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


# -- benchmarks/bench_gpu_host.py: scratchnn's host time per step, on a null device -------------


def test_the_host_benchmarks_steps_make_the_same_device_calls() -> None:
    # The benchmark's difference is scratchnn's own Python only if both steps ask the device
    # for the same work; it says so when they do not, and any NumPy dispatch left in a
    # layer shows as a "numpy ..." call.
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu_host.py"
    result = subprocess.run(
        [sys.executable, str(path), "--rounds", "1"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "differ in device calls" not in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 784-")]
    assert len(rows) == 2, result.stdout
    for row in rows:
        assert "numpy" not in row and "18 empty, 8 gemm, 7 kernel" in row, row


@pytest.mark.parametrize(
    ("script", "argument"),
    [("bench_gpu_host.py", "--rounds"), ("bench_epoch.py", "--rounds"), ("gpu.py", "--repeats")],
)
def test_the_benchmarks_refuse_zero_rounds_by_name(script: str, argument: str) -> None:
    # Zero rounds would end in a median of nothing: refused at once, the argument named.
    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    result = subprocess.run(
        [sys.executable, str(path), argument, "0"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert argument in result.stderr and "at least 1" in result.stderr


def test_accuracy_of_a_network_on_the_device_names_host_labels(gpu: Any) -> None:
    # As loss and gradient do: scratchnn's mixing error, not the array library's own.
    net = snn.mlp([4, 3], rng=np.random.default_rng(0), dtype=np.float64).to("cuda")
    x = gpu.asarray(np.ones((2, 4)))
    for labels in (np.array([0, 1]), [0, 1]):
        with pytest.raises(TypeError, match=r"cannot mix NumPy \(cpu\) and CuPy \(cuda\)"):
            net.accuracy(x, labels)
    assert net.accuracy(x, gpu.asarray(np.array([0, 1]))) in (0.0, 0.5, 1.0)


def test_a_mask_of_another_shape_or_dtype_takes_the_array_calls_not_the_kernel(gpu: Any) -> None:
    # The kernel reads every array as dout's size: a (1,) mask beside a (1000,) dout was read
    # out of bounds (306 elements kept, AddressSanitizer's heap overflow), and a float mask
    # as bytes. The array calls broadcast, or refuse, as NumPy does.
    from scratchnn import kernels

    dout = np.random.default_rng(3).standard_normal(1000)
    for mask in (np.array([True]), np.array([False]), (dout > 0).astype(np.float64)):
        (dx,) = kernels.run("relu_backward", gpu.asarray(dout), gpu.asarray(mask))
        np.testing.assert_array_equal(to_host(dx), np.where(mask, 0.0, dout))
    with pytest.raises(ValueError):
        kernels.run("relu_backward", gpu.asarray(dout), gpu.asarray(np.ones(10, bool)))


def _gpu_benchmark_script(name: str) -> Any:
    """benchmarks/<name>.py, one of the GPU scripts that import gpu.py's clock."""
    _benchmark_module()  # they import gpu.py as "gpu": the same module, by that name
    sys.modules.setdefault("gpu", sys.modules["benchmark_gpu"])
    return _load_script(f"benchmarks/{name}.py", f"benchmark_{name}")


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_the_kernel_benchmark_runs_through_on_the_fake_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A dry run before a lent GPU runs it: every variant compiles, agrees with the
    # library's launch, and PyTorch's backward operators take the arguments given.
    torch = pytest.importorskip("torch")
    fake = fake_cupy.install(monkeypatch, kernels=True)
    benchmark = _gpu_benchmark_script("gpu_kernels")
    rows = benchmark.time_kernels(fake, torch, 1, _HostClock(), n=4 * 256 * 4 + 8)
    names = [f"{k[0]} {d}" for k in benchmark.KERNELS for d in ("fwd", "bwd")]
    assert [r.what for r in rows] == ["device copy (read+write)", *names, "sgd step", "adam step"]
    assert all(set(r.ms) == {v.name for v in benchmark.VARIANTS} for r in rows[1:])
    assert all(t > 0 for r in rows[1:] for t in r.ms.values())


def test_the_kernel_benchmark_finds_a_variant_that_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    if fake_cuda.available() is not None:
        pytest.skip(str(fake_cuda.available()))
    fake = fake_cupy.install(monkeypatch, kernels=True)
    benchmark = _gpu_benchmark_script("gpu_kernels")
    x = fake.asarray(np.random.default_rng(1).standard_normal(64, dtype=np.float32))
    runners = {"u2": benchmark.Runner(fake, "sigmoid_forward", benchmark.Variant("u2", 2, 256))}
    assert benchmark._check(fake, "sigmoid_forward", runners, [x], {}) == 0.0
    wrong = benchmark.Runner(fake, "tanh_forward", benchmark.Variant("u2", 2, 256))
    with pytest.raises(AssertionError, match="sigmoid_forward u2: y differs"):
        benchmark._check(fake, "sigmoid_forward", {"u2": wrong}, [x], {})


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_gelu_on_the_device_is_within_a_few_ulps_of_mpmath(dtype: Any, gpu: Any) -> None:
    # The float32 kernels compute Phi by our own erfcx fit and phi from the same exact
    # x*x (kernels/cuda.py, ncdf_float and npdf_float): libdevice's erfcf of the rounded
    # -x/sqrt(2) put y up to 187 ulps off in the left tail, and exp(-x*x/2) put dx 60 ulps
    # off. float64 carries -x/sqrt(2) and x*x to twice the precision (ncdf_double, and
    # functional.ncdf where the kernels do not run): 1,857 ulps off before. The reference
    # is mpmath at 40 digits.
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    rng = np.random.default_rng(5)
    far = 13.5 if dtype == np.float32 else 37.5
    x = np.concatenate([rng.uniform(-far, far, 2000), rng.uniform(-4, 4, 1000),
                        np.linspace(-far, -8, 300)]).astype(dtype)  # fmt: skip
    exact = [mpmath.mpf(float(v)) for v in x]
    y_ref = np.array([float(v * mpmath.ncdf(v)) for v in exact])
    dx_ref = np.array([float(mpmath.ncdf(v) + v * mpmath.npdf(v)) for v in exact])
    # dx's own size: the sum cancels to 0 at x = -0.7518, where no formula keeps ulps of it.
    dx_size = np.array([float(mpmath.ncdf(v) + abs(v * mpmath.npdf(v))) for v in exact])
    layer = snn.Gelu()
    y = to_host(layer.forward(gpu.asarray(x)))
    dx = to_host(layer.backward(gpu.ones(x.shape, dtype=dtype)))
    # A GPU flushes float32 subnormals to 0: where Phi(x) is one (x < -13.04) y is 0, and
    # where phi(x) is one (x < -13.1) so is x phi(x), normal or not.
    tiny = np.finfo(dtype).tiny
    phi_ref = np.array([float(mpmath.ncdf(v)) for v in exact])
    pdf_ref = np.array([float(mpmath.npdf(v)) for v in exact])
    normal = (np.abs(y_ref) >= tiny) & (phi_ref >= tiny)
    y_ulps = np.abs(y - y_ref) / np.spacing(np.abs(y_ref).astype(dtype))
    assert y_ulps[normal].max() <= 16, x[normal][np.argmax(y_ulps[normal])]
    normal = (dx_size >= tiny) & (phi_ref >= tiny) & (pdf_ref >= tiny)
    dx_ulps = np.abs(dx - dx_ref) / np.spacing(dx_size.astype(dtype))
    assert dx_ulps[normal].max() <= 16, x[normal][np.argmax(dx_ulps[normal])]
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 20.0, -50.0], dtype=dtype)
    layer = snn.Gelu()
    y_special = to_host(layer.forward(gpu.asarray(special)))
    np.testing.assert_array_equal(y_special, [0.0, -0.0, np.inf, np.nan, np.nan, 20.0, -0.0])
    # inf * phi(inf) = inf * 0: NaN, as in PyTorch.
    dx_special = to_host(layer.backward(gpu.ones(special.shape, dtype=dtype)))
    np.testing.assert_array_equal(dx_special, [0.5, 0.5, np.nan, np.nan, np.nan, 1.0, 0.0])


def test_the_float32_ncdf_coefficients_are_the_fit_of_scripts_fit_ncdf() -> None:
    # The kernel's polynomial is the script's output (to a float32 rounding: another
    # BLAS may move the fit's last digits), and the fit is as close as it says.
    from scratchnn.kernels import cuda

    script = _load_script("scripts/fit_ncdf.py", "fit_ncdf")
    coefficients, error = script.fit()
    assert error < 1e-8
    horner = cuda._NCDF["float"].split("float q = ")[1].split("const float square")[0]
    in_kernel = re.findall(r"([-0-9.e+]+)f\)?;", horner)
    assert len(in_kernel) == script.DEGREE + 1
    np.testing.assert_allclose([float(c) for c in reversed(in_kernel)], coefficients, rtol=1e-6)


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_the_host_calls_benchmark_runs_through_on_the_fake_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A dry run before a lent GPU runs it: every call and its PyTorch counterpart run,
    # at the step's shapes, the candidates compute what the calls they would replace do
    # (time_calls checks each first), and the table adds the step's calls up.
    torch = pytest.importorskip("torch")
    fake = fake_cupy.install(monkeypatch, kernels=True)
    benchmark = _gpu_benchmark_script("gpu_calls")
    # Narrower layers than on a card: the stand-in runs column_sum's threads as OS threads
    # (it synchronises them) and every kernel unoptimised; the card's shapes took seconds.
    monkeypatch.setattr(benchmark, "SIZES", (784, 100, 64, 10))
    monkeypatch.setattr(benchmark, "BATCH", 40)
    rows = benchmark.time_calls(fake, torch, 2, 1, _HostClock())
    assert len(rows) == 15 + len(benchmark.ALTERNATIVES)
    assert [r.what for r in rows[15:]] == list(benchmark.ALTERNATIVES)
    assert all(r.ours_us > 0 and r.theirs_us > 0 for r in rows)
    assert sum(r.per_step for r in rows) == 18  # 25 device calls, 7 inside (bench_gpu_host)
    assert "the 18 calls of a step, added up" in benchmark.table(rows)


# -- Affine's bias kernels (scratchnn.kernels.bias) -----------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (40, 100), (513, 33), (4096, 3), (4097, 3),
                                   (0, 4), (6, 0)])  # fmt: skip
def test_the_bias_kernels_add_and_sum_as_exactly_as_numpy(
    shape: Any, dtype: Any, gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # add_bias adds as NumPy does, bit for bit; column_sum sums in double, so a float32 sum
    # is the exact sum rounded once (within 1 ulp here), a float64 one within a few ulps
    # of the sum of its |terms|. Beyond MAX_ROWS (4097 rows), for empty matrices, and where
    # CuPy compiles no kernels, CuPy's own calls: any order of summation's bound.
    from scratchnn.kernels import bias

    launched: list[str] = []
    kernel = bias._kernel
    monkeypatch.setattr(bias, "_kernel", lambda *a: launched.append(a[2]) or kernel(*a))
    rng = np.random.default_rng(7)
    g_host = rng.standard_normal(shape).astype(dtype)
    b_host = rng.standard_normal(shape[1]).astype(dtype)
    out = gpu.asarray(g_host)
    bias.add_bias(out, gpu.asarray(b_host))
    np.testing.assert_array_equal(to_host(out), g_host + b_host)
    sums = to_host(bias.column_sum(gpu.asarray(g_host)))
    assert sums.dtype == dtype and sums.shape == (shape[1],)
    exact = np.array([math.fsum(column) for column in g_host.T.tolist()])
    kernels = hasattr(gpu, "RawModule")
    expected = (["add_bias"] if kernels and g_host.size else []) + (
        ["column_sum"] if kernels and 0 < shape[0] <= bias.MAX_ROWS and shape[1] else [])
    assert launched == expected
    eps, scale = np.finfo(dtype).eps, np.abs(g_host).sum(axis=0)
    if "column_sum" not in launched:
        assert (np.abs(sums - exact) <= shape[0] * eps * scale).all()
    elif dtype == np.float32:
        ulps = np.abs(sums - exact) / np.spacing(np.abs(exact).astype(np.float32))
        assert ulps.max(initial=0) <= 1
    else:
        assert (np.abs(sums - exact) <= 4 * eps * scale).all()


def test_the_bias_kernels_leave_other_layouts_to_cupy(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A view with strides, a bias of another dtype: CuPy's own calls, right all the same.
    from scratchnn.kernels import bias

    launched: list[str] = []
    kernel = bias._kernel
    monkeypatch.setattr(bias, "_kernel", lambda *a: launched.append(a[2]) or kernel(*a))
    rng = np.random.default_rng(8)
    g_host = rng.standard_normal((30, 16)).astype(np.float32)
    strided = gpu.asarray(g_host)[:, ::2]
    np.testing.assert_allclose(to_host(bias.column_sum(strided)), g_host[:, ::2].sum(axis=0),
                               rtol=1e-5)  # fmt: skip
    out = gpu.asarray(g_host)
    b64 = rng.standard_normal(16)
    bias.add_bias(out, gpu.asarray(b64))
    np.testing.assert_array_equal(to_host(out), (g_host + b64).astype(np.float32))
    bias.add_bias(strided, gpu.asarray(b_host := np.ones(8, np.float32)))
    np.testing.assert_array_equal(to_host(strided), g_host[:, ::2] + b_host)
    assert launched == []


# -- matrix products by cuBLAS directly (scratchnn.kernels.products) ------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shapes", [((5, 7), (7, 3)), ((1, 4), (4, 1)), ((6, 1), (1, 5)),
                                    ((33, 64), (64, 17))])  # fmt: skip
def test_products_are_cupys_for_every_layout_a_step_uses(
    shapes: Any, dtype: Any, gpu: Any
) -> None:
    # x @ W, x.T @ g and g @ W.T: C-contiguous matrices and transposed views, on either
    # side, against NumPy's product in float64 (on the CPU, cuBLAS is a stand-in that
    # reads and writes the arrays at the addresses passed, column-major, as cuBLAS does).
    from scratchnn.kernels import products

    rng = np.random.default_rng(22)
    (n, k), (_, m) = shapes
    a_host, b_host = rng.standard_normal((n, k)), rng.standard_normal((k, m))
    a, b = gpu.asarray(a_host.astype(dtype)), gpu.asarray(b_host.astype(dtype))
    a_t = gpu.asarray(np.ascontiguousarray(a_host.T).astype(dtype)).T  # a transposed view
    b_t = gpu.asarray(np.ascontiguousarray(b_host.T).astype(dtype)).T
    # Views at an offset: a batch's rows of a larger matrix, and a transposed view of one.
    a_rows = gpu.asarray(np.vstack([np.ones((1, k)), a_host, np.ones((2, k))]).astype(dtype))
    a_rows = a_rows[1 : n + 1]
    b_cols = gpu.asarray(np.vstack([np.ones((3, k)), b_host.T]).astype(dtype))[3:].T
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    for x, y in ((a, b), (a_t, b), (a, b_t), (a_t, b_t), (a_rows, b_cols), (a_rows, b)):
        got = products.matmul(x, y)
        assert got.dtype == dtype and got.shape == (n, m)
        np.testing.assert_allclose(to_host(got), a_host @ b_host, rtol=rtol, atol=rtol)
    binding = hasattr(gpu, "RawModule")  # (the fake CuPy with kernels has the stand-in)
    made = products._gemms[(type(a), a.dtype)]
    assert (made is not None) == binding
    if binding:
        assert products.disabled == {}
    else:  # the stand-in without one: said, and CuPy's products
        assert "cupy_backends" in products.disabled[np.dtype(dtype).name]


def test_products_leave_float32_to_cupy_where_cupy_computes_in_tf32(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CUPY_TF32 set: CuPy's float32 products round their inputs to TF32, which sgemm would
    # not; CuPy's products then, said in `disabled`. float64 is not affected.
    from scratchnn.kernels import products

    if not hasattr(gpu, "RawModule"):
        pytest.skip("the fake CuPy without kernels has no stand-in for cuBLAS")
    monkeypatch.setenv("CUPY_TF32", "1")
    a32, b32 = gpu.ones((3, 4), dtype=np.float32), gpu.ones((4, 2), dtype=np.float32)
    np.testing.assert_array_equal(to_host(products.matmul(a32, b32)), np.full((3, 2), 4.0))
    assert products._gemms[(type(a32), a32.dtype)] is None
    assert "CUPY_TF32" in products.disabled["float32"]
    a64 = gpu.ones((3, 4), dtype=np.float64)
    products.matmul(a64, gpu.ones((4, 2), dtype=np.float64))
    assert products._gemms[(type(a64), a64.dtype)] is not None


def test_products_leave_other_arrays_to_cupy_and_a_refusing_binding_off(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # float16, a strided view, mixed dtypes, an empty matrix, NumPy arrays: a @ b; a
    # binding that refuses its call (unlike CuPy 14's) is said in `disabled` and CuPy's
    # products take over, right.
    from scratchnn.kernels import products

    if not hasattr(gpu, "RawModule"):
        pytest.skip("the fake CuPy without kernels has no stand-in for cuBLAS")
    rng = np.random.default_rng(23)
    a_host, b_host = rng.standard_normal((6, 8)), rng.standard_normal((8, 4))
    calls: list[int] = []
    a, b = gpu.asarray(a_host), gpu.asarray(b_host)
    products.matmul(a, b)  # (made at its first use)
    gemm = products._gemms[(type(a), a.dtype)]
    original = gemm.gemm
    monkeypatch.setattr(gemm, "gemm", lambda *args: calls.append(1) or original(*args))
    cases = [
        (gpu.asarray(a_host.astype(np.float16)), gpu.asarray(b_host.astype(np.float16))),
        (gpu.asarray(np.repeat(a_host, 2, axis=1))[:, ::2], gpu.asarray(b_host)),
        (gpu.asarray(a_host), gpu.asarray(b_host.astype(np.float32))),
        (gpu.asarray(a_host[:0]), gpu.asarray(b_host)),
    ]
    for x, y in cases:
        np.testing.assert_allclose(to_host(products.matmul(x, y)),
                                   to_host(x).astype(np.float64) @ to_host(y), rtol=1e-2)  # fmt: skip
    assert products.matmul(a_host, b_host) is not None and calls == []
    np.testing.assert_allclose(to_host(products.matmul(gpu.asarray(a_host), gpu.asarray(b_host))),
                               a_host @ b_host, rtol=1e-12)  # fmt: skip
    assert calls == [1]

    def refuses(*args: Any) -> None:
        raise TypeError("an argument of another type")

    monkeypatch.setattr(gemm, "gemm", refuses)
    np.testing.assert_allclose(to_host(products.matmul(gpu.asarray(a_host), gpu.asarray(b_host))),
                               a_host @ b_host, rtol=1e-12)  # fmt: skip
    assert "TypeError" in products.disabled["float64"]
    assert products._gemms[(type(a), a.dtype)] is None  # from then on, CuPy's products


def test_products_in_a_capture_are_cublas_librarys_on_the_capturing_stream(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Within products.capturing(stream), every layout a step uses is made by cuBLAS's C
    # library on scratchnn's own handle, bound to that stream with its own workspace: the
    # products are captured into a CUDA graph, which replayed on new inputs in the same
    # arrays gives their products. (On the CPU the stand-in records the launches and the
    # products by address and replays them; CuPy's binding refuses a capture, as CuPy 14's
    # does.) Outside, the products are CuPy's binding's again; the handle is made once.
    from scratchnn.kernels import products

    if not hasattr(gpu, "RawModule"):
        pytest.skip("the fake CuPy without kernels has no stand-in for cuBLAS")
    monkeypatch.delenv("CUPY_TF32", raising=False)
    rng = np.random.default_rng(24)
    library = getattr(gpu, "cublas_library", None)  # the stand-in's, on the CPU
    for dtype, rtol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        a = gpu.asarray(rng.standard_normal((9, 6)).astype(dtype))
        b_t = gpu.asarray(rng.standard_normal((5, 6)).astype(dtype)).T  # a transposed view
        g = gpu.asarray(rng.standard_normal((9, 5)).astype(dtype))
        stream = gpu.cuda.Stream(non_blocking=True)
        gpu.cuda.Device().synchronize()  # the inputs are made before the stream reads them
        with products.capturing(stream), stream:
            stream.begin_capture()
            outs = [products.matmul(a, b_t), products.matmul(a.T, g), products.matmul(g, b_t.T)]
            graph = stream.end_capture()
        if library is not None:
            name = "sgemm" if dtype == np.float32 else "dgemm"
            workspace = (products._own[0].workspace.data.ptr, products.WORKSPACE_BYTES)
            assert library.products == [(name, stream.ptr, workspace)] * 3
            assert library.math_mode == 0
            library.products.clear()
        # New inputs in the same arrays, the graph replayed.
        a_host, b_host = rng.standard_normal((9, 6)), rng.standard_normal((6, 5))
        gpu.copyto(a, gpu.asarray(a_host.astype(dtype)))
        gpu.copyto(b_t, gpu.asarray(b_host.astype(dtype)))
        graph.launch()  # on the current stream, after the copies, as a step's replay is
        gpu.cuda.Device().synchronize()
        g_host = to_host(g).astype(np.float64)
        for got, want in zip(outs, (a_host @ b_host, a_host.T @ g_host, g_host @ b_host.T)):
            assert got.dtype == dtype
            np.testing.assert_allclose(to_host(got), want, rtol=rtol, atol=rtol)
        outside = products.matmul(a, b_t)  # CuPy's binding again
        np.testing.assert_allclose(to_host(outside), a_host @ b_host, rtol=rtol, atol=rtol)
        assert library is None or library.products == []
    assert len(products._own) == 1 and (library is None or library.handles == 1)


def test_a_captures_products_pass_through_ctypes_as_cublas_takes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Real ctypes against a C library with cuBLAS's prototypes (tests/cublas_stub.c): the
    # handle made through a pointer, the stream, a workspace and the math mode set on it,
    # and every layout a step uses, float32 and float64, through products.capturing: the
    # products right against NumPy, made on the handle bound to the stream.
    from scratchnn.kernels import products

    if shutil.which("gcc") is None:
        pytest.skip("no C compiler (gcc) to build the stand-in cuBLAS library")
    library_path = tmp_path / "libcublas_stub.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(library_path),
                    str(Path(__file__).with_name("cublas_stub.c"))], check=True)  # fmt: skip
    gpu = fake_cupy.install(monkeypatch, kernels=True)
    library = ctypes.CDLL(str(library_path))
    monkeypatch.setattr(products, "_load_cublas", lambda: library)
    monkeypatch.setenv("CUPY_TF32", "1")
    stream = gpu.cuda.Stream(non_blocking=True)
    rng = np.random.default_rng(25)
    made = 0
    for dtype, rtol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        a_host, b_host = rng.standard_normal((9, 6)), rng.standard_normal((6, 5))
        g_host = rng.standard_normal((9, 5))
        a, g = gpu.asarray(a_host.astype(dtype)), gpu.asarray(g_host.astype(dtype))
        b_t = gpu.asarray(np.ascontiguousarray(b_host.T).astype(dtype)).T
        with products.capturing(stream):
            outs = [products.matmul(a, b_t), products.matmul(a.T, g), products.matmul(g, b_t.T)]
        made += 3
        wants = (a_host @ b_host, a_host.T @ g_host, g_host @ b_host.T)
        for got, want in zip(outs, wants):
            np.testing.assert_allclose(to_host(got), want, rtol=rtol, atol=rtol)
    handle = ctypes.c_void_p(products._own[0].handle)
    library.stub_stream.restype = ctypes.c_void_p
    library.stub_workspace_bytes.restype = ctypes.c_size_t
    assert library.stub_stream(handle) == stream.ptr
    assert library.stub_workspace_bytes(handle) == products.WORKSPACE_BYTES
    assert library.stub_math_mode(handle) == 3  # (CUPY_TF32: CuPy's float32 precision)
    assert library.stub_products(handle) == made


def test_a_capture_takes_cupys_precision_and_says_what_cublas_refused(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CUPY_TF32 set: the own handle computes as CuPy's float32 products then do (TF32 math
    # mode), and back to the default once it is unset. A status other than success from
    # cuBLAS's library is a RuntimeError that names the function.
    from scratchnn.kernels import products

    if not hasattr(gpu, "cublas_library"):
        pytest.skip("the stand-in for cuBLAS's library (on a card: the replay test above)")
    library, stream = gpu.cublas_library, types.SimpleNamespace(ptr=5)
    monkeypatch.setenv("CUPY_TF32", "1")
    with products.capturing(stream):
        pass
    assert library.math_mode == 3
    monkeypatch.setenv("CUPY_TF32", "0")
    with products.capturing(stream):
        pass
    assert library.math_mode == 0
    monkeypatch.setattr(products, "WORKSPACE_BYTES", 0)  # refused by the stand-in
    with pytest.raises(RuntimeError, match="cublasSetWorkspace_v2 returned status 7"):
        with products.capturing(stream):
            pass
    a = gpu.ones((2, 2), dtype=np.float32)
    assert products._gemms.get((type(a), a.dtype)) is None  # nothing of the capture left


def test_cublas_library_is_the_loaded_one_else_the_one_of_cupys_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A capture's products call the cuBLAS library CuPy loaded (its handle made first, for
    # a CuPy that loads it at its first use), else the library of the major version CuPy's
    # cuBLAS reports; none loading is a RuntimeError naming each tried.
    from scratchnn.kernels import products

    load = products._load_cublas  # (the stand-in installed below replaces it)
    fake_cupy.install(monkeypatch, kernels=True)
    cublas = sys.modules["cupy_backends.cuda.libs.cublas"]
    monkeypatch.setattr(cublas, "getVersion", lambda handle: 120805, raising=False)
    monkeypatch.setattr(products, "loaded", lambda prefix, maps: ["/gone/libcublas.so.12.8"])
    tried: list[str] = []

    def opens(name: str, works: str = "libcublas.so.12") -> Any:
        tried.append(name)
        if name != works:
            raise OSError(f"{name}: cannot open shared object file")
        return types.SimpleNamespace(name=name)

    monkeypatch.setattr(products.ctypes, "CDLL", opens)
    assert load().name == "libcublas.so.12"
    assert tried == ["/gone/libcublas.so.12.8", "libcublas.so.12"]
    monkeypatch.setattr(products.ctypes, "CDLL", functools.partial(opens, works="none"))
    with pytest.raises(RuntimeError, match=r"not found \(tried /gone/libcublas.so.12.8, "
                                           r"libcublas.so.12\)"):  # fmt: skip
        load()


def test_the_loaded_libraries_are_read_from_the_process_maps() -> None:
    # Where cuBLAS's library is found for a capture: the paths in /proc/self/maps whose
    # file name starts so, once each, in order; libcublasLt is another library.
    from scratchnn.kernels import products

    maps = "\n".join([
        "7f00-7f10 r-xp 00000000 08:01 42   /opt/cuda/lib/libcublas.so.12.4.5.8",
        "7f10-7f20 r--p 00001000 08:01 42   /opt/cuda/lib/libcublas.so.12.4.5.8",
        "7f20-7f30 r-xp 00000000 08:01 43   /opt/cuda/lib/libcublasLt.so.12",
        "7f30-7f40 rw-p 00000000 00:00 0 ",
        "7f40-7f50 r-xp 00000000 08:01 44   /usr/lib/my dir/libcublas.so.13",
        "7f50-7f60 rw-p 00000000 00:00 0    [heap]",
    ])  # fmt: skip
    assert products.loaded("libcublas.so", maps) == [
        "/opt/cuda/lib/libcublas.so.12.4.5.8", "/usr/lib/my dir/libcublas.so.13"]
    if Path("/proc/self/maps").exists():  # this process's own: its C library is there
        real = products.loaded("libc.so", Path("/proc/self/maps").read_text())
        assert real and all(Path(path).exists() for path in real)


# -- an Affine and the Relu after it, run as one pair (Sequential on the GPU) ---------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (40, 100), (513, 33), (4096, 3), (4097, 3),
                                   (0, 4), (6, 0)])  # fmt: skip
def test_the_pair_kernels_compute_the_separate_calls_bit_for_bit(
    shape: Any, dtype: Any, gpu: Any
) -> None:
    # add_bias_relu is h + b, then ReLU (off where <= 0, so -0 and NaN's comparison count as
    # NumPy's: NaN passes), in place; relu_column_sum is ReLU's backward where(mask, 0,
    # dout) and its column sums, summed as column_sum sums. None where they do not apply
    # (no kernels, empty, beyond MAX_ROWS): the caller then makes the separate calls.
    from scratchnn.kernels import bias

    rng = np.random.default_rng(9)
    rows, cols = shape
    h_host = rng.standard_normal(shape).astype(dtype)
    b_host = rng.standard_normal(cols).astype(dtype)
    if h_host.size > 2:  # a sum of exactly 0, a -0, a NaN
        h_host[0, 0], h_host.flat[1], h_host.flat[2] = -b_host[0], -0.0, np.nan
        b_host[1 % cols] = 0.0 if cols > 1 else b_host[0]
    out = gpu.asarray(h_host)
    mask = bias.add_bias_relu(out, gpu.asarray(b_host))
    kernels = hasattr(gpu, "RawModule")
    if not kernels or h_host.size == 0:
        assert mask is None
        np.testing.assert_array_equal(to_host(out), h_host)  # left for the separate calls
    else:
        summed = h_host + b_host
        expected = np.where(summed <= 0, 0.0, summed).astype(dtype)
        np.testing.assert_array_equal(to_host(mask), summed <= 0)
        np.testing.assert_array_equal(to_host(out), expected)
        assert (np.signbit(to_host(out)) == np.signbit(expected)).all()  # 0 where off, not -0

    dout_host = rng.standard_normal(shape).astype(dtype)
    off_host = rng.random(shape) < 0.5
    fused = bias.relu_column_sum(gpu.asarray(dout_host), gpu.asarray(off_host))
    if not kernels or not 0 < rows <= bias.MAX_ROWS or not cols:
        assert fused is None
        return
    assert fused is not None
    g, db = fused
    through = np.where(off_host, 0.0, dout_host).astype(dtype)
    np.testing.assert_array_equal(to_host(g), through)
    assert (np.signbit(to_host(g)) == np.signbit(through)).all()
    np.testing.assert_array_equal(to_host(db), to_host(bias.column_sum(gpu.asarray(through))))
    assert to_host(db).dtype == dtype


# A float32 network's gradients against the same network's in float64 on the host.
_GRADIENT_TOLERANCE: dict[Any, dict[str, float]] = {
    np.float64: {"rtol": 1e-9, "atol": 1e-12}, np.float32: {"rtol": 1e-3, "atol": 2e-5}}  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_loss_forward_writes_backwards_gradient_bit_for_bit(dtype: Any, gpu: Any) -> None:
    # with_grad (Sequential.gradient on the GPU): the forward's launch writes what
    # backward(1.0) would launch a kernel for, bit for bit; backward(1.0) takes it once,
    # another dout (or a second call) computes afresh, and the next forward starts over.
    # Labels out of range get no one-hot entry there either.
    rng = np.random.default_rng(18)
    x_host = rng.standard_normal((33, 7)).astype(dtype)
    t_host = rng.integers(0, 7, 33)
    x, t = gpu.asarray(x_host), gpu.asarray(t_host)
    apart = snn.SoftmaxWithLoss()
    loss_apart = float(apart._checked_forward(x, t, borrowed=True))
    expected = to_host(apart.backward(1.0))
    fused = snn.SoftmaxWithLoss()
    loss = float(fused._checked_forward(x, t, borrowed=True, with_grad=True))
    assert loss == loss_apart
    first = fused.backward(1.0)
    np.testing.assert_array_equal(to_host(first), expected)
    assert fused._grad_of_one is None  # taken: a second backward computes its own
    second = fused.backward(1.0)
    assert second is not first
    np.testing.assert_array_equal(to_host(second), expected)
    np.testing.assert_array_equal(to_host(fused.backward(2.0)), to_host(apart.backward(2.0)))
    fused._checked_forward(x, t, borrowed=True, with_grad=True)
    fused._checked_forward(x, t, borrowed=True)  # a forward without: nothing left over
    assert fused._grad_of_one is None
    if not hasattr(gpu, "RawModule"):  # (without kernels the forward checks labels at once)
        return
    bad = gpu.asarray(np.where(np.arange(33) == 4, 9, t_host))  # row 4: label out of range
    fused._checked_forward(x, bad, borrowed=True, wait=False, with_grad=True)
    apart._checked_forward(x, bad, borrowed=True, wait=False)
    np.testing.assert_array_equal(to_host(fused.backward(1.0)), to_host(apart.backward(1.0)))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_the_loss_adds_the_last_affines_bias_as_the_affine_would(dtype: Any, gpu: Any) -> None:
    # bias (Sequential.gradient on the GPU, the last Affine's): the loss's kernel takes the
    # scores as x + b, bit for bit the scores the Affine would have made (its softmax, its
    # loss, its gradient), a NaN in a row included; float16 (no kernel) adds them first.
    rng = np.random.default_rng(19)
    x_host = rng.standard_normal((20, 6)).astype(dtype)
    x_host[3, 2] = np.nan
    b_host = rng.standard_normal(6).astype(dtype)
    t = gpu.asarray(rng.integers(0, 6, 20))
    scores = gpu.asarray(x_host)
    snn.Affine(np.eye(6, dtype=dtype), gpu.asarray(b_host))  # (the check of a bias's dtype)
    from scratchnn.kernels import bias as bias_kernels

    bias_kernels.add_bias(scores, gpu.asarray(b_host))  # as the Affine adds it
    apart = snn.SoftmaxWithLoss()
    loss_apart = float(apart._checked_forward(scores, t, borrowed=True, wait=False))
    fused = snn.SoftmaxWithLoss()
    loss = float(fused._checked_forward(gpu.asarray(x_host), t, borrowed=True, wait=False,
                                        with_grad=True, bias=gpu.asarray(b_host)))  # fmt: skip
    assert np.isnan(loss) and np.isnan(loss_apart)  # the NaN row's loss, in both
    np.testing.assert_array_equal(to_host(fused.y), to_host(apart.y))
    np.testing.assert_array_equal(to_host(fused.backward(1.0)), to_host(apart.backward(1.0)))
    x_host[3, 2] = 0.5  # and a loss to compare
    scores = gpu.asarray(x_host)
    bias_kernels.add_bias(scores, gpu.asarray(b_host))
    loss_apart = float(apart._checked_forward(scores, t, borrowed=True))
    loss = float(fused._checked_forward(gpu.asarray(x_host), t, borrowed=True, with_grad=True,
                                        bias=gpu.asarray(b_host)))  # fmt: skip
    assert loss == loss_apart
    np.testing.assert_array_equal(to_host(fused.backward(1.0)), to_host(apart.backward(1.0)))


def _pair_launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of kernels.bias's kernels as they are launched, from now on."""
    from scratchnn.kernels import bias

    launched: list[str] = []
    kernel = bias._kernel
    monkeypatch.setattr(bias, "_kernel", lambda *a: launched.append(a[2]) or kernel(*a))
    return launched


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [8, 4097])
def test_a_network_runs_each_affine_and_its_relu_as_one_pair_bit_for_bit(
    dtype: Any, batch: int, gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sequential.gradient on the GPU pairs each Affine with the Relu after it: two launches
    # fewer each way, and every gradient, and what every layer holds for its own backward,
    # as the layers run one by one compute it, bit for bit. (4097 rows: beyond MAX_ROWS the
    # backward's pair kernel does not apply, and the pair makes the separate calls.)
    from scratchnn.kernels import bias
    from scratchnn.models import Sequential

    rng = np.random.default_rng(10)
    x_host = rng.standard_normal((batch, 30)).astype(dtype)
    t_host = rng.integers(0, 5, batch)
    runs = []
    launches = _pair_launches(monkeypatch)
    for paired in (True, False):
        monkeypatch.setattr(Sequential, "fuse_on_gpu", paired)
        net = snn.mlp([30, 16, 12, 5], rng=np.random.default_rng(11), dtype=dtype).to("cuda")
        for layer in net.layers[::2]:  # biases that are not zero, so a lost one shows
            layer.b[...] = gpu.asarray(np.random.default_rng(12).standard_normal(layer.b.size))
        start = len(launches)
        grads = net.gradient(gpu.asarray(x_host), gpu.asarray(t_host))
        launched = launches[start:]
        held = [to_host(getattr(layer, name)) for layer in net.layers
                for name in ("x", "dW", "db", "mask") if getattr(layer, name, None) is not None]  # fmt: skip
        runs.append(({k: to_host(v) for k, v in grads.items()}, held, launched, net))
        runs[-1][1].append(np.array(net.last_loss))
    (grads, held, launched, net), (grads_apart, held_apart, launched_apart, _) = runs
    assert sorted(grads) == sorted(grads_apart)
    for key in grads:
        np.testing.assert_array_equal(grads[key], grads_apart[key], err_msg=key)
    # x, dW, db of each Affine; 2 masks; the loss
    assert len(held) == len(held_apart) == 3 + 3 + 3 + 2 + 1
    for mine, theirs in zip(held, held_apart):
        np.testing.assert_array_equal(mine, theirs)
    reference = snn.mlp([30, 16, 12, 5], rng=np.random.default_rng(11), dtype=np.float64)
    for layer, moved in zip(reference.layers[::2], net.layers[::2]):
        layer.b[...] = to_host(moved.b)
    expected = reference.gradient(x_host.astype(np.float64), t_host)
    for key in grads:  # and right: against NumPy in float64
        np.testing.assert_allclose(grads[key], expected[key], **_GRADIENT_TOLERANCE[dtype])
    if not hasattr(gpu, "RawModule"):
        assert launched == launched_apart == []
        return
    assert launched_apart == ["add_bias"] * 3 + (["column_sum"] * 3 if batch <= bias.MAX_ROWS else [])
    backward = ["column_sum", "relu_column_sum", "relu_column_sum"] * (batch <= bias.MAX_ROWS)
    # (the last Affine's bias: added by the loss's kernel, as the step runs on)
    assert launched == ["add_bias_relu", "add_bias_relu", *backward]
    # The layers still work one by one after a paired step, from what each holds.
    relu = net.layers[3]
    dout = gpu.asarray(rng.standard_normal((batch, 12)).astype(dtype))
    np.testing.assert_array_equal(to_host(relu.backward(dout)),
                                  np.where(to_host(relu.mask), 0.0, to_host(dout)))  # fmt: skip


def _fused_and_apart(
    monkeypatch: pytest.MonkeyPatch, make_net: Callable[[], Any], x: Any, t: Any
) -> list[tuple[dict[str, np.ndarray], float, np.ndarray, np.ndarray]]:
    """One gradient step of a fresh ``make_net()`` with the GPU's fusions on, then one with
    them off: each its gradients, its loss, its first Relu's mask and its loss's y."""
    from scratchnn.models import Sequential

    results = []
    for fused in (True, False):
        monkeypatch.setattr(Sequential, "fuse_on_gpu", fused)
        net = make_net()
        grads = net.gradient(x, t)
        results.append(({k: to_host(v) for k, v in grads.items()}, net.last_loss,
                        to_host(net.layers[1].mask), to_host(net.last_layer.y)))  # fmt: skip
    return results


@pytest.mark.parametrize(("net_dtype", "x_dtype", "last_bias_dtype"), [
    (np.float16, np.float16, np.float16), (np.float32, np.float64, np.float32),
    (np.float64, np.float32, np.float64), (np.float32, np.float32, np.float64),
    (np.float16, np.float16, np.float32)])  # fmt: skip
def test_fusions_of_other_dtypes_compute_what_the_layers_apart_do(
    net_dtype: Any, x_dtype: Any, last_bias_dtype: Any, gpu: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # float16 (no kernel: the separate calls), an input of another float dtype than the
    # weights (the Affine casts it), and a last bias set later in another dtype (the
    # constructor refuses one, an assignment does not; the Affine adds it in place, in its
    # product's dtype, and the loss that takes it must too: a review found it added out of
    # place, in the wider dtype): the same gradients, loss, mask and softmax as apart.
    rng = np.random.default_rng(16)
    x_host, t_host = rng.standard_normal((9, 12)).astype(x_dtype), rng.integers(0, 4, 9)
    b1, b2 = rng.standard_normal(8), rng.standard_normal(4).astype(last_bias_dtype)

    def make_net() -> Any:
        net = snn.mlp([12, 8, 4], rng=np.random.default_rng(17), dtype=net_dtype).to("cuda")
        net.layers[0].b[...] = gpu.asarray(b1)
        net.layers[2].b = gpu.asarray(b2)
        return net

    (grads, loss, mask, y), (grads_apart, loss_apart, mask_apart, y_apart) = _fused_and_apart(
        monkeypatch, make_net, gpu.asarray(x_host), gpu.asarray(t_host)
    )
    assert loss == loss_apart and y.dtype == y_apart.dtype
    np.testing.assert_array_equal(mask, mask_apart)
    np.testing.assert_array_equal(y, y_apart)
    for key in grads:
        np.testing.assert_array_equal(grads[key], grads_apart[key], err_msg=key)
        assert grads[key].dtype == net_dtype


def _small_relu_case(seed: int) -> tuple[Any, ...]:
    """A 6-4-3 network's weights and biases, a batch and its labels, and the gradients the
    layers give on the host (the reference): W1, b1, W2, b2, x, t, gradients."""
    rng = np.random.default_rng(seed)
    W1, W2 = rng.standard_normal((6, 4)), rng.standard_normal((4, 3))
    b1, b2 = rng.standard_normal(4), rng.standard_normal(3)
    x_host, t_host = rng.standard_normal((5, 6)), rng.integers(0, 3, 5)
    net = snn.Sequential([snn.Affine(W1, b1), snn.Relu(), snn.Affine(W2, b2)])
    return W1, b1, W2, b2, x_host, t_host, net.gradient(x_host, t_host)


def test_a_network_pairs_only_its_own_affine_and_an_unpacked_relu(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A packed Relu keeps bits, not the mask the pair's backward reads; a subclass of Affine
    # may compute otherwise: both run one by one, and right.
    if not hasattr(gpu, "RawModule"):
        pytest.skip("the fake CuPy without kernels pairs nothing")

    class MyAffine(snn.Affine):
        pass

    W1, b1, W2, b2, x_host, t_host, expected = _small_relu_case(13)
    launches = _pair_launches(monkeypatch)
    for first, relu in ((snn.Affine, snn.Relu(packed=True)), (MyAffine, snn.Relu())):
        net = snn.Sequential([first(W1, b1), relu, snn.Affine(W2, b2)]).to("cuda")
        start = len(launches)
        grads = net.gradient(gpu.asarray(x_host), gpu.asarray(t_host))
        assert launches[start:] == ["add_bias"] + ["column_sum"] * 2  # (the last: the loss's)
        for key in expected:
            np.testing.assert_allclose(to_host(grads[key]), expected[key], rtol=1e-12, atol=1e-14)


def test_a_pair_steps_aside_for_hooks_subclasses_and_a_dout_its_relu_would_refuse(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A subclass of Affine with the book's own _forward(x) and _backward(dout) runs on the
    # GPU as before; a backward replaced on a Relu (a hook) is called; and a dout of the
    # wrong shape from the layer after the Relu is named by the Relu's backward, as apart.
    class BookAffine(snn.Affine):
        def _forward(self, x: Any) -> Any:
            self.x = x
            return x @ self.W + self.b

        def _backward(self, dout: Any) -> Any:
            self.dW, self.db = self.x.T @ dout, dout.sum(axis=0)
            return dout @ self.W.T

    W1, b1, W2, b2, x_host, t_host, expected = _small_relu_case(14)
    net = snn.Sequential([BookAffine(W1, b1), snn.Relu(), BookAffine(W2, b2)]).to("cuda")
    grads = net.gradient(gpu.asarray(x_host), gpu.asarray(t_host))
    for key in expected:
        np.testing.assert_allclose(to_host(grads[key]), expected[key], rtol=1e-12, atol=1e-14)

    hooked = snn.Sequential([snn.Affine(W1, b1), relu := snn.Relu(), snn.Affine(W2, b2)])
    hooked.to("cuda")
    seen: list[tuple[int, ...]] = []
    own_backward = relu.backward
    relu.backward = lambda dout, **kw: seen.append(dout.shape) or own_backward(dout, **kw)  # type: ignore[method-assign]
    grads = hooked.gradient(gpu.asarray(x_host), gpu.asarray(t_host))
    assert seen == [(5, 4)]
    for key in expected:
        np.testing.assert_allclose(to_host(grads[key]), expected[key], rtol=1e-12, atol=1e-14)

    class Wrong:  # a user's layer whose backward returns the wrong shape
        def forward(self, x: Any) -> Any:
            return x

        def backward(self, dout: Any) -> Any:
            return dout[:, :3]

    wrong = snn.Sequential([snn.Affine(W1, b1), snn.Relu(), Wrong(), snn.Affine(W2, b2)])
    with pytest.raises(ValueError, match=r"Relu\.backward: dout has shape \(5, 3\)"):
        wrong.to("cuda").gradient(gpu.asarray(x_host), gpu.asarray(t_host))


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_the_cpu_stand_in_stops_a_kernel_it_took_for_one_that_does_not_wait(
    tmp_path: Path,
) -> None:
    # Where _synchronises misses a wait (here a macro that calls a helper which waits), the
    # kernel's threads run one at a time, where a barrier would fault or wait forever: the
    # launch stops the process with a message that says so.
    code = (
        "__device__ void all_wait() { __syncthreads(); }\n"
        "#define WAIT() all_wait()\n"
        'extern "C" __global__ void hidden(float* out) { out[threadIdx.x] = 1; WAIT(); }\n'
    )
    assert not fake_cuda._synchronises(code, "hidden")  # the blind spot this guards
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import fake_cuda, fake_cupy\n"
        "cupy = fake_cupy.make_module()\n"
        "fake_cuda.install(cupy)\n"
        f"kernel = cupy.RawKernel({code!r}, 'hidden')\n"
        "kernel((1,), (4,), (cupy.zeros(4, dtype=np.float32),))\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert "__syncthreads in a kernel run one thread at a time" in result.stderr, result.stderr


def test_the_cpu_stand_in_decides_per_kernel_which_ones_synchronise() -> None:
    # A synchronising kernel runs its block's threads as OS threads, the others one after
    # another (fast): decided from each kernel's own body and the device functions it calls
    # (through others too), whatever the order of definitions; a __syncthreads outside
    # every function (a macro) counts for every kernel, one in a comment for none.
    plain = 'extern "C" __global__ void plain(float* out) { if (1) { out[threadIdx.x] = 1; } }\n'
    waits = 'extern "C" __global__ void waits(float* out) { { out[0] = 0; } __syncthreads(); }\n'
    helper = "// all_wait(x) waits\n__device__ void all_wait() { if (1) { __syncthreads(); } }\n"
    via = "template <int N> __device__ void via(float* a) { for (;;) { all_wait(); } }\n"
    calls = 'extern "C" __global__ void calls(float* out) { via<1>(out); }\n'
    for code in (plain + waits, waits + plain):
        assert not fake_cuda._synchronises(code, "plain")
        assert fake_cuda._synchronises(code, "waits")
    for code in (helper + via + plain + calls, plain + helper + via + calls):
        assert not fake_cuda._synchronises(code, "plain")
        assert fake_cuda._synchronises(code, "calls")
    assert not fake_cuda._synchronises(plain + "/* __syncthreads(); */", "plain")
    assert fake_cuda._synchronises("#define WAIT __syncthreads()\n" + plain, "plain")


# -- a training step replayed from a CUDA graph (scratchnn.steps) --------------------------


def _replays_counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one at each step replayed from a graph."""
    from scratchnn import steps

    counted: list[int] = []
    replay = steps._Replay.__call__

    def counting(self: Any, x: Any, t: Any) -> Any:
        counted.append(1)
        return replay(self, x, t)

    monkeypatch.setattr(steps._Replay, "__call__", counting)
    return counted


def _assert_same(got: Any, want: Any, exact: bool, dtype: Any) -> None:
    if exact:  # the same kernels on the same numbers (the CPU stand-in)
        np.testing.assert_array_equal(got, want)
    else:  # a card: cuBLAS may take another algorithm on the capture's own handle
        rtol = 1e-5 if dtype == np.float32 else 1e-12
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol)


@pytest.mark.parametrize(("activation", "optimizer", "dtype"), [
    ("relu", "sgd", np.float32), ("relu", "sgd", np.float64), ("sigmoid", "momentum", np.float32),
    ("tanh", "nesterov", np.float64), ("leaky-relu", "sgd", np.float32),
    ("elu", "momentum", np.float32), ("gelu", "sgd", np.float64), ("gelu-tanh", "sgd", np.float32),
    ("softplus", "nesterov", np.float32), ("silu", "sgd", np.float32),
    ("identity", "sgd", np.float64), ("relu", "adagrad", np.float32),
    ("sigmoid", "rmsprop", np.float64), ("relu", "adam", np.float32), ("tanh", "adam", np.float64),
    ("silu", "adam weight_decay=0.01", np.float32), ("relu", "momentum weight_decay=0.01",
                                                     np.float64),
])  # fmt: skip
def test_fit_replays_its_steps_from_a_cuda_graph_as_it_would_take_them(
    activation: str, optimizer: str, dtype: Any, gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 100 examples in batches of 16: each epoch steps its first batch eagerly and captures
    # the step, replays the next five, and steps the last (4 examples) eagerly; the rate
    # halves in the second epoch, which captures anew. The parameters and the history are
    # those of the same fit with the replays off: bit for bit on the CPU stand-in (which
    # replays the recorded launches and products by address), within rounding on a card.
    # Adam's bias corrections come from a table of 3 steps here (1,024 as it stands), so
    # that each epoch's replays write it twice.
    from scratchnn import steps
    from scratchnn.steps import TrainingStep
    from scratchnn.train import fit

    name, *settings = optimizer.split()
    kwargs = {key: float(value) for key, value in (s.split("=") for s in settings)}
    monkeypatch.setattr(steps._StepScalars, "ROWS", 3)
    x, t = _blobs(100, 7)
    replays = _replays_counted(monkeypatch)
    memories: list[Any] = []
    memory_of = steps._memory_of
    monkeypatch.setattr(steps, "_memory_of",
                        lambda *a: memories.append(memory_of(*a)) or memories[-1])  # fmt: skip
    runs = []
    for use_graphs in (False, True):
        monkeypatch.setattr(TrainingStep, "use_graphs", use_graphs)
        net = snn.mlp([20, 12, 9, 10], activation=activation, rng=np.random.default_rng(0),
                      dtype=dtype).to("cuda")  # fmt: skip
        data = (gpu.asarray(x.astype(dtype)), gpu.asarray(t))
        trainer = make_optimizer(name, lr=0.05, **kwargs)
        history = fit(net, trainer, data, epochs=2, batch_size=16, rng=np.random.default_rng(5),
                      lr_decay=0.5, train_eval_size=100)  # fmt: skip
        runs.append((net, history, trainer.state_dict()))
    (eager, eager_history, eager_state), (graphed, graphed_history, graphed_state) = runs
    capturing = hasattr(gpu, "RawModule")  # the fake CuPy without kernels captures nothing
    assert len(replays) == (10 if capturing else 0)
    # One capture an epoch, both with the network's one pool and stream (alive while it is,
    # or one of its layers).
    assert len(memories) == (2 if capturing else 0)
    assert all(m is steps._memories[graphed] for m in memories)
    assert all(steps._memory_held[layer] is memories[0] for layer in graphed.layers[:capturing])
    exact = hasattr(gpu, "__fake__")
    for key, value in eager.params.items():
        _assert_same(to_host(graphed.params[key]), to_host(value), exact, dtype)
    # The optimiser's state too: its velocities or moments, and Adam's step counts (14).
    assert eager_state.keys() == graphed_state.keys()
    for key, value in eager_state.items():
        _assert_same(to_host(graphed_state[key]), to_host(value), exact, dtype)
    for key in ("train_loss", "test_loss"):
        _assert_same(np.array(getattr(graphed_history, key)),
                     np.array(getattr(eager_history, key)), exact, dtype)  # fmt: skip
    # (on a card, rounding may tip one of the 100 examples' answers)
    tipped = 0.0 if exact else 0.0101
    np.testing.assert_allclose(graphed_history.train_acc, eager_history.train_acc, rtol=0,
                               atol=tipped)  # fmt: skip


def test_each_replayed_step_returns_its_own_loss(gpu: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every replay writes the same arrays; the loss each step returns is its own, read after
    # all of them (as fit reads them together), and network.last_loss is the last step's.
    from scratchnn.optim import SGD
    from scratchnn.steps import TrainingStep

    if not hasattr(gpu, "RawModule"):
        pytest.skip("the fake CuPy without kernels captures no graphs")
    rng = np.random.default_rng(8)
    batches = [(gpu.asarray(rng.standard_normal((16, 20)).astype(np.float32)),
                gpu.asarray(rng.integers(0, 10, 16))) for _ in range(5)]  # fmt: skip
    replays = _replays_counted(monkeypatch)
    library = getattr(gpu, "cublas_library", None)  # the stand-in's, on the CPU
    results = []
    for use_graphs in (False, True):
        monkeypatch.setattr(TrainingStep, "use_graphs", use_graphs)
        net = snn.mlp([20, 12, 10], rng=np.random.default_rng(0), dtype=np.float32).to("cuda")
        step = TrainingStep(net, SGD(lr=0.1))
        losses = [step(*batches[0])]
        if use_graphs and library is not None:
            # The first step is eager, on the capture's stream, its five products by
            # cuBLAS's library on scratchnn's handle: as the graph will make them.
            assert [(stream, name) for name, stream, _ in library.products] == [
                (step._memory.stream.ptr, "sgemm")] * 5  # fmt: skip
        losses += [step(x, t) for x, t in batches[1:]]
        grads = {key: to_host(value) for key, value in net.grads.items()}
        results.append(([float(loss) for loss in losses], net.last_loss, step.refusal, grads))
    (eager, _, off, eager_grads), (graphed, graphed_last, refusal, graphed_grads) = results
    assert off == "TrainingStep.use_graphs is False" and refusal is None and len(replays) == 4
    assert len(set(graphed)) == 5 and graphed_last == graphed[-1]
    # What the network holds after the steps is the last replay's: its gradients, as the
    # eager steps left theirs.
    for key, value in eager_grads.items():
        _assert_same(graphed_grads[key], value, hasattr(gpu, "__fake__"), np.float32)
    # A batch the graph was not captured for (another dtype or length) steps eagerly.
    x, t = batches[0]
    for other in ((x.astype(np.float64), t), (x, t.astype(np.int32)), (x[:8], t[:8])):
        step(*other)
    assert len(replays) == 4
    exact = hasattr(gpu, "__fake__")
    _assert_same(np.array(graphed), np.array(eager), exact, np.float32)


@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_replays_take_the_steps_that_come_after_eager_steps_between_them(
    optimizer: str, gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Adam's bias corrections follow its step count. Eager steps of a shorter batch between
    # the replays move the count on, and the next replay takes the step that comes (its
    # table written anew from there); a table of 2 rows is also written again as it is
    # used up. A rate set between steps (the graph holds the one it was captured with) is
    # taken by eager steps. Losses, parameters and the optimiser's state (moments,
    # velocities, step counts) are those without the graphs.
    from scratchnn import steps
    from scratchnn.steps import TrainingStep

    if not hasattr(gpu, "RawModule"):
        pytest.skip("the fake CuPy without kernels captures no graphs")
    monkeypatch.setattr(steps._StepScalars, "ROWS", 2)
    rng = np.random.default_rng(14)

    def batch(n: int) -> tuple[Any, Any]:
        return (gpu.asarray(rng.standard_normal((n, 20)).astype(np.float32)),
                gpu.asarray(rng.integers(0, 10, n)))  # fmt: skip

    full, short = [batch(16) for _ in range(7)], batch(8)
    order = [*full[:3], short, full[3], short, short, *full[4:]]
    replays = _replays_counted(monkeypatch)
    results = []
    for use_graphs in (False, True):
        monkeypatch.setattr(TrainingStep, "use_graphs", use_graphs)
        net = snn.mlp([20, 12, 10], rng=np.random.default_rng(0), dtype=np.float32).to("cuda")
        trainer = make_optimizer(optimizer, lr=0.01)
        step = TrainingStep(net, trainer)
        losses = [float(step(x, t)) for x, t in order]
        trainer.lr = 0.005
        losses += [float(step(x, t)) for x, t in full[:2]]
        state = {key: to_host(value) for key, value in trainer.state_dict().items()}
        results.append((losses, {k: to_host(v) for k, v in net.params.items()}, state))
    assert len(replays) == 6
    assert optimizer != "adam" or results[1][2]["step/W1"] == len(order) + 2
    exact = hasattr(gpu, "__fake__")
    (eager_losses, *eager), (graphed_losses, *graphed) = results
    _assert_same(np.array(graphed_losses), np.array(eager_losses), exact, np.float32)
    for want, got in zip(eager, graphed):
        assert want.keys() == got.keys()
        for key in want:
            _assert_same(got[key], want[key], exact, np.float32)


def test_a_step_that_cannot_be_replayed_runs_eagerly_and_says_why(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a graph would not repeat, or what may change between steps, steps eagerly, and
    # the same as without the graphs: Dropout's masks, BatchNorm, a hook on a layer or on
    # the optimiser's update, an optimiser of our own, Adam whose parameters count their
    # steps apart or whose folded scalars may overflow, float16, NumPy arrays.
    from scratchnn.optim import SGD, Adam
    from scratchnn.steps import TrainingStep

    if not hasattr(gpu, "RawModule"):
        pytest.skip("the fake CuPy without kernels captures no graphs")
    rng = np.random.default_rng(9)
    x_host, t_host = rng.standard_normal((16, 6)), rng.integers(0, 3, 16)

    def net(*middle: Any, dtype: Any = np.float64) -> Any:
        W1, W2 = rng.standard_normal((6, 5)), rng.standard_normal((5, 3))
        return snn.Sequential([snn.Affine(W1.astype(dtype), np.zeros(5, dtype)), *middle,
                               snn.Affine(W2.astype(dtype), np.zeros(3, dtype))])  # fmt: skip

    hooked = net(snn.Relu())
    hooked.layers[1].forward = functools.partial(type(hooked.layers[1]).forward, hooked.layers[1])
    logged = SGD(lr=0.1)
    logged.update = functools.partial(SGD.update, logged)  # type: ignore[method-assign]
    apart = Adam()
    apart.steps["W1"] = 4  # (a layer trained before the others)

    class Mine(SGD):
        pass

    cases = [
        (net(snn.Relu()), apart, "cuda", np.float64, "not all taken the same number of steps"),
        (net(snn.Relu()), Adam(lr=1e-31), "cuda", np.float64, "not above 1e-30"),
        (snn.Sequential([snn.Relu()]), Adam(), "cuda", np.float64, "no parameters"),
        (net(snn.Relu()), Mine(lr=0.1), "cuda", np.float64, "optimiser (Mine"),
        (net(snn.Dropout(0.5, rng=np.random.default_rng(0)), snn.Relu()), SGD(lr=0.1), "cuda",
         np.float64, "layer 1 (Dropout)"),
        (net(snn.BatchNorm(5), snn.Relu()), SGD(lr=0.1), "cuda", np.float64, "layer 1 (BatchNorm"),
        (hooked, SGD(lr=0.1), "cuda", np.float64, "layer 1 (Relu)"),
        (net(snn.Relu()), logged, "cuda", np.float64, "optimiser"),
        (net(snn.Relu(), dtype=np.float16), SGD(lr=0.1), "cuda", np.float16, "float32 or float64"),
        (net(snn.Relu()), SGD(lr=0.1), "cpu", np.float64, "not on a GPU"),
        (snn.Sequential([snn.Affine(rng.standard_normal((6, 1100)), np.zeros(1100))]),
         SGD(lr=0.1), "cuda", np.float64, "the loss's kernel does not take these scores"),
    ]
    replays = _replays_counted(monkeypatch)
    for network, optimizer, device, dtype, why in cases:
        network.to(device)
        x, t = to_device(x_host.astype(dtype), device), to_device(t_host, device)
        step = TrainingStep(network, optimizer)
        for _ in range(3):
            step(x, t)
        assert step.refusal is not None and why in step.refusal, (why, step.refusal)
    assert replays == []


def _five_steps_as_without_graphs(gpu: Any, monkeypatch: pytest.MonkeyPatch, events: list[Any],
                                  optimizer: str = "sgd") -> tuple[list[Any], list[Any], Any]:  # fmt: skip
    """Five steps of one network through ``TrainingStep`` (SGD, or ``optimizer``'s), with
    the graphs off and on: the warnings of the second run, ``events`` as they were after
    its first step, and its network. Both runs' losses and parameters must be equal."""
    from scratchnn.steps import TrainingStep

    rng = np.random.default_rng(11)
    batches = [(gpu.asarray(rng.standard_normal((8, 20)).astype(np.float32)),
                gpu.asarray(rng.integers(0, 10, 8))) for _ in range(5)]  # fmt: skip
    results = []
    for use_graphs in (False, True):
        monkeypatch.setattr(TrainingStep, "use_graphs", use_graphs)
        net = snn.mlp([20, 12, 10], rng=np.random.default_rng(0)).to("cuda")
        step = TrainingStep(net, make_optimizer(optimizer, lr=0.1))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses = [step(*batches[0])]
            first = list(events)
            losses += [step(x, t) for x, t in batches[1:]]
        results.append(([float(loss) for loss in losses], net))
    (eager, eager_net), (graphed, graphed_net) = results
    assert graphed == eager
    for key, value in eager_net.params.items():
        np.testing.assert_array_equal(to_host(graphed_net.params[key]), to_host(value))
    return list(caught), first, graphed_net


def test_a_capture_that_fails_warns_and_the_steps_go_on_eagerly(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cuBLAS's library not found, say: one RuntimeWarning naming why, and the steps run as
    # without the graphs (the batch of the failed warm-up had its eager step).
    from scratchnn.kernels import products

    if not hasattr(gpu, "RawModule"):
        pytest.skip("the fake CuPy without kernels captures no graphs")

    def refuses(stream: Any) -> Any:
        raise RuntimeError("cuBLAS's library is not among those loaded")

    monkeypatch.setattr(products, "capturing", refuses)
    caught, _, _ = _five_steps_as_without_graphs(gpu, monkeypatch, [])
    assert [str(w.message) for w in caught] == [
        "TrainingStep: the capture failed: RuntimeError: cuBLAS's library is not among "
        "those loaded; the steps run eagerly"]  # fmt: skip
    assert caught[0].category is RuntimeWarning


def test_a_capture_that_fails_after_adams_update_leaves_its_step_counts(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The capture fails as it ends, after Adam's update counted a step that no step took:
    # the counts are put back, so the eager steps that follow take the bias corrections
    # they take without the graphs.
    if not hasattr(gpu, "cublas_library"):
        pytest.skip("the stand-in's streams (a card's capture fails where CUDA says)")
    end_capture = fake_cupy.Stream.end_capture

    def invalidated(self: Any) -> Any:
        end_capture(self)
        raise RuntimeError("cudaErrorStreamCaptureInvalidated")

    monkeypatch.setattr(fake_cupy.Stream, "end_capture", invalidated)
    caught, _, _ = _five_steps_as_without_graphs(gpu, monkeypatch, [], "adam")
    assert len(caught) == 1 and "cudaErrorStreamCaptureInvalidated" in str(caught[0].message)


def _waits_and_products_logged(gpu: Any, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """A list that logs, in order, each wait for a stream ("wait", its ptr) and each
    float32 product of the stand-in cuBLAS library ("gemm", the stream it was bound to)."""
    events: list[tuple[str, int]] = []
    monkeypatch.setattr(fake_cupy.Stream, "synchronize",
                        lambda self: events.append(("wait", self.ptr)))  # fmt: skip
    library = gpu.cublas_library
    sgemm = library.cublasSgemm_v2.function
    monkeypatch.setattr(library.cublasSgemm_v2, "function",
                        lambda *a: events.append(("gemm", library.stream)) or sgemm(*a))  # fmt: skip
    return events


def test_the_warm_up_waits_for_its_stream_and_a_failed_capture_is_tried_once(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first step waits for the current stream before its own stream reads the batch,
    # and its stream is waited for before the step returns. A capture that fails is tried
    # once, said once, and every batch still steps once, as without the graphs.
    if not hasattr(gpu, "cublas_library"):
        pytest.skip("the stand-in's streams and cuBLAS library (a card orders its own work)")
    events = _waits_and_products_logged(gpu, monkeypatch)
    attempts: list[int] = []

    def refused(self: Any) -> None:
        attempts.append(1)
        raise RuntimeError("cudaErrorStreamCaptureUnsupported")

    monkeypatch.setattr(fake_cupy.Stream, "begin_capture", refused)
    caught, first, net = _five_steps_as_without_graphs(gpu, monkeypatch, events)
    stream = next(ptr for kind, ptr in first if kind == "gemm")
    assert stream != 0 and first == [("wait", 0)] + [("gemm", stream)] * 5 + [("wait", stream)]
    assert len(attempts) == 1 and len(caught) == 1
    assert "cudaErrorStreamCaptureUnsupported" in str(caught[0].message)
    # fit's next epoch, a new TrainingStep of the network: not tried again, nor said again.
    from scratchnn.optim import SGD
    from scratchnn.steps import TrainingStep

    x = gpu.asarray(np.ones((8, 20), np.float32))
    t = gpu.asarray(np.arange(8) % 10)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        step = TrainingStep(net, SGD(lr=0.1))
        for _ in range(3):
            step(x, t)
    assert again == [] and len(attempts) == 1 and "cudaErrorStreamCaptureUnsupported" in (
        step.refusal or "")  # fmt: skip


def test_a_warm_up_that_fails_after_queueing_work_waits_for_it_and_steps_once(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first step's update refused on the capture's stream, after its products were
    # queued there: that stream is waited for before the step is taken again eagerly, and
    # the batch is stepped once, as without the graphs.
    from scratchnn.optim import SGD

    if not hasattr(gpu, "cublas_library"):
        pytest.skip("the stand-in's streams and cuBLAS library (a card orders its own work)")
    events = _waits_and_products_logged(gpu, monkeypatch)
    update = SGD.update

    def refused_on_a_stream(self: Any, params: Any, grads: Any) -> None:
        if gpu.cuda.get_current_stream().ptr != 0:
            events.append(("refused", 0))
            raise RuntimeError("a launch refused on the capture's stream")
        update(self, params, grads)

    monkeypatch.setattr(SGD, "update", refused_on_a_stream)
    caught, first, _ = _five_steps_as_without_graphs(gpu, monkeypatch, events)
    stream = next(ptr for kind, ptr in first if kind == "gemm")
    assert first == ([("wait", 0)] + [("gemm", stream)] * 5 + [("refused", 0), ("wait", stream)])
    assert len(caught) == 1 and "a launch refused on the capture's stream" in str(
        caught[0].message)  # fmt: skip


def test_a_capture_stopped_by_ctrl_c_leaves_the_network_as_the_last_step_did(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A KeyboardInterrupt while the step is captured: the network holds the warm-up step's
    # arrays and loss again (not a captured step that never ran), and the interrupt goes on.
    from scratchnn.optim import SGD
    from scratchnn.steps import TrainingStep

    if not hasattr(gpu, "cublas_library"):
        pytest.skip("the stand-in's streams (a test on a card cannot stop a capture midway)")
    rng = np.random.default_rng(12)
    x, t = gpu.asarray(rng.standard_normal((8, 20)).astype(np.float32)), gpu.asarray(
        rng.integers(0, 10, 8))  # fmt: skip
    net = snn.mlp([20, 12, 10], rng=np.random.default_rng(0)).to("cuda")
    step = TrainingStep(net, SGD(lr=0.1))
    loss = step(x, t)
    before = [(layer, dict(vars(layer))) for layer in (*net.layers, net.last_layer)]
    update = SGD.update

    def interrupted(self: Any, params: Any, grads: Any) -> None:
        if fake_cupy.recording is not None:
            raise KeyboardInterrupt
        update(self, params, grads)

    monkeypatch.setattr(SGD, "update", interrupted)
    with pytest.raises(KeyboardInterrupt):
        step(x, t)
    assert net._last_loss is loss and fake_cupy.recording is None
    for layer, state in before:
        assert vars(layer).keys() == state.keys()
        assert all(vars(layer)[k] is v for k, v in state.items()), type(layer).__name__
