"""The GPU benchmarks (benchmarks/gpu*.py, bench_gpu_host.py) on the fake device: their
correctness checks pass, their exits without a GPU, and what they count and time."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fake_cuda
import fake_cupy
import numpy as np
import pytest
from gpu_support import load_script, replays_counted, require_fashion_mnist

import scratchnn as snn
from scratchnn.backend import to_host

# -- benchmarks/gpu.py: its no-GPU exit and its correctness checks, on the fake device ------------


def _benchmark_module() -> Any:
    return load_script("benchmarks/gpu.py", "benchmark_gpu")


def test_gpu_benchmark_without_a_gpu_says_so_and_exits_0() -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    code = (
        "import sys, runpy; sys.modules['cupy'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "no GPU to measure here" in result.stdout


@pytest.mark.parametrize("kernels", [False, True], ids=["fake", "fake-kernels"])
def test_gpu_benchmark_correctness_checks_pass_on_the_fake_device(
    kernels: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if kernels and fake_cuda.available() is not None:
        pytest.skip(str(fake_cuda.available()))
    fake_cupy.install(monkeypatch, kernels=kernels)
    fake_cuda.launches.clear()
    benchmark = _benchmark_module()
    # Seeded here: the benchmark itself draws fresh inputs on every run.
    checks = benchmark.check_all(
        "cuda", shapes=(((50, 37), 1), ((4096,), 1), ((8, 26), 2)), seed=20261129
    )
    failed = [(c.name, c.error) for c in checks if not c.ok]
    assert not failed and len(checks) > 100
    # fit's steps: replayed from a graph where the stand-in records one, else eager
    replays = [c.name for c in checks if "steps as fit takes them" in c.name]
    assert len(replays) == 6
    assert all(("(replayed)" if kernels else "(eager: this CuPy captures no graphs)") in name
               for name in replays)  # fmt: skip
    launched = set(fake_cuda.launches)
    # (the networks' gradients take the fused kernels: checked on the card too)
    fused = {"add_bias_relu", "relu_column_sum", "softmax_xent_bias_grad"}
    assert not kernels or {"relu_forward", *fused} <= launched
    assert not kernels or any(name.startswith("adam_x") for name in launched)


def test_gpu_benchmark_without_a_gpu_fails_when_one_is_required() -> None:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"
    code = (
        "import sys, runpy; sys.modules['cupy'] = None; sys.argv = sys.argv[1:]; "
        "runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(path), "--require-gpu"], capture_output=True, text=True
    )
    assert result.returncode == 3, result.stderr
    assert "no GPU to measure here" in result.stdout


def test_the_gpu_benchmark_times_the_train_command_on_the_fake_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require_fashion_mnist()
    fake_cupy.install(monkeypatch)
    benchmark = _benchmark_module()
    row = benchmark.time_train_command(None, 1, torch_epoch_s=1e9, torch_acc=0.5, limit=300)
    assert row.what == "scratchnn train --device cuda, epoch" and row.ours > 0
    assert row.verdict in ("met (<= 1)", "MISSED (<= 1)")
    assert "test acc" in row.note


class _HostEvent:
    """A CUDA event's record/synchronize on the host clock, for the timings' dry runs."""

    def record(self) -> None:
        self.at = time.perf_counter()

    def synchronize(self) -> None:
        pass


class _HostClock:
    """benchmarks/gpu.py's CudaClock on the host: PyTorch on its CPU device."""

    torch_device = "cpu"

    def cupy_ms(self, fn: Any, repeats: int) -> float:
        return float(_benchmark_module().median_ms(fn, _HostEvent, _host_ms, repeats, warmup=1))

    torch_ms = cupy_ms

    def wait_cupy(self) -> None:
        pass

    wait_torch = wait_cupy


def _host_ms(start: _HostEvent, stop: _HostEvent) -> float:
    return 1e3 * (stop.at - start.at)


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_the_gpu_benchmarks_timings_run_through_on_the_fake_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A dry run of every timing, small, before a lent GPU's few minutes run them for real:
    # the Python of each (the layers' calls, PyTorch's copies, the rows) works.
    torch = pytest.importorskip("torch")
    require_fashion_mnist()
    fake = fake_cupy.install(monkeypatch, kernels=True)
    benchmark = _benchmark_module()
    clock = _HostClock()
    rows = benchmark.time_activations(fake, torch, 2, clock, n=4096)
    assert [r.what.split()[0] for r in rows] == ["device"] + [a[0] for a in benchmark.ACTIVATIONS]
    assert all(r.ours > 0 and r.torch and r.verdict for r in rows[1:])
    replays = replays_counted(monkeypatch)
    rows = benchmark.time_mlp_step(fake, torch, 2, clock, sizes=(20, 16, 16, 10), batch=32)
    assert replays  # the step as fit takes it: replayed from the stand-in's graph
    assert [r.what for r in rows] == ["MLP step 20-16-16-10 b32 SGD, as fit",
                                      "MLP step 20-16-16-10 b32 SGD, eager",
                                      "MLP step 20-16-16-10 b32 SGD, CuPy's products",
                                      "MLP step 20-16-16-10 b32 SGD, layers apart",
                                      "MLP step 20-16-16-10 b32 SGD, bias by CuPy's calls",
                                      "MLP step 20-16-16-10 b32 SGD, read",
                                      "MLP step 20-16-16-10 b32 SGD, host side"]  # fmt: skip
    assert all(r.ours > 0 and r.torch for r in rows)
    assert [bool(r.verdict) for r in rows] == [True, False, False, False, False, False, False]
    from scratchnn.kernels import bias

    assert bias.add_bias.__module__ == "scratchnn.kernels.bias"  # put back after its row
    assert snn.Sequential.fuse_on_gpu is True  # and the pairs
    from scratchnn.kernels import products

    assert products.matmul.__module__ == "scratchnn.kernels.products"  # and the products
    net = snn.mlp([6, 5, 3], rng=np.random.default_rng(0)).to("cuda")
    x, t = fake.ones((4, 6), dtype=np.float32), fake.zeros(4, dtype=np.int64)
    fake_cuda.launches.clear()
    with benchmark.layers_apart():  # the other A/B row's other side: no pairs
        net.gradient(x, t)
    assert "add_bias_relu" not in fake_cuda.launches and "relu_forward" in fake_cuda.launches
    fake_cuda.launches.clear()
    net.gradient(x, t)
    assert "add_bias_relu" in fake_cuda.launches and "relu_forward" not in fake_cuda.launches
    out, b = fake.ones((4, 3), dtype=np.float32), fake.arange(3, dtype=np.float32)
    fake_cuda.launches.clear()
    with benchmark.cupy_bias_calls():  # the A/B row's other side: no kernel of ours
        bias.add_bias(out, b)
        sums = bias.column_sum(out)
    assert fake_cuda.launches == []
    np.testing.assert_array_equal(to_host(sums), [4.0, 8.0, 12.0])
    rows = benchmark.time_epochs(fake, torch, None, 1, clock, limit=300)
    assert [r.what for r in rows] == ["Fashion-MNIST epoch 784-256-128-10 Adam b128",
                                      "scratchnn train --device cuda, epoch"]  # fmt: skip
    # The same weights and batches: after one epoch of 300 images, both nets answer alike.
    ours, theirs = (float(p) for p in re.findall(r"(\d+\.\d+)%", rows[0].note))
    assert abs(ours - theirs) <= 1.0


def test_a_broken_timing_is_reported_and_the_others_still_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    benchmark = _benchmark_module()

    def broken() -> list[Any]:
        raise RuntimeError("no such kernel")

    rows, failed = benchmark.timings([
        ("first", lambda: [benchmark.Row("first row", 2.0, 4.0, target=1.0)]),
        ("second", broken),
        ("third", lambda: [benchmark.Row("third row", 3.0, 1.0)]),
    ])  # fmt: skip
    assert failed
    assert [r.what for r in rows] == [
        "first row", "second: FAILED, RuntimeError: no such kernel", "third row"
    ]  # fmt: skip
    out, err = capsys.readouterr()
    assert "first row" in out and "met (<= 1)" in out and "third row" in out
    assert "RuntimeError: no such kernel" in err  # the traceback


def test_gpu_benchmark_builds_the_same_network_in_pytorch() -> None:
    torch = pytest.importorskip("torch")
    benchmark = _benchmark_module()
    rng = np.random.default_rng(0)
    net = snn.mlp([30, 16, 10], rng=rng)
    model = benchmark._torch_mlp(torch, net, "cpu")
    x, t = rng.standard_normal((8, 30)).astype(np.float32), rng.integers(0, 10, 8)
    expected = torch.nn.functional.cross_entropy(model(torch.as_tensor(x)), torch.as_tensor(t))
    assert net.loss(x, t) == pytest.approx(expected.item(), rel=1e-5)


# -- bench_gpu_host.py (the host's time per step, on a null device), gpu_kernels.py, gpu_calls.py


def test_the_host_benchmarks_steps_make_the_same_device_calls() -> None:
    # The benchmark's difference is scratchnn's own Python only if both steps ask the device
    # for the same work; it says so when they do not, and any NumPy dispatch left in a
    # layer shows as a "numpy ..." call.
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu_host.py"
    result = subprocess.run(
        [sys.executable, str(path), "--rounds", "1"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "differ in device calls" not in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 784-")]
    assert len(rows) == 2, result.stdout
    for row in rows:
        assert "numpy" not in row and "18 empty, 8 gemm, 7 kernel" in row, row
        # a replay: the rows gathered into the graph's arrays, the launch, the loss copied out
        assert row.endswith("| 1 copy, 1 launch, 2 take |"), row


@pytest.mark.parametrize(
    ("script", "argument"),
    [("bench_gpu_host.py", "--rounds"), ("bench_epoch.py", "--rounds"), ("gpu.py", "--repeats")],
)
def test_the_benchmarks_refuse_zero_rounds_by_name(script: str, argument: str) -> None:
    # Zero rounds would end in a median of nothing: refused at once, the argument named.
    path = Path(__file__).resolve().parents[1] / "benchmarks" / script
    result = subprocess.run(
        [sys.executable, str(path), argument, "0"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert argument in result.stderr and "at least 1" in result.stderr


def _gpu_benchmark_script(name: str) -> Any:
    """benchmarks/<name>.py, one of the GPU scripts that import gpu.py's clock."""
    _benchmark_module()  # they import gpu.py as "gpu": the same module, by that name
    sys.modules.setdefault("gpu", sys.modules["benchmark_gpu"])
    return load_script(f"benchmarks/{name}.py", f"benchmark_{name}")


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_the_kernel_benchmark_runs_through_on_the_fake_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A dry run before a lent GPU runs it: every variant compiles, agrees with the
    # library's launch, and PyTorch's backward operators take the arguments given.
    torch = pytest.importorskip("torch")
    fake = fake_cupy.install(monkeypatch, kernels=True)
    benchmark = _gpu_benchmark_script("gpu_kernels")
    rows = benchmark.time_kernels(fake, torch, 1, _HostClock(), n=4 * 256 * 4 + 8)
    names = [f"{k[0]} {d}" for k in benchmark.KERNELS for d in ("fwd", "bwd")]
    assert [r.what for r in rows] == ["device copy (read+write)", *names, "sgd step", "adam step"]
    assert all(set(r.ms) == {v.name for v in benchmark.VARIANTS} for r in rows[1:])
    assert all(t > 0 for r in rows[1:] for t in r.ms.values())


def test_the_kernel_benchmark_finds_a_variant_that_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    if fake_cuda.available() is not None:
        pytest.skip(str(fake_cuda.available()))
    fake = fake_cupy.install(monkeypatch, kernels=True)
    benchmark = _gpu_benchmark_script("gpu_kernels")
    x = fake.asarray(np.random.default_rng(1).standard_normal(64, dtype=np.float32))
    runners = {"u2": benchmark.Runner(fake, "sigmoid_forward", benchmark.Variant("u2", 2, 256))}
    assert benchmark._check(fake, "sigmoid_forward", runners, [x], {}) == 0.0
    wrong = benchmark.Runner(fake, "tanh_forward", benchmark.Variant("u2", 2, 256))
    with pytest.raises(AssertionError, match="sigmoid_forward u2: y differs"):
        benchmark._check(fake, "sigmoid_forward", {"u2": wrong}, [x], {})


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_the_host_calls_benchmark_runs_through_on_the_fake_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A dry run before a lent GPU runs it: every call and its PyTorch counterpart run,
    # at the step's shapes, the candidates compute what the calls they would replace do
    # (time_calls checks each first), and the table adds the step's calls up.
    torch = pytest.importorskip("torch")
    fake = fake_cupy.install(monkeypatch, kernels=True)
    benchmark = _gpu_benchmark_script("gpu_calls")
    # Narrower layers than on a card: the stand-in runs column_sum's threads as OS threads
    # (it synchronises them) and every kernel unoptimised; the card's shapes took seconds.
    monkeypatch.setattr(benchmark, "SIZES", (784, 100, 64, 10))
    monkeypatch.setattr(benchmark, "BATCH", 40)
    rows = benchmark.time_calls(fake, torch, 2, 1, _HostClock())
    assert len(rows) == 15 + len(benchmark.ALTERNATIVES)
    assert [r.what for r in rows[15:]] == list(benchmark.ALTERNATIVES)
    assert all(r.ours_us > 0 and r.theirs_us > 0 for r in rows)
    assert sum(r.per_step for r in rows) == 18  # 25 device calls, 7 inside (bench_gpu_host)
    assert "the 18 calls of a step, added up" in benchmark.table(rows)
