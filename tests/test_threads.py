"""The blocked, two-thread path gives the plain path's results and honours the caller's errstate."""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable

import numpy as np
import pytest

import scratchnn as snn
from scratchnn import _fused, _threads


def _same(want: tuple[np.ndarray, ...], got: tuple[np.ndarray, ...]) -> None:
    for expected, actual in zip(want, got):
        np.testing.assert_array_equal(actual, expected)


def _until_the_worker_helps(check: Callable[[], None], patience: float = 30.0) -> None:
    """Run ``check`` (two-thread results against one-thread ones) until the C worker has
    taken a block: it may sleep through calls while other processes hold the cores,
    so the test retries for up to ``patience`` seconds, never fewer than twenty times."""
    assert _fused._MODULE is not None
    before = _fused._MODULE.worker_blocks()
    deadline = time.monotonic() + patience
    tries = 0
    while True:
        check()
        tries += 1
        if _fused._MODULE.worker_blocks() > before:
            return
        if tries >= 20 and time.monotonic() > deadline:
            break
    assert _fused._MODULE.worker_blocks() > before, f"the worker took no block in {tries} calls"


@pytest.fixture
def tiny_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 64 bytes (16 elements in C) and threads from the first element, so small
    arrays take every path."""
    monkeypatch.setattr(_threads, "BLOCK_BYTES", 64)
    monkeypatch.setattr(_threads, "BLOCKS_FROM", 0)
    monkeypatch.setattr(_threads, "THREADS_FROM", 0)
    monkeypatch.setattr(_threads, "THREADS", 2)
    monkeypatch.setattr(_fused, "BLOCK", 16)
    monkeypatch.setattr(_fused, "THREADS_FROM", 0)
    monkeypatch.setattr(_fused, "THREADS", 2)


LAYERS = {
    "Relu": snn.Relu,
    "Relu(packed)": lambda: snn.Relu(packed=True),
    "Sigmoid": snn.Sigmoid,
    "Tanh": snn.Tanh,
    "LeakyRelu": snn.LeakyRelu,
    "Elu": snn.Elu,
    "Elu(2)": lambda: snn.Elu(2.0),
    "Gelu": snn.Gelu,
    "Gelu(tanh)": lambda: snn.Gelu("tanh"),
    "Softplus": snn.Softplus,
    "Silu": snn.Silu,
}


def forward_backward(make: object, x: np.ndarray, dout: np.ndarray) -> tuple[np.ndarray, ...]:
    layer = make()  # type: ignore[operator]
    return layer.forward(x), layer.backward(dout), getattr(layer, "mask", None)


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_blocks_and_threads_give_the_plain_results(
    name: str, dtype: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    x = (5 * rng.standard_normal((7, 101))).astype(dtype)  # 707 elements: a partial last block
    x[0, :4] = [0.0, -0.0, 40.0, -40.0]
    dout = rng.standard_normal(x.shape).astype(dtype)
    plain = forward_backward(LAYERS[name], x, dout)
    monkeypatch.setattr(_threads, "BLOCK_BYTES", 64)
    monkeypatch.setattr(_threads, "BLOCKS_FROM", 0)
    monkeypatch.setattr(_threads, "THREADS_FROM", 0)
    monkeypatch.setattr(_threads, "THREADS", 2)
    monkeypatch.setattr(_fused, "BLOCK", 16)
    monkeypatch.setattr(_fused, "THREADS_FROM", 0)
    monkeypatch.setattr(_fused, "THREADS", 2)
    blocked = forward_backward(LAYERS[name], x, dout)
    for want, got in zip(plain, blocked):
        np.testing.assert_array_equal(got, want)


def test_the_worker_takes_blocks(tiny_blocks: None) -> None:
    seen: set[str] = set()
    done = np.zeros(10_000, bool)
    worker_started = threading.Event()

    def kernel(start: int, stop: int) -> None:
        seen.add(threading.current_thread().name)
        if threading.current_thread() is threading.main_thread():
            worker_started.wait(timeout=10)  # leave the worker a block to take
        else:
            worker_started.set()
        done[start:stop] = True

    _threads.run_blocked(kernel, done)
    assert done.all() and len(seen) == 2


def test_errstate_raise_reaches_the_worker(tiny_blocks: None) -> None:
    x = np.full(2_000, 1000.0)

    def kernel(start: int, stop: int) -> None:
        np.exp(x[start:stop])

    with np.errstate(over="raise"), pytest.raises(FloatingPointError):
        _threads.run_blocked(kernel, x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(over="ignore"):
            _threads.run_blocked(kernel, x)  # the caller's "ignore" holds in the worker too


@pytest.mark.parametrize("name", ["Softplus", "Sigmoid", "Gelu", "Gelu(tanh)", "Elu", "Silu"])
def test_no_warnings_at_range_ends_on_threads(name: str, tiny_blocks: None) -> None:
    info = np.finfo(np.float64)
    x = np.tile([info.max, -info.max, 745.0, -745.0, 0.0, info.smallest_subnormal], 200)
    with warnings.catch_warnings(), np.errstate(over="raise", divide="raise", invalid="raise"):
        warnings.simplefilter("error")
        layer = LAYERS[name]()
        out = layer.forward(x)
        dx = layer.backward(np.ones_like(x))
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(dx))


@pytest.mark.skipif(not _fused.available(), reason="compiled kernels not built (no C compiler?)")
@pytest.mark.parametrize("name", list(LAYERS))
def test_compiled_kernels_on_two_threads_match_one(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Blocks of 16 elements shared by the caller and the C worker: the one-call results, bit
    for bit, and the worker really ran some of them."""
    rng = np.random.default_rng(1)
    x = (5 * rng.standard_normal(300_007)).astype(np.float32)  # a partial last block
    x[:4] = [0.0, -0.0, 40.0, -40.0]
    dout = rng.standard_normal(x.shape).astype(np.float32)
    monkeypatch.setattr(_fused, "ENABLED", True)
    monkeypatch.setattr(_fused, "THREADS", 1)
    one = forward_backward(LAYERS[name], x, dout)
    monkeypatch.setattr(_fused, "THREADS", 2)
    monkeypatch.setattr(_fused, "THREADS_FROM", 0)
    monkeypatch.setattr(_fused, "BLOCK", 16)
    assert _fused._MODULE is not None
    _until_the_worker_helps(lambda: _same(one, forward_backward(LAYERS[name], x, dout)))


@pytest.mark.skipif(not _fused.available(), reason="compiled kernels not built (no C compiler?)")
def test_streaming_relu_on_two_threads_matches_the_plain_kernel_on_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(2)
    x = (5 * rng.standard_normal(300_007)).astype(np.float32)
    dout = rng.standard_normal(x.shape).astype(np.float32)
    monkeypatch.setattr(_fused, "ENABLED", True)
    monkeypatch.setattr(_fused, "THREADS", 1)
    one = forward_backward(snn.Relu, x, dout)
    monkeypatch.setattr(_fused, "STREAM_FROM", 0)  # non-temporal stores, blocks of 16
    monkeypatch.setattr(_fused, "THREADS", 2)
    monkeypatch.setattr(_fused, "THREADS_FROM", 0)
    monkeypatch.setattr(_fused, "BLOCK", 16)
    _until_the_worker_helps(lambda: _same(one, forward_backward(snn.Relu, x, dout)))


def _sigmoid_in_child(queue: object) -> None:
    x = np.linspace(-5, 5, 200_000, dtype=np.float32)
    queue.put(float(snn.Sigmoid().forward(x).sum()))  # type: ignore[attr-defined]


@pytest.mark.skipif(not _fused.available(), reason="compiled kernels not built (no C compiler?)")
def test_a_forked_child_starts_its_own_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    import multiprocessing

    monkeypatch.setattr(_fused, "ENABLED", True)
    monkeypatch.setattr(_fused, "THREADS", 2)
    monkeypatch.setattr(_fused, "THREADS_FROM", 0)
    x = np.linspace(-5, 5, 200_000, dtype=np.float32)
    expected = float(snn.Sigmoid().forward(x).sum())  # the parent's worker is running now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_sigmoid_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        pytest.fail("the forked child hung in a two-thread kernel call")
    assert child.exitcode == 0 and queue.get(timeout=5) == expected


@pytest.mark.skipif(not _fused.available(), reason="compiled kernels not built (no C compiler?)")
def test_python_threads_calling_the_kernels_at_once_get_their_own_results(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One caller at a time shares the C worker; the others run on their own thread. Each
    thread's results are those of a lone call."""
    monkeypatch.setattr(_fused, "ENABLED", True)
    monkeypatch.setattr(_fused, "THREADS", 2)
    monkeypatch.setattr(_fused, "THREADS_FROM", 0)
    monkeypatch.setattr(_fused, "BLOCK", 64)
    rng = np.random.default_rng(2)
    inputs = [rng.standard_normal(50_000).astype(np.float32) for _ in range(4)]
    expected = [forward_backward(snn.Sigmoid, x, x) for x in inputs]
    failures: list[str] = []

    def work(index: int) -> None:
        for _ in range(30):
            got = forward_backward(snn.Sigmoid, inputs[index], inputs[index])
            if not all(np.array_equal(a, b) for a, b in zip(got[:2], expected[index][:2])):
                failures.append(f"thread {index}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


@pytest.mark.skipif(not _fused.available(), reason="compiled kernels not built (no C compiler?)")
@pytest.mark.parametrize("make", [lambda: snn.MaxPool2d(2), lambda: snn.MaxPool2d(3, (3, 4))])
def test_max_pooling_on_two_threads_matches_one(
    make: Callable[[], snn.Layer], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pooling's blocks (one per image plane) shared by the caller and the C worker give the
    one-thread results bit for bit, and the worker really ran some of them."""
    rng = np.random.default_rng(4)
    x = rng.integers(-5, 6, (16, 8, 28, 28)).astype(np.float32)  # ties everywhere
    monkeypatch.setattr(_fused, "ENABLED", True)
    monkeypatch.setattr(_fused, "THREADS", 1)
    pool = make()
    dout = rng.standard_normal(pool.forward(x).shape).astype(np.float32)
    one = forward_backward(make, x, dout)
    monkeypatch.setattr(_fused, "THREADS", 2)
    monkeypatch.setattr(_fused, "THREADS_FROM", 0)
    assert _fused._MODULE is not None
    _until_the_worker_helps(lambda: _same(one, forward_backward(make, x, dout)))


@pytest.mark.skipif(not _fused.available(), reason="compiled kernels not built (no C compiler?)")
def test_batchnorm_on_two_threads_matches_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """BatchNorm's per-image blocks on the caller and the C worker: its sums are combined over
    the images in one order, so the one-thread results come out bit for bit."""
    rng = np.random.default_rng(5)
    x = (2 * rng.standard_normal((32, 6, 9, 9)) + 1).astype(np.float32)
    dout = rng.standard_normal(x.shape).astype(np.float32)
    monkeypatch.setattr(_fused, "ENABLED", True)

    def run() -> tuple[np.ndarray, ...]:
        layer = snn.BatchNorm(6)
        out, dx = layer.forward(x), layer.backward(dout)
        assert layer.dgamma is not None and layer.dbeta is not None
        return out, dx, layer.dgamma, layer.dbeta, layer.running_mean, layer.running_var

    monkeypatch.setattr(_fused, "THREADS", 1)
    one = run()
    monkeypatch.setattr(_fused, "THREADS", 2)
    monkeypatch.setattr(_fused, "THREADS_FROM", 0)
    assert _fused._MODULE is not None
    _until_the_worker_helps(lambda: _same(one, run()))


def test_a_fork_while_another_thread_holds_the_buffer_pool_lock_does_not_hang_the_child() -> None:
    import os

    from scratchnn import _buffers

    if not hasattr(os, "fork"):
        pytest.skip("no os.fork on this platform")
    held = threading.Event()

    def hold_the_lock() -> None:
        with _buffers._lock:  # as a layer's large output does, for a moment
            held.set()
            time.sleep(0.3)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    held.wait(5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork beside a thread: ours ends
        pid = os.fork()
    if pid == 0:  # the child: one output from the pool, then out
        try:
            _buffers.empty((1 << 18,), np.float32)
        finally:
            os._exit(0)
    holder.join()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the child waited forever on the pool's lock, held by a thread it lacks")


def test_the_python_worker_is_a_daemon_so_a_ctrl_c_can_never_keep_the_process_alive(
    tiny_blocks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A ThreadPoolExecutor's thread is joined at exit; one whose start a KeyboardInterrupt
    # cut short was never told to stop, and the process never ended.
    monkeypatch.setattr(_fused, "ENABLED", False)  # the NumPy path's worker
    x = np.linspace(-5, 5, 1000)
    np.testing.assert_array_equal(snn.Sigmoid().forward(x), snn.Sigmoid().forward(x.copy()))
    workers = [t for t in threading.enumerate() if t.name == "scratchnn"]
    assert workers and all(t.daemon for t in workers)


@pytest.mark.parametrize(
    ("value", "enabled", "warns"),
    [("0", False, False), ("off", False, False), (" False ", False, False), ("no", False, False),
     ("1", True, False), ("", True, False), ("on", True, False), ("maybe", True, True)],
)  # fmt: skip
def test_scratchnn_kernels_reads_the_usual_spellings(
    value: str, enabled: bool, warns: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCRATCHNN_KERNELS", value)
    if warns:
        with pytest.warns(RuntimeWarning, match="SCRATCHNN_KERNELS='maybe' is neither"):
            assert _fused._kernels_wanted() is enabled
    else:
        assert _fused._kernels_wanted() is enabled


def test_threads_follow_the_cpus_this_process_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    assert _fused.THREADS == _threads.THREADS == min(2, len(os.sched_getaffinity(0)))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # taskset -c 0
    assert _fused._usable_cpus() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
    assert _fused._usable_cpus() == 3



def test_a_fork_from_a_signal_handler_inside_the_pool_does_not_hang() -> None:
    # The fork handler takes the pool's lock; a signal handler that forks while its own
    # thread is inside the pool must still get it (a plain Lock deadlocked, 3 runs of 3).
    import subprocess
    import sys

    script = """
import os, signal, time
import numpy as np
from scratchnn import _buffers
forks = 0
def handler(signum, frame):
    global forks
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    forks += 1
signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.002, 0.002)
start = time.time()
while time.time() - start < 2 and forks < 100:
    _buffers.empty((1 << 18,), np.float32)
signal.setitimer(signal.ITIMER_REAL, 0, 0)
print("forks", forks)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("forks ")
