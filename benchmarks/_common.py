"""What every benchmark shares: the machine report and the paired-rounds timer.

Timings on a shared VM drift by tens of percent from one minute to the next,
so the benchmarks never compare numbers taken at different times. Every
contender runs once per round, in an order that rotates from round to round,
and the ratio of two contenders is the median over rounds of their ratio in
the same round.
"""

from __future__ import annotations

import ctypes
import glob
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from scratchnn.cli import positive_int  # noqa: F401  (the scripts' argparse type)


def cpu_model() -> str:
    """The processor, as /proc/cpuinfo names it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return " ".join(f for f in ("avx2", "fma", "avx512f") if f in flags)
    except OSError:
        pass
    return "?"


def _openblas_kernel() -> str:
    """The OpenBLAS core NumPy actually runs (threadpoolctl if present, else ctypes)."""
    try:
        import threadpoolctl

        for pool in threadpoolctl.threadpool_info():
            if pool.get("internal_api") == "openblas":
                return f"{pool['architecture']}, {pool['num_threads']} threads"
    except ImportError:
        pass
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "*openblas*.so*"))
    for lib in libs:
        try:
            handle = ctypes.CDLL(lib)
            for name in ("scipy_openblas_get_corename64_", "openblas_get_corename"):
                if hasattr(handle, name):
                    fn = getattr(handle, name)
                    fn.restype = ctypes.c_char_p
                    return str(fn().decode())
        except OSError:
            continue
    return "unknown"


def machine_report() -> str:
    """Machine, load, versions and the BLAS in use, as lines for the top of a table."""
    blas = "?"
    try:
        config = np.show_config(mode="dicts")
        info = config["Build Dependencies"]["blas"]
        blas = f"{info['name']} {info['version']}"
    except Exception:  # the layout of show_config is not a stable API
        pass
    lines = [
        f"machine: {cpu_model()} ({_cpu_flags()}), {os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}",
        f"load average (1, 5, 15 min): {', '.join(f'{v:.2f}' for v in os.getloadavg())}",
        f"python {platform.python_version()}, numpy {np.__version__}, BLAS {blas} "
        f"(kernel {_openblas_kernel()})",
    ]
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS"):
        if var in os.environ:
            lines.append(f"{var}={os.environ[var]}")
    try:
        import torch

        lines.append(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    except ImportError:
        lines.append("torch: not installed")
    lines.append(_scratchnn_report())
    return "\n".join(lines)


def _scratchnn_report() -> str:
    """scratchnn's version and commit, whether its compiled kernels run, on how many threads."""
    import subprocess

    import scratchnn
    from scratchnn import _fused, _threads

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    kernels = "on" if _fused.ENABLED else "off (SCRATCHNN_KERNELS=0 or not built)"
    return (
        f"scratchnn {scratchnn.__version__} (commit {commit}), compiled kernels {kernels}, "
        f"{_fused.THREADS} kernel threads, {_threads.THREADS} NumPy-block threads"
    )


def limit_threads(n: int) -> None:
    """Run everything on ``n`` threads: OpenBLAS (threadpoolctl), PyTorch and scratchnn's own."""
    import torch
    from threadpoolctl import threadpool_limits  # pip install -e ".[bench]"

    from scratchnn import _fused, _threads

    torch.set_num_threads(n)
    threadpool_limits(n, user_api="blas")  # holds until the process ends
    _fused.THREADS = _threads.THREADS = n


@dataclass
class Timing:
    """Seconds per call of each contender, one entry per round."""

    rounds: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.rounds[name])

    def ratio(self, name: str, reference: str) -> float:
        """Median over rounds of ``time(name) / time(reference)`` in the same round."""
        pairs = zip(self.rounds[name], self.rounds[reference])
        return statistics.median(a / b for a, b in pairs)


def _calls_for(fn: Callable[[], object], min_seconds: float) -> int:
    """How many calls make one timing last at least ``min_seconds`` (after a warm-up call),
    as far as one timed call tells."""
    fn()
    started = time.perf_counter()
    fn()
    once = max(time.perf_counter() - started, 1e-7)
    return max(1, min(100_000, math.ceil(min_seconds / once)))


def paired_rounds(
    contenders: dict[str, Callable[[], object]], *, rounds: int = 7, min_seconds: float = 0.05
) -> Timing:
    """Time each contender once per round, in an order that rotates each round."""
    calls = {name: _calls_for(fn, min_seconds) for name, fn in contenders.items()}
    names = list(contenders)
    result: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn, n = contenders[name], calls[name]
            started = time.perf_counter()
            for _ in range(n):
                fn()
            result[name].append((time.perf_counter() - started) / n)
    return Timing(result)


def format_seconds(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} µs"
    if seconds < 1.0:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A Markdown table, ready to paste into docs/benchmarks.md."""
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    sys.stdout.flush()
