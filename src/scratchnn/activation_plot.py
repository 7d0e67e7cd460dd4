"""Every element-wise activation of :mod:`scratchnn.layers` and its derivative, in one figure.

The derivative is not a formula: it is what each layer's own ``backward``
returns for ``dout = 1``, so the figure shows what training would use.
matplotlib is imported only when the figure is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from scratchnn.models import ACTIVATIONS
from scratchnn.plots import _pyplot, save_figure_atomically

# Softmax mixes the elements of a row, so it has no curve y = f(x) of one input.
_NOT_ELEMENTWISE = frozenset({"softmax"})


class Curve(NamedTuple):
    """One activation on a grid: its name, the inputs, its outputs and its derivative."""

    name: str
    x: np.ndarray
    y: np.ndarray
    dy: np.ndarray


def activation_curves(x: Sequence[float] | np.ndarray | None = None) -> list[Curve]:
    """Run each element-wise activation forward on ``x`` and backward with ``dout = 1``.

    ``x`` defaults to 801 points in [-4, 4]. The activations are those a
    ready-made network can use (:data:`scratchnn.models.ACTIVATIONS`) except
    softmax, with their default settings.

    >>> curves = activation_curves([-1.0, 0.0, 2.0])
    >>> relu = next(c for c in curves if c.name == "relu")
    >>> print(relu.y, relu.dy)
    [0. 0. 2.] [0. 0. 1.]
    """
    grid = np.linspace(-4.0, 4.0, 801) if x is None else np.asarray(x, dtype=np.float64)
    if grid.ndim != 1 or grid.size < 2 or not np.isfinite(grid).all():
        raise ValueError(
            f"activation_curves: x must be a 1-D grid of at least 2 finite points, "
            f"got shape {grid.shape}"
        )
    curves = []
    for name, make in ACTIVATIONS.items():
        if name in _NOT_ELEMENTWISE:
            continue
        layer = make()
        y = np.asarray(layer.forward(grid))
        dy = np.asarray(layer.backward(np.ones_like(y)))
        curves.append(Curve(name, grid, y, dy))
    return curves


def plot_activations(
    path: str | os.PathLike[str] = "activations.png",
    x: Sequence[float] | np.ndarray | None = None,
) -> Path:
    """Write one image: a panel per activation with ``f(x)`` and ``f'(x)`` (from ``backward``).

    The format follows the suffix of ``path`` (``.png`` by default, ``.svg``,
    ``.pdf``); another suffix raises ``ValueError``. Returns the path written
    (atomically). Needs matplotlib (``scratchnn[train]``).
    """
    curves = activation_curves(x)
    plt = _pyplot()
    columns = 4
    rows = -(-len(curves) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.7 * rows), squeeze=False)
    panels: list[Any] = list(axes.flat)
    for axis, curve in zip(panels, curves):
        axis.axhline(0.0, color="#bdbdbd", linewidth=0.8)
        axis.axvline(0.0, color="#bdbdbd", linewidth=0.8)
        axis.plot(curve.x, curve.y, color="#1a1a1a", linewidth=1.8, label="f(x): forward")
        axis.plot(
            curve.x,
            curve.dy,
            color="#c62828",
            linewidth=1.5,
            linestyle="--",
            label="f'(x): backward(1)",
        )
        axis.set_title(curve.name)
        axis.grid(True, alpha=0.3)
    for axis in panels[len(curves) :]:
        axis.axis("off")
    handles, labels = panels[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, frameon=False)
    figure.suptitle("Activations of scratchnn.layers and their derivatives from backward")
    figure.tight_layout(rect=(0.0, 0.05, 1.0, 1.0))
    save_figure_atomically(figure, path)  # (Path("") would be ".": it checks the path as given)
    return Path(path)
