"""The host's cost of each device call of a GPU training step, CuPy against PyTorch.

    python3 benchmarks/gpu_calls.py [--calls 200] [--rounds 5]

``benchmarks/gpu.py``'s MLP step (784-1024-1024-10, batch 512, SGD) is bound
by the host: the card finishes each kernel before Python has queued the next,
so the step takes what its calls cost the host. Between lent machines it
measured 0.74 to 1.24 of PyTorch's time. This script says where that time
goes, in one short run on a card. For each kind of call the step makes, at
the step's shapes, it times the host's cost of one call (``time.perf_counter``
around ``--calls`` calls, the card synchronised before and after, outside the
timing; the median of ``--rounds`` rounds, CuPy's and PyTorch's alternating):

* CuPy's own calls: a product (beside scratchnn's, ``kernels.products``, which
  calls cuBLAS's gemm directly), ``cupy.empty``; and, beside scratchnn's bias
  kernels (``kernels.bias``: the bias addition and the bias gradient, a launch
  each), the CuPy calls they replaced (``h += b``, ``g.sum(axis=0)``);
* scratchnn's: a fused kernel through ``kernels.run``, and the layers'
  ``forward`` and ``backward`` (Affine, Relu), which wrap those calls;
* the whole step, scratchnn's as ``fit`` runs it against PyTorch's loop.

Each against PyTorch's equivalent (``@``, ``add_``, ``sum(0)``,
``torch.empty``, ``torch.relu``, ``F.linear``, and so on). The last column
multiplies each call's cost by how often a step makes it (scratchnn's 18 calls:
8 products; 2 of the bias and ReLU in one kernel, as ``Sequential`` pairs an Affine
with its Relu; 2 of ReLU's backward with the bias gradient, and the last layer's bias
gradient; 3 allocations and 2 other kernels, the loss's (which adds the last layer's
bias and writes its gradient too) and the optimiser's step. The bias kernels make 7
allocations inside their calls, so bench_gpu_host.py counts 25), so the table shows
which calls a faster step must make fewer or cheaper.

Then the candidates that could replace the costly ones, each checked against
the call it would replace before it is timed (``ALTERNATIVES``): the bias
kernels launched bare (what ``kernels.bias``'s checks add to a launch), the
bias gradient as a product with a row of ones, a
product into a buffer made once (``cupy.matmul(..., out=)``, CuPy's Python
wrapper, and ``x.dot(W, out=)``, its compiled method), and a bare launch
of ReLU's kernel with its arguments made once (what ``kernels.run`` adds to a
launch). It runs from a checkout: ``PYTHONPATH=src python3 benchmarks/gpu_calls.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu import CudaClock, gpu_unavailable_reason, mlp_pair

import scratchnn as snn
from scratchnn import kernels
from scratchnn.backend import to_host
from scratchnn.cli import positive_int
from scratchnn.kernels import bias, products
from scratchnn.optim import make_optimizer

SIZES = (784, 1024, 1024, 10)
BATCH = 512


@dataclass
class Row:
    what: str
    per_step: int  # how many such calls scratchnn's step makes (0: not a call of its own)
    ours_us: float
    theirs_us: float


# The candidates' rows, after the step's own (see alternatives()).
ALTERNATIVES = (
    "  instead: bias addition, add_bias launched bare",
    "  instead: bias gradient, ones @ g",
    "  instead: bias gradient, column_sum launched bare",
    "  instead: product into a buffer, matmul(out=)",
    "  instead: product into a buffer, x.dot(W, out=)",
    "  instead: ReLU forward, bare launch, arguments made once",
)


def host_us(fn: Callable[[], Any], calls: int, wait: Callable[[], None]) -> float:
    """The host's time to make one call of ``fn``, in µs: ``calls`` calls timed together,
    the card waited for before (so none is queued behind earlier work) and after (so the
    next measurement starts quiet), neither wait timed."""
    fn()
    wait()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - started
    wait()
    return 1e6 * elapsed / calls


def time_calls(cupy: Any, torch: Any, calls: int, rounds: int, clock: Any) -> list[Row]:
    net, model, x, t, tx, tt = mlp_pair(cupy, torch, clock, SIZES, BATCH)
    device, hidden = clock.torch_device, SIZES[1]
    rng = np.random.default_rng(1)
    W, b = net.layers[0].W, net.layers[0].b
    h_host = rng.standard_normal((BATCH, hidden)).astype(np.float32)
    h = cupy.asarray(h_host)
    tW = torch.as_tensor(to_host(W), device=device)
    tb = torch.as_tensor(to_host(b), device=device)
    th = torch.as_tensor(h_host, device=device)
    affine, relu = net.layers[0], net.layers[1]
    dout = cupy.ones((BATCH, hidden), dtype=np.float32)
    affine.forward(x)
    relu.forward(h)
    optimizer = make_optimizer("sgd", lr=0.01)
    torch_opt = torch.optim.SGD(model.parameters(), lr=0.01)
    functional = torch.nn.functional
    linear_weight = tW.T.contiguous()

    def ours_step() -> None:
        optimizer.update(net.params, net._gradient(x, t, wait=False))

    def theirs_step() -> None:
        torch_opt.zero_grad(set_to_none=True)
        functional.cross_entropy(model(tx), tt).backward()
        torch_opt.step()

    h_sum, h_relu = h.copy(), h.copy()
    th_sum = th.clone()
    relu_mask = h < 0
    pairs: list[tuple[str, int, Callable[[], Any], Callable[[], Any]]] = [
        ("product, products.matmul, 512x784 @ 784x1024", 8, lambda: products.matmul(x, W),
         lambda: tx @ tW),
        ("  CuPy's own: x @ W", 0, lambda: x @ W, lambda: tx @ tW),
        ("bias and ReLU, bias.add_bias_relu, 512x1024", 2,
         lambda: bias.add_bias_relu(h_relu, b), lambda: torch.relu(th_sum.add_(tb))),
        ("bias addition, bias.add_bias, 512x1024", 0, lambda: bias.add_bias(h_sum, b),
         lambda: th_sum.add_(tb)),
        ("ReLU's backward and db, relu_column_sum", 2,
         lambda: bias.relu_column_sum(h, relu_mask),
         lambda: (torch.ops.aten.threshold_backward(th, th, 0.0).sum(0))),
        ("bias gradient, bias.column_sum, 512x1024", 1, lambda: bias.column_sum(h),
         lambda: th.sum(0)),
        ("  CuPy's own: h += b", 0, lambda: h_sum.__iadd__(b), lambda: th_sum.add_(tb)),
        ("  CuPy's own: g.sum(axis=0)", 0, lambda: h.sum(axis=0), lambda: th.sum(0)),
        ("allocation, 512x1024 float32", 3,
         lambda: cupy.empty((BATCH, hidden), np.float32),
         lambda: torch.empty((BATCH, hidden), device=device)),
        ("kernels.run('relu_forward') / torch.relu", 2,
         lambda: kernels.run("relu_forward", h), lambda: torch.relu(th)),
        ("Affine.forward / F.linear", 0, lambda: affine.forward(x),
         lambda: functional.linear(tx, linear_weight, tb)),
        ("Affine.backward / the two products and sum", 0, lambda: affine.backward(dout),
         lambda: (th.T @ tx, th.sum(0), th @ linear_weight)),
        ("Relu.forward / torch.relu", 0, lambda: relu.forward(h), lambda: torch.relu(th)),
        ("Relu.backward / threshold_backward", 0, lambda: relu.backward(dout),
         lambda: torch.ops.aten.threshold_backward(th, th, 0.0)),
        ("the whole step, as fit / PyTorch's loop", 0, ours_step, theirs_step),
    ]  # fmt: skip
    pairs += alternatives(cupy, torch, (x, W, b, h, h_sum), h_host, (tx, tW, tb, th, th_sum))
    rows = []
    for what, per_step, ours, theirs in pairs:
        ours_us, theirs_us = [], []
        for _ in range(rounds):
            ours_us.append(host_us(ours, calls, clock.wait_cupy))
            theirs_us.append(host_us(theirs, calls, clock.wait_torch))
        rows.append(Row(what, per_step, statistics.median(ours_us), statistics.median(theirs_us)))
        print(_line(rows[-1]), flush=True)
    return rows


def alternatives(
    cupy: Any, torch: Any, ours: tuple[Any, ...], h_host: np.ndarray, theirs: tuple[Any, ...]
) -> list[tuple[str, int, Callable[[], Any], Callable[[], Any]]]:
    """The candidates of ``ALTERNATIVES``, each checked against the call it would
    replace (AssertionError if it computes something else) and timed against the same
    PyTorch call. ``ours`` is the step's x, W, b, h and the h that the additions grow;
    ``theirs`` PyTorch's x, W, b, h and h to add to."""
    x, W, b, h, h_sum = ours
    tx, tW, tb, th, th_sum = theirs
    from scratchnn.kernels import cuda
    from scratchnn.kernels.ops import OPS

    rows, cols = h.shape
    # scratchnn's own bias kernels, launched bare: what kernels.bias adds to a launch.
    bias_add = bias._kernel(cupy, np.float32, "add_bias")
    column_sum = bias._kernel(cupy, np.float32, "column_sum")
    rows64, cols64 = np.int64(rows), np.int64(cols)
    rows32, cols32 = np.int32(rows), np.int32(cols)
    add_grid = (min(rows, bias._ADD_BLOCKS),)  # as bias.add_bias launches it
    sum_grid = (-(-cols // 32),)
    # A bias of random values for the check (the layer's starts as zeros, which would hide
    # an addition at the wrong place).
    b_host = np.random.default_rng(2).standard_normal(cols).astype(np.float32)

    def add_bare(target: Any, vector: Any = b) -> None:
        bias_add(add_grid, (cuda.BLOCK,), (target, vector, rows64, cols64))

    def sum_bare() -> Any:
        out = cupy.empty(cols, np.float32)
        column_sum(sum_grid, (256,), (h, out, rows32, cols32))
        return out

    ones = cupy.ones(rows, np.float32)
    product_out = cupy.empty((x.shape[0], W.shape[1]), np.float32)
    relu = cuda._kernel(cupy, OPS["relu_forward"], np.dtype(np.float32))
    relu_y, relu_mask = cupy.empty_like(h), cupy.empty(h.shape, np.bool_)
    relu_args = (h, relu_y, relu_mask, np.int64(h.size), np.int32(1))  # 1: the vector path
    lanes = 16 // h.itemsize
    relu_grid = (cuda.blocks(h.size // lanes, cuda.vectors_per_thread(OPS["relu_forward"])),)

    # Each checked first: a faster call that computes something else would be no candidate.
    added = cupy.asarray(h_host)
    add_bare(added, cupy.asarray(b_host))
    np.testing.assert_array_equal(to_host(added), h_host + b_host, "bias_add")
    column_total = h_host.astype(np.float64).sum(axis=0)
    for name, got in (("ones @ g", ones @ h), ("column_sum", sum_bare())):
        np.testing.assert_allclose(to_host(got), column_total, rtol=1e-4, atol=1e-3, err_msg=name)
    np.testing.assert_array_equal(to_host(cupy.matmul(x, W, out=product_out)), to_host(x @ W))
    np.testing.assert_array_equal(to_host(x.dot(W, out=product_out)), to_host(x @ W))
    relu(relu_grid, (cuda.BLOCK,), relu_args)
    np.testing.assert_array_equal(to_host(relu_y), np.maximum(h_host, 0), "bare relu")

    return [
        (ALTERNATIVES[0], 0, lambda: add_bare(h_sum), lambda: th_sum.add_(tb)),
        (ALTERNATIVES[1], 0, lambda: ones @ h, lambda: th.sum(0)),
        (ALTERNATIVES[2], 0, sum_bare, lambda: th.sum(0)),
        (ALTERNATIVES[3], 0, lambda: cupy.matmul(x, W, out=product_out), lambda: tx @ tW),
        (ALTERNATIVES[4], 0, lambda: x.dot(W, out=product_out), lambda: tx @ tW),
        (ALTERNATIVES[5], 0, lambda: relu(relu_grid, (cuda.BLOCK,), relu_args),
         lambda: torch.relu(th)),
    ]  # fmt: skip


def _line(row: Row) -> str:
    total = f"{row.per_step * row.ours_us:9.1f}" if row.per_step else " " * 9
    return (f"{row.what:<46} {row.ours_us:9.1f} {row.theirs_us:9.1f} "
            f"{row.ours_us / row.theirs_us:6.2f} {row.per_step or '':>5} {total}")  # fmt: skip


def table(rows: list[Row]) -> str:
    head = (f"{'call (host µs each)':<46} {'ours':>9} {'PyTorch':>9} {'ratio':>6} {'/step':>5} "
            f"{'µs/step':>9}")  # fmt: skip
    lines = [head, *(_line(row) for row in rows)]
    counted = sum(row.per_step * row.ours_us for row in rows)
    lines.append(f"{'the 18 calls of a step, added up':<46} {counted:9.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=positive_int, default=200)
    parser.add_argument("--rounds", type=positive_int, default=5)
    args = parser.parse_args(argv)
    reason = gpu_unavailable_reason()
    if reason is not None:
        print(f"no GPU timings: {reason}")
        return 0
    import cupy
    import torch

    rows = time_calls(cupy, torch, args.calls, args.rounds, CudaClock(cupy, torch))
    print(f"\ncard: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}; "
          f"CuPy {cupy.__version__}, PyTorch {torch.__version__}, scratchnn {snn.__version__}")  # fmt: skip
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
