"""CuPy's ``RawKernel`` and ``RawModule`` on the CPU, for the fake CuPy of ``fake_cupy``.

The CUDA C source is compiled by g++ behind a few lines of C++ that stand in
for CUDA's keywords, vector types and built-in indices; a launch runs the
kernel once per block and thread (a loop in C++ that the compiled source
carries), a block's threads as OS threads with a real barrier behind
``__syncthreads`` when the kernel synchronises (the same threads for each
block of a launch, in turn), one after the other when not (decided from the
device functions each kernel calls; a ``__syncthreads`` reached in a kernel
taken for one that does not wait stops the process, saying so).
So the library's whole GPU path (the Python that builds arguments, sizes the
grid and checks alignment, and the kernels it launches) runs here without a GPU.

Stricter than CuPy where CuPy would compute garbage without a word: every
argument is checked against the kernel's C signature (a pointer takes a
C-contiguous array of exactly its element type, a scalar a NumPy scalar of
exactly its type); Python numbers, whose C type CuPy guesses, are refused. As
strict as a GPU where it faults: the vector types are aligned as CUDA's and a
misaligned vector access stops the process (UBSan's alignment check). A
block's threads run in descending order, so code that leans on index order
fails here too; shared memory starts each block as bytes 0xff (NaN in a
float), so a read before the write shows.

What it cannot find: timing, memory coalescing, races between blocks (they
run one after another), out-of-bounds accesses, and the differences between
CUDA's and glibc's maths; nor a missing ``__syncthreads`` whose readers are a
block's lowest threads (without one, a kernel's threads run one after another
in descending order, so they read what the others wrote). (nvcc's test in test_gpu_kernels.py compiles each source to
a cubin, which checks registers and shared memory.)
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading
import types
from pathlib import Path
from typing import Any

import fake_cupy
import numpy as np

# CUDA's keywords, vector types and built-in indices for g++. The maths functions are
# declared, not included: <math.h> would take most of each compilation's time.
_SHIM = """
extern "C" {
float expf(float); double exp(double); float expm1f(float); double expm1(double);
float logf(float); double log(double); float log1pf(float); double log1p(double);
float tanhf(float); double tanh(double); float sqrtf(float); double sqrt(double);
float fabsf(float); double fabs(double); float erfcf(float); double erfc(double);
float fmaf(float, float, float); double fma(double, double, double);
}
inline float __fdividef(float a, float b) { return a / b; }  // CUDA's approximate division
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
// Shared memory: one static copy (blocks run one after another), in a section of its own
// so that each block starts with garbage in it, as on a GPU, not the last block's values.
#define __shared__ static __attribute__((section("fake_shared")))
extern "C" void* memset(void*, int, unsigned long);
extern char __start_fake_shared[] __attribute__((weak));
extern char __stop_fake_shared[] __attribute__((weak));
static inline void fake_scramble_shared() {
    if (__start_fake_shared)
        memset(__start_fake_shared, 0xff, (unsigned long)(__stop_fake_shared - __start_fake_shared));
}
// Aligned as CUDA's: a vector access at a misaligned address faults on a GPU, and here
// stops the test (g++ -fsanitize=alignment).
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(4) uchar4 { unsigned char x, y, z, w; };
struct alignas(2) uchar2 { unsigned char x, y; };
struct dim3_ { unsigned int x, y, z; };  // CUDA's built-in indices are unsigned int
static dim3_ gridDim, blockDim;
static thread_local dim3_ blockIdx, threadIdx;
extern "C" void fake_launch(unsigned int grid, unsigned int block) {
    gridDim.x = grid; blockDim.x = block;
    gridDim.y = gridDim.z = blockDim.y = blockDim.z = 1;
}
extern "C" void fake_thread(unsigned int block, unsigned int thread) {
    blockIdx.x = block; threadIdx.x = thread;
    blockIdx.y = blockIdx.z = threadIdx.y = threadIdx.z = 0;
}
"""
# For kernels that synchronise: a block's threads are OS threads, __syncthreads a barrier.
_SYNC_SHIM = """
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
static pthread_barrier_t fake_barrier;
static bool fake_threads_run = false;  // set while a launch runs a block's threads at once
static inline void __syncthreads() {
    if (!fake_threads_run) {  // a barrier with no other threads would fault or wait forever
        fprintf(stderr, "fake CUDA: __syncthreads in a kernel run one thread at a time: "
                        "tests/fake_cuda.py's _synchronises did not see that it waits\\n");
        abort();
    }
    pthread_barrier_wait(&fake_barrier);
}
struct fake_task { void* const* a; unsigned int t; };
"""

# The C types a kernel's parameters use, and the NumPy dtypes they take.
_C_TYPES = {
    "float": {np.dtype(np.float32)},
    "double": {np.dtype(np.float64)},
    "signed char": {np.dtype(np.int8)},
    "short": {np.dtype(np.int16)},
    "int": {np.dtype(np.int32)},
    "long long": {np.dtype(np.int64)},
    "unsigned char": {np.dtype(np.uint8), np.dtype(np.bool_)},
    "unsigned short": {np.dtype(np.uint16)},
    "unsigned int": {np.dtype(np.uint32)},
    "unsigned long long": {np.dtype(np.uint64)},
}
_CTYPES = {
    "float": ctypes.c_float, "double": ctypes.c_double, "signed char": ctypes.c_byte,
    "short": ctypes.c_short, "int": ctypes.c_int, "long long": ctypes.c_longlong,
    "unsigned char": ctypes.c_ubyte, "unsigned short": ctypes.c_ushort,
    "unsigned int": ctypes.c_uint, "unsigned long long": ctypes.c_ulonglong,
}  # fmt: skip

# -O0 compiles fastest; UBSan's alignment check stops at a misaligned vector access.
_FLAGS = ("-O0", "-fno-strict-aliasing", "-pthread", "-shared", "-fPIC",
          "-fsanitize=alignment", "-fno-sanitize-recover=alignment")  # fmt: skip

# The names of the kernels launched, in order, for tests that check which path ran.
launches: list[str] = []
_build_dir = Path(tempfile.gettempdir()) / f"scratchnn-fake-cuda-{os.getuid()}"
_libraries: dict[str, ctypes.CDLL] = {}
_lock = threading.Lock()


def available() -> str | None:
    """Why kernels cannot run here (no C++ compiler), or None when they can."""
    return None if shutil.which("g++") else "no C++ compiler (g++) to run the CUDA sources"


def _kernel_names(code: str) -> list[str]:
    return re.findall(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(', code)


_KERNEL_START = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')


def _bodies(code: str, starts: re.Pattern[str]) -> dict[str, tuple[int, int]]:
    """Where each function that ``starts`` finds begins and where its body's closing brace
    ends, by name (a match's group 1; its body is the first brace after the match). Only
    the outermost: a match inside a body found is a statement of it."""
    bodies: dict[str, tuple[int, int]] = {}
    end = 0
    for match in starts.finditer(code):
        opening = code.find("{", match.end())
        if opening < 0 or match.start() < end:  # (an if or a for inside a body found)
            continue
        depth, at = 0, opening
        for at in range(opening, len(code)):  # the brace that closes the body
            depth += {"{": 1, "}": -1}.get(code[at], 0)
            if depth == 0:
                break
        bodies[match.group(1)] = (match.start(), end := at + 1)
    return bodies


# A device function's definition outside the kernels: a name, its parameters, its body.
_FUNCTION_START = re.compile(r"(\w+)\s*\([^;{}]*\)\s*(?=\{)")


def _synchronises(code: str, name: str) -> bool:
    """Whether kernel ``name`` may call ``__syncthreads``: its own body does, or it names a
    device function that does (directly or through another), or ``__syncthreads`` stands
    outside every function (a macro, say: then every kernel is taken to). Decided per
    kernel, so that a source's other kernels still run their threads one after another,
    which is fast."""
    code = re.sub(r"//[^\n]*|/\*.*?\*/", " ", code, flags=re.DOTALL)  # (a comment names no call)
    kernels = _bodies(code, _KERNEL_START)
    outside, last = [], 0
    for first, stop in sorted(kernels.values()):
        outside.append(code[last:first])
        last = stop
    outside.append(code[last:])
    helpers_code = "\n".join(outside)
    helpers = {
        helper: helpers_code[first:stop]
        for helper, (first, stop) in _bodies(helpers_code, _FUNCTION_START).items()
    }
    loose = helpers_code
    for body in helpers.values():
        loose = loose.replace(body, "")
    if "__syncthreads" in loose:
        return True
    waiting = {helper for helper, body in helpers.items() if "__syncthreads" in body}
    while True:  # the helpers that call a helper that waits, until there are no more
        more = {helper for helper, body in helpers.items() if helper not in waiting
                and any(re.search(rf"\b{w}\b", body.split("{", 1)[1]) for w in waiting)}
        if not more:
            break
        waiting |= more
    first, stop = kernels[name]
    body = code[first:stop]
    return "__syncthreads" in body or any(re.search(rf"\b{w}\b", body) for w in waiting)


def _launcher(code: str, name: str) -> str:
    """C++ that runs kernel ``name`` over a grid: ``fake_run_<name>(args, grid, block)``.

    ``args`` holds, per parameter, the device pointer itself or the address of the scalar.
    """
    arguments = ", ".join(
        f"({c_type}*)a[{i}]" if pointer else f"*({c_type}*)a[{i}]"
        for i, (c_type, pointer, _) in enumerate(_signature(code, name))
    )
    call = f"{name}({arguments});"
    if _synchronises(code, name):
        # A block's threads run at once, as OS threads, so the barrier can hold them. The
        # same threads take one block after another (starting threads for each block made
        # a launch of 32 blocks of 256 take a tenth of a second): a barrier before each
        # block, once thread 0 has scrambled the shared memory, and one after it.
        return f"""
static void* fake_body_{name}(void* task) {{
    const fake_task* k = (const fake_task*)task;
    void* const* a = k->a;
    for (unsigned int b = 0; b < gridDim.x; ++b) {{
        if (k->t == 0) fake_scramble_shared();
        pthread_barrier_wait(&fake_barrier);
        fake_thread(b, k->t);
        {call}
        pthread_barrier_wait(&fake_barrier);
    }}
    return 0;
}}
extern "C" void fake_run_{name}(void* const* a, unsigned int grid, unsigned int block) {{
    static fake_task tasks[1024];
    static pthread_t ids[1024];
    fake_launch(grid, block);
    pthread_barrier_init(&fake_barrier, 0, block);
    fake_threads_run = true;
    for (unsigned int t = 0; t < block; ++t) {{
        tasks[t].a = a; tasks[t].t = t;
        if (pthread_create(&ids[t], 0, fake_body_{name}, &tasks[t]) != 0) {{
            // The barrier would wait forever for the missing thread.
            fprintf(stderr, "fake CUDA: cannot start thread %u of a block\\n", t);
            abort();
        }}
    }}
    for (unsigned int t = 0; t < block; ++t) pthread_join(ids[t], 0);
    fake_threads_run = false;
    pthread_barrier_destroy(&fake_barrier);
}}
"""
    # Threads in descending order: code that leans on the threads of a block running in
    # index order (a race on a GPU) gives a wrong answer here too.
    return f"""
extern "C" void fake_run_{name}(void* const* a, unsigned int grid, unsigned int block) {{
    fake_launch(grid, block);
    for (unsigned int b = 0; b < grid; ++b) {{
        fake_scramble_shared();
        for (unsigned int t = block; t-- > 0;) {{ fake_thread(b, t); {call} }}
    }}
}}
"""


def _library(code: str) -> ctypes.CDLL:
    """The source compiled for the CPU, with a launcher for each of its kernels.

    Cached by content, in memory and in a folder under the system's temporary one
    that later runs reuse; written under a temporary name and moved into place.
    """
    shim = _SHIM + (_SYNC_SHIM if "__syncthreads" in code else "")
    text = shim + code + "".join(_launcher(code, name) for name in _kernel_names(code))
    text += "\n// " + " ".join(_FLAGS) + "\n"  # the cache key covers the flags too
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    with _lock:
        library = _libraries.get(digest)
        if library is None:
            shared = _build_dir / f"{digest}.so"
            if not shared.exists():
                _build_dir.mkdir(exist_ok=True)
                with tempfile.TemporaryDirectory(dir=_build_dir) as work:
                    source, built = Path(work) / "kernels.cpp", Path(work) / "kernels.so"
                    source.write_text(text)
                    result = subprocess.run(
                        ["g++", *_FLAGS, "-o", str(built), str(source)],
                        capture_output=True, text=True,
                    )  # fmt: skip
                    if result.returncode != 0:
                        raise RuntimeError(
                            f"fake CUDA: the kernel source does not compile:\n{result.stderr}"
                        )
                    os.replace(built, shared)
            library = _libraries[digest] = ctypes.CDLL(str(shared))
    return library


def _typedefs(code: str) -> dict[str, str]:
    return {alias: target for target, alias in re.findall(r"typedef\s+([\w ]+?)\s+(\w+)\s*;", code)}


def _signature(code: str, name: str) -> list[tuple[str, bool, str]]:
    """The kernel's parameters as (C element type, is a pointer, parameter name)."""
    match = re.search(rf'extern\s+"C"\s+__global__\s+void\s+{name}\s*\(([^)]*)\)', code)
    if match is None:
        raise RuntimeError(f"fake CUDA: no kernel named {name!r} in the source")
    typedefs = _typedefs(code)
    parameters = []
    for text in match.group(1).split(","):
        pointer = "*" in text
        words = text.replace("*", " ").replace("__restrict__", " ").split()
        words = [w for w in words if w != "const"]
        c_type = " ".join(words[:-1])
        c_type = typedefs.get(c_type, c_type)
        if c_type not in _C_TYPES:
            raise RuntimeError(f"fake CUDA: {name}: unknown parameter type {c_type!r}")
        parameters.append((c_type, pointer, words[-1]))
    return parameters


class RawKernel:
    """One kernel of a CUDA source, launched on the CPU: ``kernel(grid, block, args)``."""

    def __init__(self, code: str, name: str, options: tuple[str, ...] = (), **_: Any) -> None:
        self.code, self.name = code, name
        self.parameters = _signature(code, name)
        self.loaded = False  # (CuPy loads a kernel's module at its first launch)

    def _arguments(self, args: tuple[Any, ...]) -> list[Any]:
        """Per parameter, a ctypes object: the array's address, or the scalar in its C type."""
        if len(args) != len(self.parameters):
            raise TypeError(
                f"fake CUDA: {self.name} takes {len(self.parameters)} arguments, got {len(args)}"
            )
        values: list[Any] = []
        for arg, (c_type, pointer, name) in zip(args, self.parameters):
            where = f"fake CUDA: {self.name}, argument {name} ({c_type}{' *' if pointer else ''})"
            if pointer:
                array = getattr(arg, "_a", None)
                if type(array) is not np.ndarray:
                    raise TypeError(f"{where}: needs a device array, got {type(arg).__name__}")
                if array.dtype not in _C_TYPES[c_type]:
                    raise TypeError(f"{where}: got an array of {array.dtype}")
                if not array.flags.c_contiguous:
                    raise ValueError(f"{where}: the array is not C-contiguous")
                values.append(ctypes.c_void_p(array.ctypes.data))
            else:
                if not isinstance(arg, np.generic) or arg.dtype not in _C_TYPES[c_type]:
                    raise TypeError(f"{where}: got {type(arg).__name__} {arg!r}")
                values.append(_CTYPES[c_type](arg.item()))
        return values

    def __call__(self, grid: tuple[int, ...], block: tuple[int, ...], args: tuple[Any, ...],
                 shared_mem: int = 0) -> None:  # fmt: skip
        run = getattr(_library(self.code), f"fake_run_{self.name}")
        values = self._arguments(args)
        (blocks,), (threads,) = tuple(grid), tuple(block)
        if not (0 < blocks < 2**31 and 0 < threads <= 1024):
            raise ValueError(f"fake CUDA: {self.name}: launch of {grid} x {block}")
        addresses = (ctypes.c_void_p * max(1, len(values)))(
            *[v.value if isinstance(v, ctypes.c_void_p) else ctypes.addressof(v) for v in values]
        )
        launches.append(self.name)
        if fake_cupy.recording is not None and not self.loaded:
            # A module loaded while a stream captures: a driver before CUDA 12.3 refuses it
            # (lazy loading), so every kernel a graph records must have run before.
            raise RuntimeError(f"fake CUDA: {self.name} first launched while a stream captures")
        self.loaded = True

        def launch() -> None:
            with _lock:  # one launch at a time: the launch state is global in the library
                run(addresses, ctypes.c_uint(blocks), ctypes.c_uint(threads))

        # While a stream captures, the launch is recorded for the graph's replays, as CUDA
        # records it: its arrays by address, its scalars as they are now (``values`` lives
        # as long as the closure).
        if not fake_cupy.record(launch, values):
            launch()


class RawModule:
    """A CUDA source of several kernels: ``module.get_function(name)``."""

    def __init__(self, code: str, options: tuple[str, ...] = (), **_: Any) -> None:
        self.code = code

    def get_function(self, name: str) -> RawKernel:
        return RawKernel(self.code, name)


def install(module: types.ModuleType) -> None:
    """Give the fake ``cupy`` module kernels that run on the CPU."""
    module.RawKernel = RawKernel  # type: ignore[attr-defined]
    module.RawModule = RawModule  # type: ignore[attr-defined]
