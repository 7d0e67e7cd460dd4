"""Regenerate the figures of docs/backprop-figures.md and docs/backprop-figures.ja.md.

Run from the repository root (needs Graphviz's ``dot`` for the SVGs and
matplotlib for the activations figure):

    .venv/bin/python docs/figures/make_figures.py

Every number in the figures comes from scratchnn's nodes and layers running
forward and backward; the titles are left off, because the pages say in
their own language what each figure shows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from scratchnn import mlp
from scratchnn.activation_plot import plot_activations
from scratchnn.graph import (
    Drawing,
    add_drawing,
    mul_drawing,
    network_drawing,
    relu_drawing,
    sigmoid_drawing,
)

HERE = Path(__file__).resolve().parent

# x = 1 and dL/dy = 1, as in the step table of `scratchnn demo` (docs/sigmoid-graph.md).
X, DOUT = 1.0, 1.0


def network() -> Drawing:
    """A 2-3-2 network on one example, small enough to show every value."""
    rng = np.random.default_rng(0)
    net = mlp([2, 3, 2], rng=rng, dtype=np.float64)
    return network_drawing(net, np.array([[1.0, -0.5]]), np.array([1]), max_values=6)


def main() -> None:
    drawings = {
        "sigmoid-step0": sigmoid_drawing(X, DOUT, step=0),
        **{f"sigmoid-step{k}": sigmoid_drawing(X, DOUT, step=k) for k in range(1, 5)},
        "sigmoid-grouped": sigmoid_drawing(X, DOUT, form="grouped"),
        "relu-on": relu_drawing(2.0, DOUT),
        "relu-off": relu_drawing(-1.0, DOUT),
        "mul-apple": mul_drawing(),
        "add-apple-orange": add_drawing(),
        "network": network(),
    }
    for name, drawing in drawings.items():
        path = dataclasses.replace(drawing, title="").save(HERE / f"{name}.svg")
        print(f"wrote {path.relative_to(HERE.parent.parent)}")
    path = plot_activations(HERE / "activations.png")
    print(f"wrote {path.relative_to(HERE.parent.parent)}")


if __name__ == "__main__":
    main()
