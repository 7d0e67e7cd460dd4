"""What the GPU tests share: why real CuPy cannot run here, a small labelled data set,
a counter of the training steps replayed from a CUDA graph, a skip where
Fashion-MNIST is not installed, and a script of the checkout loaded as a module. (The ``gpu`` fixture,
the device under test, is in conftest.py.)"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest


def real_cupy_reason() -> str | None:
    """Why the real-CuPy tests cannot run here, or None when they can."""
    try:
        with warnings.catch_warnings():  # CuPy's own (a version note) fail nothing here
            warnings.simplefilter("ignore")
            import cupy
    except ImportError:
        return "CuPy is not installed (pip install scratchnn[gpu]); GPU tests need an NVIDIA GPU"
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy is installed but CUDA sees no GPU"
    except Exception as error:
        return f"CuPy is installed but CUDA is not usable: {error}"
    return None


def blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` float32 points of 20 features around 10 fixed centres, and their centres' labels."""
    rng = np.random.default_rng(seed)
    centres = 3 * np.random.default_rng(123).standard_normal((10, 20))
    t = rng.integers(0, 10, n)
    return (centres[t] + rng.standard_normal((n, 20))).astype(np.float32), t


def replays_counted(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one at each step replayed from a graph."""
    from scratchnn import steps

    counted: list[int] = []
    launch = steps._Replay._launch

    def counting(self: Any, t: Any) -> Any:
        counted.append(1)
        return launch(self, t)

    monkeypatch.setattr(steps._Replay, "_launch", counting)
    return counted


def require_fashion_mnist() -> None:
    """Skip, saying why, where Debian's Fashion-MNIST is not installed."""
    from scratchnn.data import find_dataset_files

    try:
        find_dataset_files("fashion-mnist")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")


def load_script(relative_path: str, name: str) -> Any:
    """A script of the checkout (benchmarks/, scripts/) as the module ``name``."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
