"""Weight initialisers: their statistics, reproducibility, isolation from global state, errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import scratchnn as snn
from scratchnn.init import (
    glorot_normal,
    glorot_uniform,
    he_normal,
    make_initializer,
    normal_std,
    xavier_normal,
    zeros,
)

FAN_IN, FAN_OUT = 400, 2500  # a million draws: the sample std is within 0.1% of the target

# name -> (initialiser, target standard deviation as a float64 formula)
TARGETS: dict[str, tuple[Callable[..., np.ndarray], Callable[[int, int], float]]] = {
    "he": (he_normal, lambda n_in, n_out: math.sqrt(2.0 / n_in)),
    "xavier": (xavier_normal, lambda n_in, n_out: math.sqrt(1.0 / n_in)),
    "glorot_normal": (glorot_normal, lambda n_in, n_out: math.sqrt(2.0 / (n_in + n_out))),
    "glorot_uniform": (glorot_uniform, lambda n_in, n_out: math.sqrt(2.0 / (n_in + n_out))),
    "std=0.01": (
        lambda n_in, n_out, rng, dtype=np.float32: normal_std(n_in, n_out, rng, dtype, std=0.01),
        lambda n_in, n_out: 0.01,
    ),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", list(TARGETS))
def test_standard_deviation_mean_and_shape(name: str, dtype: Any) -> None:
    init, target = TARGETS[name]
    W = init(FAN_IN, FAN_OUT, np.random.default_rng(0), dtype=dtype)
    assert W.shape == (FAN_IN, FAN_OUT) and W.dtype == dtype
    std = target(FAN_IN, FAN_OUT)
    assert abs(float(W.std(dtype=np.float64)) / std - 1.0) < 0.01
    assert abs(float(W.mean(dtype=np.float64))) < 5 * std / math.sqrt(W.size)


def test_normal_draws_have_normal_tails_and_uniform_draws_fill_their_bounds() -> None:
    rng = np.random.default_rng(1)
    W = he_normal(FAN_IN, FAN_OUT, rng, dtype=np.float64)
    # 4.55% of a normal sample lies beyond 2 standard deviations
    beyond = float(np.mean(np.abs(W) > 2 * math.sqrt(2.0 / FAN_IN)))
    assert abs(beyond - 0.0455) < 0.002

    bound = math.sqrt(6.0 / (FAN_IN + FAN_OUT))
    U = glorot_uniform(FAN_IN, FAN_OUT, rng, dtype=np.float64)
    assert -bound <= U.min() < -0.999 * bound and 0.999 * bound < U.max() <= bound
    # each tenth of [-a, a] holds a tenth of the draws
    counts, _ = np.histogram(U, bins=10, range=(-bound, bound))
    np.testing.assert_allclose(counts / U.size, 0.1, atol=0.002)
    U32 = glorot_uniform(FAN_IN, FAN_OUT, rng)
    assert np.abs(U32).max() <= np.float32(bound)


def test_he_and_glorot_match_torch_nn_init() -> None:
    torch = pytest.importorskip("torch", reason="PyTorch (the test oracle) is not installed")
    generator = torch.Generator().manual_seed(0)
    # torch stores a Linear weight as (out, in); its fans are read from that layout
    shape = (FAN_OUT, FAN_IN)
    theirs = {
        "he": torch.nn.init.kaiming_normal_(
            torch.empty(shape, dtype=torch.float64), nonlinearity="relu", generator=generator
        ),
        "glorot_normal": torch.nn.init.xavier_normal_(
            torch.empty(shape, dtype=torch.float64), generator=generator
        ),
        "glorot_uniform": torch.nn.init.xavier_uniform_(
            torch.empty(shape, dtype=torch.float64), generator=generator
        ),
    }
    rng = np.random.default_rng(0)
    for name, tensor in theirs.items():
        ours = TARGETS[name][0](FAN_IN, FAN_OUT, rng, dtype=np.float64)
        reference = tensor.numpy()
        assert abs(ours.std() / reference.std() - 1.0) < 0.01, name
        assert abs(np.abs(ours).max() / np.abs(reference).max() - 1.0) < (
            0.01 if name == "glorot_uniform" else 0.15
        ), name


@pytest.mark.parametrize("init", ["he", "glorot_normal", "glorot_uniform"])
def test_conv2d_weights_have_torch_nn_inits_scale_for_a_kernel(init: str) -> None:
    # torch reads a conv kernel's fans from its (C_out, C_in, kh, kw) layout:
    # fan_in = C_in*kh*kw and fan_out = C_out*kh*kw (Glorot & Bengio's too).
    torch = pytest.importorskip("torch", reason="PyTorch (the test oracle) is not installed")
    c_in, c_out, k = 16, 32, 5
    reference = torch.empty((c_out, c_in, k, k), dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    if init == "he":
        torch.nn.init.kaiming_normal_(reference, nonlinearity="relu", generator=generator)
    elif init == "glorot_normal":
        torch.nn.init.xavier_normal_(reference, generator=generator)
    else:
        torch.nn.init.xavier_uniform_(reference, generator=generator)
    ours = snn.Conv2d(c_in, c_out, k, rng=np.random.default_rng(0), init=init, dtype=np.float64).W
    assert ours.shape == tuple(reference.shape)
    assert abs(ours.std() / reference.std().item() - 1.0) < 0.02
    if init == "glorot_uniform":
        bound = math.sqrt(6.0 / ((c_in + c_out) * k * k))
        assert 0.99 * bound < np.abs(ours).max() <= bound


def test_bad_fans_raise_before_anything_is_drawn() -> None:
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    with pytest.raises(TypeError, match="fans must be a pair"):
        glorot_normal(3, 4, rng, fans=(3,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"fans\[1\]"):
        glorot_uniform(3, 4, rng, fans=(3, 0))
    assert rng.bit_generator.state == before


def test_a_conv2d_that_fails_to_build_leaves_the_generator_alone() -> None:
    rng = np.random.default_rng(0)
    before = rng.bit_generator.state
    for bad in ({"stride": 0}, {"padding": -1}):
        with pytest.raises(ValueError, match="Conv2d"):
            snn.Conv2d(3, 4, 3, rng=rng, **bad)  # type: ignore[arg-type]
    assert rng.bit_generator.state == before


@pytest.mark.parametrize("name", list(TARGETS))
def test_same_seed_same_weights_and_the_global_state_is_untouched(name: str) -> None:
    init, _ = TARGETS[name]
    # the legacy global state is the very thing checked here, hence NPY002
    before = np.random.get_state(legacy=False)  # noqa: NPY002
    first = init(30, 20, np.random.default_rng(7))
    second = init(30, 20, np.random.default_rng(7))
    other = init(30, 20, np.random.default_rng(8))
    in_float64 = init(30, 20, np.random.default_rng(7), dtype=np.float64)
    after = np.random.get_state(legacy=False)  # noqa: NPY002
    np.testing.assert_array_equal(first, second)
    assert not np.array_equal(first, other)
    # drawn in float64, rounded once: every dtype gets the same weights
    np.testing.assert_array_equal(first, in_float64.astype(np.float32))
    np.testing.assert_array_equal(before["state"].pop("key"), after["state"].pop("key"))
    assert before == after  # position in the key, cached Gaussian


def test_consecutive_draws_from_one_generator_differ() -> None:
    rng = np.random.default_rng(0)
    assert not np.array_equal(he_normal(5, 5, rng), he_normal(5, 5, rng))


def test_float16_is_the_rounded_float64_draw() -> None:
    W16 = he_normal(50, 40, np.random.default_rng(3), dtype=np.float16)
    W64 = he_normal(50, 40, np.random.default_rng(3), dtype=np.float64)
    assert W16.dtype == np.float16
    np.testing.assert_array_equal(W16, W64.astype(np.float16))


def test_make_initializer_names_and_numbers() -> None:
    assert make_initializer("he") is he_normal and make_initializer("ReLU") is he_normal
    assert (
        make_initializer("xavier") is xavier_normal and make_initializer("Sigmoid") is xavier_normal
    )
    assert make_initializer("glorot_normal") is glorot_normal
    assert make_initializer("glorot_uniform") is glorot_uniform
    fixed = make_initializer(0.5)
    W = fixed(FAN_IN, FAN_OUT, np.random.default_rng(0), dtype=np.float64)
    assert abs(W.std() / 0.5 - 1.0) < 0.01
    np.testing.assert_array_equal(
        make_initializer(0.01)(3, 4, np.random.default_rng(2)),
        normal_std(3, 4, np.random.default_rng(2), std=0.01),
    )
    with pytest.raises(
        ValueError, match=r"glorot_normal.*glorot_uniform.*he.*relu.*sigmoid.*xavier"
    ):
        make_initializer("kaiming")
    with pytest.raises(ValueError, match="std"):
        make_initializer(-0.01)
    with pytest.raises(TypeError, match="std"):
        make_initializer(True)
    with pytest.raises(TypeError, match="std"):
        make_initializer(None)  # type: ignore[arg-type]


def test_zeros_for_biases() -> None:
    b = zeros(7)
    assert b.shape == (7,) and b.dtype == np.float32 and not b.any()
    assert zeros(3, dtype=np.float64).dtype == np.float64


@pytest.mark.parametrize("name", list(TARGETS))
@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((3, 4, None), {}, TypeError, "Generator"),
        ((3, 4, 42), {}, TypeError, "Generator"),
        ((3, 4, np.random.RandomState(0)), {}, TypeError, "Generator"),
        ((0, 4, np.random.default_rng(0)), {}, ValueError, "fan_in"),
        ((3, -1, np.random.default_rng(0)), {}, ValueError, "fan_out"),
        ((3.0, 4, np.random.default_rng(0)), {}, TypeError, "fan_in"),
        ((True, 4, np.random.default_rng(0)), {}, TypeError, "fan_in"),
        ((3, 4, np.random.default_rng(0)), {"dtype": np.int32}, TypeError, "dtype"),
        ((3, 4, np.random.default_rng(0)), {"dtype": np.complex128}, TypeError, "dtype"),
    ],
    ids=str,
)
def test_bad_arguments_raise(
    name: str, args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    init, _ = TARGETS[name]
    with pytest.raises(error, match=match):
        init(*args, **kwargs)


@pytest.mark.parametrize("std", [-1.0, float("nan"), float("inf")])
def test_normal_std_rejects_bad_std(std: float) -> None:
    with pytest.raises(ValueError, match="std"):
        normal_std(3, 4, np.random.default_rng(0), std=std)


def test_numpy_integer_fans_are_accepted() -> None:
    W = he_normal(np.int64(3), np.int32(4), np.random.default_rng(0))
    assert W.shape == (3, 4)
    assert not zeros(np.int64(2)).any()


def test_a_call_that_fails_on_the_device_leaves_the_generator_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    from scratchnn.backend import DeviceUnavailableError

    monkeypatch.setitem(sys.modules, "cupy", None)  # no CuPy here: "cuda" fails
    rng = np.random.default_rng(7)
    with pytest.raises(DeviceUnavailableError):
        he_normal(3, 4, rng, device="cuda")
    # so a fall-back to the CPU draws what a first call on the CPU draws
    np.testing.assert_array_equal(he_normal(3, 4, rng), he_normal(3, 4, np.random.default_rng(7)))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_weights_that_overflow_their_dtype_raise(dtype: Any) -> None:
    with pytest.raises(ValueError, match="normal_std: the weights overflow"):
        normal_std(3, 4, np.random.default_rng(0), dtype, std=1e300)
    assert np.isfinite(normal_std(3, 4, np.random.default_rng(0), dtype, std=1e3)).all()


def test_a_std_too_large_for_the_dtype_leaves_the_generator_as_it_was() -> None:
    # The weights were drawn, then found to overflow float32: the caller's generator had
    # moved on six draws although the call failed.
    rng = np.random.default_rng(0)
    state = rng.bit_generator.state
    with pytest.raises(ValueError, match="normal_std: the weights overflow float32"):
        normal_std(3, 2, rng, std=1e300)
    assert rng.bit_generator.state == state


def test_a_fixed_std_initializer_checks_its_fans_as_the_others() -> None:
    with pytest.raises(ValueError, match=r"fans\[0\] must be >= 1, got -5"):
        make_initializer(0.01)(3, 2, np.random.default_rng(0), fans=(-5, 3))
