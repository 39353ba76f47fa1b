"""stages.fetch against real HTTP servers on 127.0.0.1 that misbehave on purpose.

Each server serves one in-memory file with ETag, Range and If-Range like a real one, and can be
told to cut the connection, answer 500, stall, answer 404 or ignore Range, so that resuming,
retrying and failing fast are tested over real sockets rather than mocks.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import random
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from classifier.data import fetch
from classifier.errors import StageError

BODY = random.Random(0).randbytes(200_000)
PATH = "/file.bin"
HINT = "HINT: save the file by hand."


@dataclass
class Behaviour:
    """What the server does; tests change it between calls."""

    body: bytes = BODY
    etag: str = '"v1"'
    cut_after: int = 0  # on the first `cut_times` requests: send this many body bytes, then close
    cut_times: int = 0
    fail_times: int = 0  # answer 500 to the first this many requests
    stall_after: int | None = None  # send this many body bytes, then go silent
    not_found: bool = False
    ignore_range: bool = False
    #: (method, Range, If-Range) of every request, in order
    requests: list[tuple[str, str | None, str | None]] = field(default_factory=list)


class Server:
    def __init__(self) -> None:
        self.behaviour = Behaviour()
        self.release = threading.Event()  # ends stalls when the test is over
        behaviour_of = lambda: self.behaviour  # noqa: E731
        release = self.release

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                b = behaviour_of()
                n = len(b.requests)
                b.requests.append(("GET", self.headers.get("Range"), self.headers.get("If-Range")))
                if b.not_found or self.path != PATH:
                    self.send_error(404)
                    return
                if n < b.fail_times:
                    self.send_error(500)
                    return
                start, status = 0, 200
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if_range = self.headers.get("If-Range")
                if match and not b.ignore_range and (if_range is None or if_range == b.etag):
                    start = int(match.group(1))
                    if start >= len(b.body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(b.body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                payload = b.body[start:]
                self.send_response(status)
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("ETag", b.etag)
                self.send_header("Accept-Ranges", "none" if b.ignore_range else "bytes")
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(b.body) - 1}/{len(b.body)}")
                self.end_headers()
                if n < b.cut_times:
                    self.wfile.write(payload[: b.cut_after])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_WR)  # the client sees the body end early
                    self.close_connection = True
                    return
                if b.stall_after is not None:
                    self.wfile.write(payload[: b.stall_after])
                    self.wfile.flush()
                    release.wait(10)
                    return
                self.wfile.write(payload)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}{PATH}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def requests(self) -> list[tuple[str, str | None, str | None]]:
        return self.behaviour.requests

    def close(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = Server()
    try:
        yield srv
    finally:
        srv.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir())


def test_plain_download(server, tmp_path):
    dest = tmp_path / "out" / "file.bin"
    digest = fetch.fetch(server.url, dest, sha256=sha(BODY).upper())  # pinned hashes in any case
    assert dest.read_bytes() == BODY
    assert digest == sha(BODY) == fetch.sha256_file(dest)
    assert leftovers(dest) == ["file.bin"], "no .part or metadata is left"
    assert server.requests == [("GET", None, None)]


def test_cut_connection_is_resumed_with_range(server, tmp_path):
    server.behaviour.cut_after, server.behaviour.cut_times = 70_000, 1
    dest = tmp_path / "file.bin"
    digest = fetch.fetch(server.url, dest, retries=3, backoff=0.01)
    assert server.requests == [("GET", None, None), ("GET", "bytes=70000-", '"v1"')]
    assert dest.read_bytes() == BODY and digest == sha(BODY)
    assert leftovers(dest) == ["file.bin"]


def test_interrupted_run_is_resumed_by_the_next_call(server, tmp_path):
    server.behaviour.cut_after, server.behaviour.cut_times = 50_000, 1
    dest = tmp_path / "file.bin"
    part = tmp_path / "file.bin.part"
    with pytest.raises(StageError) as err:
        fetch.fetch(server.url, dest, retries=1, hint=HINT)
    message = str(err.value)
    assert f"Could not download {server.url}" in message
    assert "closed after 50000 of 200000 bytes" in message and "after 1 attempt." in message
    assert f"resumes from the 50000 bytes kept in {part}" in message and message.endswith("\n" + HINT)
    assert not dest.exists(), "nothing that looks complete"
    assert part.read_bytes() == BODY[:50_000]
    assert json.loads((tmp_path / "file.bin.part.json").read_text()) == {"url": server.url, "validator": '"v1"'}

    assert fetch.fetch(server.url, dest) == sha(BODY)
    assert server.requests[-1] == ("GET", "bytes=50000-", '"v1"')
    assert dest.read_bytes() == BODY
    assert leftovers(dest) == ["file.bin"]


def test_server_errors_are_retried_with_backoff(server, tmp_path):
    server.behaviour.fail_times = 2
    dest = tmp_path / "file.bin"
    assert fetch.fetch(server.url, dest, retries=3, backoff=0.01) == sha(BODY)
    assert dest.read_bytes() == BODY
    assert len(server.requests) == 3


def test_server_errors_beyond_the_retries_are_reported(server, tmp_path):
    server.behaviour.fail_times = 5
    with pytest.raises(StageError) as err:
        fetch.fetch(server.url, tmp_path / "file.bin", retries=2, backoff=0.01, hint=HINT)
    assert "HTTP 500 Internal Server Error; gave up after 2 attempts." in str(err.value)
    assert str(err.value).endswith("\n" + HINT)
    assert len(server.requests) == 2 and leftovers(tmp_path / "file.bin") == []


def test_server_ignoring_range_restarts_from_zero(server, tmp_path):
    server.behaviour.cut_after, server.behaviour.cut_times = 70_000, 1
    server.behaviour.ignore_range = True
    dest = tmp_path / "file.bin"
    assert fetch.fetch(server.url, dest, retries=3, backoff=0.01) == sha(BODY)
    assert server.requests[1][1] == "bytes=70000-", "the client asked to resume"
    assert dest.read_bytes() == BODY, "the full body replaced the part, it was not appended"


def test_changed_resource_is_downloaded_anew_not_mixed(server, tmp_path):
    server.behaviour.cut_after, server.behaviour.cut_times = 50_000, 1
    dest = tmp_path / "file.bin"
    with pytest.raises(StageError):
        fetch.fetch(server.url, dest, retries=1)
    new_body = random.Random(1).randbytes(150_000)
    server.behaviour.body, server.behaviour.etag = new_body, '"v2"'
    assert fetch.fetch(server.url, dest) == sha(new_body)
    assert server.requests[-1] == ("GET", "bytes=50000-", '"v1"'), "If-Range carried the old ETag"
    assert dest.read_bytes() == new_body
    assert leftovers(dest) == ["file.bin"]


def test_complete_part_file_is_taken_after_416(server, tmp_path):
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(BODY)  # a run stopped after the last byte
    (tmp_path / "file.bin.part.json").write_text(json.dumps({"url": server.url, "validator": '"v1"'}))
    assert fetch.fetch(server.url, dest) == sha(BODY)
    assert server.requests == [("GET", f"bytes={len(BODY)}-", '"v1"')]
    assert dest.read_bytes() == BODY and leftovers(dest) == ["file.bin"]


def test_part_file_recorded_for_another_url_is_not_resumed(server, tmp_path):
    dest = tmp_path / "file.bin"
    (tmp_path / "file.bin.part").write_bytes(b"x" * 1000)
    (tmp_path / "file.bin.part.json").write_text(json.dumps({"url": "http://elsewhere/f", "validator": '"v1"'}))
    assert fetch.fetch(server.url, dest) == sha(BODY)
    assert server.requests == [("GET", None, None)]
    assert dest.read_bytes() == BODY


def test_not_found_fails_at_once_with_the_hint(server, tmp_path):
    server.behaviour.not_found = True
    dest = tmp_path / "file.bin"
    started = time.monotonic()
    with pytest.raises(StageError) as err:
        fetch.fetch(server.url, dest, hint=HINT)
    assert time.monotonic() - started < 5
    assert str(err.value) == f"Could not download {server.url}: HTTP 404 Not Found.\n{HINT}"
    assert len(server.requests) == 1, "no retries"
    assert leftovers(dest) == []


def test_sha256_mismatch_discards_the_download(server, tmp_path):
    dest = tmp_path / "file.bin"
    expected = "ab" * 32
    with pytest.raises(StageError) as err:
        fetch.fetch(server.url, dest, sha256=expected, hint=HINT)
    message = str(err.value)
    assert expected in message and sha(BODY) in message and "discarded" in message
    assert leftovers(dest) == [], "neither the file, its .part nor its metadata remains"


def test_stalled_server_times_out_and_gives_up(server, tmp_path):
    server.behaviour.stall_after = 1000
    dest = tmp_path / "file.bin"
    started = time.monotonic()
    with pytest.raises(StageError) as err:
        fetch.fetch(server.url, dest, timeout=0.5, retries=2, backoff=0.01, hint=HINT)
    assert time.monotonic() - started < 5
    message = str(err.value)
    assert "timed out: no data within the 0.5 s timeout" in message and "gave up after 2 attempts" in message
    assert server.requests[1][1] == "bytes=1000-", "the second attempt kept what arrived before the stall"
    assert not dest.exists()


def test_connection_refused_fails_at_once(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/file.bin"
    started = time.monotonic()
    with pytest.raises(StageError) as err:
        fetch.fetch(url, tmp_path / "file.bin", hint=HINT)
    assert time.monotonic() - started < 5
    assert str(err.value).startswith(f"Could not download {url}: ") and "refused" in str(err.value)
    assert str(err.value).endswith(f".\n{HINT}")


def test_unknown_host_fails_at_once(tmp_path):
    url = "http://no-such-host.invalid/x"
    started = time.monotonic()
    with pytest.raises(StageError) as err:
        fetch.fetch(url, tmp_path / "x", hint=HINT)
    assert time.monotonic() - started < 5
    assert str(err.value).startswith(f"Could not download {url}: unknown host")
    assert str(err.value).endswith(f".\n{HINT}")
