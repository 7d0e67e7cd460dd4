"""What Conv2d and the pools have beyond the conformance suite: initialisation, ties, NaN, settings."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import scratchnn as snn

torch = pytest.importorskip("torch", reason="PyTorch (the test oracle) is not installed")
TF = torch.nn.functional


def test_conv_he_initialisation_from_the_callers_generator() -> None:
    layer = snn.Conv2d(16, 64, 5, rng=np.random.default_rng(0))
    assert layer.W.shape == (64, 16, 5, 5) and layer.W.dtype == np.float32
    assert layer.b.shape == (64,) and not layer.b.any()
    expected = math.sqrt(2.0 / (16 * 5 * 5))  # He: sqrt(2 / fan_in), fan_in = C_in kh kw
    assert abs(float(layer.W.std()) - expected) < 0.03 * expected
    again = snn.Conv2d(16, 64, 5, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(layer.W, again.W)
    small = snn.Conv2d(2, 3, 3, rng=np.random.default_rng(1), init=0.01, dtype=np.float64)
    assert small.W.dtype == np.float64 and small.b.dtype == np.float64


def test_conv_keeps_the_arrays_it_is_given_and_trains_through_params() -> None:
    W, b = np.zeros((2, 1, 3, 3)), np.zeros(2)
    layer = snn.Conv2d.from_weights(W, b, padding=1)
    assert layer.params["W"] is W and layer.params["b"] is b
    layer.params["b"] += 1.5  # an optimiser's in-place update
    np.testing.assert_array_equal(layer.forward(np.ones((1, 1, 4, 4))), np.full((1, 2, 4, 4), 1.5))


def test_conv_first_layer_skips_the_input_gradient() -> None:
    rng = np.random.default_rng(2)
    layer = snn.Conv2d(3, 4, 3, padding=1, rng=rng, dtype=np.float64)
    x, dout = rng.standard_normal((2, 3, 5, 5)), rng.standard_normal((2, 4, 5, 5))
    layer.forward(x)
    layer.backward(dout)
    dW, db = layer.dW, layer.db
    layer.forward(x)
    assert layer.backward(dout, input_grad=False) is None
    np.testing.assert_array_equal(layer.dW, dW)
    np.testing.assert_array_equal(layer.db, db)


@pytest.mark.parametrize(
    "c_in, k, s, p", [(1, 3, 1, 1), (3, 3, 1, 0), (2, (3, 2), (2, 1), (1, 0)), (8, 3, 1, 1)]
)
def test_conv_per_image_and_whole_batch_products_agree_with_torch(
    c_in: int, k: Any, s: Any, p: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways of multiplying (see PER_IMAGE_BELOW) on each shape, float32 against float64 torch."""
    from scratchnn.layers import convolution

    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, c_in, 9, 8)).astype(np.float32)
    W = rng.standard_normal((4, c_in, *((k, k) if isinstance(k, int) else k)))
    b = rng.standard_normal(4)
    xt, Wt, bt = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (x, W, b))
    yt = TF.conv2d(xt, Wt, bt, stride=s, padding=p)
    dout = rng.standard_normal(yt.shape).astype(np.float32)
    yt.backward(torch.tensor(dout, dtype=torch.float64))
    want = [t.detach().numpy() for t in (yt, xt.grad, Wt.grad, bt.grad)]
    for below in (0, 10**9):  # one product for the batch, then one per image
        monkeypatch.setattr(convolution, "PER_IMAGE_BELOW", below)
        layer = snn.Conv2d.from_weights(W.astype(np.float32), b.astype(np.float32), s, p)
        got = [layer.forward(x), layer.backward(dout), layer.dW, layer.db]
        assert convolution._per_image(layer.col) == (below > 0)
        for g, w in zip(got, want):
            assert g.dtype == np.float32
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * np.abs(w).max())


@pytest.mark.parametrize("c_in", [1, 8], ids=["per image", "one product"])
def test_conv_empty_batch_gives_empty_dx_and_zero_gradients(c_in: int) -> None:
    layer = snn.Conv2d(c_in, 4, 3, padding=1, rng=np.random.default_rng(0))
    out = layer.forward(np.zeros((0, c_in, 5, 6), np.float32))
    assert out.shape == (0, 4, 5, 6)
    dx = layer.backward(np.zeros(out.shape, np.float32))
    assert dx.shape == (0, c_in, 5, 6) and dx.dtype == np.float32
    assert layer.dW is not None and layer.db is not None
    np.testing.assert_array_equal(layer.dW, np.zeros((4, c_in, 3, 3), np.float32))
    np.testing.assert_array_equal(layer.db, np.zeros(4, np.float32))


@pytest.mark.parametrize(
    "make",
    [
        lambda: snn.Conv2d(1, 2, 1, padding=1, rng=np.random.default_rng(0)),
        lambda: snn.MaxPool2d(2, 1, 1),
        lambda: snn.AvgPool2d(2, 1, 1),
    ],
    ids=["Conv2d", "MaxPool2d", "AvgPool2d"],
)
@pytest.mark.parametrize("shape", [(1, 1, 0, 3), (2, 1, 3, 0)])
def test_images_without_rows_or_columns_are_refused_as_pytorch_does(
    make: Any, shape: tuple[int, ...]
) -> None:
    # With padding, every window of an empty image lies in the padding: an output of
    # padding alone (-inf, 0, the bias) would pass for a real one. PyTorch raises too.
    layer = make()
    with pytest.raises(ValueError, match="images are empty"):
        layer.forward(np.zeros(shape))
    with pytest.raises(RuntimeError):
        TF.conv2d(torch.zeros(shape), torch.zeros(2, 1, 1, 1), padding=1)


@pytest.mark.parametrize("stride, padding", [(1, 1), ((2, 1), (0, 2))], ids=["same", "strided"])
def test_conv_products_in_pieces_match_torch(
    stride: Any, padding: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forward's product and backward's dcol in pieces of whole images (PRODUCT_PIECE_BYTES,
    DCOL_PIECE_BYTES): one image each, uneven pieces and one piece give PyTorch's output
    and dx within float32 (BLAS may round a column differently in a narrower product)."""
    from scratchnn.layers import convolution

    rng = np.random.default_rng(7)
    x = rng.standard_normal((7, 8, 6, 5)).astype(np.float32)  # 72 inputs: one product
    layer = snn.Conv2d(8, 4, 3, stride, padding, rng=rng)
    layer.b[...] = rng.standard_normal(4)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    Wt, bt = (torch.tensor(a, dtype=torch.float64) for a in (layer.W, layer.b))
    yt = TF.conv2d(xt, Wt, bt, stride=stride, padding=padding)
    dout = rng.standard_normal(yt.shape).astype(np.float32)
    pixels = yt.shape[2] * yt.shape[3]
    dcol_bytes, product_bytes = 72 * pixels * 4, 4 * pixels * 4  # per image
    yt.backward(torch.tensor(dout, dtype=torch.float64))
    assert xt.grad is not None
    for images in (1, 3, 10**6):  # 7 pieces; 3 of 3, 3 and 1 images; one
        monkeypatch.setattr(convolution, "DCOL_PIECE_BYTES", images * dcol_bytes)
        monkeypatch.setattr(convolution, "PRODUCT_PIECE_BYTES", images * product_bytes)
        out = layer.forward(x)
        np.testing.assert_allclose(out, yt.detach().numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(layer.backward(dout), xt.grad.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernel_size": 0}, "kernel_size"),
        ({"kernel_size": 3, "stride": 0}, "stride"),
        ({"kernel_size": 3, "padding": -1}, "padding"),
        ({"kernel_size": (3, 3, 3)}, "kernel_size"),
    ],
)
def test_conv_bad_settings(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=f"Conv2d: {message}"):
        snn.Conv2d(1, 1, rng=np.random.default_rng(0), **kwargs)


def test_conv_from_weights_checks_shapes_and_dtypes() -> None:
    with pytest.raises(ValueError, match=r"Conv2d.*\(out_channels, in_channels, kh, kw\)"):
        snn.Conv2d.from_weights(np.ones((2, 3, 3)), np.ones(2))
    with pytest.raises(TypeError, match=r"Conv2d.*float"):
        snn.Conv2d.from_weights(np.ones((2, 1, 3, 3)), np.ones(2, dtype=np.float32))


def test_repr() -> None:
    conv = snn.Conv2d(3, 8, 3, stride=2, padding=1, rng=np.random.default_rng(0))
    assert repr(conv) == (
        "Conv2d(3, 8, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), dtype=float32)"
    )
    assert repr(snn.MaxPool2d(2)) == "MaxPool2d(kernel_size=(2, 2), stride=(2, 2), padding=(0, 0))"
    assert repr(snn.AvgPool2d(3, 1, 1)) == (
        "AvgPool2d(kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))"
    )


def max_pool_and_torch(
    x: np.ndarray, k: Any, s: Any = None, p: Any = 0, *, seed: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Our MaxPool2d's output and dx for a random dout, then PyTorch's for the same."""
    pool = snn.MaxPool2d(k, s, p)
    out = pool.forward(x)
    dout = np.random.default_rng(seed).standard_normal(out.shape).astype(x.dtype)
    dx = pool.backward(dout)
    xt = torch.tensor(x, requires_grad=True)
    yt = TF.max_pool2d(xt, k, s, p)
    yt.backward(torch.tensor(dout))
    return out, dx, yt.detach().numpy(), xt.grad.numpy()


@pytest.mark.parametrize(("k", "s", "p"), [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
def test_max_pool_ties_send_the_gradient_where_torch_does(k: int, s: int, p: int) -> None:
    # after a ReLU, windows of zeros are common: each tie must go to PyTorch's choice
    x = np.maximum(np.random.default_rng(3).integers(-2, 2, (2, 2, 6, 6)), 0).astype(np.float64)
    out, dx, want_out, want_dx = max_pool_and_torch(x, k, s, p)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-15)


@pytest.mark.parametrize(("k", "size"), [(2, 7), ((2, 3), (6, 9)), (3, 8), ((1, 2), (3, 5))])
def test_max_pool_tiling_windows_with_ties_and_left_over_pixels_match_torch(
    k: int | tuple[int, int], size: int | tuple[int, int]
) -> None:
    # stride = kernel and no padding take a faster path; left-over rows and columns get no gradient
    h, w = (size, size) if isinstance(size, int) else size
    x = np.maximum(np.random.default_rng(5).integers(-2, 3, (3, 2, h, w)), 0).astype(np.float32)
    out, dx, want_out, want_dx = max_pool_and_torch(x, k, seed=6)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(dx, want_dx)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize(("k", "s", "p"), [(2, 2, 0), (3, 2, 1), (3, 1, 1)])
def test_max_pool_keeps_the_sign_of_the_first_zero_as_torch(
    k: int, s: int, p: int, dtype: type
) -> None:
    # Windows of +0 and -0 only: every output is a tie, and its sign is the first zero's.
    rng = np.random.default_rng(7)
    x = np.where(rng.random((2, 3, 6, 6)) < 0.5, -0.0, 0.0).astype(dtype)
    out = snn.MaxPool2d(k, s, p).forward(x)
    want = TF.max_pool2d(torch.tensor(x.astype(np.float32)), k, s, p).numpy()
    np.testing.assert_array_equal(np.signbit(out), np.signbit(want))


@pytest.mark.parametrize(
    ("k", "s", "p"), [(2, 1, 1), (3, 1, 1), (3, 2, 1), ((4, 2), (1, 2), (2, 1))]
)
def test_max_pool_padding_never_takes_the_gradient_of_a_window_of_minus_inf(
    k: Any, s: Any, p: Any
) -> None:
    # The padding is -inf too: where a window's inputs are all -inf, its gradient must still
    # go to its first input (PyTorch's choice), never to a padding cell that is cropped away.
    rng = np.random.default_rng(11)
    x = rng.choice(np.array([-np.inf, -np.inf, 0.0, -1.0]), (2, 3, 7, 6))
    out, dx, want_out, want_dx = max_pool_and_torch(x, k, s, p, seed=12)
    np.testing.assert_array_equal(out, want_out)
    # overlapping windows add in another order than PyTorch's: a few ulps
    np.testing.assert_allclose(dx, want_dx, rtol=1e-13, atol=1e-15)
    assert np.isclose(dx.sum(), want_dx.sum())  # no gradient lost


def test_max_pool_propagates_nan_and_infinities_as_torch() -> None:
    x = np.array([[[[1.0, np.nan, 2.0, -np.inf], [0.0, 3.0, -np.inf, -np.inf]]]])
    out = snn.MaxPool2d(2).forward(x)
    want = TF.max_pool2d(torch.tensor(x), 2).numpy()
    np.testing.assert_array_equal(out, want)  # NaN and inf compare equal position by position


@pytest.mark.parametrize(("k", "s", "p"), [(2, 2, 0), (3, 1, 1), (3, 2, 1)])
def test_max_pool_sends_the_gradient_to_the_nan_as_torch(k: int, s: int, p: int) -> None:
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 2, 9, 9))
    # NaNs three apart: no window holds two (where PyTorch's CPU kernel picks the last, we
    # the first), and every window that holds one must send its whole gradient there.
    x[:, :, 1::3, 1::3] = np.nan
    out, dx, want_out, want_dx = max_pool_and_torch(x, k, s, p, seed=13)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: d.__name__)
@pytest.mark.parametrize(("k", "s", "p"), [(2, 2, 0), (3, 3, 0), (2, 3, 0), (3, 2, 1)])
def test_a_non_finite_dout_reaches_only_the_maximum_as_torch(
    k: int, s: int, p: int, dtype: type
) -> None:
    # PyTorch scatters dout to each window's maximum: the pixels that lost get +0 even
    # where dout is inf or NaN (dout * 0 would make them NaN), and +0 where dout < 0.
    # (No -0.0 in dout: PyTorch adds it to a zero, which gives +0.)
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 3, 17, 38)).astype(dtype)  # 2x2: AVX-512 lanes and a tail
    pool = snn.MaxPool2d(k, s, p)
    out = pool.forward(x)
    dout = rng.choice(np.array([np.inf, -np.inf, np.nan, -1.5, 2.0]), out.shape)
    with np.errstate(invalid="ignore"):  # overlapping windows may add inf and -inf: NaN
        dx = pool.backward(dout.astype(dtype))
    xt = torch.tensor(x, requires_grad=True)
    TF.max_pool2d(xt, k, s, p).backward(torch.tensor(dout.astype(dtype)))
    want = xt.grad.numpy()
    np.testing.assert_array_equal(dx, want)  # NaN where torch has NaN, nowhere else
    # The sign of zeros too (of a NaN made by inf + -inf, the processor's, not ours).
    finite = ~np.isnan(want)
    np.testing.assert_array_equal(np.signbit(dx[finite]), np.signbit(want[finite]))


def test_pool_padding_larger_than_half_the_kernel_raises() -> None:
    with pytest.raises(ValueError, match=r"MaxPool2d: padding .* half the kernel"):
        snn.MaxPool2d(2, padding=2)
    with pytest.raises(ValueError, match=r"AvgPool2d: stride"):
        snn.AvgPool2d(2, stride=0)


def test_avg_pool_counts_the_padding_as_torch() -> None:
    x = np.ones((1, 1, 3, 3))
    out = snn.AvgPool2d(3, 1, 1).forward(x)
    np.testing.assert_allclose(out, TF.avg_pool2d(torch.tensor(x), 3, 1, 1).numpy(), rtol=1e-15)
    assert out[0, 0, 0, 0] == pytest.approx(4 / 9)


@pytest.mark.parametrize("shape", [(), (3,)])
def test_flatten_refuses_an_input_without_a_batch_and_a_feature_axis(shape: tuple[int, ...]) -> None:
    # A 1-d array (labels passed by mistake) would silently become a column; torch.nn.Flatten
    # refuses it too.
    with pytest.raises(ValueError, match=r"Flatten: expected input of shape \(batch, d1, ...\)"):
        snn.Flatten().forward(np.zeros(shape))
    with pytest.raises(IndexError):
        torch.nn.Flatten()(torch.zeros(shape))
