"""Issue 8, items 1 and 3: copy-on-write sharing with --preload (gc.freeze, the asgi worker
too), --max-worker-memory, and the /proc readers behind them and bench/memory.py.

Memory is observed from /proc, as an operator would (PSS summed over the workers).
"""

from __future__ import annotations

import http.client
import os
import re
import socket
import subprocess
import sys
import threading
import time

from conftest import wait_for

from tiamat import memory
from tiamat.workers.base import DUMP_SIGNAL

APP = "tests.apps.mem_app:application"
ASGI_APP = "tests.apps.mem_asgi:app"


def _get(server, path: str = "/", timeout: float = 15) -> bytes:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
    except OSError as exc:  # (with the server's log and its workers' stacks: a request
        for pid in server.worker_pids():  # lost in a refork, say)
            os.kill(pid, DUMP_SIGNAL)  # (every thread's stack, into the log)
        time.sleep(0.5)
        raise AssertionError(f"GET {path}: {exc!r}\n{server.log()[-12000:]}") from exc
    finally:
        conn.close()
    assert response.status == 200, body
    return body


# --- readers -----------------------------------------------------------------------------
def test_readers_on_this_process():
    usage = memory.Usage.of(os.getpid())
    assert usage is not None
    assert 0 < usage.uss <= usage.pss <= usage.rss
    assert abs(memory.rss(os.getpid()) - usage.rss) < 64 * memory.MB
    assert memory.Usage.of(2**22 + 12345) is None and memory.rss(2**22 + 12345) is None


def test_descendants_finds_grandchildren():
    code = "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; " \
           "time.sleep(30)']); print(p.pid, flush=True); p.wait()"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        grandchild = int(proc.stdout.readline())
        found = memory.descendants(os.getpid())
        assert proc.pid in found and grandchild in found
        assert found.index(proc.pid) < found.index(grandchild)
    finally:
        os.kill(grandchild, 9)
        proc.wait(10)


# --- gc.freeze with --preload ------------------------------------------------------------
def _workers_pss(server, workers: int) -> int:
    pids = wait_for(lambda: len(p := server.worker_pids()) == workers and p, message="workers")
    # a full collection in every worker, as a busy app eventually does by itself; requests
    # go in pairs that hold their worker a moment, so each worker takes one
    served: set[int] = set()
    for _ in range(20):
        threads = [threading.Thread(target=lambda: served.add(int(_get(server, "/gc?sleep=0.3").split()[0])))
                   for _ in range(workers)]
        for thread in threads:
            thread.start()
            time.sleep(0.05)
        for thread in threads:
            thread.join(20)
        if served >= set(pids):
            break
    assert served >= set(pids)
    return sum(memory.Usage.of(pid).pss for pid in pids)


def test_gc_freeze_keeps_preloaded_objects_shared(tiamat_server):
    env = {"MEM_OBJECTS": "300000"}  # ~100 MB of small tracked objects built at import
    frozen = tiamat_server(APP, "-w", "2", "--preload", env=env)
    frozen_pss = _workers_pss(frozen, 2)
    unfrozen = tiamat_server(APP, "-w", "2", "--preload", "--no-gc-freeze", env=env)
    unfrozen_pss = _workers_pss(unfrozen, 2)
    # without the freeze each worker's collection writes to every object's page: all private
    assert frozen_pss < 0.6 * unfrozen_pss, (frozen_pss // memory.MB, unfrozen_pss // memory.MB)


# --- the asgi worker with --preload ------------------------------------------------------
def test_asgi_worker_with_preload_forks_and_makes_its_loop_after_the_fork(tiamat_server):
    server = tiamat_server(ASGI_APP, "-w", "2", "--preload")
    assert re.search(r"Using worker: tiamat\.workers\.asgi", server.log())
    workers = set(wait_for(lambda: len(p := server.worker_pids()) == 2 and p, message="workers"))
    seen = set()
    for _ in range(30):  # (which worker answers is up to the kernel: check every one that does)
        loaded_in, startup_in, pid, _ = map(int, _get(server).split())
        assert loaded_in == server.pid  # imported once, in the master
        assert startup_in == pid  # the loop that ran the lifespan startup is the worker's own
        seen.add(pid)
    assert seen and seen <= workers


def test_dup_listener_leaves_the_shared_socket_non_blocking():
    """The promotion to mold duplicates the listeners.  socket.dup() made the socket every
    worker shares blocking, and an asgi worker that lost an accept race then hung in
    accept(), its whole loop with it (test_asgi_worker_reforks timed out about once in
    twenty suite runs)."""
    from tiamat.sockets import dup_listener

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        os.set_blocking(listener.fileno(), False)  # (as a worker inherits it: timeout None)
        with dup_listener(listener) as copy:
            assert not os.get_blocking(listener.fileno()) and copy.gettimeout() == 0.0
        with listener.dup():  # (what the promotion did before)
            assert os.get_blocking(listener.fileno())


def test_asgi_worker_reforks(tiamat_server):
    server = tiamat_server(ASGI_APP, "-w", "2", "--preload", "--refork-after", "20")
    for _ in range(400):
        _get(server)
        if "generation 1 complete" in server.log():
            break
    server.wait_log(r"Refork: generation 1 complete", timeout=20)
    mold = int(re.search(r"Refork: pid (\d+) is the mold", server.log()).group(1))
    counts = {}
    for _ in range(40):
        _, startup_in, pid, served = map(int, _get(server).split())
        assert startup_in == pid
        counts.setdefault(pid, served)
    assert mold not in counts
    assert all(served > 20 for served in counts.values()), counts


# --- --max-worker-memory -----------------------------------------------------------------
def test_a_worker_above_max_worker_memory_finishes_its_request_and_is_replaced(tiamat_server):
    server = tiamat_server(APP, "-w", "2", "--max-worker-memory", "120")
    server.wait_log(r"Ready: 2 worker")  # (both booted: each is there to take a request)
    first = set(server.worker_pids())
    # grow one worker past the limit; it answers this request before it goes
    body = _get(server, "/grow?mb=150&sleep=1.5")
    grown = int(body.split()[0])
    assert grown in first
    match = server.wait_log(r"Worker \d \(pid (\d+)\) uses (\d+) MB, above max_worker_memory "
                            r"\(120 MB\); replacing it", timeout=15)
    assert int(match.group(1)) == grown and int(match.group(2)) > 120
    wait_for(lambda: grown not in server.worker_pids() and len(server.worker_pids()) == 2, 15,
             message="the grown worker replaced")
    server.wait_log(rf"Worker \d \(pid {grown}\) exited \(memory\)", timeout=5)  # not "recycle"
    (other,) = first - {grown}
    assert other in server.worker_pids()  # the one below the limit stays
    assert len(re.findall(r"above max_worker_memory", server.log())) == 1
    for _ in range(10):
        _get(server)


def test_max_worker_memory_replaces_one_at_a_time(tiamat_server, tmp_path):
    server = tiamat_server(APP, "-w", "2", "--max-worker-memory", "100")
    server.wait_log(r"Ready: 2 worker")  # (both booted: each is there to take a request)
    first = set(server.worker_pids())
    # two slow requests, the second sent while the first holds its worker in the app: the
    # other worker takes it, so both grow past the limit together
    results: list[bytes] = []
    mark = tmp_path / "first"
    threads = [threading.Thread(target=lambda path=path: results.append(_get(server, path)))
               for path in (f"/grow?mb=120&sleep=2&mark={mark}", "/grow?mb=120&sleep=2")]
    threads[0].start()
    wait_for(mark.exists, message="the first request in the app")  # (the other worker is free)
    threads[1].start()
    for thread in threads:
        thread.join(20)
    assert {int(body.split()[0]) for body in results} == first
    server.wait_log(r"above max_worker_memory", count=2, timeout=30)
    wait_for(lambda: not set(server.worker_pids()) & first and len(server.worker_pids()) == 2, 20,
             message="both replaced")
    # never two replacements at once: the second starts after the first successor is ready
    log = server.log()
    lines = [m.start() for m in re.finditer(r"above max_worker_memory", log)]
    assert len(lines) == 2
    assert re.search(r"Booting worker \d with pid \d+", log[lines[0]:lines[1]])
    assert re.search(r"Worker \d \(pid \d+\) exited", log[lines[0]:lines[1]])
