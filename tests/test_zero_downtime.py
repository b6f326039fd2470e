"""Zero downtime under continuous traffic, for every HTTP worker class: every single request
succeeds across a HUP, across USR2 followed by QUIT to the old master, and across
--max-requests recycling."""

from __future__ import annotations

import os
import re
import signal
import socket
from pathlib import Path

import pytest
from apps.pc_support import Load, alive, one_per_slot, read_pid
from conftest import read_until_closed, wait_for

CLIENTS, PER_CLIENT = 8, 500  # 4000 requests, a new connection each
#: the HUP and USR2 loads run until the test ends them, at most this many requests a client
BOUND = 1000
#: requests in each phase: before the signal, between two steps, after the last one
BEFORE, AFTER = 400, 800
#: worker class -> the app and arguments it runs with (each app answers "pid slot version")
CLASSES = {
    "sync": ("tests/apps/pc_app.py", "-k", "sync"),
    "thread": ("tests/apps/pc_app.py", "-k", "thread", "--threads", "4"),
    "asgi": ("tests/apps/pc_asgi_app.py", "-k", "asgi"),
}
worker_classes = pytest.mark.parametrize("kind", list(CLASSES))


def _start(tiamat_server, tmp_path: Path, kind: str, *args: str):
    version_file = tmp_path / "version"
    version_file.write_text("v1")
    server = tiamat_server(*CLASSES[kind], "-w", "2", *args,
                           env={"PC_VERSION_FILE": str(version_file)})
    server.wait_log(r"Ready: 2 worker")
    wait_for(lambda: one_per_slot(server.pid, 2), message="2 workers")
    return server, version_file


def _failed(load: Load, server) -> str:
    return f"{len(load.failures)} failed: {load.failures[:5]}\n{server.log()[-4000:]}"


def _more(load: Load, count: int) -> None:
    """Wait until the load has done ``count`` more requests (it must still be running)."""
    target = load.done + count
    wait_for(lambda: load.done >= target or not load.running, timeout=60,
             message=f"{count} more requests")
    assert load.running, "the load reached its bound before the event was over"


def _finish(load: Load, server) -> None:
    load.finish()
    load.join(60)
    assert not load.running
    assert load.failures == [], _failed(load, server)


@worker_classes
def test_every_request_succeeds_across_a_hup(tiamat_server, tmp_path, kind):
    server, version_file = _start(tiamat_server, tmp_path, kind)
    load = Load(server.host, server.port, CLIENTS, BOUND).start()
    _more(load, BEFORE)
    version_file.write_text("v2")
    server.signal(signal.SIGHUP)
    server.wait_log(r"Reload complete", timeout=30)
    _more(load, AFTER)  # while the old workers stop, and after
    _finish(load, server)
    assert load.bodies == {"v1", "v2"}  # both generations served, none failed


@worker_classes
def test_every_request_succeeds_across_usr2_then_quit(tiamat_server, tmp_path, kind):
    pid_path = tmp_path / "tiamat.pid"
    server, version_file = _start(tiamat_server, tmp_path, kind, "--pid", str(pid_path))
    load = Load(server.host, server.port, CLIENTS, BOUND).start()
    _more(load, BEFORE)
    version_file.write_text("v2")
    server.signal(signal.SIGUSR2)
    server.wait_log(r"New master \(pid \d+\) is ready", timeout=30)
    new_master = read_pid(pid_path)
    try:
        _more(load, BEFORE)  # both masters serve
        server.signal(signal.SIGQUIT)
        assert server.wait(30) == 0
        _more(load, AFTER)  # the new master alone
        _finish(load, server)
        assert load.bodies == {"v1", "v2"}
        assert new_master and alive(new_master)
    finally:
        load.finish()
        if new_master:
            os.kill(new_master, signal.SIGTERM)
            wait_for(lambda: not alive(new_master), timeout=20, message="the new master to stop")


@worker_classes
def test_every_request_succeeds_across_max_requests_recycling(tiamat_server, tmp_path, kind):
    server, _ = _start(tiamat_server, tmp_path, kind, "--max-requests", "300",
                       "--max-requests-jitter", "50")
    load = Load(server.host, server.port, CLIENTS, PER_CLIENT).start()
    load.join(90)
    assert not load.running
    assert load.failures == [], _failed(load, server)
    assert load.done == CLIENTS * PER_CLIENT
    # 4000 requests over 2 workers with quotas of 300-350: many recycled under the load
    wait_for(lambda: len(re.findall(r"exited \(recycle\)", server.log())) >= 4, timeout=20,
             message="4 recycled workers")


@worker_classes
def test_a_connection_accepted_just_before_a_graceful_stop_is_answered(tiamat_server, tmp_path,
                                                                       kind):
    server = tiamat_server(*CLASSES[kind], "-w", "1", "--keep-alive", "30")
    server.wait_log(r"Ready: 1 worker")
    worker = one_per_slot(server.pid, 1)[0]
    before = server.worker_sockets()
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        server.wait_accepted(before)  # the worker has accepted it; no request has come yet
        os.kill(worker, signal.SIGTERM)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 200"), reply
