"""Dropout: inverted, seeded, with its mask packed to one bit per element."""

from __future__ import annotations

import math

import numpy as np

from scratchnn import _checks
from scratchnn.backend import device_of, get_array_module, to_compute, to_device
from scratchnn.layers.base import Layer


class Dropout(Layer):
    """Inverted dropout: zero each element with probability ``p`` while training.

    Training: ``y = x * mask / (1 - p)`` with ``mask`` drawn afresh each
    forward, 1 with probability ``1 - p``; ``dx = dout * mask / (1 - p)``.
    Evaluation (``training = False``): ``y = x``, ``dx = dout``.

    Unlike the book's ``Dropout``, which scales by ``1 - p`` at evaluation
    time, the scaling happens while training (as PyTorch's), so the trained
    network runs unchanged. ``p = 1`` gives zeros; ``p = 0`` the identity.

    The mask is drawn from ``rng``, a ``numpy.random.Generator`` the caller
    seeds, never from global state: the same seed drops the same elements of
    inputs of one precision (float16 and float32 inputs draw float32 uniforms,
    float64 inputs float64 ones, so a float64 run drops others).
    Keeps the mask packed with ``np.packbits``, one bit per element (8 times
    less than a bool array, as ``Relu(packed=True)``); ``mask`` unpacks it.

    Shape: any; the output has the input's shape and floating dtype.

    >>> drop = Dropout(0.5, rng=np.random.default_rng(0))
    >>> drop
    Dropout(p=0.5)
    >>> print(drop.forward(np.ones((2, 4))))
    [[2. 0. 0. 0.]
     [2. 2. 2. 2.]]
    >>> print(drop.backward(np.full((2, 4), 3.0)))
    [[6. 0. 0. 0.]
     [6. 6. 6. 6.]]
    >>> drop.training = False
    >>> print(drop.forward(np.ones((1, 4))))
    [[1. 1. 1. 1.]]
    """

    hyperparameters = ("p",)

    def __init__(self, p: float = 0.5, *, rng: np.random.Generator) -> None:
        super().__init__()
        _checks.given_generator("Dropout", rng)
        self.p = _checks.fraction("Dropout", "p", p, one=True)
        self.rng = rng
        self.training = True
        self._mask: np.ndarray | None = None  # packed bits, 1 = kept
        self._mask_shape: tuple[int, ...] = ()
        self._dropped = False  # whether the last forward dropped (trained) or passed through

    @property
    def mask(self) -> np.ndarray | None:
        """Bool array of the last training forward, True where the element was kept; else None."""
        if self._mask is None:
            return None
        size = math.prod(self._mask_shape)
        if not isinstance(self._mask, np.ndarray):  # CuPy's unpackbits has no count
            bits = get_array_module(self._mask).unpackbits(self._mask)[:size]
            return bits.reshape(self._mask_shape).view(bool)
        return np.unpackbits(self._mask, count=size).reshape(self._mask_shape).view(bool)

    def _scale(self, values: np.ndarray, keep: np.ndarray) -> np.ndarray:
        z = to_compute(values)
        # 1/(1-p) as one factor rounded once to the compute dtype (PyTorch divides by 1-p
        # rounded to the dtype: up to 2 ulp apart); p = 1 keeps nothing, so no division by 0.
        factor = z.dtype.type(0.0 if self.p == 1.0 else 1.0 / (1.0 - self.p))
        return z * (keep * factor)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        self._dropped = self.training
        if not self.training:
            self._mask = None
            view = x.view()
            if isinstance(view, np.ndarray):  # CuPy arrays cannot be made read-only
                view.flags.writeable = False
            return view
        # Draw in float32 for float32 and float16 inputs: half the bytes of float64 draws.
        draw_dtype = np.float64 if x.dtype == np.float64 else np.float32
        keep = self.rng.random(x.shape, dtype=draw_dtype) >= self.p
        # Drawn on the host from the run's generator (the same masks on every device).
        keep = to_device(keep, device_of(x))
        # Keeps only the mask, packed: backward needs nothing else.
        self._mask, self._mask_shape = get_array_module(keep).packbits(keep), keep.shape
        return self._scale(x, keep).astype(x.dtype, copy=False)

    def _backward(self, dout: np.ndarray) -> np.ndarray:
        if not self._dropped:
            return dout.copy()
        keep = self.mask
        assert keep is not None
        return self._scale(dout, keep)
