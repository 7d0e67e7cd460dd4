"""download_dataset against a local HTTP server: verified, resumable, never keeps a bad file."""

from __future__ import annotations

import gzip
import hashlib
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from scratchnn.data import default_cache_dir, download_dataset, load_mnist
from scratchnn.data.download import IDX_FILES, SHA256

BIG = "train-images-idx3-ubyte.gz"


class FileServer(ThreadingHTTPServer):
    """Serves ``files`` by name; ``cut_after[name] = n`` hangs up n bytes into the next reply."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), RangeHandler)
        self.files: dict[str, bytes] = {}
        self.cut_after: dict[str, int] = {}
        self.supports_range = True
        self.requests: list[tuple[str, str | None]] = []

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
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        cut = self.server.cut_after.pop(name, None)
        self.wfile.write(payload if cut is None else payload[:cut])

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
    assert set(SHA256) == {"fashion-mnist", "mnist"}
    for pins in SHA256.values():
        assert set(pins) == set(IDX_FILES)
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in pins.values())
    debian = Path("/usr/share/datasets/fashion-mnist")
    if not debian.is_dir():
        pytest.skip(f"{debian} absent: cannot compare the Fashion-MNIST pins with Debian's files")
    assert (
        hashes_of({name: (debian / name).read_bytes() for name in IDX_FILES})
        == SHA256["fashion-mnist"]
    )


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
