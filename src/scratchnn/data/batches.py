"""Mini-batches for training: shuffled with an explicit NumPy Generator, never global state."""

from __future__ import annotations

import operator
from collections.abc import Iterator
from typing import Any

import numpy as np

from scratchnn import _checks
from scratchnn.backend import device_of, to_device


def iterate_minibatches(
    x: Any,
    t: Any,
    batch_size: int,
    *,
    shuffle: bool = True,
    rng: np.random.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Any, Any]]:
    """Yield ``(x_batch, t_batch)`` pairs that cover ``x`` and ``t`` along their first axis.

    With ``shuffle`` the order is a permutation drawn from ``rng`` (a fresh,
    unseeded Generator when None), so the same seed gives the same batches bit
    for bit; NumPy's global random state is neither used nor changed. Without
    ``shuffle`` batches are views in the original order. The last batch is
    smaller when ``batch_size`` does not divide the number of samples, unless
    ``drop_last`` drops it.

    Arguments are checked when called, not on the first batch: ``TypeError``
    for a non-integer ``batch_size`` or an ``rng`` that is not a
    ``numpy.random.Generator``; ``ValueError`` for ``batch_size < 1``, 0-d
    arrays, or ``x`` and ``t`` of different lengths.

    >>> x, t = np.arange(10).reshape(5, 2), np.arange(5)
    >>> [tb.tolist() for _, tb in iterate_minibatches(x, t, 2, shuffle=False)]
    [[0, 1], [2, 3], [4]]
    >>> batches = iterate_minibatches(x, t, 2, rng=np.random.default_rng(0), drop_last=True)
    >>> [tb.shape for _, tb in batches]
    [(2,), (2,)]
    """
    x, t, rows = _checked(x, t, batch_size, shuffle, rng, drop_last, "iterate_minibatches")
    return ((x[batch], t[batch]) for batch in rows)


def minibatch_rows(
    x: Any,
    t: Any,
    batch_size: int,
    *,
    shuffle: bool = True,
    rng: np.random.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[Any]:
    """The rows of ``x`` and ``t`` that each batch of :func:`iterate_minibatches` holds,
    for the same arguments (the same ``rng`` state gives the same batches): an array of
    indices on the data's device, or without ``shuffle`` a slice. For a caller that
    gathers the rows itself: ``fit``'s steps on a GPU gather them straight into the
    arrays a CUDA graph reads (:meth:`scratchnn.steps.TrainingStep.on_rows`). Checked
    as :func:`iterate_minibatches` checks its arguments.

    >>> x, t = np.arange(10).reshape(5, 2), np.arange(5)
    >>> [t[rows].tolist() for rows in minibatch_rows(x, t, 2, rng=np.random.default_rng(0))]
    [[2, 4], [3, 0], [1]]
    >>> [tb.tolist() for _, tb in iterate_minibatches(x, t, 2, rng=np.random.default_rng(0))]
    [[2, 4], [3, 0], [1]]
    """
    return _checked(x, t, batch_size, shuffle, rng, drop_last, "minibatch_rows")[2]


def _checked(
    x: Any, t: Any, batch_size: int, shuffle: bool, rng: Any, drop_last: bool, who: str
) -> tuple[Any, Any, Iterator[Any]]:
    """``x`` and ``t`` as arrays, and each batch's rows (checked at once, not at the first
    batch)."""
    shuffle = _checks.flag(who, "shuffle", shuffle)
    drop_last = _checks.flag(who, "drop_last", drop_last)
    if isinstance(batch_size, bool):
        raise TypeError("batch_size must be an integer, got a bool")
    try:
        size = operator.index(batch_size)
    except TypeError:
        raise TypeError(f"batch_size must be an integer, got {type(batch_size).__name__}") from None
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    _checks.given_generator(who, rng, or_none=True)
    # Arrays of any module (NumPy, CuPy) pass as they are; lists become NumPy arrays.
    x = x if hasattr(x, "shape") else _as_numpy(x, "x")
    t = t if hasattr(t, "shape") else _as_numpy(t, "t")
    if len(x.shape) == 0 or len(t.shape) == 0:
        raise ValueError("x and t must have at least one dimension, the samples")
    if x.shape[0] != t.shape[0]:
        raise ValueError(f"x has {x.shape[0]} samples but t has {t.shape[0]}")
    order = None
    if shuffle:
        order = (rng if rng is not None else np.random.default_rng()).permutation(x.shape[0])
        # Drawn on the host (the same seed gives the same batches on every device), then
        # moved once to the data's device: CuPy indexes only with its own arrays.
        order = to_device(order, device_of(x))
    return x, t, _rows(x.shape[0], size, order, drop_last)


def _as_numpy(value: Any, name: str) -> np.ndarray:
    try:
        return np.asarray(value)
    except ValueError as error:
        # NumPy's "inhomogeneous shape" message does not say which argument.
        raise ValueError(f"{name} is not a rectangular array: {error}") from None


def _rows(n: int, size: int, order: Any, drop_last: bool) -> Iterator[Any]:
    """Each batch's rows: slices in order (views), or runs of ``order``."""
    stop = n - n % size if drop_last else n
    for start in range(0, stop, size):
        yield slice(start, start + size) if order is None else order[start : start + size]
