"""Error responses a worker writes itself (400, 408, 413, 414, 431, 501, 503) reach the access
log and the metrics, for every worker class, as raw bytes over a socket would produce them."""

from __future__ import annotations

import socket

import pytest
from conftest import APPS, wait_for
from test_metrics import _free_port, scrape

WSGI_APP, ASGI_APP = str(APPS / "pc_app.py"), str(APPS / "asgi_hello.py")
CLASSES = {
    "sync": (WSGI_APP, "-k", "sync"),
    "thread": (WSGI_APP, "-k", "thread", "--threads", "2"),
    "asgi": (ASGI_APP, "-k", "asgi"),
}
#: status, method, path, protocol: '-' where the head never became complete
FORMAT = "%(s)s %(m)s %(U)s %(H)s"
#: (raw request, the line it must log)
CASES = [
    (b"GET / HTTP/1.1\r\n\r\n", "400 - - -"),  # no Host
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", "414 - - -"),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", "431 - - -"),
    (b"BREW /pot HTTP/1.1\r\nHost: t\r\n\r\n", "501 - - -"),
    # the head is complete, the first chunk breaks --limit-request-body: method and path known
    (b"POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n"
     + b"x" * 0x400 + b"\r\n0\r\n\r\n", "413 POST /upload HTTP/1.1"),
    (b"GET / HTTP/1.1\r\nHos", "408 - - -"),  # --header-timeout
]


def _start(tiamat_server, tmp_path, app_args, *args: str):
    access = tmp_path / "access.log"
    port = _free_port()
    server = tiamat_server(*app_args, "--access-logfile", str(access), "--access-logformat",
                           FORMAT, "--metrics-bind", f"127.0.0.1:{port}", *args)
    server.metrics_port = port
    return server, access


def _lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize("kind", list(CLASSES))
def test_error_responses_are_logged_and_counted(tiamat_server, tmp_path, kind):
    server, access = _start(tiamat_server, tmp_path, CLASSES[kind], "-w", "1",
                            "--limit-request-body", "100", "--header-timeout", "1")
    wait_for(lambda: "200 GET / HTTP/1.1" in _lines(access), message="the readiness probe")
    for raw, line in CASES:
        reply = server.request(raw, timeout=10)
        assert reply.startswith(b"HTTP/1.1 " + line[:3].encode()), (line, reply[:80])
        wait_for(lambda line=line: line in _lines(access), message=f"{line!r} in the access log")
    metrics = scrape(server.metrics_port)
    assert metrics['tiamat_requests_total{status="4xx"}'] == 5
    assert metrics['tiamat_requests_total{status="5xx"}'] == 1


def test_asgi_limit_concurrency_503_is_logged_and_counted(tiamat_server, tmp_path):
    server, access = _start(tiamat_server, tmp_path, CLASSES["asgi"], "-w", "1",
                            "--limit-concurrency", "1")
    wait_for(lambda: "200 GET / HTTP/1.1" in _lines(access), message="the readiness probe")
    with socket.create_connection((server.host, server.port), timeout=5) as idle:
        idle.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")  # a keep-alive connection stays
        assert idle.recv(4096).startswith(b"HTTP/1.1 200")
        reply = server.request(b"GET /busy HTTP/1.1\r\nHost: t\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 503")
    wait_for(lambda: "503 GET /busy HTTP/1.1" in _lines(access), message="the 503 line")
    assert scrape(server.metrics_port)['tiamat_requests_total{status="5xx"}'] == 1


def test_error_responses_work_with_the_access_log_and_metrics_off(tiamat_server):
    for kind, app_args in CLASSES.items():
        server = tiamat_server(*app_args, "-w", "1", "--limit-request-body", "100")
        for raw, line in CASES[:5]:
            reply = server.request(raw, timeout=10)
            assert reply.startswith(b"HTTP/1.1 " + line[:3].encode()), (kind, line, reply[:80])
        server.stop()
