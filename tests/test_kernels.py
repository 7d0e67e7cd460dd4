"""The compiled kernels against the NumPy path they replace, value for value.

The conformance suite (run on both paths, see conftest.py) holds each path
to PyTorch; here the two paths are held to each other over the whole range
of each dtype: the same NaN, infinities and zeros, and finite values within
a few units in the last place (the NumPy path and libmvec round their
exponentials differently; every other step rounds the same way).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import scratchnn as snn
from scratchnn import _fused

pytestmark = pytest.mark.skipif(not _fused.available(), reason="compiled kernels not built")

LAYERS: dict[str, Callable[[], snn.Layer]] = {
    "Relu": snn.Relu,
    "Relu(packed)": lambda: snn.Relu(packed=True),
    "Sigmoid": snn.Sigmoid,
    "Tanh": snn.Tanh,
    "LeakyRelu": snn.LeakyRelu,
    "LeakyRelu(2)": lambda: snn.LeakyRelu(2.0),
    "Elu": snn.Elu,
    "Elu(2)": lambda: snn.Elu(2.0),
    "Gelu": snn.Gelu,
    "Gelu(tanh)": lambda: snn.Gelu("tanh"),
    "Softplus": snn.Softplus,
    "Softplus(3)": lambda: snn.Softplus(3.0),
    "Silu": snn.Silu,
}


def wide_input(dtype: type) -> np.ndarray:
    """Typical values, every binade of both signs, and the ends of the range."""
    info = np.finfo(dtype)
    rng = np.random.default_rng(7)
    # (to max / 4: geomspace's own arithmetic overflows at max)
    magnitudes = np.geomspace(float(info.smallest_subnormal), float(info.max) / 4, 3000)
    ends = [0.0, -0.0, np.inf, -np.inf, np.nan, info.max, -info.max, info.tiny, -info.tiny]
    values: list[Any] = [4 * rng.standard_normal(5000), rng.uniform(-800, 800, 2000), magnitudes,
              -magnitudes, ends]  # fmt: skip
    return np.concatenate(values).astype(dtype)


def forward_backward(
    make: Callable[[], snn.Layer], x: np.ndarray, dout: np.ndarray, compiled: bool
) -> tuple[np.ndarray, np.ndarray]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_fused, "ENABLED", compiled)
        layer = make()
        return layer.forward(x), layer.backward(dout)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", list(LAYERS))
def test_compiled_matches_numpy(name: str, dtype: type) -> None:
    x = wide_input(dtype)
    dout: np.ndarray = np.random.default_rng(8).standard_normal(x.size).astype(dtype)
    x_before, dout_before = x.copy(), dout.copy()
    with np.errstate(all="ignore"):  # the NumPy path may overflow where it means to
        want_out, want_dx = forward_backward(LAYERS[name], x, dout, compiled=False)
    got_out, got_dx = forward_backward(LAYERS[name], x, dout, compiled=True)
    np.testing.assert_array_equal(x, x_before)  # inputs are never written
    np.testing.assert_array_equal(dout, dout_before)
    eps = float(np.finfo(dtype).eps)
    tiny = float(np.finfo(dtype).tiny)
    # Forward: a few ulps (16 allowed; 11 seen, float32 Silu with a subnormal sigmoid),
    # absolute below the normal range. assert_allclose also requires NaN and inf alike.
    np.testing.assert_allclose(got_out, want_out, rtol=16 * eps, atol=16 * eps * tiny)
    # Backward: where dx nearly cancels (1 - y near 1, Phi + x phi near 0) a few ulps
    # of its terms are many ulps of dx, so the slack is relative to dout.
    finite = np.isfinite(want_dx)
    np.testing.assert_array_equal(np.isnan(got_dx), np.isnan(want_dx))
    np.testing.assert_array_equal(got_dx[~finite & ~np.isnan(want_dx)],
                                  want_dx[~finite & ~np.isnan(want_dx)])  # fmt: skip
    slack = 16 * eps * (np.abs(want_dx[finite]) + np.abs(dout[finite]))
    assert np.all(np.abs(got_dx[finite] - want_dx[finite]) <= slack)


def test_signed_zeros_and_masks_match() -> None:
    x = np.array([0.0, -0.0, 1.0, -1.0, np.nan])
    for make in (snn.Relu, snn.LeakyRelu, lambda: snn.Relu(packed=True)):
        numpy_path = make()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_fused, "ENABLED", False)
            want = numpy_path.forward(x)
        compiled = make()
        got = compiled.forward(x)
        np.testing.assert_array_equal(np.signbit(got), np.signbit(want))
        np.testing.assert_array_equal(compiled.mask, numpy_path.mask)


def test_run_refuses_what_it_cannot_take(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fused, "ENABLED", True)  # even under SCRATCHNN_KERNELS=0
    x = np.linspace(-2, 2, 32, dtype=np.float32)
    out = np.empty_like(x)
    assert _fused.run("sigmoid", out, x)
    np.testing.assert_allclose(out, 1 / (1 + np.exp(-x.astype(np.float64))), rtol=1e-6)
    refused: list[tuple[np.ndarray, np.ndarray]] = [
        (np.empty(32), x),  # float64 out, float32 x
        (out, x.astype(np.float16)),
        (np.empty(32, np.float16), x.astype(np.float16)),
        (out, np.linspace(-2, 2, 64, dtype=np.float32)[::2]),  # not contiguous
        (out, x[:31]),  # another size
        (out, x.astype(">f4")),  # not native byte order
        (np.empty(32, np.int32), x.astype(np.int32)),
    ]
    for bad_out, bad_x in refused:
        assert not _fused.run("sigmoid", bad_out, bad_x)
    read_only = np.empty_like(x)
    read_only.flags.writeable = False
    assert not _fused.run("sigmoid", read_only, x)
    monkeypatch.setattr(_fused, "ENABLED", False)
    assert not _fused.run("sigmoid", out, x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cols", [1, 7, 1000])
def test_softmax_rows_match_numpy(cols: int, dtype: type) -> None:
    rng = np.random.default_rng(cols)
    info = np.finfo(dtype)
    x = (4 * rng.standard_normal((40, cols))).astype(dtype)
    x[1] *= 1e3  # saturated rows
    x[2, 0], x[3, -1], x[4, :] = np.nan, np.inf, -np.inf  # NaN rows, as NumPy's max gives
    x[5, 0], x[6, :] = info.max, -info.max
    dout = rng.standard_normal(x.shape).astype(dtype)
    with np.errstate(all="ignore"):
        want_out, want_dx = forward_backward(snn.Softmax, x, dout, compiled=False)
    got_out, got_dx = forward_backward(snn.Softmax, x, dout, compiled=True)
    eps = float(np.finfo(dtype).eps)
    # The row sums add in another order than NumPy's pairwise sum: a few ulps.
    np.testing.assert_allclose(got_out, want_out, rtol=64 * eps, atol=64 * eps * float(info.tiny))
    finite = np.isfinite(want_dx)
    np.testing.assert_array_equal(np.isnan(got_dx), np.isnan(want_dx))
    slack = 64 * eps * (np.abs(dout) * np.abs(want_out)).sum(axis=1, keepdims=True) * cols
    assert np.all(np.abs(got_dx - want_dx)[finite] <= np.broadcast_to(slack, x.shape)[finite])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cols", [1, 7, 10, 16, 17, 1000])
def test_softmax_rows_give_log_softmax_where_asked(
    cols: int, dtype: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    """out2 = log y = (x - max) - log(sum), against float64 NumPy: finite where y underflows,
    rows of every length (whole 16-element chunks and a padded last one)."""
    monkeypatch.setattr(_fused, "ENABLED", True)
    rng = np.random.default_rng(cols)
    x = (4 * rng.standard_normal((30, cols))).astype(dtype)
    x[1] *= 300  # y underflows to 0 in most of this row; log y stays finite
    y, log_y = np.empty_like(x), np.empty_like(x)
    assert _fused.run("softmax", y, x, out2=log_y, param=cols)
    x64 = x.astype(np.float64)
    shifted = x64 - x64.max(axis=1, keepdims=True)
    want = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    eps = float(np.finfo(dtype).eps)
    assert np.all(np.isfinite(log_y))
    np.testing.assert_allclose(log_y, want, rtol=8 * eps, atol=8 * eps)
    np.testing.assert_allclose(y, np.exp(want), rtol=64 * eps, atol=float(np.finfo(dtype).tiny))
    without = np.empty_like(x)
    assert _fused.run("softmax", without, x, param=cols)
    np.testing.assert_array_equal(without, y)  # asking for log y changes nothing in y


def test_softmax_kernel_refuses_partial_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fused, "ENABLED", True)
    x = np.linspace(-2, 2, 30, dtype=np.float32)
    out = np.empty_like(x)
    assert _fused.run("softmax", out, x, param=10)
    np.testing.assert_allclose(out.reshape(3, 10).sum(axis=1), 1.0, rtol=1e-6)
    for bad in (7, 0, -10, 2.5):
        assert not _fused.run("softmax", out, x, param=bad)


@pytest.fixture(params=["avx512", "portable"])
def avx512_path(request: pytest.FixtureRequest) -> Any:
    """The kernels' AVX-512 paths (where the CPU has AVX-512) or their portable ones."""
    assert _fused._MODULE is not None
    before = _fused._MODULE.avx512(None)
    if request.param == "avx512" and not _fused._MODULE.avx512(True):
        _fused._MODULE.avx512(before)
        pytest.skip("this CPU has no AVX-512: only the portable path runs here")
    if request.param == "portable":
        _fused._MODULE.avx512(False)
    yield request.param
    _fused._MODULE.avx512(before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("size", [1, 7, 8, 9, 15, 16, 17, 1023, 1024, 1025, 100_003])
def test_packed_relu_bits_match_numpy_packbits(size: int, dtype: type, avx512_path: str) -> None:
    """The compiled packed kernels keep np.packbits' layout: first element in the high
    bit, the last byte padded with zeros; backward unpacks it to the same gradient."""
    rng = np.random.default_rng(size)
    x = rng.standard_normal(size).astype(dtype)
    x[::5] = 0.0
    x[1::7] = np.nan  # not <= 0: passes forward, its gradient passes backward
    dout = rng.standard_normal(size).astype(dtype)
    layer = snn.Relu(packed=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_fused, "ENABLED", True)
        out = layer.forward(x)
        dx = layer.backward(dout)
    np.testing.assert_array_equal(layer._mask, np.packbits(x <= 0))
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(out, np.where(x <= 0, 0, x))
        np.testing.assert_array_equal(dx, np.where(x <= 0, 0, dout))


@pytest.mark.parametrize("packed", [False, True], ids=["bool mask", "packed mask"])
@pytest.mark.parametrize("offset", [0, 1, 3, 9], ids=lambda o: f"offset {o}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("size", [1, 15, 16, 17, 100, 100_003])
def test_streaming_relu_matches_the_plain_kernels_bit_for_bit(
    size: int, dtype: type, offset: int, packed: bool, avx512_path: str
) -> None:
    """The streaming kernels (non-temporal stores) write what the plain ones write, at
    every alignment of the output (ordinary stores where it is not aligned)."""
    rng = np.random.default_rng(size + offset)
    x = rng.standard_normal(size).astype(dtype)
    x[::5] = 0.0
    x[1::7] = np.nan
    x[2::11] = -0.0
    dout = rng.standard_normal(size).astype(dtype)
    base = "relu_packed" if packed else "relu"
    kernels = {
        "plain": (base, f"{base}_grad" if packed else "relu_grad"),
        "stream": (f"{base}_stream", f"{base}_stream_grad" if packed else "relu_grad_stream"),
    }
    results = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_fused, "ENABLED", True)
        for kind, (forward, backward) in kernels.items():
            out = np.empty(size + offset, dtype)[offset:]  # misaligned by `offset` elements
            dx = np.empty(size + offset, dtype)[offset:]
            mask = np.empty((size + 7) // 8, np.uint8) if packed else np.empty(size, bool)
            assert _fused.run(forward, out, x, mask_out=mask)
            assert _fused.run(backward, dx, g=dout, mask_in=mask)
            results[kind] = (out.copy(), mask, dx.copy())
    for plain, streamed in zip(results["plain"], results["stream"]):
        np.testing.assert_array_equal(streamed.view(np.uint8), plain.view(np.uint8))


def test_relu_layer_streams_from_the_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    x, dout = rng.standard_normal(5000).astype(np.float32), rng.standard_normal(5000)
    monkeypatch.setattr(_fused, "ENABLED", True)
    calls: list[str] = []
    real_run = _fused.run

    def spy(name: str, *args: Any, **kwargs: Any) -> bool:
        calls.append(name)
        return real_run(name, *args, **kwargs)

    monkeypatch.setattr(_fused, "run", spy)
    want = [snn.Relu().forward(x), None]
    layer = snn.Relu()
    monkeypatch.setattr(_fused, "STREAM_FROM", x.nbytes)
    out = layer.forward(x)
    dx = layer.backward(dout.astype(np.float32))
    assert calls[-2:] == ["relu_stream", "relu_grad_stream"]
    np.testing.assert_array_equal(out, want[0])
    np.testing.assert_array_equal(dx, np.where(x <= 0, 0, dout.astype(np.float32)))
    packed = snn.Relu(packed=True)
    np.testing.assert_array_equal(packed.forward(x), want[0])
    np.testing.assert_array_equal(packed.backward(dout.astype(np.float32)), dx)
    assert calls[-2:] == ["relu_packed_stream", "relu_packed_stream_grad"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", ["SGD", "Adam"])
@pytest.mark.parametrize("size", [5, 16, 1000, 100_003])
def test_compiled_optimiser_steps_match_numpy_bit_for_bit(
    name: str, dtype: type, size: int
) -> None:
    from scratchnn import optim

    rng = np.random.default_rng(size)
    start = rng.standard_normal(size).astype(dtype)
    grads = [rng.standard_normal(size).astype(dtype) * 10.0**-k for k in range(6)]
    results = []
    for compiled in (False, True):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_fused, "ENABLED", compiled)
            patch.setattr(_fused, "THREADS_FROM", 64)  # two threads from small sizes
            patch.setattr(_fused, "BLOCK", 32)
            params = {"W": start.copy()}
            opt = getattr(optim, name)(lr=0.01)
            for grad in grads:
                opt.update(params, {"W": grad})
            results.append((params["W"], *[getattr(opt, s).get("W") for s in opt.slots]))
    for want, got in zip(*results):
        np.testing.assert_array_equal(got, want)


def test_compiled_steps_leave_strided_and_aliased_arrays_to_numpy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from scratchnn import optim

    monkeypatch.setattr(_fused, "ENABLED", True)  # even under SCRATCHNN_KERNELS=0

    base = np.arange(20, dtype=np.float32)
    params = {"W": base[::2]}  # not contiguous: its flat view would be a copy
    optim.SGD(lr=0.5).update(params, {"W": np.ones(10, np.float32)})
    np.testing.assert_array_equal(base[::2], np.arange(0, 20, 2, dtype=np.float32) - 0.5)
    np.testing.assert_array_equal(base[1::2], np.arange(1, 20, 2, dtype=np.float32))
    same = np.full(8, 2.0, np.float32)
    optim.SGD(lr=0.25).update({"W": same}, {"W": same})  # the gradient is the parameter
    np.testing.assert_array_equal(same, np.full(8, 1.5, np.float32))
    # ...while contiguous, separate arrays do take the compiled step
    w, g = np.ones(8, np.float32), np.full(8, 2.0, np.float32)
    assert optim._compiled_step("sgd", w, g, (), (0.25,))
    np.testing.assert_array_equal(w, np.full(8, 0.5, np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "c_in, c_out, k, s, p, hw",
    [(1, 4, 3, 1, 1, (28, 28)), (3, 5, 3, 1, 0, (7, 6)), (2, 3, (3, 2), (2, 1), (1, 0), (9, 8)),
     (1, 2, 5, 3, 2, (9, 8)), (4, 2, 1, 2, 0, (5, 5)), (2, 2, 2, 2, 1, (4, 7)),
     # stride 1 and OW == W, the kernels' contiguous "same" path, windows past every edge
     (2, 3, 5, 1, 2, (1, 1)), (2, 3, 5, 1, 2, (2, 3)), (1, 2, (3, 5), 1, (0, 2), (4, 3)),
     (2, 2, (5, 1), 1, (1, 0), (3, 6)), (1, 1, 7, 1, 3, (2, 2)), (3, 2, 3, 1, 1, (14, 14)),
     (8, 3, 3, 1, 1, (6, 5))],  # 72 inputs per window: one product over the batch
)  # fmt: skip
def test_compiled_im2col_and_col2im_match_numpy_bit_for_bit(
    c_in: int, c_out: int, k: Any, s: Any, p: Any, hw: tuple[int, int], dtype: type
) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3, c_in, *hw)).astype(dtype)
    results = []
    for compiled in (False, True):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_fused, "ENABLED", compiled)
            patch.setattr(_fused, "THREADS_FROM", 0)  # both threads, even here
            layer = snn.Conv2d(c_in, c_out, k, s, p, rng=np.random.default_rng(4), dtype=dtype)
            out = layer.forward(x)
            dout = np.random.default_rng(5).standard_normal(out.shape).astype(dtype)
            results.append((out, layer.backward(dout), layer.dW, layer.col))
    for want, got in zip(*results):
        np.testing.assert_array_equal(got, want)


# Padding wider than the image, in the "same" path: no window column (or row) lies inside.
_GUARDED_IM2COL = """
import ctypes, mmap, sys
import numpy as np
import scratchnn as snn
from scratchnn import _fused

page = mmap.PAGESIZE
memory = mmap.mmap(-1, 3 * page)
address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
n = page // 8
x = np.frombuffer(memory, dtype=np.float64, count=n, offset=page)
x[...] = np.arange(1.0, n + 1.0)
# No access at all to the pages before and after x: a read outside it is a crash.
assert libc.mprotect(address, page, 0) == 0 and libc.mprotect(address + 2 * page, page, 0) == 0
for shape, kernel, padding in [((1, 1, n, 1), (1, 7), (0, 3)), ((1, 1, 1, n), (7, 1), (3, 0))]:
    image = x.reshape(shape)
    results = []
    for compiled in (True, False):
        _fused.ENABLED = compiled
        layer = snn.Conv2d.from_weights(
            np.arange(1.0, 8.0).reshape(1, 1, *kernel), np.zeros(1), stride=1, padding=padding
        )
        results.append(layer.forward(image))
    assert np.array_equal(results[0], results[1]), (shape, results)
print("ok")
"""


def test_im2col_reads_nothing_outside_the_image() -> None:
    import subprocess
    import sys

    if not _fused.available():
        pytest.skip("compiled kernels not built (no C compiler?)")
    if sys.platform != "linux":
        pytest.skip("the guard pages use Linux's mprotect")
    # In a child process: a read past the image there is a crash (SIGSEGV), not a wrong number.
    result = subprocess.run(
        [sys.executable, "-c", _GUARDED_IM2COL], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", (
        result.returncode, result.stderr[-2000:],
    )  # fmt: skip


def test_conv_kernel_refuses_mismatched_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_fused, "ENABLED", True)  # even under SCRATCHNN_KERNELS=0
    dims = (2, 1, 4, 4, 3, 3, 1, 1, 1, 1, 4, 4)
    x = np.ones((2, 1, 4, 4), np.float32)
    col = np.empty((1, 3, 3, 2, 4, 4), np.float32)
    assert _fused.conv("im2col", x, col, dims)
    assert not _fused.conv("im2col", x, col.astype(np.float64), dims)
    assert not _fused.conv("im2col", x[:1], col, dims)
    assert not _fused.conv("im2col", x, col, (*dims[:6], 0, 1, 1, 1, 4, 4))  # stride 0
    assert not _fused.conv("col2im", col, np.empty((2, 1, 4, 5), np.float32), dims)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    ("kernel", "stride", "hw"),
    [(2, 2, (28, 28)), (2, 2, (7, 9)), (3, 3, (10, 11)), ((1, 2), None, (5, 6)), (2, 3, (8, 8)),
     (3, (3, 4), (9, 13)), (1, 1, (4, 5)), (2, 2, (6, 70)), (2, 2, (5, 33)), (2, 2, (2, 3))],
)  # fmt: skip
def test_compiled_max_pooling_matches_numpy_bit_for_bit(
    kernel: Any, stride: Any, hw: tuple[int, int], dtype: type, avx512_path: str
) -> None:
    """Disjoint windows: the compiled pass gives the NumPy path's maxima, argmax (first
    on ties, first NaN) and gradient (zeros between windows, -0.0 and NaN as written)."""
    rng = np.random.default_rng(sum(hw))
    x = rng.integers(-3, 4, (3, 4, *hw)).astype(dtype)  # small integers: many ties
    x[rng.random(x.shape) < 0.03] = np.nan  # NaN at every position of a window
    x[0, 0, 0, :3] = [np.nan, 1.0, np.nan]
    x[1, 1, 1, :2] = [np.inf, -np.inf]
    dout_shape = snn.MaxPool2d(kernel, stride).forward(x).shape
    dout = rng.standard_normal(dout_shape).astype(dtype)
    dout.flat[:3] = [np.inf, np.nan, -0.0]

    def run(compiled: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_fused, "ENABLED", compiled)
            pool = snn.MaxPool2d(kernel, stride)
            out = pool.forward(x)
            assert pool.argmax is not None
            with np.errstate(invalid="ignore"):  # inf * 0 on the NumPy path
                return out, pool.argmax.copy(), pool.backward(dout)

    want, got = run(False), run(True)
    for w, g in zip(want, got):
        assert w.dtype == g.dtype and w.shape == g.shape
        np.testing.assert_array_equal(g, w)
        if w.dtype.kind == "f":
            np.testing.assert_array_equal(np.signbit(g), np.signbit(w))


def test_compiled_max_pooling_leaves_overlap_and_padding_to_numpy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_fused, "ENABLED", True)  # even under SCRATCHNN_KERNELS=0
    x = np.zeros((1, 1, 6, 6), np.float32)
    assert _fused.pool("max", x, np.zeros((1, 1, 3, 3), np.float32), np.zeros((1, 1, 3, 3), np.uint8),
                       (1, 1, 6, 6, 2, 2, 2, 2, 3, 3))  # fmt: skip
    for which in ("max", "max_grad"):
        for dims in [(1, 1, 6, 6, 3, 3, 2, 2, 2, 2),  # overlapping windows
                     (1, 1, 6, 6, 2, 2, 2, 2, 2, 2),  # OH, OW not what the sizes give
                     (1, 1, 6, 6, 17, 17, 17, 17, 1, 1)]:  # windows past the image  # fmt: skip
            src = x if which == "max" else np.zeros((1, 1, 2, 2), np.float32)
            dst = np.zeros((1, 1, 2, 2), np.float32) if which == "max" else x.copy()
            assert not _fused.pool(which, src, dst, np.zeros((1, 1, 2, 2), np.uint8), dims)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(8, 3, 5, 7), (128, 4, 14, 14), (2, 1, 1, 1)])
def test_compiled_batchnorm_matches_numpy(shape: tuple[int, ...], dtype: type) -> None:
    """Training forward and backward per channel: output, xhat, running statistics, dx,
    dgamma and dbeta within a few ulps of the NumPy path (its sums are float pairwise,
    the kernels' double), on inputs far from zero mean."""
    rng = np.random.default_rng(len(shape) + shape[0])
    x = (3 * rng.standard_normal(shape) + 5).astype(dtype)
    dout = rng.standard_normal(shape).astype(dtype)

    def run(compiled: bool) -> list[np.ndarray]:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(_fused, "ENABLED", compiled)
            layer = snn.BatchNorm(shape[1], dtype=dtype)
            layer.gamma[...] = rng.uniform(0.5, 2.0, shape[1])
            layer.beta[...] = rng.uniform(-1.0, 1.0, shape[1])
            out = layer.forward(x)
            dx = layer.backward(dout)
            assert layer.xhat is not None and layer.dgamma is not None
            assert layer.dbeta is not None
            return [out, layer.xhat, layer.running_mean, layer.running_var, dx, layer.dgamma,
                    layer.dbeta]  # fmt: skip

    state = rng.bit_generator.state
    want = run(False)
    rng.bit_generator.state = state  # the same gamma and beta
    got = run(True)
    eps = float(np.finfo(dtype).eps)
    for name, w, g in zip(["out", "xhat", "mean", "var", "dx", "dgamma", "dbeta"], want, got):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        # dx and the sums are differences of sums: their slack is relative to dout's scale.
        scale = (
            np.sqrt(np.mean(np.square(w, dtype=np.float64)))
            if name in ("dx", "dgamma", "dbeta")
            else 0.0
        )
        np.testing.assert_allclose(g, w, rtol=64 * eps, atol=64 * eps * max(scale, 1.0),
                                   err_msg=name)  # fmt: skip


def test_kernels_with_more_outputs_refuse_a_call_without_them() -> None:
    import re
    from pathlib import Path

    if not _fused.available():
        pytest.skip("compiled kernels not built (no C compiler?)")
    # WRITES and READS agree with the C source: each kernel body that writes out2, out3 or
    # m_out, or reads m_in; the packed and streaming Relu kernels as their plain twins.
    source = (Path(__file__).resolve().parents[1] / "src/ckernels/elementwise.c").read_text()
    bodies = re.findall(r"#define (\w+)_BODY\(T, F\)((?:[^\n]*\\\n)*[^\n]*)", source)
    names = {"out2": "out2", "out3": "out3", "m_out": "mask_out"}
    written = {
        kernel: tuple(names[o] for o in names if re.search(rf"\b{o}\[i\] =", body))
        for kernel, body in bodies
    }
    read = {kernel: ("mask_in",) for kernel, body in bodies if re.search(r"\bm_in\[i\]", body)}
    twins = {"relu_stream": "relu", "relu_packed": "relu", "relu_packed_stream": "relu",
             "relu_grad_stream": "relu_grad", "relu_packed_grad": "relu_grad",
             "relu_packed_stream_grad": "relu_grad"}  # fmt: skip
    for kernel, twin in twins.items():
        written[kernel], read[kernel] = written[twin], read.get(twin, ())
    assert set(twins) <= set(_fused._INDEX)
    assert {kernel: outputs for kernel, outputs in written.items() if outputs} == _fused.WRITES
    assert {kernel: masks for kernel, masks in read.items() if masks} == _fused.READS
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_fused, "ENABLED", True)
        x = np.linspace(-2, 2, 100)
        out = np.full_like(x, 7.0)
        assert not _fused.run("relu", out, x)  # no mask_out: its bytes would land in out
        assert not _fused.run("elu", out, x, param=1.0)  # no out2
        assert (out == 7.0).all()
        assert _fused.apply("elu", x, param=1.0) is None
        for kernel in ("relu_packed", "relu_packed_stream"):  # crashed: no array for bits
            assert not _fused.run(kernel, out, x)
        for kernel in ("relu_grad", "relu_packed_grad", "relu_grad_stream"):  # read out
            assert not _fused.run(kernel, out, g=x)
        assert (out == 7.0).all()
        mask = np.empty(x.shape, bool)
        assert _fused.run("relu", out, x, mask_out=mask)
        np.testing.assert_array_equal(out, np.maximum(x, 0))
