"""-D/--daemon, --pid, running as PID 1 in a container, and systemd (sd_notify, sockets)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from apps.pc_support import alive, children, kill_tree, one_per_slot, proc_state, read_pid, unix_get
from conftest import ROOT, run_tiamat, wait_for

APP = "tests/apps/pc_app.py"


# --- daemon ------------------------------------------------------------------------------
def test_daemon_returns_once_the_server_answers(tmp_path):
    pid_path, sock_path = tmp_path / "tiamat.pid", tmp_path / "tiamat.sock"
    err, out = tmp_path / "error.log", tmp_path / "stdout.log"
    app = str(ROOT / APP)
    result = run_tiamat(app, "-D", "-w", "2", "--pid", str(pid_path), "-b", f"unix:{sock_path}",
                        "--error-logfile", str(err), "--stdout-path", str(out),
                        "--chdir", str(tmp_path))
    pid = read_pid(pid_path)
    try:
        assert result.returncode == 0, result.stderr
        assert pid and alive(pid)
        assert unix_get(str(sock_path)).startswith(b"HTTP/1.1 200")  # serving already
        assert os.getsid(pid) != os.getsid(0)  # detached: its own session
        assert os.getsid(pid) != pid  # double fork: not a session leader (no terminal again)
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        assert os.readlink(f"/proc/{pid}/fd/1") == str(out)
        assert os.readlink(f"/proc/{pid}/fd/2") == str(err)
        assert os.readlink(f"/proc/{pid}/cwd") == str(tmp_path)
        assert "Listening at: unix:" in err.read_text()
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not alive(pid), timeout=20, message="the daemon to stop")
        assert not pid_path.exists()
    finally:
        if pid:
            kill_tree(pid)


def test_daemon_that_cannot_start_fails_the_command_with_the_error(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise ImportError('needs missing_dependency')\n")
    result = run_tiamat(str(broken), "-D", "-b", f"unix:{tmp_path / 's.sock'}",
                        "--pid", str(tmp_path / "p.pid"))
    assert result.returncode == 4
    assert "missing_dependency" in result.stderr
    assert not (tmp_path / "p.pid").exists()


# --- pidfile -----------------------------------------------------------------------------
def test_pidfile_refuses_a_live_server_replaces_a_stale_one_and_goes_on_exit(
        tiamat_server, tmp_path):
    pid_path = tmp_path / "tiamat.pid"
    pid_path.write_text(f"{os.getpid()}\n")  # a live process
    result = run_tiamat(APP, "--pid", str(pid_path), "-b", "127.0.0.1:0")
    assert result.returncode == 1 and "running" in result.stderr
    assert pid_path.read_text() == f"{os.getpid()}\n"

    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid_path.write_text(done.stdout)  # a dead process: stale
    server = tiamat_server(APP, "--pid", str(pid_path))
    assert read_pid(pid_path) == server.pid
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    server.signal(signal.SIGTERM)
    assert server.wait(20) == 0
    assert not pid_path.exists()


# --- PID 1 -------------------------------------------------------------------------------
def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare --pid (root)")
def test_as_pid_1_term_stops_gracefully_and_every_child_is_reaped(tmp_path):
    sock_path = tmp_path / "tiamat.sock"
    log_path = tmp_path / "tiamat.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "tiamat", APP,
             "-w", "2", "-b", f"unix:{sock_path}"],
            cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        master = wait_for(lambda: children(proc.pid) and children(proc.pid)[0], timeout=15,
                          message="the master under unshare")
        nspid = re.search(r"NSpid:\s+(.*)", Path(f"/proc/{master}/status").read_text())
        assert nspid and nspid.group(1).split()[-1] == "1"  # PID 1 in its namespace
        workers = wait_for(lambda: one_per_slot(master, 2), timeout=15, message="2 workers")
        wait_for(lambda: sock_path.exists(), message="the socket")
        for _ in range(4):  # each leaves an orphan that PID 1 inherits and must reap
            assert unix_get(str(sock_path), "/orphan").startswith(b"HTTP/1.1 200")
        # (each orphan sleeps 0.3 s, then exits and must be reaped: only the workers stay)
        wait_for(lambda: sorted(children(master)) == sorted(workers.values()), timeout=10,
                 message="the orphans reaped")
        assert [p for p in children(master) if proc_state(p) == "Z"] == []
        os.kill(master, signal.SIGTERM)
        assert proc.wait(20) == 0
        assert "Shutdown complete" in log_path.read_text()
    finally:
        kill_tree(proc.pid)
        proc.wait(5)


# --- systemd -----------------------------------------------------------------------------
def _datagrams(sock: socket.socket) -> list[str]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


def test_sd_notify_ready_reloading_stopping(tiamat_server, tmp_path):
    notify_path = tmp_path / "notify.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    listener.setblocking(False)
    seen: list[str] = []

    def got(text: str) -> bool:
        seen.extend(_datagrams(listener))
        return any(text in message for message in seen)

    try:
        server = tiamat_server(APP, "-w", "2", env={"NOTIFY_SOCKET": str(notify_path)})
        wait_for(lambda: got("READY=1"), message="READY=1")
        assert f"MAINPID={server.pid}" in seen[0]
        seen.clear()
        server.signal(signal.SIGHUP)
        wait_for(lambda: got("RELOADING=1"), message="RELOADING=1")
        assert "MONOTONIC_USEC=" in next(m for m in seen if "RELOADING=1" in m)
        wait_for(lambda: got("READY=1"), timeout=20, message="READY=1 after the reload")
        server.signal(signal.SIGTERM)
        wait_for(lambda: got("STOPPING=1"), message="STOPPING=1")
        assert server.wait(20) == 0
    finally:
        listener.close()


def test_systemd_socket_activation(tmp_path):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    launcher = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
                "os.environ['LISTEN_PID'] = str(os.getpid()); os.environ['LISTEN_FDS'] = '1'; "
                "os.execv(sys.executable, [sys.executable, '-m', 'tiamat', *sys.argv[2:]])")
    log_path = tmp_path / "tiamat.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", launcher, str(listener.fileno()), APP],
                                cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                pass_fds=[listener.fileno()], start_new_session=True)
    listener.close()  # only the server holds it now
    try:
        wait_for(lambda: f"Listening at: http://127.0.0.1:{port}" in log_path.read_text(),
                 timeout=15, message="the inherited socket in the log")
        assert "8000" not in log_path.read_text()  # nothing else was bound

        def answer(path: str) -> str | None:
            from apps.pc_support import try_get

            return try_get("127.0.0.1", port, path)

        assert wait_for(lambda: answer("/"), timeout=15, message="an answer")
        assert answer("/env?k=LISTEN_FDS") == "-"  # workers do not see systemd's variables
    finally:
        kill_tree(proc.pid)
        proc.wait(5)


def test_usr2_of_a_daemon_hands_over_without_detaching_again(tmp_path):
    pid_path, sock_path = tmp_path / "tiamat.pid", tmp_path / "tiamat.sock"
    result = run_tiamat(str(ROOT / APP), "-D", "--pid", str(pid_path), "-b", f"unix:{sock_path}",
                        "--error-logfile", str(tmp_path / "error.log"))
    old = read_pid(pid_path)
    new = None
    try:
        assert result.returncode == 0, result.stderr
        os.kill(old, signal.SIGUSR2)
        new = wait_for(lambda: (p := read_pid(pid_path)) != old and p, timeout=20,
                       message="the new master's pidfile")
        assert read_pid(Path(f"{pid_path}.oldbin")) == old
        wait_for(lambda: "New master" in (tmp_path / "error.log").read_text(), timeout=20,
                 message="the new master ready")
        assert new in children(old)  # the same process, not detached again
        os.kill(old, signal.SIGQUIT)
        wait_for(lambda: not alive(old), timeout=20, message="the old master to stop")
        assert sock_path.exists() and unix_get(str(sock_path)).startswith(b"HTTP/1.1 200")
        assert alive(new) and read_pid(pid_path) == new
    finally:
        for pid in (old, new):
            if pid:
                kill_tree(pid)


def test_usr1_moves_a_daemons_stdout_and_stderr_to_the_new_files(tmp_path):
    pid_path, sock_path = tmp_path / "tiamat.pid", tmp_path / "tiamat.sock"
    err, out = tmp_path / "error.log", tmp_path / "stdout.log"
    result = run_tiamat(str(ROOT / APP), "-D", "-w", "2", "--pid", str(pid_path),
                        "-b", f"unix:{sock_path}", "--error-logfile", str(err),
                        "--stdout-path", str(out))
    pid = read_pid(pid_path)
    try:
        assert result.returncode == 0, result.stderr
        workers = list(wait_for(lambda: one_per_slot(pid, 2), message="2 workers").values())
        err.rename(tmp_path / "error.log.1")
        out.rename(tmp_path / "stdout.log.1")
        os.kill(pid, signal.SIGUSR1)
        wait_for(lambda: err.exists() and err.read_text().count("reopened the log files") == 3,
                 message="master and workers reopened")
        for process in (pid, *workers):
            assert os.readlink(f"/proc/{process}/fd/1") == str(out)
            assert os.readlink(f"/proc/{process}/fd/2") == str(err)
    finally:
        if pid:
            kill_tree(pid)


def test_sd_notify_to_an_abstract_socket(tiamat_server, tmp_path):
    name = f"tiamat-test-{os.getpid()}-{tmp_path.name}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind("\0" + name)
    listener.setblocking(False)
    try:
        server = tiamat_server(APP, env={"NOTIFY_SOCKET": "@" + name})
        seen = wait_for(lambda: _datagrams(listener), message="a datagram")
        assert "READY=1" in seen[0] and f"MAINPID={server.pid}" in seen[0]
    finally:
        listener.close()
