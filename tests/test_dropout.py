"""Dropout: inverted scaling, statistics, evaluation identity, seeds, the packed mask, PyTorch's formula."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import scratchnn as snn

torch = pytest.importorskip("torch", reason="PyTorch (the test oracle) is not installed")


def test_statistics_and_inverted_scaling() -> None:
    p = 0.3
    drop = snn.Dropout(p, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((200, 500))
    out = drop.forward(x)
    mask = drop.mask
    assert mask is not None and mask.shape == x.shape and mask.dtype == bool
    # 100,000 Bernoulli(0.7) draws: the kept fraction lies within 5 standard deviations
    sd = math.sqrt(p * (1 - p) / x.size)
    assert abs(mask.mean() - (1 - p)) < 5 * sd
    np.testing.assert_array_equal(out[~mask], 0.0)
    np.testing.assert_allclose(out[mask], x[mask] / (1 - p), rtol=1e-15)
    # the expectation is kept: the mean of x * mask / (1 - p) over draws is x
    ones = snn.Dropout(p, rng=np.random.default_rng(2)).forward(np.ones(100_000))
    assert abs(ones.mean() - 1.0) < 5 * math.sqrt(p / (1 - p) / 100_000)


def test_matches_torch_given_the_same_mask() -> None:
    rng = np.random.default_rng(3)
    x, dout = rng.standard_normal((6, 7)), rng.standard_normal((6, 7))
    drop = snn.Dropout(0.4, rng=np.random.default_rng(4))
    out = drop.forward(x)
    dx = drop.backward(dout)
    keep = torch.tensor(drop.mask, dtype=torch.float64)
    xt = torch.tensor(x, requires_grad=True)
    yt = xt * keep / (1 - 0.4)  # torch.nn.functional.dropout's formula, with our mask
    yt.backward(torch.tensor(dout))
    np.testing.assert_allclose(out, yt.detach().numpy(), rtol=1e-15)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-15)


def test_torch_dropout_has_the_same_statistics() -> None:
    torch.manual_seed(0)
    theirs = torch.nn.functional.dropout(torch.ones(100_000, dtype=torch.float64), 0.25)
    ours = snn.Dropout(0.25, rng=np.random.default_rng(0)).forward(np.ones(100_000))
    assert set(np.unique(ours)) == set(np.unique(theirs.numpy())) == {0.0, 1 / 0.75}
    assert abs((ours == 0).mean() - (theirs.numpy() == 0).mean()) < 0.01


def test_evaluation_is_the_identity() -> None:
    drop = snn.Dropout(0.5, rng=np.random.default_rng(5))
    drop.training = False
    x = np.arange(6.0).reshape(2, 3)
    out = drop.forward(x)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(drop.backward(np.ones((2, 3))), np.ones((2, 3)))
    assert drop.mask is None
    with pytest.raises(ValueError, match="read-only"):
        out[0, 0] = 1.0  # no writing into the caller's x through the returned view


def test_the_same_seed_drops_the_same_elements() -> None:
    x = np.ones((50, 40))
    a = snn.Dropout(0.5, rng=np.random.default_rng(7))
    b = snn.Dropout(0.5, rng=np.random.default_rng(7))
    c = snn.Dropout(0.5, rng=np.random.default_rng(8))
    first = a.forward(x)
    np.testing.assert_array_equal(first, b.forward(x))
    assert not np.array_equal(first, c.forward(x))
    assert not np.array_equal(first, a.forward(x))  # a fresh mask each forward


@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 1001])
def test_the_mask_is_packed_to_one_bit_per_element(n: int) -> None:
    drop = snn.Dropout(0.5, rng=np.random.default_rng(9))
    x = np.ones(n)
    out = drop.forward(x)
    assert drop._mask is not None and drop._mask.nbytes == math.ceil(n / 8)
    np.testing.assert_array_equal(drop.mask, out != 0)
    np.testing.assert_array_equal(drop.backward(np.ones(n)), out)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_dtypes_are_kept(dtype: Any) -> None:
    drop = snn.Dropout(0.5, rng=np.random.default_rng(10))
    x = np.ones((3, 4), dtype=dtype)
    out = drop.forward(x)
    dx = drop.backward(np.ones((3, 4)))
    assert out.dtype == dtype and dx.dtype == dtype
    assert set(np.unique(out.astype(np.float64))) <= {0.0, 2.0}


def test_p_zero_and_one_and_no_mutation() -> None:
    x = np.random.default_rng(11).standard_normal((4, 5))
    before = x.copy()
    np.testing.assert_array_equal(snn.Dropout(0.0, rng=np.random.default_rng(0)).forward(x), x)
    drop = snn.Dropout(1.0, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(drop.forward(x), np.zeros_like(x))
    dout = np.ones_like(x)
    np.testing.assert_array_equal(drop.backward(dout), np.zeros_like(x))
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(dout, 1.0)


def test_errors() -> None:
    with pytest.raises(ValueError, match=r"Dropout.*\[0, 1\]"):
        snn.Dropout(1.5, rng=np.random.default_rng(0))
    with pytest.raises(TypeError, match=r"Dropout.*Generator"):
        snn.Dropout(0.5, rng=0)  # type: ignore[arg-type]
    drop = snn.Dropout(0.5, rng=np.random.default_rng(0))
    with pytest.raises(RuntimeError, match="Dropout"):
        drop.backward(np.ones(3))
    drop.forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"Dropout.*\(3, 2\).*\(2, 3\)"):
        drop.backward(np.ones((3, 2)))
