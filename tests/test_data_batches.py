"""iterate_minibatches and minibatch_rows: coverage, alignment, reproducibility from a Generator,
argument errors."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from scratchnn.data import iterate_minibatches, minibatch_rows


def dataset(n: int = 23) -> tuple[np.ndarray, np.ndarray]:
    x = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    return x, np.arange(n)


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_each_sample_once_with_labels_aligned(shuffle: bool, drop_last: bool) -> None:
    x, t = dataset(23)
    batches = list(
        iterate_minibatches(
            x, t, 5, shuffle=shuffle, rng=np.random.default_rng(0), drop_last=drop_last
        )
    )
    assert [len(tb) for _, tb in batches] == ([5] * 4 if drop_last else [5, 5, 5, 5, 3])
    for xb, tb in batches:
        np.testing.assert_array_equal(xb, x[tb])  # each x row still has its own label
    seen = np.concatenate([tb for _, tb in batches])
    assert len(set(seen.tolist())) == len(seen)
    if not shuffle:
        assert seen.tolist() == list(range(len(seen)))
    else:
        assert seen.tolist() != sorted(seen.tolist())


def test_unshuffled_batches_are_views() -> None:
    x, t = dataset()
    xb, tb = next(iterate_minibatches(x, t, 4, shuffle=False))
    assert np.shares_memory(xb, x) and np.shares_memory(tb, t)


def test_same_seed_same_batches_bit_for_bit() -> None:
    x = np.random.default_rng(7).standard_normal((50, 4))
    t = np.arange(50)

    def run(seed: int) -> list[bytes]:
        rng = np.random.default_rng(seed)
        return [xb.tobytes() + tb.tobytes() for xb, tb in iterate_minibatches(x, t, 8, rng=rng)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_consecutive_epochs_from_one_generator_differ() -> None:
    x, t = dataset(40)
    rng = np.random.default_rng(0)
    first = [tb.tolist() for _, tb in iterate_minibatches(x, t, 10, rng=rng)]
    second = [tb.tolist() for _, tb in iterate_minibatches(x, t, 10, rng=rng)]
    assert first != second


def test_global_random_state_is_neither_used_nor_changed() -> None:
    x, t = dataset()
    # The legacy global functions are the very thing this test watches.
    np.random.seed(1234)  # noqa: NPY002
    expected = np.random.random(3)  # noqa: NPY002
    np.random.seed(1234)  # noqa: NPY002
    list(iterate_minibatches(x, t, 4, rng=np.random.default_rng(0)))
    list(iterate_minibatches(x, t, 4))
    np.testing.assert_array_equal(np.random.random(3), expected)  # noqa: NPY002


def test_edge_sizes() -> None:
    x, t = dataset(5)
    assert [len(tb) for _, tb in iterate_minibatches(x, t, 10)] == [5]
    assert list(iterate_minibatches(x, t, 10, drop_last=True)) == []
    assert list(iterate_minibatches(x[:0], t[:0], 3)) == []
    assert [len(tb) for _, tb in iterate_minibatches(x, t, np.int64(5))] == [5]


def test_lists_are_accepted() -> None:
    batches = list(iterate_minibatches([[1, 2], [3, 4], [5, 6]], [0, 1, 2], 2, shuffle=False))
    assert [tb.tolist() for _, tb in batches] == [[0, 1], [2]]
    assert batches[0][0].tolist() == [[1, 2], [3, 4]]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"batch_size": 0}, ValueError, "at least 1, got 0"),
        ({"batch_size": -3}, ValueError, "at least 1"),
        ({"batch_size": 2.5}, TypeError, "integer, got float"),
        ({"batch_size": "4"}, TypeError, "integer, got str"),
        ({"batch_size": True}, TypeError, "got a bool"),
        ({"rng": np.random.RandomState(0)}, TypeError, "numpy.random.Generator"),
        ({"rng": 0}, TypeError, "got int"),
        ({"t": np.arange(22)}, ValueError, "x has 23 samples but t has 22"),
        ({"x": np.float32(1.0)}, ValueError, "at least one dimension"),
        ({"x": [[1.0, 2.0], [3.0]], "t": [0, 1]}, ValueError, "x is not a rectangular array"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("function", [iterate_minibatches, minibatch_rows])
def test_bad_arguments_raise_when_called(
    kwargs: dict[str, Any], error: type[Exception], message: str, function: Any
) -> None:
    x, t = dataset()
    arguments: dict[str, Any] = {"x": x, "t": t, "batch_size": 4, **kwargs}
    with pytest.raises(error, match=message):
        function(**arguments)  # no iteration: the check is eager


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_minibatch_rows_are_the_rows_of_the_batches_from_the_same_generator(
    shuffle: bool, drop_last: bool
) -> None:
    # fit gathers a batch's rows itself on a GPU: they must be iterate_minibatches' batches,
    # drawn from the same generator state, so that a seed gives the same training either way.
    x, t = dataset()
    batches = list(iterate_minibatches(x, t, 5, shuffle=shuffle, rng=np.random.default_rng(3),
                                       drop_last=drop_last))  # fmt: skip
    rows = list(minibatch_rows(x, t, 5, shuffle=shuffle, rng=np.random.default_rng(3),
                               drop_last=drop_last))  # fmt: skip
    assert len(rows) == len(batches) == (4 if drop_last else 5)
    for (xb, tb), batch_rows in zip(batches, rows):
        np.testing.assert_array_equal(x[batch_rows], xb)
        np.testing.assert_array_equal(t[batch_rows], tb)
    assert all(type(r) is (np.ndarray if shuffle else slice) for r in rows)
    if shuffle:  # a permutation's runs: each sample at most once (all of them, but for
        covered = np.concatenate(rows).tolist()  # the dropped last), not in order
        assert len(set(covered)) == len(covered) == (20 if drop_last else 23)
        assert set(covered) <= set(range(23)) and covered != sorted(covered)
    with pytest.raises(TypeError, match="minibatch_rows: shuffle"):
        minibatch_rows(x, t, 5, shuffle=1)  # type: ignore[arg-type]
