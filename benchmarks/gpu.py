"""scratchnn on an NVIDIA GPU (CuPy) against NumPy float64 and PyTorch, in one run.

    python3 benchmarks/gpu.py [--data DIR] [--epochs 3] [--repeats 30]

1. Correctness first: every layer, loss and optimiser on the GPU against the
   same code on NumPy in float64, on fresh random inputs (never zeros), in
   float64 and float32, with shapes that take the kernels' vector path and
   their scalar tail; and six training steps as fit takes them (on a card,
   replayed from a CUDA graph: ``scratchnn.steps``), whose check names say
   whether they were replayed. A failed check is printed before anything is
   timed; the timings still run (a lent machine's minutes are few), the
   report says they are of code that failed, and the exit status is 1.
2. Timings, each the median of ``--repeats`` CUDA-event measurements after a
   warm-up (an activation's in three rounds, alternating with PyTorch's):
   every activation's forward+backward at 2**26 float32 against PyTorch
   autograd; a device copy of the same size (the bandwidth floor);
   the MLP step 784-1024-1024-10, batch 512, SGD, against PyTorch, as fit
   takes it (``TrainingStep``: replayed from a CUDA graph, the loss left on
   the card, PyTorch's not read), the eager step against it, through
   ``gradient`` (which reads it, PyTorch ``loss.item()``), and the host's
   time to queue a step as fit takes it (no events: where that is longer than
   the card's work, the host is what the first row measured); beside them,
   three rows of ours against ours, eager: the step with Affine's products by
   CuPy's ``a @ b`` against the step with cuBLAS called directly, the step with
   each Affine and its Relu run apart against the step paired, and, apart,
   Affine's bias through CuPy's own calls against ``kernels.bias``; and
   Fashion-MNIST epochs of ``scratchnn train``'s default network
   (784-256-128-10, ReLU, Adam 1e-3 decayed by 0.85 an epoch, batch 128)
   against PyTorch with the same initial weights, rates and batches, with
   both test accuracies.
3. The card, the versions and a short table, printed last. Each row is also
   printed as it is measured, and a timing that raises is printed with its
   traceback and named in the table while the others still run (exit 1).

Without a GPU (or without CuPy) it says so and exits with status 0, or 3
with ``--require-gpu`` (as ``benchmarks/gpu.sh`` runs it, so that a lent
machine that cannot measure is not taken for a pass). A failed correctness
check makes the exit status 1 (after the timings). Each timing row with a
target in the issue says whether it was met.
It runs from a checkout: ``PYTHONPATH=src python3 benchmarks/gpu.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import operator
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import cpu_model

import scratchnn as snn
from scratchnn.backend import device_of, to_device, to_host
from scratchnn.kernels import OPS, bias, products
from scratchnn.models import Sequential, cnn, mlp
from scratchnn.optim import make_optimizer
from scratchnn.steps import TrainingStep
from scratchnn.train import DEVICE_EVAL_BATCH

N_BIG = 2**26
# The default preset's learning-rate decay per epoch (scratchnn train without options).
LR_DECAY = 0.85

# (name, layer factory, forward op of scratchnn.kernels, PyTorch function and its kwargs)
ACTIVATIONS: list[tuple[str, Callable[[], Any], str, tuple[str, dict[str, Any]]]] = [
    ("Relu", snn.Relu, "relu_forward", ("torch.relu", {})),
    ("Sigmoid", snn.Sigmoid, "sigmoid_forward", ("torch.sigmoid", {})),
    ("Tanh", snn.Tanh, "tanh_forward", ("torch.tanh", {})),
    ("LeakyRelu", snn.LeakyRelu, "leaky_relu_forward", ("F.leaky_relu", {"negative_slope": 0.01})),
    ("Elu", snn.Elu, "elu_forward", ("F.elu", {})),
    ("Gelu", snn.Gelu, "gelu_forward", ("F.gelu", {})),
    (
        "Gelu(tanh)",
        lambda: snn.Gelu("tanh"),
        "gelu_tanh_forward",
        ("F.gelu", {"approximate": "tanh"}),
    ),
    ("Softplus", snn.Softplus, "softplus_forward", ("F.softplus", {})),
    ("Silu", snn.Silu, "silu_forward", ("F.silu", {})),
]
OTHER_LAYERS: list[tuple[str, Callable[[], Any]]] = [
    ("Relu(packed)", lambda: snn.Relu(packed=True)),
    ("LeakyRelu(2)", lambda: snn.LeakyRelu(2.0)),
    ("Elu(0.5)", lambda: snn.Elu(0.5)),
    ("Softplus(2)", lambda: snn.Softplus(2.0)),
    ("Softmax", snn.Softmax),
    ("Softmax(axis=0)", lambda: snn.Softmax(axis=0)),
    ("Identity", snn.Identity),
]


# -- 1. correctness -----------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    error: float  # worst error, relative to the float64 result's scale
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance


def _error(actual: Any, expected: np.ndarray) -> float:
    actual = to_host(actual).astype(np.float64)
    if actual.shape != expected.shape:
        return math.inf
    scale = np.maximum(np.abs(expected), 1.0)
    return float(np.max(np.abs(actual - expected) / scale)) if expected.size else 0.0


def _random(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 3.0) -> np.ndarray:
    x = scale * rng.standard_normal(shape)
    # Away from the kinks at 0 (ReLU, ELU): a float32 rounding must not flip a side.
    return np.where(np.abs(x) < 1e-2, np.copysign(1e-2, x), x)


# (source shape, step along the last axis): odd sizes take the kernels' scalar tail, 2**20
# their vector path, and a step of 2 gives a non-contiguous view.
LAYER_SHAPES = (((1000, 37), 1), ((1 << 20,), 1), ((64, 260), 2))


def check_layers(
    device: str = "cuda", shapes: Any = LAYER_SHAPES, seed: int | None = None
) -> list[Check]:
    """Every element-wise layer forward and backward on ``device`` against NumPy float64."""
    checks = []
    rng = np.random.default_rng(seed)  # fresh inputs each run unless a test fixes the seed
    factories = [(name, make) for name, make, _, _ in ACTIVATIONS] + OTHER_LAYERS
    for shape, step in shapes:
        for name, make in factories:
            source = _random(rng, shape)
            x = source[..., ::step]
            dout = rng.standard_normal(x.shape)
            reference = make()
            y64, dx64 = reference.forward(x), reference.backward(dout)
            # Softmax's sums over up to 1000 float32 terms round in the GPU's order, not NumPy's.
            float32_tolerance = 1e-5 if name.startswith("Softmax") else 2e-6
            for dtype, tolerance in ((np.float64, 1e-12), (np.float32, float32_tolerance)):
                layer = make()
                y = layer.forward(to_device(source.astype(dtype), device)[..., ::step])
                dx = layer.backward(to_device(dout.astype(dtype), device))
                where = all(device_of(a) == device for a in (y, dx))
                error = max(_error(y, y64), _error(dx, dx64)) if where else math.inf
                label = f"{name} {np.dtype(dtype).name} {x.shape}{' strided' * (step > 1)}"
                checks.append(Check(label, error, tolerance))
    return checks


def check_optimizers(device: str = "cuda", seed: int | None = None) -> list[Check]:
    """Three steps of every optimiser, with and without weight decay, on ``device``, each
    over eleven parameters (the multi-tensor launches)."""
    checks = []
    rng = np.random.default_rng(seed)
    for name in ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"):
        # AdaGrad and RMSprop divide by sqrt(h) + eps: where a gradient (after weight decay,
        # which can cancel it) is near eps, float32's rounding of it moves the step by a
        # sizeable part of lr (errors to 5e-5 seen in 0.5% of random draws).
        float32_tolerance = 1e-4 if name in ("adagrad", "rmsprop") else 1e-5
        for weight_decay in (0.0, 0.01):
            for dtype, tolerance in ((np.float64, 1e-12), (np.float32, float32_tolerance)):
                # Eleven parameters, so that a step takes two launches of the multi-tensor
                # kernels (eight and two: one is empty); one 0-d, one at an address no vector
                # load may use (a contiguous view one element in).
                shapes = [(301, 17), (17,), (0,), (), (33,), (4, 4), (1,), (3, 5, 2), (16,),
                          (9,), (2, 2)]  # fmt: skip
                params = {f"p{i}": rng.standard_normal(shape) for i, shape in enumerate(shapes)}
                steps = [
                    {k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in "abc"
                ]
                host = {k: v.copy() for k, v in params.items()}
                dev = {k: to_device(v.astype(dtype), device) for k, v in params.items()}
                wide = to_device(np.concatenate([[0.0], params["p4"]]).astype(dtype), device)
                dev["p4"] = wide[1:]
                host_opt = make_optimizer(name, lr=0.01, weight_decay=weight_decay)
                dev_opt = make_optimizer(name, lr=0.01, weight_decay=weight_decay)
                for grads in steps:
                    host_opt.update(host, grads)
                    dev_opt.update(
                        dev, {k: to_device(g.astype(dtype), device) for k, g in grads.items()}
                    )
                error = max(_error(dev[k], host[k]) for k in params)
                label = f"{name} wd={weight_decay} {np.dtype(dtype).name}"
                checks.append(Check(label, error, tolerance))
    return checks


def check_networks(device: str = "cuda", seed: int | None = None) -> list[Check]:
    """Gradients of an MLP (each loss) and of a CNN (conv, pooling, batch norm, dropout)."""
    checks = []
    rng = np.random.default_rng(seed)
    x, t = rng.standard_normal((64, 20)), rng.integers(0, 10, 64)
    losses: list[tuple[str, Callable[[], Any], Any]] = [
        ("SoftmaxWithLoss", snn.SoftmaxWithLoss, t),
        ("MeanSquaredError", snn.MeanSquaredError, rng.standard_normal((64, 10))),
        ("SigmoidWithLoss", snn.SigmoidWithLoss, rng.random((64, 10))),
    ]
    for loss_name, make_loss, target in losses:
        for activation in ("relu", "gelu", "tanh"):
            nets = [
                mlp(
                    [20, 32, 10],
                    activation=activation,
                    rng=np.random.default_rng(1),
                    dtype=np.float64,
                    loss=make_loss(),
                ).to(d)
                for d in ("cpu", device)
            ]
            expected = nets[0].gradient(x, target)
            got = nets[1].gradient(to_device(x, device), to_device(target, device))
            error = max(_error(got[k], expected[k]) for k in expected)
            error = max(error, abs(nets[1].last_loss - nets[0].last_loss) / abs(nets[0].last_loss))
            checks.append(Check(f"MLP {activation} {loss_name} float64", error, 1e-10))
    images, labels = rng.standard_normal((8, 1, 28, 28)), rng.integers(0, 10, 8)
    for dropout in (0.0, 0.3):
        nets = [
            cnn(
                rng=np.random.default_rng(2),
                channels=(4, 8),
                hidden=16,
                dropout=dropout,
                dtype=np.float64,
            ).to(d)
            for d in ("cpu", device)
        ]
        expected = nets[0].gradient(images, labels)
        got = nets[1].gradient(to_device(images, device), to_device(labels, device))
        error = max(_error(got[k], expected[k]) for k in expected)
        checks.append(Check(f"CNN dropout={dropout} float64", error, 1e-10))
    return checks


def check_replays(device: str = "cuda", seed: int | None = None) -> list[Check]:
    """Six steps as fit takes them (``TrainingStep``: on a card, replayed from a CUDA graph
    after the first), SGD, Momentum and Adam, float64 and float32, against the same steps
    in NumPy float64: the parameters and each step's loss. The check's name says whether
    the steps were replayed, or why not."""
    checks = []
    rng = np.random.default_rng(seed)
    batches = [(rng.standard_normal((32, 20)), rng.integers(0, 10, 32)) for _ in range(6)]
    # (Adam divides by the root of its second moment: where a gradient is near 0 its
    # float32 step differs the most from float64's; 5e-5 the worst of 1,200 seeds on the CPU)
    for optimizer, lr, float32_tolerance in (("sgd", 0.1, 1e-4), ("momentum", 0.1, 1e-4),
                                             ("adam", 0.001, 3e-4)):  # fmt: skip
        for dtype, tolerance in ((np.float64, 1e-10), (np.float32, float32_tolerance)):
            results = []
            for on, kind in (("cpu", np.float64), (device, dtype)):
                net = mlp([20, 32, 32, 10], rng=np.random.default_rng(1), dtype=kind).to(on)
                step = TrainingStep(net, make_optimizer(optimizer, lr=lr))
                losses = [step(to_device(x.astype(kind), on), to_device(t, on))
                          for x, t in batches]  # fmt: skip
                results.append((net, [float(loss) for loss in losses], step))
            (want, want_losses, _), (got, got_losses, step) = results
            error = max(_error(got.params[k], to_host(want.params[k])) for k in want.params)
            error = max(error, _error(np.array(got_losses), np.array(want_losses)))
            how = "replayed" if step.refusal is None else f"eager: {step.refusal}"
            name = f"MLP 6 {optimizer} steps as fit takes them, {np.dtype(dtype).name} ({how})"
            checks.append(Check(name, error, tolerance))
    return checks


def check_all(
    device: str = "cuda", shapes: Any = LAYER_SHAPES, seed: int | None = None
) -> list[Check]:
    return (
        check_layers(device, shapes, seed)
        + check_optimizers(device, seed)
        + check_networks(device, seed)
        + check_replays(device, seed)
    )


# -- 2. timings ---------------------------------------------------------------------------------


def median_ms(fn: Callable[[], Any], event: Callable[[], Any], elapsed: Callable[[Any, Any], float],
              repeats: int, warmup: int = 3) -> float:  # fmt: skip
    """The median over ``repeats`` runs of ``fn``, each timed by a pair of events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, stop = event(), event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(elapsed(start, stop))
    return statistics.median(times)


def host_median_ms(fn: Callable[[], Any], wait: Callable[[], None], repeats: int,
                   warmup: int = 3) -> float:  # fmt: skip
    """The median over ``repeats`` runs of the host's time to queue ``fn``'s work on a
    quiet card (waited for before each run; ``fn``'s work is not waited for)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        wait()
        started = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - started))
    wait()
    return statistics.median(times)


class CudaClock:
    """How the timings are read: CUDA events for each framework's own queue, and waits
    for it. PyTorch's tensors live on ``torch_device``. (The tests give the timing
    functions a clock of the host's instead, and PyTorch's CPU device, so that they
    run, if not measure, without a GPU.)"""

    torch_device = "cuda"

    def __init__(self, cupy: Any, torch: Any) -> None:
        self.cupy, self.torch = cupy, torch

    def cupy_ms(self, fn: Callable[[], Any], repeats: int) -> float:
        return median_ms(fn, self.cupy.cuda.Event, self.cupy.cuda.get_elapsed_time, repeats)

    def torch_ms(self, fn: Callable[[], Any], repeats: int) -> float:
        return median_ms(fn, lambda: self.torch.cuda.Event(enable_timing=True),
                         lambda a, b: a.elapsed_time(b), repeats)  # fmt: skip

    def wait_cupy(self) -> None:
        self.cupy.cuda.Device().synchronize()

    def wait_torch(self) -> None:
        self.torch.cuda.synchronize()


@dataclass
class Row:
    what: str
    ours: float
    torch: float | None
    note: str = ""
    target: float | None = None  # the bound on ours / torch
    also_met: bool = True  # any other condition of the target (test accuracy)

    @property
    def verdict(self) -> str:
        if self.target is None or not self.torch:
            return ""
        met = self.ours / self.torch <= self.target and self.also_met
        return f"{'met' if met else 'MISSED'} (<= {self.target:g})"


def paired_ms(clock: Any, ours: Callable[[], Any], theirs: Callable[[], Any], repeats: int,
              rounds: int = 3) -> tuple[float, float]:  # fmt: skip
    """The median times of ``ours`` (CuPy) and ``theirs`` (PyTorch), measured in
    ``rounds`` alternating rounds of ``repeats // rounds`` runs, each side the median of
    its rounds' medians: a drift of the card's clocks falls on both alike. (Two runs of
    the same build, one side measured after the other, put Elu at 1.19 and 1.05.)"""
    per_round = max(1, repeats // rounds)
    ours_ms, theirs_ms = [], []
    for _ in range(rounds):
        ours_ms.append(clock.cupy_ms(ours, per_round))
        theirs_ms.append(clock.torch_ms(theirs, per_round))
    return statistics.median(ours_ms), statistics.median(theirs_ms)


def activation_inputs(cupy: Any, torch: Any, clock: Any, n: int) -> tuple[Any, Any, Any, Any]:
    """x (of scale 3, so that every branch of each formula runs) and dout, float32, on
    both devices: CuPy's x and dout, then PyTorch's."""
    host = np.random.default_rng(0)
    x_host = (3 * host.standard_normal(n, dtype=np.float32)).astype(np.float32)
    dout_host = host.standard_normal(n, dtype=np.float32)
    return (cupy.asarray(x_host), cupy.asarray(dout_host),
            torch.as_tensor(x_host, device=clock.torch_device),
            torch.as_tensor(dout_host, device=clock.torch_device))  # fmt: skip


def time_activations(cupy: Any, torch: Any, repeats: int, clock: Any, n: int = N_BIG) -> list[Row]:
    x, dout, tx, tg = activation_inputs(cupy, torch, clock, n)
    y = cupy.empty_like(x)
    copy_ms = clock.cupy_ms(lambda: cupy.copyto(y, x), repeats)
    ty = torch.empty_like(tx)
    copy_torch = clock.torch_ms(lambda: ty.copy_(tx), repeats)
    size = f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)
    rows = [Row(f"device copy {size} f32 (read+write)", copy_ms, copy_torch,
                f"{2 * 4 * n / copy_ms / 1e6:.0f} GB/s")]  # fmt: skip
    functional = torch.nn.functional
    for name, make, op_name, (torch_name, kwargs) in ACTIVATIONS:
        layer = make()

        def ours(layer: Any = layer) -> None:
            # borrowed=True as inside Sequential.gradient: the input is not copied to be kept.
            layer._checked_forward((x,), borrowed=True)
            layer.backward(dout)

        module, _, attribute = torch_name.partition(".")
        fn = getattr(torch if module == "torch" else functional, attribute)
        leaf = tx.detach().requires_grad_()

        def theirs(fn: Any = fn, kwargs: dict[str, Any] = kwargs, leaf: Any = leaf) -> None:
            leaf.grad = None
            fn(leaf, **kwargs).backward(tg)

        # Bytes our two kernels move: each op's arrays once (masks are one byte per element).
        forward, backward = OPS[op_name], OPS[op_name.replace("_forward", "_backward")]
        arrays = [*forward.inputs, *forward.outputs, *backward.inputs, *backward.outputs]
        masks = forward.masks | backward.masks
        traffic = sum(1 if a in masks else 4 for a in arrays) * n
        ms, torch_ms = paired_ms(clock, ours, theirs, repeats)
        rows.append(Row(f"{name} fwd+bwd {size} f32", ms, torch_ms,
                        f"{traffic / ms / 1e6:.0f} GB/s, {ms / copy_ms:.2f} copies",
                        target=1.05))  # fmt: skip
    return rows


def _torch_mlp(torch: Any, net: Any, device: str) -> Any:
    """A PyTorch copy of an MLP of Affine and Relu layers, with the same weights."""
    modules = []
    for layer in net.layers:
        if isinstance(layer, snn.Affine):
            linear = torch.nn.Linear(*layer.W.shape)
            with torch.no_grad():
                linear.weight.copy_(torch.as_tensor(to_host(layer.W).T.copy()))
                linear.bias.copy_(torch.as_tensor(to_host(layer.b)))
            modules.append(linear)
        else:
            modules.append(torch.nn.ReLU())
    return torch.nn.Sequential(*modules).to(device)


def mlp_pair(cupy: Any, torch: Any, clock: Any, sizes: tuple[int, ...],
             batch: int) -> tuple[Any, Any, Any, Any, Any, Any]:  # fmt: skip
    """An MLP of ``sizes`` on the GPU and its PyTorch copy with the same weights, and one
    batch of inputs and labels: (net, model, x, t, PyTorch's x, PyTorch's t)."""
    rng = np.random.default_rng(0)
    net = mlp(list(sizes), rng=rng).to("cuda")
    model = _torch_mlp(torch, net, clock.torch_device)
    x_host = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    t_host = rng.integers(0, sizes[-1], batch)
    return (net, model, cupy.asarray(x_host), cupy.asarray(t_host),
            torch.as_tensor(x_host, device=clock.torch_device),
            torch.as_tensor(t_host, device=clock.torch_device))  # fmt: skip


def time_mlp_step(
    cupy: Any, torch: Any, repeats: int, clock: Any,
    sizes: tuple[int, ...] = (784, 1024, 1024, 10), batch: int = 512,
) -> list[Row]:  # fmt: skip
    """One SGD step, twice: as ``fit`` runs it (the loss left on the card, PyTorch's not
    read either) and through ``gradient`` (which reads the loss, against PyTorch reading
    ``loss.item()`` after its step)."""
    net, model, x, t, tx, tt = mlp_pair(cupy, torch, clock, sizes, batch)
    optimizer = make_optimizer("sgd", lr=0.01)
    torch_opt = torch.optim.SGD(model.parameters(), lr=0.01)
    first_loss = float(net.loss(x, t))
    torch_loss = torch.nn.functional.cross_entropy(model(tx), tt).item()
    if abs(first_loss - torch_loss) > 1e-4 * abs(torch_loss):
        raise SystemExit(f"MLP: scratchnn loss {first_loss} differs from PyTorch's {torch_loss}")

    as_fit = TrainingStep(net, optimizer)  # on a card, replayed from a CUDA graph

    def ours_unread() -> None:
        as_fit(x, t)

    def ours_eager() -> None:
        optimizer.update(net.params, net._gradient(x, t, wait=False))

    def ours_read() -> None:
        optimizer.update(net.params, net.gradient(x, t))

    def theirs(read: bool) -> Callable[[], None]:
        def step() -> None:
            torch_opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(tx), tt)
            loss.backward()
            torch_opt.step()
            if read:
                loss.item()

        return step

    shape = "-".join(map(str, sizes))
    # In alternating rounds, as the activations: two lent machines put the same code's "as
    # fit" row at 0.74 and 1.24, the host's share of each side moving apart.
    unread = paired_ms(clock, ours_unread, theirs(False), repeats)
    print(f"the MLP step as fit takes it: {as_fit.refusal or 'replayed from a CUDA graph'}")
    read = paired_ms(clock, ours_read, theirs(True), repeats)
    # The eager step (each of its calls made anew) in rounds alternating with the step as
    # fit takes it: whether the graph's replays pay on this card's host.
    replayed, eager = [], []
    for _ in range(3):
        replayed.append(clock.cupy_ms(ours_unread, max(1, repeats // 3)))
        eager.append(clock.cupy_ms(ours_eager, max(1, repeats // 3)))
    # The eager step with CuPy's products, and with each Affine and its Relu run apart (as
    # before session 16), and so again with Affine's bias through CuPy's own calls (as
    # before session 15), in rounds alternating with the eager step: whether the direct
    # products, the pairs and kernels.bias pay on this card's host.
    paired, cupy_products, apart, with_cupy = [], [], [], []
    for _ in range(3):
        paired.append(clock.cupy_ms(ours_eager, max(1, repeats // 3)))
        with cupy_matmul():
            cupy_products.append(clock.cupy_ms(ours_eager, max(1, repeats // 3)))
        with layers_apart():
            apart.append(clock.cupy_ms(ours_eager, max(1, repeats // 3)))
            with cupy_bias_calls():
                with_cupy.append(clock.cupy_ms(ours_eager, max(1, repeats // 3)))
    return [
        Row(f"MLP step {shape} b{batch} SGD, as fit", *unread, "neither reads its loss",
            target=1.0),
        # Ours against ours: the "PyTorch" column holds the step as fit takes it.
        Row(f"MLP step {shape} b{batch} SGD, eager", statistics.median(eager),
            statistics.median(replayed),
            "ours, each call made anew / ours, as fit (a graph's replay) (not PyTorch)"),
        # Ours against ours, eager: the "PyTorch" column holds the eager step.
        Row(f"MLP step {shape} b{batch} SGD, CuPy's products", statistics.median(cupy_products),
            statistics.median(paired),
            "eager, x @ W by cupy.matmul / eager, by cuBLAS directly (not PyTorch)"),
        Row(f"MLP step {shape} b{batch} SGD, layers apart", statistics.median(apart),
            statistics.median(paired),
            "eager, Affine and Relu apart / eager, paired (not PyTorch)"),
        # Ours against ours: the "PyTorch" column holds the step apart, with kernels.bias.
        Row(f"MLP step {shape} b{batch} SGD, bias by CuPy's calls", statistics.median(with_cupy),
            statistics.median(apart),
            "apart, with out += b, g.sum(axis=0) / apart, with kernels.bias (not PyTorch)"),
        # Not like for like, so no target: gradient() waits for its loss mid-step (before
        # backward is queued, for the labels' check), PyTorch's loss.item() at the end.
        Row(f"MLP step {shape} b{batch} SGD, read", *read,
            "gradient() reads the loss mid-step; PyTorch loss.item() after its step"),
        # Where the "as fit" row goes, if it misses: a host side longer than the card's work
        # is what the events measure (benchmarks/bench_gpu_host.py splits ours further).
        Row(f"MLP step {shape} b{batch} SGD, host side",
            host_median_ms(ours_unread, clock.wait_cupy, repeats),
            host_median_ms(theirs(False), clock.wait_torch, repeats),
            "the host's time to queue a step on a quiet card, as fit"),
    ]  # fmt: skip


@contextlib.contextmanager
def swapped(owner: Any, **values: Any) -> Iterator[None]:
    """``owner``'s attributes set to ``values`` for as long as the block runs, then put back."""
    saved = {name: getattr(owner, name) for name in values}
    for name, value in values.items():
        setattr(owner, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(owner, name, value)


def cupy_matmul() -> contextlib.AbstractContextManager[None]:
    """Affine's products by CuPy's own ``a @ b``, as before ``kernels.products``."""
    return swapped(products, matmul=operator.matmul)


def layers_apart() -> contextlib.AbstractContextManager[None]:
    """Each Affine and the Relu after it run one by one, and the loss's kernel without the
    last bias or its gradient, as before ``Sequential`` fused them on the GPU."""
    return swapped(Sequential, fuse_on_gpu=False)


def _add_in_place(out: Any, b: Any) -> None:
    out += b


def cupy_bias_calls() -> contextlib.AbstractContextManager[None]:
    """Affine's bias through CuPy's own calls (``out += b``, ``g.sum(axis=0)``), as before
    ``kernels.bias``."""
    return swapped(bias, add_bias=_add_in_place, column_sum=lambda g: g.sum(axis=0))


def time_epochs(
    cupy: Any, torch: Any, data: str | None, epochs: int, clock: Any, limit: int | None = None
) -> list[Row]:
    from scratchnn.data import load_fashion_mnist

    try:
        (x_train, t_train), (x_test, t_test) = load_fashion_mnist(data, normalize=True)
    except FileNotFoundError as error:
        return [Row(f"Fashion-MNIST epoch: skipped ({error})", math.nan, None)]
    x_train, x_test = x_train[:limit].astype(np.float32), x_test.astype(np.float32)
    t_train = t_train[:limit]
    # The generator of `scratchnn train` (time_train_command): it draws the initial weights,
    # then one permutation per epoch. Both hand loops take the same, so all three runs see
    # the same weights and batches, and their test accuracies compare like with like.
    rng = np.random.default_rng(0)
    net = mlp([784, 256, 128, 10], rng=rng).to("cuda")
    model = _torch_mlp(torch, net, clock.torch_device)
    optimizer = make_optimizer("adam", lr=1e-3)
    torch_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    on_torch = clock.torch_device
    gx, gt = cupy.asarray(x_train), cupy.asarray(t_train.astype(np.int64))
    tx = torch.as_tensor(x_train, device=on_torch)
    tt = torch.as_tensor(t_train, device=on_torch).long()
    test_gx, test_tx = cupy.asarray(x_test), torch.as_tensor(x_test, device=on_torch)
    test_tt = torch.as_tensor(t_test, device=on_torch).long()
    ours_s, theirs_s, theirs_eval_s = [], [], []
    for epoch in range(epochs):
        # The default preset's rate: 1e-3 decayed by LR_DECAY each epoch, as fit sets it.
        optimizer.lr = 1e-3 * LR_DECAY**epoch
        for group in torch_opt.param_groups:
            group["lr"] = 1e-3 * LR_DECAY**epoch
        # The same batches for both: one order per epoch, drawn on the host and moved to
        # each device once, before the timing (as fit moves it).
        order = rng.permutation(len(x_train))
        our_order, torch_order = cupy.asarray(order), torch.as_tensor(order, device=on_torch)
        started = time.perf_counter()
        for start in range(0, len(order), 128):
            index = our_order[start : start + 128]
            # As fit's steps: its labels are checked once, its losses not read each step.
            optimizer.update(net.params, net._gradient(gx[index], gt[index], wait=False))
        clock.wait_cupy()
        ours_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        for start in range(0, len(order), 128):
            index = torch_order[start : start + 128]
            torch_opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(tx[index]), tt[index]).backward()
            torch_opt.step()
        clock.wait_torch()
        theirs_s.append(time.perf_counter() - started)
        # What fit adds to each epoch, done as fit does it (batches of DEVICE_EVAL_BATCH, the
        # losses and the count of correct answers summed on the card and read at the end):
        # the loss and accuracy of 10,000 training images and of the test set, for the
        # train command's row below.
        started = time.perf_counter()
        model.eval()
        size = DEVICE_EVAL_BATCH
        with torch.no_grad():
            for images, labels in ((tx[:10000], tt[:10000]), (test_tx, test_tt)):
                total = torch.zeros((), dtype=torch.float64, device=on_torch)
                correct = torch.zeros((), dtype=torch.int64, device=on_torch)
                for start in range(0, len(images), size):
                    scores = model(images[start : start + size])
                    batch = labels[start : start + size]
                    total += torch.nn.functional.cross_entropy(scores, batch) * len(batch)
                    correct += (scores.argmax(dim=1) == batch).sum()
                float(total.item()), int(correct.item())
        model.train()
        theirs_eval_s.append(time.perf_counter() - started)
    net.eval()
    predicted_ours = to_host(cupy.argmax(net.predict(test_gx), axis=1))
    ours_acc = float(np.mean(predicted_ours == t_test))
    with torch.no_grad():
        predicted = model(test_tx).argmax(dim=1).cpu().numpy()
    torch_acc = float(np.mean(predicted == t_test))
    note = (f"median of {epochs}; test acc {100 * ours_acc:.2f}% vs {100 * torch_acc:.2f}% "
            f"after {epochs} epochs")  # fmt: skip
    hand_loop = Row("Fashion-MNIST epoch 784-256-128-10 Adam b128", 1e3 * statistics.median(ours_s),
                    1e3 * statistics.median(theirs_s), note)  # fmt: skip
    # As the train command's row below: the first epoch (cold caches, cuBLAS's set-up) is
    # left out where there are more.
    totals = [t + e for t, e in zip(theirs_s, theirs_eval_s)]
    torch_epoch_s = statistics.median(totals[1:] or totals)
    return [hand_loop, time_train_command(data, epochs, torch_epoch_s, torch_acc, limit)]


def time_train_command(
    data: str | None, epochs: int, torch_epoch_s: float, torch_acc: float, limit: int | None = None
) -> Row:
    """``scratchnn train --device cuda`` (its library call): epochs as fit times them.

    fit's seconds per epoch include its two evaluations (10,000 training images
    and the test set), so PyTorch's time here is its epoch plus the same two.
    The first epoch is left out of the median where there are more: it compiles
    the kernels.
    """
    import io
    import tempfile

    from scratchnn.runs import preset_config, train_run

    # The command's default run: 784-256-128-10, ReLU, Adam 1e-3 decayed by 0.85 each
    # epoch, batch 128 (limit: for tests only).
    config = preset_config("default", epochs=epochs, limit=limit)
    assert config.lr_decay == LR_DECAY, "the hand loops above must decay the rate alike"
    with tempfile.TemporaryDirectory() as out:
        history = train_run(config, out, data_path=data, device="cuda",
                            stream=io.StringIO(), progress_stream=io.StringIO())  # fmt: skip
    seconds = statistics.median(history.seconds[1:] or history.seconds)
    accuracy = history.test_acc[-1]
    note = (f"fit's epoch incl. evaluation; test acc {100 * accuracy:.2f}% vs PyTorch's "
            f"{100 * torch_acc:.2f}% (within 0.5 point: {abs(accuracy - torch_acc) <= 0.005})")  # fmt: skip
    return Row("scratchnn train --device cuda, epoch", 1e3 * seconds, 1e3 * torch_epoch_s, note,
               target=1.0, also_met=abs(accuracy - torch_acc) <= 0.005)  # fmt: skip


# -- 3. the report ------------------------------------------------------------------------------


def gpu_unavailable_reason() -> str | None:
    try:
        import cupy
    except ImportError:
        return "CuPy is not installed (pip install scratchnn[gpu])"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CUDA sees no GPU"
    except Exception as error:
        return f"CUDA is not usable: {error}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="directory with the Fashion-MNIST IDX files")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--require-gpu", action="store_true",
        help="exit 3 (not 0) where there is no GPU, no PyTorch with CUDA or no data",
    )  # fmt: skip
    args = parser.parse_args(argv)
    for name in ("epochs", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    missing = 3 if args.require_gpu else 0
    reason = gpu_unavailable_reason()
    if reason is not None:
        print(f"benchmarks/gpu.py: no GPU to measure here: {reason}. Nothing was run.")
        return missing
    import cupy

    started = time.perf_counter()
    checks = check_all("cuda")
    failed = [c for c in checks if not c.ok]
    worst = max(checks, key=lambda c: c.error / c.tolerance)
    print(f"correctness: {len(checks) - len(failed)}/{len(checks)} checks pass "
          f"(worst {worst.name}: {worst.error:.2e}, tolerance {worst.tolerance:.0e}) "
          f"in {time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
    for check in failed:
        print(f"  FAIL {check.name}: error {check.error:.3e} > {check.tolerance:.0e}")
    for check in checks:  # whether fit's steps were replayed from a CUDA graph, or why not
        if "steps as fit takes them" in check.name and check.ok:
            print(f"  {check.name}: error {check.error:.1e}")
    # The timings still run after a failed check (the lent minutes are few), marked as such
    # in the report, and the exit status is 1.
    try:
        import torch

        if not torch.cuda.is_available():
            raise ImportError("PyTorch has no CUDA")
    except ImportError as error:
        print(f"no PyTorch with CUDA ({error}): no comparisons")
        return missing
    if args.require_gpu:
        from scratchnn.data import find_dataset_files

        try:
            find_dataset_files("fashion-mnist", args.data)
        except FileNotFoundError as error:
            print(f"benchmarks/gpu.py: {error}")
            return missing
    clock = CudaClock(cupy, torch)
    sections: list[tuple[str, Callable[[], list[Row]]]] = [
        ("activations", lambda: time_activations(cupy, torch, args.repeats, clock)),
        ("MLP step", lambda: time_mlp_step(cupy, torch, args.repeats, clock)),
        ("epochs", lambda: time_epochs(cupy, torch, args.data, args.epochs, clock)),
    ]
    rows, broken = timings(sections)
    props = cupy.cuda.runtime.getDeviceProperties(0)
    print()
    print(f"card: {props['name'].decode()}, {props['multiProcessorCount']} SMs, "
          f"{props['totalGlobalMem'] / 2**30:.0f} GiB; CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}, "
          f"driver {cupy.cuda.runtime.driverGetVersion()}")  # fmt: skip
    # (the MLP step's time is the host's, and lent machines have differed in it by half)
    print(f"host: {cpu_model()}, {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}")  # fmt: skip
    print(f"versions: scratchnn {snn.__version__}, CuPy {cupy.__version__}, "
          f"PyTorch {torch.__version__}, NumPy {np.__version__}, Python {sys.version.split()[0]}")  # fmt: skip
    if products.disabled:  # (CuPy's own products took over: the binding refused a call)
        print(f"direct products off: {products.disabled}")
    print(f"times: ms, median of {args.repeats} CUDA-event runs (epochs: wall clock)")
    print(table(rows))
    if failed:
        print(f"CORRECTNESS FAILED ({len(failed)} checks, above): these timings are of code "
              "that does not yet compute what it should")  # fmt: skip
    return 1 if broken or failed else 0


def timings(sections: list[tuple[str, Callable[[], list[Row]]]]) -> tuple[list[Row], bool]:
    """Each section's rows, each row printed as it comes (so that a run cut short still
    shows them); a section that raises is printed with its traceback and named in a row,
    and the others still run. Returns the rows and whether any section broke."""
    rows: list[Row] = []
    broken = False
    for name, section in sections:
        try:
            new = section()
        except Exception as error:  # one broken section must not lose the others' numbers
            traceback.print_exc()
            new, broken = [Row(f"{name}: FAILED, {type(error).__name__}: {error}", math.nan, None)], True
        for row in new:
            print(table([row], header=False), flush=True)
        rows += new
    return rows, broken


def table(rows: list[Row], header: bool = True) -> str:
    """The rows as the report's table: times, their ratio, and the target's verdict."""
    lines = [f"{'':44} {'scratchnn':>10} {'PyTorch':>10} {'ratio':>6}  {'target':<15} note"] * header
    for row in rows:
        ratio = f"{row.ours / row.torch:6.2f}" if row.torch else "      "
        torch_ms = f"{row.torch:10.3f}" if row.torch else " " * 10
        lines.append(f"{row.what:44} {row.ours:10.3f} {torch_ms} {ratio}  {row.verdict:<15} {row.note}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
