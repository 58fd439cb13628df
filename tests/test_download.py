"""Tests for imgsim.sources.download against a fault-injecting HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from imgsim.sources.download import (
    Checksum,
    DownloadError,
    DownloadResult,
    SourceUnavailable,
    fetch,
    fetch_first,
    parse_checksum,
)

BODY = random.Random(1234).randbytes(300_000)
BODY_SHA = hashlib.sha256(BODY).hexdigest()
ETAG = '"v1"'
LAST_MODIFIED = "Mon, 01 Jan 2024 00:00:00 GMT"
CHUNK = 8192

pytestmark = pytest.mark.usefixtures("no_proxy")  # local servers only


@dataclass
class Resource:
    body: bytes
    etag: str = ETAG
    last_modified: str = LAST_MODIFIED


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    status: int = 0


@dataclass
class Fault:
    """One misbehaviour, used up by the next GET of its path.

    kinds: ``drop`` (send ``arg`` body bytes, then close), ``lie`` (announce ``arg`` more bytes
    than sent), ``status`` (answer with status ``arg``), ``stall`` (say nothing for ``arg`` s),
    ``stall_body`` (send ``arg`` bytes, then stall), ``redirect`` (302 to ``arg``),
    ``bad_range`` (answer a Range request with a 206 starting at byte ``arg``).
    """

    kind: str
    arg: float | str = 0


@dataclass
class ServerState:
    resources: dict[str, Resource] = field(default_factory=dict)
    faults: dict[str, list[Fault]] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    ignore_if_range: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    release: threading.Event = field(default_factory=threading.Event)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _serve(self, *, head: bool) -> None:
        state = self.server.state
        seen = Seen(self.command, self.path, dict(self.headers.items()))
        with state.lock:
            state.requests.append(seen)
            queue = state.faults.get(self.path, [])
            fault = queue.pop(0) if queue and not head else Fault("")
            resource = state.resources.get(self.path)
        if fault.kind == "stall":
            state.release.wait(float(fault.arg))
            return
        if fault.kind == "status":
            self._reply(seen, int(fault.arg), b"injected failure\n", head)
            return
        if fault.kind == "redirect":
            seen.status = 302
            self.send_response(302)
            self.send_header("Location", str(fault.arg))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if resource is None:
            self._reply(seen, 404, b"not found\n", head)
            return
        self._serve_resource(seen, resource, fault, head)

    def _reply(self, seen: Seen, status: int, body: bytes, head: bool) -> None:
        seen.status = status
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _serve_resource(self, seen: Seen, res: Resource, fault: Fault, head: bool) -> None:
        body, status, extra = res.body, 200, {}
        range_header = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        range_ok = if_range is None or if_range in (res.etag, res.last_modified)
        if range_header and (range_ok or self.server.state.ignore_if_range):
            start = int(range_header.removeprefix("bytes=").rstrip("-"))
            if fault.kind == "bad_range":
                start = int(fault.arg)
            if start >= len(res.body):
                seen.status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(res.body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body, status = res.body[start:], 206
            extra["Content-Range"] = f"bytes {start}-{len(res.body) - 1}/{len(res.body)}"
        announced = len(body) + (int(fault.arg) if fault.kind == "lie" else 0)
        seen.status = status
        self.send_response(status)
        self.send_header("ETag", res.etag)
        self.send_header("Last-Modified", res.last_modified)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(announced))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        if head:
            return
        if fault.kind in ("drop", "stall_body"):
            self.wfile.write(body[: int(fault.arg)])
            self.wfile.flush()
            if fault.kind == "stall_body":
                self.server.state.release.wait(5.0)
            return
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: ServerState

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that time out leave broken pipes behind; that is expected here


class FakeServer:
    def __init__(self) -> None:
        self.httpd = _Server(("127.0.0.1", 0), _Handler)
        self.httpd.state = ServerState()
        self.state = self.httpd.state
        self.state.resources["/files/data.bin"] = Resource(BODY)

    def url(self, path: str = "/files/data.bin") -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def fail(self, path: str, *faults: Fault) -> None:
        self.state.faults.setdefault(path, []).extend(faults)

    def seen(self, method: str = "GET") -> list[Seen]:
        with self.state.lock:
            return [r for r in self.state.requests if r.method == method]


@pytest.fixture
def server() -> Iterator[FakeServer]:
    srv = FakeServer()
    thread = threading.Thread(
        target=srv.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield srv
    finally:
        srv.state.release.set()
        srv.httpd.shutdown()
        srv.httpd.server_close()
        thread.join(timeout=5)


def _fetch(url: str, dest: Path, **kwargs: Any) -> DownloadResult:
    kwargs.setdefault("backoff_s", 0.01)
    kwargs.setdefault("timeout_s", 5.0)
    kwargs.setdefault("chunk_size", CHUNK)
    return fetch(url, dest, **kwargs)


def _write_part(
    dest: Path, url: str, data: bytes, etag: str = ETAG, total: int = len(BODY)
) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "data.bin.part").write_bytes(data)
    meta = {"url": url, "etag": etag, "last_modified": LAST_MODIFIED, "total": total}
    (dest / "data.bin.part.json").write_text(json.dumps(meta))


def _assert_complete(result: DownloadResult, dest: Path, body: bytes = BODY) -> None:
    assert result.path == dest / "data.bin"
    assert result.path.read_bytes() == body
    assert result.sha256 == hashlib.sha256(body).hexdigest()
    assert result.size == len(body)
    assert not (dest / "data.bin.part").exists()
    assert not (dest / "data.bin.part.json").exists()


# -- HTTP: happy path and skipping ----------------------------------------------------------


def test_plain_download_then_skip_without_get(server: FakeServer, tmp_path: Path) -> None:
    dest = tmp_path / "raw"
    first = _fetch(server.url(), dest)
    assert first.downloaded
    _assert_complete(first, dest)
    meta = json.loads((dest / "data.bin.meta.json").read_text())
    assert meta["url"] == server.url()
    assert meta["sha256"] == BODY_SHA
    assert meta["size"] == len(BODY)
    assert meta["etag"] == ETAG
    assert meta["last_modified"] == LAST_MODIFIED
    assert meta["downloaded_at"]

    second = _fetch(server.url(), dest)
    assert not second.downloaded
    assert (second.sha256, second.size) == (BODY_SHA, len(BODY))
    assert len(server.seen("GET")) == 1
    assert len(server.seen("HEAD")) == 1


def test_known_checksum_skips_without_any_request(server: FakeServer, tmp_path: Path) -> None:
    _fetch(server.url(), tmp_path, sha256=BODY_SHA)
    before = len(server.state.requests)
    again = _fetch(server.url(), tmp_path, sha256=BODY_SHA.upper())
    assert not again.downloaded
    assert again.sha256 == BODY_SHA
    assert len(server.state.requests) == before


def test_changed_remote_file_is_downloaded_again(server: FakeServer, tmp_path: Path) -> None:
    _fetch(server.url(), tmp_path)
    new_body = BODY[::-1]
    server.state.resources["/files/data.bin"] = Resource(new_body, etag='"v2"')
    result = _fetch(server.url(), tmp_path)
    assert result.downloaded
    _assert_complete(result, tmp_path, new_body)
    assert json.loads((tmp_path / "data.bin.meta.json").read_text())["etag"] == '"v2"'


def test_damaged_local_copy_is_downloaded_again(server: FakeServer, tmp_path: Path) -> None:
    _fetch(server.url(), tmp_path)
    (tmp_path / "data.bin").write_bytes(BODY[:1000])
    result = _fetch(server.url(), tmp_path)
    assert result.downloaded
    _assert_complete(result, tmp_path)


def test_progress_is_logged(
    server: FakeServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="imgsim.sources.download"):
        _fetch(server.url(), tmp_path)
    messages = [r.getMessage() for r in caplog.records]
    assert any("100.0%" in m and "MB/s" in m and "ETA" in m for m in messages)


# -- HTTP: resume and restart ---------------------------------------------------------------


def test_dropped_connection_is_resumed_with_range(server: FakeServer, tmp_path: Path) -> None:
    server.fail("/files/data.bin", Fault("drop", 100_000))
    result = _fetch(server.url(), tmp_path)
    _assert_complete(result, tmp_path)
    gets = server.seen("GET")
    assert [g.status for g in gets] == [200, 206]
    assert gets[1].headers["Range"] == "bytes=100000-"
    assert gets[1].headers["If-Range"] == ETAG


def test_truncated_body_with_too_large_length_is_retried(
    server: FakeServer, tmp_path: Path
) -> None:
    # The whole body arrives but 500 more bytes were announced: the client retries from the end,
    # the server answers 416 with the real size, and the part turns out to be complete.
    server.fail("/files/data.bin", Fault("lie", 500))
    result = _fetch(server.url(), tmp_path)
    _assert_complete(result, tmp_path)
    gets = server.seen("GET")
    assert [g.status for g in gets] == [200, 416]
    assert gets[1].headers["Range"] == f"bytes={len(BODY)}-"


def test_stall_mid_body_times_out_then_resumes(server: FakeServer, tmp_path: Path) -> None:
    server.fail("/files/data.bin", Fault("stall_body", 50_000))
    result = _fetch(server.url(), tmp_path, timeout_s=0.3)
    _assert_complete(result, tmp_path)
    assert server.seen("GET")[1].headers["Range"] == "bytes=50000-"


def test_part_from_other_etag_restarts_from_zero(server: FakeServer, tmp_path: Path) -> None:
    _write_part(tmp_path, server.url(), b"x" * 1000, etag='"old"')
    result = _fetch(server.url(), tmp_path)
    _assert_complete(result, tmp_path)
    (get,) = server.seen("GET")
    assert get.headers["If-Range"] == '"old"'
    assert get.status == 200  # the server saw the mismatch and sent the whole file


def test_part_from_other_etag_restarts_even_if_server_ignores_if_range(
    server: FakeServer, tmp_path: Path
) -> None:
    server.state.ignore_if_range = True
    _write_part(tmp_path, server.url(), b"x" * 1000, etag='"old"')
    result = _fetch(server.url(), tmp_path)
    _assert_complete(result, tmp_path)
    gets = server.seen("GET")
    assert [g.status for g in gets] == [206, 200]
    assert "Range" not in gets[1].headers


def test_wrong_content_range_start_restarts(server: FakeServer, tmp_path: Path) -> None:
    _write_part(tmp_path, server.url(), BODY[:1000])
    server.fail("/files/data.bin", Fault("bad_range", 10))
    result = _fetch(server.url(), tmp_path)
    _assert_complete(result, tmp_path)
    gets = server.seen("GET")
    assert [g.status for g in gets] == [206, 200]
    assert "Range" not in gets[1].headers


def test_complete_part_is_finished_after_416(server: FakeServer, tmp_path: Path) -> None:
    _write_part(tmp_path, server.url(), BODY)
    result = _fetch(server.url(), tmp_path)
    assert result.downloaded
    _assert_complete(result, tmp_path)
    assert [g.status for g in server.seen("GET")] == [416]


def test_part_without_record_is_never_trusted(server: FakeServer, tmp_path: Path) -> None:
    (tmp_path / "data.bin.part").write_bytes(b"y" * len(BODY))
    result = _fetch(server.url(), tmp_path)
    _assert_complete(result, tmp_path)
    (get,) = server.seen("GET")
    assert "Range" not in get.headers


# -- HTTP: failures -------------------------------------------------------------------------


def test_checksum_mismatch(server: FakeServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="checksum mismatch") as info:
        _fetch(server.url(), tmp_path, sha256="0" * 64)
    assert server.url() in str(info.value)
    assert BODY_SHA in str(info.value)
    assert not (tmp_path / "data.bin").exists()
    assert not (tmp_path / "data.bin.part").exists()
    assert not (tmp_path / "data.bin.meta.json").exists()


def test_404_fails_at_once(server: FakeServer, tmp_path: Path) -> None:
    url = server.url("/files/missing.bin")
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        _fetch(url, tmp_path, retries=3)
    assert url in str(info.value)
    assert len(server.seen("GET")) == 1
    assert not (tmp_path / "missing.bin").exists()


@pytest.mark.parametrize("status", [503, 429])
def test_transient_status_is_retried(server: FakeServer, tmp_path: Path, status: int) -> None:
    server.fail("/files/data.bin", Fault("status", status), Fault("status", status))
    result = _fetch(server.url(), tmp_path, retries=3)
    _assert_complete(result, tmp_path)
    assert [g.status for g in server.seen("GET")] == [status, status, 200]


def test_retries_are_bounded(server: FakeServer, tmp_path: Path) -> None:
    server.fail("/files/data.bin", *[Fault("status", 500)] * 5)
    with pytest.raises(DownloadError, match=r"after 3 attempt.*HTTP 500"):
        _fetch(server.url(), tmp_path, retries=2)
    assert len(server.seen("GET")) == 3
    assert not (tmp_path / "data.bin").exists()


def test_stalled_server_times_out(server: FakeServer, tmp_path: Path) -> None:
    server.fail("/files/data.bin", Fault("stall", 5.0), Fault("stall", 5.0))
    with pytest.raises(DownloadError, match="timeout") as info:
        _fetch(server.url(), tmp_path, timeout_s=0.3, retries=1)
    assert server.url() in str(info.value)
    assert len(server.seen("GET")) == 2
    assert not (tmp_path / "data.bin").exists()


def test_connection_refused_is_reported(tmp_path: Path) -> None:
    srv = FakeServer()  # bound but never serving, then closed: nothing listens on the port
    url = srv.url()
    srv.httpd.server_close()
    with pytest.raises(DownloadError, match="connection error") as info:
        _fetch(url, tmp_path, retries=1)
    assert url in str(info.value)


# -- HTTP: redirects ------------------------------------------------------------------------


def test_redirect_to_other_path_is_followed(server: FakeServer, tmp_path: Path) -> None:
    server.fail("/latest", Fault("redirect", "/files/data.bin"))
    result = _fetch(server.url("/latest"), tmp_path, filename="data.bin")
    _assert_complete(result, tmp_path)
    assert [g.path for g in server.seen("GET")] == ["/latest", "/files/data.bin"]


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://127.0.0.1/data.bin"])
def test_redirect_to_other_scheme_is_refused(
    server: FakeServer, tmp_path: Path, location: str
) -> None:
    server.fail("/files/data.bin", Fault("redirect", location))
    with pytest.raises(DownloadError, match="refused redirect") as info:
        _fetch(server.url(), tmp_path)
    assert location in str(info.value)
    assert len(server.seen("GET")) == 1
    assert not (tmp_path / "data.bin").exists()


def test_redirect_to_disallowed_http_scheme_is_refused(server: FakeServer, tmp_path: Path) -> None:
    server.fail("/files/data.bin", Fault("redirect", server.url().replace("http:", "https:")))
    with pytest.raises(DownloadError, match="'https' not allowed"):
        _fetch(server.url(), tmp_path, allowed_schemes=("http",))


# -- URL and file name checks ---------------------------------------------------------------


@pytest.mark.parametrize(
    "url", ["ftp://example.com/data.bin", "data:text/plain,hello", "gopher://x/y"]
)
def test_unsupported_scheme_is_refused(tmp_path: Path, url: str) -> None:
    scheme = url.split(":", 1)[0]
    with pytest.raises(DownloadError, match=f"unsupported URL scheme '{scheme}'"):
        _fetch(url, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_scheme_outside_allowed_schemes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="'http' not allowed"):
        _fetch("http://127.0.0.1:9/data.bin", tmp_path, allowed_schemes=("https",))
    source = tmp_path / "src.bin"
    source.write_bytes(b"abc")
    with pytest.raises(DownloadError, match="local paths"):
        _fetch(str(source), tmp_path / "out", allowed_schemes=("https", "http"))


@pytest.mark.parametrize(
    ("url", "filename"),
    [
        ("http://127.0.0.1:9/files/", None),
        ("http://127.0.0.1:9/files/a%2Fb", None),
        ("http://127.0.0.1:9/files/..", None),
        ("http://127.0.0.1:9/files/x", ""),
        ("http://127.0.0.1:9/files/x", ".."),
        ("http://127.0.0.1:9/files/x", "a/b"),
        ("http://127.0.0.1:9/files/x", "a\0b"),
    ],
)
def test_bad_filename_is_refused(tmp_path: Path, url: str, filename: str | None) -> None:
    with pytest.raises(DownloadError, match="file name"):
        _fetch(url, tmp_path / "out", filename=filename)
    assert not (tmp_path / "out").exists()


# -- file:// and local paths ----------------------------------------------------------------


@pytest.fixture
def source(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "data.bin"
    path.parent.mkdir()
    path.write_bytes(BODY)
    return path


def test_file_url_copy_then_skip_then_recopy(source: Path, tmp_path: Path) -> None:
    dest = tmp_path / "raw"
    first = _fetch(source.as_uri(), dest)
    assert first.downloaded
    _assert_complete(first, dest)
    assert json.loads((dest / "data.bin.meta.json").read_text())["url"] == source.as_uri()

    assert not _fetch(source.as_uri(), dest).downloaded

    new_body = BODY[:5000]
    source.write_bytes(new_body)
    st = source.stat()
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    third = _fetch(source.as_uri(), dest)
    assert third.downloaded
    _assert_complete(third, dest, new_body)


def test_relative_local_path(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = _fetch("src/data.bin", tmp_path / "raw", sha256=BODY_SHA)
    _assert_complete(result, tmp_path / "raw")


def test_local_checksum_mismatch(source: Path, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="checksum mismatch"):
        _fetch(str(source), tmp_path / "raw", sha256="f" * 64)
    assert not (tmp_path / "raw" / "data.bin").exists()
    assert not (tmp_path / "raw" / "data.bin.part").exists()


def test_missing_local_source(tmp_path: Path) -> None:
    missing = tmp_path / "nope.bin"
    with pytest.raises(DownloadError, match="no such file"):
        _fetch(missing.as_uri(), tmp_path / "raw")
    with pytest.raises(DownloadError, match="no such file"):
        _fetch(str(missing), tmp_path / "raw")


def test_local_source_outside_allowed_roots(source: Path, tmp_path: Path) -> None:
    root = tmp_path / "allowed"
    root.mkdir()
    with pytest.raises(DownloadError, match="outside the allowed roots"):
        _fetch(str(source), tmp_path / "raw", allowed_local_roots=(root,))
    link = root / "link.bin"
    link.symlink_to(source)  # a link inside the root that points outside it is refused too
    with pytest.raises(DownloadError, match="outside the allowed roots"):
        _fetch(link.as_uri(), tmp_path / "raw", allowed_local_roots=(root,))
    result = _fetch(str(source), tmp_path / "raw", allowed_local_roots=(source.parent,))
    _assert_complete(result, tmp_path / "raw")


def test_source_already_at_destination_is_left_in_place(source: Path) -> None:
    result = _fetch(str(source), source.parent, sha256=BODY_SHA)
    assert not result.downloaded
    assert result.path == source
    assert source.read_bytes() == BODY
    assert json.loads((source.parent / "data.bin.meta.json").read_text())["sha256"] == BODY_SHA


# -- checksums: md5 or sha256 ----------------------------------------------------------------

BODY_MD5 = hashlib.md5(BODY).hexdigest()


@pytest.mark.parametrize(
    "text,expected",
    [
        (f"md5:{BODY_MD5}", Checksum("md5", BODY_MD5)),
        (f" SHA256:{BODY_SHA.upper()} ", Checksum("sha256", BODY_SHA)),
        (BODY_SHA, Checksum("sha256", BODY_SHA)),
        (BODY_MD5, Checksum("md5", BODY_MD5)),
        ("", None),
    ],
)
def test_parse_checksum(text: str, expected: Checksum | None) -> None:
    assert parse_checksum(text) == expected


@pytest.mark.parametrize("text", ["md5:abc", f"sha1:{BODY_SHA}", f"md5:{BODY_SHA}", "z" * 64])
def test_bad_checksum_is_a_permanent_error(text: str) -> None:
    with pytest.raises(DownloadError, match="md5:<32 hex digits> or sha256") as info:
        parse_checksum(text)
    assert info.value.permanent


def test_md5_checksum_is_verified(server: FakeServer, tmp_path: Path) -> None:
    result = _fetch(server.url(), tmp_path, checksum=f"md5:{BODY_MD5}")
    _assert_complete(result, tmp_path)
    assert result.md5 == BODY_MD5
    assert not _fetch(server.url(), tmp_path, checksum=f"md5:{BODY_MD5}").downloaded
    assert len(server.seen("GET")) == 1  # the second call found the file current
    with pytest.raises(DownloadError, match=f"expected md5:{'0' * 32}, got md5:{BODY_MD5}"):
        _fetch(server.url(), tmp_path / "other", checksum="md5:" + "0" * 32)
    assert not (tmp_path / "other" / "data.bin").exists()


# -- permanent errors are not retried --------------------------------------------------------


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/car ims.tgz", "http://127.0.0.1:9/a\tb"])
def test_invalid_url_fails_at_once(url: str, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="invalid URL") as info:
        _fetch(url, tmp_path, retries=5, backoff_s=10.0)
    assert info.value.permanent


def test_404_and_wrong_bytes_are_permanent_exhausted_retries_are_not(
    server: FakeServer, tmp_path: Path
) -> None:
    with pytest.raises(DownloadError) as info:
        _fetch(server.url("/files/missing.bin"), tmp_path, retries=5, backoff_s=10.0)
    assert info.value.permanent
    with pytest.raises(DownloadError) as info:
        _fetch(server.url(), tmp_path, checksum="md5:" + "0" * 32, retries=5, backoff_s=10.0)
    assert info.value.permanent
    assert len(server.seen("GET")) == 2  # one request each, no retry
    server.fail("/files/data.bin", *[Fault("status", 503)] * 3)
    with pytest.raises(DownloadError, match="after 2 attempt") as info:
        _fetch(server.url(), tmp_path / "x", retries=1)
    assert not info.value.permanent


# -- ordered locations (mirrors) ---------------------------------------------------------------


@pytest.fixture
def three_servers() -> Iterator[list[FakeServer]]:
    """Three mirrors: the first has nothing (404), the second other bytes, the third BODY."""
    servers = [FakeServer() for _ in range(3)]
    servers[1].state.resources["/files/data.bin"] = Resource(BODY[::-1])
    del servers[0].state.resources["/files/data.bin"]
    threads = [
        threading.Thread(target=s.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        for s in servers
    ]
    for t in threads:
        t.start()
    try:
        yield servers
    finally:
        for s, t in zip(servers, threads, strict=True):
            s.state.release.set()
            s.httpd.shutdown()
            s.httpd.server_close()
            t.join(timeout=5)


def test_next_location_after_404_and_wrong_bytes(
    three_servers: list[FakeServer], tmp_path: Path
) -> None:
    urls = [s.url() for s in three_servers]
    result = fetch_first(
        " ".join(urls),
        tmp_path,
        what="test file",
        checksum=f"md5:{BODY_MD5}",
        backoff_s=0.01,
        timeout_s=5.0,
    )
    _assert_complete(result, tmp_path)
    assert result.url == urls[2]
    assert result.tried == (urls[0], urls[1])
    assert [len(s.seen("GET")) for s in three_servers] == [1, 1, 1]  # no retry of either
    assert not (tmp_path / "data.bin.part").exists()


def test_every_location_failing_names_each_and_where_to_get_the_data(
    three_servers: list[FakeServer], tmp_path: Path
) -> None:
    urls = [s.url() for s in three_servers[:2]] + [str(tmp_path / "nowhere.tgz")]
    with pytest.raises(SourceUnavailable) as info:
        fetch_first(
            urls,
            tmp_path / "raw",
            what="image archive",
            checksum=f"md5:{BODY_MD5}",
            help_text="Get it from a mirror; set IMGSIM_ARCHIVE_URL.",
            backoff_s=0.01,
            timeout_s=5.0,
        )
    msg = str(info.value)
    assert msg.startswith(
        f"could not get the image archive from any of its 3 location(s) (expected md5:{BODY_MD5}):"
    )
    assert f"1. {urls[0]}: HTTP 404" in msg
    assert f"2. {urls[1]}: checksum mismatch" in msg and "other bytes" in msg
    assert f"3. {urls[2]}: no such file" in msg
    assert msg.endswith("Get it from a mirror; set IMGSIM_ARCHIVE_URL.")
    assert info.value.permanent
    assert [loc for loc, _ in info.value.attempts] == urls
    assert not list((tmp_path / "raw").glob("*.part"))


def test_a_folder_location_holding_images_is_used_in_place(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    kaggle = tmp_path / "kaggle" / "cars_train"
    kaggle.mkdir(parents=True)
    (kaggle / "00001.jpg").write_bytes(b"jpeg")
    result = fetch_first(
        [str(empty), (tmp_path / "kaggle").as_uri()],
        tmp_path / "raw",
        what="image archive",
        allow_folders=True,
    )
    assert (result.kind, result.path, result.tried) == (
        "folder",
        tmp_path / "kaggle",
        (str(empty),),
    )
    with pytest.raises(SourceUnavailable, match=r"without any \.jpg"):
        fetch_first(str(empty), tmp_path / "raw", what="image archive", allow_folders=True)
    with pytest.raises(SourceUnavailable, match="no location given"):
        fetch_first("  ", tmp_path / "raw", what="image archive")
