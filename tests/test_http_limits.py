"""Size limits over real sockets, for every worker class: 414, 431, 413, bounded chunk lines.

The server runs with the default limits except ``--limit-request-body 100000`` (so a 413
does not need 100 MiB of traffic; the 100 MiB default is checked from a Content-Length
alone, which the server must refuse before reading any body).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from apps.sec_support import WORKERS, exchange, read_until_close, start_server, statuses
from conftest import TiamatServer, read_to_end

BODY_LIMIT = 100_000


@pytest.fixture(scope="module", params=WORKERS)
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[TiamatServer]:
    srv = start_server(tmp_path_factory.mktemp("limits"), request.param,
                       "--limit-request-body", str(BODY_LIMIT))
    yield srv
    srv.stop()


def request_line(length: int) -> bytes:
    """A request line of exactly ``length`` bytes (CRLF not counted)."""
    fixed = len(b"GET / HTTP/1.1")
    return b"GET /" + b"a" * (length - fixed) + b" HTTP/1.1"


def status_of(server: TiamatServer, raw: bytes) -> list[int]:
    return statuses(exchange(server, raw, timeout=10))


def test_request_line_limit(server: TiamatServer) -> None:
    ok = request_line(8190) + b"\r\nHost: t\r\nConnection: close\r\n\r\n"
    assert status_of(server, ok) == [200]
    assert status_of(server, request_line(8191) + b"\r\nHost: t\r\n\r\n") == [414]
    # no line end at all: refused as soon as it is too long, not when the client stops
    assert status_of(server, b"GET /" + b"a" * 20000) == [414]


def test_field_size_limit(server: TiamatServer) -> None:
    def field(size: int) -> bytes:  # name + value = size bytes
        return b"X: " + b"v" * (size - 1) + b"\r\n"

    head = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
    assert status_of(server, head + field(8190) + b"\r\n") == [200]
    assert status_of(server, head + field(8191) + b"\r\n") == [431]


def test_field_count_limit(server: TiamatServer) -> None:
    head = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"  # 2 fields
    assert status_of(server, head + b"".join(b"X-%d: y\r\n" % i for i in range(98)) + b"\r\n") == [200]
    assert status_of(server, head + b"".join(b"X-%d: y\r\n" % i for i in range(99)) + b"\r\n") == [431]


def test_head_size_limit(server: TiamatServer) -> None:
    fields = b"".join(b"X-%d: %s\r\n" % (i, b"v" * 1500) for i in range(50))  # ~75 KiB
    assert status_of(server, b"GET / HTTP/1.1\r\nHost: t\r\n" + fields + b"\r\n") == [431]


def test_endless_head_in_pieces_is_cut_off(server: TiamatServer) -> None:
    """A head still arriving is refused once past the 64 KiB limit, without waiting for its end.

    (That the reader's buffer stays bounded meanwhile is checked in test_reader_unit.py.)
    """
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nX: ")
        try:
            for _ in range(100):  # 100 KB in 1 KB pieces, and the head never ends
                sock.sendall(b"a" * 1000)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = read_until_close(sock, 10)
    assert statuses(data) == [431]


def test_trickled_long_request_line(server: TiamatServer) -> None:
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        line = request_line(9000)
        try:
            for i in range(len(line)):
                sock.send(line[i:i + 1])
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert statuses(read_until_close(sock, 10)) == [414]


def test_body_limit_from_content_length_before_reading(server: TiamatServer) -> None:
    """413 from the Content-Length alone: no 100 Continue, no body read."""
    head = (b"POST /hit HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n"
            % (BODY_LIMIT + 1))
    data = exchange(server, head)
    assert statuses(data) == [413]
    assert b"100 Continue" not in data
    ok = (b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
          % BODY_LIMIT) + b"x" * BODY_LIMIT
    data = exchange(server, ok)
    assert statuses(data) == [200] and b'"body_len": %d' % BODY_LIMIT in data


def test_body_limit_while_reading_chunked(server: TiamatServer) -> None:
    head = b"POST /hit HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n%s\r\n" % (40_000, b"y" * 40_000)
    assert status_of(server, head + chunk * 3 + b"0\r\n\r\n") == [413]
    head = head.replace(b"/hit", b"/echo").replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    data = exchange(server, head + chunk * 2 + b"0\r\n\r\n")
    assert b'"body_len": 80000' in data


def test_chunk_extensions_are_bounded(server: TiamatServer) -> None:
    head = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert status_of(server, head + b"1;a=" + b"b" * 5000 + b"\r\nx\r\n0\r\n\r\n") == [400]
    # an extension that never ends is cut off too
    assert status_of(server, head + b"1;a=" + b"b" * 100_000) == [400]


def test_error_response_survives_unread_upload(server: TiamatServer) -> None:
    """A lingering close: the 413 and then a clean end of stream, not a reset.

    Closing a socket that still holds unread upload bytes sends a reset, which can destroy
    the response in flight.  The server must stop writing (FIN) and keep draining instead, so
    this client, still uploading, reads the whole 413 and then a clean EOF.
    """
    head = b"POST /hit HTTP/1.1\r\nHost: t\r\nContent-Length: 50000000\r\n\r\n"
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(head)
        stop = threading.Event()

        def upload() -> None:
            block = b"z" * 65536
            try:
                while not stop.is_set():
                    sock.send(block)
                    time.sleep(0.001)
            except OSError:
                pass

        thread = threading.Thread(target=upload, daemon=True)
        thread.start()
        try:
            data, ending = read_to_end(sock)
        finally:
            stop.set()
        thread.join(5)
    assert statuses(data) == [413], data[:200]
    assert ending == "eof"


def test_error_response_survives_an_upload_already_sent(server: TiamatServer) -> None:
    """The same, deterministically: the body over the limit is all sent before the client
    reads, so it sits unread at the server when the 413 goes out.  Closed at once, the
    server's socket would reset the connection (the asgi worker did, every time)."""
    head = b"POST /hit HTTP/1.1\r\nHost: t\r\nContent-Length: 5000000\r\n\r\n"
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(head)
        sock.sendall(b"z" * 200_000)  # (the kernel's buffers take it all)
        time.sleep(0.3)  # the server answers and closes meanwhile
        data, ending = read_to_end(sock)
    assert statuses(data) == [413], data[:200]
    assert ending == "eof"


def test_default_body_limit_is_100_mib(tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = start_server(tmp_path_factory.mktemp("deflimit"), "sync")
    try:
        over = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (100 * 1024 * 1024 + 1)
        assert statuses(exchange(srv, over)) == [413]
    finally:
        srv.stop()


def test_body_limit_zero_is_unlimited(tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = start_server(tmp_path_factory.mktemp("nolimit"), "sync", "--limit-request-body", "0")
    try:
        head = (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n"
                % (10 * 1024 ** 3))
        with socket.create_connection((srv.host, srv.port), timeout=5) as sock:
            sock.sendall(head)
            assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
    finally:
        srv.stop()


def test_limits_with_the_h11_tokeniser(tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = start_server(tmp_path_factory.mktemp("h11limits"), "sync", "--http", "h11",
                       "--limit-request-body", "1000")
    try:
        assert status_of(srv, request_line(8191) + b"\r\nHost: t\r\n\r\n") == [414]
        assert status_of(srv, b"GET / HTTP/1.1\r\nHost: t\r\nX: " + b"v" * 8190 + b"\r\n\r\n") == [431]
        assert status_of(srv, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1001\r\n\r\n") == [413]
        ok = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        assert status_of(srv, ok) == [200]
    finally:
        srv.stop()
