"""Accuracy against arbitrary-precision references (mpmath), in units in the last place."""

from __future__ import annotations

import numpy as np
import pytest

import scratchnn as snn
from scratchnn import functional as F

mpmath = pytest.importorskip("mpmath", reason="mpmath (the high-precision oracle) is not installed")
mpmath.mp.dps = 50


def ulp_error(got: np.ndarray, want: list[object]) -> np.ndarray:
    """|got - want| in units of the last place of ``want`` (rounded to float64)."""
    exact = np.array([float(w) for w in want])  # type: ignore[arg-type]
    errors = [abs(mpmath.mpf(float(g)) - w) for g, w in zip(got, want)]  # type: ignore[call-overload]
    spacing = np.spacing(np.abs(exact))
    return np.array([float(e) for e in errors]) / spacing


def assert_within_ulps(got: np.ndarray, want: list[object], bound: float) -> None:
    """``got`` within ``bound`` ulps of ``want`` at every point, chosen by the reference and
    never by the output: a result that wrongly underflows to 0 must count as an error.
    Where the reference is subnormal its ulp is the smallest subnormal, so the bound is
    absolute there (and flushing it to 0 costs its size in those units)."""
    errors = ulp_error(got, want)
    worst = int(np.argmax(errors))
    assert errors[worst] <= bound, (
        f"{errors[worst]:.3g} ulp at point {worst}: got {got[worst]!r}, want {float(want[worst])!r}"  # type: ignore[arg-type]
    )


def sigmoid_exact(x: float) -> object:
    return 1 / (1 + mpmath.exp(-mpmath.mpf(x)))


def test_sigmoid_within_a_few_ulp_over_the_whole_float64_range() -> None:
    # every binade from the far negative tail (where the result is subnormal) to saturation
    magnitudes = np.geomspace(1e-300, 744.0, 400)
    x = np.concatenate([-magnitudes, magnitudes, [0.0, -40.0, -700.0, -744.0, 36.0, 37.0]])
    y = snn.Sigmoid().forward(x)
    assert_within_ulps(y, [sigmoid_exact(v) for v in x], 3)


@pytest.mark.parametrize(("path", "bound"), [("numpy", 3.0), ("compiled", 5.0)])
def test_sigmoid_dense_scan_against_long_double(
    path: str, bound: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 600,000 random inputs: a sparse grid missed the compiled kernels' worst cases (3.07 and
    # 4.63 ulp, both kept below; glibc's vector exp is within 4 ulp). Over 40 million inputs
    # the worst seen were 2.41 ulp (NumPy's path) and 4.63 (the compiled kernels).
    from scratchnn import _fused

    if np.finfo(np.longdouble).nmant < 63:
        pytest.skip("long double is no wider than float64 here: no cheap dense reference")
    if path == "compiled" and not _fused.available():
        pytest.skip("compiled kernels not built (no C compiler?)")
    monkeypatch.setattr(_fused, "ENABLED", path == "compiled")
    rng = np.random.default_rng(2024)
    x = np.concatenate(
        [rng.uniform(-745.0, 40.0, 300_000), rng.uniform(-40.0, 40.0, 300_000),
         [-4.144465205587267, -2.7532975522469556]]
    )  # fmt: skip
    y = snn.Sigmoid().forward(x)
    wide = x.astype(np.longdouble)
    e = np.exp(-np.abs(wide))
    reference = np.where(wide >= 0, 1 / (1 + e), e / (1 + e))
    normal = reference >= np.finfo(np.float64).smallest_normal
    spacing = np.spacing(reference[normal].astype(np.float64)).astype(np.longdouble)
    worst = float(np.max(np.abs(y[normal] - reference[normal]) / spacing))
    assert worst <= bound
    # The long-double reference itself, against mpmath at the two worst points.
    for value in (-4.144465205587267, -2.7532975522469556):
        wide_value = np.longdouble(value)
        ours = np.exp(wide_value) / (1 + np.exp(wide_value))
        assert abs(mpmath.mpf(float(ours)) - sigmoid_exact(value)) <= 2**-60  # type: ignore[operator]


def test_sigmoid_far_negative_tail() -> None:
    y = snn.Sigmoid().forward(np.array([-40.0, -100.0, -700.0]))
    assert y[0] == pytest.approx(4.248354255291589e-18, rel=1e-15)
    assert y[1] == pytest.approx(float(sigmoid_exact(-100.0)), rel=1e-15)
    assert y[2] == pytest.approx(float(sigmoid_exact(-700.0)), rel=1e-15)


def test_sigmoid_backward_is_finite_everywhere() -> None:
    big = np.finfo(np.float64).max
    x = np.concatenate(
        [-np.geomspace(1e-300, 1e308, 300), np.geomspace(1e-300, 1e308, 300), [-big, big]]
    )
    sigmoid = snn.Sigmoid()
    sigmoid.forward(x)
    with np.errstate(over="raise", divide="raise", invalid="raise"):
        dx = sigmoid.backward(np.ones_like(x))
    assert np.all(np.isfinite(dx)) and np.all(dx >= 0)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_keeps_relative_accuracy_in_the_left_tail(approximate: str) -> None:
    x = -np.linspace(0.5, 30.0, 120)
    y = snn.Gelu(approximate=approximate).forward(x)  # type: ignore[arg-type]
    c = mpmath.sqrt(2 / mpmath.pi)

    def exact(v: float) -> object:
        v = mpmath.mpf(v)
        if approximate == "none":
            return v * mpmath.erfc(-v / mpmath.sqrt(2)) / 2
        return v / (1 + mpmath.exp(-2 * c * (v + mpmath.mpf("0.044715") * v**3)))

    want = [exact(v) for v in x]
    # Every point counts, chosen by its x and never by the output: for the exact form
    # every reference is a normal number (the smallest, at x = -30, about 1e-197), so a
    # result flushed to 0, as PyTorch's 1 + erf(x) form gives for x < -8.3, fails; the
    # tanh form's underflows to 0 (or a subnormal) from about x = -26, and so must ours.
    if approximate == "none":
        assert min(abs(float(w)) for w in want) >= np.finfo(np.float64).smallest_normal  # type: ignore[arg-type]
    # The tail is ill-conditioned: rounding the argument of erfc (or of the
    # exponential) by half an ulp moves the result by about x**2 (or |2u|) ulps. The
    # exact form carries -x/sqrt(2) to twice the precision (functional.ncdf) and stays
    # within a few ulps (it was 1,857 off at x = -37 before); the tanh form stays within
    # a few ulps of its conditioning bound.
    errors = ulp_error(y, want)
    if approximate == "none":
        assert np.all(errors <= 8)
    else:
        u = 2 * float(c) * (x + 0.044715 * x**3)
        assert np.all(errors <= 4 * (1 + np.abs(u)))


def test_softplus_without_cut_off() -> None:
    x = np.array([-745.0, -40.0, -1.0, 0.0, 1.0, 19.0, 21.0, 40.0, 700.0])
    y = snn.Softplus().forward(x)
    # At x = -745 the value is subnormal (about 4e-324): it must not flush to 0 either.
    assert_within_ulps(y, [mpmath.log1p(mpmath.exp(mpmath.mpf(v))) for v in x], 4)
    # 21 + log1p(exp(-21)): PyTorch would return exactly 21.0 here
    assert y[6] > 21.0


def test_ncdf_and_npdf_within_a_few_ulp_down_the_left_tail() -> None:
    # Their arguments, -z/sqrt(2) and z**2, are carried to twice the precision: rounded,
    # they put Phi 1,570 and phi 508 ulps off here. Down to where both leave the normal
    # range (z = -37.5), and up through the right side.
    rng = np.random.default_rng(3)
    z = np.concatenate([-rng.uniform(1, 37.5, 1500), rng.uniform(-5, 38, 500), [0.0, -0.0]])
    assert_within_ulps(F.ncdf(z), [mpmath.ncdf(mpmath.mpf(v)) for v in z], 8)
    assert_within_ulps(F.npdf(z), [mpmath.npdf(mpmath.mpf(v)) for v in z], 8)
    for narrow in (np.float32, np.float16):  # computed in float64, rounded once
        zn = z[np.abs(z) < 10].astype(narrow)
        assert F.ncdf(zn).dtype == narrow and F.npdf(zn).dtype == narrow
        np.testing.assert_array_equal(F.ncdf(zn), F.ncdf(zn.astype(np.float64)).astype(narrow))
        np.testing.assert_array_equal(F.npdf(zn), F.npdf(zn.astype(np.float64)).astype(narrow))


def test_ncdf_and_npdf_at_the_ends() -> None:
    z = np.array([np.inf, -np.inf, np.nan, 0.0, 40.0, -40.0, 1e300, -1e300])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        phi, density = F.ncdf(z), F.npdf(z)
    np.testing.assert_array_equal(phi, [1.0, 0.0, np.nan, 0.5, 1.0, 0.0, 1.0, 0.0])
    np.testing.assert_array_equal(density, [0.0, 0.0, np.nan, 1 / np.sqrt(2 * np.pi), 0.0,
                                            0.0, 0.0, 0.0])  # fmt: skip


def test_erfc_within_a_few_ulp_over_the_whole_float64_range() -> None:
    # both signs, every binade down to the smallest normal, each interval's ends,
    # and the right tail down to where erfc leaves the normal range (z ~ 26.5)
    magnitudes = np.geomspace(np.finfo(np.float64).smallest_normal, 27.3, 500)
    ends = [0.46875, 4.0, 26.5]
    near_ends = [np.nextafter(e, d) for e in ends for d in (0.0, 30.0)]
    x = np.concatenate([-magnitudes, magnitudes, np.linspace(-6.0, 27.3, 1500), ends, near_ends])
    x = np.concatenate([x, -np.asarray(near_ends)])
    y = F.erfc(x)
    assert_within_ulps(y, [mpmath.erfc(mpmath.mpf(v)) for v in x], 6)


def test_erfc_float32_within_a_few_float32_ulp() -> None:
    x = np.linspace(-4.0, 10.0, 20001, dtype=np.float32)
    y = F.erfc(x)
    assert y.dtype == np.float32
    exact = np.array([float(mpmath.erfc(mpmath.mpf(float(v)))) for v in x])
    normal = exact >= np.finfo(np.float32).smallest_normal
    spacing = np.spacing(exact[normal].astype(np.float32)).astype(np.float64)
    assert np.max(np.abs(y[normal] - exact[normal]) / spacing) <= 10


def test_erfc_at_the_ends() -> None:
    for dtype in (np.float32, np.float64):
        x = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 30.0, -30.0, 1e300], dtype=np.float64)
        with np.errstate(over="ignore"):
            x = x.astype(dtype)
        with np.errstate(over="raise", invalid="raise", divide="raise"):
            y = F.erfc(x)
        np.testing.assert_array_equal(y, np.array([0, 2, np.nan, 1, 1, 0, 2, 0], dtype))


def test_erfc_float16_is_the_correctly_rounded_float16_of_erfc() -> None:
    # Every finite float16 in [-5, 12] (beyond, erfc is 2 or 0): through float32 two
    # were a float16 ulp off (0.07043 gave 0.9204); its range overflows the polynomials.
    x = np.arange(0, 1 << 16, dtype=np.uint16).view(np.float16)
    x = x[np.isfinite(x) & (x >= -5) & (x <= 12)]
    with np.errstate(over="raise", invalid="raise"):
        y = F.erfc(x)
    want = np.array([float(mpmath.erfc(mpmath.mpf(float(v)))) for v in x]).astype(np.float16)
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y, want)


def test_sigmoid_float16_is_the_correctly_rounded_float16_of_the_sigmoid() -> None:
    # A quarter of all finite float16 values (every fourth bit pattern) against mpmath.
    x = np.arange(0, 1 << 16, dtype=np.uint16).view(np.float16)
    x = x[np.isfinite(x)]
    with np.errstate(over="raise", invalid="raise"):
        y = F.sigmoid(x)
    want = np.array([float(1 / (1 + mpmath.exp(-mpmath.mpf(float(v))))) for v in x[::4]]).astype(
        np.float16
    )
    assert y.dtype == np.float16
    np.testing.assert_array_equal(y[::4], want)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
def test_float32_gelu_within_a_few_ulps_down_its_left_tail(
    compiled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In float32 the input is exact and so, split exactly, is x**2: exp(-x**2 / 2) serves
    # Phi and phi, and the result stays within a few ulps down to where it turns
    # subnormal (x = -13). erfc of x / sqrt 2 rounded first lost about x**2 ulps: 160 there.
    from scratchnn import _fused

    if compiled and not _fused.available():
        pytest.skip("compiled kernels not built (no C compiler?)")
    monkeypatch.setattr(_fused, "ENABLED", compiled)
    x = np.concatenate([-np.linspace(0.25, 13.0, 400), np.linspace(0.0, 9.0, 100)]).astype(np.float32)
    y = snn.Gelu().forward(x)
    exact = np.array([float(mpmath.mpf(float(v)) * mpmath.ncdf(float(v))) for v in x])
    float32_ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    errors = np.abs(y.astype(np.float64) - exact) / float32_ulp
    assert errors.max() <= 10, f"{errors.max():.3g} float32 ulps at x = {x[int(np.argmax(errors))]}"
