"""fit's training step replayed from a CUDA graph (scratchnn.steps) against the same
steps taken eagerly: on the CPU stand-in, which records a capture's launches and
products by address and replays them (bit for bit), and on a GPU (within rounding)."""

from __future__ import annotations

import functools
import json
import warnings
from typing import Any

import fake_cupy
import numpy as np
import pytest
from gpu_support import blobs, replays_counted, require_fashion_mnist

import scratchnn as snn
from scratchnn.backend import to_device, to_host
from scratchnn.optim import SGD, make_optimizer

# -- a training step replayed from a CUDA graph (scratchnn.steps) --------------------------


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
    # the step, replays the next five (the last four gathering their rows from the data
    # straight into the graph's arrays), and steps the last (4 examples) eagerly; the rate
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
    x, t = blobs(100, 7)
    replays = replays_counted(monkeypatch)
    gathered: list[int] = []  # the replays whose batch was gathered into the graph's arrays
    gather = steps._Replay.gathered
    monkeypatch.setattr(steps._Replay, "gathered",
                        lambda *a: gathered.append(1) or gather(*a))  # fmt: skip
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
    # (each epoch's first replay follows its capture; the four after it gather their rows)
    assert len(replays) == (10 if capturing else 0) and len(gathered) == (8 if capturing else 0)
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
    from scratchnn.steps import TrainingStep

    if not hasattr(gpu, "RawModule"):
        pytest.skip("the fake CuPy without kernels captures no graphs")
    rng = np.random.default_rng(8)
    batches = [(gpu.asarray(rng.standard_normal((16, 20)).astype(np.float32)),
                gpu.asarray(rng.integers(0, 10, 16))) for _ in range(5)]  # fmt: skip
    replays = replays_counted(monkeypatch)
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
    replays = replays_counted(monkeypatch)
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
    from scratchnn.optim import Adam
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
    replays = replays_counted(monkeypatch)
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


def test_the_train_command_on_the_device_replays_its_steps_as_it_would_take_them(
    gpu: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    # The main job, `scratchnn train --device cuda` (784-256-128-10, Adam, batch 128), on
    # 700 images for 2 epochs: each epoch's 6 batches are a warm-up, a capture and its
    # replay, three replays of rows gathered into the graph's arrays, and the short last
    # batch eagerly. Its history and weights are those of the same command with the
    # replays off: bit for bit on the CPU stand-in, within rounding on a card.
    from scratchnn.checkpoint import load_model
    from scratchnn.cli import main
    from scratchnn.steps import TrainingStep

    require_fashion_mnist()
    if not hasattr(gpu, "RawModule"):
        pytest.skip("the fake CuPy without kernels captures no graphs")
    replays = replays_counted(monkeypatch)
    runs = []
    for use_graphs in (False, True):
        monkeypatch.setattr(TrainingStep, "use_graphs", use_graphs)
        out = tmp_path / str(use_graphs)
        argv = ["train", "--device", "cuda", "--limit", "700", "--epochs", "2", "--out", str(out)]
        assert main(argv) == 0
        history = json.loads((out / "history.json").read_text())
        params, _ = load_model(out / "model.safetensors")
        runs.append((history, params))
    assert len(replays) == 8
    (eager_history, eager_params), (history, params) = runs
    exact = hasattr(gpu, "__fake__")
    for key in ("train_loss", "test_loss"):
        _assert_same(np.array(history[key]), np.array(eager_history[key]), exact, np.float32)
    # (on a card, rounding may tip an answer or two: 0.14 points each of the 700)
    for key in ("train_acc", "test_acc"):
        np.testing.assert_allclose(history[key], eager_history[key], rtol=0,
                                   atol=0 if exact else 0.005)  # fmt: skip
    assert params.keys() == eager_params.keys()
    for key, value in eager_params.items():
        _assert_same(params[key], value, exact, np.float32)
