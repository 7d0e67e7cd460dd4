"""CUDA kernels for the operations of :mod:`scratchnn.kernels.ops`, one pass over memory each.

Each op's Python text is translated once to a CUDA C ``RawKernel``, compiled by
CuPy on first use and cached per (op, dtype). Why not ``cupy.ElementwiseKernel``:
measured on an H100 it ran ReLU at 1.4 times PyTorch's time, while PyTorch runs
at the memory-bandwidth floor. What the kernel does instead:

* 16-byte vector loads and stores (``float4``, ``double2``) when every array
  is aligned, so each memory transaction is full width; a scalar tail;
* a grid-stride loop over a grid sized to the card (a few blocks per SM), so
  no launch is larger than the card and index arithmetic stays cheap;
* no temporaries: every intermediate lives in registers; outputs are allocated
  once (in-place outputs, the optimiser's, not at all).

Nothing here imports CuPy at module import; the source strings are plain text
(:func:`source`), so they can be read and compiled without a GPU.
"""

from __future__ import annotations

import ast
from typing import Any

import numpy as np

from scratchnn.kernels.ops import Op

_C_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
_VECTOR = {"float": ("float4", 4), "double": ("double2", 2)}
_MASK_VECTOR = {4: "uchar4", 2: "uchar2"}
_LANES = ("x", "y", "z", "w")
# The C math function of each op function, per type: explicit names, no overload guessing.
_MATH = {
    "exp": ("expf", "exp"),
    "expm1": ("expm1f", "expm1"),
    "log1p": ("log1pf", "log1p"),
    "tanh": ("tanhf", "tanh"),
    "sqrt": ("sqrtf", "sqrt"),
    "abs": ("fabsf", "fabs"),
    "erfc": ("erfcf", "erfc"),
}
_BINARY = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_COMPARE = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}

BLOCK = 256


def supported_dtype(dtype: Any) -> bool:
    """Whether a fused kernel exists for arrays of ``dtype`` (float32 and float64)."""
    return np.dtype(dtype) in _C_TYPES


class _Translator:
    """Turns the op's expressions into C for one element type ``T``."""

    def __init__(self, c_type: str, bools: set[str]) -> None:
        self.c_type = c_type
        self.bools = bools

    def expression(self, node: ast.expr) -> str:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return f"(({self.c_type}){float(node.value)!r})"
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return f"(-{self.expression(node.operand)})"
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            op = _BINARY[type(node.op)]
            return f"({self.expression(node.left)} {op} {self.expression(node.right)})"
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
            op = _COMPARE[type(node.ops[0])]
            return f"({self.expression(node.left)} {op} {self.expression(node.comparators[0])})"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
            args = [self.expression(a) for a in node.args]
            name = node.func.id
            if name == "where" and len(args) == 3:
                return f"({args[0]} ? {args[1]} : {args[2]})"
            if name in ("min", "max") and len(args) == 2:
                return f"nan_{name}({args[0]}, {args[1]})"
            if name in _MATH and len(args) == 1:
                return f"{_MATH[name][self.c_type == 'double']}({args[0]})"
        raise ValueError(f"cannot translate {ast.unparse(node)!r} to CUDA C")

    def is_bool(self, node: ast.expr) -> bool:
        return isinstance(node, ast.Compare) or (
            isinstance(node, ast.Name) and node.id in self.bools
        )


def _element_code(op: Op, translator: _Translator, declared: set[str]) -> list[str]:
    """The C statements of the op's body for one element; inputs are already locals."""
    lines = []
    for statement in op.statements:
        target = statement.targets[0]
        assert isinstance(target, ast.Name)
        value = translator.expression(statement.value)
        if target.id in declared:
            lines.append(f"{target.id} = {value};")
        else:
            declared.add(target.id)
            kind = "bool" if translator.is_bool(statement.value) else "T"
            if kind == "bool":
                translator.bools.add(target.id)
            lines.append(f"{kind} {target.id} = {value};")
    return lines


def source(op: Op, dtype: Any) -> str:
    """The CUDA C source of ``op`` for ``dtype`` (float32 or float64): one kernel named ``op.name``.

    Arguments, in order: every input array, every output array that is not an
    input, the scalars (as ``T``), the element count ``n`` and ``vec`` (1 when
    all arrays are 16-byte aligned, for the vector path).
    """
    c_type = _C_TYPES[np.dtype(dtype)]
    vector, lanes = _VECTOR[c_type]
    arrays = [*op.inputs, *(name for name in op.outputs if name not in op.inputs)]
    written = set(op.outputs)

    def element_type(name: str) -> str:
        return "unsigned char" if name in op.masks else "T"

    params = []
    for name in arrays:
        const = "" if name in written else "const "
        params.append(f"{const}{element_type(name)}* __restrict__ {name}_")
    params += [f"const T {name}" for name in op.scalars]
    params += ["const long long n", "const int vec"]

    def body(load: dict[str, str]) -> list[str]:
        translator = _Translator(c_type, {name for name in op.inputs if name in op.masks})
        declared = set(op.inputs)
        lines = [
            f"{'bool' if name in op.masks else 'T'} {name} = {load[name]};" for name in op.inputs
        ]
        return lines + _element_code(op, translator, declared)

    def store(name: str, value: str) -> str:
        return f"({'unsigned char' if name in op.masks else 'T'})({value})"

    # The scalar path: one element per iteration.
    scalar = body(
        {name: f"{name}_[i]" + (" != 0" if name in op.masks else "") for name in op.inputs}
    )
    scalar += [f"{name}_[i] = {store(name, name)};" for name in op.outputs]

    # The vector path: load each array as one 16-byte vector (4 bytes for a float mask),
    # run the element code once per lane, store the vectors.
    def vec_type(name: str) -> str:
        return _MASK_VECTOR[lanes] if name in op.masks else vector

    vec_lines = [
        f"const {vec_type(name)} {name}_v = reinterpret_cast<const {vec_type(name)}*>({name}_)[k];"
        for name in op.inputs
    ]
    vec_lines += [f"{vec_type(name)} {name}_o;" for name in op.outputs]
    for lane in _LANES[:lanes]:
        load = {
            name: f"{name}_v.{lane}" + (" != 0" if name in op.masks else "") for name in op.inputs
        }
        lane_lines = body(load) + [f"{name}_o.{lane} = {store(name, name)};" for name in op.outputs]
        vec_lines.append("{ " + " ".join(lane_lines) + " }")
    vec_lines += [
        f"reinterpret_cast<{vec_type(name)}*>({name}_)[k] = {name}_o;" for name in op.outputs
    ]

    indent = "\n            "
    return f"""typedef {c_type} T;

__device__ __forceinline__ T nan_min(T a, T b) {{ return (a != a || a < b) ? a : b; }}
__device__ __forceinline__ T nan_max(T a, T b) {{ return (a != a || a > b) ? a : b; }}

extern "C" __global__ void {op.name}({", ".join(params)})
{{
    const long long stride = (long long)blockDim.x * gridDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long start = 0;
    if (vec) {{
        const long long n_vec = n / {lanes};
        for (long long k = first; k < n_vec; k += stride) {{
            {indent.join(vec_lines)}
        }}
        start = n_vec * {lanes};
    }}
    for (long long i = start + first; i < n; i += stride) {{
        {indent[:-4].join(scalar)}
    }}
}}
"""


_kernels: dict[tuple[str, str], Any] = {}
_sm_counts: dict[int, int] = {}


def _kernel(cupy: Any, op: Op, dtype: np.dtype[Any]) -> Any:
    key = (op.name, dtype.str)
    kernel = _kernels.get(key)
    if kernel is None:
        # RawKernel compiles on first launch (NVRTC) and CuPy caches the binary on disk.
        kernel = _kernels[key] = cupy.RawKernel(source(op, dtype), op.name)
    return kernel


def _grid(cupy: Any, items: int) -> int:
    device = cupy.cuda.Device()
    count = _sm_counts.get(device.id)
    if count is None:
        count = _sm_counts[device.id] = int(device.attributes["MultiProcessorCount"])
    # Eight blocks of 256 threads fill an SM (2048 threads); the grid-stride loop does the rest.
    return max(1, min(-(-items // BLOCK), count * 8))


def launch(cupy: Any, op: Op, arrays: list[Any], scalars: dict[str, float]) -> list[Any]:
    """Run ``op`` as one kernel on CuPy ``arrays`` (C-contiguous, one shape and float dtype).

    Returns the outputs in ``op.outputs`` order: in-place ones are the input
    arrays themselves, the others new arrays.
    """
    dtype = np.dtype(arrays[0].dtype)
    shape, n = arrays[0].shape, arrays[0].size
    by_name = dict(zip(op.inputs, arrays))
    for name in op.outputs:
        if name not in by_name:
            by_name[name] = cupy.empty(shape, dtype=bool if name in op.masks else dtype)
    if n:
        lanes = _VECTOR[_C_TYPES[dtype]][1]
        ordered = [by_name[name] for name in (*op.inputs, *op.outputs) if name in by_name]
        # Vector loads need 16-byte alignment of the float arrays (and lanes bytes for masks);
        # fresh CuPy allocations have it, views at an offset may not.
        vec = n >= lanes and all(
            a.data.ptr % (lanes if a.dtype == np.bool_ else 16) == 0 for a in ordered
        )
        items = n // lanes if vec else n
        names = [*op.inputs, *(name for name in op.outputs if name not in op.inputs)]
        args = [by_name[name] for name in names]
        args += [dtype.type(scalars[name]) for name in op.scalars]
        args += [np.int64(n), np.int32(vec)]
        _kernel(cupy, op, dtype)((_grid(cupy, items),), (BLOCK,), tuple(args))
    return [by_name[name] for name in op.outputs]
