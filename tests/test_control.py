"""The control socket: tiamat status [--json], reload, stop, scale N, reopen-logs."""

from __future__ import annotations

import json
import os
import socket
import stat

from conftest import APPS, run_tiamat, wait_for

APP = str(APPS / "ops_app.py")


def _status(sock_path) -> dict:
    result = run_tiamat("status", "--json", "--control-socket", str(sock_path))
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _workers(info: dict) -> list[dict]:
    return info["workers"]


def test_status_with_a_busy_and_an_idle_worker(tiamat_server, tmp_path):
    release = tmp_path / "release"
    ctl = tmp_path / "ctl.sock"
    server = tiamat_server(APP, "-w", "2", "--control-socket", str(ctl),
                           env={"OPS_RELEASE": str(release)})
    assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o600  # only the server's user may drive it
    client = socket.create_connection((server.host, server.port), timeout=30)
    try:
        client.sendall(b"GET /block?x=1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        info = wait_for(lambda: (i := _status(ctl)) and sorted(w["state"] for w in _workers(i))
                        == ["busy", "idle"] and i, timeout=15, message="one busy, one idle")
        master = info["master"]
        assert master["pid"] == server.pid
        assert master["target"] == 2 and master["workers"] == 2
        assert master["rss"] > 0 and master["uptime"] >= 0
        busy = next(w for w in _workers(info) if w["state"] == "busy")
        idle = next(w for w in _workers(info) if w["state"] == "idle")
        assert busy["request"] == "GET /block"
        assert busy["request_age"] >= 0
        assert idle["request"] is None and idle["request_age"] is None
        assert sorted([busy["pid"], idle["pid"]]) == sorted(server.worker_pids())
        assert sorted([busy["slot"], idle["slot"]]) == [0, 1]
        for worker in (busy, idle):
            assert worker["rss"] > 1_000_000
            assert worker["uptime"] > 0
            assert worker["restarts"] == 0
        assert busy["requests"] + idle["requests"] >= 1  # the fixture's readiness probe
        # the balancing figures (-w 2): the blocked client's connection is held by the busy
        # worker, and a worker publishes its CPU load from its second loop tick on (the busy
        # one's loop waits for the app: it may show none yet)
        assert busy["connections"] >= 1
        wait_for(lambda: (i := _status(ctl)) and any(
            w["state"] == "idle" and w["cpu"] is not None and 0 <= w["cpu"] < 4
            for w in _workers(i)), timeout=15, message="the idle worker's CPU load")

        table = run_tiamat("status", "--control-socket", str(ctl))
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].startswith(f"master  pid {server.pid}")
        assert lines[1].split()[:6] == ["SLOT", "PID", "STATE", "REQUESTS", "CONNS", "CPU"]
        busy_line = next(line for line in lines[2:] if " busy " in line)
        assert str(busy["pid"]) in busy_line and "GET /block (" in busy_line
        assert any(" idle " in line for line in lines[2:])
    finally:
        release.write_text("go")
        client.close()


def test_scale_reopen_reload_and_stop(tiamat_server, tmp_path):
    pidfile = tmp_path / "tiamat.pid"
    access = tmp_path / "access.log"
    server = tiamat_server(APP, "-w", "1", "--pid", str(pidfile), "--access-logfile", str(access))
    where = ("--pid", str(pidfile))  # the socket defaults to PIDFILE.sock
    assert (tmp_path / "tiamat.pid.sock").exists()

    result = run_tiamat("scale", "3", *where)
    assert result.returncode == 0, result.stderr
    info = wait_for(lambda: (i := _status(tmp_path / "tiamat.pid.sock"))
                    and sum(w["state"] == "idle" for w in i["workers"]) == 3 and i,
                    timeout=15, message="3 idle workers")
    assert info["master"]["target"] == 3
    assert run_tiamat("scale", "1", *where).returncode == 0
    wait_for(lambda: len(server.worker_pids()) == 1, timeout=15, message="back to 1 worker")

    server.get("/missing?before")
    wait_for(lambda: access.exists() and "/missing?before" in access.read_text())
    access.rename(tmp_path / "access.log.1")
    assert run_tiamat("reopen-logs", *where).returncode == 0

    def logged_to_new_file() -> bool:
        server.get("/missing?after")
        return access.exists() and "/missing?after" in access.read_text()

    wait_for(logged_to_new_file, timeout=10, interval=0.2, message="the reopened access log")

    old = set(server.worker_pids())
    assert run_tiamat("reload", *where).returncode == 0
    wait_for(lambda: (now := set(server.worker_pids())) and not now & old and len(now) == 1,
             timeout=20, message="every worker replaced")
    server.wait_answering()
    server.wait_log("Control socket: reload")

    result = run_tiamat("stop", *where)
    assert result.returncode == 0, result.stderr
    assert server.wait(20) == 0
    assert not (tmp_path / "tiamat.pid.sock").exists()  # removed on exit


def test_errors_are_one_line_and_exit_1(tiamat_server, tmp_path):
    missing = run_tiamat("status", "--control-socket", str(tmp_path / "nothing.sock"))
    assert missing.returncode == 1
    assert "no control socket at" in missing.stderr
    nothing_given = run_tiamat("reload", env={"TIAMAT_CONTROL_SOCKET": "", "TIAMAT_PIDFILE": ""})
    assert nothing_given.returncode == 1
    assert "--control-socket" in nothing_given.stderr
    bad = run_tiamat("scale", "0", "--control-socket", str(tmp_path / "x.sock"))
    assert bad.returncode == 2  # usage error from the argument check


def test_control_socket_not_stolen_by_a_second_server(tiamat_server, tmp_path):
    ctl = tmp_path / "ctl.sock"
    first = tiamat_server(APP, "--control-socket", str(ctl))
    second = run_tiamat(APP, "-b", "127.0.0.1:0", "--control-socket", str(ctl), timeout=30)
    assert second.returncode == 1
    assert "in use by another server" in second.stderr
    assert _status(ctl)["master"]["pid"] == first.pid


def test_not_opened_unless_asked(tiamat_server, tmp_path):
    server = tiamat_server(APP, cwd=tmp_path)
    assert "Control socket at" not in server.log()
    assert not list(tmp_path.glob("*.sock"))


def test_a_stale_socket_file_is_replaced(tiamat_server, tmp_path):
    ctl = tmp_path / "ctl.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(ctl))  # a crashed server's file: it exists, nobody listens
    leftover.close()
    server = tiamat_server(APP, "--control-socket", str(ctl))
    assert _status(ctl)["master"]["pid"] == server.pid
