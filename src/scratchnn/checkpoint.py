"""Checkpoints in the safetensors format, read and written with NumPy alone.

A safetensors file is an 8-byte little-endian length ``N``, then ``N`` bytes of
UTF-8 JSON (the header), then the tensor bytes. The header maps each tensor
name to ``{"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}``,
offsets counted from the first byte after the header, and may hold a
``"__metadata__"`` object of string keys and string values. Tensors are stored
little-endian and C-contiguous, back to back with no gaps. The files written
here are byte for byte those that the ``safetensors`` package writes
(but for the order of metadata keys: we sort them, it writes them in hash order).

Two levels:

* ``save_safetensors`` / ``load_safetensors``: any dict of arrays plus string
  metadata. Saving is atomic; loading checks the whole header before it
  allocates anything and raises ``CheckpointError`` for any defect.
* ``save_checkpoint`` / ``load_checkpoint`` (a training run: parameters,
  optimiser state, random generator, epoch, config) and ``save_model`` /
  ``load_model`` (weights and config only), on top of the first level.

Nothing is ever unpickled: a checkpoint holds arrays and JSON, nothing that
runs code when read.

**Atomic saves.** The file is written through ``scratchnn.files.atomic_path``:
to a temporary file in the same directory, named
``.<stem>.<pid>.<8 hex digits>.tmp.safetensors``, flushed, fsynced and renamed
onto the target with ``os.replace`` (then the directory is fsynced). A
process killed at any moment, even by SIGKILL, leaves the old complete file
or the new complete file. A killed save can leave its temporary file behind;
the next save to the same path deletes the temporary files whose process no
longer runs (on POSIX systems). Concurrent saves to one path do not corrupt
it: the last rename wins.

>>> import os, tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "weights.safetensors")
>>> save_safetensors(path, {"W": np.eye(2, dtype=np.float32)}, {"note": "identity"})
>>> tensors, metadata = load_safetensors(path)
>>> tensors["W"]
array([[1., 0.],
       [0., 1.]], dtype=float32)
>>> metadata
{'note': 'identity'}
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scratchnn import _checks
from scratchnn.backend import to_host
from scratchnn.files import atomic_path, check_regular_file

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "load_checkpoint",
    "load_model",
    "load_safetensors",
    "save_checkpoint",
    "save_model",
    "save_safetensors",
]

PathLike = str | os.PathLike[str]

# safetensors' dtype names, in the order the reference writer ranks them: it
# stores tensors by descending rank (wider types first, which keeps every
# tensor aligned), then by name. Following it makes our files byte-identical.
_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype("u1"),
    "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"),
    "U16": np.dtype("<u2"),
    "F16": np.dtype("<f2"),
    "I32": np.dtype("<i4"),
    "U32": np.dtype("<u4"),
    "F32": np.dtype("<f4"),
    "C64": np.dtype("<c8"),
    "F64": np.dtype("<f8"),
    "I64": np.dtype("<i8"),
    "U64": np.dtype("<u8"),
}
_RANK = {name: rank for rank, name in enumerate(_DTYPES)}
_NAME_OF_DTYPE = {dtype: name for name, dtype in _DTYPES.items()}

# A header's longest: ours hold a few kilobytes (a long history some hundreds), a large
# model's a megabyte or two. Parsed, JSON takes up to some 25 times its length in memory (a
# hostile 99 MB header, under the reference reader's 100 MB, took 2.4 GB); 16 MiB bounds that.
MAX_HEADER_BYTES = 16 * 2**20
_MAX_NDIM = 64  # NumPy's limit on the number of dimensions
_MAX_SIZE = int(np.iinfo(np.intp).max)
_METADATA_KEY = "__metadata__"


class CheckpointError(ValueError):
    """A file that is not a valid safetensors file or scratchnn checkpoint.

    The message names the file and what is wrong with it.
    """


# -- the safetensors format: writing -------------------------------------------------


def save_safetensors(
    path: PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` and string ``metadata`` to ``path`` in the safetensors format, atomically.

    Arrays of dtype bool, (u)int8/16/32/64, float16/32/64 and complex64, of
    any byte order and memory layout, are stored little-endian and
    C-contiguous. A name that is not a string, or is ``"__metadata__"``,
    raises ``TypeError`` or ``ValueError``, as do values that are not arrays,
    unsupported dtypes and metadata that is not ``str`` to ``str``; nothing is
    written then. See the module docstring for how the write is made atomic.
    """
    header, arrays = _prepare(tensors, metadata)
    if len(header) - 8 > MAX_HEADER_BYTES:
        # The reader refuses such a header: written, it would replace a readable file with
        # one that cannot be loaded (a checkpoint's history grows some 140 bytes an epoch).
        raise ValueError(
            f"{os.fspath(path)}: its header (names, shapes, metadata) would take "
            f"{len(header) - 8} bytes, more than the {MAX_HEADER_BYTES} a reader accepts; "
            "store less metadata or fewer arrays"
        )
    _atomic_write(path, header, arrays)


def _prepare(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[np.ndarray]]:
    """Check the arguments; return the padded header and the arrays in file order."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors must be a dict of name to array, got {type(tensors).__name__}")
    entries = []
    for name, array in tensors.items():
        _check_text(name, "tensor name")
        if name == _METADATA_KEY:
            raise ValueError(f"tensor name {name!r} is reserved for the metadata")
        # A GPU array is written from its host copy: a checkpoint made on the GPU loads anywhere.
        array = to_host(array)
        if not isinstance(array, np.ndarray):
            raise TypeError(
                f"tensor {name!r} is a {type(array).__name__}, not a NumPy array; "
                "convert it with np.asarray"
            )
        dtype_name = _NAME_OF_DTYPE.get(array.dtype.newbyteorder("<"))
        if dtype_name is None:
            raise TypeError(
                f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot store; "
                f"supported: {', '.join(str(d) for d in _DTYPES.values())}"
            )
        entries.append((name, dtype_name, array))
    entries.sort(key=lambda entry: (-_RANK[entry[1]], entry[0]))

    header: dict[str, Any] = {}
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
        for key, value in metadata.items():
            _check_text(key, "metadata key")
            _check_text(value, f"metadata value of {key!r}")
        header[_METADATA_KEY] = dict(sorted(metadata.items()))
    arrays = []
    offset = 0
    for name, dtype_name, array in entries:
        stored = np.ascontiguousarray(array, dtype=_DTYPES[dtype_name])
        if dtype_name == "BOOL":
            # A bool array built by viewing other bytes may hold values other
            # than 0 and 1; the reader rejects those, so store them as 1.
            stored = stored.view(np.uint8).astype(bool).view(np.uint8)
        header[name] = {
            "dtype": dtype_name,
            "shape": list(array.shape),
            "data_offsets": [offset, offset + stored.nbytes],
        }
        offset += stored.nbytes
        arrays.append(stored)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # pad, as the reference writer does, so data starts aligned
    return len(text).to_bytes(8, "little") + text, arrays


def _check_text(value: object, what: str) -> None:
    """Raise unless ``value`` is a string that UTF-8 can encode."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}: {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{what} {value!r} cannot be encoded as UTF-8: {error}") from None


def _atomic_write(path: PathLike, header: bytes, arrays: list[np.ndarray]) -> None:
    """Write ``header`` and ``arrays`` to ``path`` through ``files.atomic_path``."""
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        file.write(header)
        for array in arrays:
            file.write(array.reshape(-1).view(np.uint8).data)


# -- the safetensors format: reading -------------------------------------------------


def load_safetensors(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file: its tensors, in header order, and its string metadata.

    The whole header is checked before any tensor is allocated: known dtypes,
    shapes of non-negative integers, offsets that cover the data exactly once
    with no gap, overlap or trailing byte, and sizes that match the shapes. A
    defect raises ``CheckpointError`` naming the file and the defect, so a
    truncated or hostile file never allocates tensors beyond its own size (and
    its header, at most ``MAX_HEADER_BYTES``, at most some 25 times that as
    parsed JSON). The
    arrays returned are writable copies in native byte order. Errors opening
    the file (``FileNotFoundError`` and other ``OSError``) propagate unchanged.
    """
    name = os.fspath(path)
    try:
        check_regular_file(name)  # a pipe would hang the open; the header check sizes the file
    except ValueError as error:
        raise CheckpointError(str(error)) from None
    with open(name, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        header_size, entries, metadata = _read_header(file, size, name)
        tensors = {}
        for key, dtype_name, shape, begin, end in entries:
            file.seek(8 + header_size + begin)
            where = f"{name}: tensor {key!r}"
            tensors[key] = _read_tensor(file, dtype_name, shape, end - begin, where)
    return tensors, metadata


def _read_header(
    file: io.BufferedReader, size: int, name: str
) -> tuple[int, list[tuple[str, str, tuple[int, ...], int, int]], dict[str, str]]:
    """Read and check the header; return its length, the tensor entries and the metadata."""
    if size < 8:
        raise CheckpointError(f"{name}: {size} bytes is too short for a safetensors file")
    header_size = int.from_bytes(file.read(8), "little")
    if header_size > min(size - 8, MAX_HEADER_BYTES):
        raise CheckpointError(
            f"{name}: header length {header_size} is impossible for a file of {size} bytes "
            f"(the limit is {MAX_HEADER_BYTES})"
        )
    raw = file.read(header_size)
    if len(raw) != header_size:
        raise CheckpointError(f"{name}: the file ended inside the header")
    try:
        header = _checks.strict_json(raw.decode("utf-8"))
    except (ValueError, RecursionError) as error:
        # UnicodeDecodeError and JSONDecodeError are ValueErrors; RecursionError
        # comes from absurdly nested JSON.
        raise CheckpointError(f"{name}: the header is not valid UTF-8 JSON: {error}") from None
    if not isinstance(header, dict):
        kind = type(header).__name__
        raise CheckpointError(f"{name}: the header is a JSON {kind}, not an object")

    metadata = header.pop(_METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(
        isinstance(value, str) for value in metadata.values()
    ):
        raise CheckpointError(f"{name}: {_METADATA_KEY} must map strings to strings")

    buffer_size = size - 8 - header_size
    entries = [_check_entry(key, entry, buffer_size, name) for key, entry in header.items()]
    expected = 0
    for key, _, _, begin, end in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin != expected:
            problem = "overlaps the tensor before it" if begin < expected else "leaves a gap"
            raise CheckpointError(f"{name}: tensor {key!r} at bytes {begin}..{end} {problem}")
        expected = end
    if expected != buffer_size:
        raise CheckpointError(
            f"{name}: the tensors cover {expected} bytes but the data section has {buffer_size}"
        )
    return header_size, entries, metadata


def _check_entry(
    key: str, entry: object, buffer_size: int, name: str
) -> tuple[str, str, tuple[int, ...], int, int]:
    """Check one header entry; return ``(key, dtype name, shape, begin, end)``."""
    where = f"{name}: tensor {key!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: entry must be a JSON object")
    # Unknown fields are refused rather than skipped: a field we do not
    # understand might change what the bytes mean.
    if set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(
            f"{where}: entry must have exactly dtype, shape and data_offsets, got {sorted(entry)}"
        )
    dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype_name, str) or dtype_name not in _DTYPES:
        raise CheckpointError(
            f"{where}: unsupported dtype {dtype_name!r}; supported: {', '.join(_DTYPES)}"
        )
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers")
    if len(shape) > _MAX_NDIM:
        raise CheckpointError(f"{where}: {len(shape)} dimensions; NumPy allows {_MAX_NDIM}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise CheckpointError(f"{where}: data_offsets must be two non-negative integers")
    begin, end = offsets
    if not begin <= end <= buffer_size:
        raise CheckpointError(
            f"{where}: data_offsets [{begin}, {end}] lie outside the data section "
            f"of {buffer_size} bytes"
        )
    itemsize = _DTYPES[dtype_name].itemsize
    # The product of the non-zero dimensions must fit NumPy's index type even
    # for an empty array; the loop stops early so a hostile shape costs little.
    count = itemsize
    for n in shape:
        count *= n or 1
        if count > _MAX_SIZE:
            raise CheckpointError(f"{where}: shape {shape} is too large for NumPy")
    nbytes = 0 if 0 in shape else count
    if end - begin != nbytes:
        raise CheckpointError(
            f"{where}: shape {shape} of {dtype_name} needs {nbytes} bytes "
            f"but data_offsets [{begin}, {end}] hold {end - begin}"
        )
    return key, dtype_name, tuple(shape), begin, end


def _is_count(value: object) -> bool:
    """A non-negative JSON integer (``true`` does not count)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_tensor(
    file: io.BufferedReader, dtype_name: str, shape: tuple[int, ...], nbytes: int, where: str
) -> np.ndarray:
    """Read ``nbytes`` bytes into a new native-endian array of ``shape``."""
    raw = np.empty(nbytes, dtype=np.uint8)
    view = raw.data
    done = 0
    while done < nbytes:
        got = file.readinto(view[done:])
        if not got:
            raise CheckpointError(f"{where}: the file ended inside the tensor's data")
        done += got
    if dtype_name == "BOOL" and nbytes and raw.max() > 1:
        raise CheckpointError(f"{where}: a BOOL tensor holds bytes other than 0 and 1")
    dtype = _DTYPES[dtype_name]
    # On a big-endian machine this swaps the bytes; on a little-endian one it is a view.
    return raw.view(dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


# -- training checkpoints ------------------------------------------------------------

FORMAT_VERSION = "1"
_MAX_EPOCH = 2**63 - 1  # an int64, so that any reader can hold it
_KEY_FORMAT = "scratchnn.format"
_KEY_VERSION = "scratchnn.format_version"
_KEY_EPOCH = "scratchnn.epoch"
_KEY_CONFIG = "scratchnn.config"
_KEY_RNG = "scratchnn.rng_state"
_RESERVED = (_KEY_FORMAT, _KEY_VERSION, _KEY_EPOCH, _KEY_CONFIG, _KEY_RNG)
_PARAM, _OPTIM = "param/", "optim/"
# The bit generators a state may name; a name from the file is never looked up freely.
_BIT_GENERATORS: dict[str, type[np.random.BitGenerator]] = {
    cls.__name__: cls
    for cls in (
        np.random.PCG64,
        np.random.PCG64DXSM,
        np.random.MT19937,
        np.random.Philox,
        np.random.SFC64,
    )
}


@dataclass
class Checkpoint:
    """A training run saved by ``save_checkpoint`` and read by ``load_checkpoint``.

    ``rng_state`` is the generator's ``bit_generator.state``; ``rng()`` turns it
    back into a ``np.random.Generator`` whose draws continue where the saved
    one stopped. ``metadata`` holds the caller's extra string metadata.
    """

    params: dict[str, np.ndarray]
    optimizer_state: dict[str, np.ndarray]
    rng_state: dict[str, Any]
    epoch: int
    config: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)

    def rng(self) -> np.random.Generator:
        """A new generator in the saved state; each call starts from that same state."""
        bit_generator = _BIT_GENERATORS[self.rng_state["bit_generator"]]()
        bit_generator.state = self.rng_state
        return np.random.Generator(bit_generator)


def save_checkpoint(
    path: PathLike,
    *,
    params: Mapping[str, np.ndarray],
    optimizer_state: Mapping[str, np.ndarray],
    rng: np.random.Generator,
    epoch: int,
    config: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save a training run atomically: parameters, optimiser state, generator, epoch, config.

    Parameters are stored as tensors ``param/<name>``, optimiser state as
    ``optim/<name>``; the generator state, epoch, config (as JSON) and format
    version go in the string metadata, beside the caller's ``metadata``, whose
    keys must not start with ``scratchnn.``. The config must survive a JSON
    round trip unchanged (string keys, lists rather than tuples, finite
    floats), else ``ValueError``; so must the generator's bit generator be one
    of NumPy's (PCG64, PCG64DXSM, MT19937, Philox, SFC64).

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "run.safetensors")
    >>> rng = np.random.default_rng(0)
    >>> save_checkpoint(path, params={"W": np.ones(2)}, optimizer_state={}, rng=rng,
    ...                 epoch=3, config={"lr": 0.1})
    >>> checkpoint = load_checkpoint(path)
    >>> checkpoint.epoch, checkpoint.config
    (3, {'lr': 0.1})
    >>> bool(checkpoint.rng().random() == rng.random())
    True
    """
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a np.random.Generator, got {type(rng).__name__}")
    if type(rng.bit_generator).__name__ not in _BIT_GENERATORS:
        raise TypeError(f"cannot save a {type(rng.bit_generator).__name__} bit generator")
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)):
        raise TypeError(f"epoch must be an int, got {epoch!r}")
    if not 0 <= epoch <= _MAX_EPOCH:
        raise ValueError(f"epoch must lie in [0, 2**63), got {epoch}")
    extra = _user_metadata(metadata)
    tensors = {_OPTIM + key: value for key, value in _named(optimizer_state, "optimizer_state")}
    tensors.update({_PARAM + key: value for key, value in _named(params, "params")})
    save_safetensors(
        path,
        tensors,
        {
            **extra,
            _KEY_FORMAT: "checkpoint",
            _KEY_VERSION: FORMAT_VERSION,
            _KEY_EPOCH: str(int(epoch)),
            _KEY_CONFIG: _config_json(config),
            _KEY_RNG: json.dumps(_encode_arrays(rng.bit_generator.state)),
        },
    )


def load_checkpoint(path: PathLike) -> Checkpoint:
    """Read a training checkpoint written by ``save_checkpoint``.

    A file that is not valid safetensors, lacks any of the checkpoint's
    entries, has another format version, or holds a weights-only model
    raises ``CheckpointError``.
    """
    tensors, metadata = load_safetensors(path)
    name = os.fspath(path)
    fields = _check_format(name, metadata, "checkpoint")
    params, optimizer_state = _split_tensors(name, tensors, (_PARAM, _OPTIM))
    epoch_text, rng_json = fields[_KEY_EPOCH], _parse_json(name, fields[_KEY_RNG], "rng_state")
    if not re.fullmatch(r"0|[1-9][0-9]{0,18}", epoch_text) or int(epoch_text) > _MAX_EPOCH:
        raise CheckpointError(f"{name}: epoch {epoch_text[:40]!r} is not an integer in [0, 2**63)")
    checkpoint = Checkpoint(
        params=params,
        optimizer_state=optimizer_state,
        rng_state={},
        epoch=int(epoch_text),
        config=fields[_KEY_CONFIG],
        metadata={k: v for k, v in metadata.items() if k not in _RESERVED},
    )
    try:
        checkpoint.rng_state = _decode_arrays(rng_json)
        _check_state(checkpoint.rng_state)
        checkpoint.rng()
    except Exception as error:  # NumPy's state setters raise assorted types
        raise CheckpointError(f"{name}: rng_state is not a valid state: {error}") from None
    return checkpoint


def save_model(
    path: PathLike,
    params: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save weights and config only (no optimiser or generator), atomically.

    Parameters are stored as ``param/<name>`` and the config as JSON, as in
    ``save_checkpoint``.
    """
    tensors = {_PARAM + key: value for key, value in _named(params, "params")}
    save_safetensors(
        path,
        tensors,
        {
            **_user_metadata(metadata),
            _KEY_FORMAT: "model",
            _KEY_VERSION: FORMAT_VERSION,
            _KEY_CONFIG: _config_json(config),
        },
    )


def load_model(path: PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read ``(params, config)`` from a file of ``save_model`` or ``save_checkpoint``.

    From a training checkpoint only the parameters and config are kept.
    """
    tensors, metadata = load_safetensors(path)
    name = os.fspath(path)
    fields = _check_format(name, metadata, "model", "checkpoint")
    prefixes = (_PARAM, _OPTIM) if metadata[_KEY_FORMAT] == "checkpoint" else (_PARAM,)
    params = _split_tensors(name, tensors, prefixes)[0]
    return params, fields[_KEY_CONFIG]


def _named(tensors: Mapping[str, np.ndarray], what: str) -> list[tuple[str, np.ndarray]]:
    """The items of ``tensors``, with a clear error for a non-dict or non-str key."""
    if not isinstance(tensors, Mapping):
        raise TypeError(f"{what} must be a dict of name to array, got {type(tensors).__name__}")
    for key in tensors:
        if not isinstance(key, str):
            raise TypeError(f"{what}: name {key!r} is not a str")
    return list(tensors.items())


def _user_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """The caller's extra metadata, with the ``scratchnn.`` keys kept for ourselves."""
    extra = dict(metadata or {})
    clashes = [key for key in extra if isinstance(key, str) and key.startswith("scratchnn.")]
    if clashes:
        raise ValueError(f"metadata keys starting with 'scratchnn.' are reserved: {clashes}")
    return extra


def _config_json(config: Mapping[str, Any]) -> str:
    """``config`` as JSON, refused unless it reads back equal."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    try:
        text = json.dumps(dict(config), allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as error:
        raise ValueError(f"config is not JSON-serialisable: {error}") from None
    if json.loads(text) != config:
        raise ValueError(
            "config changes in a JSON round trip (tuples become lists, keys become strings); "
            "use lists and string keys"
        )
    return text


def _check_format(name: str, metadata: dict[str, str], *kinds: str) -> dict[str, Any]:
    """Check the format fields; return the string fields, with the config parsed."""
    kind = metadata.get(_KEY_FORMAT)
    if kind is None or _KEY_VERSION not in metadata:
        raise CheckpointError(f"{name}: not a scratchnn checkpoint (no {_KEY_FORMAT} metadata)")
    if metadata[_KEY_VERSION] != FORMAT_VERSION:
        raise CheckpointError(
            f"{name}: format version {metadata[_KEY_VERSION]!r} is not supported "
            f"(this scratchnn reads version {FORMAT_VERSION})"
        )
    if kind not in kinds:
        raise CheckpointError(f"{name}: holds a {kind!r}, expected {' or '.join(map(repr, kinds))}")
    needed = (_KEY_CONFIG, _KEY_EPOCH, _KEY_RNG) if kind == "checkpoint" else (_KEY_CONFIG,)
    missing = [key for key in needed if key not in metadata]
    if missing:
        raise CheckpointError(f"{name}: the {kind} lacks metadata {missing}")
    fields: dict[str, Any] = {key: metadata[key] for key in needed}
    config = _parse_json(name, metadata[_KEY_CONFIG], "config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{name}: config is a JSON {type(config).__name__}, not an object")
    fields[_KEY_CONFIG] = config
    return fields


def _split_tensors(
    name: str, tensors: dict[str, np.ndarray], prefixes: tuple[str, ...]
) -> list[dict[str, np.ndarray]]:
    """Split tensors by prefix (the prefix removed); a tensor under no prefix is an error."""
    groups: list[dict[str, np.ndarray]] = [{} for _ in prefixes]
    for key, array in tensors.items():
        for prefix, group in zip(prefixes, groups, strict=True):
            if key.startswith(prefix):
                group[key[len(prefix) :]] = array
                break
        else:
            raise CheckpointError(f"{name}: unexpected tensor {key!r} (expected {prefixes})")
    return groups


def _parse_json(name: str, text: str, what: str) -> Any:
    """Parse a JSON metadata field, as ``CheckpointError`` on failure."""
    try:
        return _checks.strict_json(text)
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{name}: {what} is not valid JSON: {error}") from None


def _encode_arrays(value: Any) -> Any:
    """Replace the arrays in a bit generator state (MT19937, Philox, SFC64) by JSON objects."""
    if isinstance(value, dict):
        return {key: _encode_arrays(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.dtype.name, "values": value.tolist()}
    if isinstance(value, np.integer):
        return int(value)
    return value


def _decode_arrays(value: Any) -> Any:
    """Undo ``_encode_arrays``; only integer dtypes of integer values are accepted (anything
    else stays a dict, which :func:`_check_state` refuses)."""
    if isinstance(value, dict):
        values = value.get("values")
        if (
            set(value) == {"__ndarray__", "values"}
            and value["__ndarray__"] in ("uint32", "uint64")
            and isinstance(values, list)
            and all(type(item) is int for item in values)
        ):
            return np.array(values, dtype=value["__ndarray__"])
        return {key: _decode_arrays(item) for key, item in value.items()}
    return value


# The largest value of each integer field of a state. NumPy's setters check none of them,
# and an MT19937 ``pos`` past its 624-word key, or a negative Philox ``buffer_pos``, makes
# the generator read memory outside itself.
_STATE_LIMITS = {
    "state": 2**128 - 1,
    "inc": 2**128 - 1,
    "pos": 624,
    "buffer_pos": 4,
    "has_uint32": 1,
    "uinteger": 2**32 - 1,
}


def _check_state(state: Any) -> None:
    """Check a decoded bit generator state field by field against a fresh generator's:
    the same fields, arrays of the same dtype and shape, integers in their range."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if not isinstance(name, str) or name not in _BIT_GENERATORS:
        raise ValueError(f"the bit generator must be one of {', '.join(_BIT_GENERATORS)}")
    _check_field(state, _BIT_GENERATORS[name]().state, "")


def _check_field(value: Any, template: Any, where: str) -> None:
    if isinstance(template, dict):
        if not isinstance(value, dict) or set(value) != set(template):
            raise ValueError(f"{where or 'it'} must have the fields {', '.join(sorted(template))}")
        for key, item in template.items():
            _check_field(value[key], item, f"{where}.{key}" if where else key)
    elif isinstance(template, np.ndarray):
        if not (
            isinstance(value, np.ndarray)
            and value.dtype == template.dtype
            and value.shape == template.shape
        ):
            raise ValueError(f"{where} must be {template.size} integers of type {template.dtype}")
    elif isinstance(template, str):
        if value != template:
            raise ValueError(f"{where} must be {template!r}")
    else:
        limit = _STATE_LIMITS[where.rsplit(".", 1)[-1]]
        if type(value) is not int or not 0 <= value <= limit:
            raise ValueError(f"{where} must be an integer in [0, {limit}], got {value!r}")
