"""The GPU benchmarks (benchmarks/gpu*.py, bench_gpu_host.py) on the fake device: their
correctness checks pass, their exits without a GPU, and what they count and time."""

from __future__ import annotations

import os
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
from gpu_support import real_cupy_reason, replays_counted, require_fashion_mnist

import scratchnn as snn
from scratchnn.backend import device_of, move_arrays, to_device, to_host
from scratchnn.kernels import OPS
from scratchnn.kernels.cuda import source
from scratchnn.models import cnn

# -- benchmarks/gpu.py: its no-GPU exit and its correctness checks, on the fake device ------------


def _load_script(relative_path: str, name: str) -> Any:
    """A script of the checkout (benchmarks/, scripts/) as the module ``name``."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _benchmark_module() -> Any:
    return _load_script("benchmarks/gpu.py", "benchmark_gpu")


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


def test_the_gpu_fixture_fails_instead_of_skipping_when_a_gpu_is_required(
    tmp_path: Path,
) -> None:
    if real_cupy_reason() is None:
        pytest.skip("a GPU is present: the fixture has nothing to refuse")
    env = {**os.environ, "SCRATCHNN_REQUIRE_GPU": "1"}
    here = Path(__file__).resolve().with_name("test_gpu.py")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--rootdir={here.parents[1]}",
         f"{here}::test_integer_relu_on_device"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout[-2000:]
    assert " 1 error" in result.stdout and "SCRATCHNN_REQUIRE_GPU is set" in result.stdout


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


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_kernels_launch_a_block_for_every_256_threads_of_work(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As PyTorch launches its element-wise kernels: a grid sized to the card left its last
    # blocks a second, mostly empty wave wherever fewer blocks than planned fit an SM. A
    # thread takes vectors_per_thread vectors: four for a forward (one array read), one for
    # a backward.
    from scratchnn.kernels import cuda

    fake = fake_cupy.install(monkeypatch, kernels=True)
    grids: list[tuple[str, int]] = []
    call = fake.RawKernel.__call__

    def recorded(kernel: Any, grid: Any, block: Any, args: Any, **options: Any) -> Any:
        assert block == (cuda.BLOCK,)
        grids.append((kernel.name, grid[0]))
        return call(kernel, grid, block, args, **options)

    monkeypatch.setattr(fake.RawKernel, "__call__", recorded)
    rng = np.random.default_rng(3)
    x = fake.asarray(rng.standard_normal(4 * 256 * 10 + 3, dtype=np.float32))
    dout = fake.asarray(rng.standard_normal(x.size, dtype=np.float32))
    layer = snn.Sigmoid()
    layer.forward(x)  # 2560 vectors of four, four a thread, and a scalar tail of 3
    layer.backward(dout)  # 2560 vectors, one a thread
    snn.Sigmoid().forward(x[1:])  # one element in: unaligned, 10242 elements one at a time
    monkeypatch.setattr(cuda, "MAX_BLOCKS", 2)
    y = snn.Sigmoid().forward(x)  # the grid-stride loops cover what 2 blocks do not
    np.testing.assert_allclose(y.get(), snn.Sigmoid().forward(x.get()), rtol=1e-6)
    assert grids == [("sigmoid_forward", 3), ("sigmoid_backward", 10), ("sigmoid_forward", 41),
                     ("sigmoid_forward", 2)]  # fmt: skip


# The CUDA sources run on the CPU (tests/fake_cuda.py). With launches set by hand, this checks
# each kernel's indexing (vector path, scalar tail, grid-stride loop) and its translated
# formula against the op's NumPy evaluation.
@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_kernel_source_computes_its_op_on_the_cpu(
    dtype: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scratchnn.kernels.ops import evaluate

    fake = fake_cupy.install(monkeypatch, kernels=True)
    rng = np.random.default_rng(12)
    for name, op in OPS.items():
        kernel = fake.RawKernel(source(op, dtype), op.name)
        for n, vec, grid, block in [(103, 1, 3, 4), (103, 0, 2, 5), (8, 1, 1, 1), (1, 1, 2, 2)]:
            arrays = []
            for array_name in op.inputs:
                if array_name in op.masks:
                    arrays.append(rng.random(n) < 0.5)
                elif array_name in ("h", "v") and not name.startswith(("silu", "sigmoid", "gelu")):
                    arrays.append(rng.random(n).astype(dtype))  # second moments are >= 0
                else:
                    arrays.append((3 * rng.standard_normal(n)).astype(dtype))
            if n >= 8 and "x" in op.inputs:
                # NaN and the infinities must come out as the formula says (the NaN-keeping
                # min and max, exp of -inf); -0.0 keeps its sign.
                arrays[op.inputs.index("x")][:5] = [np.nan, np.inf, -np.inf, -0.0, 0.0]
            scalars = {s: float(rng.uniform(0.1, 0.9)) for s in op.scalars}
            with np.errstate(invalid="ignore", over="ignore"):  # inf - inf is NaN by design
                expected = evaluate(op, np, [a.copy() for a in arrays], scalars)
            on_device = {a: fake.asarray(array.copy()) for a, array in zip(op.inputs, arrays)}
            for o in op.outputs:
                on_device.setdefault(o, fake.empty(n, bool if o in op.masks else dtype))
            names = [*op.inputs, *(o for o in op.outputs if o not in op.inputs)]
            args = [on_device[a] for a in names] + [dtype(scalars[s]) for s in op.scalars]
            kernel((grid,), (block,), (*args, np.int64(n), np.int32(vec)))
            for output, want in zip(op.outputs, expected):
                rtol = 1e-12 if dtype == np.float64 else 2e-6
                np.testing.assert_allclose(
                    on_device[output].get(), want, rtol=rtol, atol=rtol, err_msg=f"{name} {output}"
                )


def test_kernels_refuse_a_wrong_count_of_arrays(gpu: Any) -> None:
    # A kernel takes its arguments by position (and CuPy does not count them): one array too
    # many or too few would shift all the later ones, so the count is checked first.
    from scratchnn import kernels

    x = gpu.asarray(np.ones(8))
    with pytest.raises(TypeError, match=r"relu_backward takes 2 arrays \(dout, mask\), got 1"):
        kernels.run("relu_backward", x)
    with pytest.raises(TypeError, match="sgd takes 2 arrays"):
        kernels.run_many("sgd", [[x, x], [x, x, x]], lr=0.1)
    assert np.array_equal(to_host(x), np.ones(8))  # refused before any step


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_step_reads_scalars_from_the_gpu_as_it_runs(dtype: Any, gpu: Any) -> None:
    # Adam's step with its two folded bias corrections read from GPU memory (as a replayed
    # graph takes them) is the step with them given by value; next_row fills them in from
    # a table, row by row, and counts the rows. Another dtype is refused, and so is a
    # DeviceScalar where the fused kernel cannot run (NumPy arrays).
    from scratchnn import kernels
    from scratchnn.kernels.cuda import DeviceScalar, next_row

    if not hasattr(gpu, "RawModule"):
        pytest.skip("the fake CuPy without kernels runs no CUDA kernels")
    rng = np.random.default_rng(13)
    tensors = [[rng.standard_normal(n).astype(dtype) for _ in range(4)] for n in (37, 8, 1000)]
    for arrays in tensors:
        arrays[3] = np.abs(arrays[3])  # (v, a sum of squares)
    given = {"beta1": 0.9, "one_minus_beta1": 0.1, "beta2": 0.999, "one_minus_beta2": 1e-3}
    table = np.array([[31.25, 0.5], [0.0, 0.0], [17.5, 0.25]], dtype)
    results = []
    for by_value in (True, False):
        on_gpu = [[gpu.asarray(a.copy()) for a in arrays] for arrays in tensors]
        if by_value:
            kernels.run_many("adam", on_gpu, **given, inv_scale=17.5, eps_scaled=0.25)
        else:
            rows, row = gpu.asarray(table), gpu.asarray(np.full(2, np.nan, dtype))
            index = gpu.asarray(np.array([1], np.int64))
            next_row(gpu, rows, row, index)
            next_row(gpu, rows, row, index)  # rows 1 then 2
            assert to_host(index).tolist() == [3] and to_host(row).tolist() == [17.5, 0.25]
            at = {"inv_scale": DeviceScalar(row[0:1]), "eps_scaled": DeviceScalar(row[1:2])}
            kernels.run_many("adam", on_gpu, **given, **at)
        results.append([[to_host(a) for a in arrays] for arrays in on_gpu])
    for got, want in zip(results[1], results[0]):
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(results[0][0][0], tensors[0][0])  # a step was taken
    other = np.float64 if dtype == np.float32 else np.float32
    wrong = DeviceScalar(gpu.asarray(np.ones(1, other)))
    arrays = [gpu.asarray(a) for a in tensors[0]]
    with pytest.raises(TypeError, match=f"one element of the kernel's dtype {np.dtype(dtype)}"):
        kernels.run_many("adam", [arrays], **given, inv_scale=wrong, eps_scaled=0.25)
    with pytest.raises(TypeError, match="scalars read from the GPU take its fused CUDA kernel"):
        kernels.run_many("adam", [tensors[0]], **given, inv_scale=wrong, eps_scaled=0.25)


def test_cli_trains_on_the_device_and_resumes_on_the_cpu(
    gpu: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scratchnn.checkpoint import load_model
    from scratchnn.cli import main

    require_fashion_mnist()
    argv = ["train", "--hidden", "16", "--limit", "500", "--out", str(tmp_path)]
    assert main([*argv, "--device", "cuda", "--epochs", "1"]) == 0
    assert main(["train", "--resume", "--out", str(tmp_path), "--epochs", "2"]) == 0
    params, _ = load_model(tmp_path / "model.safetensors")
    assert all(isinstance(v, np.ndarray) for v in params.values())
    assert "epoch   2/2" in capsys.readouterr().out


def test_cli_evaluates_on_the_device_as_on_the_cpu(
    gpu: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from scratchnn.cli import main

    require_fashion_mnist()
    argv = ["train", "--hidden", "16", "--limit", "500", "--epochs", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    capsys.readouterr()
    model = str(tmp_path / "model.safetensors")
    assert main(["evaluate", model]) == 0
    on_cpu = capsys.readouterr().out
    assert main(["evaluate", model, "--device", "cuda"]) == 0
    on_device = capsys.readouterr().out
    assert "test accuracy" in on_cpu
    # Same report; its counts the same but for an image or two whose two best scores
    # are within float32's rounding (cuBLAS sums in another order than OpenBLAS).
    number = r"\d+(?:\.\d+)?"
    # Numbers out, and the spaces that align them (a count of 9 against 10 pads apart).
    assert re.sub(rf"\s*{number}", " #", on_device) == re.sub(rf"\s*{number}", " #", on_cpu)
    moved = [abs(float(a) - float(b)) for a, b in
             zip(re.findall(number, on_device), re.findall(number, on_cpu))]  # fmt: skip
    assert sum(moved) <= 8, f"more than two images differ:\n{on_cpu}\n{on_device}"


def test_cli_evaluate_on_cuda_without_cupy_fails_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from scratchnn.cli import main

    monkeypatch.setitem(sys.modules, "cupy", None)
    code = main(["evaluate", str(tmp_path / "model.safetensors"), "--device", "cuda"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install scratchnn[gpu]" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("c_in", [1, 8], ids=["per image", "one product"])
def test_conv_moved_to_the_device_between_forward_and_backward(c_in: int, gpu: Any) -> None:
    """Conv2d decides how to multiply from where its kept col lives, not from the forward."""

    rng = np.random.default_rng(9)
    x, dout = rng.standard_normal((3, c_in, 5, 6)), rng.standard_normal((3, 2, 5, 6))
    layer = snn.Conv2d(c_in, 2, 3, padding=1, rng=np.random.default_rng(0), dtype=np.float64)
    layer.forward(x)
    want = [layer.backward(dout), layer.dW, layer.db]
    layer.forward(x)
    move_arrays(layer, "cuda")
    got = [layer.backward(to_device(dout, "cuda")), layer.dW, layer.db]
    for g, w in zip(got, want):
        assert device_of(g) == "cuda"
        np.testing.assert_allclose(to_host(g), w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("route", ["cpu | cuda", "cuda | cpu"])
def test_a_cnn_moved_between_forward_and_backward_takes_dout_on_its_new_device(
    route: str, gpu: Any
) -> None:
    # Flatten, pooling and the like keep no arrays: only the layer's own record of its
    # device said where backward's dout belongs, and Sequential.to did not update it.
    before, after = route.split(" | ")
    rng = np.random.default_rng(52)
    x, t = rng.standard_normal((3, 1, 8, 8)), rng.integers(0, 10, 3)

    def build() -> snn.Sequential:
        return cnn(rng=np.random.default_rng(1), channels=[2], hidden=4, dtype=np.float64,
                   in_shape=(1, 8, 8))  # fmt: skip

    expected = build().gradient(x, t)
    net = build()
    net.to(before)
    net.loss(to_device(x, before), to_device(t, before))
    net.to(after)
    dout = net.last_layer.backward()
    assert device_of(dout) == after
    for layer in reversed(net.layers):
        dout = layer.backward(dout)
    for key, value in net.grads.items():
        np.testing.assert_allclose(to_host(value), expected[key], rtol=1e-10, atol=1e-14)


def test_a_layer_moved_to_the_device_names_a_host_input_or_dout(gpu: Any) -> None:
    layer = snn.Affine(np.ones((3, 2)), np.zeros(2))
    layer.forward(np.ones((4, 3)))
    layer.to("cuda")
    with pytest.raises(TypeError, match=r"Affine\.backward: dout is on cpu"):
        layer.backward(np.ones((4, 2)))
    with pytest.raises(TypeError, match=r"Affine\.forward: an input is on cpu"):
        layer.forward(np.ones((4, 3)))


def test_to_moves_arrays_in_lists_and_tuples_and_a_layer_moves_the_layers_it_holds(
    gpu: Any,
) -> None:
    class Residual(snn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.inner = snn.Affine(np.eye(2), np.zeros(2))
            self.scales = [np.ones(2), np.full(2, 2.0)]
            self.pair = (np.zeros(2), "label")
            self.outer = self  # a cycle: moving must not follow it

        def to(self, device: str) -> Residual:
            super().to(device)
            self.inner.to(device)  # the layers it holds are its to move
            return self

        @property
        def params(self) -> dict[str, Any]:
            return self.inner.params

        def _forward(self, x: Any) -> Any:
            return x + self.inner.forward(x) * self.scales[1]

        def _backward(self, dout: Any) -> Any:
            return dout + self.inner.backward(dout * self.scales[1])

    block = Residual()
    scales = block.scales
    net = snn.Sequential([block]).to("cuda")
    assert device_of(block.inner.W) == "cuda"
    assert block.scales is scales  # updated in place: whoever holds the list sees the move
    assert [device_of(a) for a in block.scales] == ["cuda", "cuda"]
    assert device_of(block.pair[0]) == "cuda" and block.pair[1] == "label"
    out = net.predict(to_device(np.ones((1, 2)), "cuda"))
    np.testing.assert_array_equal(to_host(out), [[3.0, 3.0]])


@pytest.mark.skipif(fake_cuda.available() is not None, reason=str(fake_cuda.available()))
def test_evaluate_on_the_device_refuses_bad_labels_when_it_reads_its_losses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The losses stay on the card until the end; their labels are checked then.
    from scratchnn.train import evaluate

    fake = fake_cupy.install(monkeypatch, kernels=True)
    rng = np.random.default_rng(12)
    net = snn.mlp([12, 8, 4], rng=rng).to("cuda")
    x, t = rng.standard_normal((2500, 12)).astype(np.float32), rng.integers(0, 4, 2500)
    t[2200] = 4
    with pytest.raises(ValueError, match=r"SoftmaxWithLoss: labels must lie in \[0, 4\)"):
        evaluate(net, fake.asarray(x), fake.asarray(t))


# -- benchmarks/bench_gpu_host.py: scratchnn's host time per step, on a null device -------------


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


def test_accuracy_of_a_network_on_the_device_names_host_labels(gpu: Any) -> None:
    # As loss and gradient do: scratchnn's mixing error, not the array library's own.
    net = snn.mlp([4, 3], rng=np.random.default_rng(0), dtype=np.float64).to("cuda")
    x = gpu.asarray(np.ones((2, 4)))
    for labels in (np.array([0, 1]), [0, 1]):
        with pytest.raises(TypeError, match=r"cannot mix NumPy \(cpu\) and CuPy \(cuda\)"):
            net.accuracy(x, labels)
    assert net.accuracy(x, gpu.asarray(np.array([0, 1]))) in (0.0, 0.5, 1.0)


def test_a_mask_of_another_shape_or_dtype_takes_the_array_calls_not_the_kernel(gpu: Any) -> None:
    # The kernel reads every array as dout's size: a (1,) mask beside a (1000,) dout was read
    # out of bounds (306 elements kept, AddressSanitizer's heap overflow), and a float mask
    # as bytes. The array calls broadcast, or refuse, as NumPy does.
    from scratchnn import kernels

    dout = np.random.default_rng(3).standard_normal(1000)
    for mask in (np.array([True]), np.array([False]), (dout > 0).astype(np.float64)):
        (dx,) = kernels.run("relu_backward", gpu.asarray(dout), gpu.asarray(mask))
        np.testing.assert_array_equal(to_host(dx), np.where(mask, 0.0, dout))
    with pytest.raises(ValueError):
        kernels.run("relu_backward", gpu.asarray(dout), gpu.asarray(np.ones(10, bool)))


def _gpu_benchmark_script(name: str) -> Any:
    """benchmarks/<name>.py, one of the GPU scripts that import gpu.py's clock."""
    _benchmark_module()  # they import gpu.py as "gpu": the same module, by that name
    sys.modules.setdefault("gpu", sys.modules["benchmark_gpu"])
    return _load_script(f"benchmarks/{name}.py", f"benchmark_{name}")


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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_gelu_on_the_device_is_within_a_few_ulps_of_mpmath(dtype: Any, gpu: Any) -> None:
    # The float32 kernels compute Phi by our own erfcx fit and phi from the same exact
    # x*x (kernels/cuda.py, ncdf_float and npdf_float): libdevice's erfcf of the rounded
    # -x/sqrt(2) put y up to 187 ulps off in the left tail, and exp(-x*x/2) put dx 60 ulps
    # off. float64 carries -x/sqrt(2) and x*x to twice the precision (ncdf_double, and
    # functional.ncdf where the kernels do not run): 1,857 ulps off before. The reference
    # is mpmath at 40 digits.
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    rng = np.random.default_rng(5)
    far = 13.5 if dtype == np.float32 else 37.5
    x = np.concatenate([rng.uniform(-far, far, 2000), rng.uniform(-4, 4, 1000),
                        np.linspace(-far, -8, 300)]).astype(dtype)  # fmt: skip
    exact = [mpmath.mpf(float(v)) for v in x]
    y_ref = np.array([float(v * mpmath.ncdf(v)) for v in exact])
    dx_ref = np.array([float(mpmath.ncdf(v) + v * mpmath.npdf(v)) for v in exact])
    # dx's own size: the sum cancels to 0 at x = -0.7518, where no formula keeps ulps of it.
    dx_size = np.array([float(mpmath.ncdf(v) + abs(v * mpmath.npdf(v))) for v in exact])
    layer = snn.Gelu()
    y = to_host(layer.forward(gpu.asarray(x)))
    dx = to_host(layer.backward(gpu.ones(x.shape, dtype=dtype)))
    # A GPU flushes float32 subnormals to 0: where Phi(x) is one (x < -13.04) y is 0, and
    # where phi(x) is one (x < -13.1) so is x phi(x), normal or not.
    tiny = np.finfo(dtype).tiny
    phi_ref = np.array([float(mpmath.ncdf(v)) for v in exact])
    pdf_ref = np.array([float(mpmath.npdf(v)) for v in exact])
    normal = (np.abs(y_ref) >= tiny) & (phi_ref >= tiny)
    y_ulps = np.abs(y - y_ref) / np.spacing(np.abs(y_ref).astype(dtype))
    assert y_ulps[normal].max() <= 16, x[normal][np.argmax(y_ulps[normal])]
    normal = (dx_size >= tiny) & (phi_ref >= tiny) & (pdf_ref >= tiny)
    dx_ulps = np.abs(dx - dx_ref) / np.spacing(dx_size.astype(dtype))
    assert dx_ulps[normal].max() <= 16, x[normal][np.argmax(dx_ulps[normal])]
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 20.0, -50.0], dtype=dtype)
    layer = snn.Gelu()
    y_special = to_host(layer.forward(gpu.asarray(special)))
    np.testing.assert_array_equal(y_special, [0.0, -0.0, np.inf, np.nan, np.nan, 20.0, -0.0])
    # inf * phi(inf) = inf * 0: NaN, as in PyTorch.
    dx_special = to_host(layer.backward(gpu.ones(special.shape, dtype=dtype)))
    np.testing.assert_array_equal(dx_special, [0.5, 0.5, np.nan, np.nan, np.nan, 1.0, 0.0])


def test_the_float32_ncdf_coefficients_are_the_fit_of_scripts_fit_ncdf() -> None:
    # The kernel's polynomial is the script's output (to a float32 rounding: another
    # BLAS may move the fit's last digits), and the fit is as close as it says.
    from scratchnn.kernels import cuda

    script = _load_script("scripts/fit_ncdf.py", "fit_ncdf")
    coefficients, error = script.fit()
    assert error < 1e-8
    horner = cuda._NCDF["float"].split("float q = ")[1].split("const float square")[0]
    in_kernel = re.findall(r"([-0-9.e+]+)f\)?;", horner)
    assert len(in_kernel) == script.DEGREE + 1
    np.testing.assert_allclose([float(c) for c in reversed(in_kernel)], coefficients, rtol=1e-6)


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
