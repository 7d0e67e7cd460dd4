"""The activations figure: every element-wise layer, its derivative from its own backward.

Oracles: a central finite difference of each layer's forward (independent of
its backward), the sigmoid's y (1 - y), and the PNG file format.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scratchnn.activation_plot import activation_curves, plot_activations
from scratchnn.cli import main
from scratchnn.models import ACTIVATIONS


def test_every_elementwise_activation_is_drawn() -> None:
    names = [curve.name for curve in activation_curves()]
    assert names == [name for name in ACTIVATIONS if name != "softmax"]


def test_derivatives_match_finite_differences_of_the_forward() -> None:
    # Away from the kinks of relu, leaky-relu and elu at 0, where no derivative exists.
    x = np.concatenate([np.linspace(-4.0, -0.05, 80), np.linspace(0.05, 4.0, 80)])
    h = 1e-6
    for curve in activation_curves(x):
        make = ACTIVATIONS[curve.name]
        numeric = (make().forward(x + h) - make().forward(x - h)) / (2 * h)
        np.testing.assert_allclose(curve.dy, numeric, rtol=1e-6, atol=1e-6, err_msg=curve.name)
        np.testing.assert_array_equal(curve.y, make().forward(x))


def test_sigmoid_curve_is_y_times_one_minus_y() -> None:
    (sigmoid,) = [c for c in activation_curves() if c.name == "sigmoid"]
    np.testing.assert_allclose(sigmoid.y, 1 / (1 + np.exp(-sigmoid.x)), rtol=1e-14)
    np.testing.assert_allclose(sigmoid.dy, sigmoid.y * (1 - sigmoid.y), rtol=1e-14)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_plot_writes_one_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = plot_activations(tmp_path / "activations.png", x=np.linspace(-3, 3, 61))
    width, height = png_size(path.read_bytes())
    assert width > 800 and height > 500
    assert [p.name for p in tmp_path.iterdir()] == ["activations.png"]  # no temporary left


def test_cli_plot_activations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "a.png"
    assert main(["plot", "activations", "--out", str(path)]) == 0
    assert capsys.readouterr().out == f"wrote {path}\n"
    png_size(path.read_bytes())


def test_drawing_modules_do_not_import_matplotlib() -> None:
    code = (
        "import sys, scratchnn, scratchnn.cli, scratchnn.graph, scratchnn.activation_plot; "
        "scratchnn.graph.sigmoid_drawing().to_dot(); print('matplotlib' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_the_format_follows_the_suffix_and_a_bad_one_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    svg = plot_activations(tmp_path / "a.svg", x=np.linspace(-1, 1, 5))
    assert b"<svg" in svg.read_bytes()[:2000]
    for name in ("act", "act.txt"):
        with pytest.raises(ValueError, match=f"{name}: cannot tell the image format"):
            plot_activations(tmp_path / name, x=np.linspace(-1, 1, 5))
        assert main(["plot", "activations", "--out", str(tmp_path / name)]) == 2
        assert "cannot tell the image format" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.svg"]
    assert plt.get_fignums() == []  # refused figures are closed too
    # An empty path named ".", the current directory, in its message.
    with pytest.raises(ValueError, match="the path to write the figure to is empty"):
        plot_activations("", x=np.linspace(-1, 1, 5))
    assert main(["plot", "activations", "--out", ""]) == 2
    assert "is empty" in capsys.readouterr().err


@pytest.mark.parametrize("x", [[], [1.0], [[0.0, 1.0]], [0.0, float("nan")]])
def test_a_grid_that_is_no_curve_is_refused(x: list) -> None:
    with pytest.raises(ValueError, match="x must be a 1-D grid of at least 2 finite points"):
        activation_curves(x)
