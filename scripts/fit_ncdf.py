"""Fit the polynomial of the float32 GPU kernels' Phi (``ncdf_float`` in kernels/cuda.py).

    .venv/bin/python scripts/fit_ncdf.py

For c >= 0, Phi(-c) = erfc(z) / 2 with z = c / sqrt 2, and erfc(z) = exp(-z**2) erfcx(z).
erfcx is smooth and bounded on [0, inf); with t = 1 / (1 + P z), which maps
[0, inf) onto (0, 1], erfcx(z) = t Q(t) with Q smooth on [0, 1]. Q is fitted as a
polynomial of degree 9 on Chebyshev points of t (z up to 10, where erfc(z) has
underflowed float32), weighted towards the least largest relative error (Lawson's
iteration), against mpmath at 40 digits. Prints the largest relative error of the fit
and the C lines of its Horner evaluation. (Degree 10 with P = 0.5 fits to 3.4e-9, one
FMA an element more; degree 8 loses an ulp or more of Gelu's accuracy in float32.)
"""

from __future__ import annotations

import mpmath
import numpy as np

DEGREE = 9
P = 0.4
Z_MAX = 10.0
POINTS = 3000


def fit(degree: int = DEGREE, points: int = POINTS) -> tuple[np.ndarray, float]:
    """The coefficients of Q (lowest first) and the fit's largest relative error."""
    mpmath.mp.dps = 40
    t_min = 1 / (1 + P * Z_MAX)
    k = np.arange(points)
    t = (1 + t_min) / 2 + (1 - t_min) / 2 * np.cos(np.pi * (k + 0.5) / points)
    z = (1 / t - 1) / P
    q = np.array(
        [float(mpmath.exp(zi**2) * mpmath.erfc(zi) / ti) for zi, ti in zip(map(mpmath.mpf, z), t)]
    )
    powers = np.vander(t, degree + 1, increasing=True)
    weights = np.full(points, 1.0 / points)
    for _ in range(30):
        root = np.sqrt(weights)[:, None]
        coefficients = np.linalg.lstsq(powers / q[:, None] * root, root[:, 0], rcond=None)[0]
        error = np.abs(powers @ coefficients / q - 1)
        weights = weights * error
        weights /= weights.sum()
    return coefficients, float(error.max())


def main() -> None:
    coefficients, error = fit()
    print(f"largest relative error of the fit: {error:.2e}")
    literals = [f"{float(np.float32(c)):.9e}f" for c in coefficients]
    print(f"    float q = {literals[-1]};")
    for literal in reversed(literals[:-1]):
        print(f"    q = fmaf(q, t, {literal});")


if __name__ == "__main__":
    main()
