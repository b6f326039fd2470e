"""``-k asgi`` life cycle: lifespan startup/shutdown, boot failures, liveness from the loop."""

from __future__ import annotations

import socket
import time

from conftest import run_tiamat, wait_for

APP = "tests/apps/wk_asgi.py:app"


def test_lifespan_state_reaches_requests(tiamat_server):
    server = tiamat_server("-k", "asgi", APP)
    assert server.get("/state")[2] == b"hello from lifespan"


def test_startup_completes_before_the_first_request(tiamat_server, tmp_path):
    """A request sent before the worker is ready waits; it is never served without state."""
    server = tiamat_server("-k", "asgi", "-b", "127.0.0.1:0", APP, env={"WK_STARTUP_DELAY": "1"},
                           wait=False)
    server.wait_listening()
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall(b"GET /state HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    reply = b""
    while data := sock.recv(4096):
        reply += data
    sock.close()
    assert reply.endswith(b"hello from lifespan")


def test_startup_failure_is_a_boot_failure():
    result = run_tiamat("-k", "asgi", "-b", "127.0.0.1:0", APP, env={"WK_LIFESPAN": "fail"})
    assert result.returncode == 3, result.stderr
    assert "database unreachable" in result.stderr


def test_startup_exception_with_lifespan_on_is_a_boot_failure():
    result = run_tiamat("-k", "asgi", "--lifespan", "on", "-b", "127.0.0.1:0", APP,
                        env={"WK_LIFESPAN": "raise"})
    assert result.returncode == 3, result.stderr
    assert "startup exploded" in result.stderr


def test_lifespan_auto_serves_an_app_without_lifespan(tiamat_server):
    server = tiamat_server("-k", "asgi", APP, env={"WK_LIFESPAN": "none"})
    assert server.get("/state")[2] == b"no state"
    assert "lifespan" in server.log() and "unsupported" in server.log()


def test_lifespan_off_does_not_call_it(tiamat_server):
    server = tiamat_server("-k", "asgi", "--lifespan", "off", APP, env={"WK_LIFESPAN": "fail"})
    assert server.get("/state")[2] == b"no state"


def test_shutdown_runs_on_graceful_stop(tiamat_server, tmp_path):
    server = tiamat_server("-k", "asgi", "-w", "2", APP, env={"WK_MARK_DIR": str(tmp_path)})
    server.wait_log(r"Ready: 2 worker")  # (both ran their startup: each has a shutdown to run)
    server.signal(15)
    assert server.wait(15) == 0
    lines = (tmp_path / "shutdown").read_text().split()
    assert len(lines) == 2


def test_blocked_loop_is_detected_with_its_stack(tiamat_server):
    server = tiamat_server("-k", "asgi", "--timeout", "2", APP)
    first = wait_for(lambda: server.worker_pids())[0]
    with socket.create_connection((server.host, server.port), timeout=15) as sock:
        sock.sendall(b"GET /block?s=30 HTTP/1.1\r\nHost: t\r\n\r\n")
        server.wait_log(r"WORKER TIMEOUT", timeout=15)
        assert sock.recv(100) == b""  # the stuck worker was killed
    log = server.log()
    assert "wk_asgi.py" in log and "_http" in log, "no stack of the blocked loop in the log"
    wait_for(lambda: server.worker_pids() and server.worker_pids()[0] != first, 10)
    server.wait_answering()
    assert server.get("/")[2] == b"hello"


def test_signals_reach_a_quiet_uvloop_worker(tiamat_server):
    """No traffic at all: TERM must still stop the worker promptly (wake fd in the loop)."""
    server = tiamat_server("-k", "asgi", "--loop", "uvloop", APP)
    time.sleep(0.5)
    start = time.monotonic()
    server.signal(15)
    assert server.wait(10) == 0
    assert time.monotonic() - start < 3


def test_framework_startup_failure_is_one_line():
    result = run_tiamat("-k", "asgi", "-w", "2", "-b", "127.0.0.1:0", "tests/apps/wk_starlette_fail.py:app")
    assert result.returncode == 3, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("tiamat:")]
    assert len(errors) == 1
    assert errors[0].endswith("RuntimeError: no database at db:5432")
    assert "Traceback" in result.stderr  # the details are in the log
