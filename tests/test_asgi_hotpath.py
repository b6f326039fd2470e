"""The asgi worker's per-request shortcuts give exactly what the plain computation gives.

``tiamat.asgi`` keeps small per-worker caches on the request path (app header pairs as wire
lines, Content-Length lines, scope paths, decide_framing's answers); these tests check that a
cached answer equals a fresh one, that the caches stay bounded, and, against a real server,
that responses stay exact while the caches fill up, empty and refill.
"""

from __future__ import annotations

import asyncio
import itertools
import socket

import pytest
from conftest import read_response

from tiamat.asgi import http as asgi_http
from tiamat.asgi.state import ServerState
from tiamat.config import load_config
from tiamat.http import response
from tiamat.http.response import connection_header, decide_framing, head_end, status_line

APP = "tests/apps/asgi_hotpath_app.py:app"


@pytest.fixture
def state() -> ServerState:
    loop = asyncio.new_event_loop()
    try:
        yield ServerState(None, load_config({}), loop, None, None, None)
    finally:
        loop.close()


def test_framing_memo_matches_decide_framing(state):
    """The memo is keyed on whether a length is known, not on the length itself: this holds
    only while decide_framing depends on nothing else, which this grid checks."""
    for status, length, method, version, keep_alive in itertools.product(
            (100, 101, 200, 204, 304, 404, 500), (None, 0, 5, 10**9), (b"GET", b"HEAD", b"POST"),
            ("1.0", "1.1"), (True, False)):
        for _ in range(2):  # a fresh answer, then the memoised one
            framing, line, chunked = state.framing(status, length is None, method, version,
                                                   keep_alive)
            expected = decide_framing(status, length, method, version, keep_alive,
                                      state.server_keep_alive)
            assert framing == expected
            assert line == status_line(status)
            assert chunked == (b"Transfer-Encoding: chunked\r\n" if expected.chunked else b"")
            end = head_end(framing.keep_alive, version)
            assert end.endswith(connection_header(expected.keep_alive, version) + b"\r\n")


def test_header_block_cached_equals_fresh():
    headers = [(b"content-type", b"text/plain"), (b"Content-Length", b"13"),
               [b"x-list", b"1"], (b"connection", b"Close"), (b"transfer-encoding", b"chunked"),
               (b"X-Other", b"v")]
    first = asgi_http.header_block(headers)
    assert first == (b"content-type: text/plain\r\nx-list: 1\r\nX-Other: v\r\n", b"13", True)
    assert asgi_http.header_block(headers) == first  # from the cache
    assert asgi_http.header_block([(b"connection", b"keep-alive")]) == (b"", None, False)


@pytest.mark.parametrize("pair", [(b"x-bad", b"a\r\nInjected: 1"), (b"x-bad\n", b"v"),
                                  (b"x-bad", b"a\rb"), [b"x-bad", b"a\nb"]])
def test_header_injection_refused_every_time(pair):
    for _ in range(2):  # a refused pair is never cached as a line
        with pytest.raises(RuntimeError):
            asgi_http.header_block([(b"content-type", b"text/plain"), pair])


def test_caches_stay_bounded(state):
    for n in range(3000):
        asgi_http.header_block([(b"x-id", b"%d" % n), (b"content-length", b"%d" % n)])
        response.content_length_parts(n)
        asgi_http._scope_path(state.paths, state, b"/item/%d" % n)
    assert len(asgi_http._LINES) <= asgi_http.MEMO_ENTRIES
    assert len(response.CONTENT_LENGTHS) <= asgi_http.MEMO_ENTRIES
    assert len(state.paths) <= asgi_http.MEMO_ENTRIES
    long_path = b"/" + b"a" * 1000
    assert asgi_http._scope_path(state.paths, state, long_path) == (long_path.decode(), long_path)
    assert long_path not in state.paths


def test_scope_path_under_root_path():
    loop = asyncio.new_event_loop()
    try:
        state = ServerState(None, load_config({"root_path": "/app/"}), loop, None, None, None)
    finally:
        loop.close()
    for _ in range(2):
        assert asgi_http._scope_path(state.paths, state, b"/a%20b") == ("/app/a b", b"/app/a%20b")


def test_responses_stay_exact_while_caches_churn(tiamat_server):
    """1200 keep-alive requests with varying paths, header values and lengths: more distinct
    values than any cache holds, so each one empties and refills during the test."""
    server = tiamat_server("-k", "asgi", APP)
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        rest = b""
        batch = 50  # pipelined in batches: fast, and the reader sees several heads per read
        for first in range(0, 1200, batch):
            sock.sendall(b"".join(b"GET /p%d%%20q?%d HTTP/1.1\r\nHost: t\r\n\r\n" % (n, n)
                                  for n in range(first, first + batch)))
            for n in range(first, first + batch):
                head, body, rest = read_response(sock, rest)
                status = b"200 OK" if n % 7 else b"201 Created"
                assert head.startswith(b"HTTP/1.1 " + status + b"\r\n"), (n, head)
                expected = b"/p%d q|/p%d%%20q|" % (n, n) + b"x" * (n % 700)
                assert body == expected, n
                lines = head.split(b"\r\n")[1:]
                assert b"x-n: %d" % n in lines
                assert b"x-list-pair: %d" % (n % 3) in lines
                assert lines.count(b"Content-Length: %d" % len(expected)) == 1, (n, head)
                assert not any(line.lower().startswith((b"connection", b"transfer-encoding"))
                               for line in lines), (n, head)


class _Transport(asyncio.Transport):
    """Records what the protocol writes (in-process: the Date test steers the clock)."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


async def _hello(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x", b"y")]})
    await send({"type": "http.response.body", "body": b"hi"})


def test_date_line_follows_the_clock_both_ways(monkeypatch):
    """The Date line (the core's head_end) is kept for its second: a later second, or a clock
    set back, renews it, and it always names the second of the clock."""
    clock = [1_000_000.25]
    monkeypatch.setattr(response.time, "time", lambda: clock[0])

    async def main() -> list[bytes]:
        state = ServerState(_hello, load_config({}), asyncio.get_running_loop(), None, None,
                            None)
        protocol = asgi_http.HttpProtocol(state)
        transport = _Transport()
        protocol.connection_made(transport)
        dates = []
        for now in (1_000_000.25, 1_000_000.75, 1_000_001.5, 999_990.5):
            clock[0] = now
            protocol.data_received(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            for _ in range(100):
                if len(transport.written) > len(dates):
                    break
                await asyncio.sleep(0)
            reply = transport.written[-1]
            assert reply.endswith(b"\r\n\r\nhi") and not transport.closed
            date = reply.split(b"\r\nDate: ")[1].split(b"\r\n")[0]
            assert date == response.http_date(int(now)).encode(), (now, date)
            dates.append(date)
        return dates

    dates = asyncio.run(main())
    assert len(set(dates)) == 3  # (the first two are the same second)


def test_task_tracking_with_an_eager_task_factory():
    """An app may install an eager task factory (Python 3.12+): a request that runs to its end
    inside create_task must neither break Cycle.run's bookkeeping nor stay in state.tasks."""

    def eager(loop, coro, **kwargs):  # what asyncio.eager_task_factory does for such a coroutine
        future = loop.create_future()
        try:
            coro.send(None)
        except StopIteration:
            future.set_result(None)
            return future
        raise AssertionError("the test app does not suspend")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(eager)
        state = ServerState(_hello, load_config({}), loop, None, None, None)
        protocol = asgi_http.HttpProtocol(state)
        transport = _Transport()
        protocol.connection_made(transport)
        for count in (1, 2, 3):
            protocol.data_received(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert len(transport.written) == count
            assert transport.written[-1].endswith(b"\r\n\r\nhi")
        assert not transport.closed and not state.tasks and protocol.cycle is None

    asyncio.run(main())
