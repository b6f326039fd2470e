"""--timeout, --boot-timeout, back-off and orphan detection, with real stuck processes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

from apps.pc_support import alive, children, one_per_slot, try_get
from conftest import ROOT, wait_for

APP = "tests/apps/pc_app.py"


def test_a_stuck_request_is_killed_with_its_stack_logged_first(tiamat_server, tmp_path):
    hook_log = tmp_path / "hooks.log"
    server = tiamat_server(APP, "-w", "1", "--timeout", "1", "-c", "tests/apps/pc_hooks_abort.py",
                           "-b", "127.0.0.1:0", env={"PC_HOOK_LOG": str(hook_log)})
    (victim,) = wait_for(lambda: one_per_slot(server.pid, 1), message="1 worker").values()
    with socket.create_connection((server.host, server.port), timeout=15) as sock:
        sock.sendall(b"GET /stuck?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
        line = server.wait_log(r"WORKER TIMEOUT: worker 0 \(pid (\d+)\) spent ([\d.]+)s on "
                               r"GET /stuck", timeout=15)
        assert int(line.group(1)) == victim and float(line.group(2)) >= 1.0
        assert sock.recv(100) == b""  # the connection died with the worker
    server.wait_log(rf"Worker 0 \(pid {victim}\) exited with code 1 \(timeout\)")
    log = server.log()
    dump = log.index("stuck_in_the_app", log.index("WORKER TIMEOUT"))
    assert dump < log.index(f"(pid {victim}) exited")  # the stack came before the end
    assert f"worker_abort 0 {victim}" in hook_log.read_text()
    replacement = wait_for(lambda: (s := one_per_slot(server.pid, 1)) and s[0] != victim and s[0],
                           message="a replacement")
    assert try_get(server.host, server.port).startswith(f"{replacement} 0 ")


def test_a_worker_whose_loop_stops_beating_is_killed(tiamat_server):
    server = tiamat_server(APP, "-w", "1", "--timeout", "1", "-k", "tests.apps.pc_worker:StallingWorker",
                           wait=False, env={"PYTHONPATH": str(ROOT)})
    server.wait_listening()
    line = server.wait_log(r"WORKER TIMEOUT: worker 0 \(pid (\d+)\) stopped beating", timeout=15)
    victim = int(line.group(1))
    server.wait_log(rf"Worker 0 \(pid {victim}\) exited", timeout=10)
    assert "in loop" in server.log()  # the stack dump names where it stalled
    server.wait_log(r"Booting worker 0 with pid", count=2)


def test_idle_workers_are_never_killed(tiamat_server):
    server = tiamat_server(APP, "-w", "2", "--timeout", "2")  # idle workers beat every 0.5 s
    before = wait_for(lambda: one_per_slot(server.pid, 2), message="2 workers")
    time.sleep(4)
    assert one_per_slot(server.pid, 2) == before
    assert "WORKER TIMEOUT" not in server.log()


def test_a_worker_hanging_at_boot_is_killed_after_boot_timeout(tiamat_server, tmp_path):
    marker = tmp_path / "hung-once"
    app = tmp_path / "hangs.py"
    app.write_text(
        "import os, time\n"
        f"if not os.path.exists({str(marker)!r}):\n"
        f"    open({str(marker)!r}, 'w').close()\n"
        "    while True: time.sleep(0.1)  # hang_while_importing\n"
        "def application(environ, start_response):\n"
        "    start_response('200 OK', [('Content-Length', '2')])\n"
        "    return [b'ok']\n")
    server = tiamat_server(str(app), "-w", "1", "--boot-timeout", "1", wait=False)
    server.wait_listening()
    line = server.wait_log(r"Worker 0 \(pid (\d+)\) did not boot within 1s", timeout=15)
    server.wait_log(r"did not boot within 1s; retrying in", timeout=15)
    server.wait_answering(timeout=20)
    assert try_get(server.host, server.port) == "ok"
    assert not alive(int(line.group(1)))
    assert "hangs.py" in server.log()  # the stack dump shows the import that hung


def test_boot_timeout_defaults_to_twice_the_timeout(tiamat_server, tmp_path):
    app = tmp_path / "slow_import.py"
    app.write_text("import time\ntime.sleep(60)\n")
    server = tiamat_server(str(app), "-w", "1", "--timeout", "0.5", wait=False)
    server.wait_listening()
    server.wait_log(r"did not boot within 1s; killing it", timeout=15)


def test_a_crashing_worker_is_retried_with_back_off(tiamat_server, tmp_path):
    version_file = tmp_path / "version"
    version_file.write_text("v1")
    server = tiamat_server(APP, "-w", "1", env={"PC_VERSION_FILE": str(version_file)})
    (pid,) = wait_for(lambda: one_per_slot(server.pid, 1), message="1 worker").values()
    version_file.write_text("broken")
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    server.wait_log(r"retrying in 2s", timeout=15)  # (the second failed boot: 1 s, 2 s ... apart)
    elapsed = time.monotonic() - killed
    attempts = len(re.findall(r"Booting worker 0 with pid", server.log()))
    # (without back-off a broken boot repeats every few ms: hundreds of attempts by now)
    assert 3 <= attempts <= 3 + elapsed, f"{attempts} boot attempts in {elapsed:.1f} s"
    assert server.proc.poll() is None
    version_file.write_text("v2")
    server.wait_answering(timeout=20)


def test_no_worker_ever_booted_exits_4_with_the_error(tmp_path):
    app = tmp_path / "broken.py"
    app.write_text("raise ImportError('no such thing as broken_dependency')\n")
    from conftest import run_tiamat

    result = run_tiamat(str(app), "-w", "2", "-b", "127.0.0.1:0")
    assert result.returncode == 4
    assert "broken_dependency" in result.stderr


def _workers_of(master: int) -> list[int]:
    return [pid for pid in children(master) if alive(pid)]


def test_workers_exit_within_two_seconds_when_the_master_is_killed(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "tiamat", APP, "-w", "2", "-b", "127.0.0.1:0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        workers = wait_for(lambda: len(w := _workers_of(proc.pid)) == 2 and w, timeout=15,
                           message="2 workers")
        port = None
        deadline = time.monotonic() + 10
        text = b""
        while port is None and time.monotonic() < deadline:
            text += os.read(proc.stdout.fileno(), 4096)
            match = re.search(rb"Listening at: http://127.0.0.1:(\d+)", text)
            port = int(match.group(1)) if match else None
        assert port
        # one worker is busy in a long request when the master dies
        busy = socket.create_connection(("127.0.0.1", port), timeout=10)
        busy.sendall(b"GET /sleep?s=30 HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(5)
        wait_for(lambda: not any(alive(pid) for pid in workers), timeout=4,
                 message="the orphaned workers to exit")
        assert time.monotonic() - killed_at < 4  # (~0.75 s: a 0.25 s check, 0.5 s grace)
        busy.close()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def test_a_record_caught_mid_write_is_never_judged():
    """struct.pack_into zero-fills before it writes: what a racing master may read."""
    from tiamat.scoreboard import Scoreboard

    board = Scoreboard(4)
    board.reset(2, 1234, 100.0)
    writer = board.writer(2)
    writer.busy(101.0, b"GET", b"/x")
    assert not board.read_stable(2).torn
    board.mem[2 * 128 + 8:2 * 128 + 16] = bytes(8)  # the beat, as pack_into leaves it mid-write
    assert board.read(2).torn
    writer.idle(102.0)
    assert not board.read(2).torn and board.read(2).requests == 1
