"""``-k tcp``: raw TCP handlers (asyncio streams or blocking sockets on a thread pool)."""

from __future__ import annotations

import signal
import socket
import time

import pytest
from conftest import wait_for

EXAMPLE = "examples/echo_tcp.py"


def start_tcp(tiamat_server, *args: str):
    """Start a TCP server: the fixture's HTTP readiness probe does not apply, so poll here."""
    server = tiamat_server("-k", "tcp", *args, wait=False)
    server.wait_listening()

    def greets() -> bool:
        try:
            with socket.create_connection((server.host, server.port), timeout=2) as sock:
                return sock.recv(100).startswith(b"echo server")
        except OSError:
            return False

    wait_for(greets, 15, message="the echo server to greet")
    return server


def echo_once(server, text: bytes) -> tuple[bytes, bytes]:
    with socket.create_connection((server.host, server.port), timeout=5) as sock:
        reader = sock.makefile("rb")
        greeting = reader.readline()
        sock.sendall(text + b"\n")
        return greeting, reader.readline()


@pytest.mark.parametrize("handler", ["handle", "handle_blocking"])
def test_echo_example(tiamat_server, handler):
    server = start_tcp(tiamat_server, "-w", "2", "--threads", "2", f"{EXAMPLE}:{handler}")
    for i in range(5):
        greeting, echoed = echo_once(server, b"line %d" % i)
        assert greeting.startswith(b"echo server, worker pid")
        assert echoed == b"line %d\n" % i


@pytest.mark.parametrize("handler", ["handle", "handle_blocking"])
def test_graceful_stop_lets_a_session_finish(tiamat_server, handler):
    server = start_tcp(tiamat_server, "--graceful-timeout", "10", f"{EXAMPLE}:{handler}")
    sock = socket.create_connection((server.host, server.port), timeout=5)
    reader = sock.makefile("rb")
    reader.readline()
    server.signal(signal.SIGTERM)
    time.sleep(0.3)
    # the running session still works during the graceful stop ...
    sock.sendall(b"still here\n")
    assert reader.readline() == b"still here\n"
    # ... new clients are refused ...
    wait_for(server.refuses, 5, message="new connections refused")
    # ... and the server exits once the session ends, well before the graceful timeout
    reader.close()
    sock.close()
    start = time.monotonic()
    assert server.wait(10) == 0
    assert time.monotonic() - start < 5


def test_graceful_timeout_ends_a_session_that_does_not(tiamat_server):
    server = start_tcp(tiamat_server, "--graceful-timeout", "1", f"{EXAMPLE}:handle")
    sock = socket.create_connection((server.host, server.port), timeout=5)
    sock.recv(100)
    start = time.monotonic()
    server.signal(signal.SIGTERM)
    assert server.wait(10) == 0
    assert time.monotonic() - start < 6
    sock.close()


def test_busy_threads_stop_accepting(tiamat_server):
    """One thread, one worker busy with a session: a second client waits in the backlog."""
    server = start_tcp(tiamat_server, "--threads", "1", f"{EXAMPLE}:handle_blocking")
    first = socket.create_connection((server.host, server.port), timeout=5)
    assert first.recv(100).startswith(b"echo server")
    second = socket.create_connection((server.host, server.port), timeout=5)
    second.settimeout(0.5)
    with pytest.raises(TimeoutError):
        second.recv(100)  # connected (backlog) but not served while the thread is busy
    first.close()
    second.settimeout(5)
    assert second.recv(100).startswith(b"echo server")
    second.close()
