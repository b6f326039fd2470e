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
"""

from __future__ import annotations

import mmap
import struct
from typing import NamedTuple

EMPTY, BOOTING, IDLE, BUSY, STOPPING = range(5)
STATE_NAMES = ("empty", "booting", "idle", "busy", "stopping")

# pid, state, (pad), beat, request start, boot time, requests served, request label
_RECORD = struct.Struct("=iB3xdddQ64s")
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


class SlotState(NamedTuple):
    pid: int
    state: int
    beat: float
    request_start: float
    boot_time: float
    requests: int
    label: str

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
        _RECORD.pack_into(self.mem, slot * RECORD_SIZE, pid, BOOTING, now, 0.0, now, 0, b"")

    def clear(self, slot: int) -> None:
        _RECORD.pack_into(self.mem, slot * RECORD_SIZE, 0, EMPTY, 0.0, 0.0, 0.0, 0, b"")

    def read(self, slot: int) -> SlotState:
        pid, state, beat, start, boot, requests, label = _RECORD.unpack_from(
            self.mem, slot * RECORD_SIZE)
        return SlotState(pid, state, beat, start, boot, requests,
                         label.rstrip(b"\0").decode("latin-1"))

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


class SlotWriter:
    """The calls a worker makes on its own record.

    ``busy`` and ``idle`` run twice per request, so they store single fields through typed
    views of the mapping (a store each, about 5k instructions less per request than a
    ``pack_into`` per call) and write the state byte last, after the times it vouches for:
    the master never sees BUSY next to the previous request's start time.
    """

    __slots__ = ("_base", "_bytes", "_doubles", "_label", "_mem", "_words", "requests")

    def __init__(self, mem: mmap.mmap, base: int) -> None:
        self._mem = mem
        self._base = base
        view = memoryview(mem)
        self._bytes = view
        self._doubles = view.cast("d")
        self._words = view.cast("Q")
        self._label = b""
        self.requests = 0

    def beat(self, now: float) -> None:
        self._doubles[(self._base + _BEAT_AT) >> 3] = now

    def ready(self, now: float) -> None:
        _IDLE.pack_into(self._mem, self._base + _STATE_AT, IDLE, now)

    def busy(self, now: float, method: bytes, path: bytes) -> None:
        base = self._base
        # (no beat: while BUSY the master judges the request's start, and idle() beats)
        self._doubles[(base + _START_AT) >> 3] = now
        label = method + b" " + path
        if label != self._label:  # (a worker serving one URL again and again writes it once)
            self._label = label
            _LABEL.pack_into(self._mem, base + _LABEL_AT, label)  # (cut or padded)
        self._bytes[base + _STATE_AT] = BUSY

    def idle(self, now: float) -> None:
        self.requests += 1
        base = self._base
        self._words[(base + _REQUESTS_AT) >> 3] = self.requests
        self._doubles[(base + _BEAT_AT) >> 3] = now
        self._bytes[base + _STATE_AT] = IDLE

    def stopping(self, now: float) -> None:
        _IDLE.pack_into(self._mem, self._base + _STATE_AT, STOPPING, now)
