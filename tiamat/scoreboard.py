"""Shared-memory liveness table: one fixed-size record per worker slot.

The master creates it (an anonymous shared ``mmap``) before forking, so every worker writes
its own record and the master reads all of them without a syscall or a round trip: this is
how timeouts are detected without a temp file per worker (gunicorn's approach) and how the
status view and metrics see what each worker is doing.

Times are ``time.monotonic()`` values; CLOCK_MONOTONIC is system-wide on Linux, so a value
written by a worker compares directly with the master's clock.

The master reads while workers write, without a lock, and ``struct.pack_into`` zero-fills
its target before filling it in: a reader can catch a record with a state of 0 or times of
0.0 for an instant (longer if the worker is descheduled mid-write).  Workers keep the cheap
writes (this is on every request); :meth:`Scoreboard.read_stable` re-reads until two reads
agree and :meth:`SlotState.torn` flags what is left, so the master never acts on a torn
record: it looks again on its next pass.

Each record also carries the number of connections its worker holds and whether it is
accepting (written on accept and close only, never per request): with sibling workers, a
worker reads the others' counts to leave new connections to the least-loaded one, and the
CPU each used over its last loop tick (written once a tick), to hand keep-alive connections
on when it is clearly busier than they are (see :mod:`tiamat.workers.balance`).
"""

from __future__ import annotations

import mmap
import struct
from typing import NamedTuple

EMPTY, BOOTING, IDLE, BUSY, STOPPING = range(5)
STATE_NAMES = ("empty", "booting", "idle", "busy", "stopping")

# pid, state, (pad), beat, request start, boot time, requests served, request label,
# connections held (+ HELD_ACCEPTING while the worker watches its listeners), CPU load
_RECORD = struct.Struct("=iB3xdddQ64sQd")
RECORD_SIZE = 128
_STATE_AT = 4  # offset of the state byte
_BEAT_AT = 8
_START_AT = 16
_REQUESTS_AT = 32
_IDLE = struct.Struct("=B3xd")
_LABEL_AT = 40
_LABEL_SIZE = 64
#: ("s" cuts a longer label and pads a shorter one with NULs, in C)
_LABEL = struct.Struct(f"{_LABEL_SIZE}s")
_HELD_AT = _LABEL_AT + _LABEL_SIZE  # (104: 8-aligned, in the room left after the label)
_LOAD_AT = _HELD_AT + 8
#: the load of a worker that has not measured one yet (loads() leaves it out)
NO_LOAD = -1.0
#: the bit of the held word that says "accepting": a record left at zero (a booting worker,
#: a stopping one, a refork mold, a worker class that does not balance) never counts
HELD_ACCEPTING = 1 << 32
_HELD_COUNT = HELD_ACCEPTING - 1


class SlotState(NamedTuple):
    pid: int
    state: int
    beat: float
    request_start: float
    boot_time: float
    requests: int
    label: str
    #: connections the worker holds (kept only by workers that balance: -w > 1)
    connections: int = 0
    #: whether it watches its listeners (not at --worker-connections, paused or stopping)
    accepting: bool = False
    #: CPU seconds per second it used over its last loop tick (kept by workers that balance;
    #: NO_LOAD before the first)
    load: float = NO_LOAD

    @property
    def torn(self) -> bool:
        """Caught mid-write (zero-filled fields no finished write leaves behind)."""
        return self.beat == 0.0 or (self.state == BUSY and self.request_start == 0.0)

    @property
    def state_name(self) -> str:
        return STATE_NAMES[self.state] if 0 <= self.state < len(STATE_NAMES) else "?"


class Scoreboard:
    """``capacity`` records in one shared anonymous mapping (inherited by every fork)."""

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self.mem = mmap.mmap(-1, capacity * RECORD_SIZE)

    def reset(self, slot: int, pid: int, now: float) -> None:
        _RECORD.pack_into(self.mem, slot * RECORD_SIZE, pid, BOOTING, now, 0.0, now, 0, b"", 0,
                          NO_LOAD)

    def clear(self, slot: int) -> None:
        _RECORD.pack_into(self.mem, slot * RECORD_SIZE, 0, EMPTY, 0.0, 0.0, 0.0, 0, b"", 0, NO_LOAD)

    def read(self, slot: int) -> SlotState:
        pid, state, beat, start, boot, requests, label, held, load = _RECORD.unpack_from(
            self.mem, slot * RECORD_SIZE)
        return SlotState(pid, state, beat, start, boot, requests,
                         label.rstrip(b"\0").decode("latin-1"), held & _HELD_COUNT,
                         bool(held & HELD_ACCEPTING), load)

    def read_stable(self, slot: int, tries: int = 3) -> SlotState:
        """Read until two consecutive reads agree (a worker may be writing right now)."""
        record = self.read(slot)
        for _ in range(tries):
            again = self.read(slot)
            if again == record:
                return record
            record = again
        return record

    def writer(self, slot: int) -> SlotWriter:
        return SlotWriter(self.mem, slot * RECORD_SIZE)


def _views(mem: mmap.mmap) -> tuple[memoryview, memoryview, memoryview]:
    """The table as bytes, as doubles and as 8-byte words: a field is read or stored with one
    index into the view of its type (offsets divided by the item size)."""
    view = memoryview(mem)
    return view, view.cast("d"), view.cast("Q")


class SlotWriter:
    """The calls a worker makes on its own record.

    ``busy`` and ``idle`` run twice per request, so they store single fields through typed
    views of the mapping (a store each, about 5k instructions less per request than a
    ``pack_into`` per call) and write the state byte last, after the times it vouches for:
    the master never sees BUSY next to the previous request's start time.
    """

    __slots__ = ("_base", "_bytes", "_doubles", "_mem", "_method", "_path", "_words", "requests")

    def __init__(self, mem: mmap.mmap, base: int) -> None:
        self._mem = mem
        self._base = base
        self._bytes, self._doubles, self._words = _views(mem)
        self._method = self._path = b""  # (the request label last written)
        self.requests = 0

    def beat(self, now: float) -> None:
        self._doubles[(self._base + _BEAT_AT) >> 3] = now

    def ready(self, now: float) -> None:
        _IDLE.pack_into(self._mem, self._base + _STATE_AT, IDLE, now)

    def busy(self, now: float, method: bytes, path: bytes) -> None:
        base = self._base
        # (no beat: while BUSY the master judges the request's start, and idle() beats)
        self._doubles[(base + _START_AT) >> 3] = now
        # (a worker serving one URL again and again writes it once; compared by part, not
        # joined first: no new bytes object per request)
        if path != self._path or method != self._method:
            self._method, self._path = method, path
            _LABEL.pack_into(self._mem, base + _LABEL_AT, method + b" " + path)  # (cut or padded)
        self._bytes[base + _STATE_AT] = BUSY

    def idle(self, now: float, served: int = 1) -> None:
        self.requests += served
        base = self._base
        self._words[(base + _REQUESTS_AT) >> 3] = self.requests
        self._doubles[(base + _BEAT_AT) >> 3] = now
        self._bytes[base + _STATE_AT] = IDLE

    def stopping(self, now: float) -> None:
        self._words[(self._base + _HELD_AT) >> 3] = 0  # (siblings stop counting on it)
        # (a stopping sync or thread worker measures no load again: not its last one for good)
        self._doubles[(self._base + _LOAD_AT) >> 3] = NO_LOAD
        _IDLE.pack_into(self._mem, self._base + _STATE_AT, STOPPING, now)

    def held(self, connections: int, accepting: bool) -> None:
        """Publish how many connections this worker holds and whether it accepts more: one
        store, made on accept and close (and when accepting is switched), never per request."""
        self._words[(self._base + _HELD_AT) >> 3] = (
            connections | HELD_ACCEPTING if accepting else connections)

    def load(self, cpu_per_second: float) -> None:
        """Publish the CPU this worker used over its last loop tick (once a tick)."""
        self._doubles[(self._base + _LOAD_AT) >> 3] = cpu_per_second

    def siblings(self) -> Siblings:
        """A reader of the other workers' records (for balancing accepts)."""
        return Siblings(self._mem, self._base)


class Siblings:
    """What a worker reads of its siblings' records before it accepts (the fewest
    connections any live, accepting sibling holds) and once a tick (their CPU loads).

    The table has room for far more records than workers (replacement workers take free
    records from the top), so :meth:`refresh` finds the used ones once per loop tick (one
    strided read of the state bytes), and :meth:`least` reads only those: three loads per
    sibling.  A worker that boots between two refreshes is not counted until the next one,
    which only means no connection is left to it meanwhile.
    """

    __slots__ = ("_bytes", "_doubles", "_mem", "_own", "_words", "bases")

    def __init__(self, mem: mmap.mmap, own_base: int) -> None:
        self._mem = mem
        self._own = own_base
        self._bytes, self._doubles, self._words = _views(mem)
        #: the byte offsets of the other records in use
        self.bases: list[int] = []
        self.refresh()

    def refresh(self) -> None:
        states = self._mem[_STATE_AT::RECORD_SIZE]  # (mmap slicing with a step: one C loop)
        own = self._own
        self.bases = [i * RECORD_SIZE for i, state in enumerate(states)
                      if state and i * RECORD_SIZE != own]

    def least(self, now: float, fresh: float) -> int | None:
        """The fewest connections held by a sibling that is idle or busy, accepting, and beat
        within ``fresh`` seconds (a hung or stopped one stops beating); None if there is none."""
        words = self._words
        held = [words[(base + _HELD_AT) >> 3] & _HELD_COUNT for base in self._counted(now, fresh)]
        return min(held) if held else None

    def loads(self, now: float, fresh: float) -> list[float]:
        """The CPU loads of the siblings :meth:`least` counts, where one was published."""
        doubles = self._doubles
        return [load for base in self._counted(now, fresh)
                if (load := doubles[(base + _LOAD_AT) >> 3]) >= 0.0]

    def _counted(self, now: float, fresh: float) -> list[int]:
        """The records of the siblings that count: idle or busy, accepting, beat lately."""
        states, doubles, words = self._bytes, self._doubles, self._words
        return [base for base in self.bases
                if words[(base + _HELD_AT) >> 3] & HELD_ACCEPTING
                and states[base + _STATE_AT] in _SERVING
                and now - doubles[(base + _BEAT_AT) >> 3] < fresh]

    def progress(self) -> float:
        """A value that changes whenever a sibling beats, finishes a request or accepts or
        closes a connection: unchanged over a while, the siblings are stuck (stopped, hung,
        or deep in long requests), not merely slow to get the CPU."""
        doubles, words = self._doubles, self._words
        return sum(doubles[(base + _BEAT_AT) >> 3] + words[(base + _REQUESTS_AT) >> 3]
                   + words[(base + _HELD_AT) >> 3] for base in self.bases)


_SERVING = (IDLE, BUSY)
