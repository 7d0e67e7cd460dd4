"""The pool of large output buffers: memory comes back only when no array uses it."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import scratchnn as snn
from scratchnn import _buffers

BIG = _buffers.MIN_BYTES // 4  # float32 elements of the pool's smallest array


def address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


@pytest.fixture(autouse=True)
def empty_pool():
    _buffers.clear()
    yield
    _buffers.clear()


def test_memory_of_a_dropped_output_is_reused():
    first = _buffers.empty((BIG,), np.float32)
    where = address(first)
    del first
    second = _buffers.empty((BIG,), np.float32)
    assert address(second) == where


@pytest.mark.parametrize(
    "keep",
    [
        lambda a: a,
        lambda a: a[5:9],
        lambda a: a.reshape(2, -1).T,
        lambda a: a.view(np.int32),
        lambda a: memoryview(a),
        lambda a: np.frombuffer(a, np.float32),
    ],
    ids=["array", "slice", "transposed view", "dtype view", "memoryview", "frombuffer"],
)
def test_memory_in_use_is_never_handed_out(keep):
    first = _buffers.empty((BIG,), np.float32)
    first[:] = 7.0
    kept = keep(first)
    before = np.asarray(kept).tobytes()
    where = address(first)
    del first
    second = _buffers.empty((BIG,), np.float32)
    second[:] = -1.0
    assert address(second) != where
    assert np.asarray(kept).tobytes() == before


def test_kept_layer_outputs_survive_later_calls():
    rng = np.random.default_rng(0)
    layers = [snn.Relu(), snn.Sigmoid(), snn.Tanh(), snn.LeakyRelu(), snn.Gelu(), snn.Silu()]
    for layer in layers:
        x1 = rng.standard_normal(BIG, dtype=np.float32)
        y1 = layer.forward(x1)
        head = y1[:100]  # a view keeps the whole output's memory
        expected_head = head.copy()
        dx1 = layer.backward(np.ones_like(x1))
        expected_dx1 = dx1.copy()
        del y1
        for _ in range(3):
            x2 = rng.standard_normal(BIG, dtype=np.float32)
            layer.forward(x2)
            layer.backward(rng.standard_normal(BIG, dtype=np.float32))
        np.testing.assert_array_equal(head, expected_head, err_msg=repr(layer))
        np.testing.assert_array_equal(dx1, expected_dx1, err_msg=repr(layer))


def test_the_kept_output_of_sigmoid_is_not_reused_under_backward():
    # Sigmoid keeps its output for backward; a second layer's outputs must not land there.
    rng = np.random.default_rng(1)
    x = rng.standard_normal(BIG, dtype=np.float32)
    first, second = snn.Sigmoid(), snn.Sigmoid()
    first.forward(x)  # its output is dropped by us, kept by the layer
    for _ in range(3):
        second.forward(rng.standard_normal(BIG, dtype=np.float32))
    dout = rng.standard_normal(BIG, dtype=np.float32)
    y = 1.0 / (1.0 + np.exp(-x.astype(np.float64)))
    np.testing.assert_allclose(first.backward(dout), dout * y * (1 - y), rtol=1e-5, atol=1e-7)


def test_threads_never_share_a_buffer():
    results: list[tuple[int, bool]] = []
    lock = threading.Lock()

    def work(seed: int) -> None:
        for round_ in range(20):
            a = _buffers.empty((BIG,), np.float32)
            a[:] = seed
            b = _buffers.empty((BIG,), np.float32)
            b[:] = -seed
            with lock:
                results.append((round_, bool(np.all(a == seed) and np.all(b == -seed))))

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(1, 5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 80 and all(ok for _, ok in results)


def test_pool_holds_at_most_its_budget_and_small_arrays_bypass_it():
    kept = [_buffers.empty((BIG,), np.float32) for _ in range(4)]
    small = _buffers.empty((10,), np.float32)
    assert small.base is None  # plain np.empty
    assert _buffers.held_bytes() == 4 * (_buffers.MIN_BYTES + _buffers.ALIGNMENT)
    sizes = _buffers.POOL_BYTES // _buffers.MIN_BYTES + 3
    more = [_buffers.empty((BIG,), np.float32) for _ in range(sizes)]
    assert _buffers.held_bytes() <= _buffers.POOL_BYTES
    assert len({address(a) for a in kept + more}) == len(kept) + len(more)
    held = _buffers.held_bytes()
    for elements in (_buffers.POOL_BYTES // 4 + 1, _buffers.POOL_BYTES // 4):
        # Beyond the pool (its own size included, with room to align): plain memory,
        # aligned all the same, and the pool is left as it was.
        too_big = _buffers.empty((elements,), np.float32)
        assert all(too_big.base is not buffer for buffer in _buffers._buffers)
        assert address(too_big) % 64 == 0 and _buffers.held_bytes() == held
        del too_big


def test_shapes_and_dtypes_are_as_asked():
    a = _buffers.empty((2, BIG // 2), np.float64)
    assert a.shape == (2, BIG // 2) and a.dtype == np.float64 and a.flags.c_contiguous
    assert a.flags.writeable


def test_empty_like_and_copy_take_the_pool_only_for_large_arrays():
    small = np.arange(12.0).reshape(3, 4)
    assert _buffers.empty_like(small).base is None  # plain np.empty below MIN_BYTES
    assert _buffers.empty_like(small, bool).dtype == np.bool_
    large = np.ones((2, BIG), np.float32)
    held = _buffers.held_bytes()
    like = _buffers.empty_like(large)
    assert like.shape == large.shape and like.dtype == np.float32 and like.flags.c_contiguous
    assert _buffers.held_bytes() > held  # a view of a pool buffer
    # Copies are C-ordered and equal, from any layout, small or large.
    for source in (small.T, large[:, ::2], np.asfortranarray(large)):
        copied = _buffers.copy(source)
        assert copied.flags.c_contiguous and not np.shares_memory(copied, source)
        np.testing.assert_array_equal(copied, source)


def test_pooled_arrays_start_at_a_cache_line():
    # Non-temporal stores (the streaming Relu) need 64-byte aligned outputs.
    first = _buffers.empty((BIG,), np.float32)
    address_of_first = address(first)
    del first
    again = _buffers.empty((BIG,), np.float32)  # the same memory, handed out again
    other = _buffers.empty((BIG // 2,), np.float64)
    assert address(again) == address_of_first
    assert address(again) % 64 == 0 and address(other) % 64 == 0
