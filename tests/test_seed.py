"""The seed notebook's cells, reproduced through the library, and its flaws, fixed."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

import scratchnn as snn


class SeedRelu:
    """The seed notebook's Relu, verbatim, as the reference for its behaviour."""

    def __init__(self):  # type: ignore[no-untyped-def]
        self.mask = None

    def forward(self, x):  # type: ignore[no-untyped-def]
        self.mask = x <= 0
        out = x.copy()
        out[self.mask] = 0
        return out

    def backward(self, dout):  # type: ignore[no-untyped-def]
        dout[self.mask] = 0
        dx = dout
        return dx


class SeedSigmoid:
    """The seed notebook's Sigmoid, verbatim."""

    def __init__(self):  # type: ignore[no-untyped-def]
        self.out = None

    def forward(self, x):  # type: ignore[no-untyped-def]
        out = 1 / (1 + np.exp(-x))
        self.out = out
        return out

    def backward(self, dout):  # type: ignore[no-untyped-def]
        return dout * (1.0 - self.out) * self.out


SEED_X = np.array([[1.0, -0.5], [-2.0, 3.0]])


def test_notebook_cells_print_exactly() -> None:
    # In [2] and In [3] of the seed notebook
    assert str(SEED_X) == "[[ 1.  -0.5]\n [-2.   3. ]]"
    relu = snn.Relu()
    relu.forward(SEED_X)
    assert str(relu.mask) == "[[False  True]\n [ True False]]"


@pytest.mark.parametrize("packed", [False, True])
def test_relu_matches_the_seed_code(packed: bool) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 7))
    x[0, :3] = [0.0, -0.0, 1e-300]
    dout = rng.standard_normal(x.shape)
    seed, ours = SeedRelu(), snn.Relu(packed=packed)
    np.testing.assert_array_equal(ours.forward(x), seed.forward(x))
    np.testing.assert_array_equal(ours.mask, seed.mask)
    assert ours.mask is not None and ours.mask.dtype == np.bool_
    np.testing.assert_array_equal(ours.backward(dout), seed.backward(dout.copy()))


def test_sigmoid_matches_the_seed_code_where_the_seed_is_right() -> None:
    x = np.linspace(-30, 30, 301)
    dout = np.cos(x)
    seed, ours = SeedSigmoid(), snn.Sigmoid()
    np.testing.assert_allclose(ours.forward(x), seed.forward(x), rtol=1e-15)
    np.testing.assert_allclose(ours.backward(dout), seed.backward(dout), rtol=1e-14)
    assert ours.out is not None and not ours.out.flags.writeable


def test_the_seed_flaws_are_fixed() -> None:
    dout = np.ones((2, 2))
    # the seed's backward writes into dout; ours does not
    SeedRelu().forward(SEED_X)
    seed = SeedRelu()
    seed.forward(SEED_X)
    seed.backward(dout)
    assert dout.sum() == 2.0
    dout = np.ones((2, 2))
    relu = snn.Relu()
    relu.forward(SEED_X)
    relu.backward(dout)
    assert dout.sum() == 4.0
    # the seed's backward before forward silently zeroes everything; ours raises
    assert np.all(SeedRelu().backward(np.ones(3)) == 0)
    with pytest.raises(RuntimeError, match="Relu"):
        snn.Relu().backward(np.ones(3))
    # the seed's sigmoid overflows in exp; ours is silent and exact
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        SeedSigmoid().forward(np.array([-1000.0]))
    assert any("overflow" in str(w.message) for w in caught)
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        assert snn.Sigmoid().forward(np.array([-1000.0]))[0] == 0.0


def test_relu_edge_values() -> None:
    info = np.finfo(np.float64)
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, info.smallest_subnormal, -info.max])
    relu = snn.Relu()
    out = relu.forward(x)
    np.testing.assert_array_equal(
        out, [0.0, 0.0, np.inf, 0.0, np.nan, info.smallest_subnormal, 0.0]
    )
    assert not np.signbit(out[1])  # the seed writes +0 where x <= 0, -0.0 included
    dx = relu.backward(np.full(x.shape, 2.0))
    np.testing.assert_array_equal(dx, [0.0, 0.0, 2.0, 0.0, 2.0, 2.0, 0.0])


@pytest.mark.parametrize("dtype", [np.int8, np.int32, np.int64, np.uint8])
def test_relu_keeps_integer_dtypes(dtype: type) -> None:
    x = np.array([3, 0, 1, 5], dtype=dtype) - (1 if np.dtype(dtype).kind == "i" else 0)
    x = x.astype(dtype)
    relu = snn.Relu()
    out = relu.forward(x)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, np.maximum(x, 0))
    dx = relu.backward(np.ones(4, dtype=np.float32))
    assert dx.dtype == np.float32


def test_packed_mask_memory() -> None:
    n = 1_000_003
    x = np.random.default_rng(1).standard_normal(n).astype(np.float32)
    plain, packed = snn.Relu(), snn.Relu(packed=True)
    out = plain.forward(x)
    packed_out = packed.forward(x)
    np.testing.assert_array_equal(packed_out, out)
    dout = np.ones_like(x)
    np.testing.assert_array_equal(packed.backward(dout), plain.backward(dout))
    kept = packed._mask
    assert kept is not None and kept.nbytes == math.ceil(n / 8)
    assert plain.mask is not None and plain.mask.nbytes == n  # the seed's bool mask
    assert plain.mask.nbytes / kept.nbytes == pytest.approx(8, rel=1e-5)
    assert out.nbytes / kept.nbytes == pytest.approx(
        32, rel=1e-5
    )  # PyTorch keeps the float32 output
    np.testing.assert_array_equal(packed.mask, plain.mask)


def test_repr_shows_hyperparameters() -> None:
    assert repr(snn.LeakyRelu()) == "LeakyRelu(alpha=0.01)"
    assert repr(snn.Relu(packed=True)) == "Relu(packed=True)"
    assert repr(snn.Softmax(axis=1)) == "Softmax(axis=1)"
    assert repr(snn.Sigmoid()) == "Sigmoid()"


def test_bad_hyperparameters_raise() -> None:
    with pytest.raises(ValueError, match="approximate"):
        snn.Gelu(approximate="erf")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="beta"):
        snn.Softplus(beta=0.0)
    with pytest.raises(TypeError, match="axis"):
        snn.Softmax(axis=1.5)  # type: ignore[arg-type]
    softmax = snn.Softmax(axis=2)
    with pytest.raises(ValueError, match="axis 2"):
        softmax.forward(np.ones((2, 2)))


def test_softmax_large_logits() -> None:
    x = np.array([[1e4, -1e4, 0.0], [5e3, 5e3, -1e4]])
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        y = snn.Softmax().forward(x)
    np.testing.assert_allclose(y, [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]], atol=0)


def test_every_public_name_exists() -> None:
    missing = [name for name in snn.__all__ if not hasattr(snn, name)]
    assert missing == []
