"""The host's share of a GPU training step, measured without a GPU.

    .venv/bin/python benchmarks/bench_gpu_host.py
    .venv/bin/python benchmarks/bench_gpu_host.py --rounds 9

A small network's step on a GPU is likely bound by the host, not the card:
the card finishes each kernel before Python has queued the next (gpu.py's
"host side" row says so on a card). What scratchnn adds
there is its Python around each launch (checks, look-ups, the choice of
kernel). This script measures that part on any machine. It stands a null
device in for CuPy: its arrays carry a shape and a dtype and no data, each of
its operations costs about a microsecond, and its kernels do nothing. On it,
two steps make the same device calls:

* scratchnn's, as ``fit`` runs it (``optimizer.update(net.params,
  net._gradient(x, t, wait=False))``);
* a hand-written one: the same products, allocations and kernel launches
  with no library around them, the least any CuPy code can do;
* scratchnn's step as ``fit`` takes it where a CUDA graph replays it
  (``scratchnn.steps``): the batch's rows gathered into the graph's arrays,
  the graph launched, the loss copied out, and for Adam its step counted and
  the table of its bias corrections checked. Its capture is not run here (the
  null device records nothing): the replay is made from an eager step's
  arrays and a graph whose launch does nothing, and timed alone.

The difference between the first two is scratchnn's own host time per eager
step; the third is the host's whole time per replayed step, where CuPy's calls
cost what they cost here. A real card adds
CuPy's own per-call cost to both sides alike. The null device replaces
``cupy`` in ``sys.modules`` for this process only; no GPU and no CuPy are
needed.
"""

from __future__ import annotations

import argparse
import math
import sys
import types
from collections.abc import Callable
from typing import Any

import numpy as np
from _common import format_seconds, machine_report, paired_rounds, positive_int, print_table

# -- the null device ------------------------------------------------------------------------

calls: dict[str, int] = {}  # device calls by kind, counted on both sides alike


def _count(kind: str) -> None:
    calls[kind] = calls.get(kind, 0) + 1


class _Flags:
    c_contiguous = True
    f_contiguous = False


class _Pointer:
    __slots__ = ("ptr",)
    addresses = iter(range(256, 2**62, 256))  # each array its own, aligned as CuPy's

    def __init__(self) -> None:
        self.ptr = next(self.addresses)


class ndarray:
    """A device array with a shape and a dtype and no data."""

    __slots__ = ("data", "dtype", "ndim", "shape", "size")
    flags = _Flags()

    def __init__(self, shape: tuple[int, ...], dtype: Any) -> None:
        _count("array")
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.size = math.prod(self.shape)
        self.data = _Pointer()

    @property
    def strides(self) -> tuple[int, ...]:
        strides, step = [], self.dtype.itemsize
        for n in reversed(self.shape):
            strides.append(step)
            step *= n
        return tuple(reversed(strides))

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError("null device: no implicit copy to the host")

    # NumPy functions called on device arrays: CuPy runs them, through NumPy's dispatch.
    # Counted apart ("numpy ..."), so that the table shows any left in a step.

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        _count(f"numpy {ufunc.__name__}{'' if method == '__call__' else '.' + method}")
        if "out" in kwargs:
            return kwargs["out"][0]
        if method == "reduce":
            axis = kwargs.get("axis", 0)
            return ndarray(self.shape[:axis] + self.shape[axis + 1 :], self.dtype)
        if ufunc is np.matmul:
            return ndarray((inputs[0].shape[0], inputs[1].shape[-1]), self.dtype)
        shapes = [a.shape for a in inputs if isinstance(a, ndarray)]
        return ndarray(np.broadcast_shapes(*shapes), self.dtype)

    def __array_function__(self, func: Any, types_: Any, args: Any, kwargs: Any) -> Any:
        _count(f"numpy {func.__name__}")
        if func is np.may_share_memory:
            return args[0] is args[1]
        raise NotImplementedError(f"null device: no {func.__name__}")

    @property
    def T(self) -> ndarray:
        return ndarray(self.shape[::-1], self.dtype)

    def __matmul__(self, other: ndarray) -> ndarray:
        _count("matmul")
        return ndarray((self.shape[0], other.shape[-1]), self.dtype)

    def __iadd__(self, other: Any) -> ndarray:
        _count("add")
        return self

    def sum(self, axis: int | None = None, keepdims: bool = False) -> ndarray:
        _count("sum")
        if axis is None:
            return ndarray((), self.dtype)
        return ndarray(self.shape[:axis] + self.shape[axis + 1 :], self.dtype)

    def reshape(self, *shape: Any) -> ndarray:
        if len(shape) == 1 and isinstance(shape[0], tuple):
            shape = shape[0]
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            shape = tuple(self.size // known if s == -1 else s for s in shape)
        return ndarray(shape, self.dtype)

    def astype(self, dtype: Any, copy: bool = True) -> ndarray:
        if not copy and np.dtype(dtype) == self.dtype:
            return self
        _count("astype")
        return ndarray(self.shape, dtype)

    def copy(self) -> ndarray:
        _count("copy")
        return ndarray(self.shape, self.dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> ndarray:  # (a view: one slice of the first axis)
        return ndarray((len(range(*index.indices(self.shape[0]))), *self.shape[1:]), self.dtype)

    def fill(self, value: Any) -> None:
        _count("fill")


ndarray.__module__ = "cupy"


class RawKernel:
    def __init__(self, code: str = "", name: str = "", **_: Any) -> None:
        pass

    def __call__(self, grid: Any, block: Any, args: Any, shared_mem: int = 0) -> None:
        _count("kernel")


class RawModule:
    def __init__(self, code: str = "", **_: Any) -> None:
        pass

    def get_function(self, name: str) -> RawKernel:
        return RawKernel()


def _null_gemm(*args: Any) -> None:
    _count("gemm")


def null_cublas() -> types.ModuleType:
    """CuPy's binding of cuBLAS (``cupy_backends.cuda.libs.cublas``) on the null device:
    its gemm costs a Python call, as the other calls do."""
    cublas = types.ModuleType("cupy_backends.cuda.libs.cublas")
    cublas.sgemm = cublas.dgemm = _null_gemm  # type: ignore[attr-defined]
    return cublas


def null_cupy() -> types.ModuleType:
    """A ``cupy`` module of null arrays: what the library and the hand-written step call."""
    cupy = types.ModuleType("cupy")
    cupy.ndarray = ndarray  # type: ignore[attr-defined]
    cupy.RawKernel = RawKernel  # type: ignore[attr-defined]
    cupy.RawModule = RawModule  # type: ignore[attr-defined]
    cupy.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
        device=types.SimpleNamespace(get_cublas_handle=lambda: 1),
    )

    def empty(shape: Any, dtype: Any = np.float64) -> ndarray:
        _count("empty")
        return ndarray(shape if isinstance(shape, tuple) else (shape,), dtype)

    cupy.empty = empty  # type: ignore[attr-defined]
    cupy.empty_like = lambda a: empty(a.shape, a.dtype)  # type: ignore[attr-defined]
    cupy.zeros = empty  # type: ignore[attr-defined]
    cupy.zeros_like = lambda a: empty(a.shape, a.dtype)  # type: ignore[attr-defined]
    cupy.ascontiguousarray = lambda a, dtype=None: a  # type: ignore[attr-defined]
    cupy.asarray = lambda a, dtype=None: (  # type: ignore[attr-defined]
        a if isinstance(a, ndarray) else ndarray(np.shape(a), dtype or np.asarray(a).dtype)
    )
    cupy.may_share_memory = lambda a, b: a is b  # type: ignore[attr-defined]

    def take(a: ndarray, rows: ndarray, axis: int = 0, out: ndarray | None = None) -> ndarray:
        _count("take")
        return out if out is not None else ndarray((len(rows), *a.shape[1:]), a.dtype)

    cupy.take = take  # type: ignore[attr-defined]
    cupy.copyto = lambda dst, src: _count("copy")  # type: ignore[attr-defined]
    return cupy


class NullGraph:
    """A captured graph on the null device: its launch is one call, and does nothing."""

    def launch(self, stream: Any = None) -> None:
        _count("launch")


# -- the two steps --------------------------------------------------------------------------

NETS = {
    "784-1024-1024-10 b512 SGD": ([784, 1024, 1024, 10], 512, "sgd"),
    "784-256-128-10 b128 Adam": ([784, 256, 128, 10], 128, "adam"),
}


def steps(cupy: Any, sizes: list[int], batch: int, optimizer: str) -> dict[str, Callable[[], None]]:
    """scratchnn's step and the hand-written one, on the null device."""
    from scratchnn import mlp
    from scratchnn.optim import make_optimizer

    rng = np.random.default_rng(0)
    net = mlp(sizes, rng=rng).to("cuda")
    opt = make_optimizer(optimizer, lr=1e-3)
    x = cupy.empty((batch, sizes[0]), np.float32)
    t = cupy.empty((batch,), np.int64)

    def ours() -> None:
        opt.update(net.params, net._gradient(x, t, wait=False))

    # The replay as fit takes it (TrainingStep.on_rows): the graph's arrays and loss are an
    # eager step's, as a capture leaves them; Adam's table as its warm-up leaves it.
    from scratchnn.steps import _Replay, _StepScalars

    ours()
    scalars = _StepScalars(cupy, opt, net, np.float32) if optimizer == "adam" else None
    replay = _Replay(net, opt, NullGraph(), cupy.empty_like(x), cupy.empty_like(t),
                     net._last_loss, scalars)  # fmt: skip
    x_all = cupy.empty((60000, sizes[0]), np.float32)
    t_all, rows = cupy.empty((60000,), np.int64), cupy.empty((batch,), np.int64)

    def replayed() -> None:
        assert replay.takes_rows(x_all, t_all, rows)  # (as on_rows asks)
        replay.gathered(x_all, t_all, rows)

    Ws = [cupy.empty((a, b), np.float32) for a, b in zip(sizes, sizes[1:])]
    bs = [cupy.empty((b,), np.float32) for b in sizes[1:]]
    kernel = RawKernel()
    n_scalar = np.int64
    gemm = sys.modules["cupy_backends.cuda.libs.cublas"].sgemm
    scalars = np.array([1, 0], np.float32)
    one, zero = scalars.ctypes.data, scalars.ctypes.data + 4

    def product(a: Any, b: Any) -> Any:
        # As kernels.products makes it: a new array, then cuBLAS's gemm on its addresses.
        (n, k), m = a.shape, b.shape[1]
        out = cupy.empty((n, m), np.float32)
        gemm(cupy.cuda.device.get_cublas_handle(), 0, 0, m, n, k, one, b.data.ptr, m,
             a.data.ptr, k, zero, out.data.ptr, m)  # fmt: skip
        return out

    def hand() -> None:
        # Forward: a product per layer; between layers the bias and ReLU's kernel in one
        # (its output in place, and the mask), as Sequential pairs them.
        activations, masks, h = [x], [], x
        for i, W in enumerate(Ws[:-1]):
            h = product(h, W)
            mask = cupy.empty(h.shape, np.bool_)
            kernel((1,), (256,), (h, bs[i], mask, n_scalar(h.shape[0]), n_scalar(h.shape[1])))
            activations.append(h)
            masks.append(mask)
        h = product(h, Ws[-1])
        # The loss's kernel: the last bias added to the scores, softmax, summed loss,
        # bad-label count, and the gradient.
        tc = cupy.ascontiguousarray(t)
        y, result, g = cupy.empty_like(h), cupy.empty(2, np.float64), cupy.empty_like(h)
        kernel((1,), (256,), (cupy.ascontiguousarray(h), tc, y, result, n_scalar(batch),
                              g, np.float32(1 / batch), bs[-1]))  # fmt: skip
        # Backward: db (the column sums' kernel; below the last layer the same kernel
        # passes the gradient through ReLU's mask first), dW and, but for the first
        # layer, dx.
        grads = []
        for i in reversed(range(len(Ws))):
            db = cupy.empty((g.shape[1],), g.dtype)
            if i == len(Ws) - 1:
                kernel((1,), (256,), (g, db, np.int32(g.shape[0]), np.int32(g.shape[1])))
            else:
                through = cupy.empty_like(g)
                kernel((1,), (256,), (g, masks[i], through, db, np.int32(g.shape[0]),
                                      np.int32(g.shape[1])))  # fmt: skip
                g = through
            grads += [product(activations[i].T, g), db]
            if i:
                g = product(g, Ws[i].T)
        # The optimiser: one launch for every parameter, as PyTorch's multi-tensor step.
        kernel((1,), (256,), (*Ws, *bs, *grads, np.float32(1e-3)))

    return {"scratchnn": ours, "hand-written": hand, "scratchnn, replayed": replayed}


def calls_per_step(step: Callable[[], None]) -> dict[str, int]:
    """The device calls of one step (arrays made on the host side, views, not counted)."""
    step()
    calls.clear()
    step()
    return {kind: n for kind, n in calls.items() if kind != "array"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=positive_int, default=7)
    args = parser.parse_args()
    sys.modules["cupy"] = cupy = null_cupy()
    for name in ("cupy_backends", "cupy_backends.cuda", "cupy_backends.cuda.libs"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["cupy_backends.cuda.libs.cublas"] = null_cublas()
    print(machine_report())
    print("null device: CuPy's calls cost a Python call each; kernels do nothing\n")
    rows = []
    for name, (sizes, batch, optimizer) in NETS.items():
        contenders = steps(cupy, sizes, batch, optimizer)
        counted = {who: calls_per_step(step) for who, step in contenders.items()}
        timing = paired_rounds(contenders, rounds=args.rounds)
        ours, hand = timing.median("scratchnn"), timing.median("hand-written")
        replayed = timing.median("scratchnn, replayed")
        device = {
            who: ", ".join(f"{n} {kind}" for kind, n in sorted(c.items()))
            for who, c in counted.items()
        }
        rows.append([name, format_seconds(ours), format_seconds(hand),
                     format_seconds(ours - hand), f"{timing.ratio('scratchnn', 'hand-written'):.2f}",
                     device["scratchnn"], format_seconds(replayed),
                     f"{timing.ratio('scratchnn, replayed', 'hand-written'):.2f}",
                     device["scratchnn, replayed"]])  # fmt: skip
        if counted["scratchnn"] != counted["hand-written"]:
            print(f"{name}: the steps differ in device calls; hand-written: {device['hand-written']}")
    print_table(
        ["step", "scratchnn", "hand-written", "scratchnn's own", "ratio", "device calls per step",
         "replayed", "replayed / hand-written", "device calls per replay"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
