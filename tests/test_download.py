"""ensure_files against a real HTTP server on 127.0.0.1 serving archives the tests build."""

from __future__ import annotations

import functools
import hashlib
import socket
import threading
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kar.data.download import DownloadError, ensure_files

MEMBERS = {
    "ml-100k/u.data": b"1\t10\t5\t100\n2\t20\t3\t200\n",
    "ml-100k/u.item": b"10|Some Movie (1995)|...\n",
    "ml-100k/README": b"not needed\n",
}


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass


class TruncatingHandler(QuietHandler):
    """Promises 10,000 bytes, sends 10, hangs up: a download cut off mid-way."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "10000")
        self.end_headers()
        self.wfile.write(b"PK\x03\x04partial")
        self.wfile.flush()
        self.close_connection = True


def _serve(handler: type, directory: Path) -> Iterator[str]:
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(directory))
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(folder the server serves, its base URL)."""
    folder = tmp_path / "served"
    folder.mkdir()
    yield from ((folder, url) for url in _serve(QuietHandler, folder))


def make_zip(path: Path, members: dict[str, bytes]) -> str:
    with zipfile.ZipFile(path, "w") as bundle:
        for name, content in members.items():
            bundle.writestr(name, content)
    return hashlib.md5(path.read_bytes()).hexdigest()


def closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/ml-100k.zip"


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_download_extracts_only_the_required_files(served, tmp_path):
    folder, base = served
    md5 = make_zip(folder / "ml-100k.zip", MEMBERS)
    root = tmp_path / "data" / "ml-100k"

    ensure_files(
        root, ["u.data", "u.item"], url=f"{base}/ml-100k.zip", md5=md5, archive_subdir="ml-100k"
    )

    assert (root / "u.data").read_bytes() == MEMBERS["ml-100k/u.data"]
    assert (root / "u.item").read_bytes() == MEMBERS["ml-100k/u.item"]
    assert leftovers(root) == ["u.data", "u.item"]  # no archive, temp file or README left


def test_present_files_need_no_download(tmp_path):
    (tmp_path / "u.data").write_bytes(b"mine")
    ensure_files(tmp_path, ["u.data"], url=closed_port_url(), md5="0" * 32, archive_subdir="x")
    assert (tmp_path / "u.data").read_bytes() == b"mine"


def test_only_missing_files_are_extracted(served, tmp_path):
    folder, base = served
    md5 = make_zip(folder / "a.zip", MEMBERS)
    (tmp_path / "u.data").write_bytes(b"local copy")

    ensure_files(
        tmp_path, ["u.data", "u.item"], url=f"{base}/a.zip", md5=md5, archive_subdir="ml-100k"
    )

    assert (tmp_path / "u.data").read_bytes() == b"local copy"
    assert (tmp_path / "u.item").read_bytes() == MEMBERS["ml-100k/u.item"]


def test_checksum_mismatch_names_both_sums_and_keeps_nothing(served, tmp_path):
    folder, base = served
    actual = make_zip(folder / "a.zip", MEMBERS)
    expected = hashlib.md5(b"another archive").hexdigest()
    root = tmp_path / "ml-100k"

    with pytest.raises(DownloadError) as err:
        ensure_files(root, ["u.data"], url=f"{base}/a.zip", md5=expected, archive_subdir="ml-100k")

    message = str(err.value)
    assert expected in message and actual in message and "retry" in message
    assert leftovers(root) == []


def test_unreachable_server_names_files_folder_and_env_var(tmp_path):
    root = tmp_path / "ml-100k"
    with pytest.raises(FileNotFoundError) as err:
        ensure_files(
            root, ["u.data", "u.item"], url=closed_port_url(), md5=None, archive_subdir="ml-100k"
        )
    message = str(err.value)
    assert str(root) in message and "u.data" in message and "u.item" in message
    assert "KAR_DATA_DIR" in message
    assert leftovers(root) == []


def test_http_error_is_a_clear_missing_file_error(served, tmp_path):
    _, base = served
    root = tmp_path / "ml-100k"
    with pytest.raises(FileNotFoundError, match="404"):
        ensure_files(root, ["u.data"], url=f"{base}/nope.zip", md5=None, archive_subdir="")
    assert leftovers(root) == []


def test_interrupted_download_leaves_no_partial_file(tmp_path):
    root = tmp_path / "ml-100k"
    for base in _serve(TruncatingHandler, tmp_path):
        with pytest.raises(FileNotFoundError, match=str(root)):
            ensure_files(root, ["u.data"], url=f"{base}/a.zip", md5=None, archive_subdir="ml-100k")
    assert leftovers(root) == []


def test_no_url_tells_where_to_put_the_files(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        ensure_files(tmp_path, ["u.data"], url=None, md5=None, archive_subdir="ml-100k")
    assert str(tmp_path) in str(err.value) and "KAR_DATA_DIR" in str(err.value)


def test_archive_without_the_member_is_an_error(served, tmp_path):
    folder, base = served
    md5 = make_zip(folder / "a.zip", MEMBERS)
    root = tmp_path / "ml-100k"
    with pytest.raises(DownloadError, match=r"ml-100k/u\.user"):
        ensure_files(root, ["u.user"], url=f"{base}/a.zip", md5=md5, archive_subdir="ml-100k")
    assert leftovers(root) == []


def test_a_file_that_is_not_a_zip_is_an_error(served, tmp_path):
    folder, base = served
    (folder / "page.html").write_text("<html>login</html>")
    root = tmp_path / "ml-100k"
    with pytest.raises(DownloadError, match="zip"):
        ensure_files(root, ["u.data"], url=f"{base}/page.html", md5=None, archive_subdir="ml-100k")
    assert leftovers(root) == []
