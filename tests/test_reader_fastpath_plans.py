"""The Content-Length the WSGI handler adds to a list-of-one body is each body's own.

A response head's plan is kept per (status, headers, method, version, keep-alive, length
known) and reused for every body of any length, so the length line itself is added per
response.  These tests read whole keep-alive conversations from a real server: a length
kept from an earlier body, a missing line or a second one would leave a body cut short or
run into the next response, and the exchange would not parse.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TiamatServer, read_response

from tiamat.http import h1, response

APP = '''
def app(environ, start_response):
    query = environ["QUERY_STRING"]
    kind, _, size = query.partition("-")
    if kind == "status":
        start_response(size + " X", [("X-Kind", "status")])
        return [b""]
    if kind == "own":  # the app's own Content-Length (shorter than it could be)
        start_response("200 OK", [("Content-Length", size)])
        return [b"y" * int(size)]
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"x" * int(size)]
'''


def _server(tiamat_server: Callable[..., TiamatServer], tmp_path: Path,
            *args: str) -> TiamatServer:
    (tmp_path / "bareapp.py").write_text(APP)
    return tiamat_server(*args, "bareapp:app", cwd=tmp_path)


def _read_response(sock: socket.socket, buffer: bytearray, head_only: bool = False
                   ) -> tuple[bytes, list[bytes], bytes]:
    """One response off ``sock`` (status line, every Content-Length value, body), leaving
    what follows it in ``buffer`` (conftest.read_response, plus the length lines: a
    response must carry exactly one)."""
    head, body, rest = read_response(sock, bytes(buffer), head_only)
    buffer[:] = rest
    lines = head.split(b"\r\n")
    lengths = [line.split(b":", 1)[1].strip() for line in lines[1:]
               if line.lower().startswith(b"content-length:")]
    return lines[0], lengths, body


def test_each_body_gets_its_own_length_on_one_connection(
        tiamat_server: Callable[..., TiamatServer], tmp_path: Path) -> None:
    server = _server(tiamat_server, tmp_path)
    sizes = [7, 1, 13, 0, 13, 7, 250, 1]
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        buffer = bytearray()
        for size in sizes * 2:  # the second round answers from kept plans only
            sock.sendall(f"GET /?len-{size} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            status, lengths, body = _read_response(sock, buffer)
            assert status == b"HTTP/1.1 200 OK"
            assert lengths == [str(size).encode()], (size, lengths)
            assert body == b"x" * size
        # pipelined: every answer in one read must still split at the right places
        sock.sendall(b"".join(f"GET /?len-{size} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
                              for size in sizes))
        for size in sizes:
            status, lengths, body = _read_response(sock, buffer)
            assert lengths == [str(size).encode()] and body == b"x" * size
        assert not buffer


def test_head_and_bodiless_statuses_and_an_apps_own_length(
        tiamat_server: Callable[..., TiamatServer], tmp_path: Path) -> None:
    server = _server(tiamat_server, tmp_path)
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        buffer = bytearray()
        for _ in range(2):
            for size in (5, 9):  # HEAD: the length GET would have, and no body
                sock.sendall(f"HEAD /?len-{size} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                status, lengths, _ = _read_response(sock, buffer, head_only=True)
                assert status == b"HTTP/1.1 200 OK" and lengths == [str(size).encode()]
            for code in (204, 304):  # must not carry a length the server made up
                sock.sendall(f"GET /?status-{code} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                status, lengths, body = _read_response(sock, buffer)
                assert status.startswith(f"HTTP/1.1 {code}".encode()) and lengths == []
                assert body == b""
            for size in (3, 11):  # the app's own line, once, never a second one
                sock.sendall(f"GET /?own-{size} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
                status, lengths, body = _read_response(sock, buffer)
                assert lengths == [str(size).encode()] and body == b"y" * size
        assert not buffer


def test_http_1_0_keep_alive_gets_each_length(
        tiamat_server: Callable[..., TiamatServer], tmp_path: Path) -> None:
    server = _server(tiamat_server, tmp_path)
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        buffer = bytearray()
        for size in (4, 2, 4, 2):
            sock.sendall(f"GET /?len-{size} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".encode())
            status, lengths, body = _read_response(sock, buffer)
            assert status == b"HTTP/1.1 200 OK" and lengths == [str(size).encode()]
            assert body == b"x" * size


def test_the_added_length_reaches_the_access_log(
        tiamat_server: Callable[..., TiamatServer], tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    server = _server(tiamat_server, tmp_path, "--access-logfile", str(log),
                     "--access-logformat", "len=%({content-length}o)s")
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        buffer = bytearray()
        for size in (6, 12, 6):
            sock.sendall(f"GET /?len-{size} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            _read_response(sock, buffer)

    def logged() -> list[str]:
        return re.findall(r"len=(\S+)", log.read_text()) if log.exists() else []

    from tests.conftest import wait_for

    wait_for(lambda: len(logged()) >= 4, message="four access log lines")  # (with the probe)
    assert logged()[-3:] == ["6", "12", "6"]


def test_head_end_for_every_framing_follows_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The head's end (Server, Date, Connection, empty line), kept per second: each of the
    four ends is the one its framing needs, for the second the clock shows, at a second's
    edges and after the clock is set back."""
    clock = [0.0]
    monkeypatch.setattr(response.time, "time", lambda: clock[0])
    for now in (1_000_000.0, 1_000_000.999, 1_000_001.0, 999_999.5, 1_000_001.25):
        clock[0] = now
        for keep_alive in (True, False):
            for version in ("1.1", "1.0"):
                expected = (response.SERVER_HEADER + b"Date: "
                            + response.http_date(int(now)).encode() + b"\r\n"
                            + response.connection_header(keep_alive, version) + b"\r\n")
                assert response.head_end(keep_alive, version) == expected, (now, keep_alive)


def test_a_kept_whole_head_names_the_second_of_the_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan keeps its whole head (Date included) for one second: every response's Date is
    the clock's second, for every kind of body, at a second's edges and after the clock is
    set back; and a kept head never crosses to another request's framing."""
    import io

    from tiamat.config import load_config
    from tiamat.wsgi import WSGIHandler

    def app(environ: dict[str, object], start_response: object) -> object:
        kind = environ["PATH_INFO"]
        if kind == "/own":
            start_response("200 OK", [("Content-Length", "2")])  # type: ignore[operator]
            return [b"ok"]
        start_response("200 OK", [("X-A", "b")])  # type: ignore[operator]
        return [b"ok"] if kind == "/list" else iter([b"o", b"k"])

    class Sink:
        data = b""

        def write(self, data: bytes) -> None:
            self.data += data

    clock = [0.0]
    monkeypatch.setattr(response.time, "time", lambda: clock[0])
    handler = WSGIHandler(app, load_config({}, environ={}), multithread=False)
    environ = handler.connection_environ(("127.0.0.1", 1), ("127.0.0.1", 2), "http")
    for now in (1_000_000.0, 1_000_000.5, 1_000_000.999, 1_000_001.0, 999_999.5, 1_000_001.2):
        clock[0] = now
        date = b"\r\nDate: " + response.http_date(int(now)).encode() + b"\r\n"
        for path in ("/own", "/list", "/iter"):
            for version, connection in (("1.1", ""), ("1.1", "close"), ("1.0", "keep-alive")):
                head = b"GET %s HTTP/%s\r\nHost: a\r\n%s\r\n" % (
                    path.encode(), version.encode(),
                    b"Connection: %s\r\n" % connection.encode() if connection else b"")
                reader = h1.RequestReader()
                reader.feed(head)
                sink = Sink()
                handler.handle(reader.events[0], io.BytesIO(), environ, sink)  # type: ignore[arg-type]
                assert date in sink.data, (now, path, version, sink.data)
                closes = b"\r\nConnection: close\r\n" in sink.data
                assert closes == (connection == "close" or (path == "/iter" and version == "1.0"))
                assert (b"\r\nConnection: keep-alive\r\n" in sink.data) == (
                    version == "1.0" and path != "/iter")
