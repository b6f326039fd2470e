"""A worker that runs out of file descriptors stops watching its listeners for a while
instead of spinning on them, and takes the waiting clients once descriptors free up."""

from __future__ import annotations

import errno
import logging
import socket
import time

import pytest
from conftest import wait_for

from tiamat.sockets import AcceptPaused, accept_next

APP = "tests/apps/wk_wsgi.py"

# the worker may open only a few more descriptors than it holds once booted
CONFIG = """
import os
import resource


def post_worker_init(worker):
    used = len(os.listdir("/proc/self/fd"))
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (used + 2, hard))
"""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def get(sock: socket.socket) -> bytes:
    sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    data = b""
    while not data.endswith(b"hello"):
        more = sock.recv(4096)
        assert more, f"closed: {data!r}"
        data += more
    return data


@pytest.mark.parametrize("kind", ["sync", "thread"])
def test_out_of_descriptors_pauses_accepting_and_recovers(tiamat_server, tmp_path, kind):
    conf = tmp_path / "fd_limit.py"
    conf.write_text(CONFIG)
    server = tiamat_server(APP, "-c", str(conf), "-b", "127.0.0.1:0", "-k", kind,
                           "--threads", "2", "-w", "1")
    worker = server.worker_pids()[0]
    held = [socket.create_connection((server.host, server.port), timeout=10) for _ in range(2)]
    for sock in held:
        assert get(sock).startswith(b"HTTP/1.1 200")
    # the kernel completes these handshakes, but the worker has no descriptor to accept them
    waiting = [socket.create_connection((server.host, server.port), timeout=10) for _ in range(3)]
    for sock in waiting:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    wait_for(lambda: "accept failed" in server.log(), timeout=10)
    before = cpu_seconds(worker)
    time.sleep(1.5)
    spent = cpu_seconds(worker) - before
    failures = server.log().count("accept failed")
    # a spinning worker burns the whole 1.5 s and logs thousands of lines; a paused one
    # retries about once a second
    assert spent < 0.5, f"the worker spun on its listener: {spent:.2f} s of CPU in 1.5 s"
    assert failures <= 5, f"{failures} accept failures logged in 1.5 s"
    # the held clients ask meanwhile: an answered request frees no descriptor, so it must
    # not end the pause (the thread worker's take-back did, logging a failure per request)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        for sock in held:
            assert get(sock).startswith(b"HTTP/1.1 200")
    failures = server.log().count("accept failed") - failures
    assert failures <= 5, f"{failures} accept failures logged in 1.5 s of requests"
    # descriptors free up: the waiting clients are served, in time, without new connections
    for sock in held:
        sock.close()
    for sock in waiting:
        data = b""
        while not data.endswith(b"hello"):
            more = sock.recv(4096)
            assert more, f"closed: {data!r}"
            data += more
        assert data.startswith(b"HTTP/1.1 200")
        sock.close()


class _Listener:
    """A stand-in listening socket whose accept() fails with the given errnos, in turn."""

    def __init__(self, *errnos: int) -> None:
        self.errnos = list(errnos)

    def accept(self) -> tuple[str, str]:
        if self.errnos:
            code = self.errnos.pop(0)
            raise OSError(code, errno.errorcode[code])
        return ("conn", "peer")


def test_a_connection_failed_before_it_was_taken_is_passed_over() -> None:
    # Linux reports a new connection's network error from accept() (man accept: "treat
    # them like EAGAIN"); a firewall rule refusing it gives EPERM
    listener = _Listener(errno.ECONNABORTED, errno.EPROTO, errno.ENETUNREACH, errno.EPERM,
                         errno.EHOSTUNREACH)
    assert accept_next(listener) == ("conn", "peer")  # type: ignore[arg-type]


@pytest.mark.parametrize("code", [errno.EMFILE, errno.ENOMEM, errno.EINVAL, errno.EIO])
def test_other_accept_failures_pause_with_a_log_line_and_never_raise_as_they_are(code, caplog):
    # (out of the worker's loop a raised error would end the worker, and its replacement
    # would meet the same error over and over)
    with (caplog.at_level(logging.ERROR, logger="tiamat.error"),
          pytest.raises(AcceptPaused) as paused):
        accept_next(_Listener(code))  # type: ignore[arg-type]
    assert "accept failed" in caplog.text and "not accepting for 1 s" in caplog.text
    # only running out of descriptors is ended sooner by a connection closing: a lasting
    # error, re-armed by every close, would be logged once per close
    assert paused.value.frees_on_close == (code == errno.EMFILE)
