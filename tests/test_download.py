"""The downloader against a loopback HTTP server serving a zip of a miniature cohen layout."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import socket
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from covidcxr.data import download as dl
from covidcxr.data.catalogue import DATABASES, default_sources
from covidcxr.data.sources import LAYOUTS, load_source
from test_sources import build_cohen

ARCHIVE_PATH = "/covid-chestxray-dataset-master.zip"


class Handler(BaseHTTPRequestHandler):
    """Serves server.files; honours Range when server.ranges is on; cuts the next answer short when
    server.cut_at is set (a connection that breaks mid-download)."""

    server: LoopbackServer

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.server.files.get(self.path)
        asked = self.headers.get("Range")
        self.server.requests.append((self.path, asked))
        if body is None:
            self.send_error(404)
            return
        start = int(asked.removeprefix("bytes=").split("-")[0]) if asked and self.server.ranges else 0
        if start >= len(body) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        cut, self.server.cut_at = self.server.cut_at, None
        self.wfile.write(payload[:cut] if cut else payload)

    def log_message(self, *args: object) -> None:
        pass


class LoopbackServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.ranges = True
        self.cut_at: int | None = None

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


@pytest.fixture
def server() -> Iterator[LoopbackServer]:
    srv = LoopbackServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def github_style_zip(tmp: Path) -> bytes:
    """A zip of a miniature cohen layout under one top-level folder, as GitHub's archives have."""
    root = build_cohen(tmp)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path in sorted(root.rglob("*")):
            zf.write(path, Path("covid-chestxray-dataset-master") / path.relative_to(root))
    return buffer.getvalue()


@pytest.fixture
def cohen_zip(tmp_path, server) -> bytes:
    body = github_style_zip(tmp_path / "src")
    server.files[ARCHIVE_PATH] = body
    return body


def fetch(to: Path, server: LoopbackServer) -> list[Path]:
    return dl.download(to, ["cohen"], base_url_override={"cohen": server.url(ARCHIVE_PATH)})


def test_download_unpacks_into_the_adapter_layout(tmp_path, server, cohen_zip):
    to = tmp_path / "data"
    assert fetch(to, server) == [to / "cohen"]
    assert (to / "cohen" / "metadata.csv").is_file()  # the top-level folder is stripped
    df, layout = load_source(to / "cohen")
    assert layout == "cohen" and len(df) == 4
    archive = to / dl.DOWNLOADS / "cohen.zip"
    assert archive.read_bytes() == cohen_zip
    recorded = (to / dl.DOWNLOADS / "cohen.zip.sha256").read_text().split()[0]
    assert recorded == hashlib.sha256(cohen_zip).hexdigest()


def test_finished_database_is_skipped(tmp_path, server, cohen_zip):
    to = tmp_path / "data"
    fetch(to, server)
    n_requests = len(server.requests)
    assert fetch(to, server) == [to / "cohen"]
    assert len(server.requests) == n_requests


def test_kept_archive_is_verified_before_reuse(tmp_path, server, cohen_zip):
    to = tmp_path / "data"
    fetch(to, server)
    n_requests = len(server.requests)
    archive = to / dl.DOWNLOADS / "cohen.zip"
    (to / "cohen").rename(tmp_path / "moved")
    fetch(to, server)  # unpacked again from the kept archive, no new request
    assert len(server.requests) == n_requests and (to / "cohen" / "metadata.csv").is_file()
    (to / "cohen").rename(tmp_path / "moved-again")
    archive.write_bytes(archive.read_bytes()[:-1] + b"x")
    with pytest.raises(dl.DownloadError, match="differs from the recorded"):
        fetch(to, server)
    assert not archive.exists() and not (to / "cohen").exists()


def test_checksum_mismatch_leaves_nothing_complete(tmp_path, server, cohen_zip, monkeypatch):
    wrong = dataclasses.replace(DATABASES["cohen"], sha256="0" * 64)
    monkeypatch.setitem(DATABASES, "cohen", wrong)
    to = tmp_path / "data"
    with pytest.raises(dl.DownloadError, match="checksum mismatch for cohen") as err:
        fetch(to, server)
    assert "\n" not in str(err.value)
    assert not (to / "cohen").exists()
    assert not list((to / dl.DOWNLOADS).glob("cohen.zip*"))  # neither archive, .part nor .sha256


def test_known_checksum_is_accepted(tmp_path, server, cohen_zip, monkeypatch):
    right = dataclasses.replace(DATABASES["cohen"], sha256=hashlib.sha256(cohen_zip).hexdigest())
    monkeypatch.setitem(DATABASES, "cohen", right)
    assert fetch(tmp_path / "data", server) == [tmp_path / "data" / "cohen"]


def test_resume_sends_range_and_completes(tmp_path, server, cohen_zip):
    to = tmp_path / "data"
    part = to / dl.DOWNLOADS / "cohen.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(cohen_zip[:100])
    fetch(to, server)
    assert server.requests == [(ARCHIVE_PATH, "bytes=100-")]
    assert (to / dl.DOWNLOADS / "cohen.zip").read_bytes() == cohen_zip
    assert (to / "cohen" / "metadata.csv").is_file()


def test_server_ignoring_range_restarts_cleanly(tmp_path, server, cohen_zip):
    server.ranges = False
    to = tmp_path / "data"
    part = to / dl.DOWNLOADS / "cohen.zip.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(cohen_zip[:100])
    fetch(to, server)
    assert (to / dl.DOWNLOADS / "cohen.zip").read_bytes() == cohen_zip


def test_broken_connection_then_resume(tmp_path, server, cohen_zip):
    to = tmp_path / "data"
    server.cut_at = len(cohen_zip) // 2
    with pytest.raises(dl.DownloadError, match="run again to resume"):
        fetch(to, server)
    assert (to / dl.DOWNLOADS / "cohen.zip.part").stat().st_size == len(cohen_zip) // 2
    assert not (to / "cohen").exists()
    fetch(to, server)
    assert server.requests[-1] == (ARCHIVE_PATH, f"bytes={len(cohen_zip) // 2}-")
    assert (to / dl.DOWNLOADS / "cohen.zip").read_bytes() == cohen_zip


def test_offline_is_one_clear_line(tmp_path):
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(dl.DownloadError) as err:
        dl.download(tmp_path, ["figure1"], base_url_override={"figure1": f"http://127.0.0.1:{port}/x.zip"})
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"cannot reach 127.0.0.1:{port} for figure1: ")
    assert "needs internet access" in message and str(tmp_path / "figure1") in message


def test_http_error_and_unrecognised_archive(tmp_path, server):
    with pytest.raises(dl.DownloadError, match="HTTP 404"):
        dl.download(tmp_path, ["cohen"], base_url_override={"cohen": server.url("/nothing.zip")})
    server.files["/bad.zip"] = b"<html>not a zip</html>"
    with pytest.raises(dl.DownloadError, match="not a valid zip archive"):
        dl.download(tmp_path, ["cohen"], base_url_override={"cohen": server.url("/bad.zip")})
    assert not (tmp_path / "cohen").exists()


def test_wrong_layout_in_archive_is_refused(tmp_path, server):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("repo-master/README.md", "no metadata here")
    server.files["/readme.zip"] = buffer.getvalue()
    with pytest.raises(dl.DownloadError, match="does not look like the cohen layout"):
        dl.download(tmp_path, ["cohen"], base_url_override={"cohen": server.url("/readme.zip")})
    assert not (tmp_path / "cohen").exists()


def test_credentials_and_unknown_names_are_refused_before_fetching(tmp_path, server, cohen_zip):
    with pytest.raises(dl.DownloadError, match=r"kaggle\.json.*tawsifurrahman/covid19-radiography-database"):
        dl.download(tmp_path, ["cohen", "radiography"], base_url_override={"cohen": server.url(ARCHIVE_PATH)})
    with pytest.raises(dl.DownloadError, match="unknown database 'bogus'"):
        dl.download(tmp_path, ["bogus"])
    assert server.requests == [] and not (tmp_path / "cohen").exists()


def test_registry_is_consistent():
    assert default_sources() == ["cohen", "figure1", "actualmed"]
    for db in DATABASES.values():
        assert db.layout in LAYOUTS and db.citation
        assert db.urls or db.needs_credentials
        if db.needs_credentials:
            assert "~/.kaggle/kaggle.json" in db.instructions and "kaggle " in db.instructions
        if not db.url_confirmed:
            assert db.instructions
