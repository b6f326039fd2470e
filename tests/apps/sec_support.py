"""Helpers shared by the HTTP-safety tests: servers per worker class, raw exchanges.

``WORKERS`` is every worker class the HTTP core serves.  The thread and asgi classes are
written in parallel with these tests; until they exist, their parameters fail (on
purpose: they are not skipped).
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import time
from pathlib import Path
from typing import Any

from conftest import TiamatServer, wait_for

WORKERS = ["sync", "thread", "asgi"]
WSGI_APP = "tests.apps.sec_app:app"
ASGI_APP = "tests.apps.sec_asgi_app:app"
STATUS = re.compile(rb"HTTP/1\.[01] (\d{3}) ")


def server_args(worker: str, *extra: str) -> list[str]:
    """The command line for one worker process of ``worker`` serving the right sec app."""
    app = ASGI_APP if worker == "asgi" else WSGI_APP
    args = ["-w", "1", "-k", worker]
    if worker == "thread":
        args += ["--threads", "4"]
    return [*args, *extra, app]


def start_server(tmp: Path, worker: str, *extra: str, bind: bool = True,
                 probe: bytes | None = None) -> TiamatServer:
    """Start and wait until it answers (``probe``: the bytes to send first, e.g. a PROXY header)."""
    args = server_args(worker, *extra)
    if bind:
        args = ["-b", "127.0.0.1:0", *args]
    server = TiamatServer(args, tmp)
    try:
        if probe is None:
            server.start()
        else:
            server.start(wait=False)
            server.wait_listening()
            wait_for(lambda: _answers(server, probe), 15, 0.05, "the server to answer")
    except BaseException:
        server.stop()
        raise
    return server


def _answers(server: TiamatServer, probe: bytes) -> bool:
    try:
        return b"HTTP/1." in exchange(server, probe + b"GET /count HTTP/1.1\r\nHost: t\r\n"
                                      b"Connection: close\r\n\r\n", timeout=2)
    except (OSError, AssertionError):
        return False


def exchange(server: Any, raw: bytes, timeout: float = 5.0, host: str | None = None,
             port: int | None = None) -> bytes:
    """Send ``raw`` on a new connection, half-close, and read until the server closes.

    Fails the test if the server leaves the connection open past ``timeout``.
    """
    with socket.create_connection((host or server.host, port or server.port), timeout=timeout) as sock:
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return read_until_close(sock, timeout)


def read_until_close(sock: socket.socket, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    chunks = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"server did not close the connection in {timeout}s: "
                                 f"{b''.join(chunks)[:300]!r}")
        sock.settimeout(remaining)
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, ssl.SSLZeroReturnError):
            break
        except TimeoutError:
            continue
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def statuses(data: bytes) -> list[int]:
    return [int(s) for s in STATUS.findall(data)]


def get(server: Any, path: str, headers: dict[str, str] | None = None, timeout: float = 5.0,
        **kw: Any) -> tuple[int, bytes]:
    """One ``Connection: close`` request; (status, body)."""
    lines = [f"GET {path} HTTP/1.1", "Host: t", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    data = exchange(server, ("\r\n".join(lines) + "\r\n\r\n").encode(), timeout, **kw)
    head, _, body = data.partition(b"\r\n\r\n")
    codes = statuses(head)
    assert codes, data[:200]
    return codes[0], body


def echo(server: Any, headers: dict[str, str] | None = None, **kw: Any) -> dict[str, Any]:
    status, body = get(server, "/echo", headers, **kw)
    assert status == 200, body
    return json.loads(body)  # type: ignore[no-any-return]


def hits(server: Any) -> int:
    status, body = get(server, "/count")
    assert status == 200
    return int(body)
