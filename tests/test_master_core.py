"""Issue 2, item 5: the master binds every address, forks and replaces workers, stops cleanly.

Every test runs the real server (``python -m tiamat``) and observes it as a user or an
operator would: HTTP answers, /proc, signals, exit codes and the log.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import APPS, read_to_end, read_until_closed, run_tiamat, wait_for

APP = "core_app:application"
LOG_LINE = re.compile(
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[(\d+)\] \[(INFO|DEBUG|WARNING|ERROR)\] ",
    re.MULTILINE)


def _listening(server) -> list[str]:
    return re.findall(r"Listening at: (\S+)", server.log())


def _http_get(host: str, port: int, path: str = "/", family: int = socket.AF_INET,
              timeout: float = 5.0) -> bytes:
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        return read_until_closed(sock)


def _unix_get(path: str) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        return read_until_closed(sock)


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()


def _state(pid: int) -> str | None:
    """The /proc state letter of ``pid`` (Z for a zombie), None once it is fully gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()[0]


# --- binding ----------------------------------------------------------------------------
def test_binds_tcp4_tcp6_and_unix_at_once(tiamat_server, tmp_path):
    path = str(tmp_path / "t.sock")
    server = tiamat_server("-b", "127.0.0.1:0", "-b", "[::1]:0", "-b", f"unix:{path}", APP,
                           cwd=APPS)
    urls = wait_for(lambda: (u := _listening(server)) and len(u) == 3 and u, message="3 listeners")
    assert urls[1].startswith("http://[::1]:") and urls[2] == f"unix:{path}"
    port4 = int(urls[0].rsplit(":", 1)[1])
    port6 = int(urls[1].rsplit(":", 1)[1])
    assert _http_get("127.0.0.1", port4).startswith(b"HTTP/1.1 200 ")
    assert _http_get("::1", port6, family=socket.AF_INET6).startswith(b"HTTP/1.1 200 ")
    assert _unix_get(path).startswith(b"HTTP/1.1 200 ")
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0
    assert not os.path.exists(path), "the master removes its unix socket on exit"


def test_stale_unix_socket_file_is_replaced(tiamat_server, tmp_path):
    path = str(tmp_path / "stale.sock")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(path)  # a socket file nobody listens on: what a crashed server leaves
    leftover.close()
    assert os.path.exists(path)
    server = tiamat_server("-b", f"unix:{path}", APP, cwd=APPS, wait=False)
    server.wait_log(r"Listening at: unix:")
    assert wait_for(lambda: _unix_get(path).startswith(b"HTTP/1.1 200 "), message="unix answer")


def test_unix_path_that_is_not_a_socket_is_left_alone(tmp_path):
    path = tmp_path / "precious.txt"
    path.write_text("do not delete")
    result = run_tiamat("-b", f"unix:{path}", APP, cwd=APPS)
    assert result.returncode != 0
    assert "precious.txt" in result.stderr and "not a socket" in result.stderr
    assert path.read_text() == "do not delete"


def test_port_in_use_is_one_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = run_tiamat("-b", f"127.0.0.1:{port}", APP, cwd=APPS)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss(8) to read the backlog")
def test_backlog_is_honoured(tiamat_server):
    server = tiamat_server("--backlog", "37", APP, cwd=APPS)
    out = subprocess.run(["ss", "-ltnH", f"sport = :{server.port}"], capture_output=True,
                         text=True, check=True).stdout
    # for a listening socket ss shows the backlog in the Send-Q column
    fields = out.split()
    assert fields[0] == "LISTEN" and fields[2] == "37", out


# --- workers ----------------------------------------------------------------------------
def test_forks_workers_and_replaces_a_killed_one_quickly(tiamat_server, tmp_path):
    ready = tmp_path / "ready"
    conf = tmp_path / "c.py"
    conf.write_text(f"def when_ready(server):\n    open({str(ready)!r}, 'w').close()\n")
    server = tiamat_server("-c", str(conf), "-b", "127.0.0.1:0", "-w", "2", APP, cwd=APPS)
    wait_for(ready.exists, message="both workers booted (when_ready)")
    pids = server.worker_pids()
    assert len(pids) == 2
    victim = pids[0]
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)

    def replaced() -> list[int] | None:
        now = server.worker_pids()
        return now if len(now) == 2 and victim not in now else None

    new = wait_for(replaced, timeout=5, interval=0.01, message="a replacement worker")
    assert time.monotonic() - killed_at < 2.0  # typically a few milliseconds
    assert pids[1] in new
    assert _state(victim) is None, "the killed worker was reaped (no zombie)"
    wait_for(lambda: server.get("/")[0] == 200, message="served after the replacement")
    assert "exited with signal 9" in server.log()


def test_process_titles(tiamat_server):
    server = tiamat_server("-w", "2", APP, cwd=APPS)
    assert _cmdline(server.pid) == f"tiamat: master [{APP}]"
    pids = wait_for(lambda: (p := server.worker_pids()) and len(p) == 2 and p, message="2 workers")
    titles = sorted(wait_for(lambda: all(_cmdline(p).startswith("tiamat: worker") for p in pids)
                             and [_cmdline(p) for p in pids], message="worker titles"))
    assert titles == [f"tiamat: worker 0 [{APP}]", f"tiamat: worker 1 [{APP}]"]


def test_logs_go_to_stderr_with_time_pid_and_level(tiamat_server, tmp_path):
    server = tiamat_server(APP, cwd=APPS)
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0
    lines = [line for line in server.log().splitlines() if line.startswith("[")]
    assert lines, server.log()
    for line in lines:
        assert LOG_LINE.match(line), line
    assert {int(m.group(1)) for m in LOG_LINE.finditer(server.log())} >= {server.pid}
    # and they really are on stderr, not stdout
    proc = subprocess.run(
        [sys.executable, "-m", "tiamat", "--check-config", APP], cwd=APPS,
        capture_output=True, text=True, timeout=30,
        env={k: v for k, v in os.environ.items() if k != "TIAMAT"})
    assert proc.returncode == 0 and proc.stdout == "" and "OK" in proc.stderr


# --- stopping ---------------------------------------------------------------------------
class _SlowRequest(threading.Thread):
    """A request to /slow that is in flight while the test signals the master."""

    def __init__(self, host: str, port: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.address = (host, port)
        self.seconds = seconds
        self.response = b""
        self.sent = threading.Event()

    def run(self) -> None:
        with socket.create_connection(self.address, timeout=30) as sock:
            sock.sendall(f"GET /slow?t={self.seconds} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
            self.sent.set()
            data = b""
            while b"slept" not in data:
                try:
                    part = sock.recv(65536)
                except OSError:
                    break
                if not part:
                    break
                data += part
            self.response = data


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGQUIT])
def test_graceful_stop_finishes_in_flight_request_and_refuses_new_ones(tiamat_server, sig):
    server = tiamat_server(APP, cwd=APPS)
    before = server.worker_sockets()
    slow = _SlowRequest(server.host, server.port, 3)
    slow.start()
    slow.sent.wait(5)
    server.wait_accepted(before)  # the worker holds the request (it goes to the app)
    started = time.monotonic()
    server.signal(sig)
    server.wait_log(r"Shutting down: graceful")
    wait_for(server.refuses, timeout=2.0, message="new connections refused while stopping")
    assert slow.is_alive() and not slow.response, "refused while the request is still in flight"
    assert server.wait(20) == 0
    slow.join(5)
    assert slow.response.startswith(b"HTTP/1.1 200 "), slow.response
    assert b"slept 3.0" in slow.response
    assert time.monotonic() - started >= 2.0
    assert "Shutdown complete" in server.log()


def _pending(pid: int, sig: int) -> bool:
    """Whether ``sig`` waits, undelivered, for process ``pid`` (a stopped one, say)."""
    status = Path(f"/proc/{pid}/status").read_text()
    masks = re.findall(r"^(?:SigPnd|ShdPnd):\s+([0-9a-f]+)$", status, re.M)
    return any(int(mask, 16) >> (sig - 1) & 1 for mask in masks)


@pytest.mark.parametrize("kind", ["sync", "thread"])
def test_a_stop_that_arrives_with_a_request_refuses_new_clients_at_once(tiamat_server, kind):
    """A sync worker (and a stopping thread worker, which runs requests itself) can learn
    of the stop with a request to read in the same wake-up: its handler saw no request
    running and left the listener to the loop, which then ran the request first.  New
    clients must still be refused at once, not left in the backlog for the whole request.
    (Made deterministic: the worker is stopped while the request and the master's SIGTERM
    arrive, and continued with both waiting.)"""
    server = tiamat_server(APP, "-k", kind, cwd=APPS)
    (worker,) = server.worker_pids()
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")  # (accepted, then idle)
        assert sock.recv(1000).startswith(b"HTTP/1.1 200")
        os.kill(worker, signal.SIGSTOP)
        # (stopped before the SIGTERM comes: a pending SIGSTOP would be taken after it)
        wait_for(lambda: _state(worker) == "T", message="the worker stopped")
        try:
            sock.sendall(b"GET /slow?t=3 HTTP/1.1\r\nHost: t\r\n\r\n")
            server.signal(signal.SIGTERM)
            wait_for(lambda: _pending(worker, signal.SIGTERM), message="the worker's SIGTERM")
        finally:
            os.kill(worker, signal.SIGCONT)
        wait_for(server.refuses, timeout=1.5, message="new connections refused while the request runs")
        # more bytes, sent while the app runs: still unread when the worker closes, they
        # would turn the close into a reset (which can destroy the response) but for the
        # lingering close
        sock.sendall(b"GET / HTTP/1.1\r\nHo")
        reply, end = read_to_end(sock)
        assert b"slept" in reply and end == "eof", (reply, end)  # (and answered, cleanly)
        # (with Connection: close; a thread worker's pool thread may read the request
        # before the loop thread has run the signal handler)
        assert kind == "thread" or b"Connection: close" in reply
    assert server.wait(10) == 0


@pytest.mark.parametrize("kind", ["sync", "thread"])
def test_a_request_sent_as_the_stop_comes_after_a_keepalive_response_is_answered(
        tiamat_server, kind):
    """The response promised keep-alive, so the client may send its next request at once;
    a stop that comes while the worker still finishes the previous one (here the body's
    close() takes two seconds) must not close the connection under that request: it is read
    and answered, with ``Connection: close``."""
    server = tiamat_server(APP, "-k", kind, cwd=APPS)
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        # (the whole response arrives before the stop; the app's close() then takes 2 s)
        data, reply = server.stop_mid_response(
            sock, b"GET /slow-close?t=2 HTTP/1.1\r\nHost: t\r\n\r\n", b"done", b"done",
            then=b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert b"Connection: close" not in data
    assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b"hello from core_app\n"), reply
    assert b"Connection: close" in reply
    assert server.wait(10) == 0


def test_graceful_timeout_kills_a_request_that_takes_too_long(tiamat_server):
    server = tiamat_server("--graceful-timeout", "1", APP, cwd=APPS)
    before = server.worker_sockets()
    slow = _SlowRequest(server.host, server.port, 20)
    slow.start()
    slow.sent.wait(5)
    server.wait_accepted(before)  # the worker holds the request (it goes to the app)
    started = time.monotonic()
    server.signal(signal.SIGTERM)
    server.wait(15)
    assert time.monotonic() - started < 8
    assert "did not stop in time" in server.log()


def test_int_is_a_quick_stop(tiamat_server):
    server = tiamat_server(APP, cwd=APPS)
    worker = wait_for(server.worker_pids, message="a worker")[0]
    before = server.worker_sockets()
    slow = _SlowRequest(server.host, server.port, 20)
    slow.start()
    slow.sent.wait(5)
    server.wait_accepted(before)  # the worker holds the request (it goes to the app)
    started = time.monotonic()
    server.signal(signal.SIGINT)
    server.wait(10)
    assert time.monotonic() - started < 5
    slow.join(5)
    assert b"slept" not in slow.response
    assert "Shutting down: quick" in server.log()
    assert _state(worker) is None


def test_stop_with_many_workers_reaps_them_all(tiamat_server):
    server = tiamat_server("-w", "3", APP, cwd=APPS)
    pids = wait_for(lambda: (p := server.worker_pids()) and len(p) == 3 and p, message="3 workers")
    server.signal(signal.SIGTERM)
    assert server.wait(15) == 0
    for pid in pids:
        wait_for(lambda pid=pid: _state(pid) is None, timeout=5, message=f"worker {pid} gone")


def test_binds_an_inherited_fd(tmp_path):
    """``-b fd://N``: serve on a listening socket the caller (systemd, a supervisor) opened."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    env = {k: v for k, v in os.environ.items() if k != "TIAMAT"}
    log = open(tmp_path / "fd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "tiamat", "-b", f"fd://{fd}", APP], cwd=APPS,
                            env=env, pass_fds=(fd,), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    listener.close()  # only the server holds it now
    try:
        wait_for(lambda: b"Listening at: http://127.0.0.1:%d" % port in (tmp_path / "fd.log").read_bytes(),
                 message="listening on the inherited socket")
        assert wait_for(lambda: _http_get("127.0.0.1", port).startswith(b"HTTP/1.1 200 "),
                        message="an answer on the inherited socket")
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
        log.close()
