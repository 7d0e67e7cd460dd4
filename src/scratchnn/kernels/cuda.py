"""CUDA kernels for the operations of :mod:`scratchnn.kernels.ops`, one pass over memory each.

Each op's Python text is translated once to a CUDA C ``RawKernel``, compiled by
CuPy on first use and cached per (op, dtype). Why not ``cupy.ElementwiseKernel``:
measured on an H100 it ran ReLU at 1.4 times PyTorch's time, while PyTorch runs
at the memory-bandwidth floor. What the kernel does instead:

* 16-byte vector loads and stores (``float4``, ``double2``) when every array
  is aligned, so each memory transaction is full width; a scalar tail;
* one block of 256 threads for every 256 vectors, as PyTorch's element-wise
  kernels are launched, so no wave of blocks runs part-empty for long (a
  grid-stride loop covers what a grid cannot hold);
* no temporaries: every intermediate lives in registers; outputs are allocated
  once (in-place outputs, the optimiser's, not at all).

Nothing here imports CuPy at module import; the source strings are plain text
(:func:`source`), so they can be read and compiled without a GPU.
"""

from __future__ import annotations

import ast
import functools
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
    "ncdf": ("ncdf_float", "ncdf_double"),
    "npdf": ("npdf_float", "npdf_double"),
}
_BINARY = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_COMPARE = {ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Eq: "==", ast.NotEq: "!="}

BLOCK = 256


def vectors_per_thread(op: Op) -> int:
    """The 16-byte vectors each thread of ``op``'s kernel loads before it computes (see
    ``_loops``). Measured on an H200 (benchmarks/gpu_kernels.py, docs/benchmarks.md): an
    activation's forward, one array read, gained up to 10 % of its time from four (more
    bytes in flight a thread while the arithmetic runs); kernels that read two arrays
    mostly gained nothing from two, and Softplus's backward lost 6 %, but the two Gelu
    backwards, the most arithmetic an element, gained 3 to 7 %."""
    return _VECTORS_PER_THREAD.get(op.name, 4 if len(op.inputs) == 1 else 1)


_VECTORS_PER_THREAD = {"gelu_backward": 2, "gelu_tanh_backward": 2}


def compiles(xp: Any) -> bool:
    """Whether the array module ``xp`` is CuPy with its compiler (``RawKernel`` and
    ``RawModule``): where this package's kernels run. (A stand-in for CuPy may lack it.)"""
    return xp.__name__ == "cupy" and hasattr(xp, "RawKernel") and hasattr(xp, "RawModule")


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


def _loops(op: Op, c_type: str, tag: str, per_thread: int) -> str:
    """The grid-stride loops of ``op`` over one tensor: its arrays ``<name>_<tag>``, its
    element count ``n<tag>`` and its vector flag ``vec<tag>``; ``per_thread`` vectors a
    thread on the vector path."""
    vector, lanes = _VECTOR[c_type]

    def pointer(name: str) -> str:
        return f"{name}_{tag}"

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
        {name: f"{pointer(name)}[i]" + (" != 0" if name in op.masks else "") for name in op.inputs}
    )
    scalar += [f"{pointer(name)}[i] = {store(name, name)};" for name in op.outputs]

    # The vector path: each thread takes ``per_thread`` 16-byte vectors (4-byte ones for a
    # float mask), one block's width apart so that a warp's loads stay contiguous. All of a
    # thread's loads are issued before any arithmetic: the more bytes each thread has in
    # flight, the fewer threads keep the memory busy while others compute.
    def vec_type(name: str) -> str:
        return _MASK_VECTOR[lanes] if name in op.masks else vector

    # A vector past the end reads the thread's first one again (a valid address) and is
    # not stored: no uninitialised registers, no branch around the loads.
    vec_lines = ["const long long k0 = k;"]
    vec_lines += [
        f"const long long k{j} = k + {j}LL * blockDim.x < n_vec ? k + {j}LL * blockDim.x : k;"
        for j in range(1, per_thread)
    ]
    vec_lines += [
        f"const {vec_type(name)} {name}_v{j} = "
        f"reinterpret_cast<const {vec_type(name)}*>({pointer(name)})[k{j}];"
        for j in range(per_thread)
        for name in op.inputs
    ]
    for j in range(per_thread):
        vec_lines += [f"{vec_type(name)} {name}_o{j};" for name in op.outputs]
        for lane in _LANES[:lanes]:
            load = {
                name: f"{name}_v{j}.{lane}" + (" != 0" if name in op.masks else "")
                for name in op.inputs
            }
            lane_lines = body(load) + [
                f"{name}_o{j}.{lane} = {store(name, name)};" for name in op.outputs
            ]
            vec_lines.append("{ " + " ".join(lane_lines) + " }")
    for j in range(per_thread):
        stores = [
            f"reinterpret_cast<{vec_type(name)}*>({pointer(name)})[k{j}] = {name}_o{j};"
            for name in op.outputs
        ]
        vec_lines += stores if j == 0 else [f"if (k{j} != k) {{ " + " ".join(stores) + " }"]
    indent = "\n            "
    return f"""    {{
        long long start = 0;
        if (vec{tag}) {{
            const long long n_vec = n{tag} / {lanes};
            const long long block_first = (long long)blockIdx.x * blockDim.x * {per_thread};
            const long long vec_stride = stride * {per_thread};
            for (long long k = block_first + threadIdx.x; k < n_vec; k += vec_stride) {{
            {indent.join(vec_lines)}
            }}
            start = n_vec * {lanes};
        }}
        for (long long i = start + first; i < n{tag}; i += stride) {{
            {indent.join(scalar)}
        }}
    }}"""


def _header(c_type: str) -> str:
    return f"""typedef {c_type} T;

__device__ __forceinline__ T nan_min(T a, T b) {{ return (a != a || a < b) ? a : b; }}
__device__ __forceinline__ T nan_max(T a, T b) {{ return (a != a || a > b) ? a : b; }}
{_NCDF[c_type]}"""


# Phi(x), the standard normal CDF, and phi(x), its density. In double, by erfc and exp, with
# their arguments carried to twice the precision by fma (as functional.ncdf, npdf). In
# float, our own: libdevice's erfcf took an exact Gelu's kernels on an H200 to 1.3 times
# PyTorch's time (its arithmetic, not memory, bound them), and its argument -x/sqrt(2),
# rounded to float, put up to 187 ulps into Gelu's left tail. Here, for c = |x|,
#     Phi(-c) = exp(-c*c/2) * t * Q(t) / 2,  t = 1 / (1 + 0.4 c / sqrt 2),
# where t Q(t) is erfcx(c / sqrt 2) = exp(c*c/2) erfc(c / sqrt 2), smooth on [0, inf); Q is
# a degree-9 polynomial fitted to it to 7.8e-9 relative error (scripts/fit_ncdf.py, against
# mpmath). c*c is split exactly (fmaf), so the exponential takes no rounding of its
# argument. t is the hardware's approximate reciprocal (1 ulp; it reaches Phi up to about 3
# ulps near x = 0, where a correctly rounded one took the kernel 5 % more time); beyond
# c = 14 Phi(-c) underflows float32 and c is set to 20, where exp gives 0; written so that
# a NaN is kept (NaN >= 14 is false), at no cost. phi shares that exponential, word for
# word, so that a kernel calling both (Gelu's backward) computes it once.
_NCDF = {
    "double": """__device__ __forceinline__ double ncdf_double(double x) {
    const double c = x < -40.0 ? -40.0 : (x > 40.0 ? 40.0 : x);
    const double high = c * -0.7071067811865476;
    const double low = fma(c, -0.7071067811865476, -high) - c * -4.833646656726457e-17;
    const double h = x * -0.7071067811865476;
    return 0.5 * (erfc(h) - 1.1283791670955126 * exp(-high * high) * low);
}
__device__ __forceinline__ double npdf_double(double x) {
    const double a = fabs(x);
    const double c = !(a >= 40.0) ? a : 40.0;
    const double square = c * c;
    const double square_low = fma(c, c, -square);
    return exp(-0.5 * square) * (1.0 - 0.5 * square_low) * 0.3989422804014327;
}
""",
    "float": """__device__ __forceinline__ float ncdf_float(float x) {
    const float a = fabsf(x);
    const float c = !(a >= 14.0f) ? a : 20.0f;
    const float t = __fdividef(1.0f, 1.0f + 0.282842712f * c);  // within 2 ulps, one instruction
    float q = -2.959542908e-02f;
    q = fmaf(q, t, 1.980188638e-01f);
    q = fmaf(q, t, -4.988240898e-01f);
    q = fmaf(q, t, 5.474512577e-01f);
    q = fmaf(q, t, -2.843790650e-01f);
    q = fmaf(q, t, 2.720724642e-01f);
    q = fmaf(q, t, 1.296776086e-01f);
    q = fmaf(q, t, 2.149194926e-01f);
    q = fmaf(q, t, 2.249519825e-01f);
    q = fmaf(q, t, 2.257069051e-01f);
    const float square = c * c;
    const float square_low = fmaf(c, c, -square);
    const float tail = 0.5f * (expf(-0.5f * square) * (1.0f - 0.5f * square_low)) * (t * q);
    return x > 0.0f ? 1.0f - tail : tail;
}
__device__ __forceinline__ float npdf_float(float x) {
    const float a = fabsf(x);
    const float c = !(a >= 14.0f) ? a : 20.0f;
    const float square = c * c;
    const float square_low = fmaf(c, c, -square);
    return (expf(-0.5f * square) * (1.0f - 0.5f * square_low)) * 0.398942280f;
}
""",
}


def _parameters(op: Op, tags: list[str], from_memory: frozenset[str] = frozenset()) -> str:
    written = set(op.outputs)

    def element_type(name: str) -> str:
        return "unsigned char" if name in op.masks else "T"

    params = [
        f"{'' if name in written else 'const '}{element_type(name)}* __restrict__ {name}_{tag}"
        for tag in tags
        for name in op.arrays
    ]
    params += [
        f"const T* __restrict__ {name}_at" if name in from_memory else f"const T {name}"
        for name in op.scalars
    ]
    params += [f"const long long n{tag}, const int vec{tag}" for tag in tags]
    return ", ".join(params)


def _grid(op: Op, from_memory: frozenset[str] = frozenset()) -> str:
    """A kernel's first lines: its grid-stride indices, and the scalars it reads from memory."""
    reads = "".join(f"    const T {name} = *{name}_at;\n" for name in op.scalars
                    if name in from_memory)  # fmt: skip
    return """    const long long stride = (long long)blockDim.x * gridDim.x;
    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
""" + reads


def source(op: Op, dtype: Any, per_thread: int | None = None) -> str:
    """The CUDA C source of ``op`` for ``dtype`` (float32 or float64): one kernel named ``op.name``.

    Arguments, in order: every input array, every output array that is not an
    input, the scalars (as ``T``), the element count ``n`` and ``vec`` (1 when
    all arrays are 16-byte aligned, for the vector path). Each thread takes
    ``per_thread`` vectors (:func:`vectors_per_thread` unless given): launch it with a grid
    of :func:`blocks` for that many.
    """
    c_type = _C_TYPES[np.dtype(dtype)]
    per_thread = vectors_per_thread(op) if per_thread is None else per_thread
    return f"""{_header(c_type)}
extern "C" __global__ void {op.name}({_parameters(op, [""])})
{{
{_grid(op)}{_loops(op, c_type, "", per_thread)}
}}
"""


def source_many(
    op: Op,
    dtype: Any,
    count: int,
    per_thread: int | None = None,
    from_memory: frozenset[str] = frozenset(),
) -> str:
    """One kernel, ``<op.name>_x<count>``, that runs ``op`` over ``count`` tensors of
    ``dtype`` in one launch (an optimiser's step over every parameter).

    Arguments: tensor 0's arrays (as for :func:`source`), tensor 1's, ..., the
    scalars (shared), then each tensor's ``n`` and ``vec``. Every thread walks
    each tensor in turn, grid-stride, ``per_thread`` vectors at a time (as :func:`source`).
    The scalars named in ``from_memory`` are taken as pointers to one ``T`` each, read
    as the kernel runs (:class:`DeviceScalar`).
    """
    c_type = _C_TYPES[np.dtype(dtype)]
    per_thread = vectors_per_thread(op) if per_thread is None else per_thread
    tags = [str(j) for j in range(count)]
    loops = "\n".join(_loops(op, c_type, tag, per_thread) for tag in tags)
    return f"""{_header(c_type)}
extern "C" __global__ void {op.name}_x{count}({_parameters(op, tags, from_memory)})
{{
{_grid(op, from_memory)}{loops}
}}
"""


_kernels: dict[tuple[Any, ...], Any] = {}

# The most blocks of one launch (CUDA's limit for a grid's x size); beyond, the loops stride.
MAX_BLOCKS = 2**31 - 1


def _kernel(cupy: Any, op: Op, dtype: np.dtype[Any]) -> Any:
    key = (op.name, dtype)
    kernel = _kernels.get(key)
    if kernel is None:
        # RawKernel compiles on first launch (NVRTC) and CuPy caches the binary on disk.
        kernel = _kernels[key] = cupy.RawKernel(source(op, dtype), op.name)
    return kernel


def blocks(items: int, per_thread: int = 1) -> int:
    """The grid for ``items`` (vectors, or elements on the scalar path) at ``per_thread``
    a thread: one block for every ``BLOCK * per_thread`` items, as PyTorch launches its
    element-wise kernels. A grid of a few blocks per SM, with each
    thread striding over many items, ran its last blocks as a second, mostly empty wave
    wherever a kernel's registers let fewer blocks stay on an SM than it was sized for
    (ptxas for sm_90: ReLU's float32 forward takes 40 registers a thread, so 6 blocks of
    256 fit an SM, not 8; Adam's step takes 44, so 5). Many small blocks leave a tail of
    under one wave in dozens."""
    return max(1, min(-(-items // (BLOCK * per_thread)), MAX_BLOCKS))


def launch(cupy: Any, op: Op, arrays: list[Any], scalars: dict[str, float]) -> list[Any]:
    """Run ``op`` as one kernel on CuPy ``arrays`` (C-contiguous, one shape and float dtype).

    Returns the outputs in ``op.outputs`` order: in-place ones are the input
    arrays themselves, the others new arrays.
    """
    first = arrays[0]
    dtype = np.dtype(first.dtype)
    shape, n = first.shape, first.size
    args = list(arrays)
    for is_mask in op.fresh_outputs:
        args.append(cupy.empty(shape, dtype=np.bool_ if is_mask else dtype))
    if n:
        lanes = _LANES_OF[dtype]
        vec = _vector_path(args, n, lanes)
        size, flag, grid = _sized(n, lanes, vectors_per_thread(op), vec, MAX_BLOCKS)
        kernel_args = [*args, *[dtype.type(scalars[name]) for name in op.scalars], size, flag]
        _kernel(cupy, op, dtype)((grid,), (BLOCK,), tuple(kernel_args))
    return [args[i] for i in op.output_positions]


@functools.lru_cache(maxsize=1024)
def _sized(
    n: int, lanes: int, per_thread: int, vec: bool, limit: int
) -> tuple[np.int64, np.int32, int]:
    """A launch's size arguments (``n``, the vector flag) and its grid, for ``n`` elements
    (``limit``: ``MAX_BLOCKS`` as it stands): the same for every step of a network, so
    made once for each size (a NumPy scalar and the grid cost more than the look-up)."""
    grid = blocks(n // lanes, per_thread) if vec else blocks(n)
    return np.int64(n), _VECTOR_FLAG[vec], grid


# Elements per 16-byte vector, by dtype.
_LANES_OF = {dtype: _VECTOR[c_type][1] for dtype, c_type in _C_TYPES.items()}
# The kernels' int argument "vec", made once: a launch passes one.
_VECTOR_FLAG = (np.int32(0), np.int32(1))


def _vector_path(arrays: list[Any], n: int, lanes: int) -> bool:
    """Whether the 16-byte vector path may run: every float array 16-byte aligned (masks
    ``lanes`` bytes); fresh CuPy allocations are, views at an offset may not be."""
    if n < lanes:
        return False
    for a in arrays:  # (a loop, not all() of a generator: it runs at every launch)
        if a.data.ptr % (lanes if a.dtype == np.bool_ else 16):
            return False
    return True


# The most tensors one launch of launch_many takes (each adds a few kernel arguments).
MANY = 8


def launch_many(
    cupy: Any, op: Op, tensors: list[list[Any]], scalars: dict[str, float | DeviceScalar]
) -> None:
    """Run the in-place ``op`` (an optimiser's step) over several tensors, each a list of
    C-contiguous CuPy arrays of one shape in ``op.inputs`` order, all of one float dtype:
    one launch per ``MANY`` tensors where :func:`launch` would make one each. A scalar
    may be a :class:`DeviceScalar`, read from the GPU as the kernel runs."""
    assert not op.fresh_outputs, f"{op.name} has outputs of its own"
    dtype = np.dtype(tensors[0][0].dtype)
    lanes, per_thread = _LANES_OF[dtype], vectors_per_thread(op)
    step_scalars: list[Any] = []
    read: set[str] = set()
    for name in op.scalars:
        value = scalars[name]
        if isinstance(value, DeviceScalar):
            read.add(name)
            step_scalars.append(_read_from(value, dtype))
        else:
            step_scalars.append(dtype.type(value))
    from_memory = frozenset(read)
    work = [arrays for arrays in tensors if arrays[0].size]
    for first in range(0, len(work), MANY):
        chunk = work[first : first + MANY]
        args: list[Any] = [a for arrays in chunk for a in arrays]
        args += step_scalars
        grid = 1
        for arrays in chunk:
            n = arrays[0].size
            vec = _vector_path(arrays, n, lanes)
            size, flag, blocks_needed = _sized(n, lanes, per_thread, vec, MAX_BLOCKS)
            args += (size, flag)
            if blocks_needed > grid:
                grid = blocks_needed
        kernel = _many_kernel(cupy, op, dtype, len(chunk), from_memory)
        kernel((grid,), (BLOCK,), tuple(args))


def _many_kernel(
    cupy: Any, op: Op, dtype: np.dtype[Any], count: int, from_memory: frozenset[str]
) -> Any:
    key = (op.name, dtype, count, from_memory)
    kernel = _kernels.get(key)
    if kernel is None:
        name = f"{op.name}_x{count}"
        code = source_many(op, dtype, count, from_memory=from_memory)
        kernel = _kernels[key] = cupy.RawKernel(code, name)
    return kernel


class DeviceScalar:
    """A kernel's scalar argument read from GPU memory (``array``: one element of the
    kernel's dtype) as the kernel runs, not taken by value at its launch: a CUDA graph
    replays its launches with the arguments they were captured with, so a scalar that
    changes at every step (Adam's bias corrections) reaches a replayed kernel this way.
    Only :func:`launch_many` takes one."""

    __slots__ = ("array",)

    def __init__(self, array: Any) -> None:
        self.array = array

    def __repr__(self) -> str:
        return f"DeviceScalar(at {self.array.data.ptr:#x})"


def _read_from(scalar: DeviceScalar, dtype: np.dtype[Any]) -> Any:
    array = scalar.array
    if array.size != 1 or array.dtype != dtype:
        raise TypeError(
            f"kernels: a DeviceScalar must be one element of the kernel's dtype {dtype}, "
            f"got {array.size} of {array.dtype}"
        )
    return array


def next_row_source(dtype: Any) -> str:
    """The CUDA C source of ``next_row``: a one-thread kernel that copies row ``*index`` of
    ``table`` (``width`` columns, C order) into ``row`` and counts it (``*index += 1``)."""
    c_type = _C_TYPES[np.dtype(dtype)]
    return f"""extern "C" __global__ void next_row(
    const {c_type}* __restrict__ table, {c_type}* __restrict__ row,
    long long* __restrict__ index, const long long width)
{{
    const long long at = *index * width;
    for (long long j = 0; j < width; ++j) row[j] = table[at + j];
    *index += 1;
}}
"""


def next_row(cupy: Any, table: Any, row: Any, index: Any) -> None:
    """Launch ``next_row`` (see :func:`next_row_source`): ``row[:] = table[index]``, then
    ``index += 1``, read and written as the kernel runs (in a CUDA graph, at each replay).
    ``table`` is C-contiguous, ``row`` one of its rows' length, both of one float dtype;
    ``index`` one int64. Nothing checks that the row is inside the table."""
    dtype = np.dtype(table.dtype)
    key = ("next_row", dtype)
    kernel = _kernels.get(key)
    if kernel is None:
        kernel = _kernels[key] = cupy.RawKernel(next_row_source(dtype), "next_row")
    kernel((1,), (1,), (table, row, index, np.int64(table.shape[-1])))
