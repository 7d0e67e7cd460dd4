"""read_idx: every way a file can be wrong, caught before allocating."""

from __future__ import annotations

import gzip
import os
import struct
import threading
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from scratchnn.data import read_idx

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
TYPE_CODES = {
    "uint8": 0x08, "int8": 0x09, "int16": 0x0B, "int32": 0x0C, "float32": 0x0D, "float64": 0x0E,
}  # fmt: skip


def idx_header(type_code: int, shape: tuple[int, ...]) -> bytes:
    return bytes([0, 0, type_code, len(shape)]) + struct.pack(f">{len(shape)}I", *shape)


def idx_bytes(array: np.ndarray) -> bytes:
    big_endian = array.astype(array.dtype.newbyteorder(">"))
    return idx_header(TYPE_CODES[array.dtype.name], array.shape) + big_endian.tobytes()


def write(path: Path, data: bytes, compress: bool) -> Path:
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def gzip_stream(parts: list[bytes], repeat_last: int = 1) -> bytes:
    """A gzip file of ``parts`` with the last repeated, built without holding it decompressed."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip container
    out = [compressor.compress(part) for part in parts[:-1]]
    out += [compressor.compress(parts[-1]) for _ in range(repeat_last)]
    return b"".join([*out, compressor.flush()])


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("dtype", list(TYPE_CODES))
def test_reads_every_type_in_native_byte_order(tmp_path: Path, dtype: str, compress: bool) -> None:
    rng = np.random.default_rng(0)
    expected = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    result = read_idx(write(tmp_path / "a.idx", idx_bytes(expected), compress))
    assert result.dtype == np.dtype(dtype) and result.dtype.isnative
    assert result.shape == (3, 4, 5)
    np.testing.assert_array_equal(result, expected)


def test_big_endian_values_are_decoded(tmp_path: Path) -> None:
    data = idx_header(0x0C, (2,)) + bytes([0, 0, 1, 2, 0xFF, 0xFF, 0xFF, 0xFE])
    assert read_idx(write(tmp_path / "a", data, False)).tolist() == [258, -2]


def test_gzip_is_detected_by_content_not_name(tmp_path: Path) -> None:
    data = idx_bytes(np.arange(6, dtype=np.uint8).reshape(2, 3))
    assert read_idx(write(tmp_path / "plain.idx", data, True)).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert read_idx(write(tmp_path / "fake.gz", data, False)).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_zero_sized_dimension_is_an_empty_array(tmp_path: Path) -> None:
    result = read_idx(write(tmp_path / "a", idx_header(0x08, (0, 28, 28)), False))
    assert result.shape == (0, 28, 28)
    # Empty, yet no array can have this shape: NumPy's own "array is too big" named no file.
    path = write(tmp_path / "b", idx_header(0x08, (0,) + (2**32 - 1,) * 3), False)
    with pytest.raises(ValueError, match=r"b: header claims shape .* larger than any array"):
        read_idx(path)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "ends inside the 4-byte magic"),
        (b"\x00\x00", "ends inside the 4-byte magic"),
        (b"\x01\x00\x08\x01" + b"\x00" * 8, "not an IDX file: it starts with 01 00"),
        (b"PK\x03\x04" + b"\x00" * 8, "not an IDX file"),
        (idx_header(0x07, (2,)) + b"\x00\x00", "unknown IDX type code 0x07"),
        (idx_header(0x0A, (2,)) + b"\x00\x00", "unknown IDX type code 0x0A"),
        (b"\x00\x00\x08\x00", "0 dimensions; expected 1 to 16"),
        (idx_header(0x08, (1,) * 17) + b"\x00", "17 dimensions"),
        (idx_header(0x08, (2, 3))[:10], "ends inside the dimensions"),
        (idx_header(0x08, (2, 3)) + b"\x00" * 5, "truncated"),
        (idx_header(0x0B, (3,)) + b"\x00" * 5, "truncated"),
        (idx_header(0x08, (2, 3)) + b"\x00" * 7, "trailing bytes"),
        (idx_bytes(np.zeros(10, np.float64)) + b"\x00", "trailing bytes"),
    ],
)  # fmt: skip
def test_malformed_files_raise_value_error_naming_file(
    tmp_path: Path, data: bytes, message: str, compress: bool
) -> None:
    path = write(tmp_path / "broken-file", data, compress)
    with pytest.raises(ValueError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_hostile_dimensions_raise_without_allocating(tmp_path: Path, compress: bool) -> None:
    # 2^32-1 cubed elements of float64: about 2^99 bytes. Preallocating would be a MemoryError.
    path = write(tmp_path / "huge", idx_header(0x0E, (2**32 - 1,) * 3) + b"\x00" * 64, compress)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="truncated") as info:
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "(4294967295, 4294967295, 4294967295)" in str(info.value)
    assert peak < 4 << 20


def test_gzip_header_claiming_more_than_deflate_can_hold_fails_before_decompressing(
    tmp_path: Path,
) -> None:
    # A tiny gzip file claiming 10 MB cannot be honest: DEFLATE expands at most 1032:1.
    path = write(tmp_path / "a.gz", idx_header(0x08, (10_000_000,)) + b"\x00" * 100, True)
    with pytest.raises(ValueError, match="more than a gzip file of"):
        read_idx(path)


def test_gzip_truncated_within_the_plausible_ratio_is_caught_while_reading(tmp_path: Path) -> None:
    path = write(tmp_path / "a.gz", idx_header(0x08, (5000,)) + b"\x00" * 4000, True)
    with pytest.raises(ValueError, match=r"truncated.*it holds 4000"):
        read_idx(path)


def test_gzip_bomb_stops_one_byte_past_the_header_claim(tmp_path: Path) -> None:
    # 64 MiB of zeros behind a header that claims 100 bytes: about 64 kB compressed.
    zeros = bytes(1 << 20)
    path = tmp_path / "bomb.gz"
    path.write_bytes(gzip_stream([idx_header(0x08, (100,)), zeros], repeat_last=64))
    assert path.stat().st_size < 256 << 10
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="trailing bytes"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # a small fraction of the 64 MiB the bomb expands to


def test_corrupt_gzip_raises_value_error(tmp_path: Path) -> None:
    data = idx_bytes(np.arange(4000, dtype=np.int32))
    # Stored (level 0) blocks: flipping a payload byte keeps the stream valid, so only the
    # CRC can notice. It proves the reader reaches the gzip trailer.
    stored = bytearray(gzip.compress(data, compresslevel=0))
    stored[len(stored) // 2] ^= 0xFF
    path = write(tmp_path / "crc.gz", bytes(stored), False)
    with pytest.raises(ValueError, match=r"crc\.gz: corrupt gzip data.*CRC"):
        read_idx(path)

    compressed = gzip.compress(data)
    path = write(tmp_path / "cut.gz", compressed[: len(compressed) // 2], False)
    with pytest.raises(ValueError, match=r"cut\.gz: corrupt gzip data"):
        read_idx(path)

    path = write(tmp_path / "garbage.gz", b"\x1f\x8b" + bytes(range(200)), False)
    with pytest.raises(ValueError, match=r"garbage\.gz: corrupt gzip data"):
        read_idx(path)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_idx(tmp_path / "absent")


def test_a_pipe_is_refused_by_name_without_waiting_for_a_writer(tmp_path: Path) -> None:
    pipe = tmp_path / "labels.idx"
    os.mkfifo(pipe)
    raised: list[BaseException] = []

    def read() -> None:
        try:
            read_idx(pipe)
        except BaseException as error:  # handed over to the test's thread
            raised.append(error)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    if reader.is_alive():
        os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))  # release the waiting open
        pytest.fail("read_idx waited on the pipe for a writer")
    assert len(raised) == 1 and isinstance(raised[0], ValueError)
    assert f"{pipe}: not a regular file" in str(raised[0])


def test_a_directory_is_an_os_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        read_idx(tmp_path)


@pytest.fixture(scope="module")
def debian_dir() -> Path:
    if not (DEBIAN / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(
            f"Fashion-MNIST not installed at {DEBIAN} (apt-get install dataset-fashion-mnist)"
        )
    return DEBIAN


def test_reads_the_real_fashion_mnist_files(debian_dir: Path) -> None:
    train_images = read_idx(debian_dir / "train-images-idx3-ubyte.gz")
    assert train_images.shape == (60000, 28, 28) and train_images.dtype == np.uint8
    assert train_images.max() == 255
    test_images = read_idx(debian_dir / "t10k-images-idx3-ubyte.gz")
    assert test_images.shape == (10000, 28, 28)
    for name, count in [("train", 60000), ("t10k", 10000)]:
        labels = read_idx(debian_dir / f"{name}-labels-idx1-ubyte.gz")
        assert labels.shape == (count,) and labels.dtype == np.uint8
        # Fashion-MNIST is balanced: every class 0..9 appears count/10 times.
        assert np.bincount(labels).tolist() == [count // 10] * 10
