"""The accept-balancing rule shared by the sync/thread and asgi workers (``-w`` > 1).

Every worker waits on the one shared listening socket, and every idle one is woken for a
new connection: whichever gets the CPU first would take a whole burst (wrk's 64 keep-alive
connections landed 52/12 in one round, and keep-alive connections stay where they land).
So each worker publishes how many connections it holds in its scoreboard record
(:meth:`tiamat.scoreboard.SlotWriter.held`, on accept and close only), and:

- a worker that holds more than the least-loaded live sibling + :data:`SLACK` does not
  accept: it stops watching the listeners (the sibling, woken for the same connection,
  takes it) and looks again every :data:`DEFER_CHECK` seconds, or at once when one of its
  own connections closes;
- bounded, so a sibling that cannot take connections never stalls accepting: only siblings
  that are idle or busy, accepting (not at ``--worker-connections``, not paused, not
  stopping) and beat within :data:`FRESH` seconds count; a worker with no connection
  always accepts; and a deferral lasts at most :data:`DEFER_MAX`: if connections still wait
  in the backlog then, the worker takes one anyway.  After :data:`STALL_STREAK` such
  timeouts in a row it stops balancing for :data:`BACKOFF` seconds if the siblings showed
  no sign of life meanwhile (no beat, request, accept or close: stopped or hung, say); a
  sibling that is only slow to get the CPU (a busy machine) does show some, and keeps
  getting its share, at the price of a few ms of waiting for the new connections.

The cost: reading a few scoreboard records per accept and a store per accept and close;
nothing per request.

Equal connection counts are not equal work: keep-alive connections stay where they landed,
and their clients may differ, or one worker may get less of the CPU (wrk on 2 CPUs with 2
workers: the worker sharing its CPU with wrk answered more slowly and got fewer requests, so
the other used 54-63 % of the workers' CPU with the connections split 32 / 32).  So, with
``--rebalance-keepalive`` (on by default), each worker publishes the CPU it used over its
last loop tick (:meth:`AcceptBalance.rebalance`), and a busy worker using more than
:data:`REBALANCE_OVER` times its accepting siblings' mean on :data:`OVER_TICKS` ticks in a
row hands a few of its active keep-alive connections on: each is closed after its next
response, which says ``Connection: close`` (closed lingering, so bytes the client sent
meanwhile do not turn the close into a reset), and for :data:`HAND_ON_HOLD` the worker
leaves new connections to its siblings exactly as when it is ahead of them, with the same
bounds (a sibling that does not take one within :data:`DEFER_MAX` leaves it to this worker).
It hands on a third of the active connections that would close the gap if work followed
connections, rounded down: never so many that the roles just swap, never a lone connection,
and at most once per :data:`HAND_ON_HOLD`.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from tiamat.scoreboard import Siblings, SlotWriter
from tiamat.sockets import backlog_waiting

log = logging.getLogger("tiamat.error")

#: a worker may hold this many connections more than its least-loaded sibling
SLACK = 1
#: while deferring, look at the siblings again this often (seconds; epoll's resolution)
DEFER_CHECK = 0.001
#: the longest a worker leaves waiting connections to its siblings in one go
DEFER_MAX = 0.005
#: deferrals that timed out in a row (about 0.1 s) before balancing may be suspended: long
#: enough for a sibling that shares its CPU with a busier process to be scheduled again
#: (with 4, a sibling next to a nice -10 CPU hog lost a burst 48/16 once in 25 runs) ...
STALL_STREAK = 20
#: ... for this long (seconds)
BACKOFF = 0.5
#: a sibling whose last beat is older than this is not counted (hung, stopped, or deep in a
#: long request: the sync loop beats at least every second while it runs)
FRESH = 2.0
#: a worker hands keep-alive connections on when its CPU load is above this many times its
#: siblings' mean (1.2: 54.5 % of what two workers use) ...
REBALANCE_OVER = 1.2
#: ... and it used at least this much CPU (seconds per second): a quiet server keeps them
REBALANCE_BUSY = 0.2
#: ... on this many ticks in a row
OVER_TICKS = 2
#: after handing connections on, the worker leaves new connections to its siblings for this
#: long (seconds; bounded as any deferral is): their clients reconnect to the siblings, and
#: the loads are judged again on new ticks only
HAND_ON_HOLD = 1.0
#: a connection that carried a request within this long (seconds: two loop ticks) is active:
#: only those are handed on and counted (idle ones move no load); marks not used by then
#: are taken back
ACTIVE_WITHIN = 1.0


def balances(cfg: Any) -> bool:
    """Whether the workers balance at all (and keep the figures they balance by, which
    tiamat status and the metrics show): only with siblings."""
    return cfg.workers > 1


class AcceptBalance:
    """One worker's side of the rule: when to defer, and when a deferral ends."""

    __slots__ = ("defer_since", "force", "handed", "hold_until", "listeners", "off_until",
                 "over_ticks", "publish", "siblings", "streak", "tick_at", "tick_cpu", "token")

    def __init__(self, siblings: Siblings, listeners: list[socket.socket],
                 publish: Callable[[float], None] | None = None) -> None:
        self.siblings = siblings
        self.listeners = listeners
        #: where the worker's CPU load goes (its scoreboard record); None: no rebalancing
        self.publish = publish
        self.tick_at = 0.0
        self.tick_cpu = 0.0
        self.over_ticks = 0
        #: the connections marked by the last hand-on (see hand_on)
        self.handed: list[Any] = []
        #: handed connections on: new ones are left to the siblings (as when ahead of them,
        #: with the same bounds) and the loads are not judged again until then
        self.hold_until = 0.0
        #: when the current deferral began (0.0: not deferring)
        self.defer_since = 0.0
        #: a deferral timed out with connections waiting: the next accept is not deferred
        self.force = False
        self.streak = 0
        #: the siblings' progress() when the current streak of timeouts began
        self.token = 0.0
        self.off_until = 0.0

    @classmethod
    def for_worker(cls, cfg: Any, board: SlotWriter, listeners: list[socket.socket]
                   ) -> AcceptBalance | None:
        """A worker's side of the rules, or None with one worker (no sibling to balance with)."""
        if not balances(cfg):
            return None
        return cls(board.siblings(), listeners, board.load if cfg.rebalance_keepalive else None)

    def hand_on(self, now: float, connections: Iterable[Any],
                eligible: Callable[[Any, float], bool], may_unmark: Callable[[Any], bool]) -> None:
        """Once a loop tick, for a worker's connections (objects with a ``hand_on`` flag that
        its response path reads): take back the marks the last hold did not use, judge the
        loads (:meth:`rebalance`) and mark the share of the ``eligible`` ones (active since
        the given time, and free to be marked) to hand on; then hold."""
        if self.handed and now >= self.hold_until:
            # (not used within the hold: not the busy ones after all; one whose request is
            # being answered keeps its mark for the next tick's try: the mark may have been
            # read already, or may still be)
            keep = []
            for conn in self.handed:
                if may_unmark(conn):
                    conn.hand_on = False
                elif conn.hand_on:
                    keep.append(conn)
            self.handed = keep
        share = self.rebalance(now)
        if not share:
            return
        since = now - ACTIVE_WITHIN
        active = [conn for conn in connections if eligible(conn, since)]
        handed = active[:int(len(active) * share)]
        if handed:
            for conn in handed:
                conn.hand_on = True
            self.handed = handed
            self.hold(now)
            log.debug("handing %d of %d active keep-alive connections on to sibling workers",
                      len(handed), len(active))

    def rebalance(self, now: float) -> float:
        """Once a loop tick: publish the CPU the worker used since the last tick; return the
        share of its active keep-alive connections (those that carried a request lately:
        idle ones move no load) to hand on, rounded down by the worker: 0.0 mostly, and
        always without ``publish``.  The worker calls :meth:`hold` once it marked some."""
        if self.publish is None:
            return 0.0
        cpu = time.process_time()
        start, spent = self.tick_at, cpu - self.tick_cpu
        self.tick_at, self.tick_cpu = now, cpu
        if not start or now <= start:  # (the first tick: a load needs two)
            return 0.0
        load = spent / (now - start)
        self.publish(load)
        if load < REBALANCE_BUSY or now < self.hold_until:
            self.over_ticks = 0
            return 0.0
        loads = self.siblings.loads(now, FRESH)
        mean = sum(loads) / len(loads) if loads else load
        if load <= mean * REBALANCE_OVER:
            self.over_ticks = 0
            return 0.0
        # (a sibling's load is its last tick's, up to a tick old: when the load rises, one
        # tick shows a busy worker next to siblings that look idle)
        self.over_ticks += 1
        if self.over_ticks < OVER_TICKS:
            return 0.0
        # moving k of h active connections moves about k/h of the load: k = h (load - mean) /
        # (2 load) would even the two, and any k below twice that narrows the gap; a third of
        # that bound, rounded down, so that a move never just swaps the roles (two busy
        # connections against one stay where they are)
        return (load - mean) / (3 * load)

    def hold(self, now: float) -> None:
        """Connections were marked to be handed on: leave new connections, the clients'
        reconnections first, to the siblings for HAND_ON_HOLD (see :meth:`over`), and judge
        the loads again only after it."""
        self.hold_until = now + HAND_ON_HOLD
        self.over_ticks = 0

    def over(self, held: int, now: float) -> bool:
        """Whether a worker holding ``held`` connections should leave the next one (ahead of
        its least-loaded sibling, or holding after a hand-on)."""
        if self.force:
            self.force = False
        elif held and now >= self.off_until:
            least = self.siblings.least(now, FRESH)
            if least is not None and self._ahead(held, least, now):
                return True
        self.defer_since = 0.0  # (it takes this one: no deferral is going on)
        return False

    def _ahead(self, held: int, least: int, now: float) -> bool:
        """The rule for leaving new connections to the siblings: more than SLACK ahead of
        the least-loaded one, or within the hold after a hand-on."""
        return held > least + SLACK or now < self.hold_until

    def begin(self, now: float) -> None:
        """Defer; DEFER_MAX counts from the first deferral of a run (see pause)."""
        if not self.defer_since:
            self.defer_since = now

    def review(self, held: int, now: float) -> bool:
        """While deferring, every DEFER_CHECK: True when the worker should watch its
        listeners again (balanced now, nothing left waiting, or DEFER_MAX passed)."""
        least = self.siblings.least(now, FRESH)
        if least is None or not self._ahead(held, least, now):
            self.streak = 0
        elif now - self.defer_since < DEFER_MAX:
            return False
        elif backlog_waiting(self.listeners):  # the siblings left them waiting: take one, and count the stall
            self.force = True
            if self.streak == 0:
                self.token = self.siblings.progress()
            self.streak += 1
            if self.streak >= STALL_STREAK:
                self.streak = 0
                if self.siblings.progress() == self.token:
                    self.off_until = now + BACKOFF
        else:
            self.streak = 0
        self.defer_since = 0.0
        return True

    def pause(self) -> None:
        """One of the worker's connections closed while deferring: it looks again at once.
        With clients still waiting, DEFER_MAX keeps counting from the deferral's start:
        closes coming more often than DEFER_MAX must not put the bound off for ever."""
        if not backlog_waiting(self.listeners):
            self.defer_since = 0.0
