"""The CUDA kernels (scratchnn.kernels): every source compiles with nvcc where it is
installed, computes its op on the CPU stand-in (tests/fake_cuda.py, which compiles the
CUDA C with g++) and on a GPU where present; the launch's grid, arguments and scalars read
from memory; the element-wise paths the kernels leave to CuPy; exact Gelu's accuracy; and
the stand-in's own strictness (shared memory, which kernels synchronise).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import fake_cuda
import fake_cupy
import numpy as np
import pytest
from gpu_support import load_script

import scratchnn as snn
from scratchnn.backend import to_host
from scratchnn.kernels import OPS
from scratchnn.kernels.cuda import next_row_source, source, source_many


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
@pytest.mark.parametrize("barrier", ["", "__syncthreads();"])
def test_the_cpu_stand_in_for_cuda_starts_shared_memory_as_garbage(
    barrier: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A kernel that reads its shared memory before writing it reads garbage on a GPU; the
    # stand-in must not hand it the values an earlier block or launch left there, whether
    # it runs a block's threads one after another or (a kernel that synchronises) the same
    # OS threads block after block.
    fake = fake_cupy.install(monkeypatch, kernels=True)
    code = f"""typedef float T;
extern "C" __global__ void peek(T* out) {{
    __shared__ T seen[4];
    out[blockIdx.x * 4 + threadIdx.x] = seen[threadIdx.x];
    {barrier}
    seen[threadIdx.x] = (T)1;
}}"""
    kernel = fake.RawKernel(code, "peek")
    out = fake.zeros(12, np.float32)
    kernel((3,), (4,), (out,))
    assert np.isnan(out.get()).all()  # later blocks included: not the 1 the first left


# SoftmaxWithLoss on class indices runs two CUDA kernels of its own (kernels/cross_entropy.py).


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_kernel_source_compiles(dtype: Any, tmp_path: Path) -> None:
    from scratchnn.kernels import bias, cross_entropy

    # Each source in its own namespace, so one nvcc run checks them all; the kernel names
    # are extern "C", so the cross-entropy ones, the same for each label type, get a suffix.
    sources = {name: source(op, dtype) for name, op in OPS.items()}
    for name, op in OPS.items():  # the optimisers' steps over eight tensors at once
        if set(op.outputs) <= set(op.inputs):
            sources[f"{name}_x8"] = source_many(op, dtype, 8)
    # Adam's step as a graph replays it, its bias corrections read from memory, and the
    # kernel that fills them in from a table.
    folded = frozenset({"inv_scale", "eps_scaled"})
    sources["adam_wd_x8_at"] = source_many(OPS["adam_wd"], dtype, 8, from_memory=folded
                                           ).replace("adam_wd_x8(", "adam_wd_x8_at(")  # fmt: skip
    sources["next_row"] = next_row_source(dtype)
    for label in (np.int64, np.int32, np.uint8, np.int8):
        name = np.dtype(label).name
        sources[f"xent_{name}"] = cross_entropy.source(dtype, label).replace(
            "softmax_xent", f"softmax_xent_{name}"
        )
    sources["bias"] = bias.source(dtype)
    path = tmp_path / "kernels.cu"
    path.write_text("\n".join(f"namespace k_{name} {{\n{code}}}" for name, code in sources.items()))
    result = subprocess.run(
        # A cubin for the H100/H200 (sm_90): ptxas checks registers and shared memory too.
        ["nvcc", "-cubin", "-arch=sm_90", "-o", os.devnull, str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_kernels_launch_a_block_for_every_256_threads_of_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As PyTorch launches its element-wise kernels: a grid sized to the card left its last
    # blocks a second, mostly empty wave wherever fewer blocks than planned fit an SM. A
    # thread takes vectors_per_thread vectors: four for a forward (one array read), one for
    # a backward.
    from scratchnn.kernels import cuda

    fake = fake_cupy.install(monkeypatch, kernels=True)
    grids: list[tuple[str, int]] = []
    call = fake.RawKernel.__call__

    def recorded(kernel: Any, grid: Any, block: Any, args: Any, **options: Any) -> Any:
        assert block == (cuda.BLOCK,)
        grids.append((kernel.name, grid[0]))
        return call(kernel, grid, block, args, **options)

    monkeypatch.setattr(fake.RawKernel, "__call__", recorded)
    rng = np.random.default_rng(3)
    x = fake.asarray(rng.standard_normal(4 * 256 * 10 + 3, dtype=np.float32))
    dout = fake.asarray(rng.standard_normal(x.size, dtype=np.float32))
    layer = snn.Sigmoid()
    layer.forward(x)  # 2560 vectors of four, four a thread, and a scalar tail of 3
    layer.backward(dout)  # 2560 vectors, one a thread
    snn.Sigmoid().forward(x[1:])  # one element in: unaligned, 10242 elements one at a time
    monkeypatch.setattr(cuda, "MAX_BLOCKS", 2)
    y = snn.Sigmoid().forward(x)  # the grid-stride loops cover what 2 blocks do not
    np.testing.assert_allclose(y.get(), snn.Sigmoid().forward(x.get()), rtol=1e-6)
    assert grids == [("sigmoid_forward", 3), ("sigmoid_backward", 10), ("sigmoid_forward", 41),
                     ("sigmoid_forward", 2)]  # fmt: skip


# The CUDA sources run on the CPU (tests/fake_cuda.py). With launches set by hand, this checks
# each kernel's indexing (vector path, scalar tail, grid-stride loop) and its translated
# formula against the op's NumPy evaluation.


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_kernel_source_computes_its_op_on_the_cpu(
    dtype: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scratchnn.kernels.ops import evaluate

    fake = fake_cupy.install(monkeypatch, kernels=True)
    rng = np.random.default_rng(12)
    for name, op in OPS.items():
        kernel = fake.RawKernel(source(op, dtype), op.name)
        for n, vec, grid, block in [(103, 1, 3, 4), (103, 0, 2, 5), (8, 1, 1, 1), (1, 1, 2, 2)]:
            arrays = []
            for array_name in op.inputs:
                if array_name in op.masks:
                    arrays.append(rng.random(n) < 0.5)
                elif array_name in ("h", "v") and not name.startswith(("silu", "sigmoid", "gelu")):
                    arrays.append(rng.random(n).astype(dtype))  # second moments are >= 0
                else:
                    arrays.append((3 * rng.standard_normal(n)).astype(dtype))
            if n >= 8 and "x" in op.inputs:
                # NaN and the infinities must come out as the formula says (the NaN-keeping
                # min and max, exp of -inf); -0.0 keeps its sign.
                arrays[op.inputs.index("x")][:5] = [np.nan, np.inf, -np.inf, -0.0, 0.0]
            scalars = {s: float(rng.uniform(0.1, 0.9)) for s in op.scalars}
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is NaN by design
                expected = evaluate(op, np, [a.copy() for a in arrays], scalars)
            on_device = {a: fake.asarray(array.copy()) for a, array in zip(op.inputs, arrays)}
            for o in op.outputs:
                on_device.setdefault(o, fake.empty(n, bool if o in op.masks else dtype))
            names = [*op.inputs, *(o for o in op.outputs if o not in op.inputs)]
            args = [on_device[a] for a in names] + [dtype(scalars[s]) for s in op.scalars]
            kernel((grid,), (block,), (*args, np.int64(n), np.int32(vec)))
            for output, want in zip(op.outputs, expected):
                rtol = 1e-12 if dtype == np.float64 else 2e-6
                np.testing.assert_allclose(
                    on_device[output].get(), want, rtol=rtol, atol=rtol, err_msg=f"{name} {output}"
                )


def test_kernels_refuse_a_wrong_count_of_arrays(gpu: Any) -> None:
    # A kernel takes its arguments by position (and CuPy does not count them): one array too
    # many or too few would shift all the later ones, so the count is checked first.
    from scratchnn import kernels

    x = gpu.asarray(np.ones(8))
    with pytest.raises(TypeError, match=r"relu_backward takes 2 arrays \(dout, mask\), got 1"):
        kernels.run("relu_backward", x)
    with pytest.raises(TypeError, match="sgd takes 2 arrays"):
        kernels.run_many("sgd", [[x, x], [x, x, x]], lr=0.1)
    assert np.array_equal(to_host(x), np.ones(8))  # refused before any step


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_step_reads_scalars_from_the_gpu_as_it_runs(dtype: Any, gpu: Any) -> None:
    # Adam's step with its two folded bias corrections read from GPU memory (as a replayed
    # graph takes them) is the step with them given by value; next_row fills them in from
    # a table, row by row, and counts the rows. Another dtype is refused, and so is a
    # DeviceScalar where the fused kernel cannot run (NumPy arrays).
    from scratchnn import kernels
    from scratchnn.kernels.cuda import DeviceScalar, next_row

    if not hasattr(gpu, "RawModule"):
        pytest.skip("the fake CuPy without kernels runs no CUDA kernels")
    rng = np.random.default_rng(13)
    tensors = [[rng.standard_normal(n).astype(dtype) for _ in range(4)] for n in (37, 8, 1000)]
    for arrays in tensors:
        arrays[3] = np.abs(arrays[3])  # (v, a sum of squares)
    given = {"beta1": 0.9, "one_minus_beta1": 0.1, "beta2": 0.999, "one_minus_beta2": 1e-3}
    table = np.array([[31.25, 0.5], [0.0, 0.0], [17.5, 0.25]], dtype)
    results = []
    for by_value in (True, False):
        on_gpu = [[gpu.asarray(a.copy()) for a in arrays] for arrays in tensors]
        if by_value:
            kernels.run_many("adam", on_gpu, **given, inv_scale=17.5, eps_scaled=0.25)
        else:
            rows, row = gpu.asarray(table), gpu.asarray(np.full(2, np.nan, dtype))
            index = gpu.asarray(np.array([1], np.int64))
            next_row(gpu, rows, row, index)
            next_row(gpu, rows, row, index)  # rows 1 then 2
            assert to_host(index).tolist() == [3] and to_host(row).tolist() == [17.5, 0.25]
            at = {"inv_scale": DeviceScalar(row[0:1]), "eps_scaled": DeviceScalar(row[1:2])}
            kernels.run_many("adam", on_gpu, **given, **at)
        results.append([[to_host(a) for a in arrays] for arrays in on_gpu])
    for got, want in zip(results[1], results[0]):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(results[0][0][0], tensors[0][0])  # a step was taken
    other = np.float64 if dtype == np.float32 else np.float32
    wrong = DeviceScalar(gpu.asarray(np.ones(1, other)))
    arrays = [gpu.asarray(a) for a in tensors[0]]
    with pytest.raises(TypeError, match=f"one element of the kernel's dtype {np.dtype(dtype)}"):
        kernels.run_many("adam", [arrays], **given, inv_scale=wrong, eps_scaled=0.25)
    with pytest.raises(TypeError, match="scalars read from the GPU take its fused CUDA kernel"):
        kernels.run_many("adam", [tensors[0]], **given, inv_scale=wrong, eps_scaled=0.25)


def test_a_mask_of_another_shape_or_dtype_takes_the_array_calls_not_the_kernel(gpu: Any) -> None:
    # The kernel reads every array as dout's size: a (1,) mask beside a (1000,) dout was read
    # out of bounds (306 elements kept, AddressSanitizer's heap overflow), and a float mask
    # as bytes. The array calls broadcast, or refuse, as NumPy does.
    from scratchnn import kernels

    dout = np.random.default_rng(3).standard_normal(1000)
    for mask in (np.array([True]), np.array([False]), (dout > 0).astype(np.float64)):
        (dx,) = kernels.run("relu_backward", gpu.asarray(dout), gpu.asarray(mask))
        np.testing.assert_array_equal(to_host(dx), np.where(mask, 0.0, dout))
    with pytest.raises(ValueError):
        kernels.run("relu_backward", gpu.asarray(dout), gpu.asarray(np.ones(10, bool)))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_gelu_on_the_device_is_within_a_few_ulps_of_mpmath(dtype: Any, gpu: Any) -> None:
    # The float32 kernels compute Phi by our own erfcx fit and phi from the same exact
    # x*x (kernels/cuda.py, ncdf_float and npdf_float): libdevice's erfcf of the rounded
    # -x/sqrt(2) put y up to 187 ulps off in the left tail, and exp(-x*x/2) put dx 60 ulps
    # off. float64 carries -x/sqrt(2) and x*x to twice the precision (ncdf_double, and
    # functional.ncdf where the kernels do not run): 1,857 ulps off before. The reference
    # is mpmath at 40 digits.
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    rng = np.random.default_rng(5)
    far = 13.5 if dtype == np.float32 else 37.5
    x = np.concatenate([rng.uniform(-far, far, 2000), rng.uniform(-4, 4, 1000),
                        np.linspace(-far, -8, 300)]).astype(dtype)  # fmt: skip
    exact = [mpmath.mpf(float(v)) for v in x]
    y_ref = np.array([float(v * mpmath.ncdf(v)) for v in exact])
    dx_ref = np.array([float(mpmath.ncdf(v) + v * mpmath.npdf(v)) for v in exact])
    # dx's own size: the sum cancels to 0 at x = -0.7518, where no formula keeps ulps of it.
    dx_size = np.array([float(mpmath.ncdf(v) + abs(v * mpmath.npdf(v))) for v in exact])
    layer = snn.Gelu()
    y = to_host(layer.forward(gpu.asarray(x)))
    dx = to_host(layer.backward(gpu.ones(x.shape, dtype=dtype)))
    # A GPU flushes float32 subnormals to 0: where Phi(x) is one (x < -13.04) y is 0, and
    # where phi(x) is one (x < -13.1) so is x phi(x), normal or not.
    tiny = np.finfo(dtype).tiny
    phi_ref = np.array([float(mpmath.ncdf(v)) for v in exact])
    pdf_ref = np.array([float(mpmath.npdf(v)) for v in exact])
    normal = (np.abs(y_ref) >= tiny) & (phi_ref >= tiny)
    y_ulps = np.abs(y - y_ref) / np.spacing(np.abs(y_ref).astype(dtype))
    assert y_ulps[normal].max() <= 16, x[normal][np.argmax(y_ulps[normal])]
    normal = (dx_size >= tiny) & (phi_ref >= tiny) & (pdf_ref >= tiny)
    dx_ulps = np.abs(dx - dx_ref) / np.spacing(dx_size.astype(dtype))
    assert dx_ulps[normal].max() <= 16, x[normal][np.argmax(dx_ulps[normal])]
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 20.0, -50.0], dtype=dtype)
    layer = snn.Gelu()
    y_special = to_host(layer.forward(gpu.asarray(special)))
    np.testing.assert_array_equal(y_special, [0.0, -0.0, np.inf, np.nan, np.nan, 20.0, -0.0])
    # inf * phi(inf) = inf * 0: NaN, as in PyTorch.
    dx_special = to_host(layer.backward(gpu.ones(special.shape, dtype=dtype)))
    np.testing.assert_array_equal(dx_special, [0.5, 0.5, np.nan, np.nan, np.nan, 1.0, 0.0])


def test_the_float32_ncdf_coefficients_are_the_fit_of_scripts_fit_ncdf() -> None:
    # The kernel's polynomial is the script's output (to a float32 rounding: another
    # BLAS may move the fit's last digits), and the fit is as close as it says.
    from scratchnn.kernels import cuda

    script = load_script("scripts/fit_ncdf.py", "fit_ncdf")
    coefficients, error = script.fit()
    assert error < 1e-8
    horner = cuda._NCDF["float"].split("float q = ")[1].split("const float square")[0]
    in_kernel = re.findall(r"([-0-9.e+]+)f\)?;", horner)
    assert len(in_kernel) == script.DEGREE + 1
    np.testing.assert_allclose([float(c) for c in reversed(in_kernel)], coefficients, rtol=1e-6)


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_the_cpu_stand_in_stops_a_kernel_it_took_for_one_that_does_not_wait(
    tmp_path: Path,
) -> None:
    # Where _synchronises misses a wait (here a macro that calls a helper which waits), the
    # kernel's threads run one at a time, where a barrier would fault or wait forever: the
    # launch stops the process with a message that says so.
    code = (
        "__device__ void all_wait() { __syncthreads(); }\n"
        "#define WAIT() all_wait()\n"
        'extern "C" __global__ void hidden(float* out) { out[threadIdx.x] = 1; WAIT(); }\n'
    )
    assert not fake_cuda._synchronises(code, "hidden")  # the blind spot this guards
    script = tmp_path / "run.py"
    script.write_text(
        "import sys, numpy as np\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import fake_cuda, fake_cupy\n"
        "cupy = fake_cupy.make_module()\n"
        "fake_cuda.install(cupy)\n"
        f"kernel = cupy.RawKernel({code!r}, 'hidden')\n"
        "kernel((1,), (4,), (cupy.zeros(4, dtype=np.float32),))\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert "__syncthreads in a kernel run one thread at a time" in result.stderr, result.stderr


def test_the_cpu_stand_in_decides_per_kernel_which_ones_synchronise() -> None:
    # A synchronising kernel runs its block's threads as OS threads, the others one after
    # another (fast): decided from each kernel's own body and the device functions it calls
    # (through others too), whatever the order of definitions; a __syncthreads outside
    # every function (a macro) counts for every kernel, one in a comment for none.
    plain = 'extern "C" __global__ void plain(float* out) { if (1) { out[threadIdx.x] = 1; } }\n'
    waits = 'extern "C" __global__ void waits(float* out) { { out[0] = 0; } __syncthreads(); }\n'
    helper = "// all_wait(x) waits\n__device__ void all_wait() { if (1) { __syncthreads(); } }\n"
    via = "template <int N> __device__ void via(float* a) { for (;;) { all_wait(); } }\n"
    calls = 'extern "C" __global__ void calls(float* out) { via<1>(out); }\n'
    for code in (plain + waits, waits + plain):
        assert not fake_cuda._synchronises(code, "plain")
        assert fake_cuda._synchronises(code, "waits")
    for code in (helper + via + plain + calls, plain + helper + via + calls):
        assert not fake_cuda._synchronises(code, "plain")
        assert fake_cuda._synchronises(code, "calls")
    assert not fake_cuda._synchronises(plain + "/* __syncthreads(); */", "plain")
    assert fake_cuda._synchronises("#define WAIT __syncthreads()\n" + plain, "plain")
