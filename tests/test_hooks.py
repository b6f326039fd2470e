"""Server hooks from the config file: each one called, where and with what it documents."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from apps.pc_support import alive, get, one_per_slot, read_pid, try_get
from conftest import wait_for

APP = "tests/apps/pc_app.py"


def _records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _calls(path: Path, hook: str) -> list[dict]:
    return [r for r in _records(path) if r["hook"] == hook]


def test_every_hook_is_called_with_its_documented_arguments(tiamat_server, tmp_path):
    hook_log = tmp_path / "hooks.jsonl"
    server = tiamat_server(APP, "-c", "tests/apps/pc_hooks.py", "-b", "127.0.0.1:0",
                           env={"PC_HOOK_LOG": str(hook_log)})
    master = server.pid
    workers = wait_for(lambda: one_per_slot(master, 2), message="2 workers")
    wait_for(lambda: _calls(hook_log, "when_ready"), message="when_ready")
    assert [c["args"] for c in _calls(hook_log, "on_starting")] == [["MasterState"]]
    assert _calls(hook_log, "when_ready")[0]["pid"] == master
    forks = _calls(hook_log, "pre_fork")
    assert sorted(c["slot"] for c in forks) == [0, 1]
    assert all(c["pid"] == master and c["args"] == ["MasterState", "WorkerProc"] for c in forks)
    post = _calls(hook_log, "post_fork")
    assert sorted((c["slot"], c["worker_id"]) for c in post) == [(0, "0"), (1, "1")]
    assert {c["pid"] for c in post} == set(workers.values())
    assert all(c["args"][1] == "SyncWorker" for c in post)
    assert sorted(c["slot"] for c in _calls(hook_log, "post_worker_init")) == [0, 1]

    assert get(server.host, server.port, "/env?k=TIAMAT_WORKER_ID")[0] == 200
    after = wait_for(lambda: [c for c in _calls(hook_log, "post_request") if c["path"] == "/env"],
                     message="post_request")[0]
    pre = next(c for c in _calls(hook_log, "pre_request") if c["path"] == "/env")
    assert pre["args"] == ["SyncWorker", "RequestHead"] and pre["pid"] == after["pid"]
    assert after["args"] == ["SyncWorker", "RequestHead", "dict", "RequestResult"]
    assert after["status"] == 200

    server.signal(signal.SIGTTIN)
    wait_for(lambda: one_per_slot(master, 3), message="3 workers")
    assert {"new": 3, "old": 2} in [{"new": c["new"], "old": c["old"]}
                                    for c in _calls(hook_log, "nworkers_changed")]

    os.kill(workers[0], signal.SIGQUIT)  # QUIT to one worker: worker_int, worker_exit
    wait_for(lambda: any(c["slot"] == 0 for c in _calls(hook_log, "child_exit")),
             message="child_exit for slot 0")
    assert [c["pid"] for c in _calls(hook_log, "worker_int")] == [workers[0]]
    assert [c["pid"] for c in _calls(hook_log, "worker_exit")] == [workers[0]]
    exit_call = next(c for c in _calls(hook_log, "child_exit") if c["slot"] == 0)
    assert exit_call["pid"] == master and exit_call["pid_of"] == workers[0]

    server.signal(signal.SIGHUP)  # on_reload; the config says 2 workers again
    server.wait_log(r"Reload complete", timeout=20)
    reload_call = _calls(hook_log, "on_reload")[0]
    assert reload_call["pid"] == master and reload_call["generation"] == 1
    server.signal(signal.SIGTERM)
    assert server.wait(20) == 0
    assert [c["pid"] for c in _calls(hook_log, "on_exit")] == [master]


def test_the_original_tiamat_hook_names_without_arguments(tiamat_server, tmp_path):
    hook_log = tmp_path / "hooks.log"
    pid_path = tmp_path / "tiamat.pid"
    server = tiamat_server(APP, "-c", "tests/apps/pc_hooks_original.py", "-b", "127.0.0.1:0",
                           "--pid", str(pid_path), env={"PC_HOOK_LOG": str(hook_log)})
    worker = wait_for(lambda: one_per_slot(server.pid, 1), message="1 worker")[0]
    text = hook_log.read_text()
    assert f"before_fork {server.pid}" in text and f"after_fork {worker}" in text
    server.signal(signal.SIGUSR2)
    server.wait_log(r"New master \(pid \d+\) is ready", timeout=20)
    assert f"before_exec {server.pid}" in hook_log.read_text()
    new_master = read_pid(pid_path)
    server.signal(signal.SIGQUIT)
    assert server.wait(20) == 0
    os.kill(new_master, signal.SIGTERM)
    wait_for(lambda: not alive(new_master), timeout=20, message="the new master to stop")


def test_raising_hooks_are_logged_and_never_stop_the_server(tiamat_server):
    server = tiamat_server(APP, "-c", "tests/apps/pc_hooks_raising.py", "-b", "127.0.0.1:0")
    wait_for(lambda: one_per_slot(server.pid, 1), message="1 worker")
    assert try_get(server.host, server.port)
    server.signal(signal.SIGTTIN)
    wait_for(lambda: one_per_slot(server.pid, 2), message="2 workers")
    server.signal(signal.SIGHUP)
    server.wait_log(r"Reload complete", timeout=20)
    assert try_get(server.host, server.port)
    server.signal(signal.SIGTERM)
    assert server.wait(20) == 0
    log = server.log()
    for hook in ("on_starting", "when_ready", "pre_fork", "post_fork", "post_worker_init",
                 "pre_request", "post_request", "nworkers_changed", "on_reload", "child_exit",
                 "worker_exit", "on_exit"):
        assert f"hook {hook} raised" in log, hook
