"""``scratchnn demo``: the notebook's printed cells, and a step table that agrees with the formulas.

Oracles: the seed notebook's printed output, its ``Relu``/``Sigmoid`` code
(verbatim formulas), and the sigmoid's derivative y (1 - y) in float64.
"""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from scratchnn.cli import main

# The notebook's printed output of In [2] and In [3], character for character.
NOTEBOOK_X = "[[ 1.  -0.5]\n [-2.   3. ]]"
NOTEBOOK_MASK = "[[False  True]\n [ True False]]"
SEED_X = np.array([[1.0, -0.5], [-2.0, 3.0]])

ROW = re.compile(r"^\s+([1-4])\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$")


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 0
    return capsys.readouterr().out


def table_rows(out: str) -> list[tuple[int, str, float, float, float, str]]:
    rows = []
    for line in out.splitlines():
        match = ROW.match(line)
        if match:
            step, node, output, local, grad, formula = match.groups()
            rows.append((int(step), node, float(output), float(local), float(grad), formula))
    return rows


def test_demo_prints_the_notebook_cells_exactly(capsys: pytest.CaptureFixture[str]) -> None:
    out = run(["demo"], capsys)
    assert f">>> print(x)\n{NOTEBOOK_X}\n" in out
    assert f">>> print(mask)\n{NOTEBOOK_MASK}\n" in out
    assert f">>> print(relu.mask)\n{NOTEBOOK_MASK}\n" in out


def test_demo_prints_relu_and_sigmoid_as_the_seed_code_computes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = run(["demo"], capsys)
    # the seed's code: out[x <= 0] = 0; dout[mask] = 0; 1 / (1 + exp(-x)); dout * (1 - y) * y
    relu_out = SEED_X.copy()
    relu_out[SEED_X <= 0] = 0
    relu_dx = np.ones_like(SEED_X)
    relu_dx[SEED_X <= 0] = 0
    y = 1 / (1 + np.exp(-SEED_X))
    assert f">>> print(relu.forward(x))\n{relu_out}\n" in out
    assert f">>> print(relu.backward(np.ones_like(x)))\n{relu_dx}\n" in out
    assert f">>> print(sigmoid.forward(x))\n{y}\n" in out
    assert f">>> print(sigmoid.backward(np.ones_like(x)))\n{1.0 * (1.0 - y) * y}\n" in out


@pytest.mark.parametrize(("x", "dout"), [(1.0, 1.0), (0.5, 2.0), (-3.0, -0.5), (8.0, 1.0)])
def test_step_table_agrees_with_the_formulas(
    x: float, dout: float, capsys: pytest.CaptureFixture[str]
) -> None:
    out = run(["demo", "--x", str(x), "--dout", str(dout)], capsys)
    rows = table_rows(out)
    assert [(r[0], r[1], r[5]) for r in rows] == [
        (1, "/", "-y**2"), (2, "+1", "1"), (3, "exp", "exp(-x)"), (4, "×-1", "-1"),
    ]  # fmt: skip
    e = np.exp(-x)
    y = 1.0 / (1.0 + e)
    outputs = [y, 1.0 + e, e, -x]
    locals_ = [-(y**2), 1.0, e, -1.0]
    grad = dout
    for (_, _, output, local, printed_grad, _), want_out, want_local in zip(
        rows, outputs, locals_, strict=True
    ):
        grad *= want_local
        # printed with 8 significant digits
        assert output == pytest.approx(want_out, rel=1e-7)
        assert local == pytest.approx(want_local, rel=1e-7)
        assert printed_grad == pytest.approx(grad, rel=1e-7)
    assert rows[-1][4] == pytest.approx(dout * y * (1 - y), rel=1e-7)
    assert "the chain agrees" in out


def test_demo_shows_where_the_chain_breaks(capsys: pytest.CaptureFixture[str]) -> None:
    # -x = 800 > log(float64 max) = 709.78: exp(-x) overflows, the gradient turns NaN
    out = run(["demo", "--x", "-800"], capsys)
    grads = [r[4] for r in table_rows(out)]
    assert grads[0] == 0.0 and np.isnan(grads[2]) and np.isnan(grads[3])
    assert "the chain breaks" in out
    # -x = 88.73 > log(float32 max) = 88.72
    out = run(["demo", "--x", "-88.73", "--dtype", "float32"], capsys)
    assert np.isnan(table_rows(out)[-1][4])
    fused = float(re.search(r"fused Sigmoid = (\S+)", out).group(1))  # type: ignore[union-attr]
    y = 1.0 / (1.0 + np.exp(88.73))
    assert fused == pytest.approx(y * (1 - y), rel=1e-5)


def test_demo_reports_a_subnormal_against_zero_as_a_relative_difference_of_one(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # At x = -709.78, y = 5.6e-309 is subnormal: y**2 underflows to 0, so the chain's
    # gradient is exactly 0 while dout y (1 - y) = y is not. |0 - y| / max(|0|, |y|) = 1.
    out = run(["demo", "--x", "-709.78"], capsys)
    assert table_rows(out)[-1][4] == 0.0
    fused = float(re.search(r"fused Sigmoid = (\S+)", out).group(1))  # type: ignore[union-attr]
    assert 0 < fused < np.finfo(np.float64).tiny
    assert "the chain differs (relative difference 1.0e+00; y**2 underflowed" in out


def test_demo_says_when_the_chain_is_the_right_one(capsys: pytest.CaptureFixture[str]) -> None:
    # At x = 40, y rounds to 1 in float64, so the fused (1 - y) y is 0; the chain's
    # y**2 exp(-x) gives the true derivative exp(-40) / (1 + exp(-40))**2.
    out = run(["demo", "--x", "40"], capsys)
    assert table_rows(out)[-1][4] == pytest.approx(np.exp(-40.0), rel=1e-6)
    assert "y rounds to 1, so the fused (1 - y) y is 0: here the chain's exp(-x) is right" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--x", "1e39", "--dtype", "float32"],
        ["demo", "--x", "0", "--dout", "1e300", "--dtype", "float32"],
    ],
)
def test_values_beyond_the_dtype_are_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    # float32's largest is 3.4e38: these would show as inf everywhere under a finite header.
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "must be a finite number in float32" in captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--dout", "1e-50", "--dtype", "float32"], "dout = 1e-50 rounds to 0 in float32"),
        (["demo", "--x", "1e-50", "--dtype", "float32"], "x = 1e-50 rounds to 0 in float32"),
    ],
)
def test_values_that_round_to_zero_in_the_dtype_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The header said dout = 1e-50 over a table of zeros: the chain had run on 0.
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1 and message in captured.err


def test_negative_numbers_with_an_exponent_are_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    # argparse took -1e-2 for an option ("expected one argument"); -2.5 it took.
    assert main(["demo", "--x", "-1e-2", "--dout", "-2.5E1"]) == 0
    spaced = capsys.readouterr().out
    assert main(["demo", "--x=-0.01", "--dout=-25"]) == 0
    assert capsys.readouterr().out == spaced
    with pytest.raises(SystemExit) as parser_exit:  # argparse's own error: one line, status 2
        main(["demo", "--x", "-inf"])
    assert parser_exit.value.code == 2
    assert "argument --x: must be finite, got '-inf'" in capsys.readouterr().err


def test_library_functions_refuse_other_dtypes_before_any_work() -> None:
    from scratchnn.demo import sigmoid_steps, step_table

    for function in (sigmoid_steps, step_table):
        with pytest.raises(ValueError, match="dtype must be float64 or float32, got 'float16'"):
            function(1.0, dtype="float16")
        with pytest.raises(ValueError, match="x must be a finite number"):
            function(float("nan"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required"),
        (["bogus"], "invalid choice"),
        (["demo", "--x", "abc"], "not a number"),
        (["demo", "--x", "nan"], "finite"),
        (["demo", "--dtype", "float16"], "invalid choice"),
    ],
)
def test_bad_options_exit_non_zero_with_one_line(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and message in err


def test_python_dash_m_runs_the_demo() -> None:
    result = subprocess.run(
        [sys.executable, "-W", "error", "-m", "scratchnn", "demo"],
        capture_output=True, text=True, encoding="utf-8", check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert NOTEBOOK_X in result.stdout and NOTEBOOK_MASK in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize(("x", "dtype"), [("30", "float64"), ("36", "float64"), ("15", "float32")])
def test_demo_says_which_is_right_where_y_is_near_1(
    x: str, dtype: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # For 20 < x < 37 (float64) the fused y (1 - y) keeps few digits of 1 - y; the chain's
    # gradient is right (mpmath below). The line said only "the chain differs", and
    # showed y = 1 beside a y (1 - y) that is not 0.
    mpmath = pytest.importorskip("mpmath")
    out = run(["demo", "--x", x, "--dtype", dtype], capsys)
    exact = float(mpmath.exp(-mpmath.mpf(x)) / (1 + mpmath.exp(-mpmath.mpf(x))) ** 2)
    chain = table_rows(out)[-1][4]
    fused = float(re.search(r"fused Sigmoid = (\S+)", out).group(1))  # type: ignore[union-attr]
    assert abs(chain - exact) < abs(fused - exact)  # the oracle's verdict, as the line says
    assert "y is near 1, and 1 - y in the fused (1 - y) y keeps few digits" in out
    assert "here the chain's exp(-x) is right" in out
    if dtype == "float64":  # (y = 0.99999964 in float32 keeps its digits in 8 places)
        assert re.search(r"\(y = 1 - \d\.\d+e-\d+\)", out)


def test_demo_refuses_an_input_that_rounds_to_zero_in_float64(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # float("1e-400") is 0: the demo ran at x = 0 while its float32 form refused 1e-50.
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--x", "1e-400"])
    assert exit_info.value.code == 2
    assert "'1e-400' rounds to 0 in float64" in capsys.readouterr().err


def test_demo_writes_utf8_whatever_the_console() -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    code = "import sys; from scratchnn.cli import main; sys.exit(main(sys.argv[1:]))"
    result = subprocess.run([sys.executable, "-c", code, "demo"], capture_output=True, env=env,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "×" in result.stdout.decode("utf-8")
