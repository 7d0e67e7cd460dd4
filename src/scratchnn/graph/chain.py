"""A chain of single-input nodes, run forward and backward one step at a time.

The seed draws the sigmoid as four nodes in a row, ``x → ×-1 → exp → +1 → / → y``,
and walks its backward pass in four steps. :class:`Chain` does exactly that
and keeps every edge's forward value and gradient, so that a learner (or a
drawing) can read them back: edge 0 is the input ``x``, edge ``i`` the output
of node ``i - 1``, the last edge the output ``y``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from scratchnn.backend import device_of
from scratchnn.graph.nodes import AddConstLayer, ExpLayer, MulConstLayer, ReciprocalLayer
from scratchnn.layers.base import Layer


class Edge(NamedTuple):
    """One edge of a chain: its name, its forward value, and its gradient (None until reached)."""

    name: str
    value: np.ndarray | None
    grad: np.ndarray | None


def _check_on_cpu(array: Any) -> None:
    if device_of(array) != "cpu":
        # Its values are for reading and drawing, and CuPy arrays cannot be made read-only.
        raise TypeError(
            "Chain runs on the CPU (it keeps its values for drawing): move the array there "
            "with scratchnn.backend.to_host"
        )


def _frozen(array: Any) -> np.ndarray:
    """A read-only array of ``array``'s values, private to the chain."""
    _check_on_cpu(array)
    frozen = np.array(array, copy=True)
    frozen.flags.writeable = False
    return frozen


class Chain:
    """Single-input nodes applied one after another: ``y = f_n(... f_2(f_1(x)))``.

    ``forward(x)`` runs the nodes in order; ``backward(dout, steps=K)`` runs the
    first ``K`` backward steps (all by default), from the last node towards
    the first, so that step 1 is the last node's. ``values``, ``grads`` and
    ``edges`` read back what each edge carried.

    ``names`` names the ``len(nodes) + 1`` edges (default ``x``, ``h1``, ...,
    ``y``). ``dout`` must have the output's shape, or be a scalar, which then
    stands for that value at every element of the output.

    >>> chain = sigmoid_chain()
    >>> print(chain.forward(0.0))
    0.5
    >>> print(chain.backward(1.0, steps=1))  # through the "/" node: times -y**2
    -0.25
    >>> [(e.name, float(e.value), None if e.grad is None else float(e.grad))
    ...  for e in chain.edges]  # doctest: +NORMALIZE_WHITESPACE
    [('x', 0.0, None), ('-x', -0.0, None), ('exp(-x)', 1.0, None),
     ('1+exp(-x)', 2.0, -0.25), ('y', 0.5, 1.0)]
    >>> print(chain.backward(1.0))  # all four steps: y (1 - y)
    0.25
    """

    def __init__(self, nodes: Sequence[Layer], names: Sequence[str] | None = None) -> None:
        self.nodes: tuple[Layer, ...] = tuple(nodes)
        for node in self.nodes:
            if not isinstance(node, Layer) or node.n_inputs != 1:
                raise TypeError(f"Chain takes single-input layers, got {node!r}")
        if len({id(node) for node in self.nodes}) != len(self.nodes):
            # A node keeps the state of its last forward only: used twice, its first
            # use would backpropagate with the second's inputs, a wrong gradient.
            raise ValueError("Chain: a node appears twice; give each place its own node")
        n = len(self.nodes)
        if names is None:
            names = ["x", *(f"h{i}" for i in range(1, n)), "y"] if n else ["x"]
        self.names: tuple[str, ...] = tuple(names)
        if len(self.names) != n + 1:
            raise ValueError(f"Chain: {n} nodes have {n + 1} edges, got {len(self.names)} names")
        self._values: list[np.ndarray | None] = [None] * (n + 1)
        self._grads: list[np.ndarray | None] = [None] * (n + 1)

    def __len__(self) -> int:
        return len(self.nodes)

    def __repr__(self) -> str:
        return f"Chain([{', '.join(map(repr, self.nodes))}])"

    @property
    def values(self) -> list[np.ndarray | None]:
        """The forward value of each edge (read-only arrays), None before ``forward``."""
        return list(self._values)

    @property
    def grads(self) -> list[np.ndarray | None]:
        """The gradient of each edge (read-only arrays), None where backward has not reached."""
        return list(self._grads)

    @property
    def edges(self) -> list[Edge]:
        """``Edge(name, value, grad)`` for each edge, from the input ``x`` to the output."""
        return [Edge(*edge) for edge in zip(self.names, self._values, self._grads, strict=True)]

    def forward(self, x: Any) -> np.ndarray:
        """Run every node in order on ``x`` and return the output; forgets old gradients."""
        n = len(self.nodes)
        self._values = [None] * (n + 1)
        self._grads = [None] * (n + 1)
        value = _frozen(x)
        self._values[0] = value
        for i, node in enumerate(self.nodes):
            value = _frozen(node.forward(value))
            self._values[i + 1] = value
        return value

    def backward(self, dout: Any = 1.0, steps: int | None = None) -> np.ndarray:
        """Run the first ``steps`` backward steps (all by default); return the last gradient.

        Step ``k`` is node ``len(nodes) - k``'s backward: it multiplies the
        gradient of that node's output by its local derivative. ``steps=0``
        runs none and returns ``dout``. Each call starts again from ``dout``.
        """
        n = len(self.nodes)
        out = self._values[n]
        if out is None:
            raise RuntimeError(
                "Chain.backward() called before forward(): "
                "run forward first so that the chain has something to differentiate"
            )
        if steps is None:
            steps = n
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
            raise TypeError(f"Chain.backward: steps must be an int, got {steps!r}")
        if not 0 <= steps <= n:
            raise ValueError(f"Chain.backward: steps must lie in 0..{n}, got {steps}")
        _check_on_cpu(dout)
        if isinstance(dout, (str, bytes)) or np.asarray(dout).dtype.kind not in "biuf":
            raise TypeError(f"Chain.backward: dout must be a real number or array, got {dout!r}")
        if np.ndim(dout) == 0:
            # A scalar seeds every output element, as dL/dy = 1 does for a sum.
            dout = np.full(out.shape, dout, dtype=np.result_type(dout, out.dtype))
        grad = _frozen(dout)
        self._grads = [None] * (n + 1)
        self._grads[n] = grad
        for i in range(n - 1, n - 1 - steps, -1):
            grad = _frozen(self.nodes[i].backward(grad))
            self._grads[i] = grad
        return grad

    def local_gradients(self) -> list[np.ndarray]:
        """Each node's local derivative d(output)/d(input), in forward order.

        For the element-wise nodes of this module it is the node's backward of
        ones: the factor by which that backward step multiplies the gradient.
        """
        if self._values[-1] is None:
            raise RuntimeError("Chain.local_gradients() called before forward()")
        result = []
        for node, value in zip(self.nodes, self._values[1:], strict=True):
            assert value is not None
            result.append(_frozen(node.backward(np.ones_like(value))))
        return result


def sigmoid_chain() -> Chain:
    """The seed's sigmoid as four nodes: ``×-1``, ``exp``, ``+1``, ``/``.

    ``y = 1 / (1 + exp(-x))``; its backward steps 1 to 4 multiply the gradient
    by ``-y**2``, ``1``, ``exp(-x)`` and ``-1``, which makes ``y (1 - y)``.

    >>> sigmoid_chain()
    Chain([MulConstLayer(c=-1.0), ExpLayer(), AddConstLayer(c=1.0), ReciprocalLayer()])
    """
    return Chain(
        [MulConstLayer(-1.0), ExpLayer(), AddConstLayer(1.0), ReciprocalLayer()],
        names=["x", "-x", "exp(-x)", "1+exp(-x)", "y"],
    )
