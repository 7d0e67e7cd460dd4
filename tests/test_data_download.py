"""download_dataset against a local HTTP server: verified, resumable, never keeps a bad file."""

from __future__ import annotations

import gzip
import hashlib
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from scratchnn.data import default_cache_dir, download, download_dataset, load_mnist
from scratchnn.data.download import IDX_FILES, SHA256

BIG = "train-images-idx3-ubyte.gz"


class FileServer(ThreadingHTTPServer):
    """Serves ``files`` by name; ``cut_after[name] = n`` hangs up n bytes into the next reply.

    Misbehaviours, by file name: ``extra_length`` adds to the Content-Length sent,
    ``chunked`` sends the body chunked with a Content-Length twice too large,
    ``no_length`` sends no Content-Length, ``trickle`` sends a byte per that many
    seconds, ``status`` replies with that code and reason phrase, ``redirect_loop``
    redirects to itself.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files: dict[str, bytes] = {}
        self.cut_after: dict[str, int] = {}
        self.supports_range = True
        self.requests: list[tuple[str, str | None]] = []
        self.extra_length: dict[str, int] = {}
        self.chunked: set[str] = set()
        self.no_length: set[str] = set()
        self.trickle: dict[str, float] = {}
        self.status: dict[str, tuple[int, str]] = {}
        self.redirect_loop: set[str] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/data/"


class RangeHandler(BaseHTTPRequestHandler):
    server: FileServer

    def do_GET(self) -> None:
        name = self.path.rsplit("/", 1)[-1]
        requested = self.headers.get("Range")
        self.server.requests.append((name, requested))
        body = self.server.files.get(name)
        if name in self.server.status:
            self.send_response(*self.server.status[name])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if name in self.server.redirect_loop:
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if body is None:
            self.send_error(404)
            return
        start = 0
        if requested and self.server.supports_range:
            start = int(requested.removeprefix("bytes=").removesuffix("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        cut = self.server.cut_after.pop(name, None)
        sent = payload if cut is None else payload[:cut]
        if name in self.server.chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Content-Length", str(2 * len(payload)))  # to be ignored
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(sent), sent))
            return
        if name not in self.server.no_length:
            length = len(payload) + self.server.extra_length.get(name, 0)
            self.send_header("Content-Length", str(length))
        self.end_headers()
        if name in self.server.trickle:
            for byte in sent:
                try:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                except OSError:  # the client gave up
                    return
                time.sleep(self.server.trickle[name])
            return
        self.wfile.write(sent)

    def log_message(self, format: str, *args: object) -> None:
        pass  # keep test output clean


@pytest.fixture
def server() -> Iterator[FileServer]:
    httpd = FileServer()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture
def files(server: FileServer) -> dict[str, bytes]:
    """Four gzip IDX files of a tiny dataset; the first is large enough to take many chunks."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": (rng.integers(0, 256, (300, 28, 28)), 3),
        "train-labels-idx1-ubyte.gz": (rng.integers(0, 10, 300), 1),
        "t10k-images-idx3-ubyte.gz": (rng.integers(0, 256, (7, 28, 28)), 3),
        "t10k-labels-idx1-ubyte.gz": (rng.integers(0, 10, 7), 1),
    }
    for name, (array, ndim) in arrays.items():
        header = bytes([0, 0, 8, ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
        server.files[name] = gzip.compress(header + array.astype(np.uint8).tobytes())
    assert len(server.files[BIG]) > 200_000
    return dict(server.files)


def hashes_of(files: dict[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def fetch(server: FileServer, files: dict[str, bytes], folder: Path, **kwargs: object) -> Path:
    options: dict = {"base_url": server.url, "hashes": hashes_of(files), "timeout": 10.0}
    return download_dataset("mnist", folder, **{**options, **kwargs})


def assert_complete(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (folder / name).read_bytes() == data
    assert not list(folder.glob("*.part"))


def test_downloads_verifies_and_loads(
    server: FileServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    seen: list[tuple[str, int, int | None]] = []
    folder = fetch(server, files, tmp_path / "cache", progress=lambda *a: seen.append(a))
    assert folder == tmp_path / "cache"
    assert_complete(folder, files)
    assert [name for name, _ in server.requests] == list(IDX_FILES)
    assert (BIG, len(files[BIG]), len(files[BIG])) in seen
    (x_train, t_train), (x_test, _) = load_mnist(folder)
    assert x_train.shape == (300, 784) and t_train.shape == (300,) and x_test.shape == (7, 784)


def test_repeat_run_downloads_nothing(
    server: FileServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    fetch(server, files, tmp_path)
    server.requests.clear()
    fetch(server, files, tmp_path)
    assert server.requests == []
    assert_complete(tmp_path, files)


def test_corrupted_file_is_rejected_and_not_kept(
    server: FileServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    server.files["t10k-labels-idx1-ubyte.gz"] = files["t10k-labels-idx1-ubyte.gz"][:-1] + b"!"
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte\.gz .* has SHA-256 .* deleted"):
        fetch(server, files, tmp_path)
    assert not (tmp_path / "t10k-labels-idx1-ubyte.gz").exists()
    assert not list(tmp_path.glob("*.part"))
    assert (tmp_path / BIG).read_bytes() == files[BIG]  # files that passed are kept


def test_interrupted_download_resumes_with_a_range_request(
    server: FileServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    server.cut_after[BIG] = 100_000
    with pytest.raises(ConnectionError, match="cut off after 100000 of"):
        fetch(server, files, tmp_path)
    assert (tmp_path / f"{BIG}.part").stat().st_size == 100_000
    assert not (tmp_path / BIG).exists()

    server.requests.clear()
    fetch(server, files, tmp_path)
    assert server.requests[0] == (BIG, "bytes=100000-")
    assert_complete(tmp_path, files)


def test_server_without_range_support_restarts_cleanly(
    server: FileServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    (tmp_path / f"{BIG}.part").write_bytes(files[BIG][:5000])
    server.supports_range = False
    fetch(server, files, tmp_path)
    assert server.requests[0] == (BIG, "bytes=5000-")  # asked, got the whole file (200)
    assert_complete(tmp_path, files)


def test_resumed_file_failing_its_hash_is_downloaded_again(
    server: FileServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    (tmp_path / f"{BIG}.part").write_bytes(b"\xff" * 5000)  # not a prefix of the real file
    fetch(server, files, tmp_path)
    assert [r for r in server.requests if r[0] == BIG] == [(BIG, "bytes=5000-"), (BIG, None)]
    assert_complete(tmp_path, files)


def test_part_file_longer_than_the_file_restarts(
    server: FileServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    (tmp_path / f"{BIG}.part").write_bytes(files[BIG] + b"extra")
    fetch(server, files, tmp_path)
    assert [r[1] for r in server.requests if r[0] == BIG] == [f"bytes={len(files[BIG]) + 5}-", None]
    assert_complete(tmp_path, files)


def test_existing_file_with_wrong_hash_is_replaced(
    server: FileServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    (tmp_path / BIG).write_bytes(b"stale")
    fetch(server, files, tmp_path)
    assert_complete(tmp_path, files)


def test_missing_file_on_server_names_the_url_and_status(
    server: FileServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    del server.files["t10k-images-idx3-ubyte.gz"]
    url = f"{server.url}t10k-images-idx3-ubyte.gz"
    with pytest.raises(ConnectionError, match=f"cannot download {url}: HTTP 404 Not Found"):
        fetch(server, files, tmp_path)
    assert not (tmp_path / "t10k-images-idx3-ubyte.gz").exists()


@pytest.mark.parametrize(
    "reply", [b"HELLO THERE\r\n\r\n", b"HTTP/1.0 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n"]
)
def test_a_reply_that_is_not_http_is_a_connection_error(
    files: dict[str, bytes], tmp_path: Path, reply: bytes
) -> None:
    # http.client raises BadStatusLine / LineTooLong, which are not OSErrors.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]

        def answer() -> None:
            for _ in range(4):
                try:
                    connection, _ = listener.accept()
                except OSError:
                    return
                with connection:
                    connection.recv(65536)
                    connection.sendall(reply)

        threading.Thread(target=answer, daemon=True).start()
        base = f"http://127.0.0.1:{port}/m/"
        with pytest.raises(ConnectionError, match=f"cannot download {base}\\S+: "):
            download_dataset("mnist", tmp_path, base_url=base, hashes=hashes_of(files))
    assert not any(tmp_path.glob("*.gz"))


@pytest.mark.parametrize("sent", [b"", b"HTTP/1.0 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000])
def test_a_server_that_stops_answering_is_a_connection_error_naming_the_url(
    files: dict[str, bytes], tmp_path: Path, sent: bytes
) -> None:
    # It accepts, sends ``sent`` (nothing, or a reply's first 1000 bytes) and falls silent:
    # the socket's timeout fires, which alone would say only "timed out".
    held: list[socket.socket] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]

        def answer() -> None:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            held.append(connection)
            connection.recv(65536)
            connection.sendall(sent)

        threading.Thread(target=answer, daemon=True).start()
        base = f"http://127.0.0.1:{port}/m/"
        with pytest.raises(ConnectionError) as raised:
            download_dataset("mnist", tmp_path, base_url=base, hashes=hashes_of(files), timeout=0.5)
    for connection in held:
        connection.close()
    message = str(raised.value)
    assert f"{base}{BIG}" in message
    assert "no answer within the timeout of 0.5 s" in message
    if sent:
        # Cut off mid-body: the bytes so far stay in the part file, to resume from.
        assert "cut off after 1000 bytes" in message
        assert (tmp_path / f"{BIG}.part").read_bytes() == b"x" * 1000
    assert not (tmp_path / BIG).exists()


def test_unreachable_server_names_the_url(files: dict[str, bytes], tmp_path: Path) -> None:
    # A port nobody listens on: the connection is refused at once, offline or not.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}/mirror/"
    with pytest.raises(ConnectionError, match=f"cannot download {base}\\S+\\.gz: "):
        download_dataset("mnist", tmp_path, base_url=base, hashes=hashes_of(files))

def test_bad_arguments_fail_before_any_request(
    server: FileServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'"):
        download_dataset("cifar10", tmp_path, base_url=server.url)
    incomplete = hashes_of(files)
    del incomplete[BIG]
    with pytest.raises(ValueError, match=f"no valid SHA-256 pinned for mnist/{BIG}"):
        download_dataset("mnist", tmp_path, base_url=server.url, hashes=incomplete)
    with pytest.raises(ValueError, match="no valid SHA-256"):
        download_dataset("mnist", tmp_path, base_url=server.url, hashes={**incomplete, BIG: "TODO"})
    as_bytes = {name: digest.encode() for name, digest in hashes_of(files).items()}
    with pytest.raises(ValueError, match="no valid SHA-256"):
        download_dataset("mnist", tmp_path, base_url=server.url, hashes=as_bytes)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="http or https"):
        download_dataset("mnist", tmp_path, base_url="file:///etc/", hashes=hashes_of(files))
    assert server.requests == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": ["mnist"]}, TypeError, "name must be a str, got list"),
        ({"name": None}, TypeError, "name must be a str"),
        ({"timeout": 0}, ValueError, r"timeout must be a number of seconds in \(0, 1e\+06\], got 0"),
        ({"timeout": -1}, ValueError, "timeout must be"),
        ({"timeout": math.nan}, ValueError, "timeout must be .* got nan"),
        ({"timeout": math.inf}, ValueError, "timeout must be .* got inf"),
        ({"timeout": 1e12}, ValueError, "timeout must be"),  # socket.settimeout overflows
        ({"timeout": "5"}, TypeError, "timeout must be a number of seconds, got str"),
        ({"timeout": True}, TypeError, "timeout must be a number of seconds, got bool"),
        ({"progress": "x"}, TypeError, "progress must be callable or None, got str"),
        ({"base_url": b"http://127.0.0.1/"}, TypeError, "base_url must be a str, got bytes"),
        ({"base_url": "http:///data/"}, ValueError, "base_url 'http:///data/' names no host"),
        ({"base_url": "http://[::1/"}, ValueError, r"base_url 'http://\[::1/' is not a valid URL: Invalid IPv6"),
        ({"base_url": "http://127.0.0.1:99999/"}, ValueError, "not a valid URL: Port out of range"),
        ({"base_url": "http://127.0.0.1/dätä/"}, ValueError, "base_url 'http://127.0.0.1/dätä/' holds characters"),
        ({"base_url": "http://127.0.0.1/a b/"}, ValueError, "holds characters a URL cannot"),
    ],
)
def test_bad_arguments_are_named_before_any_network_work(
    server: FileServer,
    files: dict[str, bytes],
    tmp_path: Path,
    kwargs: dict[str, object],
    error: type[Exception],
    match: str,
) -> None:
    options: dict = {"name": "mnist", "base_url": server.url, "hashes": hashes_of(files), "timeout": 10.0}
    options.update(kwargs)
    name = options.pop("name")
    with pytest.raises(error, match=match):
        download_dataset(name, tmp_path / "cache", **options)
    assert server.requests == []
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("lie", ["Content-Length too long", "chunked with a Content-Length"])
def test_a_file_whose_hash_matches_is_kept_whatever_content_length_said(
    server: FileServer, files: dict[str, bytes], tmp_path: Path, lie: str
) -> None:
    # Counting on Content-Length first reported the whole, right file as cut off, and
    # every rerun (416, then the whole file again) failed the same way.
    if lie == "chunked with a Content-Length":
        server.chunked.add(BIG)  # whose Content-Length must be ignored (RFC 9112)
    else:
        server.extra_length[BIG] = 10
    fetch(server, files, tmp_path)
    assert_complete(tmp_path, files)
    assert [r for r in server.requests if r[0] == BIG] == [(BIG, None)]


def test_a_cut_off_body_without_content_length_is_kept_to_resume_when_its_size_is_pinned(
    server: FileServer, files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(SHA256, "mnist", hashes_of(files))
    monkeypatch.setitem(download.SIZES, "mnist", {name: len(data) for name, data in files.items()})
    server.no_length.add(BIG)
    server.cut_after[BIG] = 100_000
    with pytest.raises(ConnectionError, match=f"cut off after 100000 of {len(files[BIG])} bytes"):
        download_dataset("mnist", tmp_path, base_url=server.url, timeout=10.0)
    assert (tmp_path / f"{BIG}.part").stat().st_size == 100_000

    server.requests.clear()
    download_dataset("mnist", tmp_path, base_url=server.url, timeout=10.0)
    assert server.requests[0] == (BIG, "bytes=100000-")
    assert_complete(tmp_path, files)


def test_a_cut_off_body_of_unknown_size_is_deleted_saying_how_much_arrived(
    server: FileServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    # With hashes= the sizes are unknown: nothing tells a short file from a wrong one.
    server.no_length.add(BIG)
    server.cut_after[BIG] = 100_000
    with pytest.raises(ValueError, match=r"has SHA-256 \w+ \(100000 bytes\), expected .* deleted"):
        fetch(server, files, tmp_path)
    assert not list(tmp_path.glob("*.part"))


def test_a_server_trickling_bytes_is_given_up_on_keeping_the_part_file(
    server: FileServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    # A byte every 20 ms never trips the 0.5 s read timeout, and would take an hour.
    server.trickle[BIG] = 0.02
    start = time.monotonic()

    def give_up(name: str, done: int, total: int | None) -> None:
        if time.monotonic() - start > 10:
            raise AssertionError("still downloading after 10 s: nothing stops a trickle")

    with pytest.raises(ConnectionError) as raised:
        fetch(server, files, tmp_path, timeout=0.5, progress=give_up)
    message = str(raised.value)
    assert f"{server.url}{BIG} was cut off after" in message
    assert "(under 1024 bytes in 0.5 s); run again to resume" in message
    assert 0 < (tmp_path / f"{BIG}.part").stat().st_size < 1024


@pytest.mark.parametrize("misbehaviour", ["escape codes in the reason", "redirect loop"])
def test_server_text_in_errors_is_reduced_to_one_printable_line(
    server: FileServer, files: dict[str, bytes], tmp_path: Path, misbehaviour: str
) -> None:
    if misbehaviour == "redirect loop":
        server.redirect_loop.add(BIG)  # urllib's message on it holds two newlines
        expected = (
            "HTTP 302 The HTTP server returned a redirect error that would lead to an infinite "
            "loop. The last 30x error message was: Found"
        )
    else:
        server.status[BIG] = (500, "Internal\x1b[31m Error")
        expected = "HTTP 500 Internal\\x1b[31m Error"
    with pytest.raises(ConnectionError) as raised:
        fetch(server, files, tmp_path)
    message = str(raised.value)
    assert message.isprintable(), message  # no newline, no escape character
    assert message == f"cannot download {server.url}{BIG}: {expected}"


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SCRATCHNN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir("mnist") == tmp_path / "xdg" / "scratchnn" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert (
        default_cache_dir("fashion-mnist") == Path.home() / ".cache" / "scratchnn" / "fashion-mnist"
    )
    monkeypatch.setenv("SCRATCHNN_DATA", str(tmp_path / "data"))
    assert default_cache_dir("mnist") == tmp_path / "data" / "mnist"


def test_download_without_cache_dir_uses_the_default(
    server: FileServer, files: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCRATCHNN_DATA", str(tmp_path))
    folder = download_dataset("mnist", base_url=server.url, hashes=hashes_of(files), timeout=10.0)
    assert folder == tmp_path / "mnist"
    assert_complete(folder, files)


def test_pinned_hashes() -> None:
    assert set(SHA256) == set(download.SIZES) == {"fashion-mnist", "mnist"}
    for pins in SHA256.values():
        assert set(pins) == set(IDX_FILES)
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in pins.values())
    for sizes in download.SIZES.values():
        assert set(sizes) == set(IDX_FILES)
    debian = Path("/usr/share/datasets/fashion-mnist")
    if not debian.is_dir():
        pytest.skip(f"{debian} absent: cannot compare the Fashion-MNIST pins with Debian's files")
    assert (
        hashes_of({name: (debian / name).read_bytes() for name in IDX_FILES})
        == SHA256["fashion-mnist"]
    )
    assert {name: (debian / name).stat().st_size for name in IDX_FILES} == download.SIZES["fashion-mnist"]


def test_cli_download_with_the_pinned_hashes(
    server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The Debian package ships the upstream files, so serving them exercises the
    # real pinned SHA-256s end to end through `scratchnn data download`.
    debian = Path("/usr/share/datasets/fashion-mnist")
    if not (debian / BIG).exists():
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    from scratchnn.cli import main

    for name in IDX_FILES:
        server.files[name] = (debian / name).read_bytes()
    target = tmp_path / "cache"
    assert main(["data", "download", "fashion-mnist", "--base-url", server.url, "--dir", str(target)]) == 0
    printed = capsys.readouterr().out
    assert str(target) in printed
    for name in IDX_FILES:
        assert (target / name).read_bytes() == (debian / name).read_bytes()
    server.files[BIG] = server.files[BIG][:-1] + b"\x00"  # a corrupted mirror, into a fresh folder
    assert main(["data", "download", "fashion-mnist", "--base-url", server.url, "--dir", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert BIG in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad" / BIG).exists()


def test_cli_download_refuses_an_empty_dir(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from scratchnn.cli import main

    monkeypatch.chdir(tmp_path)  # where Path("") would have put the files
    assert main(["data", "download", "mnist", "--dir", "", "--base-url", server.url]) == 2
    err = capsys.readouterr().err
    assert err == "scratchnn data download: error: --dir is empty: name the folder to download into\n"
    assert server.requests == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["http://[::1/", "http://127.0.0.1/dätä/"])
def test_cli_download_names_a_malformed_base_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    from scratchnn.cli import main

    assert main(["data", "download", "mnist", "--dir", str(tmp_path), "--base-url", url]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert err.startswith(f"scratchnn data download: error: base_url {url!r} ")
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_cli_download_is_one_line_exit_130_and_keeps_the_part_file(
    server: FileServer, files: dict[str, bytes], tmp_path: Path
) -> None:
    server.trickle[BIG] = 0.01  # 100 bytes/s: slow, but not slow enough for the stall guard
    target = tmp_path / "cache"
    part = target / f"{BIG}.part"
    # SIGINT's default handler, restored: a shell's background job starts with it ignored.
    code = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from scratchnn.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = ["data", "download", "mnist", "--dir", str(target), "--base-url", server.url]
    with subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        deadline = time.monotonic() + 60
        while not part.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # some bytes in
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    assert child.returncode == 130, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.strip().startswith("interrupted; ")
    assert f"run scratchnn data download mnist --dir {target} --base-url {server.url} again to resume" in err
    assert part.stat().st_size > 0
