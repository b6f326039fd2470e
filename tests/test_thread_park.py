"""``-k thread``: an answered keep-alive connection is parked with the pool for a while, and
idle pool threads serve its next requests themselves (``ThreadWorker._park``); everything
they cannot serve goes back to the loop, and parked connections hold no thread."""

from __future__ import annotations

import random
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import read_response, read_until_closed, wait_for

APP = "tests/apps/wk_wsgi.py"


def _get(sock: socket.socket, path: str) -> tuple[bytes, bytes]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    head, body, left = read_response(sock)
    assert left == b""
    return head, body


def test_a_parked_connection_is_served_by_the_pool(tiamat_server):
    server = tiamat_server(APP, "-k", "thread", "--threads", "4", "-w", "1")
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        names = set()
        for _ in range(12):
            head, body = _get(sock, "/info")
            assert head.startswith(b"HTTP/1.1 200")
            names.add(body.split(b"thread=")[1].split()[0])
            time.sleep(0.01)  # (the next request finds the connection parked)
    assert names and all(name.startswith(b"tiamat-") for name in names), names


@pytest.mark.parametrize("tokeniser", ["httptools", "h11"])
def test_what_the_pool_cannot_serve_goes_back_to_the_loop(tiamat_server, tokeniser):
    server = tiamat_server(APP, "-k", "thread", "--threads", "2", "-w", "1", "--http", tokeniser)
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        for _ in range(5):  # (answered by the loop's hand-off, then from the parked connection)
            assert _get(sock, "/")[1] == b"hello"
        # a request with a body
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nabcde")
        head, body, left = read_response(sock)
        assert head.startswith(b"HTTP/1.1 200") and body == b"abcde" and left == b""
        # a body that comes after its head
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\n")
        time.sleep(0.05)
        sock.sendall(b"xyz")
        assert read_response(sock)[1] == b"xyz"
        # a head in two pieces
        sock.sendall(b"GET /info HTTP/1.1\r\nHo")
        time.sleep(0.05)
        sock.sendall(b"st: t\r\n\r\n")
        assert read_response(sock)[1].startswith(b"pid=")
        # two pipelined requests in one write
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\nGET /echo HTTP/1.1\r\nHost: t\r\n"
                     b"Content-Length: 2\r\n\r\nok")
        head, body, left = read_response(sock)
        assert body == b"hello"
        head, body, left = read_response(sock, left)
        assert body == b"ok" and left == b""
        # still parked and served after all that
        assert _get(sock, "/")[1] == b"hello"
        # a malformed head: 400, and the connection closed
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nno colon here\r\n\r\n")
        data = read_until_closed(sock)
        assert data.startswith(b"HTTP/1.1 400"), data


def test_parked_connections_keep_no_request_waiting(tiamat_server):
    # 2 threads; two connections answered just before are parked.  A third client's request
    # must not wait for them to go back to the loop (HOLD_FOR, 0.25 s): a parked connection
    # holds no thread.  8 rounds with each thread kept by a connection take about 2 s.
    server = tiamat_server(APP, "-k", "thread", "--threads", "2", "-w", "1", "--keep-alive", "5")
    parked = [socket.create_connection((server.host, server.port), timeout=10) for _ in range(2)]
    waits = []
    try:
        for _ in range(8):
            for sock in parked:
                assert _get(sock, "/")[1] == b"hello"
            with socket.create_connection((server.host, server.port), timeout=10) as third:
                start = time.monotonic()
                assert _get(third, "/")[1] == b"hello"
                waits.append(time.monotonic() - start)
        for sock in parked:  # and the parked connections still work
            assert _get(sock, "/")[1] == b"hello"
    finally:
        for sock in parked:
            sock.close()
    # (a few ms each; a request left waiting for its turn took HOLD_FOR, 0.25 s)
    assert statistics.median(waits) < 0.1, waits


def test_requests_served_from_parked_connections_count_for_max_requests(tiamat_server):
    server = tiamat_server(APP, "-k", "thread", "--threads", "2", "-w", "1",
                           "--max-requests", "40")
    first = server.worker_pids()
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        for _ in range(60):
            assert _get(sock, "/")[1] == b"hello"
    server.wait_log(r"served \d+ requests \(max_requests\)", timeout=10)
    wait_for(lambda: server.worker_pids() and server.worker_pids() != first, timeout=15,
             message="the worker replaced after max_requests")


def test_a_stop_takes_parked_connections_back_at_once(tiamat_server):
    server = tiamat_server(APP, "-k", "thread", "--threads", "4", "-w", "1", "--keep-alive", "30")
    socks = [socket.create_connection((server.host, server.port), timeout=10) for _ in range(3)]
    try:
        for sock in socks:
            assert _get(sock, "/")[1] == b"hello"
        start = time.monotonic()
        server.signal(15)
        for sock in socks:  # each parked connection is closed, cleanly
            assert sock.recv(100) == b""
        server.wait(timeout=10)
        assert time.monotonic() - start < 5
    finally:
        for sock in socks:
            sock.close()


def test_a_parked_connection_still_closes_after_the_keep_alive_timeout(tiamat_server):
    server = tiamat_server(APP, "-k", "thread", "--threads", "4", "-w", "1", "--keep-alive", "1")
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        for _ in range(2):
            assert _get(sock, "/")[1] == b"hello"
        asked = time.monotonic()  # (before the last request: the server's clock starts later)
        assert _get(sock, "/")[1] == b"hello"
        assert sock.recv(100) == b""  # closed by the server, idle
        idle = time.monotonic() - asked
    # 1 s from the answer, checked by a sweep every 0.5 s (parking must not add to it)
    assert 1.0 <= idle < 2.5, idle


def _client(host: str, port: int, seed: int, rounds: int) -> int:
    """A client mixing every kind of request, reconnecting now and then; the answers seen."""
    rng = random.Random(seed)
    answered = 0
    sock = socket.create_connection((host, port), timeout=10)
    try:
        for i in range(rounds):
            kind = rng.choice(["get", "get", "post", "pipelined", "close", "pause"])
            if kind == "get":
                assert _get(sock, f"/echo?c={seed}&i={i}")[0].startswith(b"HTTP/1.1 200")
                answered += 1
            elif kind == "post":
                body = b"%d-%d" % (seed, i)
                sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                assert read_response(sock)[1] == body
                answered += 1
            elif kind == "pipelined":
                sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n" * 2)
                _, body, left = read_response(sock)
                assert body == b"hello"
                assert read_response(sock, left)[1:] == (b"hello", b"")
                answered += 2
            elif kind == "close":
                sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                data = read_until_closed(sock)
                assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"hello")
                answered += 1
                sock.close()
                sock = socket.create_connection((host, port), timeout=10)
            else:  # idle a little: the parked connection may go back to the loop
                time.sleep(rng.choice([0.001, 0.02, 0.3]))
    finally:
        sock.close()
    return answered


@pytest.mark.parametrize(("threads", "clients"), [(16, 10), (8, 9), (4, 10)])
def test_mixed_traffic_from_many_clients(tiamat_server, threads, clients):
    # parking (16 threads for 10 clients; 8 for 9, parked up to an eighth more than
    # threads), no parking at all (10 on 4), with bodies and pipelined requests handed back
    # and connections coming and going, all at once: every answer right, nothing in the log
    server = tiamat_server(APP, "-k", "thread", "--threads", str(threads), "-w", "1")
    with ThreadPoolExecutor(clients) as pool:
        counts = list(pool.map(lambda seed: _client(server.host, server.port, seed, 40),
                               range(clients)))
    assert sum(counts) >= clients * 20
    log = server.log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-2000:]


def _posts_and_gets(host: str, port: int, seed: int, rounds: int) -> int:
    """POSTs (always queued by the loop) and GETs (served from the parked connection)."""
    answered = 0
    with socket.create_connection((host, port), timeout=5) as sock:
        for i in range(rounds):
            if (seed + i) % 3:
                body = b"%d-%d" % (seed, i)
                sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(body), body))
                assert read_response(sock)[1] == body
            else:
                assert _get(sock, "/")[1] == b"hello"
            answered += 1
    return answered


def test_requests_queued_by_the_loop_never_wait_for_an_idle_pool(tiamat_server):
    # while threads wait in park_set, the loop wakes one for each request it queues (the
    # nudge); a nudge lost between a thread reading it and the next one being written left
    # requests queued with every thread idle, until the client gave up
    # (3 rounds: the old bug stalled about one round in two)
    server = tiamat_server(APP, "-k", "thread", "--threads", "16", "-w", "1")
    for round_ in range(3):
        with ThreadPoolExecutor(12) as pool:
            counts = list(pool.map(lambda seed: _posts_and_gets(server.host, server.port, seed, 150),
                                   range(12 * round_, 12 * round_ + 12)))
        assert counts == [150] * 12


def test_a_stop_answers_a_request_waiting_on_a_parked_connection(tiamat_server):
    # a parked connection's next request arrives while both threads are busy (no thread
    # takes its report), then a graceful stop begins: the request is still read and
    # answered, as on any idle connection, not reset by a close with it unread
    server = tiamat_server(APP, "-k", "thread", "--threads", "2", "-w", "1",
                           "--graceful-timeout", "10")
    with socket.create_connection((server.host, server.port), timeout=10) as parked:
        assert _get(parked, "/")[1] == b"hello"
        before = server.worker_sockets()
        slow = [socket.create_connection((server.host, server.port), timeout=10) for _ in range(2)]
        try:
            for sock in slow:
                sock.sendall(b"GET /sleep?s=1.5 HTTP/1.1\r\nHost: t\r\n\r\n")
            server.wait_accepted(before, 2)
            time.sleep(0.1)  # (both threads in the app)
            parked.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            time.sleep(0.1)
            server.signal(15)
            head, body, _ = read_response(parked)
            assert head.startswith(b"HTTP/1.1 200") and body == b"hello"
            for sock in slow:
                assert read_response(sock)[0].startswith(b"HTTP/1.1 200")
        finally:
            for sock in slow:
                sock.close()
