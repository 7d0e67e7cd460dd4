"""Fused element-wise kernels: each operation written once, run in one pass on the GPU.

:func:`run` is the one entry point the layers and optimisers use. It picks the
fused CUDA kernel (:mod:`scratchnn.kernels.cuda`) for CuPy arrays of float32
or float64 when CuPy can compile kernels, and otherwise evaluates the same
operation with the arrays' own module (:mod:`scratchnn.kernels.ops`).
"""

from __future__ import annotations

from typing import Any

from scratchnn.backend import get_array_module
from scratchnn.kernels.ops import OPS, Op, evaluate

__all__ = ["OPS", "Op", "run"]


def run(name: str, *arrays: Any, **scalars: float) -> list[Any]:
    """Run the operation ``name`` of ``OPS`` on ``arrays`` (one shape) with ``scalars``.

    Returns the outputs in the op's order; outputs that are also inputs (an
    optimiser's parameter and state) are updated in place.
    """
    op = OPS[name]
    xp = get_array_module(*arrays)
    if xp.__name__ == "cupy" and hasattr(xp, "RawKernel"):
        from scratchnn.kernels import cuda

        first = arrays[0]
        floats = [a for a, n in zip(arrays, op.inputs) if n not in op.masks]
        if cuda.supported_dtype(first.dtype) and all(
            a.dtype == first.dtype and a.shape == first.shape for a in floats
        ):
            in_place = set(op.inputs) & set(op.outputs)
            if all(a.flags.c_contiguous for a, n in zip(arrays, op.inputs) if n in in_place):
                # Inputs that are only read may be any layout: made contiguous, once.
                ready = [
                    a if n in in_place else xp.ascontiguousarray(a)
                    for a, n in zip(arrays, op.inputs)
                ]
                return cuda.launch(xp, op, ready, scalars)
    return evaluate(op, xp, list(arrays), scalars)
