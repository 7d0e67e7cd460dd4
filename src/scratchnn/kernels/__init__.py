"""Fused element-wise kernels: each operation written once, run in one pass on the GPU.

:func:`run` is the entry point the layers use, :func:`run_many` the
optimisers' (one launch for all the parameters). They pick the fused CUDA
kernel (:mod:`scratchnn.kernels.cuda`) for CuPy arrays of float32 or float64
when CuPy can compile kernels, and otherwise evaluate the same operation with
the arrays' own module (:mod:`scratchnn.kernels.ops`).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

import numpy as np

from scratchnn.backend import get_array_module
from scratchnn.kernels import cuda  # (plain text and NumPy: it imports no CuPy)
from scratchnn.kernels.ops import OPS, Op, evaluate

__all__ = ["OPS", "Op", "run", "run_many"]


def run(name: str, *arrays: Any, **scalars: float) -> list[Any]:
    """Run the operation ``name`` of ``OPS`` on ``arrays`` (one shape) with ``scalars``.

    Returns the outputs in the op's order; outputs that are also inputs (an
    optimiser's parameter and state) are updated in place.
    """
    op = OPS[name]
    _check_count(op, arrays)
    xp = get_array_module(*arrays)
    ready = _ready_for_cuda(op, xp, arrays) if _kernels_take(xp, arrays[0].dtype) else None
    if ready is not None:
        return cuda.launch(xp, op, ready, scalars)
    return evaluate(op, xp, list(arrays), scalars)


def run_many(
    name: str, tensors: Sequence[Sequence[Any]], **scalars: float | cuda.DeviceScalar
) -> None:
    """Run the in-place operation ``name`` (an optimiser's step) over several tensors, each
    its arrays in the op's order: on the GPU one launch for up to eight of them, where
    :func:`run` would launch once per tensor; elsewhere :func:`run` on each. A scalar may
    be a :class:`~scratchnn.kernels.cuda.DeviceScalar` on the GPU's path only."""
    op = OPS[name]
    if not tensors:
        return
    for arrays in tensors:
        _check_count(op, arrays)
    xp = get_array_module(*tensors[0])
    if _kernels_take(xp, tensors[0][0].dtype):
        # Each tensor's arrays of the first one's dtype: one launch takes one dtype.
        dtype = tensors[0][0].dtype
        ready = [_ready_for_cuda(op, xp, arrays, dtype) for arrays in tensors]
        if None not in ready:
            cuda.launch_many(xp, op, ready, scalars)  # type: ignore[arg-type]
            return
    by_value = {
        key: value for key, value in scalars.items() if not isinstance(value, cuda.DeviceScalar)
    }
    if len(by_value) < len(scalars):
        raise TypeError(
            f"kernels: {name}'s scalars read from the GPU take its fused CUDA kernel, which "
            "these arrays cannot run (another module, dtype or layout)"
        )
    for arrays in tensors:
        run(name, *arrays, **by_value)


def _check_count(op: Op, arrays: Sequence[Any]) -> None:
    # A kernel takes its arguments by position and CuPy does not count them: one array
    # too many or too few would shift every later one.
    if len(arrays) != len(op.inputs):
        raise TypeError(
            f"kernels: {op.name} takes {len(op.inputs)} arrays ({', '.join(op.inputs)}), "
            f"got {len(arrays)}"
        )


def _kernels_take(xp: ModuleType, dtype: Any) -> bool:
    """Whether the fused CUDA kernels run for arrays of ``xp`` and ``dtype``: CuPy with its
    compiler, float32 or float64."""
    return cuda.compiles(xp) and cuda.supported_dtype(dtype)


def _ready_for_cuda(
    op: Op, xp: ModuleType, arrays: Sequence[Any], dtype: Any = None
) -> list[Any] | None:
    """``arrays`` as the fused CUDA kernel takes them (where :func:`_kernels_take` their
    module and dtype), or None where it cannot run: shapes that differ, dtypes other than
    the first array's (or ``dtype``, one for all of :func:`run_many`'s tensors), an array
    updated in place that is not C-contiguous."""
    shape = arrays[0].shape
    if dtype is None:
        dtype = arrays[0].dtype
    ready = list(arrays)
    # A plain loop over roles worked out once: this runs for every kernel a step launches.
    for i, (array, (is_mask, in_place)) in enumerate(zip(arrays, op.input_roles)):
        # A kernel reads every array as the first one's size: a mask of another shape (or
        # not of bools) would be read out of bounds, where the array calls broadcast or refuse.
        if array.shape != shape or array.dtype != (np.bool_ if is_mask else dtype):
            return None
        if not array.flags.c_contiguous:
            if in_place:
                return None
            ready[i] = xp.ascontiguousarray(array)  # only read: any layout, made contiguous once
    return ready
