"""Slow clients: header, body, keep-alive and send timeouts; one worker stays responsive.

The headline test (``test_trickling_clients_do_not_delay_others``) runs the issue's
scenario for a bounded time: one worker process, 200 connections trickling one header byte
a second and one client uploading a 1 MB body at 10 KB/s, for about 3 seconds, while a
normal client makes requests on new connections.  Margin: on an idle machine those requests
take a few milliseconds; the test asserts a median under 100 ms and every one under 500 ms,
which leaves room for the other test processes sharing the 2 cores, yet fails at once if a
slow client ever blocks the worker (that costs a whole trickle interval, 1 s).
"""

from __future__ import annotations

import socket
import statistics
import threading
import time
from collections.abc import Iterator

import pytest
from apps.sec_support import WORKERS, echo, exchange, read_until_close, start_server, statuses
from conftest import TiamatServer

SHORT = ["--header-timeout", "1", "--body-timeout", "1", "--keep-alive", "1", "--send-timeout", "1"]


@pytest.fixture(scope="module", params=WORKERS)
def short(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[TiamatServer]:
    """A server with 1-second timeouts."""
    srv = start_server(tmp_path_factory.mktemp("slow"), request.param, *SHORT)
    srv.worker = request.param  # type: ignore[attr-defined]
    yield srv
    srv.stop()


def timed_close(server: TiamatServer, raw: bytes, timeout: float = 6.0) -> tuple[bytes, float]:
    start = time.monotonic()
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        if raw:
            sock.sendall(raw)
        data = read_until_close(sock, timeout)
    return data, time.monotonic() - start


def test_header_timeout_answers_408(short: TiamatServer) -> None:
    data, elapsed = timed_close(short, b"GET / HTTP/1.1\r\nHost: t\r\n")
    assert statuses(data) == [408]
    assert 0.5 <= elapsed < 4


def test_header_timeout_counts_from_accept(short: TiamatServer) -> None:
    """A client that connects and sends nothing is dropped after the header timeout."""
    data, elapsed = timed_close(short, b"")
    assert statuses(data) in ([], [408])
    assert 0.5 <= elapsed < 4


def test_header_timeout_is_not_reset_by_trickling(short: TiamatServer) -> None:
    start = time.monotonic()
    with socket.create_connection((short.host, short.port), timeout=6) as sock:
        head = b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 100
        try:
            for byte in head:
                sock.send(bytes([byte]))
                time.sleep(0.05)  # 100 bytes over 5 s: well past the 1 s header timeout
                if time.monotonic() - start > 5:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = read_until_close(sock, 6)
    assert statuses(data) == [408]
    assert time.monotonic() - start < 5


def test_header_timeout_of_a_pipelined_request_waits_for_the_response(short: TiamatServer) -> None:
    """The partial request behind a slow one times out from the end of that response."""
    data, elapsed = timed_close(
        short, b"GET /sleep?1500 HTTP/1.1\r\nHost: t\r\n\r\nGET /hit HTTP/1.1\r\n", timeout=8)
    assert statuses(data) == [200, 408], data[:400]
    assert b"slept" in data
    assert 2 <= elapsed < 6


def test_body_timeout_answers_408(short: TiamatServer) -> None:
    data, elapsed = timed_close(
        short, b"POST /hit HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nab")
    assert statuses(data) == [408]
    assert 0.5 <= elapsed < 4


def test_keep_alive_idle_timeout(short: TiamatServer) -> None:
    data, elapsed = timed_close(short, b"GET /hit HTTP/1.1\r\nHost: t\r\n\r\n")
    assert statuses(data) == [200]
    assert 0.5 <= elapsed < 4


def test_send_timeout_drops_a_client_that_stops_reading(short: TiamatServer) -> None:
    size = 64 * 1024 * 1024
    with socket.create_connection((short.host, short.port), timeout=10) as stuck:
        stuck.sendall(b"GET /big?%d HTTP/1.1\r\nHost: t\r\n\r\n" % size)
        time.sleep(0.3)  # let the worker start writing and get stuck
        start = time.monotonic()
        info = echo(short, timeout=10)  # another client is served within ~the send timeout
        assert info["method"] == "GET"
        assert time.monotonic() - start < 4
        # the stuck client was dropped: what it can still read ends well short of the body
        time.sleep(1.5)
        received = len(read_until_close(stuck, 10))
    assert received < size


def test_large_bodies_spool_to_a_file(tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = start_server(tmp_path_factory.mktemp("spool"), "sync", "--body-buffer-size", "100000")
    try:
        for size, in_memory in ((50_000, True), (300_000, False)):
            raw = (b"POST /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                   % size) + b"b" * size
            data = exchange(srv, raw)
            assert b'"body_len": %d' % size in data
            assert (b'"body_in_memory": true' in data) is in_memory
    finally:
        srv.stop()


@pytest.mark.parametrize("worker", WORKERS)
def test_trickling_clients_do_not_delay_others(worker: str,
                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    srv = start_server(tmp_path_factory.mktemp("trickle"), worker)
    stop = threading.Event()
    tricklers: list[socket.socket] = []
    errors: list[BaseException] = []
    try:
        for _ in range(200):
            tricklers.append(socket.create_connection((srv.host, srv.port), timeout=5))
        uploader = socket.create_connection((srv.host, srv.port), timeout=5)
        tricklers.append(uploader)
        uploader.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\n")
        head = b"GET / HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"s" * 1000

        def trickle() -> None:
            try:
                tick = 0
                while not stop.is_set():
                    for sock in tricklers[:-1]:
                        sock.send(head[tick:tick + 1])
                    tick += 1
                    for _ in range(10):  # 10 KB/s in 1 KB pieces
                        uploader.send(b"u" * 1024)
                        if stop.wait(0.1):
                            return
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        thread = threading.Thread(target=trickle, daemon=True)
        thread.start()
        time.sleep(0.3)
        latencies = []
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            start = time.monotonic()
            info = echo(srv, timeout=5)
            latencies.append(time.monotonic() - start)
            assert info["method"] == "GET"
            time.sleep(0.05)
        stop.set()
        thread.join(5)
        assert not errors, errors
        assert len(latencies) >= 10
        assert statistics.median(latencies) < 0.1, latencies
        # (one slow answer on a loaded machine is not the bug: a worker stuck behind a
        # trickler would make most of them take a second or more)
        assert sorted(latencies)[-2] < 0.5, latencies
    finally:
        stop.set()
        for sock in tricklers:
            sock.close()
        srv.stop()
