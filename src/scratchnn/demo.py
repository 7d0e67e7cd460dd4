"""The seed notebook's examples, run through scratchnn, as printable text.

``scratchnn demo`` prints :func:`run_demo`: the notebook's cells (the array
``x``, its mask, ``Relu`` and ``Sigmoid`` forward and backward), then the
sigmoid's computational graph run node by node, with its four backward steps
as a table that ends with the check against the fused ``Sigmoid``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from scratchnn.graph import sigmoid_chain
from scratchnn.layers import Relu, Sigmoid

#: The array of the notebook's cell In [2].
SEED_X = np.array([[1.0, -0.5], [-2.0, 3.0]])

#: What the seed says each backward step multiplies by, for steps 1 to 4.
SEED_FORMULAS = ("-y**2", "1", "exp(-x)", "-1")

# Below this relative difference the chain and the fused layer "agree": the
# fused y (1 - y) itself cancels to ~1e-8 (float64) for x near 20.
_AGREE_RTOL = {np.dtype(np.float64): 1e-6, np.dtype(np.float32): 1e-3}


def _check_inputs(x: float, dout: float, dtype: str) -> np.dtype:
    """The dtype, once ``x`` and ``dout`` are known to be finite numbers in it."""
    float_dtype = np.dtype(dtype)
    if float_dtype not in _AGREE_RTOL:
        raise ValueError(f"dtype must be float64 or float32, got {dtype!r}")
    for name, value in (("x", x), ("dout", dout)):
        with np.errstate(over="ignore"):
            in_dtype = np.asarray(value, dtype=float_dtype)
        if in_dtype.ndim != 0 or not np.isfinite(in_dtype):
            raise ValueError(f"{name} must be a finite number in {float_dtype}, got {value!r}")
        if in_dtype == 0 and value != 0:  # the chain would run on 0, not on what was asked
            raise ValueError(f"{name} = {value!r} rounds to 0 in {float_dtype}")
    return float_dtype


class Step(NamedTuple):
    """One backward step of the four-node sigmoid (step 1 is the "/" node)."""

    step: int
    node: str
    output: float  # the node's forward output
    local: float  # its local derivative d(output)/d(input)
    grad: float  # the gradient after this step: upstream gradient times ``local``
    formula: str  # the seed's formula for ``local``


def _fmt(value: Any) -> str:
    return f"{float(value):.8g}"


def _fmt_y(y: float) -> str:
    """``y`` as the check line shows it: near 1, as ``1 - d`` (0.99999999999990647 printed
    as "1" beside a y (1 - y) that is not 0 would read as a contradiction)."""
    shown = _fmt(y)
    return f"1 - {1.0 - y:.3g}" if shown == "1" and y != 1.0 else shown


def seed_cells() -> str:
    """The notebook's cells on ``x``, with ``Relu`` and ``Sigmoid`` forward and backward."""
    relu, sigmoid = Relu(), Sigmoid()
    dout = np.ones_like(SEED_X)
    cells = [
        ("x = np.array([[1.0, -0.5], [-2.0, 3.0]])\n>>> print(x)", SEED_X),
        ("mask = (x <= 0)\n>>> print(mask)", SEED_X <= 0),
        ("relu = Relu()\n>>> print(relu.forward(x))", relu.forward(SEED_X)),
        ("print(relu.mask)", relu.mask),
        ("print(relu.backward(np.ones_like(x)))", relu.backward(dout)),
        ("sigmoid = Sigmoid()\n>>> print(sigmoid.forward(x))", sigmoid.forward(SEED_X)),
        ("print(sigmoid.backward(np.ones_like(x)))", sigmoid.backward(dout)),
    ]
    return "\n".join(f">>> {code}\n{value}" for code, value in cells)


def sigmoid_steps(
    x: float = 1.0, dout: float = 1.0, dtype: str = "float64"
) -> tuple[list[tuple[str, float]], list[Step]]:
    """Run the seed's four-node sigmoid at ``x``: its edges and its four backward steps.

    Returns ``(edges, steps)``: ``edges`` is ``(name, forward value)`` from
    ``x`` to ``y``; ``steps`` the backward steps 1 to 4 in the order they run.
    Overflow is allowed to happen silently here: showing it is the point.
    ``x`` and ``dout`` must be finite numbers in ``dtype`` (float64 or
    float32), else ``ValueError``.

    >>> edges, steps = sigmoid_steps(0.0)
    >>> [value for _, value in edges]
    [0.0, -0.0, 1.0, 2.0, 0.5]
    >>> [(s.node, s.local, s.grad) for s in steps]
    [('/', -0.25, -0.25), ('+1', 1.0, -0.25), ('exp', 1.0, -0.25), ('×-1', -1.0, 0.25)]
    """
    _check_inputs(x, dout, dtype)
    chain = sigmoid_chain()
    n = len(chain)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
        chain.forward(np.asarray(x, dtype=dtype))
        chain.backward(np.asarray(dout, dtype=dtype))
        locals_ = chain.local_gradients()
    edges = [(edge.name, float(edge.value)) for edge in chain.edges if edge.value is not None]
    steps = []
    for k in range(1, n + 1):
        i = n - k  # step k runs node i, whose output is edge i + 1
        node = chain.nodes[i]
        steps.append(
            Step(
                step=k,
                node=str(getattr(node, "label", type(node).__name__)),
                output=edges[i + 1][1],
                local=float(locals_[i]),
                grad=float(chain.grads[i]),  # type: ignore[arg-type]
                formula=SEED_FORMULAS[k - 1],
            )
        )
    return edges, steps


def step_table(x: float = 1.0, dout: float = 1.0, dtype: str = "float64") -> str:
    """The sigmoid's forward edges and backward steps at ``x`` as a text table.

    Ends with the check that the last gradient equals ``dout * y * (1 - y)``
    from the fused :class:`~scratchnn.Sigmoid`. ``x`` and ``dout`` must be
    finite in ``dtype`` (float64 or float32), else ``ValueError``.
    """
    edges, steps = sigmoid_steps(x, dout, dtype)
    lines = [
        f"The sigmoid as four nodes, x = {x:g}, dout = {dout:g} ({dtype})",
        "",
        "forward: x -> ×-1 -> exp -> +1 -> / -> y",
        f"  {'edge':<10} {'value':>15}",
    ]
    lines += [f"  {name:<10} {_fmt(value):>15}" for name, value in edges]
    lines += [
        "",
        "backward: each step multiplies the gradient by the node's local derivative",
        f"  start with dout = {_fmt(dout)}",
        f"  {'step':>4} {'node':>4} {'output':>15} {'local':>15} {'gradient':>15}  local is",
    ]
    lines += [
        f"  {s.step:>4} {s.node:>4} {_fmt(s.output):>15} {_fmt(s.local):>15} "
        f"{_fmt(s.grad):>15}  {s.formula}"
        for s in steps
    ]
    lines += ["", _check_line(x, dout, dtype, steps[-1].grad, steps[0].grad)]
    return "\n".join(lines)


def _check_line(x: float, dout: float, dtype: str, chain_grad: float, step1_grad: float) -> str:
    fused = Sigmoid()
    with np.errstate(over="ignore"):
        x_array = np.asarray(x, dtype=dtype)
    y = fused.forward(x_array)
    fused_grad = float(fused.backward(np.asarray(dout, dtype=dtype)))
    line = (
        f"check: dout * y * (1 - y) from the fused Sigmoid = {_fmt(fused_grad)} "
        f"(y = {_fmt_y(float(y))})\n"
    )
    if np.isnan(chain_grad) and not np.isnan(fused_grad):
        return line + (
            "       the chain breaks: exp(-x) overflowed to inf, so step 3 multiplied\n"
            "       the gradient 0 by inf (NaN); the fused layer stays finite"
        )
    # Relative to the larger of the two, so that a subnormal result against an
    # exact 0 reads as what it is: a relative difference of 1.
    scale = max(abs(chain_grad), abs(fused_grad))
    diff = abs(chain_grad - fused_grad) / scale if scale > 0 else 0.0
    if diff <= _AGREE_RTOL[np.dtype(dtype)]:
        return line + f"       the chain agrees (relative difference {diff:.1e})"
    hint = ""
    if step1_grad == 0.0 and float(y) > 0.0:
        hint = "; y**2 underflowed to 0 in step 1"
    elif fused_grad == 0.0 and float(y) == 1.0:
        hint = "; y rounds to 1, so the fused (1 - y) y is 0: here the chain's exp(-x) is right"
    elif float(y) > 0.5:
        # 1 - y cancels: of y's digits, those that 1 - y keeps are few once y is near 1,
        # while the chain carries exp(-x) itself.
        hint = (
            ";\n       y is near 1, and 1 - y in the fused (1 - y) y keeps few digits:\n"
            "       here the chain's exp(-x) is right"
        )
    return line + f"       the chain differs (relative difference {diff:.1e}{hint})"


def run_demo(x: float = 1.0, dout: float = 1.0, dtype: str = "float64") -> str:
    """All of the demo: the notebook's cells, then the sigmoid's step table at ``x``."""
    return (
        "The seed notebook's cells, through scratchnn\n\n"
        + seed_cells()
        + "\n\n"
        + step_table(x, dout, dtype)
    )
