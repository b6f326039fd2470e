"""The cyclic collector's start-up pause (issue 6, item 4; tiamat.memory, the start-up pause).

The command pauses the collector before importing anything, the master resumes it with its
first fork, and each worker pauses it from its fork until its app is loaded, then freezes
what start-up built.  What a user can observe: the app is imported with the collector off,
serves with it on and with the start-up objects frozen, the master's collector is on once
it serves, and ``--no-gc-freeze`` leaves the collector alone.
"""

from __future__ import annotations

import os
import signal

import pytest
from conftest import ROOT, wait_for

APP = "tests.apps.gc_app"


def _report(server) -> tuple[int, int, int, int]:
    status, _, body = server.get("/")
    assert status == 200, body
    loaded_with, enabled, frozen, pid = map(int, body.split())
    return loaded_with, enabled, frozen, pid


@pytest.mark.parametrize("kind, app", [("sync", "application"), ("thread", "application"),
                                       ("asgi", "asgi_app")])
def test_worker_loads_the_app_paused_then_serves_collecting_with_start_up_frozen(
        tiamat_server, kind, app):
    server = tiamat_server(f"{APP}:{app}", "-k", kind)
    loaded_with, enabled, frozen, pid = _report(server)
    assert pid in server.worker_pids()
    assert loaded_with == 0  # the app's import ran inside the pause
    assert enabled == 1  # ... which ended before the first request
    # the master's objects and the app's: thousands (the app's own module alone has 50 cycles)
    assert frozen > 10_000, frozen


def test_preloaded_app_is_loaded_paused_and_frozen_too(tiamat_server):
    loaded_with, enabled, frozen, _ = _report(tiamat_server(f"{APP}:application", "--preload"))
    assert (loaded_with, enabled) == (0, 1)
    assert frozen > 10_000, frozen


def test_an_app_that_turns_the_collector_off_keeps_it_off(tiamat_server):
    server = tiamat_server(f"{APP}:application", env={"GC_APP_DISABLE": "1"})
    loaded_with, collecting, frozen, _ = _report(server)
    assert (loaded_with, collecting) == (0, 0)  # the pause's end did not turn it back on
    assert frozen > 10_000, frozen


def test_no_gc_freeze_leaves_the_collector_alone(tiamat_server):
    server = tiamat_server(f"{APP}:application", "--no-gc-freeze")
    loaded_with, enabled, frozen, _ = _report(server)
    assert (loaded_with, enabled, frozen) == (1, 1, 0)


def test_a_replacement_worker_pauses_too_and_the_master_collects(tiamat_server, tmp_path):
    report = tmp_path / "master-gc.txt"
    server = tiamat_server("-c", str(ROOT / "tests" / "apps" / "gc_master_hooks.py"),
                           f"{APP}:application", env={"GC_REPORT": str(report)})
    first = _report(server)[3]
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: report.exists() and report.read_text().strip(), message="child_exit hook")
    assert report.read_text().split() == ["1"]  # the master's pause ended with its first fork
    loaded_with, enabled, frozen, pid = wait_for(
        lambda: (r := _report(server))[3] != first and r, message="a replacement worker")
    assert pid in server.worker_pids()
    assert (loaded_with, enabled) == (0, 1)
    assert frozen > 10_000, frozen
