"""Affine on the GPU: its bias kernels (scratchnn.kernels.bias), its products by cuBLAS
directly (scratchnn.kernels.products), and an Affine with the Relu after it run as one
pair; on the fake device and, where present, a GPU (the ``gpu`` fixture, conftest.py)."""

from __future__ import annotations

import ctypes
import functools
import math
import shutil
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fake_cupy
import numpy as np
import pytest

import scratchnn as snn
from scratchnn.backend import to_host

# -- Affine's bias kernels (scratchnn.kernels.bias) -----------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (40, 100), (513, 33), (4096, 3), (4097, 3),
                                   (0, 4), (6, 0)])  # fmt: skip
def test_the_bias_kernels_add_and_sum_as_exactly_as_numpy(
    shape: Any, dtype: Any, gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # add_bias adds as NumPy does, bit for bit; column_sum sums in double, so a float32 sum
    # is the exact sum rounded once (within 1 ulp here), a float64 one within a few ulps
    # of the sum of its |terms|. Beyond MAX_ROWS (4097 rows), for empty matrices, and where
    # CuPy compiles no kernels, CuPy's own calls: any order of summation's bound.
    from scratchnn.kernels import bias

    launched: list[str] = []
    kernel = bias._kernel
    monkeypatch.setattr(bias, "_kernel", lambda *a: launched.append(a[2]) or kernel(*a))
    rng = np.random.default_rng(7)
    g_host = rng.standard_normal(shape).astype(dtype)
    b_host = rng.standard_normal(shape[1]).astype(dtype)
    out = gpu.asarray(g_host)
    bias.add_bias(out, gpu.asarray(b_host))
    np.testing.assert_array_equal(to_host(out), g_host + b_host)
    sums = to_host(bias.column_sum(gpu.asarray(g_host)))
    assert sums.dtype == dtype and sums.shape == (shape[1],)
    exact = np.array([math.fsum(column) for column in g_host.T.tolist()])
    kernels = hasattr(gpu, "RawModule")
    expected = (["add_bias"] if kernels and g_host.size else []) + (
        ["column_sum"] if kernels and 0 < shape[0] <= bias.MAX_ROWS and shape[1] else [])
    assert launched == expected
    eps, scale = np.finfo(dtype).eps, np.abs(g_host).sum(axis=0)
    if "column_sum" not in launched:
        assert (np.abs(sums - exact) <= shape[0] * eps * scale).all()
    elif dtype == np.float32:
        ulps = np.abs(sums - exact) / np.spacing(np.abs(exact).astype(np.float32))
        assert ulps.max(initial=0) <= 1
    else:
        assert (np.abs(sums - exact) <= 4 * eps * scale).all()


def test_the_bias_kernels_leave_other_layouts_to_cupy(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A view with strides, a bias of another dtype: CuPy's own calls, right all the same.
    from scratchnn.kernels import bias

    launched: list[str] = []
    kernel = bias._kernel
    monkeypatch.setattr(bias, "_kernel", lambda *a: launched.append(a[2]) or kernel(*a))
    rng = np.random.default_rng(8)
    g_host = rng.standard_normal((30, 16)).astype(np.float32)
    strided = gpu.asarray(g_host)[:, ::2]
    np.testing.assert_allclose(to_host(bias.column_sum(strided)), g_host[:, ::2].sum(axis=0),
                               rtol=1e-5)  # fmt: skip
    out = gpu.asarray(g_host)
    b64 = rng.standard_normal(16)
    bias.add_bias(out, gpu.asarray(b64))
    np.testing.assert_array_equal(to_host(out), (g_host + b64).astype(np.float32))
    bias.add_bias(strided, gpu.asarray(b_host := np.ones(8, np.float32)))
    np.testing.assert_array_equal(to_host(strided), g_host[:, ::2] + b_host)
    assert launched == []


# -- matrix products by cuBLAS directly (scratchnn.kernels.products) ------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shapes", [((5, 7), (7, 3)), ((1, 4), (4, 1)), ((6, 1), (1, 5)),
                                    ((33, 64), (64, 17))])  # fmt: skip
def test_products_are_cupys_for_every_layout_a_step_uses(
    shapes: Any, dtype: Any, gpu: Any
) -> None:
    # x @ W, x.T @ g and g @ W.T: C-contiguous matrices and transposed views, on either
    # side, against NumPy's product in float64 (on the CPU, cuBLAS is a stand-in that
    # reads and writes the arrays at the addresses passed, column-major, as cuBLAS does).
    from scratchnn.kernels import products

    rng = np.random.default_rng(22)
    (n, k), (_, m) = shapes
    a_host, b_host = rng.standard_normal((n, k)), rng.standard_normal((k, m))
    a, b = gpu.asarray(a_host.astype(dtype)), gpu.asarray(b_host.astype(dtype))
    a_t = gpu.asarray(np.ascontiguousarray(a_host.T).astype(dtype)).T  # a transposed view
    b_t = gpu.asarray(np.ascontiguousarray(b_host.T).astype(dtype)).T
    # Views at an offset: a batch's rows of a larger matrix, and a transposed view of one.
    a_rows = gpu.asarray(np.vstack([np.ones((1, k)), a_host, np.ones((2, k))]).astype(dtype))
    a_rows = a_rows[1 : n + 1]
    b_cols = gpu.asarray(np.vstack([np.ones((3, k)), b_host.T]).astype(dtype))[3:].T
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    for x, y in ((a, b), (a_t, b), (a, b_t), (a_t, b_t), (a_rows, b_cols), (a_rows, b)):
        got = products.matmul(x, y)
        assert got.dtype == dtype and got.shape == (n, m)
        np.testing.assert_allclose(to_host(got), a_host @ b_host, rtol=rtol, atol=rtol)
    binding = hasattr(gpu, "RawModule")  # (the fake CuPy with kernels has the stand-in)
    made = products._gemms[(type(a), a.dtype)]
    assert (made is not None) == binding
    if binding:
        assert products.disabled == {}
    else:  # the stand-in without one: said, and CuPy's products
        assert "cupy_backends" in products.disabled[np.dtype(dtype).name]


def test_products_leave_float32_to_cupy_where_cupy_computes_in_tf32(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CUPY_TF32 set: CuPy's float32 products round their inputs to TF32, which sgemm would
    # not; CuPy's products then, said in `disabled`. float64 is not affected.
    from scratchnn.kernels import products

    if not hasattr(gpu, "RawModule"):
        pytest.skip("the fake CuPy without kernels has no stand-in for cuBLAS")
    monkeypatch.setenv("CUPY_TF32", "1")
    a32, b32 = gpu.ones((3, 4), dtype=np.float32), gpu.ones((4, 2), dtype=np.float32)
    np.testing.assert_array_equal(to_host(products.matmul(a32, b32)), np.full((3, 2), 4.0))
    assert products._gemms[(type(a32), a32.dtype)] is None
    assert "CUPY_TF32" in products.disabled["float32"]
    a64 = gpu.ones((3, 4), dtype=np.float64)
    products.matmul(a64, gpu.ones((4, 2), dtype=np.float64))
    assert products._gemms[(type(a64), a64.dtype)] is not None


def test_products_leave_other_arrays_to_cupy_and_a_refusing_binding_off(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # float16, a strided view, mixed dtypes, an empty matrix, NumPy arrays: a @ b; a
    # binding that refuses its call (unlike CuPy 14's) is said in `disabled` and CuPy's
    # products take over, right.
    from scratchnn.kernels import products

    if not hasattr(gpu, "RawModule"):
        pytest.skip("the fake CuPy without kernels has no stand-in for cuBLAS")
    rng = np.random.default_rng(23)
    a_host, b_host = rng.standard_normal((6, 8)), rng.standard_normal((8, 4))
    calls: list[int] = []
    a, b = gpu.asarray(a_host), gpu.asarray(b_host)
    products.matmul(a, b)  # (made at its first use)
    gemm = products._gemms[(type(a), a.dtype)]
    original = gemm.gemm
    monkeypatch.setattr(gemm, "gemm", lambda *args: calls.append(1) or original(*args))
    cases = [
        (gpu.asarray(a_host.astype(np.float16)), gpu.asarray(b_host.astype(np.float16))),
        (gpu.asarray(np.repeat(a_host, 2, axis=1))[:, ::2], gpu.asarray(b_host)),
        (gpu.asarray(a_host), gpu.asarray(b_host.astype(np.float32))),
        (gpu.asarray(a_host[:0]), gpu.asarray(b_host)),
    ]
    for x, y in cases:
        np.testing.assert_allclose(to_host(products.matmul(x, y)),
                                   to_host(x).astype(np.float64) @ to_host(y), rtol=1e-2)  # fmt: skip
    assert products.matmul(a_host, b_host) is not None and calls == []
    np.testing.assert_allclose(to_host(products.matmul(gpu.asarray(a_host), gpu.asarray(b_host))),
                               a_host @ b_host, rtol=1e-12)  # fmt: skip
    assert calls == [1]

    def refuses(*args: Any) -> None:
        raise TypeError("an argument of another type")

    monkeypatch.setattr(gemm, "gemm", refuses)
    np.testing.assert_allclose(to_host(products.matmul(gpu.asarray(a_host), gpu.asarray(b_host))),
                               a_host @ b_host, rtol=1e-12)  # fmt: skip
    assert "TypeError" in products.disabled["float64"]
    assert products._gemms[(type(a), a.dtype)] is None  # from then on, CuPy's products


def test_products_in_a_capture_are_cublas_librarys_on_the_capturing_stream(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Within products.capturing(stream), every layout a step uses is made by cuBLAS's C
    # library on scratchnn's own handle, bound to that stream with its own workspace: the
    # products are captured into a CUDA graph, which replayed on new inputs in the same
    # arrays gives their products. (On the CPU the stand-in records the launches and the
    # products by address and replays them; CuPy's binding refuses a capture, as CuPy 14's
    # does.) Outside, the products are CuPy's binding's again; the handle is made once.
    from scratchnn.kernels import products

    if not hasattr(gpu, "RawModule"):
        pytest.skip("the fake CuPy without kernels has no stand-in for cuBLAS")
    monkeypatch.delenv("CUPY_TF32", raising=False)
    rng = np.random.default_rng(24)
    library = getattr(gpu, "cublas_library", None)  # the stand-in's, on the CPU
    for dtype, rtol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        a = gpu.asarray(rng.standard_normal((9, 6)).astype(dtype))
        b_t = gpu.asarray(rng.standard_normal((5, 6)).astype(dtype)).T  # a transposed view
        g = gpu.asarray(rng.standard_normal((9, 5)).astype(dtype))
        stream = gpu.cuda.Stream(non_blocking=True)
        gpu.cuda.Device().synchronize()  # the inputs are made before the stream reads them
        with products.capturing(stream), stream:
            stream.begin_capture()
            outs = [products.matmul(a, b_t), products.matmul(a.T, g), products.matmul(g, b_t.T)]
            graph = stream.end_capture()
        if library is not None:
            name = "sgemm" if dtype == np.float32 else "dgemm"
            workspace = (products._own[0].workspace.data.ptr, products.WORKSPACE_BYTES)
            assert library.products == [(name, stream.ptr, workspace)] * 3
            assert library.math_mode == 0
            library.products.clear()
        # New inputs in the same arrays, the graph replayed.
        a_host, b_host = rng.standard_normal((9, 6)), rng.standard_normal((6, 5))
        gpu.copyto(a, gpu.asarray(a_host.astype(dtype)))
        gpu.copyto(b_t, gpu.asarray(b_host.astype(dtype)))
        graph.launch()  # on the current stream, after the copies, as a step's replay is
        gpu.cuda.Device().synchronize()
        g_host = to_host(g).astype(np.float64)
        for got, want in zip(outs, (a_host @ b_host, a_host.T @ g_host, g_host @ b_host.T)):
            assert got.dtype == dtype
            np.testing.assert_allclose(to_host(got), want, rtol=rtol, atol=rtol)
        outside = products.matmul(a, b_t)  # CuPy's binding again
        np.testing.assert_allclose(to_host(outside), a_host @ b_host, rtol=rtol, atol=rtol)
        assert library is None or library.products == []
    assert len(products._own) == 1 and (library is None or library.handles == 1)


def test_a_captures_products_pass_through_ctypes_as_cublas_takes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Real ctypes against a C library with cuBLAS's prototypes (tests/cublas_stub.c): the
    # handle made through a pointer, the stream, a workspace and the math mode set on it,
    # and every layout a step uses, float32 and float64, through products.capturing: the
    # products right against NumPy, made on the handle bound to the stream.
    from scratchnn.kernels import products

    if shutil.which("gcc") is None:
        pytest.skip("no C compiler (gcc) to build the stand-in cuBLAS library")
    library_path = tmp_path / "libcublas_stub.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(library_path),
                    str(Path(__file__).with_name("cublas_stub.c"))], check=True)  # fmt: skip
    gpu = fake_cupy.install(monkeypatch, kernels=True)
    library = ctypes.CDLL(str(library_path))
    monkeypatch.setattr(products, "_load_cublas", lambda: library)
    monkeypatch.setenv("CUPY_TF32", "1")
    stream = gpu.cuda.Stream(non_blocking=True)
    rng = np.random.default_rng(25)
    made = 0
    for dtype, rtol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        a_host, b_host = rng.standard_normal((9, 6)), rng.standard_normal((6, 5))
        g_host = rng.standard_normal((9, 5))
        a, g = gpu.asarray(a_host.astype(dtype)), gpu.asarray(g_host.astype(dtype))
        b_t = gpu.asarray(np.ascontiguousarray(b_host.T).astype(dtype)).T
        with products.capturing(stream):
            outs = [products.matmul(a, b_t), products.matmul(a.T, g), products.matmul(g, b_t.T)]
        made += 3
        wants = (a_host @ b_host, a_host.T @ g_host, g_host @ b_host.T)
        for got, want in zip(outs, wants):
            np.testing.assert_allclose(to_host(got), want, rtol=rtol, atol=rtol)
    handle = ctypes.c_void_p(products._own[0].handle)
    library.stub_stream.restype = ctypes.c_void_p
    library.stub_workspace_bytes.restype = ctypes.c_size_t
    assert library.stub_stream(handle) == stream.ptr
    assert library.stub_workspace_bytes(handle) == products.WORKSPACE_BYTES
    assert library.stub_math_mode(handle) == 3  # (CUPY_TF32: CuPy's float32 precision)
    assert library.stub_products(handle) == made


def test_a_capture_takes_cupys_precision_and_says_what_cublas_refused(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CUPY_TF32 set: the own handle computes as CuPy's float32 products then do (TF32 math
    # mode), and back to the default once it is unset. A status other than success from
    # cuBLAS's library is a RuntimeError that names the function.
    from scratchnn.kernels import products

    if not hasattr(gpu, "cublas_library"):
        pytest.skip("the stand-in for cuBLAS's library (on a card: the replay test above)")
    library, stream = gpu.cublas_library, types.SimpleNamespace(ptr=5)
    monkeypatch.setenv("CUPY_TF32", "1")
    with products.capturing(stream):
        pass
    assert library.math_mode == 3
    monkeypatch.setenv("CUPY_TF32", "0")
    with products.capturing(stream):
        pass
    assert library.math_mode == 0
    monkeypatch.setattr(products, "WORKSPACE_BYTES", 0)  # refused by the stand-in
    with pytest.raises(RuntimeError, match="cublasSetWorkspace_v2 returned status 7"):
        with products.capturing(stream):
            pass
    a = gpu.ones((2, 2), dtype=np.float32)
    assert products._gemms.get((type(a), a.dtype)) is None  # nothing of the capture left


def test_cublas_library_is_the_loaded_one_else_the_one_of_cupys_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A capture's products call the cuBLAS library CuPy loaded (its handle made first, for
    # a CuPy that loads it at its first use), else the library of the major version CuPy's
    # cuBLAS reports; none loading is a RuntimeError naming each tried.
    from scratchnn.kernels import products

    load = products._load_cublas  # (the stand-in installed below replaces it)
    fake_cupy.install(monkeypatch, kernels=True)
    cublas = sys.modules["cupy_backends.cuda.libs.cublas"]
    monkeypatch.setattr(cublas, "getVersion", lambda handle: 120805, raising=False)
    monkeypatch.setattr(products, "loaded", lambda prefix, maps: ["/gone/libcublas.so.12.8"])
    tried: list[str] = []

    def opens(name: str, works: str = "libcublas.so.12") -> Any:
        tried.append(name)
        if name != works:
            raise OSError(f"{name}: cannot open shared object file")
        return types.SimpleNamespace(name=name)

    monkeypatch.setattr(products.ctypes, "CDLL", opens)
    assert load().name == "libcublas.so.12"
    assert tried == ["/gone/libcublas.so.12.8", "libcublas.so.12"]
    monkeypatch.setattr(products.ctypes, "CDLL", functools.partial(opens, works="none"))
    with pytest.raises(RuntimeError, match=r"not found \(tried /gone/libcublas.so.12.8, "
                                           r"libcublas.so.12\)"):  # fmt: skip
        load()


def test_the_loaded_libraries_are_read_from_the_process_maps() -> None:
    # Where cuBLAS's library is found for a capture: the paths in /proc/self/maps whose
    # file name starts so, once each, in order; libcublasLt is another library.
    from scratchnn.kernels import products

    maps = "\n".join([
        "7f00-7f10 r-xp 00000000 08:01 42   /opt/cuda/lib/libcublas.so.12.4.5.8",
        "7f10-7f20 r--p 00001000 08:01 42   /opt/cuda/lib/libcublas.so.12.4.5.8",
        "7f20-7f30 r-xp 00000000 08:01 43   /opt/cuda/lib/libcublasLt.so.12",
        "7f30-7f40 rw-p 00000000 00:00 0 ",
        "7f40-7f50 r-xp 00000000 08:01 44   /usr/lib/my dir/libcublas.so.13",
        "7f50-7f60 rw-p 00000000 00:00 0    [heap]",
    ])  # fmt: skip
    assert products.loaded("libcublas.so", maps) == [
        "/opt/cuda/lib/libcublas.so.12.4.5.8", "/usr/lib/my dir/libcublas.so.13"]
    if Path("/proc/self/maps").exists():  # this process's own: its C library is there
        real = products.loaded("libc.so", Path("/proc/self/maps").read_text())
        assert real and all(Path(path).exists() for path in real)


# -- an Affine and the Relu after it, run as one pair (Sequential on the GPU) ---------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (40, 100), (513, 33), (4096, 3), (4097, 3),
                                   (0, 4), (6, 0)])  # fmt: skip
def test_the_pair_kernels_compute_the_separate_calls_bit_for_bit(
    shape: Any, dtype: Any, gpu: Any
) -> None:
    # add_bias_relu is h + b, then ReLU (off where <= 0, so -0 and NaN's comparison count as
    # NumPy's: NaN passes), in place; relu_column_sum is ReLU's backward where(mask, 0,
    # dout) and its column sums, summed as column_sum sums. None where they do not apply
    # (no kernels, empty, beyond MAX_ROWS): the caller then makes the separate calls.
    from scratchnn.kernels import bias

    rng = np.random.default_rng(9)
    rows, cols = shape
    h_host = rng.standard_normal(shape).astype(dtype)
    b_host = rng.standard_normal(cols).astype(dtype)
    if h_host.size > 2:  # a sum of exactly 0, a -0, a NaN
        h_host[0, 0], h_host.flat[1], h_host.flat[2] = -b_host[0], -0.0, np.nan
        b_host[1 % cols] = 0.0 if cols > 1 else b_host[0]
    out = gpu.asarray(h_host)
    mask = bias.add_bias_relu(out, gpu.asarray(b_host))
    kernels = hasattr(gpu, "RawModule")
    if not kernels or h_host.size == 0:
        assert mask is None
        np.testing.assert_array_equal(to_host(out), h_host)  # left for the separate calls
    else:
        summed = h_host + b_host
        expected = np.where(summed <= 0, 0.0, summed).astype(dtype)
        np.testing.assert_array_equal(to_host(mask), summed <= 0)
        np.testing.assert_array_equal(to_host(out), expected)
        assert (np.signbit(to_host(out)) == np.signbit(expected)).all()  # 0 where off, not -0

    dout_host = rng.standard_normal(shape).astype(dtype)
    off_host = rng.random(shape) < 0.5
    fused = bias.relu_column_sum(gpu.asarray(dout_host), gpu.asarray(off_host))
    if not kernels or not 0 < rows <= bias.MAX_ROWS or not cols:
        assert fused is None
        return
    assert fused is not None
    g, db = fused
    through = np.where(off_host, 0.0, dout_host).astype(dtype)
    np.testing.assert_array_equal(to_host(g), through)
    assert (np.signbit(to_host(g)) == np.signbit(through)).all()
    np.testing.assert_array_equal(to_host(db), to_host(bias.column_sum(gpu.asarray(through))))
    assert to_host(db).dtype == dtype


# A float32 network's gradients against the same network's in float64 on the host.
_GRADIENT_TOLERANCE: dict[Any, dict[str, float]] = {
    np.float64: {"rtol": 1e-9, "atol": 1e-12}, np.float32: {"rtol": 1e-3, "atol": 2e-5}}  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_loss_forward_writes_backwards_gradient_bit_for_bit(dtype: Any, gpu: Any) -> None:
    # with_grad (Sequential.gradient on the GPU): the forward's launch writes what
    # backward(1.0) would launch a kernel for, bit for bit; backward(1.0) takes it once,
    # another dout (or a second call) computes afresh, and the next forward starts over.
    # Labels out of range get no one-hot entry there either.
    rng = np.random.default_rng(18)
    x_host = rng.standard_normal((33, 7)).astype(dtype)
    t_host = rng.integers(0, 7, 33)
    x, t = gpu.asarray(x_host), gpu.asarray(t_host)
    apart = snn.SoftmaxWithLoss()
    loss_apart = float(apart._checked_forward(x, t, borrowed=True))
    expected = to_host(apart.backward(1.0))
    fused = snn.SoftmaxWithLoss()
    loss = float(fused._checked_forward(x, t, borrowed=True, with_grad=True))
    assert loss == loss_apart
    first = fused.backward(1.0)
    np.testing.assert_array_equal(to_host(first), expected)
    assert fused._grad_of_one is None  # taken: a second backward computes its own
    second = fused.backward(1.0)
    assert second is not first
    np.testing.assert_array_equal(to_host(second), expected)
    np.testing.assert_array_equal(to_host(fused.backward(2.0)), to_host(apart.backward(2.0)))
    fused._checked_forward(x, t, borrowed=True, with_grad=True)
    fused._checked_forward(x, t, borrowed=True)  # a forward without: nothing left over
    assert fused._grad_of_one is None
    if not hasattr(gpu, "RawModule"):  # (without kernels the forward checks labels at once)
        return
    bad = gpu.asarray(np.where(np.arange(33) == 4, 9, t_host))  # row 4: label out of range
    fused._checked_forward(x, bad, borrowed=True, wait=False, with_grad=True)
    apart._checked_forward(x, bad, borrowed=True, wait=False)
    np.testing.assert_array_equal(to_host(fused.backward(1.0)), to_host(apart.backward(1.0)))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_the_loss_adds_the_last_affines_bias_as_the_affine_would(dtype: Any, gpu: Any) -> None:
    # bias (Sequential.gradient on the GPU, the last Affine's): the loss's kernel takes the
    # scores as x + b, bit for bit the scores the Affine would have made (its softmax, its
    # loss, its gradient), a NaN in a row included; float16 (no kernel) adds them first.
    rng = np.random.default_rng(19)
    x_host = rng.standard_normal((20, 6)).astype(dtype)
    x_host[3, 2] = np.nan
    b_host = rng.standard_normal(6).astype(dtype)
    t = gpu.asarray(rng.integers(0, 6, 20))
    scores = gpu.asarray(x_host)
    snn.Affine(np.eye(6, dtype=dtype), gpu.asarray(b_host))  # (the check of a bias's dtype)
    from scratchnn.kernels import bias as bias_kernels

    bias_kernels.add_bias(scores, gpu.asarray(b_host))  # as the Affine adds it
    apart = snn.SoftmaxWithLoss()
    loss_apart = float(apart._checked_forward(scores, t, borrowed=True, wait=False))
    fused = snn.SoftmaxWithLoss()
    loss = float(fused._checked_forward(gpu.asarray(x_host), t, borrowed=True, wait=False,
                                        with_grad=True, bias=gpu.asarray(b_host)))  # fmt: skip
    assert np.isnan(loss) and np.isnan(loss_apart)  # the NaN row's loss, in both
    np.testing.assert_array_equal(to_host(fused.y), to_host(apart.y))
    np.testing.assert_array_equal(to_host(fused.backward(1.0)), to_host(apart.backward(1.0)))
    x_host[3, 2] = 0.5  # and a loss to compare
    scores = gpu.asarray(x_host)
    bias_kernels.add_bias(scores, gpu.asarray(b_host))
    loss_apart = float(apart._checked_forward(scores, t, borrowed=True))
    loss = float(fused._checked_forward(gpu.asarray(x_host), t, borrowed=True, with_grad=True,
                                        bias=gpu.asarray(b_host)))  # fmt: skip
    assert loss == loss_apart
    np.testing.assert_array_equal(to_host(fused.backward(1.0)), to_host(apart.backward(1.0)))


def _pair_launches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of kernels.bias's kernels as they are launched, from now on."""
    from scratchnn.kernels import bias

    launched: list[str] = []
    kernel = bias._kernel
    monkeypatch.setattr(bias, "_kernel", lambda *a: launched.append(a[2]) or kernel(*a))
    return launched


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("batch", [8, 4097])
def test_a_network_runs_each_affine_and_its_relu_as_one_pair_bit_for_bit(
    dtype: Any, batch: int, gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sequential.gradient on the GPU pairs each Affine with the Relu after it: two launches
    # fewer each way, and every gradient, and what every layer holds for its own backward,
    # as the layers run one by one compute it, bit for bit. (4097 rows: beyond MAX_ROWS the
    # backward's pair kernel does not apply, and the pair makes the separate calls.)
    from scratchnn.kernels import bias
    from scratchnn.models import Sequential

    rng = np.random.default_rng(10)
    x_host = rng.standard_normal((batch, 30)).astype(dtype)
    t_host = rng.integers(0, 5, batch)
    runs = []
    launches = _pair_launches(monkeypatch)
    for paired in (True, False):
        monkeypatch.setattr(Sequential, "fuse_on_gpu", paired)
        net = snn.mlp([30, 16, 12, 5], rng=np.random.default_rng(11), dtype=dtype).to("cuda")
        for layer in net.layers[::2]:  # biases that are not zero, so a lost one shows
            layer.b[...] = gpu.asarray(np.random.default_rng(12).standard_normal(layer.b.size))
        start = len(launches)
        grads = net.gradient(gpu.asarray(x_host), gpu.asarray(t_host))
        launched = launches[start:]
        held = [to_host(getattr(layer, name)) for layer in net.layers
                for name in ("x", "dW", "db", "mask") if getattr(layer, name, None) is not None]  # fmt: skip
        runs.append(({k: to_host(v) for k, v in grads.items()}, held, launched, net))
        runs[-1][1].append(np.array(net.last_loss))
    (grads, held, launched, net), (grads_apart, held_apart, launched_apart, _) = runs
    assert sorted(grads) == sorted(grads_apart)
    for key in grads:
        np.testing.assert_array_equal(grads[key], grads_apart[key], err_msg=key)
    # x, dW, db of each Affine; 2 masks; the loss
    assert len(held) == len(held_apart) == 3 + 3 + 3 + 2 + 1
    for mine, theirs in zip(held, held_apart):
        np.testing.assert_array_equal(mine, theirs)
    reference = snn.mlp([30, 16, 12, 5], rng=np.random.default_rng(11), dtype=np.float64)
    for layer, moved in zip(reference.layers[::2], net.layers[::2]):
        layer.b[...] = to_host(moved.b)
    expected = reference.gradient(x_host.astype(np.float64), t_host)
    for key in grads:  # and right: against NumPy in float64
        np.testing.assert_allclose(grads[key], expected[key], **_GRADIENT_TOLERANCE[dtype])
    if not hasattr(gpu, "RawModule"):
        assert launched == launched_apart == []
        return
    assert launched_apart == ["add_bias"] * 3 + (["column_sum"] * 3 if batch <= bias.MAX_ROWS else [])
    backward = ["column_sum", "relu_column_sum", "relu_column_sum"] * (batch <= bias.MAX_ROWS)
    # (the last Affine's bias: added by the loss's kernel, as the step runs on)
    assert launched == ["add_bias_relu", "add_bias_relu", *backward]
    # The layers still work one by one after a paired step, from what each holds.
    relu = net.layers[3]
    dout = gpu.asarray(rng.standard_normal((batch, 12)).astype(dtype))
    np.testing.assert_array_equal(to_host(relu.backward(dout)),
                                  np.where(to_host(relu.mask), 0.0, to_host(dout)))  # fmt: skip


def _fused_and_apart(
    monkeypatch: pytest.MonkeyPatch, make_net: Callable[[], Any], x: Any, t: Any
) -> list[tuple[dict[str, np.ndarray], float, np.ndarray, np.ndarray]]:
    """One gradient step of a fresh ``make_net()`` with the GPU's fusions on, then one with
    them off: each its gradients, its loss, its first Relu's mask and its loss's y."""
    from scratchnn.models import Sequential

    results = []
    for fused in (True, False):
        monkeypatch.setattr(Sequential, "fuse_on_gpu", fused)
        net = make_net()
        grads = net.gradient(x, t)
        results.append(({k: to_host(v) for k, v in grads.items()}, net.last_loss,
                        to_host(net.layers[1].mask), to_host(net.last_layer.y)))  # fmt: skip
    return results


@pytest.mark.parametrize(("net_dtype", "x_dtype", "last_bias_dtype"), [
    (np.float16, np.float16, np.float16), (np.float32, np.float64, np.float32),
    (np.float64, np.float32, np.float64), (np.float32, np.float32, np.float64),
    (np.float16, np.float16, np.float32)])  # fmt: skip
def test_fusions_of_other_dtypes_compute_what_the_layers_apart_do(
    net_dtype: Any, x_dtype: Any, last_bias_dtype: Any, gpu: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # float16 (no kernel: the separate calls), an input of another float dtype than the
    # weights (the Affine casts it), and a last bias set later in another dtype (the
    # constructor refuses one, an assignment does not; the Affine adds it in place, in its
    # product's dtype, and the loss that takes it must too: a review found it added out of
    # place, in the wider dtype): the same gradients, loss, mask and softmax as apart.
    rng = np.random.default_rng(16)
    x_host, t_host = rng.standard_normal((9, 12)).astype(x_dtype), rng.integers(0, 4, 9)
    b1, b2 = rng.standard_normal(8), rng.standard_normal(4).astype(last_bias_dtype)

    def make_net() -> Any:
        net = snn.mlp([12, 8, 4], rng=np.random.default_rng(17), dtype=net_dtype).to("cuda")
        net.layers[0].b[...] = gpu.asarray(b1)
        net.layers[2].b = gpu.asarray(b2)
        return net

    (grads, loss, mask, y), (grads_apart, loss_apart, mask_apart, y_apart) = _fused_and_apart(
        monkeypatch, make_net, gpu.asarray(x_host), gpu.asarray(t_host)
    )
    assert loss == loss_apart and y.dtype == y_apart.dtype
    np.testing.assert_array_equal(mask, mask_apart)
    np.testing.assert_array_equal(y, y_apart)
    for key in grads:
        np.testing.assert_array_equal(grads[key], grads_apart[key], err_msg=key)
        assert grads[key].dtype == net_dtype


def _small_relu_case(seed: int) -> tuple[Any, ...]:
    """A 6-4-3 network's weights and biases, a batch and its labels, and the gradients the
    layers give on the host (the reference): W1, b1, W2, b2, x, t, gradients."""
    rng = np.random.default_rng(seed)
    W1, W2 = rng.standard_normal((6, 4)), rng.standard_normal((4, 3))
    b1, b2 = rng.standard_normal(4), rng.standard_normal(3)
    x_host, t_host = rng.standard_normal((5, 6)), rng.integers(0, 3, 5)
    net = snn.Sequential([snn.Affine(W1, b1), snn.Relu(), snn.Affine(W2, b2)])
    return W1, b1, W2, b2, x_host, t_host, net.gradient(x_host, t_host)


def test_a_network_pairs_only_its_own_affine_and_an_unpacked_relu(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A packed Relu keeps bits, not the mask the pair's backward reads; a subclass of Affine
    # may compute otherwise: both run one by one, and right.
    if not hasattr(gpu, "RawModule"):
        pytest.skip("the fake CuPy without kernels pairs nothing")

    class MyAffine(snn.Affine):
        pass

    W1, b1, W2, b2, x_host, t_host, expected = _small_relu_case(13)
    launches = _pair_launches(monkeypatch)
    for first, relu in ((snn.Affine, snn.Relu(packed=True)), (MyAffine, snn.Relu())):
        net = snn.Sequential([first(W1, b1), relu, snn.Affine(W2, b2)]).to("cuda")
        start = len(launches)
        grads = net.gradient(gpu.asarray(x_host), gpu.asarray(t_host))
        assert launches[start:] == ["add_bias"] + ["column_sum"] * 2  # (the last: the loss's)
        for key in expected:
            np.testing.assert_allclose(to_host(grads[key]), expected[key], rtol=1e-12, atol=1e-14)


def test_a_pair_steps_aside_for_hooks_subclasses_and_a_dout_its_relu_would_refuse(
    gpu: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A subclass of Affine with the book's own _forward(x) and _backward(dout) runs on the
    # GPU as before; a backward replaced on a Relu (a hook) is called; and a dout of the
    # wrong shape from the layer after the Relu is named by the Relu's backward, as apart.
    class BookAffine(snn.Affine):
        def _forward(self, x: Any) -> Any:
            self.x = x
            return x @ self.W + self.b

        def _backward(self, dout: Any) -> Any:
            self.dW, self.db = self.x.T @ dout, dout.sum(axis=0)
            return dout @ self.W.T

    W1, b1, W2, b2, x_host, t_host, expected = _small_relu_case(14)
    net = snn.Sequential([BookAffine(W1, b1), snn.Relu(), BookAffine(W2, b2)]).to("cuda")
    grads = net.gradient(gpu.asarray(x_host), gpu.asarray(t_host))
    for key in expected:
        np.testing.assert_allclose(to_host(grads[key]), expected[key], rtol=1e-12, atol=1e-14)

    hooked = snn.Sequential([snn.Affine(W1, b1), relu := snn.Relu(), snn.Affine(W2, b2)])
    hooked.to("cuda")
    seen: list[tuple[int, ...]] = []
    own_backward = relu.backward
    relu.backward = lambda dout, **kw: seen.append(dout.shape) or own_backward(dout, **kw)  # type: ignore[method-assign]
    grads = hooked.gradient(gpu.asarray(x_host), gpu.asarray(t_host))
    assert seen == [(5, 4)]
    for key in expected:
        np.testing.assert_allclose(to_host(grads[key]), expected[key], rtol=1e-12, atol=1e-14)

    class Wrong:  # a user's layer whose backward returns the wrong shape
        def forward(self, x: Any) -> Any:
            return x

        def backward(self, dout: Any) -> Any:
            return dout[:, :3]

    wrong = snn.Sequential([snn.Affine(W1, b1), snn.Relu(), Wrong(), snn.Affine(W2, b2)])
    with pytest.raises(ValueError, match=r"Relu\.backward: dout has shape \(5, 3\)"):
        wrong.to("cuda").gradient(gpu.asarray(x_host), gpu.asarray(t_host))
