"""Builds the optional compiled kernels (src/ckernels/); everything else is in pyproject.toml.

The extension is optional: without a C compiler, or where the build fails,
the install goes on without it and every layer runs its NumPy passes.
"""

import sys
from pathlib import Path

from setuptools import Extension, setup

# One C file per concept (see src/ckernels/ckernels.h), built as one module.
# Relative paths, sorted: setuptools wants them so, and the build stays the same.
sources = sorted(str(p) for p in Path("src/ckernels").glob("*.c"))
kernels = Extension(
    "scratchnn._ckernels",
    sources,
    depends=["src/ckernels/ckernels.h"],
    # -fno-math-errno and -fno-trapping-math let gcc vectorise the math calls and the
    # selects; -fopenmp-simd honours `omp simd` without linking an OpenMP runtime.
    # -ffp-contract=off: no fused multiply-adds, so each arithmetic step rounds as
    # NumPy's does and only exp, erfc and the like differ from the NumPy path.
    # No -ffast-math: NaN, infinities and signed zeros must stay exact.
    # -pthread: the kernels' one worker thread (threads.c).
    # -fvisibility=hidden: the files share names (ckernels.h) that the module
    # does not export; only PyInit__ckernels is visible outside it.
    extra_compile_args=["-O3", "-std=gnu11", "-fno-math-errno", "-fno-trapping-math",
                        "-ffp-contract=off", "-fopenmp-simd", "-pthread", "-fvisibility=hidden"],
    extra_link_args=["-pthread"],
    libraries=["mvec", "m"],
    optional=True,
)

# libmvec (the SIMD exp, expm1, log1p, tanh, erfc) is glibc's, on Linux.
setup(ext_modules=[kernels] if sys.platform == "linux" else [])
