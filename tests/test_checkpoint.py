"""The safetensors reader and writer, and the training checkpoints built on them.

Round trips of every dtype and shape; both directions against the reference
``safetensors`` package, byte for byte; every kind of corrupt or hostile file
raises ``CheckpointError`` and allocates nothing it should not; a writer killed
by SIGKILL at random moments always leaves a complete file; the random
generator resumes exactly.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save, save_file

from scratchnn.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    load_model,
    load_safetensors,
    save_checkpoint,
    save_model,
    save_safetensors,
)

DTYPES = [
    np.bool_, np.uint8, np.int8, np.int16, np.uint16, np.float16, np.int32, np.uint32,
    np.float32, np.complex64, np.float64, np.int64, np.uint64,
]  # fmt: skip
SHAPES = [(), (0,), (5,), (2, 3), (0, 4), (3, 0, 2), (1, 2, 1, 3)]
BIT_GENERATORS = [np.random.PCG64, np.random.PCG64DXSM, np.random.MT19937, np.random.Philox,
                  np.random.SFC64]  # fmt: skip


def sample(dtype: Any, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Random values of ``dtype`` that use its whole range (sign, high bits, fractions)."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    if dtype is np.bool_:
        return np.asarray(rng.random(size).reshape(shape) < 0.5)
    if np.dtype(dtype).kind == "c":
        return (
            (rng.standard_normal(size) + 1j * rng.standard_normal(size))
            .astype(dtype)
            .reshape(shape)
        )
    if np.dtype(dtype).kind == "f":
        return (rng.standard_normal(size) * 1e3).astype(dtype).reshape(shape)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size, dtype=dtype, endpoint=True).reshape(shape)


def every_tensor() -> dict[str, np.ndarray]:
    """One tensor of every dtype in every shape."""
    return {
        f"{np.dtype(dtype).name}/{'x'.join(map(str, shape)) or 'scalar'}": sample(dtype, shape, i)
        for i, (dtype, shape) in enumerate((d, s) for d in DTYPES for s in SHAPES)
    }


def assert_same(loaded: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    assert loaded.keys() == expected.keys()
    for name, array in expected.items():
        assert loaded[name].dtype == array.dtype.newbyteorder("="), name
        assert loaded[name].shape == array.shape, name
        np.testing.assert_array_equal(loaded[name], array, err_msg=name)


def write_raw(path: Path, header: Any, data: bytes = b"", *, length: int | None = None) -> Path:
    """A file with this header (JSON-encoded unless bytes) and data, and its length field."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes((len(text) if length is None else length).to_bytes(8, "little") + text + data)
    return path


# -- round trips ------------------------------------------------------------------------


def test_round_trip_every_dtype_and_shape(tmp_path: Path) -> None:
    tensors = every_tensor()
    path = tmp_path / "all.safetensors"
    save_safetensors(path, tensors, {"note": "every dtype", "ünïcode": "✓"})
    loaded, metadata = load_safetensors(path)
    assert_same(loaded, tensors)
    assert metadata == {"note": "every dtype", "ünïcode": "✓"}
    for array in loaded.values():
        assert array.flags.writeable and array.flags.c_contiguous and array.dtype.isnative
    assert list(os.listdir(tmp_path)) == ["all.safetensors"]


def test_round_trip_keeps_values_of_any_layout_and_byte_order(tmp_path: Path) -> None:
    base = sample(np.float64, (4, 6))
    tensors = {
        "big_endian": base.astype(">f8"),
        "fortran": np.asfortranarray(base),
        "strided": base[::2, ::3],
        "transposed": base.T,
        "big_endian_int": np.arange(5, dtype=">i4"),
    }
    path = tmp_path / "layouts.safetensors"
    save_safetensors(path, tensors)
    loaded, metadata = load_safetensors(path)
    assert_same(loaded, tensors)
    assert metadata == {}


def test_empty_file_and_empty_metadata(tmp_path: Path) -> None:
    save_safetensors(tmp_path / "empty.safetensors", {})
    assert load_safetensors(tmp_path / "empty.safetensors") == ({}, {})
    save_safetensors(tmp_path / "meta.safetensors", {}, {})
    assert load_safetensors(tmp_path / "meta.safetensors") == ({}, {})


def test_loaded_arrays_are_independent_copies(tmp_path: Path) -> None:
    save_safetensors(tmp_path / "a.safetensors", {"x": np.zeros(3), "y": np.zeros(3)})
    loaded, _ = load_safetensors(tmp_path / "a.safetensors")
    loaded["x"][:] = 1
    np.testing.assert_array_equal(loaded["y"], np.zeros(3))
    np.testing.assert_array_equal(load_safetensors(tmp_path / "a.safetensors")[0]["x"], 0)


def test_a_bool_array_holding_other_bytes_is_stored_as_true(tmp_path: Path) -> None:
    weird = np.array([0, 1, 2, 255], dtype=np.uint8).view(np.bool_)
    save_safetensors(tmp_path / "b.safetensors", {"mask": weird})
    loaded, _ = load_safetensors(tmp_path / "b.safetensors")
    assert loaded["mask"].view(np.uint8).tolist() == [0, 1, 1, 1]


# -- against the reference implementation -----------------------------------------------


def test_reference_reads_our_files(tmp_path: Path) -> None:
    tensors = every_tensor()
    metadata = {"epoch": "3", "name": "ünïcode"}
    path = tmp_path / "ours.safetensors"
    save_safetensors(path, tensors, metadata)
    assert_same(load_file(path), tensors)
    with safe_open(path, framework="numpy") as file:
        assert file.metadata() == metadata


def test_we_read_reference_files(tmp_path: Path) -> None:
    tensors = every_tensor()
    metadata = {"format": "np", "b": "2", "a": "1"}
    path = tmp_path / "theirs.safetensors"
    save_file(tensors, path, metadata=metadata)
    loaded, loaded_metadata = load_safetensors(path)
    assert_same(loaded, tensors)
    assert loaded_metadata == metadata


@pytest.mark.parametrize("metadata", [None, {}, {"only": "one key"}])
def test_our_bytes_are_the_reference_bytes(tmp_path: Path, metadata: dict[str, str] | None) -> None:
    # With two or more metadata keys the reference writes them in hash order,
    # so only these cases can be compared byte for byte.
    tensors = every_tensor()
    save_safetensors(tmp_path / "ours.safetensors", tensors, metadata)
    assert (tmp_path / "ours.safetensors").read_bytes() == save(tensors, metadata)


# -- what the writer refuses ------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensors", "metadata", "error", "match"),
    [
        ({1: np.zeros(1)}, None, TypeError, "tensor name must be a str"),
        ({"__metadata__": np.zeros(1)}, None, ValueError, "reserved"),
        ({"bad\ud800": np.zeros(1)}, None, ValueError, "UTF-8"),
        ({"w": [1.0, 2.0]}, None, TypeError, "'w' is a list, not a NumPy array"),
        ({"w": np.zeros(1, np.complex128)}, None, TypeError, "'w' has dtype complex128"),
        ({"w": np.zeros(1, np.longdouble)}, None, TypeError, "'w' has dtype"),
        ({"w": np.array(["a"])}, None, TypeError, "'w' has dtype <U1"),
        ({"w": np.array([None])}, None, TypeError, "'w' has dtype object"),
        ({"w": np.zeros(1, "datetime64[s]")}, None, TypeError, "'w' has dtype datetime64"),
        ([("w", np.zeros(1))], None, TypeError, "tensors must be a dict"),
        ({"w": np.zeros(1)}, {"k": 1}, TypeError, "metadata value of 'k' must be a str"),
        ({"w": np.zeros(1)}, {2: "v"}, TypeError, "metadata key must be a str"),
        ({"w": np.zeros(1)}, ["k"], TypeError, "metadata must be a dict"),
    ],
)
def test_save_refuses_bad_arguments_and_writes_nothing(
    tmp_path: Path, tensors: Any, metadata: Any, error: type[Exception], match: str
) -> None:
    path = tmp_path / "refused.safetensors"
    with pytest.raises(error, match=match):
        save_safetensors(path, tensors, metadata)
    assert os.listdir(tmp_path) == []


# -- corrupt and hostile files ----------------------------------------------------------


def test_truncation_at_every_offset_raises(tmp_path: Path) -> None:
    path = tmp_path / "whole.safetensors"
    tensors = {"a": np.arange(6, dtype=np.float32), "b": np.ones(3, np.int16)}
    save_safetensors(path, tensors, {"k": "v"})
    whole = path.read_bytes()
    header_end = 8 + int.from_bytes(whole[:8], "little")
    cut_path = tmp_path / "cut.safetensors"
    assert 8 < header_end < len(whole)
    for cut in range(len(whole)):  # inside the length field, the header and the data
        cut_path.write_bytes(whole[:cut])
        with pytest.raises(CheckpointError, match=re.escape(str(cut_path))):
            load_safetensors(cut_path)


F32_HEADER = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


def entry(dtype: Any = "F32", shape: Any = (2,), offsets: Any = (0, 8), **extra: Any) -> Any:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets), **extra}


CORRUPT: dict[str, tuple[Any, bytes, int | None, str]] = {
    # name: (header, data, length field or None for the true one, message)
    "length huge": (F32_HEADER, bytes(8), 2**63, "header length"),
    "length past the end": (F32_HEADER, bytes(8), 10_000, "header length"),
    "header not UTF-8": (b'{"\xff": 1}', b"", None, "not valid UTF-8 JSON"),
    "header not JSON": (b"{'w': 1}", b"", None, "not valid UTF-8 JSON"),
    "header truncated JSON": (b'{"w": {"dtype": "F3', b"", None, "not valid UTF-8 JSON"),
    "header a list": ([], b"", None, "JSON list, not an object"),
    "header deeply nested": (b"[" * 100_000, b"", None, "not valid UTF-8 JSON"),
    # Python >= 3.10.7 refuses to parse it, older versions parse it; either way it fails.
    "header huge integer": (b'{"w": ' + b"9" * 5000 + b"}", b"", None, "corrupt"),
    "repeated key": (
        b'{"w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},'
        b' "w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}',
        b"",
        None,
        "repeated key",
    ),
    "NaN in header": (b'{"w": NaN}', b"", None, "NaN is not allowed"),
    # Not Unicode text: safetensors' reader refuses these, and no UTF-8 writer could write
    # the name back.
    "lone surrogate in a name": (
        b'{"\\ud800": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}',
        b"",
        None,
        "lone surrogate",
    ),
    "lone surrogate in metadata": (
        b'{"__metadata__": {"k": "\\udfff"}}',
        b"",
        None,
        "lone surrogate",
    ),
    # The message shows the start of a long value, not all of it.
    "lone surrogate in a long value": (
        b'{"__metadata__": {"k": "' + b"a" * 100_000 + b'\\udfff"}}',
        b"",
        None,
        "'" + "a" * 60 + "'... holds a lone surrogate",
    ),
    "entry not an object": ({"w": [1, 2]}, b"", None, "entry must be a JSON object"),
    "entry lacks shape": ({"w": {"dtype": "F32", "data_offsets": [0, 0]}}, b"", None, "exactly"),
    "entry has extra field": ({"w": entry(extra=1)}, bytes(8), None, "exactly"),
    "dtype unknown": ({"w": entry(dtype="F128")}, bytes(8), None, "unsupported dtype 'F128'"),
    "dtype BF16": ({"w": entry(dtype="BF16", shape=[4])}, bytes(8), None, "unsupported dtype"),
    "dtype not a string": ({"w": entry(dtype=4)}, bytes(8), None, "unsupported dtype 4"),
    "shape negative": ({"w": entry(shape=[-2])}, bytes(8), None, "shape must be"),
    "shape float": ({"w": entry(shape=[2.0])}, bytes(8), None, "shape must be"),
    "shape bool": ({"w": entry(shape=[True, 2])}, bytes(8), None, "shape must be"),
    "shape string": ({"w": {**entry(), "shape": "2"}}, bytes(8), None, "shape must be"),
    "shape too many dims": ({"w": entry(shape=[1] * 65, offsets=[0, 4])}, bytes(4), None, "65"),
    "offsets out of range": ({"w": entry(offsets=[0, 16])}, bytes(8), None, "outside"),
    "offsets reversed": ({"w": entry(offsets=[8, 0])}, bytes(8), None, "outside"),
    "offsets negative": ({"w": entry(offsets=[-8, 0])}, bytes(8), None, "two non-negative"),
    "offsets three": ({"w": entry(offsets=[0, 4, 8])}, bytes(8), None, "two non-negative"),
    "offsets mismatch size": ({"w": entry(shape=[3])}, bytes(8), None, "needs 12 bytes"),
    "offsets overlap": (
        {"a": entry(offsets=[0, 8]), "b": entry(offsets=[4, 12])},
        bytes(12),
        None,
        "overlaps",
    ),
    "offsets gap": (
        {"a": entry(offsets=[0, 8]), "b": entry(offsets=[12, 20])},
        bytes(20),
        None,
        "gap",
    ),
    "offsets not from zero": ({"w": entry(offsets=[4, 12])}, bytes(12), None, "gap"),
    "trailing garbage": (F32_HEADER, bytes(8) + b"junk", None, "cover 8 bytes"),
    "metadata not an object": ({"__metadata__": ["a"]}, b"", None, "map strings to strings"),
    "metadata value not str": ({"__metadata__": {"a": 1}}, b"", None, "map strings to strings"),
    "bool byte not 0 or 1": ({"m": entry("BOOL", [2], [0, 2])}, b"\x01\x02", None, "0 and 1"),
}


@pytest.mark.parametrize("case", CORRUPT, ids=str)
def test_corrupt_file_raises_checkpoint_error(tmp_path: Path, case: str) -> None:
    header, data, length, message = CORRUPT[case]
    path = write_raw(tmp_path / "corrupt.safetensors", header, data, length=length)
    with pytest.raises(CheckpointError, match=re.escape(message)) as caught:
        load_safetensors(path)
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("size", [0, 1, 7])
def test_file_shorter_than_the_length_field_raises(tmp_path: Path, size: int) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x00" * size)
    with pytest.raises(CheckpointError, match="too short"):
        load_safetensors(path)


@pytest.mark.parametrize(
    ("shape", "offsets", "message"),
    [
        ([2**60], [0, 4], "needs"),
        ([2**60], [0, 2**62], "outside"),
        ([2**30, 2**30, 2**30], [0, 4], "too large"),
        ([2**62, 2**62, 0], [0, 0], "too large"),  # empty, but NumPy cannot index it
        ([10**4000], [0, 4], "too large"),  # 4001 digits: Python still parses it
    ],
)
def test_hostile_shape_raises_without_allocating(
    tmp_path: Path, shape: list[int], offsets: list[int], message: str
) -> None:
    header = {"w": entry("F32", shape, offsets)}
    path = write_raw(tmp_path / "hostile.safetensors", header, bytes(4))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=message):
            load_safetensors(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # bytes: the header's own size, nothing like the claimed tensor


def test_every_header_byte_flip_loads_or_raises_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "good.safetensors"
    save_safetensors(path, {"a": np.arange(3.0), "m": np.array([True, False])}, {"k": "v"})
    whole = path.read_bytes()
    header_end = 8 + int.from_bytes(whole[:8], "little")
    for position in range(header_end):
        for mask in (0x01, 0x20, 0xFF):
            flipped = bytearray(whole)
            flipped[position] ^= mask
            path.write_bytes(flipped)
            try:
                load_safetensors(path)
            except CheckpointError:
                pass


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_safetensors(tmp_path / "absent.safetensors")


# -- atomic saves -----------------------------------------------------------------------

WRITER = """
import sys
import numpy as np
from scratchnn.checkpoint import save_safetensors

path, start = sys.argv[1], int(sys.argv[2])
for i in range(start, start + 10_000):
    save_safetensors(
        path,
        {"a": np.full(3_000_000, i, np.float32), "b": np.full(1_500_000, i, np.int64),
         "c": np.full(7, i, np.int32)},
        {"i": str(i)},
    )
    print(i, flush=True)
"""


def check_complete(path: Path, written: range) -> int:
    """Load ``path``; every tensor must hold the same iteration number, one in ``written``."""
    tensors, metadata = load_safetensors(path)
    i = int(metadata["i"])
    assert i in written
    assert tensors["a"].shape == (3_000_000,) and tensors["b"].shape == (1_500_000,)
    for array in tensors.values():
        assert (array == i).all()
    return i


def temporaries(directory: Path) -> list[str]:
    return sorted(name for name in os.listdir(directory) if ".tmp" in name)


@pytest.mark.skipif(os.name != "posix", reason="SIGKILL and the dead-writer cleanup are POSIX")
def test_writer_killed_at_random_moments_leaves_a_complete_file(tmp_path: Path) -> None:
    path = tmp_path / "run.safetensors"
    pattern = re.compile(r"\.run\.(\d+)\.[0-9a-f]{8}\.tmp\.safetensors")
    chooser = random.Random(1234)
    start = 0
    for _ in range(5):
        writer = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(start)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert writer.stdout is not None
        try:
            # Let it finish a few saves, reading the file between them as a
            # concurrent reader would; then kill it somewhere inside a save.
            for _ in range(chooser.randint(1, 3)):
                last = int(writer.stdout.readline())
                check_complete(path, range(last, start + 10_000))  # the writer goes on meanwhile
            # A save of these 24 MB takes about a tenth of a second; the sleep
            # only spreads the kills over it, nothing is asserted about time.
            time.sleep(chooser.uniform(0.0, 0.15))
            writer.send_signal(signal.SIGKILL)
        finally:
            writer.kill()
            writer.wait()
            writer.stdout.close()
        assert writer.returncode == -signal.SIGKILL
        check_complete(path, range(last, start + 10_000))  # never older than a finished save
        leftovers = temporaries(tmp_path)
        assert len(leftovers) <= 1  # at most the save that was cut short
        assert all(pattern.fullmatch(name) for name in leftovers)
        start = last + 10_000

    # The next save removes the temporary file a dead writer left.
    save_safetensors(path, {"a": np.zeros(1)})
    assert os.listdir(tmp_path) == ["run.safetensors"]


@pytest.mark.skipif(os.name != "posix", reason="the dead-writer cleanup is POSIX only")
def test_save_removes_temporaries_of_dead_writers_only(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # reaped, so its pid names no process (until the system reuses it)
    names = {
        "dead": f".model.{dead.pid}.0123abcd.tmp.safetensors",
        "alive": f".model.{os.getpid()}.89abcdef.tmp.safetensors",  # perhaps another thread's
        "other file": f".other.{dead.pid}.0123abcd.tmp.safetensors",
        "other suffix": f".model.{dead.pid}.0123abcd.tmp.json",
        "not ours": "model.safetensors.tmp",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"partial")
    save_safetensors(tmp_path / "model.safetensors", {"w": np.ones(2)})
    assert sorted(os.listdir(tmp_path)) == sorted(
        [
            "model.safetensors",
            *(names[k] for k in ("alive", "other file", "other suffix", "not ours")),
        ]
    )


def test_failed_save_keeps_the_old_file_and_removes_its_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keep.safetensors"
    save_safetensors(path, {"w": np.arange(4.0)})
    before = path.read_bytes()

    def failing_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors(path, {"w": np.zeros(1000)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["keep.safetensors"]


# -- training checkpoints ---------------------------------------------------------------


def make_run(bit_generator: Any = np.random.PCG64) -> dict[str, Any]:
    rng = np.random.Generator(bit_generator(2024))
    rng.standard_normal(7)  # mid-stream, and PCG64's cached half-word is in use
    rng.integers(0, 10, dtype=np.uint32)
    return {
        "params": {"W1": sample(np.float32, (3, 4)), "b1": np.zeros(4, np.float32)},
        "optimizer_state": {"m/W1": np.ones((3, 4)), "step": np.array(17, np.int64)},
        "rng": rng,
        "epoch": 12,
        "config": {"lr": 0.1, "layers": [784, 100, 10], "name": "mlp", "nested": {"a": None}},
    }


@pytest.mark.parametrize("bit_generator", BIT_GENERATORS, ids=lambda c: c.__name__)
def test_checkpoint_round_trip_and_rng_resumes(tmp_path: Path, bit_generator: Any) -> None:
    run = make_run(bit_generator)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, **run, metadata={"git": "abc123"})
    checkpoint = load_checkpoint(path)
    assert isinstance(checkpoint, Checkpoint)
    assert_same(checkpoint.params, run["params"])
    assert_same(checkpoint.optimizer_state, run["optimizer_state"])
    assert checkpoint.epoch == 12
    assert checkpoint.config == run["config"]
    assert checkpoint.metadata == {"git": "abc123"}
    restored, again = checkpoint.rng(), checkpoint.rng()
    expected = run["rng"].standard_normal(1000)
    np.testing.assert_array_equal(restored.standard_normal(1000), expected)
    np.testing.assert_array_equal(again.standard_normal(1000), expected)  # each call starts afresh
    assert restored.integers(0, 2**63) == run["rng"].integers(0, 2**63)


def test_checkpoint_file_is_plain_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, **make_run())
    assert set(load_file(path)) == {"param/W1", "param/b1", "optim/m/W1", "optim/step"}
    with safe_open(path, framework="numpy") as file:
        metadata = file.metadata()
    assert metadata["scratchnn.format_version"] == "1"
    assert json.loads(metadata["scratchnn.rng_state"])["bit_generator"] == "PCG64"


def test_model_round_trip_and_model_from_checkpoint(tmp_path: Path) -> None:
    run = make_run()
    save_model(tmp_path / "model.safetensors", run["params"], run["config"])
    params, config = load_model(tmp_path / "model.safetensors")
    assert_same(params, run["params"])
    assert config == run["config"]
    save_checkpoint(tmp_path / "ckpt.safetensors", **run)
    params, config = load_model(tmp_path / "ckpt.safetensors")
    assert_same(params, run["params"])
    assert config == run["config"]
    with pytest.raises(CheckpointError, match="holds a 'model', expected 'checkpoint'"):
        load_checkpoint(tmp_path / "model.safetensors")


def good_metadata() -> dict[str, str]:
    rng_state = np.random.default_rng(0).bit_generator.state
    return {
        "scratchnn.format": "checkpoint",
        "scratchnn.format_version": "1",
        "scratchnn.epoch": "3",
        "scratchnn.config": "{}",
        "scratchnn.rng_state": json.dumps(rng_state),
    }


BAD_CHECKPOINTS: dict[str, tuple[dict[str, str | None], dict[str, np.ndarray], str]] = {
    # name: (changes to good_metadata(), None deletes; tensors; message)
    "not a checkpoint": ({"scratchnn.format": None}, {}, "not a scratchnn checkpoint"),
    "no version": ({"scratchnn.format_version": None}, {}, "not a scratchnn checkpoint"),
    "wrong version": ({"scratchnn.format_version": "2"}, {}, "format version '2'"),
    "unknown kind": ({"scratchnn.format": "tokenizer"}, {}, "holds a 'tokenizer'"),
    "no epoch": ({"scratchnn.epoch": None}, {}, "lacks metadata ['scratchnn.epoch']"),
    "no config": ({"scratchnn.config": None}, {}, "lacks metadata ['scratchnn.config']"),
    "no rng": ({"scratchnn.rng_state": None}, {}, "lacks metadata ['scratchnn.rng_state']"),
    "epoch negative": ({"scratchnn.epoch": "-1"}, {}, "epoch '-1'"),
    "epoch float": ({"scratchnn.epoch": "1.5"}, {}, "epoch '1.5'"),
    "epoch huge": ({"scratchnn.epoch": "9" * 5000}, {}, "is not an integer in [0, 2**63)"),
    "epoch past int64": ({"scratchnn.epoch": str(2**63)}, {}, "is not an integer in [0, 2**63)"),
    "epoch leading zero": ({"scratchnn.epoch": "03"}, {}, "epoch '03'"),
    "config not JSON": ({"scratchnn.config": "{lr: 1}"}, {}, "config is not valid JSON"),
    "config a list": ({"scratchnn.config": "[1]"}, {}, "config is a JSON list"),
    "rng not JSON": ({"scratchnn.rng_state": "PCG64"}, {}, "rng_state is not valid JSON"),
    "rng unknown": ({"scratchnn.rng_state": '{"bit_generator": "os"}'}, {}, "not a valid state"),
    "rng a list": ({"scratchnn.rng_state": "[1, 2]"}, {}, "not a valid state"),
    "rng bad fields": (
        {"scratchnn.rng_state": '{"bit_generator": "PCG64", "state": {"state": "x"}}'},
        {},
        "not a valid state",
    ),
    "rng bad array": (
        {
            "scratchnn.rng_state": json.dumps(
                {
                    "bit_generator": "MT19937",
                    "state": {"key": {"__ndarray__": "uint32", "values": [-1, "x"]}, "pos": 0},
                }
            )
        },
        {},
        "not a valid state",
    ),
    "unknown tensor": ({}, {"weights/W": np.zeros(1)}, "unexpected tensor 'weights/W'"),
}


def hostile_state(bit_generator: str, change: Any) -> dict[str, str | None]:
    """A real state of ``bit_generator`` after ``change(state)``: NumPy's setter takes each of
    these without a word, and the MT19937 and Philox ones read memory outside the generator."""
    generator = getattr(np.random, bit_generator)(0)
    state = json.loads(json.dumps(generator.state, default=lambda array: array.tolist()))
    for key, value in state.items():  # the arrays as save_checkpoint encodes them
        if isinstance(value, list):
            state[key] = {"__ndarray__": "uint64", "values": value}
    for key, value in state["state"].items():
        if isinstance(value, list):
            dtype = "uint32" if bit_generator == "MT19937" else "uint64"
            state["state"][key] = {"__ndarray__": dtype, "values": value}
    change(state)
    return {"scratchnn.rng_state": json.dumps(state)}


BAD_CHECKPOINTS.update(
    {
        "mt pos past the key": (
            hostile_state("MT19937", lambda s: s["state"].update(pos=625)),
            {},
            "pos must be an integer in [0, 624], got 625",
        ),
        "mt pos negative": (
            hostile_state("MT19937", lambda s: s["state"].update(pos=-5)),
            {},
            "pos must be an integer in [0, 624], got -5",
        ),
        "mt key short": (
            hostile_state("MT19937", lambda s: s["state"]["key"]["values"].pop()),
            {},
            "key must be 624 integers of type uint32",
        ),
        "philox buffer_pos": (
            hostile_state("Philox", lambda s: s.update(buffer_pos=-10**9)),
            {},
            "buffer_pos must be an integer in [0, 4]",
        ),
        "pcg64 float state": (
            hostile_state("PCG64", lambda s: s["state"].update(state=1.5)),
            {},
            "state.state must be an integer in [0, 2**128 - 1]".replace("2**128 - 1", str(2**128 - 1)),
        ),
        "pcg64 bool flag": (
            hostile_state("PCG64", lambda s: s.update(has_uint32=True)),
            {},
            "has_uint32 must be an integer in [0, 1]",
        ),
        "sfc64 float array": (
            hostile_state("SFC64", lambda s: s["state"]["state"]["values"].__setitem__(0, 1.5)),
            {},
            "state.state must be 4 integers of type uint64",
        ),
        "bit generator a list": (
            hostile_state("SFC64", lambda s: s.update(bit_generator=["SFC64"])),
            {},
            "the bit generator must be one of",
        ),
        "extra field": (
            hostile_state("SFC64", lambda s: s.update(extra=1)),
            {},
            "must have the fields",
        ),
    }
)


@pytest.mark.parametrize("case", BAD_CHECKPOINTS, ids=str)
def test_bad_checkpoint_raises_checkpoint_error(tmp_path: Path, case: str) -> None:
    changes, tensors, message = BAD_CHECKPOINTS[case]
    metadata = good_metadata()
    for key, value in changes.items():
        if value is None:
            del metadata[key]
        else:
            metadata[key] = value
    path = tmp_path / "bad.safetensors"
    save_safetensors(path, tensors, metadata)
    with pytest.raises(CheckpointError, match=re.escape(message)) as caught:
        load_checkpoint(path)
    assert str(path) in str(caught.value)


def test_good_metadata_is_a_valid_checkpoint(tmp_path: Path) -> None:
    save_safetensors(tmp_path / "good.safetensors", {}, good_metadata())
    assert load_checkpoint(tmp_path / "good.safetensors").epoch == 3


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"config": {"shape": (1, 2)}}, ValueError, "JSON round trip"),
        ({"config": {1: "a"}}, ValueError, "JSON round trip"),
        ({"config": {"lr": float("nan")}}, ValueError, "not JSON-serialisable"),
        ({"config": {"f": print}}, ValueError, "not JSON-serialisable"),
        ({"config": [1]}, TypeError, "config must be a dict"),
        ({"epoch": -1}, ValueError, "epoch must lie in"),
        ({"epoch": 2**63}, ValueError, "epoch must lie in"),
        ({"epoch": 1.0}, TypeError, "epoch must be"),
        ({"epoch": True}, TypeError, "epoch must be"),
        ({"rng": np.random.RandomState(0)}, TypeError, "np.random.Generator"),
        ({"params": {"W": [1.0]}}, TypeError, "not a NumPy array"),
        ({"params": {1: np.zeros(1)}}, TypeError, "params: name 1 is not a str"),
        ({"optimizer_state": None}, TypeError, "optimizer_state must be a dict"),
        ({"metadata": {"scratchnn.epoch": "1"}}, ValueError, "reserved"),
    ],
)
def test_save_checkpoint_refuses_bad_arguments(
    tmp_path: Path, change: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        save_checkpoint(tmp_path / "ckpt.safetensors", **{**make_run(), **change})
    assert os.listdir(tmp_path) == []


def test_epoch_accepts_numpy_integers(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ckpt.safetensors", **{**make_run(), "epoch": np.int64(5)})
    assert load_checkpoint(tmp_path / "ckpt.safetensors").epoch == 5


@pytest.mark.parametrize("epoch", [0, 2**63 - 1])
def test_the_documented_ends_of_the_epoch_range_round_trip(tmp_path: Path, epoch: int) -> None:
    # [0, 2**63): a checkpoint before any epoch, and the largest int64
    save_checkpoint(tmp_path / "ckpt.safetensors", **{**make_run(), "epoch": epoch})
    assert load_checkpoint(tmp_path / "ckpt.safetensors").epoch == epoch


def test_saved_files_are_not_executable(tmp_path: Path) -> None:
    path = tmp_path / "weights.safetensors"
    save_safetensors(path, {"a": np.ones(2)})
    assert os.stat(path).st_mode & 0o111 == 0


# -- after an audit: repeated keys anywhere, in linear time; a size no weight holds ----------


def test_a_header_of_many_keys_with_a_repeat_is_refused_quickly(tmp_path: Path) -> None:
    # The repeat was found by counting each key among all the others, quadratic in their
    # number: 40,000 keys took 16 s, a 1 MB header minutes. (20,000 here: 4 s that way.)
    entry_text = '{"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}'
    keys = [f'"k{i}": {entry_text}' for i in range(20_000)]
    header = ("{" + ", ".join([*keys, keys[0]]) + "}").encode()
    path = write_raw(tmp_path / "many.safetensors", header)
    with pytest.raises(CheckpointError, match=r"repeated key\(s\) \['k0'\]"):
        load_safetensors(path)


def test_a_repeated_setting_inside_the_saved_configuration_is_refused(tmp_path: Path) -> None:
    # The outer header refused repeated keys, the JSON inside it (the configuration that
    # builds the network, the history, the generator's state) did not: the last won, and a
    # ReLU network was scored as a tanh one.
    from scratchnn.runs import RunConfig

    path = tmp_path / "model.safetensors"
    save_model(path, {"W1": np.zeros((784, 10), np.float32), "b1": np.zeros(10, np.float32)},
               RunConfig(hidden=[]).to_dict())  # fmt: skip
    tensors, metadata = load_safetensors(path)
    key = next(k for k, v in metadata.items() if '"activation"' in v)
    metadata[key] = metadata[key][:-1] + ', "activation": "tanh"}'
    save_safetensors(path, tensors, metadata)
    with pytest.raises(CheckpointError, match=r"repeated key\(s\) \['activation'\]"):
        load_model(path)


def test_a_header_longer_than_the_limit_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    # Valid JSON of the wrong structure, parsed, takes some 25 times its length: a 99 MB
    # header took 2.4 GB before its structure was refused. Beyond the limit it is not read.
    from scratchnn.checkpoint import MAX_HEADER_BYTES

    items = MAX_HEADER_BYTES // 3 + 1
    header = b'{"x":[' + b"{}," * items + b"{}]}"
    path = write_raw(tmp_path / "long.safetensors", header)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="header length"):
            load_safetensors(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20  # nothing of the header was read, let alone parsed


def test_a_header_the_reader_would_refuse_is_not_written(tmp_path: Path) -> None:
    # Metadata past the reader's limit (a history of some 120,000 epochs): refused before
    # anything is written, so the readable file already there stays as it was.
    from scratchnn.checkpoint import MAX_HEADER_BYTES

    path = tmp_path / "model.safetensors"
    save_safetensors(path, {"W": np.ones(3)}, {"note": "kept"})
    original = path.read_bytes()
    message = f"{re.escape(str(path))}: its header .* more than the {MAX_HEADER_BYTES} a reader"
    with pytest.raises(ValueError, match=message):
        save_safetensors(path, {"W": np.zeros(3)}, {"history": "x" * MAX_HEADER_BYTES})
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    # Just under the limit: written, and read back.
    room = MAX_HEADER_BYTES - 200
    save_safetensors(path, {"W": np.zeros(3)}, {"history": "x" * room})
    assert len(load_safetensors(path)[1]["history"]) == room
