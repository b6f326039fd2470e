"""Issue 8, item 2: --refork-after N[,M,...] forks the next generation from a warm worker.

Observed as an operator would: /proc (who is whose parent, which processes are left), the
log, and the app itself: tests/apps/mem_app.py answers ``pid served``, where ``served``
counts the requests this process has served, so a worker forked by a mold that served 50
requests starts counting above 50, and one forked from the master starts at 1.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import run_tiamat, wait_for

from tiamat import refork
from tiamat.scoreboard import Scoreboard

APP = "tests.apps.mem_app:application"


def _get(server, path: str = "/") -> tuple[int, int]:
    """One request on a new connection: (pid, served) from the worker that answered."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, body
    finally:
        conn.close()
    pid, served = body.split()
    return int(pid), int(served)


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _group_members(pgid: int) -> list[int]:
    """Every live (non-zombie) process of the process group ``pgid``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry))
    return found


class Traffic:
    """Requests in a background thread, each on a new connection; every outcome is kept."""

    def __init__(self, server) -> None:
        self.server = server
        self.ok: list[tuple[int, int]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set() and len(self.ok) + len(self.errors) < 20000:
            try:
                self.ok.append(_get(self.server))
            except Exception as exc:  # every failure is a test failure
                self.errors.append(repr(exc))

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(15)


def _mold_pid(server, generation: int) -> int:
    match = server.wait_log(rf"Refork: pid (\d+) is the mold of generation {generation}\b", timeout=20)
    return int(match.group(1))


def test_refork_generation_descends_from_the_mold(tiamat_server):
    server = tiamat_server(APP, "-w", "2", "--refork-after", "50")
    first = set(server.worker_pids())
    assert len(first) == 2
    with Traffic(server) as traffic:
        mold = _mold_pid(server, 1)
        server.wait_log(r"Refork: generation 1 complete", timeout=30)
        time.sleep(0.3)  # a little traffic on the new generation
    assert traffic.errors == [], traffic.errors[:5]
    assert len(traffic.ok) > 100
    assert mold in first  # a warm worker of the first generation became the mold
    children = set(server.worker_pids())
    workers = children - {mold}
    assert mold in children and len(workers) == 2
    assert not workers & first  # every serving worker is new
    for pid in children:  # the master is the parent of every process, the mold's too
        assert _ppid(pid) == server.pid
    assert re.search(rf"worker \d \(pid \d+\) of generation 1 forked by the mold \(pid {mold}\)",
                     server.log())
    # the new workers carry the mold's memory: their request count starts past the mold's
    seen: dict[int, int] = {}
    for _ in range(20):  # requests in pairs that hold their worker a moment: each worker takes one
        results: list[tuple[int, int]] = []
        threads = [threading.Thread(
            target=lambda out=results: out.append(_get(server, "/grow?mb=0&sleep=0.3")))
            for _ in range(2)]
        for thread in threads:
            thread.start()
            time.sleep(0.05)
        for thread in threads:
            thread.join(20)
        for pid, served in results:
            seen.setdefault(pid, served)
        if set(seen) >= workers:
            break
    assert set(seen) >= workers
    assert all(seen[pid] > 50 for pid in workers), seen
    assert re.search(r"tiamat: mold \(generation 1\)", Path(f"/proc/{mold}/cmdline").read_bytes()
                     .decode(errors="replace"))
    # TERM stops every generation and the mold; nothing is left behind
    server.signal(signal.SIGTERM)
    assert server.wait(20) == 0
    assert wait_for(lambda: not _group_members(server.pid), 10, message="no process left")


def test_refork_list_uses_the_next_threshold_and_retires_the_old_mold(tiamat_server):
    server = tiamat_server(APP, "-w", "2", "--refork-after", "20,30", "--preload")
    with Traffic(server) as traffic:
        mold1 = _mold_pid(server, 1)
        mold2 = _mold_pid(server, 2)
        server.wait_log(r"Refork: generation 2 complete", timeout=30)
        match = server.wait_log(r"Refork: worker \d \(pid (\d+)\) served (\d+) requests; promoting it "
                                r"to mold of generation 2")
        assert int(match.group(1)) == mold2 and int(match.group(2)) >= 30
        wait_for(lambda: mold1 not in server.worker_pids(), 10, message="the first mold to exit")
        count_then = len(traffic.ok)
        wait_for(lambda: len(traffic.ok) > count_then + 200, 20, message="more traffic")
    assert traffic.errors == [], traffic.errors[:5]
    assert "generation 3" not in server.log()  # the list is used up: no third mold
    # with --preload the last mold is retired once its generation is complete (the master
    # holds the app); replacements are then forked from the master
    server.wait_log(rf"no further generation; retiring the mold \(pid {mold2}\)")
    wait_for(lambda: mold2 not in server.worker_pids(), 10, message="the last mold to exit")
    children = server.worker_pids()
    assert len(children) == 2
    assert all(_ppid(pid) == server.pid for pid in children)
    assert _get(server)[1] > 30  # still the warm generation serving


def test_max_requests_and_timeouts_keep_working_across_generations(tiamat_server):
    server = tiamat_server(APP, "-w", "2", "--refork-after", "10", "--max-requests", "40",
                           "--timeout", "2")
    with Traffic(server) as traffic:
        mold = _mold_pid(server, 1)
        server.wait_log(r"Refork: generation 1 complete", timeout=30)
        # max-requests recycles workers of the new generation; the mold forks their successors
        server.wait_log(rf"of generation 1 forked by the mold \(pid {mold}\)", count=4, timeout=30)
    assert traffic.errors == [], traffic.errors[:5]
    # a stuck worker of the new generation is killed at the timeout; the slots stay filled by
    # workers the mold forked (their request count starts past the mold's)
    conn = http.client.HTTPConnection(server.host, server.port, timeout=15)
    conn.request("GET", "/grow?mb=0&sleep=8")
    try:
        conn.getresponse().read()
    except (http.client.HTTPException, OSError):
        pass
    conn.close()
    server.wait_log(r"WORKER TIMEOUT", timeout=10)
    server.wait_log(r"exited.*\(timeout\)", timeout=10)
    wait_for(lambda: len(server.worker_pids()) == 3, 10, message="the mold and 2 workers")
    seen = {}
    for _ in range(20):
        pid, served = _get(server)
        seen.setdefault(pid, served)
    assert mold not in seen and all(served > 10 for served in seen.values()), seen
    assert all(_ppid(pid) == server.pid for pid in server.worker_pids())


def test_hup_drops_the_mold(tiamat_server):
    server = tiamat_server(APP, "-w", "2", "--refork-after", "10")
    with Traffic(server) as traffic:
        mold = _mold_pid(server, 1)
        server.wait_log(r"Refork: generation 1 complete", timeout=30)
    assert traffic.errors == []
    server.signal(signal.SIGHUP)
    wait_for(lambda: mold not in server.worker_pids(), 15, message="the mold to be retired")
    server.wait_log(r"Reload complete", timeout=15)
    # the reloaded workers are forked from the master: they load the app afresh
    seen = {}
    for _ in range(20):
        pid, served = _get(server)
        seen.setdefault(pid, served)
    assert min(seen.values()) <= 2, seen


def test_refork_after_is_validated():
    result = run_tiamat(APP, "--refork-after", "50,x")
    assert result.returncode == 2
    assert "--refork-after" in result.stderr and "50,x" in result.stderr


@pytest.mark.parametrize("text, expected", [("50", [50]), ("50, 100,1000", [50, 100, 1000]),
                                            (None, []), ("", []), (7, [7])])
def test_parse_thresholds(text, expected):
    assert refork.parse_thresholds(text) == expected


@pytest.mark.parametrize("text", ["0", "-5", "5,", "a", "1.5", "5;6"])
def test_parse_thresholds_rejects(text):
    with pytest.raises(ValueError):
        refork.parse_thresholds(text)


def test_without_a_subreaper_workers_fork_from_the_master(monkeypatch, caplog):
    monkeypatch.setattr(refork, "set_subreaper", lambda: "PR_SET_CHILD_SUBREAPER is Linux-only")
    state = SimpleNamespace(cfg=SimpleNamespace(refork_after="50"), board=Scoreboard(4),
                            generation=0, refork="unset")
    with caplog.at_level("WARNING", logger="tiamat.error"):
        refork.setup(state)
    assert state.refork is None
    assert "forked from the master instead" in caplog.text
