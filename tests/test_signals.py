"""Signals to the master, with real processes: HUP, TTIN/TTOU, WINCH, QUIT/TERM/INT, USR1, USR2."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from apps.pc_support import (
    alive,
    children,
    get,
    listening_from,
    one_per_slot,
    read_pid,
    try_get,
    unix_get,
)
from conftest import read_until_closed, wait_for

APP = "tests/apps/pc_app.py"


def _versioned(tiamat_server, tmp_path: Path, *args: str, version: str = "v1"):
    version_file = tmp_path / "version"
    version_file.write_text(version)
    server = tiamat_server(APP, *args, env={"PC_VERSION_FILE": str(version_file)})
    server.wait_log(r"Ready: \d+ worker")  # every first worker booted, not only one answering
    return server, version_file


def _versions(server, n: int = 12) -> set[str]:
    return {(try_get(server.host, server.port) or "x x down").split()[2] for _ in range(n)}


# --- HUP ---------------------------------------------------------------------------------
def test_hup_reloads_the_code_in_new_workers_with_the_same_slots(tiamat_server, tmp_path):
    server, version_file = _versioned(tiamat_server, tmp_path, "-w", "2")
    old = wait_for(lambda: one_per_slot(server.pid, 2), message="2 workers")
    assert _versions(server) == {"v1"}
    version_file.write_text("v2")
    server.signal(signal.SIGHUP)
    new = wait_for(lambda: (s := one_per_slot(server.pid, 2)) and
                   not set(s.values()) & set(old.values()) and s, timeout=20,
                   message="2 new workers")
    assert sorted(new) == [0, 1]
    assert _versions(server) == {"v2"}
    server.wait_log(r"Reload complete")
    assert server.proc.poll() is None


def test_hup_with_slow_boot_never_lowers_capacity(tiamat_server, tmp_path):
    hold, go = tmp_path / "hold", tmp_path / "go"
    app = tmp_path / "slow.py"
    app.write_text(
        "import os, time\n"
        f"while os.path.exists({str(hold)!r}) and not os.path.exists({str(go)!r}):\n"
        "    time.sleep(0.05)  # the new code is slow to import, for as long as the test wants\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Length', '2')])\n"
        "    return [b'ok']\n")
    server = tiamat_server(str(app), "-w", "2")
    server.wait_log(r"Ready: 2 worker")  # both old workers booted before the new code is slow
    old = wait_for(lambda: one_per_slot(server.pid, 2), message="2 workers")
    hold.touch()
    server.signal(signal.SIGHUP)
    wait_for(lambda: len(children(server.pid)) == 4, message="2 new workers booting")
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # the new workers are still importing
        assert all(alive(pid) for pid in old.values()), "an old worker went before its replacement"
        assert try_get(server.host, server.port) == "ok"
    go.touch()
    wait_for(lambda: (s := one_per_slot(server.pid, 2)) and not set(s.values()) & set(old.values()),
             timeout=20, message="the new workers")


def test_hup_with_broken_code_keeps_old_workers_serving(tiamat_server, tmp_path):
    server, version_file = _versioned(tiamat_server, tmp_path, "-w", "2")
    old = wait_for(lambda: one_per_slot(server.pid, 2), message="2 workers")
    version_file.write_text("broken")
    server.signal(signal.SIGHUP)
    server.wait_log(r"broken on purpose|exited with code 4 while booting|retrying in")
    server.wait_log(r"retrying in \d+s \(2 worker\(s\) still serving\)")
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert _versions(server, 3) == {"v1"}
    assert server.proc.poll() is None
    assert all(alive(pid) for pid in old.values())
    # fixed code and another HUP: the reload goes through, at once (no back-off left over)
    version_file.write_text("v3")
    server.signal(signal.SIGHUP)
    wait_for(lambda: _versions(server, 4) == {"v3"}, timeout=20, message="v3 served")
    wait_for(lambda: one_per_slot(server.pid, 2), timeout=20, message="2 workers")


def test_hup_rereads_the_config_file_and_survives_a_broken_one(tiamat_server, tmp_path):
    config = tmp_path / "tiamat.conf.py"
    config.write_text(f"bind = ['127.0.0.1:0']\nworkers = 1\napp = {APP!r}\n")
    server = tiamat_server("-c", str(config))
    wait_for(lambda: one_per_slot(server.pid, 1), message="1 worker")
    config.write_text(f"bind = ['127.0.0.1:0']\nworkers = 3\napp = {APP!r}\n")
    server.signal(signal.SIGHUP)
    wait_for(lambda: one_per_slot(server.pid, 3), timeout=20, message="3 workers after HUP")
    config.write_text("workers = (\n")  # a syntax error
    server.signal(signal.SIGHUP)
    server.wait_log(r"configuration not reloaded")
    assert try_get(server.host, server.port)
    assert one_per_slot(server.pid, 3)
    assert server.proc.poll() is None


def test_a_flood_of_hups_leaves_a_healthy_server(tiamat_server, tmp_path):
    server, version_file = _versioned(tiamat_server, tmp_path, "-w", "2")
    wait_for(lambda: one_per_slot(server.pid, 2), message="2 workers")
    version_file.write_text("v2")
    for _ in range(100):
        os.kill(server.pid, signal.SIGHUP)
    wait_for(lambda: _versions(server, 4) == {"v2"}, timeout=30, message="v2 served")
    settled = wait_for(lambda: one_per_slot(server.pid, 2), timeout=30, message="2 workers")
    server.wait_log(r"Reload complete", timeout=20)
    time.sleep(0.5)
    assert one_per_slot(server.pid, 2) == settled  # settled: no more churn
    assert all(alive(pid) for pid in children(server.pid))  # no zombies left
    assert server.proc.poll() is None


def test_hup_with_preload_re_executes_and_hands_over(tiamat_server, tmp_path):
    pid_path = tmp_path / "tiamat.pid"
    server, version_file = _versioned(tiamat_server, tmp_path, "-w", "2", "--preload",
                                      "--pid", str(pid_path))
    assert read_pid(pid_path) == server.pid
    version_file.write_text("v2")
    server.signal(signal.SIGHUP)
    assert server.wait(20) == 0  # the old master stops once the new one is ready
    new_master = read_pid(pid_path)
    assert new_master and new_master != server.pid and alive(new_master)
    try:
        assert _versions(server) == {"v2"}
        assert not Path(f"{pid_path}.oldbin").exists()
    finally:
        os.kill(new_master, signal.SIGKILL)


# --- worker count ------------------------------------------------------------------------
def test_ttin_ttou_with_stable_slots(tiamat_server):
    server = tiamat_server(APP, "-w", "2")
    first = wait_for(lambda: one_per_slot(server.pid, 2), message="2 workers")
    server.signal(signal.SIGTTIN)
    three = wait_for(lambda: one_per_slot(server.pid, 3), message="3 workers")
    assert three[0] == first[0] and three[1] == first[1]
    server.signal(signal.SIGTTOU)
    two = wait_for(lambda: one_per_slot(server.pid, 2), message="back to 2")
    assert two == first  # the highest slot went
    server.signal(signal.SIGTTOU)
    one = wait_for(lambda: one_per_slot(server.pid, 1), message="1 worker")
    assert one == {0: first[0]}
    server.signal(signal.SIGTTOU)  # never below one
    server.signal(signal.SIGTTOU)
    time.sleep(0.5)
    assert one_per_slot(server.pid, 1) == one
    assert try_get(server.host, server.port)


def test_a_replacement_inherits_the_slot_and_worker_id(tiamat_server):
    server = tiamat_server(APP, "-w", "3")
    before = wait_for(lambda: one_per_slot(server.pid, 3), message="3 workers")
    os.kill(before[1], signal.SIGKILL)
    after = wait_for(lambda: (s := one_per_slot(server.pid, 3)) and s[1] != before[1] and s,
                     message="a replacement in slot 1")
    assert after[0] == before[0] and after[2] == before[2]

    def served_by_replacement() -> bool:
        body = try_get(server.host, server.port) or ""
        return body.startswith(f"{after[1]} ") and body.split()[1] == "1"

    wait_for(served_by_replacement, message="TIAMAT_WORKER_ID=1 from the replacement")


def test_winch_stops_workers_but_keeps_master_and_sockets(tiamat_server):
    server = tiamat_server(APP, "-w", "2")
    wait_for(lambda: one_per_slot(server.pid, 2), message="2 workers")
    server.signal(signal.SIGWINCH)
    wait_for(lambda: not children(server.pid), message="no workers")
    time.sleep(0.3)
    assert not children(server.pid) and server.proc.poll() is None
    # the socket is still open: a client is queued, and served once TTIN brings a worker
    import socket as socketlib

    with socketlib.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        server.signal(signal.SIGTTIN)
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
    wait_for(lambda: one_per_slot(server.pid, 1), message="1 worker after TTIN")
    server.signal(signal.SIGWINCH)
    wait_for(lambda: not children(server.pid), message="no workers again")
    server.signal(signal.SIGHUP)  # HUP brings back the configured count
    wait_for(lambda: one_per_slot(server.pid, 2), timeout=20, message="2 workers after HUP")


# --- stopping ----------------------------------------------------------------------------
def _slow_request(server, seconds: float):
    import socket as socketlib

    sock = socketlib.create_connection((server.host, server.port), timeout=10)
    sock.sendall(f"GET /sleep?s={seconds} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    return sock


def _read_all(sock) -> bytes:
    with sock:
        return read_until_closed(sock)


def test_quit_is_graceful_and_int_is_quick(tiamat_server):
    server = tiamat_server(APP, "-w", "1")
    before = server.worker_sockets()
    sock = _slow_request(server, 1.5)
    server.wait_accepted(before)  # the request is the worker's (the app runs it)
    server.signal(signal.SIGQUIT)
    assert _read_all(sock).startswith(b"HTTP/1.1 200")  # the in-flight request finished
    assert server.wait(15) == 0

    quick = tiamat_server(APP, "-w", "1")
    before = quick.worker_sockets()
    sock = _slow_request(quick, 5)
    quick.wait_accepted(before)
    time.sleep(0.1)  # (the request in the app: a quick stop does not wait for it)
    started = time.monotonic()
    quick.signal(signal.SIGINT)
    assert quick.wait(15) == 0
    assert time.monotonic() - started < 4
    assert not _read_all(sock).startswith(b"HTTP/1.1 200")


# --- USR1 --------------------------------------------------------------------------------
def test_usr1_reopens_every_log_file(tiamat_server, tmp_path):
    error_log, access_log = tmp_path / "error.log", tmp_path / "access.log"
    server = tiamat_server(APP, "-w", "2", "--error-logfile", str(error_log),
                           "--access-logfile", str(access_log), wait=False)
    listening_from(server, error_log)
    wait_for(lambda: one_per_slot(server.pid, 2), message="2 workers")
    for _ in range(10):
        assert get(server.host, server.port, "/env?k=before")[0] == 200
    wait_for(lambda: access_log.read_text().count("k=before") == 10, message="10 access lines")
    rotated_error, rotated_access = tmp_path / "error.log.1", tmp_path / "access.log.1"
    error_log.rename(rotated_error)
    access_log.rename(rotated_access)
    server.signal(signal.SIGUSR1)
    wait_for(lambda: error_log.exists() and error_log.read_text().count("reopened the log files") >= 3,
             message="master and both workers reopened")
    for _ in range(20):
        assert get(server.host, server.port, "/env?k=after")[0] == 200
    wait_for(lambda: access_log.read_text().count("k=after") == 20, message="20 new access lines")
    rotated = rotated_access.read_text()
    assert rotated.count("k=before") == 10 and "k=after" not in rotated  # none lost, none late
    assert "reopened" not in rotated_error.read_text()


# --- USR2 --------------------------------------------------------------------------------
def test_usr2_starts_a_new_master_and_quit_completes_the_handover(tiamat_server, tmp_path):
    pid_path = tmp_path / "tiamat.pid"
    server, version_file = _versioned(tiamat_server, tmp_path, "-w", "2", "--pid", str(pid_path))
    old_workers = set(wait_for(lambda: one_per_slot(server.pid, 2), message="2 workers").values())
    version_file.write_text("v2")
    server.signal(signal.SIGUSR2)
    server.wait_log(r"New master \(pid \d+\) is ready", timeout=20)
    new_master = read_pid(pid_path)
    assert new_master and new_master != server.pid
    assert read_pid(Path(f"{pid_path}.oldbin")) == server.pid
    new_workers = set(wait_for(lambda: one_per_slot(new_master, 2), message="new workers").values())
    assert not new_workers & old_workers
    # both generations serve on the same socket until the old master is told to go
    wait_for(lambda: "v2" in _versions(server), message="the new master serving")
    server.signal(signal.SIGQUIT)
    assert server.wait(20) == 0
    assert _versions(server) == {"v2"}
    assert read_pid(pid_path) == new_master and alive(new_master)
    assert not Path(f"{pid_path}.oldbin").exists()
    os.kill(new_master, signal.SIGTERM)
    wait_for(lambda: not alive(new_master), timeout=20, message="the new master to stop")
    assert not pid_path.exists()


def test_usr2_whose_new_master_fails_keeps_the_old_one(tiamat_server, tmp_path):
    pid_path = tmp_path / "tiamat.pid"
    server, version_file = _versioned(tiamat_server, tmp_path, "-w", "1", "--pid", str(pid_path))
    wait_for(lambda: one_per_slot(server.pid, 1), message="1 worker")
    version_file.write_text("broken")  # the new master's workers cannot load the app: it exits 4
    server.signal(signal.SIGUSR2)
    server.wait_log(r"New master \(pid \d+\) exited with code 4", timeout=20)
    assert read_pid(pid_path) == server.pid
    assert not Path(f"{pid_path}.oldbin").exists()
    assert _versions(server) == {"v1"}
    assert server.proc.poll() is None


def test_usr2_leaves_the_unix_socket_to_the_new_master(tiamat_server, tmp_path):
    path = tmp_path / "tiamat.sock"
    pid_path = tmp_path / "tiamat.pid"
    server = tiamat_server(APP, "-b", f"unix:{path}", "--pid", str(pid_path), wait=False)
    server.wait_log(r"Listening at: unix:")
    wait_for(lambda: one_per_slot(server.pid, 1), message="1 worker")
    assert unix_get(str(path)).startswith(b"HTTP/1.1 200")
    server.signal(signal.SIGUSR2)
    server.wait_log(r"New master \(pid \d+\) is ready", timeout=20)
    new_master = read_pid(pid_path)
    server.signal(signal.SIGTERM)
    assert server.wait(20) == 0
    try:
        assert path.exists()
        reply = unix_get(str(path))
        assert reply.startswith(b"HTTP/1.1 200")
        assert int(reply.split(b"\r\n\r\n", 1)[1].split()[0]) in children(new_master)
    finally:
        os.kill(new_master, signal.SIGTERM)
        wait_for(lambda: not alive(new_master), timeout=20, message="the new master to stop")
    assert not path.exists()  # the last master removes it


def test_usr2_re_executes_from_the_directory_the_command_ran_in(tiamat_server, tmp_path):
    pid_path = tmp_path / "tiamat.pid"
    server = tiamat_server("pc_app.py", "--chdir", "tests/apps", "--pid", str(pid_path))
    server.signal(signal.SIGUSR2)  # a relative --chdir must still resolve in the new master
    server.wait_log(r"New master \(pid \d+\) is ready", timeout=20)
    new_master = read_pid(pid_path)
    server.signal(signal.SIGQUIT)
    assert server.wait(20) == 0
    try:
        assert try_get(server.host, server.port)
    finally:
        os.kill(new_master, signal.SIGTERM)
        wait_for(lambda: not alive(new_master), timeout=20, message="the new master to stop")


def test_hup_finds_a_relative_config_file_after_chdir(tiamat_server, tmp_path):
    from conftest import ROOT

    config = tmp_path / "conf.py"
    app = str(Path(ROOT / APP).resolve())
    config.write_text(f"bind = ['127.0.0.1:0']\nworkers = 1\napp = {app!r}\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    server = tiamat_server("-c", os.path.relpath(config, ROOT), "--chdir", str(work))
    wait_for(lambda: one_per_slot(server.pid, 1), message="1 worker")
    config.write_text(f"bind = ['127.0.0.1:0']\nworkers = 2\napp = {app!r}\n")
    server.signal(signal.SIGHUP)
    wait_for(lambda: one_per_slot(server.pid, 2), timeout=20, message="2 workers after HUP")


def test_hup_finds_a_relative_tiamat_config_after_chdir(tiamat_server, tmp_path):
    from conftest import ROOT

    config = tmp_path / "conf.py"
    app = str(Path(ROOT / APP).resolve())
    config.write_text(f"workers = 1\napp = {app!r}\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    server = tiamat_server("--chdir", str(work),
                           env={"TIAMAT_CONFIG": os.path.relpath(config, ROOT)})
    wait_for(lambda: one_per_slot(server.pid, 1), message="1 worker")
    config.write_text(f"workers = 2\napp = {app!r}\n")
    server.signal(signal.SIGHUP)
    wait_for(lambda: one_per_slot(server.pid, 2), timeout=20, message="2 workers after HUP")
    assert "configuration not reloaded" not in server.log()
