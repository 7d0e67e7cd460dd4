"""Whether a CUDA graph of scratchnn's training step replays right on a card, and what it saves.

    PYTHONPATH=src python3 benchmarks/gpu_graph.py [--steps 5] [--repeats 60]

``benchmarks/gpu.py``'s MLP step (784-1024-1024-10, batch 512, SGD) is bound
by the host: its 25 device calls each cost the host microseconds of CuPy's
Python and scratchnn's, and the card waits between them. A CUDA graph records
a step's launches once; replaying it is one call. This script is the probe
before ``fit`` does that.

First it says whether the installed CuPy lets its own cuBLAS calls into a
capture (:func:`cublas_refusal`: one product captured on a stream of its own).
CuPy up to 14 does not: its ``setStream`` of cuBLAS raises
``NotImplementedError`` ("calling cuBLAS API during stream capture is currently
unsupported", ``cupy_backends/cuda/libs/cublas.pyx``; CuPy's own test suite
asserts it). The step's 8 products are therefore captured through
``scratchnn.kernels.products.capturing``: cuBLAS's C library called by
``ctypes``, on a handle and a workspace of scratchnn's own bound to the
capturing stream. Then it

1. captures the step as ``fit`` runs it (:func:`capture_step`): one eager step
   on a stream of its own, its memory from a pool of its own, then the same
   step recorded into a graph, its products by ``products.capturing``. The
   pool is the graph's alone, so no array made outside the graph is ever
   handed a block that its replays write. (The
   capture still allocates: the layers hold the eager step's arrays until the
   captured step replaces them. CuPy captures in CUDA's relaxed mode, which
   lets the pool call cudaMalloc meanwhile.);
2. checks it (:func:`check_replays`): from the same weights and batches, the
   losses and parameters after a few steps, each batch copied into the arrays
   the capture read and the graph replayed, against eager steps;
3. times it against the eager step as ``fit`` runs it and against PyTorch's
   eager loop (CUDA events, alternating rounds), and the host's time to queue
   one replayed step, the batch's two copies included.

A step can be replayed only where it launches the same work each time: the
same shapes, the batch copied into the arrays the capture read, the same
scalars (SGD's lr is an argument of its kernel: a new lr needs a new capture;
Adam's bias corrections change every step, so Adam's step as written cannot be
replayed), and no random numbers drawn (Dropout's masks). A failure is printed
with its exception, and the script still exits 0: it is a probe, not a check
of the library. It runs from a checkout:
``PYTHONPATH=src python3 benchmarks/gpu_graph.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu import CudaClock, gpu_unavailable_reason, host_median_ms, mlp_pair, paired_ms

import scratchnn as snn
from scratchnn import mlp
from scratchnn.backend import to_host
from scratchnn.cli import positive_int
from scratchnn.kernels import products
from scratchnn.optim import SGD

SIZES = (784, 1024, 1024, 10)
BATCH = 512
LR = 0.01


@dataclass
class Captured:
    """A training step made replayable: ``feed`` a batch, ``replay``, then ``read_loss``."""

    feed: Callable[[Any, Any], None]  # copies a batch into the arrays the step reads
    replay: Callable[[], None]  # queues one step
    read_loss: Callable[[], float]  # the last replayed step's loss (waits for it)
    first_loss: float  # the loss of the eager step that came before the capture
    stream: Any  # where the replays run; time them in `with stream:`
    # The graph and its memory pool, alive while the replays are: a pool collected would
    # free the blocks of the step's temporaries, which every replay writes.
    keep_alive: tuple[Any, ...] = ()


Capture = Callable[[Any, Any, Any, Any, Any], Captured]


def cublas_refusal(cupy: Any) -> str | None:
    """Why this CuPy will not capture a product (cuBLAS) into a graph, or None if it will."""
    a = cupy.ones((64, 64), np.float32)
    a @ a  # cuBLAS's handle made outside the capture (its creation is no stream operation)
    stream = cupy.cuda.Stream(non_blocking=True)
    cupy.cuda.Device().synchronize()
    with stream:
        stream.begin_capture()
        try:
            a @ a
        except Exception as error:
            return f"{type(error).__name__}: {error}"
        finally:
            with contextlib.suppress(Exception):
                stream.end_capture()
    return None


def capture_step(cupy: Any, net: Any, optimizer: Any, x: Any, t: Any) -> Captured:
    """One eager step of ``net`` on the batch ``x``, ``t``, then the step captured as a
    CUDA graph on a stream and a memory pool of its own (see the module's docstring)."""
    x_in, t_in = x.copy(), t.copy()
    pool = cupy.cuda.MemoryPool()
    stream = cupy.cuda.Stream(non_blocking=True)
    cupy.cuda.Device().synchronize()  # the copies are made before the new stream reads them

    def step() -> None:
        optimizer.update(net.params, net._gradient(x_in, t_in, wait=False))

    # (capturing first: the handle's workspace, made at the first capture, is not the
    # graph's pool's, and outlives it)
    with products.capturing(stream), cupy.cuda.using_allocator(pool.malloc), stream:
        step()
        stream.synchronize()
        first_loss = float(net._last_loss)
        stream.begin_capture()
        try:
            step()
        except BaseException:
            with contextlib.suppress(Exception):  # the step's own error is the one to see
                stream.end_capture()
            raise
        graph = stream.end_capture()
    loss = net._last_loss  # the captured step's: each replay writes its numbers anew

    def feed(x_batch: Any, t_batch: Any) -> None:
        with stream:
            cupy.copyto(x_in, x_batch)
            cupy.copyto(t_in, t_batch)

    def replay() -> None:
        graph.launch(stream)

    def read_loss() -> float:
        stream.synchronize()
        return float(loss)

    return Captured(feed, replay, read_loss, first_loss, stream, (graph, pool))


@dataclass
class Agreement:
    loss_error: float  # the largest relative difference of a step's loss
    param_error: float  # of a parameter after the last step, relative to its largest value

    def fine(self, tolerance: float = 1e-5) -> bool:
        return self.loss_error <= tolerance and self.param_error <= tolerance


def check_replays(cupy: Any, steps: int, capture: Capture = capture_step,
                  sizes: tuple[int, ...] = SIZES, batch: int = BATCH) -> Agreement:  # fmt: skip
    """``steps`` SGD steps on fresh random batches, eager and through ``capture``'s graph,
    from the same weights: how far apart their losses and parameters end."""
    rng = np.random.default_rng(3)
    batches = [(cupy.asarray(rng.standard_normal((batch, sizes[0])).astype(np.float32)),
                cupy.asarray(rng.integers(0, sizes[-1], batch)))
               for _ in range(steps)]  # fmt: skip
    nets = [mlp(list(sizes), rng=np.random.default_rng(0)).to("cuda") for _ in range(2)]
    eager, graphed = nets
    eager_optimizer = SGD(lr=LR)
    eager_losses = []
    for x, t in batches:
        eager_optimizer.update(eager.params, eager._gradient(x, t, wait=False))
        eager_losses.append(float(eager._last_loss))
    captured = capture(cupy, graphed, SGD(lr=LR), *batches[0])
    graph_losses = [captured.first_loss]
    for x, t in batches[1:]:
        captured.feed(x, t)
        captured.replay()
        graph_losses.append(captured.read_loss())
    loss_error = max(abs(a - b) / abs(a) for a, b in zip(eager_losses, graph_losses))
    param_error = 0.0
    for key, value in eager.params.items():
        want, got = to_host(value).astype(np.float64), to_host(graphed.params[key])
        scale = max(float(np.abs(want).max()), 1e-30)
        param_error = max(param_error, float(np.abs(got - want).max()) / scale)
    return Agreement(loss_error, param_error)


@dataclass
class Timing:
    what: str
    ours_ms: float
    torch_ms: float


def time_replays(cupy: Any, torch: Any, repeats: int, clock: Any,
                 capture: Capture = capture_step) -> list[Timing]:  # fmt: skip
    """The replayed step (the batch copied in, the graph launched) and the eager step as
    ``fit`` runs it, each against PyTorch's eager loop, and each framework's host time."""
    net, model, x, t, tx, tt = mlp_pair(cupy, torch, clock, SIZES, BATCH)
    eager_net = mlp(list(SIZES), rng=np.random.default_rng(0)).to("cuda")
    eager_optimizer = SGD(lr=LR)
    torch_optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    captured = capture(cupy, net, SGD(lr=LR), x, t)

    def replayed() -> None:
        captured.feed(x, t)
        captured.replay()

    def eager() -> None:
        eager_optimizer.update(eager_net.params, eager_net._gradient(x, t, wait=False))

    def theirs() -> None:
        torch_optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(tx), tt).backward()
        torch_optimizer.step()

    with captured.stream:  # the events and the eager steps on the replays' stream
        graph_ms, torch_ms = paired_ms(clock, replayed, theirs, repeats)
        eager_ms, torch_again_ms = paired_ms(clock, eager, theirs, repeats)
        host_graph = host_median_ms(replayed, clock.wait_cupy, repeats)
        host_eager = host_median_ms(eager, clock.wait_cupy, repeats)
    host_torch = host_median_ms(theirs, clock.wait_torch, repeats)
    return [
        Timing("step replayed from a CUDA graph (batch copied in)", graph_ms, torch_ms),
        Timing("step as fit runs it now (eager)", eager_ms, torch_again_ms),
        Timing("host's time to queue: replayed step", host_graph, host_torch),
        Timing("host's time to queue: eager step", host_eager, host_torch),
    ]


def table(rows: list[Timing]) -> str:
    lines = [f"{'784-1024-1024-10 b512 SGD':<52} {'ours ms':>8} {'PyTorch':>8} {'ratio':>6}"]
    lines += [f"{r.what:<52} {r.ours_ms:8.3f} {r.torch_ms:8.3f} {r.ours_ms / r.torch_ms:6.2f}"
              for r in rows]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=positive_int, default=5)
    parser.add_argument("--repeats", type=positive_int, default=60)
    args = parser.parse_args(argv)
    reason = gpu_unavailable_reason()
    if reason is not None:
        print(f"no GPU probe: {reason}")
        return 0
    import cupy
    import torch

    print(f"CuPy {cupy.__version__}, PyTorch {torch.__version__}, scratchnn {snn.__version__}")
    refusal = cublas_refusal(cupy)
    print(f"CuPy's own cuBLAS calls in a capture: {'refused, ' + refusal if refusal else 'taken'}"
          "; the step's products go to cuBLAS's library (products.capturing)")  # fmt: skip
    try:
        agreement = check_replays(cupy, args.steps)
    except Exception:
        print("capturing or replaying the step failed:")
        traceback.print_exc(file=sys.stdout)
        return 0
    verdict = "agree" if agreement.fine() else "DIFFER"
    print(f"{args.steps} steps, replayed against eager: losses within {agreement.loss_error:.2g}, "
          f"parameters within {agreement.param_error:.2g} (relative): {verdict}")  # fmt: skip
    if not agreement.fine():
        return 0
    try:
        rows = time_replays(cupy, torch, args.repeats, CudaClock(cupy, torch))
    except Exception:
        print("timing the replays failed:")
        traceback.print_exc(file=sys.stdout)
        return 0
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
