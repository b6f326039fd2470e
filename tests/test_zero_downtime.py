"""Zero downtime under continuous traffic, for every HTTP worker class: every single request
succeeds across a HUP, across USR2 followed by QUIT to the old master, and across
--max-requests recycling."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest
from apps.pc_support import Load, alive, one_per_slot, read_pid
from conftest import wait_for

CLIENTS, PER_CLIENT = 8, 500  # 4000 requests, a new connection each
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


def _during(load: Load, fraction: float) -> None:
    """Wait until the load has done ``fraction`` of its requests (it must still be running)."""
    total = CLIENTS * PER_CLIENT
    wait_for(lambda: load.done >= total * fraction or not load.running, timeout=60,
             message=f"{fraction:.0%} of the load")
    assert load.running, "the load finished before the event: make it longer"


@worker_classes
def test_every_request_succeeds_across_a_hup(tiamat_server, tmp_path, kind):
    server, version_file = _start(tiamat_server, tmp_path, kind)
    load = Load(server.host, server.port, CLIENTS, PER_CLIENT).start()
    _during(load, 0.2)
    version_file.write_text("v2")
    server.signal(signal.SIGHUP)
    server.wait_log(r"Reload complete", timeout=30)
    load.join(90)
    assert not load.running
    assert load.failures == [], _failed(load, server)
    assert load.done == CLIENTS * PER_CLIENT
    assert load.bodies == {"v1", "v2"}  # both generations served, none failed


@worker_classes
def test_every_request_succeeds_across_usr2_then_quit(tiamat_server, tmp_path, kind):
    pid_path = tmp_path / "tiamat.pid"
    server, version_file = _start(tiamat_server, tmp_path, kind, "--pid", str(pid_path))
    load = Load(server.host, server.port, CLIENTS, PER_CLIENT).start()
    _during(load, 0.15)
    version_file.write_text("v2")
    server.signal(signal.SIGUSR2)
    server.wait_log(r"New master \(pid \d+\) is ready", timeout=30)
    new_master = read_pid(pid_path)
    _during(load, 0.5)
    server.signal(signal.SIGQUIT)
    assert server.wait(30) == 0
    load.join(90)
    try:
        assert not load.running
        assert load.failures == [], _failed(load, server)
        assert load.done == CLIENTS * PER_CLIENT
        assert load.bodies == {"v1", "v2"}
        assert new_master and alive(new_master)
    finally:
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
