"""Builds the optional compiled kernels (src/scratchnn/_ckernels.c); everything else is in pyproject.toml.

The extension is optional: without a C compiler, or where the build fails,
the install goes on without it and every layer runs its NumPy passes.
"""

import sys

from setuptools import Extension, setup

kernels = Extension(
    "scratchnn._ckernels",
    ["src/scratchnn/_ckernels.c"],
    # -fno-math-errno and -fno-trapping-math let gcc vectorise the math calls and the
    # selects; -fopenmp-simd honours `omp simd` without linking an OpenMP runtime.
    # -ffp-contract=off: no fused multiply-adds, so each arithmetic step rounds as
    # NumPy's does and only exp, erfc and the like differ from the NumPy path.
    # No -ffast-math: NaN, infinities and signed zeros must stay exact.
    # -pthread: the kernels' one worker thread (see "Two threads" in the C file).
    extra_compile_args=["-O3", "-std=gnu11", "-fno-math-errno", "-fno-trapping-math",
                        "-ffp-contract=off", "-fopenmp-simd", "-pthread"],
    extra_link_args=["-pthread"],
    libraries=["mvec", "m"],
    optional=True,
)

# libmvec (the SIMD exp, expm1, log1p, tanh, erfc) is glibc's, on Linux.
setup(ext_modules=[kernels] if sys.platform == "linux" else [])
