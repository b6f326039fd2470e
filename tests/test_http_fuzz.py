"""Property test: random and mutated requests never crash a worker or hang a connection.

For every example a new connection sends the bytes (split at random points), half-closes,
and must see the server close within the timeouts; a well-formed request on a new
connection must then still be answered correctly.  At the end the worker process must be
the same one (no crash, no respawn) and the log free of tracebacks.  Examples are bounded
(``max_examples``) so the whole file runs in seconds per worker class.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from apps.sec_support import WORKERS, read_until_close, start_server, statuses
from conftest import TiamatServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TIMEOUTS = ["--header-timeout", "1", "--body-timeout", "1", "--keep-alive", "1",
            "--limit-request-body", "100000"]
#: a request must be finished (answered or refused, then closed) within this many seconds
HANG_LIMIT = 4.0

SEEDS = [
    b"GET / HTTP/1.1\r\nHost: t\r\n\r\n",
    b"GET /echo?x=1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\nX-A: b\r\n\r\n",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
    b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;e=1\r\nhello\r\n0\r\nT: 1\r\n\r\n",
    b"GET / HTTP/1.0\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx",
    b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET /hit HTTP/1.1\r\nHost: t\r\n\r\nGET /hit HTTP/1.1\r\nHost: t\r\n\r\n",
]
TOKENS = [b"\r\n", b"\n", b"\r", b" ", b"\t", b":", b",", b";", b"\x00", b"\xa0", b"\x85", b"0x",
          b"chunked", b"Transfer-Encoding: ", b"Content-Length: ", b"Host: ", b"HTTP/1.1",
          b"\r\n\r\n", b"-1", b"99999999999999999999", b"ffffffffffffffffff", b"\r\n \r\n"]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["insert", "delete", "replace", "token", "dup"]))
        pos = draw(st.integers(0, len(data)))
        if kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        elif kind == "replace" and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif kind == "token":
            data[pos:pos] = draw(st.sampled_from(TOKENS))
        else:
            data += data[pos:]
    return bytes(data)


requests = st.one_of(mutated(), st.binary(max_size=300),
                     st.lists(st.sampled_from(TOKENS + SEEDS), max_size=12).map(b"".join))


@pytest.fixture(scope="module", params=[*WORKERS, "sync-h11"])
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[TiamatServer]:
    worker, _, tokeniser = request.param.partition("-")
    extra = ["--http", tokeniser] if tokeniser else []
    srv = start_server(tmp_path_factory.mktemp("fuzz"), worker, *TIMEOUTS, *extra)
    srv.first_workers = srv.worker_pids()  # type: ignore[attr-defined]
    yield srv
    srv.stop()


def send_in_pieces(server: TiamatServer, data: bytes, cuts: list[int]) -> bytes:
    with socket.create_connection((server.host, server.port), timeout=HANG_LIMIT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        start = 0
        try:
            for cut in sorted(c % (len(data) + 1) for c in cuts):
                sock.sendall(data[start:cut])
                start = cut
            sock.sendall(data[start:])
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # the server may close first (it refused the request): fine
            pass
        return read_until_close(sock, HANG_LIMIT)


def still_serves(server: TiamatServer) -> None:
    with socket.create_connection((server.host, server.port), timeout=HANG_LIMIT) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
                     b"Content-Length: 3\r\n\r\nabc")
        data = read_until_close(sock, HANG_LIMIT)
    assert statuses(data) == [200], data[:200]
    assert b'"body_len": 3' in data


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=requests, cuts=st.lists(st.integers(0, 400), max_size=3))
def test_random_requests(server: TiamatServer, data: bytes, cuts: list[int]) -> None:
    response = send_in_pieces(server, data, cuts)
    for status in statuses(response):
        assert status < 500 or status == 501 or status == 505, response[:300]
    still_serves(server)


@settings(max_examples=6, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=mutated())
def test_without_half_close_times_out(server: TiamatServer, data: bytes) -> None:
    """A client that neither finishes nor closes is cut off by the timeouts."""
    with socket.create_connection((server.host, server.port), timeout=HANG_LIMIT) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass
        read_until_close(sock, HANG_LIMIT)


def test_worker_survived(server: TiamatServer) -> None:
    """Runs after the property tests of the same worker class (file order)."""
    assert server.worker_pids() == server.first_workers  # type: ignore[attr-defined]
    log = server.log()
    assert "Traceback" not in log, log[-3000:]
    assert "crashed" not in log
    still_serves(server)
