"""Issue 2, items 6 and 7: the sync worker's HTTP/1.1 behaviour, seen from raw sockets.

Persistent connections and pipelining, request bodies by length and chunked, chunked
responses, HEAD, 100-continue, Connection: close, HTTP/1.0, Date/Server, idle clients that
must not block anyone, app errors, and the basic 400 cases (the full RFC 9112 matrix lives
in tests/test_http_*.py).
"""

from __future__ import annotations

import http.client
import socket
import time
from email.utils import parsedate_to_datetime

import pytest
from conftest import APPS, TiamatServer, read_until_closed, wait_for


# --- a minimal HTTP/1.x response reader for raw sockets -----------------------------------------
class Response:
    def __init__(self, status: int, reason: str, version: str, headers: list[tuple[str, str]],
                 body: bytes, complete: bool) -> None:
        self.status, self.reason, self.version = status, reason, version
        self.headers, self.body, self.complete = headers, body, complete

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return ", ".join(values) if values else None


class Reader:
    """Reads responses one at a time from a socket (so pipelined responses can be split)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.eof = False

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not self._fill():
                raise EOFError(f"connection closed; got {self.buffer!r}")
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _exactly(self, n: int) -> bytes:
        while len(self.buffer) < n:
            if not self._fill():
                break
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def read(self, head_request: bool = False) -> Response:
        version, status, reason = self._line().decode("latin-1").split(" ", 2)
        headers = []
        while line := self._line():
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name, value.strip()))
        response = Response(int(status), reason, version, headers, b"", True)
        if head_request or response.status in (204, 304) or response.status < 200:
            return response
        length = response.header("Content-Length")
        if response.header("Transfer-Encoding") == "chunked":
            body = b""
            try:
                while True:
                    size = int(self._line().split(b";")[0], 16)
                    if size == 0:
                        while self._line():
                            pass
                        break
                    body += self._exactly(size)
                    self._line()
            except (EOFError, ValueError):
                response.complete = False
            response.body = body
        elif length is not None:
            response.body = self._exactly(int(length))
            response.complete = len(response.body) == int(length)
        else:
            while self._fill():
                pass
            response.body, self.buffer = self.buffer, b""
        return response

    def closed_by_server(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        if self.buffer:
            return False
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


def connect(server, timeout: float = 5.0) -> tuple[socket.socket, Reader]:
    sock = socket.create_connection((server.host, server.port), timeout=timeout)
    return sock, Reader(sock)


def exchange(server, raw: bytes, head_request: bool = False) -> Response:
    sock, reader = connect(server)
    with sock:
        sock.sendall(raw)
        return reader.read(head_request)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One sync worker serving the validated core app, shared by this module's tests."""
    srv = TiamatServer(["-b", "127.0.0.1:0", "-w", "1", "-k", "sync", "core_app:validated"],
                       tmp_path_factory.mktemp("sync"), cwd=APPS)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


GET = b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n"


# --- persistent connections ---------------------------------------------------------------
def test_keep_alive_serves_many_requests_on_one_connection(server):
    sock, reader = connect(server)
    with sock:
        for i in range(5):
            sock.sendall(GET % f"/environ?i={i}".encode())
            response = reader.read()
            assert response.status == 200 and response.header("Connection") is None
            assert f'"QUERY_STRING": "i={i}"'.encode() in response.body
        port = sock.getsockname()[1]
    assert str(port).encode() in response.body, "all five came over the same connection"


def test_pipelined_requests_are_answered_in_order(server):
    sock, reader = connect(server)
    with sock:
        sock.sendall(b"".join(GET % f"/environ?n={i}".encode() for i in range(4))
                     + b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
                     + GET % b"/stream?n=2")
        for i in range(4):
            assert f'"QUERY_STRING": "n={i}"'.encode() in reader.read().body
        assert reader.read().body == b"hello"
        assert reader.read().body == b"part 0\npart 1\n"


def test_content_length_request_body(server):
    body = b"x" * 100_000
    response = exchange(server, b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(body), body))
    assert response.status == 200 and response.body == body


def test_chunked_request_body(server):
    raw = (b"POST /echo?mode=readline HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"4\r\nab\nc\r\n6;ext=1\r\nd\nefgh\r\n0\r\nTrailer: x\r\n\r\n")
    response = exchange(server, raw)
    assert response.status == 200 and response.body == b"[ab\n][cd\n][efgh]"


def test_chunked_response_when_the_app_gives_no_length(server):
    response = exchange(server, GET % b"/stream?n=3")
    assert response.header("Transfer-Encoding") == "chunked"
    assert response.header("Content-Length") is None
    assert response.complete and response.body == b"part 0\npart 1\npart 2\n"


def test_single_item_response_gets_a_content_length(server):
    response = exchange(server, GET % b"/write")  # write() + an iterable: no length known
    assert response.header("Transfer-Encoding") == "chunked"
    assert response.body == b"written and returned\n"


def test_head_has_headers_but_no_body(server):
    sock, reader = connect(server)
    with sock:
        sock.sendall(b"HEAD / HTTP/1.1\r\nHost: t\r\n\r\n" + GET % b"/")
        head = reader.read(head_request=True)
        assert head.status == 200 and head.header("Content-Length") == "20"
        after = reader.read()  # would be garbled if the HEAD response had carried a body
        assert after.body == b"hello from core_app\n"
        sock.sendall(b"HEAD /stream HTTP/1.1\r\nHost: t\r\n\r\n" + GET % b"/")
        assert reader.read(head_request=True).status == 200
        assert reader.read().body == b"hello from core_app\n"


def test_204_has_no_body_and_no_length(server):
    response = exchange(server, GET % b"/empty")
    assert response.status == 204 and response.header("Content-Length") is None
    assert response.header("Transfer-Encoding") is None


def test_expect_100_continue(server):
    sock, reader = connect(server)
    with sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        interim = reader.read()
        assert (interim.status, interim.version) == (100, "HTTP/1.1")
        sock.sendall(b"data")
        final = reader.read()
        assert final.status == 200 and final.body == b"data"


def test_connection_close_from_the_client(server):
    sock, reader = connect(server)
    with sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        response = reader.read()
        assert response.status == 200 and response.header("Connection") == "close"
        assert reader.closed_by_server()


def test_connection_close_from_the_app(server):
    sock, reader = connect(server)
    with sock:
        sock.sendall(GET % b"/close")
        response = reader.read()
        assert response.body == b"bye" and response.header("Connection") == "close"
        assert reader.closed_by_server()


def test_http10_without_keep_alive_closes(server):
    sock, reader = connect(server)
    with sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        response = reader.read()
        assert response.status == 200 and response.body == b"hello from core_app\n"
        assert reader.closed_by_server()


def test_http10_keep_alive(server):
    sock, reader = connect(server)
    with sock:
        for _ in range(2):
            sock.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            response = reader.read()
            assert response.status == 200 and response.header("Connection") == "keep-alive"
        sock.sendall(b"GET /stream HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        streamed = reader.read()  # no length and no chunked in 1.0: the close ends the body
        assert streamed.header("Transfer-Encoding") is None
        assert streamed.header("Connection") == "close"
        assert streamed.body == b"part 0\npart 1\npart 2\n"


def test_date_and_server_headers(server):
    response = exchange(server, GET % b"/")
    assert response.header("Server") == "tiamat"
    date = parsedate_to_datetime(response.header("Date"))
    assert abs(date.timestamp() - time.time()) < 5


def test_http_client_interoperates(server):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        for _ in range(3):
            conn.request("POST", "/echo?mode=iter", body=b"a\nb\n")
            response = conn.getresponse()
            assert response.status == 200 and response.read() == b"[a\n][b\n]"
    finally:
        conn.close()


# --- idle clients must not hold the worker -----------------------------------------------
def test_idle_keep_alive_connections_do_not_block_a_new_client(server):
    idle = []
    try:
        for i in range(100):
            sock, reader = connect(server)
            idle.append(sock)
            if i % 2 == 0:  # half made a request and now sit idle on keep-alive
                sock.sendall(GET % b"/")
                assert reader.read().status == 200
            # the other half connected and never sent a byte
        started = time.monotonic()
        response = exchange(server, GET % b"/")
        assert response.status == 200
        assert time.monotonic() - started < 3.0  # at once, with a margin for a loaded machine
        # and a client trickling its head byte by byte does not block anyone either
        slow, _ = connect(server)
        idle.append(slow)
        slow.sendall(b"GET / HTT")
        started = time.monotonic()
        assert exchange(server, GET % b"/").status == 200
        assert time.monotonic() - started < 3.0  # at once, with a margin for a loaded machine
    finally:
        for sock in idle:
            sock.close()


# --- app errors -----------------------------------------------------------------------------
def test_app_exception_gives_500_and_a_logged_traceback(server):
    response = exchange(server, GET % b"/error")
    assert response.status == 500 and response.header("Connection") == "close"
    log = server.wait_log(r"Error handling request GET /error\n(?s:.*?)RuntimeError: boom from the app")
    assert "Traceback (most recent call last)" in log.group(0)


def test_exception_after_the_response_started_closes_the_connection(server):
    sock, reader = connect(server)
    with sock:
        sock.sendall(GET % b"/error-after-start")
        response = reader.read()
        assert response.status == 200 and not response.complete
        assert response.body == b"first part\n"
        assert reader.eof or reader.closed_by_server()
    server.wait_log(r"RuntimeError: boom mid-response")


# --- malformed requests: 400 and close --------------------------------------------------------
@pytest.mark.parametrize("raw", [
    b"\x00\x01\x02 nonsense\r\n\r\n",
    b"GET / HTTP/1.1 x\r\nHost: t\r\n\r\n",
    b"GET /\x01 HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nBad Header Name: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: t\r\nNoColon\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 without Host
    b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: abc\r\n\r\n",
])
def test_malformed_request_gets_400_and_the_connection_closes(server, raw):
    sock, reader = connect(server)
    with sock:
        sock.sendall(raw + GET % b"/")  # a request pipelined after it is never answered
        response = reader.read()
        assert response.status == 400
        assert response.header("Connection") == "close"
        assert reader.closed_by_server()


def test_server_keeps_serving_after_bad_requests(server):
    exchange(server, b"GET\r\n\r\n")
    assert exchange(server, GET % b"/").status == 200


def test_no_validator_complaints_in_the_log(server):
    """Runs last in this module: the PEP 3333 validator wrapped every request above."""
    wait_for(lambda: exchange(server, GET % b"/").status == 200)
    log = server.log()
    assert "WSGIWarning" not in log
    assert "AssertionError" not in log
    assert "Exception ignored" not in log


def test_a_read_that_fills_the_buffer_is_read_on_without_a_new_report(server):
    """Connections are watched edge-triggered: bytes left in the socket after a read that
    filled its 64 KiB buffer are reported by no new event, so the worker reads on by itself.
    2,500 pipelined requests (~80 KB) sent at once must all be answered."""
    count = 2500
    sock, reader = connect(server, timeout=10)
    with sock:
        sock.sendall(b"".join(GET % f"/?{i:05d}".encode() for i in range(count)))
        assert len(GET % b"/?00000") * count > 65536
        for _ in range(count):
            assert reader.read().status == 200


@pytest.mark.parametrize("kind", ["sync", "thread"])
def test_a_request_and_a_half_close_in_one_go_see_the_close_at_once(tiamat_server, kind):
    """Edge-triggered, a client's close that arrives with its request is reported once, with
    the request: the worker must read once more to see it, not wait for the keep-alive
    timeout (30 s here) to close the connection."""
    server = tiamat_server("tests/apps/wk_wsgi.py", "-k", kind, "--threads", "2",
                           "--keep-alive", "30")
    for _ in range(5):
        with socket.create_connection((server.host, server.port), timeout=10) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            sock.shutdown(socket.SHUT_WR)
            start = time.monotonic()
            data = read_until_closed(sock)
            assert data.startswith(b"HTTP/1.1 200"), data
            assert time.monotonic() - start < 5, "closed only by the keep-alive timeout"
