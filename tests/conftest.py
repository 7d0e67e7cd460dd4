"""Runs the conformance, loss, BatchNorm, kept-slope, thread and optimiser suites on both paths,
and refuses to run without the compiled kernels where ``SCRATCHNN_REQUIRE_KERNELS=1``; the
``gpu`` fixture of the GPU tests (tests/test_gpu*.py): the device under test."""

from __future__ import annotations

import os
from typing import Any

import fake_cuda
import fake_cupy
import pytest
from gpu_support import real_cupy_reason

from scratchnn import _fused


def pytest_sessionstart(session: pytest.Session) -> None:
    # scripts/test.sh sets this: its setup installs a C compiler, so missing kernels there
    # mean a broken build, which would otherwise only turn ~1,200 tests into skips.
    if os.environ.get("SCRATCHNN_REQUIRE_KERNELS") == "1" and not _fused.available():
        raise pytest.UsageError(
            "SCRATCHNN_REQUIRE_KERNELS=1, but the compiled kernels are not built "
            "(the compiler's messages are in .venv/pip-install.log); set it to 0 to test without them"
        )


# Every layer must keep the same contract whichever path computes it.
_BOTH_PATHS = {
    "test_conv_pool",
    "test_conformance",
    "test_cnn_layers",
    "test_threads",
    "test_optim",
    "test_linear_and_losses",
    "test_kept_slope",
    "test_batchnorm",
    "test_functional",
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.module.__name__ not in _BOTH_PATHS:
        return
    compiled = pytest.param(
        "compiled",
        marks=pytest.mark.skipif(
            not _fused.available(), reason="compiled kernels not built (no C compiler?)"
        ),
    )
    metafunc.parametrize("kernel_path", [compiled, "numpy"], indirect=True)


@pytest.fixture(autouse=True)
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str | None:
    """The path under test ("compiled" or "numpy") where a module runs on both, else None."""
    path = getattr(request, "param", None)
    if path is not None:
        monkeypatch.setattr(_fused, "ENABLED", path == "compiled")
    return path


@pytest.fixture(params=["fake", "fake-kernels", "cuda"])
def gpu(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The array module of the device under test: the fake CuPy, with or without the
    CUDA kernels run on the CPU (tests/fake_cuda.py), or the real one."""
    if request.param == "fake":
        return fake_cupy.install(monkeypatch)
    if request.param == "fake-kernels":
        reason = fake_cuda.available()
        if reason is not None:
            print(f"skipping the CPU run of the CUDA kernels: {reason}")
            pytest.skip(reason)
        return fake_cupy.install(monkeypatch, kernels=True)
    reason = real_cupy_reason()
    if reason is not None and os.environ.get("SCRATCHNN_REQUIRE_GPU"):
        pytest.fail(f"SCRATCHNN_REQUIRE_GPU is set, but {reason}")
    if reason is not None:
        print(f"skipping the real-GPU run: {reason}")
        pytest.skip(reason)
    import cupy

    return cupy
