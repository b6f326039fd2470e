"""Connections are spread evenly over sibling workers, and balancing never stalls accepting.

Every worker waits on the one shared listening socket; a worker that already holds more
connections than its least-loaded sibling (+1) leaves the next one to that sibling (the
scoreboard carries each worker's count).  Here 64 keep-alive connections are opened in a
burst while a CPU-burning process with a higher priority competes with one of the workers
for its CPU (the workers pinned one per CPU): a worker that is slow to get the CPU is the
case where spreading by timing alone failed (the yield-based spreading before this rule
split 41/23 to 47/17 in half of the rounds here), and each worker must end up with 40-60 %
of the connections.  A stopped sibling or a lone worker must not delay new clients.

Even counts are not even work: a worker kept clearly busier than its siblings by its
keep-alive connections hands a few on (``--rebalance-keepalive``): their next response says
``Connection: close``, and the client's new connection goes to a sibling.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import read_response, read_to_end, wait_for

WSGI_APP = '''
import os
import time


def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def app(environ, start_response):
    if environ["PATH_INFO"] == "/burn":
        burn(0.005)
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
'''

ASGI_APP = '''
import os
import time


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/burn":
        end = time.process_time() + 0.005
        while time.process_time() < end:
            pass
    body = str(os.getpid()).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
'''

CONNECTIONS = 64
REQUEST = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"
#: how long the CPU burner may run at most (it is stopped by pid well before)
BURN_SECONDS = 20
#: the burner's niceness: higher priority than the workers (if allowed; else the same)
BURN_NICE = -10


def app_file(tmp_path: Path, kind: str) -> str:
    path = tmp_path / ("pid_asgi.py" if kind == "asgi" else "pid_wsgi.py")
    path.write_text(ASGI_APP if kind == "asgi" else WSGI_APP)
    return f"{path}:app"


def ask_pid(sock: socket.socket) -> int:
    """One request on a keep-alive connection; the pid in the answer."""
    sock.sendall(REQUEST)
    data = b""
    while b"\r\n\r\n" not in data or not data.split(b"\r\n\r\n", 1)[1]:
        more = sock.recv(4096)
        assert more, f"closed after {data!r}"
        data += more
    head, body = data.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200"), head
    return int(body)


def ask(sock: socket.socket, *paths: str) -> list[tuple[int, bool]]:
    """Requests for ``paths`` (default one for ``/``) sent in one go, pipelined: each answer's
    pid and whether it closes the connection.  After an answer that closes it, the server's
    clean EOF must follow, not a reset (nothing after it is answered)."""
    sock.sendall(b"".join(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode()
                          for path in paths or ("/",)))
    rest = b""
    answers = []
    for _ in paths or ("/",):
        head, body, rest = read_response(sock, rest)
        assert head.startswith(b"HTTP/1.1 200"), head
        closes = re.search(rb"(?im)^connection: *close", head) is not None
        answers.append((int(body), closes))
        if closes:
            assert (rest, *read_to_end(sock)[1:]) == (b"", "eof")
            break
    return answers


def connect(server, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection((server.host, server.port), timeout=timeout)


def wait_both_workers(server) -> list[int]:
    """Both workers have booted and answer (held probe connections until both pids showed)."""
    wait_for(lambda: len(server.worker_pids()) == 2, timeout=15)
    probes: list[socket.socket] = []
    seen: set[int] = set()
    try:
        def both() -> bool:
            sock = connect(server)
            probes.append(sock)
            seen.add(ask_pid(sock))
            return len(seen) == 2 or (len(probes) >= 40 and _restart(probes))
        wait_for(both, timeout=20, interval=0.05, message="both workers answering")
    finally:
        for sock in probes:
            sock.close()
    return sorted(seen)


def _restart(probes: list[socket.socket]) -> bool:
    """(keeps the probe loop bounded in descriptors: start over with fresh probes)"""
    for sock in probes:
        sock.close()
    probes.clear()
    return False


@pytest.fixture
def cpu_burners() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Busy processes to start on demand; stopped by pid at teardown."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    stop_burners(started)


def stop_burners(started: list[subprocess.Popen[bytes]]) -> None:
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def _raise_priority() -> None:
    try:
        os.nice(BURN_NICE)
    except OSError:
        pass  # not allowed here: it competes at the same priority


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def compete_with(started: list[subprocess.Popen[bytes]], workers: list[int]) -> None:
    """Pin the workers one per CPU and start a burner on the second one's CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        os.sched_setaffinity(workers[0], {cpus[0]})
        os.sched_setaffinity(workers[1], {cpus[1]})
    code = (f"import os, time\nos.sched_setaffinity(0, {{{cpus[-1]}}})\n"
            f"end = time.monotonic() + {BURN_SECONDS}\nwhile time.monotonic() < end: pass\n")
    proc = subprocess.Popen([sys.executable, "-c", code], preexec_fn=_raise_priority)
    started.append(proc)
    wait_for(lambda: cpu_seconds(proc.pid) > 0.05, timeout=10, message="the burner to run")


def burst(server, count: int = CONNECTIONS) -> list[socket.socket]:
    """Open ``count`` connections as fast as possible (non-blocking connects), then wait
    until all are established."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect((server.host, server.port))
        except BlockingIOError:
            pass
        socks.append(sock)
    for sock in socks:
        sock.settimeout(15)
        # (a blocking getpeername check: loopback handshakes complete at connect time)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        assert err == 0, os.strerror(err)
    return socks


@pytest.mark.parametrize("kind", ["sync", "thread", "asgi"])
def test_keepalive_connections_split_evenly(tiamat_server, tmp_path, cpu_burners, kind):
    server = tiamat_server(app_file(tmp_path, kind), "-k", kind, "-w", "2", "--threads", "4")
    workers = wait_both_workers(server)
    baseline = server.worker_sockets()
    compete_with(cpu_burners, workers)
    try:
        # (two tries: on a machine loaded well beyond the test's own burner a worker can
        # get no CPU for the 5 ms deferral bound, and is then rightly passed over; without
        # balancing, the split is this skewed every time)
        for _ in range(2):
            socks = burst(server)
            try:
                pids = collections.Counter(ask_pid(sock) for sock in socks)
            finally:
                for sock in socks:
                    sock.close()
            print(kind, "connections per worker:", dict(pids))
            shares = {pid: pids[pid] / CONNECTIONS for pid in workers}
            if all(0.4 <= share <= 0.6 for share in shares.values()):
                break
            wait_for(lambda: not server.worker_sockets() - baseline, message="connections closed")
    finally:
        stop_burners(cpu_burners)
    assert set(pids) <= set(workers)
    assert all(0.4 <= share <= 0.6 for share in shares.values()), \
        f"connections per worker: {dict(pids)} of {CONNECTIONS}"


@pytest.mark.parametrize("kind", ["sync", "asgi"])
def test_stopped_sibling_does_not_stall_accepting(tiamat_server, tmp_path, kind):
    server = tiamat_server(app_file(tmp_path, kind), "-k", kind, "-w", "2")
    wait_both_workers(server)
    # load one worker with keep-alive connections and leave the other with none: the loaded
    # one is then "over" its sibling and would leave new connections to it
    held = [connect(server) for _ in range(12)]
    owners = [ask_pid(sock) for sock in held]
    loaded = collections.Counter(owners).most_common(1)[0][0]
    idle = next(pid for pid in server.worker_pids() if pid != loaded)
    for sock, pid in zip(held, owners, strict=True):
        if pid == idle:
            sock.close()
    os.kill(idle, signal.SIGSTOP)
    try:
        # one at a time: each must be answered promptly by the loaded worker
        start = time.monotonic()
        for _ in range(10):
            with connect(server, timeout=5) as sock:
                assert ask_pid(sock) == loaded
        assert time.monotonic() - start < 5
        # and a burst of new clients too
        socks = burst(server, 32)
        try:
            assert all(ask_pid(sock) == loaded for sock in socks)
        finally:
            for sock in socks:
                sock.close()
        assert time.monotonic() - start < 10
    finally:
        os.kill(idle, signal.SIGCONT)
        for sock in held:
            sock.close()


@pytest.mark.parametrize("kind", ["sync", "asgi"])
def test_single_worker_accepts_a_burst(tiamat_server, tmp_path, kind):
    server = tiamat_server(app_file(tmp_path, kind), "-k", kind, "-w", "1")
    start = time.monotonic()
    socks = burst(server)
    try:
        pids = {ask_pid(sock) for sock in socks}
    finally:
        for sock in socks:
            sock.close()
    assert len(pids) == 1
    assert time.monotonic() - start < 10


def test_siblings_count_only_live_accepting_workers():
    """The scoreboard side of the rule: who counts as a sibling to leave connections to."""
    from tiamat.scoreboard import IDLE, Scoreboard

    board = Scoreboard(8)
    now = 100.0
    for slot, pid in ((0, 10), (1, 11), (2, 12), (3, 13), (5, 15)):
        board.reset(slot, pid, now)
    me = board.writer(0)
    me.ready(now)
    me.held(7, True)
    siblings = me.siblings()
    assert board.read(0).connections == 7 and board.read(0).accepting
    assert siblings.least(now, 2.0) is None  # all booting: nobody to leave connections to
    board.writer(1).ready(now)
    board.writer(1).held(5, True)
    board.writer(2).ready(now)
    board.writer(2).held(1, False)  # at its limit or paused: not counted
    board.writer(3).ready(now - 5)  # stopped beating: not counted
    board.writer(3).held(0, True)
    board.writer(5).ready(now)  # a refork mold or a class that does not balance: never wrote
    assert siblings.least(now, 2.0) == 5
    board.writer(1).stopping(now)  # stopping clears the count: not counted any more
    assert board.read(1).connections == 0 and not board.read(1).accepting
    assert siblings.least(now, 2.0) is None
    board.reset(4, 14, now)  # a record taken after the last refresh is seen after the next
    board.writer(4).ready(now)
    board.writer(4).held(2, True)
    assert siblings.least(now, 2.0) is None
    siblings.refresh()
    assert board.read(4).state == IDLE and siblings.least(now, 2.0) == 2


class _LoadedSiblings:
    """A sibling that always holds no connection and never makes progress."""

    def least(self, now: float, fresh: float) -> int:
        return 0

    def progress(self) -> float:
        return 1.0


def test_closes_while_deferring_do_not_put_the_bound_off():
    """DEFER_MAX counts from a deferral's start: a worker whose own connections keep closing
    (each close makes it look again, and defer again) must still take a waiting client once
    DEFER_MAX has passed, not only when no close came for DEFER_MAX."""
    from tiamat.workers.balance import DEFER_MAX, AcceptBalance

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        balance = AcceptBalance(_LoadedSiblings(), [listener])  # type: ignore[arg-type]
        now = 100.0
        assert balance.over(5, now)
        balance.begin(now)
        balance.pause()  # a close, nobody waiting: the next deferral starts afresh
        assert balance.defer_since == 0.0
        balance.begin(now)
        with socket.create_connection(listener.getsockname()):  # a client now waits
            step = DEFER_MAX * 0.6
            for i in range(1, 3):  # closes every 0.6 x DEFER_MAX, the client still waiting
                balance.pause()
                assert balance.over(5, now + i * step)
                balance.begin(now + i * step)
            assert balance.review(5, now + 2 * step)  # 1.2 x DEFER_MAX since the start
            assert not balance.over(5, now + 2 * step)  # ... so the waiting client is taken


def burn_on(socks: list[socket.socket], seconds: float,
            paths: tuple[str, ...] = ("/burn",)) -> socket.socket | None:
    """Keep the worker behind ``socks`` busy (5 ms requests on each in turn) for up to
    ``seconds``; the connection whose answer said ``Connection: close``, if one did."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for sock in socks:
            if ask(sock, *paths)[-1][1]:
                return sock
    return None


def split_owners(server, count: int = 8) -> tuple[list[socket.socket], int, int, list[int]]:
    """``count`` keep-alive connections, split over the 2 workers: (connections, the pid
    holding more, the other pid, each connection's pid)."""
    workers = wait_both_workers(server)
    baseline = server.worker_sockets()
    for _ in range(3):
        socks = [connect(server) for _ in range(count)]
        owners = [ask(sock)[0][0] for sock in socks]
        counts = collections.Counter(owners)
        if set(counts) == set(workers) and min(counts.values()) >= 3:  # (SLACK: 5 / 3)
            break
        # (a worker that got no CPU for DEFER_MAX, 5 ms, is rightly passed over: on a
        # loaded machine the split can come out skewed; close them and split again)
        for sock in socks:
            sock.close()
        wait_for(lambda: not server.worker_sockets() - baseline, message="connections closed")
    else:
        raise AssertionError(f"8 connections split {counts} three times")
    busy = counts.most_common(1)[0][0]
    return socks, busy, next(pid for pid in workers if pid != busy), owners


@pytest.mark.parametrize("kind", ["sync", "thread", "asgi"])
def test_a_clearly_busier_worker_hands_keepalive_connections_on(tiamat_server, tmp_path, kind):
    """Eight keep-alive connections split 4 / 4 (or 5 / 3); only one worker's carry requests,
    each burning 5 ms of CPU.  Within a few of its loop ticks that worker closes one of them
    after a response saying ``Connection: close`` (a third of the four whose move would swap
    the loads: one), and the client's new connection is accepted by the idle one."""
    server = tiamat_server(app_file(tmp_path, kind), "-k", kind, "-w", "2", "--threads", "4")
    socks, busy, idle, owners = split_owners(server)
    try:
        closed = burn_on([s for s, pid in zip(socks, owners, strict=True) if pid == busy], 15)
        assert closed is not None, "the busy worker never handed a connection on"
        with connect(server) as again:  # (the busy worker leaves new ones to it for a while)
            assert ask(again)[0][0] == idle
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("kind", ["sync", "thread", "asgi"])
def test_a_pipelined_request_is_not_lost_to_a_hand_on(tiamat_server, tmp_path, kind):
    """The same load, each time as two pipelined requests: a connection handed on answers
    the first without closing (a request is already waiting behind it), says
    ``Connection: close`` on the last, and ends with a clean EOF, not a reset."""
    server = tiamat_server(app_file(tmp_path, kind), "-k", kind, "-w", "2", "--threads", "4")
    socks, busy, _idle, owners = split_owners(server)
    try:
        hot = [s for s, pid in zip(socks, owners, strict=True) if pid == busy]
        deadline = time.monotonic() + 15
        closing = None
        while closing is None and time.monotonic() < deadline:
            for sock in hot:
                answers = ask(sock, "/burn", "/")  # (ask checks the EOF after a close)
                assert len(answers) == 2 and not answers[0][1], answers
                if answers[1][1]:
                    closing = sock
                    break
        assert closing is not None, "the busy worker never handed a connection on"
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.parametrize("kind", ["sync", "asgi"])
def test_a_hand_on_does_not_keep_clients_from_a_stopped_sibling(tiamat_server, tmp_path, kind):
    """After a hand-on the busy worker leaves new connections to its siblings for a second,
    but bounded as any deferral: with the sibling stopped (SIGSTOP) right after, a new
    client is answered by the busy worker within a few ms, not after the second."""
    server = tiamat_server(app_file(tmp_path, kind), "-k", kind, "-w", "2")
    socks, busy, idle, owners = split_owners(server)
    try:
        assert burn_on([s for s, pid in zip(socks, owners, strict=True) if pid == busy], 15)
        os.kill(idle, signal.SIGSTOP)
        try:
            start = time.monotonic()
            with connect(server) as again:
                assert ask(again)[0][0] == busy
            assert time.monotonic() - start < 0.8  # (held for the whole second: ~1.0-1.5)
        finally:
            os.kill(idle, signal.SIGCONT)
    finally:
        for sock in socks:
            sock.close()


def test_no_rebalance_keepalive_keeps_every_connection(tiamat_server, tmp_path):
    server = tiamat_server(app_file(tmp_path, "sync"), "-w", "2", "--no-rebalance-keepalive")
    socks, busy, _idle, owners = split_owners(server)
    try:
        # (three times as long as the case above takes to hand one on, here)
        assert burn_on([s for s, pid in zip(socks, owners, strict=True) if pid == busy], 4) is None
    finally:
        for sock in socks:
            sock.close()


class _SiblingLoads:
    """Siblings that publish these CPU loads."""

    def __init__(self, *loads: float) -> None:
        self.values = list(loads)

    def loads(self, now: float, fresh: float) -> list[float]:
        return self.values

    def least(self, now: float, fresh: float) -> int:
        return 5

    def progress(self) -> float:
        return 1.0


def test_rebalance_rule(monkeypatch):
    """The numbers: a load is measured between two ticks; a worker hands on only when over
    1.2 times its siblings' mean on two ticks in a row and busy: a third of the share of its
    active connections whose move would swap the loads; then, once it marked some (hold),
    not again for HAND_ON_HOLD, during which it leaves new connections to the siblings."""
    from tiamat.workers import balance as rule

    cpu = [0.0]
    monkeypatch.setattr(rule.time, "process_time", lambda: cpu[0])
    published: list[float] = []
    siblings = _SiblingLoads(0.3)
    balance = rule.AcceptBalance(siblings, [], published.append)  # type: ignore[arg-type]

    def tick(now: float, load: float) -> float:
        cpu[0] += load * 0.5
        return balance.rebalance(now)

    assert tick(100.0, 0.9) == 0.0 and published == []  # the first tick measures nothing yet
    assert tick(100.5, 0.9) == 0.0 and published == [pytest.approx(0.9)]  # over once
    share = tick(101.0, 0.9)  # over twice: hand on
    assert share == pytest.approx((0.9 - 0.3) / (3 * 0.9)) and int(32 * share) == 7
    assert int(2 * share) == 0  # (two active connections: neither moves)
    assert not balance.over(5, 101.0)  # (not ahead of the sibling's 5 and not holding)
    balance.hold(101.0)
    assert balance.over(5, 101.5)  # holding: new connections go to the sibling ...
    assert tick(101.5, 0.9) == 0.0  # ... and the loads wait (HAND_ON_HOLD, 1 s)
    assert not balance.over(5, 102.0)
    assert tick(102.0, 0.9) == 0.0 and tick(102.5, 0.9) > 0  # again, two ticks over
    assert tick(103.0, 0.9) > 0  # (no hold without marks: the worker had none to mark)
    assert tick(103.5, 0.35) == 0.0 and tick(104.0, 0.35) == 0.0  # within 1.2 x: kept
    siblings.values = [0.0, 0.2]  # the mean of the siblings counts
    assert tick(104.5, 0.5) == 0.0 and tick(105.0, 0.5) == pytest.approx(0.4 / 1.5)
    siblings.values = [0.0]
    assert tick(106.0, 0.15) == 0.0 and tick(106.5, 0.15) == 0.0  # not busy enough to bother
    siblings.values = []  # no sibling to take them (all paused, full or stopping): none
    assert tick(108.0, 0.9) == 0.0 and tick(108.5, 0.9) == 0.0
    lone = rule.AcceptBalance(siblings, [])  # type: ignore[arg-type]
    assert lone.rebalance(100.0) == 0.0 and lone.rebalance(100.5) == 0.0  # off: never


class _OneSibling:
    """A sibling holding ``held`` connections that makes no progress."""

    def __init__(self, held: int) -> None:
        self.held = held

    def least(self, now: float, fresh: float) -> int:
        return self.held

    def progress(self) -> float:
        return 1.0


def test_a_hold_is_bounded_like_any_deferral():
    """While holding, the worker defers every accept, but a client its sibling leaves waiting
    in the backlog for DEFER_MAX is taken anyway; without one the deferral simply ends."""
    from tiamat.workers.balance import DEFER_MAX, AcceptBalance

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        balance = AcceptBalance(_OneSibling(9), [listener])  # type: ignore[arg-type]
        now = 100.0
        balance.hold(now)
        assert balance.over(5, now)  # fewer than the sibling's 9, but holding
        balance.begin(now)
        assert not balance.review(5, now + DEFER_MAX / 2)
        later = now + DEFER_MAX * 1.1
        assert balance.review(5, later)  # nobody waiting: watch again (and defer again)
        assert balance.over(5, later)
        balance.begin(later)
        with socket.create_connection(listener.getsockname()):  # a client the sibling leaves
            assert balance.review(5, later + DEFER_MAX * 1.1)
            assert not balance.over(5, later + DEFER_MAX * 1.1)  # ... is taken
