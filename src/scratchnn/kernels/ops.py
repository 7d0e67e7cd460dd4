"""The element-wise operations that run fused on the GPU, each written once.

Each :class:`Op` is a few assignments in a small subset of Python: names,
numbers, ``+ - * /``, comparisons and the functions in ``FUNCTIONS``. The same
text is

* evaluated with an array module (:func:`evaluate`): the reference, and the
  path taken where no fused kernel applies (NumPy, float16, a CuPy without a
  compiler);
* translated to CUDA C by :mod:`scratchnn.kernels.cuda`, one pass over memory.

So the formula a kernel computes and the formula the tests check are one text.
The layers' NumPy paths are tuned separately (in place, branch-free) and the
tests hold these formulas to them.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import CodeType, ModuleType
from typing import Any

import numpy as np

# The functions an op may call, and what each means, element by element.
# ncdf is Phi, the standard normal CDF, 0.5 erfc(-x / sqrt 2); npdf its density.
FUNCTIONS = ("exp", "expm1", "log1p", "tanh", "sqrt", "abs", "erfc", "ncdf", "npdf", "min", "max",
             "where")  # fmt: skip


@dataclass(frozen=True)
class Op:
    """One fused element-wise operation.

    ``inputs`` are read, ``outputs`` written; an output that is also an input is
    updated in place (an optimiser's parameter and moments). ``masks`` names
    the inputs and outputs that are bool arrays; every other array has the
    first input's float dtype. ``scalars`` are numbers of that dtype.
    """

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    body: str
    scalars: tuple[str, ...] = ()
    masks: frozenset[str] = field(default_factory=frozenset)

    @cached_property
    def statements(self) -> list[ast.Assign]:
        """The body's assignments, parsed and checked against the allowed subset."""
        tree = ast.parse(self.body)
        for statement in tree.body:
            if not (
                isinstance(statement, ast.Assign)
                and len(statement.targets) == 1
                and isinstance(statement.targets[0], ast.Name)
            ):
                raise ValueError(f"{self.name}: only `name = expression` statements are allowed")
        return [s for s in tree.body if isinstance(s, ast.Assign)]

    @cached_property
    def code(self) -> CodeType:
        return compile(self.body, f"<op {self.name}>", "exec")

    @cached_property
    def input_roles(self) -> tuple[tuple[bool, bool], ...]:
        """Per input, (is a mask, is updated in place): what a launch checks of each array,
        worked out once (a training step launches a dozen kernels)."""
        return tuple((name in self.masks, name in self.outputs) for name in self.inputs)

    @cached_property
    def arrays(self) -> tuple[str, ...]:
        """The arrays a kernel of the op takes, in order: every input, then the outputs
        that are not inputs (fresh arrays, made for each call)."""
        return (*self.inputs, *(name for name in self.outputs if name not in self.inputs))

    @cached_property
    def fresh_outputs(self) -> tuple[bool, ...]:
        """Per fresh output (see ``arrays``), whether it is a mask."""
        return tuple(name in self.masks for name in self.arrays[len(self.inputs) :])

    @cached_property
    def output_positions(self) -> tuple[int, ...]:
        """Each output's place in ``arrays``."""
        return tuple(self.arrays.index(name) for name in self.outputs)


def _functions(xp: ModuleType) -> dict[str, Callable[..., Any]]:
    from scratchnn import functional as F

    return {
        "exp": xp.exp,
        "expm1": xp.expm1,
        "log1p": xp.log1p,
        "tanh": xp.tanh,
        "sqrt": xp.sqrt,
        "abs": xp.abs,
        "erfc": F.erfc,
        "ncdf": F.ncdf,
        "npdf": F.npdf,
        # NaN-propagating, as the CUDA translation's min and max are.
        "min": xp.minimum,
        "max": xp.maximum,
        "where": xp.where,
    }


def evaluate(op: Op, xp: ModuleType, arrays: list[Any], scalars: Mapping[str, float]) -> list[Any]:
    """Run ``op`` with the array module ``xp``: the reference, several passes over memory.

    Returns the outputs in ``op.outputs`` order; in-place outputs are written
    into their input arrays, which are returned.
    """
    namespace: dict[str, Any] = {**_functions(xp), **dict(zip(op.inputs, arrays)), **scalars}
    dtype = arrays[0].dtype
    # Both sides of a where are computed everywhere; the side not taken may overflow.
    with np.errstate(all="ignore"):
        exec(op.code, namespace)
    results = []
    for name in op.outputs:
        value = namespace[name]
        if name in op.inputs:
            target = arrays[op.inputs.index(name)]
            target[...] = value
            results.append(target)
        else:
            wanted = np.dtype(bool) if name in op.masks else dtype
            results.append(xp.asarray(value).astype(wanted, copy=False))
    return results


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715

# sigmoid(v) without overflow: with e = exp(-|v|) in (0, 1] and r = 1/(1+e), r or e*r.
# s (1 - s) is e r**2 for either sign of v: the backward passes use that form, since
# 1 - s cancels to 0 once s rounds to 1 (float32 from v of about 17), where the
# derivative is still e. One reciprocal, no division: on an H200 a kernel with a few
# correctly rounded divisions an element is bound by its arithmetic, not by memory
# (benchmarks/gpu_kernels.py), and e*r is within an ulp of e/(1+e).
_SIGMOID_OF_V = """
e = exp(-abs(v))
r = 1.0 / (1.0 + e)
s = where(v >= 0, r, e * r)
"""

OPS: dict[str, Op] = {}


def _add(op: Op) -> None:
    OPS[op.name] = op


# -- activations: forward keeps what backward reads, as the layers do -----------------------

# Relu keeps the mask (x <= 0); NaN passes forward as in the NumPy path.
_add(Op("relu_forward", ("x",), ("y", "mask"), "mask = x <= 0\ny = where(mask, 0.0, x)",
        masks=frozenset({"mask"})))  # fmt: skip
_add(Op("relu_backward", ("dout", "mask"), ("dx",), "dx = where(mask, 0.0, dout)",
        masks=frozenset({"mask"})))  # fmt: skip
_add(Op("sigmoid_forward", ("x",), ("y",), "v = x" + _SIGMOID_OF_V + "y = s"))
_add(Op("sigmoid_backward", ("dout", "y"), ("dx",), "dx = dout * (1.0 - y) * y"))
_add(Op("tanh_forward", ("x",), ("y",), "y = tanh(x)"))
_add(Op("tanh_backward", ("dout", "y"), ("dx",), "dx = dout * (1.0 - y * y)"))
# LeakyRelu's mask is "not x > 0": True at NaN too, whose slope is alpha, as PyTorch's.
_add(Op("leaky_relu_forward", ("x",), ("y", "mask"),
        "mask = (x > 0) == 0\ny = where(mask, alpha * x, x)", ("alpha",), frozenset({"mask"})))  # fmt: skip
_add(Op("leaky_relu_backward", ("dout", "mask"), ("dx",),
        "dx = where(mask, alpha * dout, dout)", ("alpha",), frozenset({"mask"})))  # fmt: skip
# exp only of min(x, 0): exp of a large positive x would overflow.
_add(Op("elu_forward", ("x",), ("y",), "y = where(x > 0, x, alpha * expm1(min(x, 0.0)))",
        ("alpha",)))  # fmt: skip
# Its slope at NaN is 1 ("x <= 0" is false there), as PyTorch's element loop gives (its
# vectorised loop, on longer tensors, gives NaN).
_add(Op("elu_backward", ("dout", "x"), ("dx",),
        "dx = where(x <= 0, dout * (alpha * exp(min(x, 0.0))), dout)", ("alpha",)))  # fmt: skip
# Exact Gelu: Phi without cancellation in the left tail, and phi (ncdf and npdf: see
# kernels.cuda for the float32 kernels' own).
_add(Op("gelu_forward", ("x",), ("y",), "y = x * ncdf(x)"))
_add(Op("gelu_backward", ("dout", "x"), ("dx",), "dx = dout * (ncdf(x) + x * npdf(x))"))
# Tanh-form Gelu as x * sigmoid(2u); x clipped at +-100 only keeps x**3 finite.
_GELU_TANH_S = (
    f"""
c = max(min(x, 100.0), -100.0)
v = {2.0 * _SQRT_2_OVER_PI!r} * (c + {_GELU_CUBIC!r} * c * c * c)
"""
    + _SIGMOID_OF_V
)
_add(Op("gelu_tanh_forward", ("x",), ("y",), _GELU_TANH_S + "y = x * s"))
_add(Op("gelu_tanh_backward", ("dout", "x"), ("dx",), _GELU_TANH_S + f"""
du = {_SQRT_2_OVER_PI!r} * (1.0 + {3.0 * _GELU_CUBIC!r} * c * c)
dx = dout * (s + x * (2.0 * e * (r * r) * du))
"""))  # fmt: skip
# 1/beta is the same for every element: the compiler takes it out of the loop, where a
# division by beta would be one an element.
_add(Op("softplus_forward", ("x",), ("y",),
        "inv_beta = 1.0 / beta\ny = max(x, 0.0) + log1p(exp(-beta * abs(x))) * inv_beta",
        ("beta",)))  # fmt: skip
_add(Op("softplus_backward", ("dout", "y"), ("dx",), "dx = dout * -expm1(-beta * y)", ("beta",)))
_add(Op("silu_forward", ("x",), ("y",), "v = x" + _SIGMOID_OF_V + "y = x * s"))
_add(Op("silu_backward", ("dout", "x"), ("dx",),
        "v = x" + _SIGMOID_OF_V + "dx = dout * (s + x * (e * (r * r)))"))  # fmt: skip

# -- optimiser steps, in place; weight decay is the first line when it is used -----------------
# The scalars are folded in Python as the NumPy path folds them (see optim.py).

_add(Op("sgd", ("p", "g"), ("p",), "p = p - lr * g", ("lr",)))
_add(Op("momentum", ("p", "g", "v"), ("p", "v"),
        "v = momentum * v + g\np = p - lr * v", ("lr", "momentum")))  # fmt: skip
_add(Op("nesterov", ("p", "g", "v"), ("p", "v"),
        "v = momentum * v + g\np = p - lr * (momentum * v + g)", ("lr", "momentum")))  # fmt: skip
_add(Op("adagrad", ("p", "g", "h"), ("p", "h"),
        "h = h + g * g\np = p - lr * (g / (sqrt(h) + eps))", ("lr", "eps")))  # fmt: skip
_add(Op("rmsprop", ("p", "g", "h"), ("p", "h"),
        "h = decay * h + one_minus_decay * (g * g)\np = p - lr * (g / (sqrt(h) + eps))",
        ("lr", "eps", "decay", "one_minus_decay")))  # fmt: skip
_add(Op("adam", ("p", "g", "m", "v"), ("p", "m", "v"), """
m = beta1 * m + one_minus_beta1 * g
v = beta2 * v + one_minus_beta2 * g * g
p = p - m / (sqrt(v) * inv_scale + eps_scaled)
""", ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "inv_scale", "eps_scaled")))  # fmt: skip


def with_weight_decay(op: Op) -> Op:
    """``op`` with L2 weight decay, ``g = g + weight_decay * p``, fused in front."""
    return Op(
        op.name + "_wd",
        op.inputs,
        op.outputs,
        "g = g + weight_decay * p\n" + op.body,
        (*op.scalars, "weight_decay"),
        op.masks,
    )


for _name in ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"):
    _add(with_weight_decay(OPS[_name]))
