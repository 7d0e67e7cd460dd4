"""Reading IDX files, the format of MNIST and Fashion-MNIST, raw or gzip-compressed.

An IDX file is a 4-byte magic number, one big-endian ``uint32`` per dimension,
then the elements in C order::

    00 00 <type code> <ndim>  <dim 0> ... <dim ndim-1>  <data>

Type codes: ``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32,
``0x0D`` float32, ``0x0E`` float64; multi-byte elements are big-endian.

:func:`read_idx` checks the whole header against the data before it allocates
room for the data, so a damaged or hostile file raises ``ValueError`` instead of
exhausting memory. Nothing is unpickled.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from typing import Any, Protocol

import numpy as np

from scratchnn.files import check_regular_file

# Type code -> big-endian dtype, as the IDX format defines them.
IDX_DTYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# The format allows 255 dimensions; no dataset uses more than a handful, and a
# larger count in a header is far likelier to be damage than data.
MAX_NDIM = 16

_GZIP_MAGIC = b"\x1f\x8b"
# DEFLATE cannot expand more than 1032:1 (zlib's documented limit), so a gzip
# file whose header claims more data than that is rejected before decompressing.
_DEFLATE_MAX_RATIO = 1032
_CHUNK = 1 << 20


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


def read_idx(path: str | os.PathLike[str], *, max_bytes: int | None = None) -> np.ndarray:
    """Read an IDX file, raw or gzip-compressed, into a native-endian NumPy array.

    Gzip is detected by the magic bytes ``1f 8b``, not by the file name. The
    header is validated first: magic bytes, type code, number of dimensions
    (1 to ``MAX_NDIM``) and that the dimensions' product matches the data
    exactly, so truncated files and trailing bytes are both errors. A gzip file
    is decompressed in bounded chunks and never beyond one byte more than its
    header promises. ``max_bytes`` bounds what that promise may be: a caller
    that knows its data (a data set's loader) refuses a small gzip file that
    would expand to gigabytes before a byte of it is decompressed.

    Raises ``ValueError`` naming the file and the problem (a pipe or device
    too: the checks need its size), and ``FileNotFoundError`` (an ``OSError``)
    if it does not exist.

    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     p = pathlib.Path(tmp, "x.idx")
    ...     _ = p.write_bytes(bytes([0, 0, 0x0B, 2, 0, 0, 0, 1, 0, 0, 0, 2, 0, 1, 1, 0]))
    ...     read_idx(p)
    array([[  1, 256]], dtype=int16)
    """
    name = os.fspath(path)
    check_regular_file(name)  # the checks above size and rewind the file
    with open(name, "rb") as raw:
        if raw.read(2) == _GZIP_MAGIC:
            compressed_size = os.fstat(raw.fileno()).st_size
            raw.seek(0)
            try:
                with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                    return _read_stream(
                        stream, name, compressed_size=compressed_size, max_bytes=max_bytes
                    )
            except (OSError, EOFError, zlib.error) as error:
                # BadGzipFile is an OSError; a cut-off stream raises EOFError.
                raise ValueError(f"{name}: corrupt gzip data: {error}") from error
        raw.seek(0)
        return _read_stream(
            raw, name, file_size=os.fstat(raw.fileno()).st_size, max_bytes=max_bytes
        )


def _read_stream(
    stream: _Readable,
    name: str,
    *,
    file_size: int | None = None,
    compressed_size: int | None = None,
    max_bytes: int | None = None,
) -> np.ndarray:
    """Parse and check the header, then read exactly the promised data."""
    magic = _read_exact(stream, 4, name, "the 4-byte magic number")
    if magic[:2] != b"\x00\x00":
        raise ValueError(
            f"{name}: not an IDX file: it starts with {magic[:2].hex(' ')}, expected 00 00"
        )
    type_code, ndim = magic[2], magic[3]
    if type_code not in IDX_DTYPES:
        known = ", ".join(f"0x{code:02X}" for code in IDX_DTYPES)
        raise ValueError(
            f"{name}: unknown IDX type code 0x{type_code:02X}; expected one of {known}"
        )
    if not 1 <= ndim <= MAX_NDIM:
        raise ValueError(f"{name}: IDX header has {ndim} dimensions; expected 1 to {MAX_NDIM}")
    shape = struct.unpack(f">{ndim}I", _read_exact(stream, 4 * ndim, name, "the dimensions"))
    dtype = IDX_DTYPES[type_code]
    header_size = 4 + 4 * ndim
    # Python ints, so a hostile header cannot overflow the product.
    expected = math.prod(shape) * dtype.itemsize
    claim = f"header claims shape {shape} of {dtype.name}, {expected} bytes of data"

    if max_bytes is not None and expected > max_bytes:
        raise ValueError(f"{name}: {claim}, more than the {max_bytes} bytes this file may hold")
    if file_size is not None and file_size - header_size != expected:
        actual = file_size - header_size
        problem = "truncated" if actual < expected else "trailing bytes after the data"
        raise ValueError(f"{name}: {problem}: {claim}, the file holds {actual}")
    gzip_limit = None if compressed_size is None else _DEFLATE_MAX_RATIO * compressed_size
    if gzip_limit is not None and header_size + expected > gzip_limit:
        raise ValueError(
            f"{name}: truncated: {claim}, more than a gzip file of {compressed_size} bytes can hold"
        )

    # NumPy refuses a shape whose nonzero sizes overflow its index type, even with a zero.
    if math.prod(size for size in shape if size) * dtype.itemsize > np.iinfo(np.intp).max:
        raise ValueError(f"{name}: {claim}: a shape larger than any array can have")
    data = _read_at_most(stream, expected + 1)
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "trailing bytes after the data"
        found = f"it holds {len(data)}" if len(data) < expected else "it holds more"
        raise ValueError(f"{name}: {problem}: {claim}, {found}")
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _read_exact(stream: _Readable, size: int, name: str, what: str) -> bytes:
    data = _read_at_most(stream, size)
    if len(data) != size:
        raise ValueError(f"{name}: truncated: the file ends inside {what}")
    return bytes(data)


def _read_at_most(stream: _Readable, limit: int) -> bytearray:
    """Read until ``limit`` bytes or the end, in chunks, so memory follows the data read."""
    # Growing a buffer as data arrives, rather than allocating ``limit`` bytes up
    # front, keeps a header's false claim from costing memory.
    buffer = bytearray()
    while len(buffer) < limit:
        chunk = stream.read(min(_CHUNK, limit - len(buffer)))
        if not chunk:
            break
        buffer += chunk
    return buffer
