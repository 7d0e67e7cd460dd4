"""Downloading MNIST and Fashion-MNIST, checked against pinned SHA-256 hashes.

Each file is written to ``<name>.part`` and moved into place only once its hash
matches, so the cache never holds a file that failed its check. An interrupted
download resumes from its ``.part`` file with an HTTP ``Range`` request when the
server allows it.
"""

from __future__ import annotations

import hashlib
import http.client
import numbers
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path

# The four files of each dataset, with the names both upstreams use.
IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

DEFAULT_BASE_URLS: dict[str, str] = {
    # Zalando Research's own repository, which the Fashion-MNIST README links.
    "fashion-mnist": (
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/"
    ),
    # yann.lecun.com no longer serves the files reliably; this is the mirror
    # torchvision downloads from.
    "mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
}

# SHA-256 of the upstream .gz files. Fashion-MNIST's equal those of Debian's
# dataset-fashion-mnist package; MNIST's are those published by torchvision and
# TensorFlow Datasets for the original files.
SHA256: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": (
            "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"
        ),
        "train-labels-idx1-ubyte.gz": (
            "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"
        ),
        "t10k-images-idx3-ubyte.gz": (
            "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"
        ),
        "t10k-labels-idx1-ubyte.gz": (
            "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"
        ),
    },
    "mnist": {
        "train-images-idx3-ubyte.gz": (
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
        ),
        "train-labels-idx1-ubyte.gz": (
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
        ),
        "t10k-images-idx3-ubyte.gz": (
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
        ),
        "t10k-labels-idx1-ubyte.gz": (
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
        ),
    },
}

# Their sizes in bytes, so that a body cut off without a Content-Length is known to be
# short (and kept, to resume) rather than wrong. Fashion-MNIST's are those of Debian's
# files; MNIST's are those published with the hashes above.
SIZES: dict[str, dict[str, int]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": 26_421_856,
        "train-labels-idx1-ubyte.gz": 29_491,
        "t10k-images-idx3-ubyte.gz": 4_422_079,
        "t10k-labels-idx1-ubyte.gz": 5_125,
    },
    "mnist": {
        "train-images-idx3-ubyte.gz": 9_912_422,
        "train-labels-idx1-ubyte.gz": 28_881,
        "t10k-images-idx3-ubyte.gz": 1_648_877,
        "t10k-labels-idx1-ubyte.gz": 4_542,
    },
}

DATASET_NAMES = tuple(SHA256)

# The largest real file is 26 MB; a server sending far more is not sending it.
MAX_FILE_BYTES = 128 * 1024 * 1024
# A body that brings fewer bytes than this in any ``timeout`` seconds is given up on
# (keeping the part file): a server trickling a byte at a time never trips the
# per-read timeout, and would take hours. 1 KiB a minute is far below any real link.
MIN_BYTES_PER_TIMEOUT = 1024
# socket.settimeout overflows near 1e10 s; no download waits longer than this (11 days).
_MAX_TIMEOUT = 1e6
_CHUNK = 1 << 16

ProgressCallback = Callable[[str, int, int | None], None]


def default_cache_dir(name: str) -> Path:
    """Where :func:`download_dataset` stores ``name`` when no ``cache_dir`` is given.

    ``$SCRATCHNN_DATA/<name>`` when that variable is set, else
    ``$XDG_CACHE_HOME/scratchnn/<name>`` (``~/.cache/scratchnn/<name>``).
    A subfolder per dataset, because MNIST and Fashion-MNIST use the same file names.
    """
    _check_name(name)
    root = os.environ.get("SCRATCHNN_DATA")
    if root:
        return Path(root).expanduser() / name
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "scratchnn" / name


def download_dataset(
    name: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    base_url: str | None = None,
    progress: ProgressCallback | None = None,
    hashes: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download the four IDX files of ``name`` ("fashion-mnist" or "mnist"); return their folder.

    Files already in ``cache_dir`` with the right SHA-256 are not downloaded
    again. Each download goes to ``<file>.part`` and is moved into place only
    after its hash matches; a file that fails the check is deleted and
    ``ValueError`` names it. If a download is cut off, the ``.part`` file stays
    and the next call resumes it with an HTTP ``Range`` request, or starts over
    if the server ignores ranges or the resumed file fails its hash.

    Arguments:
        name: "fashion-mnist" or "mnist".
        cache_dir: where to store the files; default :func:`default_cache_dir`.
        base_url: the folder URL the file names are appended to (http or https);
            default ``DEFAULT_BASE_URLS[name]``.
        progress: called as ``progress(file_name, bytes_so_far, total_or_None)``
            while downloading.
        hashes: file name -> SHA-256 hex digest, replacing the pinned ``SHA256[name]``
            (for mirrors of other files, and tests). Every file must have one.
        timeout: seconds to wait on the network before giving up (0 < timeout <= 1e6): for
            an answer, for each read of the body, and for at least
            ``MIN_BYTES_PER_TIMEOUT`` (1 KiB) of the body, so that a server trickling
            bytes is given up on too.

    A file whose hash matches is kept even when fewer or more bytes arrived than
    the server's ``Content-Length`` said. One that does not match and is shorter
    than expected (``Content-Length``, else the pinned size when ``hashes`` is not
    given) counts as cut off: its ``.part`` file stays, to resume.

    Raises ``TypeError`` or ``ValueError`` naming the argument for a bad argument
    (an unknown name, a timeout that is no number in (0, 1e6], a progress that is not
    callable, a base_url that is not an http or https URL with a host), before any
    network work; ``ValueError`` for a hash mismatch; and ``ConnectionError`` naming
    the URL when the download fails (no server, an HTTP error such as 404, a reply
    that is not HTTP, no answer or under 1 KiB within ``timeout``) or is cut off;
    running again resumes it.
    """
    _check_name(name)
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds, got {type(timeout).__name__}")
    if not 0 < timeout <= _MAX_TIMEOUT:  # NaN fails this too
        raise ValueError(
            f"timeout must be a number of seconds in (0, {_MAX_TIMEOUT:g}], got {timeout!r}"
        )
    timeout = float(timeout)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be callable or None, got {type(progress).__name__}")
    expected_hashes = dict(SHA256[name] if hashes is None else hashes)
    for file_name in IDX_FILES:
        digest = expected_hashes.get(file_name, "")
        # A missing hash is a hard error: an unchecked download is never kept.
        if (
            not isinstance(digest, str)
            or len(digest) != 64
            or not all(c in "0123456789abcdef" for c in digest.lower())
        ):
            raise ValueError(f"no valid SHA-256 pinned for {name}/{file_name}: {digest!r}")
    base = DEFAULT_BASE_URLS[name] if base_url is None else base_url
    _check_base_url(base)
    sizes = SIZES[name] if hashes is None else {}  # other files' sizes are unknown
    if not base.endswith("/"):
        base += "/"

    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    for file_name in IDX_FILES:
        target = folder / file_name
        digest = expected_hashes[file_name].lower()
        if target.is_file() and _sha256(target) == digest:
            continue
        _fetch_verified(
            base + file_name, target, digest, sizes.get(file_name), progress, timeout
        )
    return folder


def _check_name(name: str) -> None:
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    if name not in SHA256:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASET_NAMES)}")


def _check_base_url(base: object) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``base`` unless it is an http(s) URL with a host."""
    if not isinstance(base, str):
        raise TypeError(f"base_url must be a str, got {type(base).__name__}")
    # urllib sends the URL as ASCII and http.client refuses spaces and control
    # characters: say so here, naming the URL, not as a codec error mid-request.
    if not base.isascii() or not base.isprintable() or " " in base:
        raise ValueError(
            f"base_url {base!r} holds characters a URL cannot (non-ASCII, spaces or "
            "control characters): percent-encode them"
        )
    try:
        parts = urllib.parse.urlsplit(base)
        host, _port = parts.hostname, parts.port  # .port raises for a port out of range
    except ValueError as error:  # "Invalid IPv6 URL" alone names no URL
        raise ValueError(f"base_url {base!r} is not a valid URL: {error}") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"base_url must be an http or https URL, got {base!r}")
    if not host:
        raise ValueError(f"base_url {base!r} names no host")


def _fetch_verified(
    url: str,
    target: Path,
    digest: str,
    size: int | None,
    progress: ProgressCallback | None,
    timeout: float,
) -> None:
    """Download ``url`` into ``target`` through ``target.part``, resuming if possible.

    ``size`` is the file's pinned size in bytes, or None when unknown.
    """
    part = target.with_name(target.name + ".part")
    resumed = part.is_file() and part.stat().st_size > 0
    # The size the server announced, else (no Content-Length, a chunked body) the pinned one.
    expected = _download_to(url, part, progress, timeout, resume=resumed) or size
    if _sha256(part) != digest and resumed and not _is_short(part, expected):
        # The old bytes may come from another version of the file; start over once.
        part.unlink()
        expected = _download_to(url, part, progress, timeout, resume=False) or size
    actual = _sha256(part)
    if actual == digest:
        # Whatever Content-Length said: a lying header must not refuse the right file.
        os.replace(part, target)
        return
    received = part.stat().st_size
    if _is_short(part, expected):
        # A prefix the next run can complete with a Range request: keep it.
        raise ConnectionError(
            f"download of {url} was cut off after {received} of {expected} bytes; "
            f"run again to resume from {part}"
        )
    part.unlink()
    raise ValueError(
        f"{target.name} downloaded from {url} has SHA-256 {actual} ({received} bytes), "
        f"expected {digest}; the file was deleted"
    )


def _is_short(part: Path, expected: int | None) -> bool:
    return expected is not None and part.stat().st_size < expected


def _download_to(
    url: str, part: Path, progress: ProgressCallback | None, timeout: float, *, resume: bool
) -> int | None:
    """Write ``url``'s body to ``part``, appending from its current size when ``resume``;
    return the file's full size as the server announced it, or None when it did not."""
    offset = part.stat().st_size if resume else 0
    headers = {"User-Agent": "scratchnn"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        request = urllib.request.Request(url, headers=headers)
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        error.close()  # it holds the connection; the caller needs only the status
        if error.code != 416 or not offset:
            # "HTTP Error 404: Not Found" alone names no file.
            raise ConnectionError(
                f"cannot download {url}: HTTP {error.code} {_one_line(error.reason)}"
            ) from error
        # 416: the range starts at or past the end, so the part file is of no use.
        return _download_to(url, part, progress, timeout, resume=False)
    except urllib.error.URLError as error:
        # "<urlopen error [Errno -2] Name or service not known>" alone names no address.
        raise ConnectionError(f"cannot download {url}: {_one_line(error.reason)}") from error
    except http.client.HTTPException as error:
        # A reply that is not HTTP (BadStatusLine, LineTooLong) is no OSError of itself.
        raise ConnectionError(f"cannot download {url}: {_one_line(repr(error))}") from error
    except OSError as error:
        # A server that accepts and never answers: the bare TimeoutError says only "timed out".
        raise ConnectionError(f"cannot download {url}: {_reason(error, timeout)}") from error
    with response:
        if offset and response.status == 206:
            if _range_start(response.headers.get("Content-Range", "")) != offset:
                response.close()
                return _download_to(url, part, progress, timeout, resume=False)
            mode, done = "ab", offset
        else:
            # The server ignored the range (200 and the whole file): start over.
            mode, done = "wb", 0
        length = response.headers.get("Content-Length", "")
        # A chunked body's Content-Length means nothing (RFC 9112, 6.3); http.client
        # ignores it too.
        chunked = "chunked" in response.headers.get("Transfer-Encoding", "").lower()
        total = done + int(length) if length.isdigit() and not chunked else None
        name = part.name.removesuffix(".part")
        window_start, window_bytes = time.monotonic(), 0
        with open(part, mode) as out:
            while chunk := _read_chunk(response, url, part, done, timeout):
                done += len(chunk)
                if done > MAX_FILE_BYTES:
                    break
                out.write(chunk)
                if progress is not None:
                    progress(name, done, total)
                window_bytes += len(chunk)
                if time.monotonic() - window_start >= timeout:
                    if window_bytes < MIN_BYTES_PER_TIMEOUT:
                        raise ConnectionError(
                            f"download of {url} was cut off after {done} bytes (under "
                            f"{MIN_BYTES_PER_TIMEOUT} bytes in {timeout:g} s); "
                            f"run again to resume from {part}"
                        )
                    window_start, window_bytes = time.monotonic(), 0
    if done > MAX_FILE_BYTES:
        part.unlink()
        raise ValueError(f"{url} is larger than {MAX_FILE_BYTES} bytes; not kept")
    # http.client returns b"" rather than raising when a body ends early: the caller
    # compares the size with ``total`` once it has checked the hash.
    return total


def _read_chunk(
    response: http.client.HTTPResponse, url: str, part: Path, done: int, timeout: float
) -> bytes:
    """The body's next chunk; a stalled, reset or malformed body is a ``ConnectionError``
    naming the URL (the part file stays, to resume from). Errors writing the part file
    are not caught here: a full disk is no network failure."""
    try:
        # read1: what has arrived, so a stall after it loses none of it.
        return response.read1(_CHUNK)
    except (http.client.HTTPException, OSError) as error:
        # IncompleteRead is no OSError, and a TimeoutError alone names no URL.
        reason = _reason(error, timeout) if isinstance(error, OSError) else _one_line(repr(error))
        raise ConnectionError(
            f"download of {url} was cut off after {done} bytes ({reason}); "
            f"run again to resume from {part}"
        ) from error


def _reason(error: OSError, timeout: float) -> str:
    if isinstance(error, TimeoutError):
        return f"no answer within the timeout of {timeout:g} s"
    return _one_line(error) or type(error).__name__


def _one_line(text: object) -> str:
    """``text`` as one printable line: whitespace runs become one space, other control
    characters their escapes. Reason phrases come from the server, and must neither
    break an error into lines nor reach a terminal as escape codes."""
    flat = " ".join(str(text).split())
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in flat)


def _range_start(content_range: str) -> int | None:
    """The first byte position in a ``Content-Range: bytes a-b/n`` header."""
    unit, _, rest = content_range.partition(" ")
    start = rest.partition("-")[0]
    return int(start) if unit == "bytes" and start.isdigit() else None


def _sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()
