"""Each fused kernel alone, forward and backward apart, in several launch shapes, on a GPU.

    python3 benchmarks/gpu_kernels.py [--repeats 30] [--log2n 26]

``benchmarks/gpu.py`` times an activation's forward and backward together, as a
layer runs them. Where that misses, this says which kernel and why: each
activation's forward and backward kernels at 2**26 float32 against PyTorch's
own forward and backward operators (``torch.ops.aten.*_backward``, what its
autograd calls), each run in several launch shapes:

* ``u1``, ``u2``, ``u4``: 16-byte vectors a thread, all loaded before any
  arithmetic (``scratchnn.kernels.cuda.vectors_per_thread``), blocks of 256;
* ``b128``: blocks of 128 threads (PyTorch's element-wise size);
* ``fast``: ``u1`` compiled with ``--use_fast_math``. Not exact, so never
  used; it only shows whether arithmetic rather than memory limits a kernel.

The optimisers' SGD and Adam steps run in the same shapes (they share the
generator), against the device copy. Every variant's outputs are first checked
against the library's own launch on the same inputs: bit for bit, except
``fast`` (its largest relative difference is shown). Each time is the median of
``--repeats`` CUDA-event runs; the table, printed last, gives each variant's
time as a ratio to PyTorch's (to the copy's for the optimisers), and the
registers a thread of each kernel takes.
It runs from a checkout: ``PYTHONPATH=src python3 benchmarks/gpu_kernels.py``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu import CudaClock, activation_inputs, gpu_unavailable_reason

from scratchnn.cli import positive_int
from scratchnn.kernels import OPS, cuda


@dataclass(frozen=True)
class Variant:
    name: str
    per_thread: int
    block: int
    options: tuple[str, ...] = ()

    @property
    def exact(self) -> bool:
        return not self.options


VARIANTS = (
    Variant("u1", 1, 256),
    Variant("u2", 2, 256),
    Variant("u4", 4, 256),
    Variant("b128", 1, 128),
    Variant("u2b128", 2, 128),
    Variant("fast", 1, 256, ("--use_fast_math",)),
)

# (label, op prefix in scratchnn.kernels.OPS, scalars, PyTorch forward, PyTorch backward).
# The backward takes (dout, x, y), PyTorch's tensors, and calls the operator autograd calls.
Torch = Callable[..., Any]
KERNELS: list[tuple[str, str, dict[str, float], Callable[[Any], Torch], Callable[[Any], Torch]]] = [
    ("Relu", "relu", {}, lambda t: t.relu,
     lambda t: lambda g, x, y: t.ops.aten.threshold_backward(g, y, 0.0)),
    ("Sigmoid", "sigmoid", {}, lambda t: t.sigmoid,
     lambda t: lambda g, x, y: t.ops.aten.sigmoid_backward(g, y)),
    ("Tanh", "tanh", {}, lambda t: t.tanh,
     lambda t: lambda g, x, y: t.ops.aten.tanh_backward(g, y)),
    ("LeakyRelu", "leaky_relu", {"alpha": 0.01},
     lambda t: lambda x: t.nn.functional.leaky_relu(x, 0.01),
     lambda t: lambda g, x, y: t.ops.aten.leaky_relu_backward(g, x, 0.01, False)),
    ("Elu", "elu", {"alpha": 1.0}, lambda t: t.nn.functional.elu,
     lambda t: lambda g, x, y: t.ops.aten.elu_backward(g, 1.0, 1.0, 1.0, False, x)),
    ("Gelu", "gelu", {}, lambda t: t.nn.functional.gelu,
     lambda t: lambda g, x, y: t.ops.aten.gelu_backward(g, x, approximate="none")),
    ("Gelu(tanh)", "gelu_tanh", {},
     lambda t: lambda x: t.nn.functional.gelu(x, approximate="tanh"),
     lambda t: lambda g, x, y: t.ops.aten.gelu_backward(g, x, approximate="tanh")),
    ("Softplus", "softplus", {"beta": 1.0}, lambda t: t.nn.functional.softplus,
     lambda t: lambda g, x, y: t.ops.aten.softplus_backward(g, x, 1.0, 20.0)),
    ("Silu", "silu", {}, lambda t: t.nn.functional.silu,
     lambda t: lambda g, x, y: t.ops.aten.silu_backward(g, x)),
]  # fmt: skip

STEPS: list[tuple[str, dict[str, float]]] = [
    ("sgd", {"lr": 1e-3}),
    ("adam", {"beta1": 0.9, "one_minus_beta1": 0.1, "beta2": 0.999, "one_minus_beta2": 0.001,
              "inv_scale": 1.0, "eps_scaled": 1e-8}),
]  # fmt: skip


@dataclass
class Row:
    what: str
    peer: str
    peer_ms: float
    ms: dict[str, float]
    registers: dict[str, int]
    fast_error: float = 0.0


class Runner:
    """Compiles and launches one op in one variant on CuPy arrays, as ``cuda.launch`` does
    but with the variant's vectors a thread, block and compiler options."""

    def __init__(self, cupy: Any, op_name: str, variant: Variant) -> None:
        self.cupy, self.op, self.variant = cupy, OPS[op_name], variant
        source = cuda.source(self.op, np.float32, variant.per_thread)
        self.kernel = cupy.RawKernel(source, self.op.name, options=variant.options)

    def __call__(self, arrays: list[Any], scalars: dict[str, float]) -> list[Any]:
        first, op = arrays[0], self.op
        if first.size % 4:
            raise ValueError("the element count must be a multiple of 4 (the vector path)")
        args = list(arrays)
        for is_mask in op.fresh_outputs:
            args.append(self.cupy.empty(first.shape, dtype=np.bool_ if is_mask else np.float32))
        items = first.size // 4
        grid = max(1, -(-items // (self.variant.block * self.variant.per_thread)))
        kernel_args = [*args, *[np.float32(scalars[name]) for name in op.scalars]]
        kernel_args += [np.int64(first.size), np.int32(1)]
        self.kernel((grid,), (self.variant.block,), tuple(kernel_args))
        return [args[i] for i in op.output_positions]

    def registers(self) -> int:
        attributes = getattr(self.kernel, "attributes", None)
        return int(attributes["num_regs"]) if isinstance(attributes, dict) else 0


def _check(cupy: Any, op_name: str, runners: dict[str, Runner], arrays: list[Any],
           scalars: dict[str, float]) -> float:  # fmt: skip
    """Each variant's outputs against the library's own launch, on copies of ``arrays``:
    raises on an exact variant that differs; returns fast-math's largest relative error."""
    op = OPS[op_name]
    expected = cuda.launch(cupy, op, [a.copy() for a in arrays], scalars)
    fast_error = 0.0
    for name, runner in runners.items():
        got = runner([a.copy() for a in arrays], scalars)
        for output, want, have in zip(op.outputs, expected, got):
            if runner.variant.exact:
                equal = cupy.all((want == have) | ((want != want) & (have != have)))
                if not bool(equal):
                    raise AssertionError(f"{op_name} {name}: {output} differs from cuda.launch")
            elif want.dtype != np.bool_:
                scale = cupy.maximum(cupy.abs(want), 1e-30)
                error = cupy.nanmax(cupy.abs(have - want) / scale)
                fast_error = max(fast_error, float(error))
    return fast_error


def _time_variants(clock: Any, runners: dict[str, Runner], arrays: list[Any],
                   scalars: dict[str, float], repeats: int) -> tuple[dict[str, float], dict[str, int]]:  # fmt: skip
    """Each variant's median time on ``arrays``, and its registers a thread."""
    ms = {
        name: clock.cupy_ms(partial(runner, arrays, scalars), repeats)
        for name, runner in runners.items()
    }
    return ms, {name: runner.registers() for name, runner in runners.items()}


def time_kernels(cupy: Any, torch: Any, repeats: int, clock: Any, n: int) -> list[Row]:
    x, dout, tx, tg = activation_inputs(cupy, torch, clock, n)  # as benchmarks/gpu.py's
    copy_target = cupy.empty_like(x)
    copy_ms = clock.cupy_ms(lambda: cupy.copyto(copy_target, x), repeats)
    rows = [Row("device copy (read+write)", "", copy_ms, {}, {})]
    for label, prefix, scalars, torch_forward, torch_backward in KERNELS:
        forward, backward = f"{prefix}_forward", f"{prefix}_backward"
        # What the backward reads: the forward's outputs (y, mask) and x, by name.
        kept = dict(zip(OPS[forward].outputs, cuda.launch(cupy, OPS[forward], [x], scalars)))
        available = {"x": x, "dout": dout, **kept}
        with torch.no_grad():
            ty = torch_forward(torch)(tx)
        their_forward, their_backward = torch_forward(torch), torch_backward(torch)
        torch_fns: dict[str, Callable[[], Any]] = {
            forward: partial(their_forward, tx),
            backward: partial(their_backward, tg, tx, ty),
        }
        for op_name in (forward, backward):
            arrays = [available[name] for name in OPS[op_name].inputs]
            runners = {v.name: Runner(cupy, op_name, v) for v in VARIANTS}
            fast_error = _check(cupy, op_name, runners, arrays, scalars)
            with torch.no_grad():
                peer_ms = clock.torch_ms(torch_fns[op_name], repeats)
            ms, regs = _time_variants(clock, runners, arrays, scalars, repeats)
            direction = "fwd" if op_name == forward else "bwd"
            rows.append(Row(f"{label} {direction}", "PyTorch", peer_ms, ms, regs, fast_error))
            print(_line(rows[-1]), flush=True)
    for step, scalars in STEPS:
        op = OPS[step]
        arrays = [x.copy() for _ in op.inputs]  # p, g and the moments: fresh, not zeros
        if step == "adam":
            arrays[3] = cupy.abs(arrays[3])  # v, a sum of squares, is never negative
        runners = {v.name: Runner(cupy, step, v) for v in VARIANTS}
        fast_error = _check(cupy, step, runners, arrays, scalars)
        ms, regs = _time_variants(clock, runners, arrays, scalars, repeats)
        rows.append(Row(f"{step} step", "copy", copy_ms, ms, regs, fast_error))
        print(_line(rows[-1]), flush=True)
    return rows


def _line(row: Row) -> str:
    cells = [f"{row.what:<18}", f"{row.peer:>7} {row.peer_ms:7.3f}"]
    for variant in VARIANTS:
        if variant.name in row.ms:
            ratio = row.ms[variant.name] / row.peer_ms
            regs = row.registers.get(variant.name) or "?"
            cells.append(f"{ratio:5.2f} ({regs:>2})")
    if row.ms:
        cells.append(f"{row.fast_error:.1e}")
    return "  ".join(cells)


def table(rows: list[Row]) -> str:
    head = [f"{'kernel':<18}", f"{'peer':>7} {'ms':>7}"]
    head += [f"{v.name:>5} (rg)" for v in VARIANTS] + ["fast err"]
    return "\n".join(["  ".join(head), *(_line(row) for row in rows)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=30)
    parser.add_argument("--log2n", type=positive_int, default=26,
                        help="the element count as a power of two (at least 2)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.log2n < 2:
        parser.error("--log2n must be at least 2 (the vector path takes 4 elements)")
    reason = gpu_unavailable_reason()
    if reason is not None:
        print(f"no GPU timings: {reason}")
        return 0
    import cupy
    import torch

    rows = time_kernels(cupy, torch, args.repeats, CudaClock(cupy, torch), 2**args.log2n)
    print(f"\ncard: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}; "
          f"CuPy {cupy.__version__}, PyTorch {torch.__version__}")  # fmt: skip
    print("ms: median of CUDA-event runs; each variant: its time / the peer's (registers)")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
