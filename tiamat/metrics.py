"""Server metrics, aggregated by the master from every worker without files or round trips.

The master maps one anonymous shared ``mmap`` before forking (:class:`Table`).  Each worker
process has a *row* of its own — the row with its scoreboard record's number, which the
master gives every live process, workers forked by a refork mold included, so no two live
processes ever share one: a handful of 64-bit counters that the worker bumps after each
response through a ``memoryview`` — no syscall, no lock, no string.  When a worker exits
the master folds its row into a running total and zeroes it, so counters stay monotonic
across restarts.

What the master adds on top: busy / idle / booting workers from the scoreboard, worker
restarts by reason (counted in :meth:`MasterMetrics.worker_exited`), and the accept backlog
of each TCP listener, read from ``/proc/net/tcp`` and ``/proc/net/tcp6`` (for a listening
socket the kernel reports the current accept-queue length as ``rx_queue``; the limit is
``--backlog`` capped by ``net.core.somaxconn``.  Unix sockets have no such figure there, so
they are left out).

Exposed as Prometheus text (:func:`render_prometheus`) at ``--metrics-bind HOST:PORT``
``/metrics``, and pushed to StatsD over UDP every ``--statsd-interval`` seconds when
``--statsd-host`` is set (counter deltas, gauges, and the mean request duration of the
interval as a timer).
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
import socket
import threading
import time
from typing import Any, NamedTuple

from tiamat.scoreboard import BOOTING, BUSY, IDLE, STOPPING
from tiamat.workers.balance import balances

log = logging.getLogger("tiamat.error")

#: histogram bucket upper bounds, in seconds (Prometheus ``le``); +Inf is implicit
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# row layout: 64-bit signed words
IN_FLIGHT = 0
STATUS = 1  # STATUS + 0 .. STATUS + 5: "other", 1xx .. 5xx
COUNT = 7
SUM_US = 8
BUCKET = 9  # BUCKET + i for BUCKETS[i], BUCKET + len(BUCKETS) for +Inf
ROW_WORDS = 32
ROW_BYTES = ROW_WORDS * 8
STATUS_CLASSES = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")
#: reasons always exported (as 0 until they happen), so dashboards see the series
RESTART_REASONS = ("timeout", "crash", "max-requests", "reload")
assert BUCKET + len(BUCKETS) + 1 <= ROW_WORDS


class Table:
    """``rows`` rows of counters in one shared anonymous mapping, inherited by every fork."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.mem = mmap.mmap(-1, rows * ROW_BYTES)
        self.words = memoryview(self.mem).cast("q")

    def row(self, index: int) -> memoryview:
        return self.words[index * ROW_WORDS:(index + 1) * ROW_WORDS]

    def read(self, index: int) -> list[int]:
        return self.row(index).tolist()

    def zero(self, index: int) -> None:
        row = self.row(index)
        for i in range(ROW_WORDS):
            row[i] = 0


class Recorder:
    """A worker's own row.  ``start()`` when a request is complete, ``done()`` after the
    response; both are a few item assignments on shared memory."""

    __slots__ = ("_row",)

    def __init__(self, row: memoryview) -> None:
        self._row = row

    def start(self) -> None:
        self._row[IN_FLIGHT] += 1

    def done(self, status: int, duration: float) -> None:
        row = self._row
        row[IN_FLIGHT] -= 1
        klass = status // 100
        row[STATUS + (klass if 1 <= klass <= 5 else 0)] += 1
        row[COUNT] += 1
        row[SUM_US] += int(duration * 1_000_000)
        row[BUCKET + bisect.bisect_left(BUCKETS, duration)] += 1

    def refused(self, status: int) -> None:
        """A response the worker wrote itself (400, 408, 413, 503 ...): the app never ran,
        so it counts by status class only, not in the duration histogram."""
        klass = status // 100
        self._row[STATUS + (klass if 1 <= klass <= 5 else 0)] += 1


class LockedRecorder(Recorder):
    """For workers that run requests on several threads: the read-modify-writes of one
    process must not interleave (rows are never shared between processes)."""

    __slots__ = ("_lock",)

    def __init__(self, row: memoryview) -> None:
        super().__init__(row)
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            Recorder.start(self)

    def done(self, status: int, duration: float) -> None:
        with self._lock:
            Recorder.done(self, status, duration)

    def refused(self, status: int) -> None:
        with self._lock:
            Recorder.refused(self, status)


class Snapshot(NamedTuple):
    """Every figure at one moment, summed over all workers (alive and gone)."""

    status: list[int]
    count: int
    sum_seconds: float
    buckets: list[int]  # per bucket (not cumulative), +Inf last
    in_flight: int
    workers: dict[str, int]
    target: int
    restarts: dict[str, int]
    backlog: dict[str, tuple[int, int]]  # listener -> (queued, limit)
    #: worker slot -> (connections held, CPU load or None), summed over the slot's processes
    #: (two during a replacement); empty with one worker, which keeps neither figure
    balance: dict[int, tuple[int, float | None]]


class MasterMetrics:
    """The master's side: totals of exited workers, restarts by reason, snapshots.

    (A plain class, not a dataclass: see tiamat.settings.Setting.)"""

    def __init__(self, recording: bool, table: Table | None = None) -> None:
        self.recording = recording
        self.table = table
        self.retired: list[int] = [0] * ROW_WORDS
        self.restarts: dict[str, int] = dict.fromkeys(RESTART_REASONS, 0)
        self.restarts_by_slot: dict[int, int] = {}
        self.started = time.time()

    def _fold(self, row: int) -> None:
        """Add a row to the totals of exited workers and zero it for its next process."""
        if self.table is None or not 0 <= row < self.table.rows:
            return
        values = self.table.read(row)
        if any(values):
            values[IN_FLIGHT] = 0  # whatever it was doing is over
            self.retired = [a + b for a, b in zip(self.retired, values, strict=True)]
            self.table.zero(row)

    def before_fork(self, worker: Any) -> None:
        """The row of the process about to be forked starts from zero (it always does: rows
        are zeroed when folded; this only guards against a row left by an unreaped child)."""
        self._fold(_row_of(worker))

    def worker_exited(self, state: Any, worker: Any, code: int) -> None:
        """Fold the row of an exited worker into the totals; count the restart's reason."""
        self._fold(_row_of(worker))
        reason = restart_reason(state, worker, code)
        if reason is not None:
            self.restarts[reason] = self.restarts.get(reason, 0) + 1
            self.restarts_by_slot[worker.slot] = self.restarts_by_slot.get(worker.slot, 0) + 1

    def snapshot(self, state: Any) -> Snapshot:
        totals = list(self.retired)
        if self.table is not None:
            for worker in state.workers.values():
                row = _row_of(worker)
                if 0 <= row < self.table.rows:
                    for i, value in enumerate(self.table.read(row)):
                        totals[i] += value
        states = {"booting": 0, "idle": 0, "busy": 0, "stopping": 0}
        for worker in state.workers.values():
            if worker.slot < 0:  # a refork mold: it forks workers and serves nobody
                states["mold"] = states.get("mold", 0) + 1
                continue
            record = state.board.read(worker.board_index)
            if record.state == BUSY:
                states["busy"] += 1
            elif record.state == IDLE and worker.stop_deadline is None:
                states["idle"] += 1
            elif record.state == STOPPING or worker.stop_deadline is not None:
                states["stopping"] += 1
            elif record.state == BOOTING:
                states["booting"] += 1
        return Snapshot(
            status=totals[STATUS:STATUS + 6], count=totals[COUNT],
            sum_seconds=totals[SUM_US] / 1_000_000,
            buckets=totals[BUCKET:BUCKET + len(BUCKETS) + 1], in_flight=max(0, totals[IN_FLIGHT]),
            workers=states, target=state.target, restarts=dict(self.restarts),
            backlog=listen_backlog(state.listeners, state.cfg.backlog),
            balance=balance_by_slot(state))


def balance_by_slot(state: Any) -> dict[int, tuple[int, float | None]]:
    """What the workers balance by, per slot: the connections they hold and the CPU they
    used over their last loop tick (see tiamat.workers.balance).  Only workers that balance
    keep these figures (``-w`` > 1, the load with --rebalance-keepalive), so one worker gets
    no series rather than a misleading zero."""
    if not balances(state.cfg):
        return {}
    slots: dict[int, tuple[int, float | None]] = {}
    for worker in state.workers.values():
        if worker.slot < 0:
            continue
        record = state.board.read(worker.board_index)
        if record.pid != worker.pid:  # (forked, not yet writing its record)
            continue
        held, load = slots.get(worker.slot, (0, None))
        if record.load >= 0:
            load = record.load + (load or 0.0)
        slots[worker.slot] = (held + record.connections, load)
    return slots


def _row_of(worker: Any) -> int:
    """A worker's row: its scoreboard record number (its slot on masters without one)."""
    return int(worker.board_index)


#: the master's words for why it ended a worker -> the names metrics use
_REASON_NAMES = {"recycle": "max-requests"}


def restart_reason(state: Any, worker: Any, code: int) -> str | None:
    """Why a worker that just exited will be replaced, or None when it is not a restart
    (the server is stopping, or the worker count was lowered)."""
    if state.stopping:
        return None
    reason = worker.reason
    if reason == "scale-down":
        return None
    if reason:
        return _REASON_NAMES.get(reason, str(reason))
    if worker.boot_error is not None or not worker.booted:
        return "boot-error"
    return "max-requests" if code == 0 else "crash"


# --- module-level access for the two sides of the fork --------------------------------------
_master: MasterMetrics | None = None


def setup(cfg: Any, capacity: int) -> MasterMetrics:
    """In the master, before the first fork.  Rows are only mapped when something will read
    them (``--metrics-bind`` or ``--statsd-host``); restarts are counted regardless, for
    ``tiamat status``."""
    global _master
    recording = bool(cfg.metrics_bind or cfg.statsd_host)
    _master = MasterMetrics(recording=recording)
    if recording:
        _master.table = Table(capacity)
    return _master


def recorder(threaded: bool = False) -> Recorder | None:
    """In a worker: its counters row, or None when metrics are off (then record nothing).
    ``threaded`` when requests run on several threads of the process.  The row is the one
    of the worker's scoreboard record (``tiamat.workers.base.current``)."""
    if _master is None or _master.table is None:
        return None
    from tiamat.scoreboard import RECORD_SIZE
    from tiamat.workers import base

    worker = base.current
    offset = getattr(getattr(worker, "board", None), "_base", None)
    if offset is None:
        return None
    row_index = offset // RECORD_SIZE
    if not 0 <= row_index < _master.table.rows:
        return None
    row = _master.table.row(row_index)
    return LockedRecorder(row) if threaded else Recorder(row)


# --- the accept backlog -----------------------------------------------------------------------
def _somaxconn() -> int | None:
    try:
        with open("/proc/sys/net/core/somaxconn", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def listen_backlog(listeners: list[Any], backlog: int) -> dict[str, tuple[int, int]]:
    """``{"127.0.0.1:8000": (queued, limit)}`` for each TCP listener.

    ``queued`` is the accept queue's current length (``rx_queue`` of the LISTEN row in
    /proc/net/tcp*, matched by socket inode); ``limit`` is ``--backlog`` capped by
    net.core.somaxconn, as the kernel applies it.
    """
    wanted: dict[int, str] = {}
    for sock in listeners:
        try:
            if sock.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            host, port = sock.getsockname()[:2]
            wanted[os.fstat(sock.fileno()).st_ino] = (f"[{host}]:{port}" if ":" in host
                                                      else f"{host}:{port}")
        except OSError:
            continue
    found: dict[str, tuple[int, int]] = {}
    if not wanted:
        return found
    cap = _somaxconn()
    limit = min(backlog, cap) if cap else backlog
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as f:
                next(f, None)
                for line in f:
                    parts = line.split()
                    if len(parts) < 10 or parts[3] != "0A":  # 0A: TCP_LISTEN
                        continue
                    name = wanted.get(int(parts[9]))
                    if name is not None:
                        found[name] = (int(parts[4].partition(":")[2], 16), limit)
        except (OSError, ValueError):
            continue
    return found


# --- Prometheus text ----------------------------------------------------------------------------
def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if value == int(value):
        return str(int(value))
    return repr(value)


def render_prometheus(snap: Snapshot) -> str:
    """The text exposition format (version 0.0.4)."""
    out: list[str] = []

    def family(name: str, kind: str, help: str) -> None:
        out.append(f"# HELP {name} {help}")
        out.append(f"# TYPE {name} {kind}")

    family("tiamat_requests_total", "counter", "Responses completed, by status class.")
    for klass, value in zip(STATUS_CLASSES, snap.status, strict=True):
        if klass != "other" or value:
            out.append(f'tiamat_requests_total{{status="{klass}"}} {value}')
    family("tiamat_request_duration_seconds", "histogram",
           "Time from a complete request to the end of its response.")
    cumulative = 0
    for bound, value in zip((*BUCKETS, None), snap.buckets, strict=True):
        cumulative += value
        le = "+Inf" if bound is None else _number(bound)
        out.append(f'tiamat_request_duration_seconds_bucket{{le="{le}"}} {cumulative}')
    out.append(f"tiamat_request_duration_seconds_sum {_number(round(snap.sum_seconds, 6))}")
    out.append(f"tiamat_request_duration_seconds_count {snap.count}")
    family("tiamat_requests_in_flight", "gauge", "Requests being handled right now.")
    out.append(f"tiamat_requests_in_flight {snap.in_flight}")
    family("tiamat_workers", "gauge", "Worker processes by state.")
    for state_name, value in snap.workers.items():
        out.append(f'tiamat_workers{{state="{state_name}"}} {value}')
    family("tiamat_workers_target", "gauge", "The number of workers the master maintains.")
    out.append(f"tiamat_workers_target {snap.target}")
    family("tiamat_worker_restarts_total", "counter", "Workers replaced, by reason.")
    for reason, value in sorted(snap.restarts.items()):
        out.append(f'tiamat_worker_restarts_total{{reason="{_label(reason)}"}} {value}')
    if snap.backlog:
        family("tiamat_listen_backlog", "gauge",
               "Connections waiting in a listener's accept queue (Linux).")
        for name, (queued, _) in sorted(snap.backlog.items()):
            out.append(f'tiamat_listen_backlog{{listener="{_label(name)}"}} {queued}')
        family("tiamat_listen_backlog_limit", "gauge", "The accept queue's limit (Linux).")
        for name, (_, limit) in sorted(snap.backlog.items()):
            out.append(f'tiamat_listen_backlog_limit{{listener="{_label(name)}"}} {limit}')
    if snap.balance:
        family("tiamat_worker_connections", "gauge",
               "Connections held by each worker slot (kept with more than one worker).")
        for slot, (held, _) in sorted(snap.balance.items()):
            out.append(f'tiamat_worker_connections{{slot="{slot}"}} {held}')
        family("tiamat_worker_cpu_load", "gauge",
               "CPU seconds per second each worker slot used over its last loop tick "
               "(kept with more than one worker and --rebalance-keepalive).")
        for slot, (_, load) in sorted(snap.balance.items()):
            if load is not None:
                out.append(f'tiamat_worker_cpu_load{{slot="{slot}"}} {_number(round(load, 3))}')
    return "\n".join(out) + "\n"


def http_response(request: bytes, body: str) -> bytes:
    """The whole HTTP/1.0 answer of the metrics endpoint for one request head."""
    line = request.split(b"\r\n", 1)[0].split()
    path = line[1].split(b"?", 1)[0] if len(line) > 1 else b""
    if len(line) < 2 or line[0] not in (b"GET", b"HEAD"):
        return _http(405, "Method Not Allowed", b"method not allowed\n", b"text/plain")
    if path not in (b"/metrics", b"/"):
        return _http(404, "Not Found", b"not found; try /metrics\n", b"text/plain")
    data = body.encode()
    return _http(200, "OK", b"" if line[0] == b"HEAD" else data,
                 b"text/plain; version=0.0.4; charset=utf-8", len(data))


def _http(code: int, reason: str, body: bytes, ctype: bytes, length: int | None = None) -> bytes:
    head = (f"HTTP/1.0 {code} {reason}\r\nContent-Length: {len(body) if length is None else length}"
            "\r\nConnection: close\r\nContent-Type: ").encode() + ctype + b"\r\n\r\n"
    return head + body


# --- StatsD -------------------------------------------------------------------------------------
class StatsD:
    """Pushes what changed since the last push, over UDP (never blocks the master)."""

    def __init__(self, target: str, prefix: str) -> None:
        host, sep, port = target.rpartition(":")
        if not sep or "]" in port:  # no port given (``statsd``, ``[::1]``): the usual one
            host, port = target, "8125"
        if not port.isdigit():
            raise ValueError(f"--statsd-host {target!r}: expected HOST:PORT")
        # resolved once, here: a DNS lookup per push would block the master's loop
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                host.strip("[]"), int(port), type=socket.SOCK_DGRAM)[0]
        except OSError as exc:
            raise ValueError(f"--statsd-host {target}: {exc.strerror or exc}") from None
        self.address = address
        self.prefix = prefix.rstrip(".") + "." if prefix else ""
        self.sock = socket.socket(family, kind, proto)
        self.sock.setblocking(False)
        self.last: Snapshot | None = None

    def lines(self, snap: Snapshot) -> list[str]:
        p = self.prefix
        last = self.last
        out = []
        for i, klass in enumerate(STATUS_CLASSES):
            delta = snap.status[i] - (last.status[i] if last else 0)
            if delta:
                out.append(f"{p}requests.{klass}:{delta}|c")
        for reason, value in snap.restarts.items():
            delta = value - (last.restarts.get(reason, 0) if last else 0)
            if delta:
                out.append(f"{p}workers.restarts.{reason}:{delta}|c")
        count = snap.count - (last.count if last else 0)
        if count:
            total = snap.sum_seconds - (last.sum_seconds if last else 0.0)
            out.append(f"{p}request.duration:{total / count * 1000:.3f}|ms")
        out.append(f"{p}requests.in_flight:{snap.in_flight}|g")
        for state_name, value in snap.workers.items():
            out.append(f"{p}workers.{state_name}:{value}|g")
        for name, (queued, _) in snap.backlog.items():
            out.append(f"{p}backlog.{name.replace('.', '_').replace(':', '_')}:{queued}|g")
        for slot, (held, load) in snap.balance.items():
            out.append(f"{p}worker.{slot}.connections:{held}|g")
            if load is not None:
                out.append(f"{p}worker.{slot}.cpu_load:{load:.3f}|g")
        return out

    def push(self, snap: Snapshot) -> None:
        packet = b""
        for line in self.lines(snap):
            data = line.encode() + b"\n"
            if len(packet) + len(data) > 1400:
                self._send(packet)
                packet = b""
            packet += data
        if packet:
            self._send(packet)
        self.last = snap

    def _send(self, packet: bytes) -> None:
        try:
            self.sock.sendto(packet.rstrip(b"\n"), self.address)
        except OSError as exc:
            log.debug("statsd send failed: %s", exc)

    def close(self) -> None:
        self.sock.close()
