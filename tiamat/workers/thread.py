"""``-k thread --threads N``: WSGI on a pool of N threads per worker process.

Everything but the app call is the sync worker's: one thread (the main one) runs the
epoll loop over the listening sockets, the idle keep-alive connections and the
connections still sending a request; the HTTP core buffers each request until it is
complete.  Only then is the connection handed to a pool thread (a queue), which calls
the app and writes the response, and hands the connection back in ``done``.

The connection stays registered meanwhile: a client waiting for its answer sends nothing,
so that costs no epoll_ctl; if it does turn readable (a pipelined request, a close), the
loop stops watching it until it is back.  An answered keep-alive connection is taken back
lazily, with no wake-up of the loop: when the client's next request makes it readable,
at the next sweep, or when accept() needs its thread.  Only what needs the loop now (a
close, pipelined events already read, a connection it stopped watching, a stop, listeners
to watch again) writes to the worker's wake-up pipe.  While every thread is busy the
worker stops accepting: new connections stay in the kernel's backlog where another, less
busy, worker takes them, rather than queueing here behind slow requests.

While the worker has about a thread per connection, an answered keep-alive connection is
not handed back at once but parked with the pool: idle pool threads wait on the parked
connections themselves (one epoll, each connection reported to one thread) and serve their
next bodiless requests without the loop (see ``_park``, which says what goes back to the
loop and when).

The pool threads run under ``SCHED_BATCH`` (Linux; the loop thread keeps the normal
policy): a thread woken up (by a job put in the queue, its app's sleep ending, or the GIL
being released) then does not preempt the thread that is running, which holds the GIL
and would have to be switched back to at once.  Under the 10 ms sleep benchmark (128
threads, the server on one CPU) that cut the context switches per request from about 2.5
to 1.8 and the CPU time per request by about 15 %; the loop, the one thread every request
goes through, still preempts the pool threads when a connection turns readable.  On a
machine with idle CPUs the policy changes nothing: a woken thread runs on an idle CPU.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, BinaryIO

from tiamat.http.h1 import RequestHead, whole_request
from tiamat.workers.sync import (
    RECV_SIZE,
    STOP_GRACE,
    Connection,
    SyncWorker,
    request_body,
)
from tiamat.wsgi import NO_BODY

log = logging.getLogger("tiamat.error")

_FOREVER = float("inf")
#: an answered request is taken back lazily only if it ran less than this (seconds); a longer
#: one wakes the loop, which then shows the worker idle at once: until it is taken back the
#: scoreboard shows it as the worker's current request, and a request that ran close to
#: --timeout must not be killed as stuck after its answer (a wake-up is nothing next to it)
LAZY_FOR = 0.05
#: the longest an answered connection stays parked with the pool (see ``_park``): the loop's
#: bookkeeping for the connection (requests counted, the scoreboard's current request) waits
#: until it is handed back, so this stays well under a second
HOLD_FOR = 0.25
#: how park_set watches a parked connection: reported once, to one thread, then disarmed
_PARKED = select.EPOLLIN | select.EPOLLONESHOT


def _set_timer_slack(microseconds: int) -> Callable[[], None]:
    """A function that sets the calling thread's timer slack (Linux's PR_SET_TIMERSLACK) to
    ``microseconds``; one that does nothing for 0 or where prctl cannot be had.

    The pool threads' timed waits are mostly the app's (a sleep, a database call's timeout),
    each a kernel timer whose expiry interrupts the CPU.  With a slack, the kernel may end a
    wait up to that much late, and so ends waits due close together with one interrupt.
    Under the 10 ms sleep benchmark (256 connections, 2 x 128 threads, the server on one
    CPU; 20k sleeps a second) a slack of 500 us instead of the kernel's 50 took the CPU per
    request from 48-58 to 35-43 us and the p99 from 23-49 to 12-18 ms (an interrupt is
    dear on a virtual machine); a wait in a web request rarely needs to be exact to 0.5 ms.
    """
    if not microseconds:
        return lambda: None
    from tiamat import prctl  # (only here: ctypes costs ~3 ms, a thread worker's start only)

    call = prctl.load()
    if isinstance(call, str):
        return lambda: None
    nanoseconds = microseconds * 1000

    def set_timer_slack() -> None:
        call(prctl.PR_SET_TIMERSLACK, nanoseconds, 0, 0, 0)  # (refused: the default stays)

    return set_timer_slack


def _batch_policy() -> None:
    """Put the calling thread under SCHED_BATCH: woken, it waits for the running thread to
    block or use up its time slice instead of preempting it (see the module docstring)."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # (0: this thread)
    except (AttributeError, OSError):  # not Linux, or refused (a sandbox): the normal policy
        pass


class _InFlight:
    """A request handed to the pool; the main thread looks at it only once it is done."""

    __slots__ = ("answered", "body", "close_after", "conn", "finished", "head", "keep_alive", "pending",
                 "read_more", "served", "start", "until", "unwatched")

    def __init__(self, conn: Connection, head: RequestHead, body: BinaryIO,
                 pending: list[object], start: float) -> None:
        self.conn = conn
        self.head = head
        self.body = body
        self.pending = pending
        self.start = start
        #: when its (last) request was answered: the keep-alive timeout counts from there
        self.answered = start
        self.keep_alive = False
        self.close_after = False
        #: the loop saw the connection readable while in the pool and stopped watching it
        self.unwatched = False
        #: set by the pool thread once the job is in ``done`` (never before)
        self.finished = False
        #: requests answered: 1, plus those the pool read itself while it was parked
        self.served = 1
        #: the pool's last read filled its buffer: more bytes may wait, unreported
        self.read_more = False
        #: parked (see _park) until then at the latest; 0.0: not parked yet
        self.until = 0.0


def _answer(job: _InFlight, handler: Any) -> None:
    """Run the job's request through the app (in a pool thread) and note the outcome."""
    try:
        job.keep_alive = handler.handle(job.head, job.body, job.conn.environ, job.conn)[0]
    except BaseException:  # the handler already turns app errors into a 500
        log.exception("unexpected error in a pool thread")
        job.keep_alive = False
    finally:
        job.body.close()
        job.answered = time.monotonic()


class ThreadWorker(SyncWorker):
    """The sync worker's loop, with complete requests run on ``--threads`` pool threads."""

    interface = "wsgi"
    multithread = True

    def init_app(self) -> None:
        super().init_app()
        # (descriptors the pool needs, opened while booting: post_worker_init sees a worker
        # with all it needs to serve, as a hook that caps the descriptors expects)
        #: what an idle pool thread waits on: the parked connections, one-shot, and ``nudge``
        self.park_set = select.epoll()
        self.nudge = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # (edge-triggered: a write wakes one waiting thread, not each one in turn; a thread
        # that takes a job and sees more queued passes the nudge on: see _next_job)
        self.park_set.register(self.nudge, select.EPOLLIN | select.EPOLLET)

    def run(self) -> None:
        self.nthreads = max(1, self.cfg.threads)
        self.in_flight: dict[Connection, _InFlight] = {}
        self.done: deque[_InFlight] = deque()
        #: requests from the loop for the pool (None: a thread's end); a thread waiting in
        #: park_set is woken for them through ``nudge`` (see _nudge)
        self.jobs: deque[_InFlight | None] = deque()
        #: one item per pool thread waiting in park_set (a deque: append and pop are atomic)
        self.waiting: deque[None] = deque()
        #: a nudge is written and not yet read (see _nudge)
        self.nudged = False
        #: a wake-up byte is on its way for ``done``: later finishers need not write another
        self.wake_pending = False
        #: answered keep-alive connections waiting for their next request (see _park): fd ->
        #: its job.  Taking a job out of it (pop) is what makes a thread its only owner.
        self.parked: dict[int, _InFlight] = {}
        #: connections are parked only while the worker has no more connections than this:
        #: a thread for (nearly) every one.  With many connections per thread, the loop's
        #: batched reads cost less than a wake-up per request.  The slack (an eighth) keeps
        #: parking on when a few connections more than threads arrive, as when 256
        #: connections split 129/127 between two workers of 128 threads
        self.hold_limit = self.nthreads + self.nthreads // 8
        self.set_timer_slack = _set_timer_slack(self.cfg.timer_slack)
        self.threads = [threading.Thread(target=self._pool_thread, name=f"tiamat-{i}", daemon=True)
                        for i in range(self.nthreads)]
        for thread in self.threads:
            thread.start()
        super().run()

    # --- accepting ----------------------------------------------------------------------
    def _busy_threads(self) -> int:
        """Pool threads running a request (or about to): a parked connection holds none."""
        return len(self.in_flight) - len(self.parked)

    def _set_accepting(self, on: bool) -> None:
        # (answered jobs not taken back yet hold no thread: see the lazy take-back)
        if on and self._busy_threads() - len(self.done) >= self.nthreads:
            return
        super()._set_accepting(on)

    def accept(self, listener: socket.socket) -> None:
        # Every thread busy: stop watching the listeners, lazily.  dispatch() does not do it
        # at once: under a keep-alive load the pool fills and drains all the time while no
        # new client comes, and each toggle cost an unregister and a register per listener.
        if self._busy_threads() >= self.nthreads:
            self._collect()  # (answered requests not taken back yet free their threads)
        if self._busy_threads() >= self.nthreads:
            self._set_accepting(False)
            # (then look again: a thread that finished or parked its connection since the
            # count saw accepting still on and woke no one; _collect resumes accepting if
            # one is free)
            if self.done or self.parked:
                self._collect()
            return
        super().accept(listener)

    # --- handing requests to the pool ---------------------------------------------------
    def dispatch(self, conn: Connection) -> None:
        if not self.alive:
            # stopping: the pool is winding down, so a request that arrived just before the
            # stop is answered here, like the sync worker does
            super().dispatch(conn)
            return
        head = conn.head
        assert head is not None
        events = conn.reader.events
        if conn.hand_on:  # (handed on: SyncWorker._rebalance)
            self._end_if_leaving(conn, head)
        body = request_body(conn.body)
        conn.head = conn.body = None
        # events already read (a pipelined request) wait until the pool hands the connection
        # back.  The connection stays registered with the selector: a client that waits for
        # its answer sends nothing, so the common case costs no epoll_ctl at all (it was an
        # unregister and a register per request); if it does become readable meanwhile,
        # on_readable stops watching it then, and _collect watches it again.
        pending = events[:]
        events.clear()
        conn.deadline = _FOREVER
        job = _InFlight(conn, head, body, pending, time.monotonic())
        self.in_flight[conn] = job
        if len(self.in_flight) == 1:
            # only a first request changes the oldest in flight: with others in flight the
            # board already shows the oldest (_collect ends with _update_board)
            self._update_board()
        self.jobs.append(job)
        if self.waiting:  # (else a thread that is running takes it when it is done)
            self._nudge()

    def _pool_thread(self) -> None:
        _batch_policy()
        self.set_timer_slack()
        handler = None
        park = False
        while True:
            job = self._next_job()
            if job is None:
                return
            if handler is None:  # (set by run() after the threads start)
                handler = self.handler
                park = self.edge  # (plain connections only: TLS is read through OpenSSL)
            _answer(job, handler)
            if not (park and self._park(job)):
                self._hand_back(job)

    def _hand_back(self, job: _InFlight) -> None:
        """(From a pool thread) give the answered job back to the loop."""
        self.done.append(job)
        job.finished = True  # (after the append: a finished job is always in done)
        # An answered keep-alive connection, still watched, needs nothing from the loop
        # now: it is taken back when the client's next request makes it readable
        # (on_readable), or by the next sweep.  Waking the loop for it made the loop
        # preempt this thread for a pass over a job or two: ~12 % of the GIL's time
        # in the 10 ms sleep row.  Checked after ``finished`` is set: on_readable and
        # close() set their flag first and look at ``finished`` after.
        if not (self._quiet(job) and not job.unwatched and self.accepting):
            self._wake_loop()

    def _wake_loop(self) -> None:
        """(From a pool thread) make the loop take the finished jobs back and look again at
        whether it may accept.  One wake-up byte per batch, not per request: the loop clears
        the flag before it takes the finished jobs, so a job appended after that writes a
        new byte."""
        if not self.wake_pending:
            self.wake_pending = True
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, InterruptedError):
                pass  # the pipe is full: the loop is going to wake up anyway

    def _quiet(self, job: _InFlight) -> bool:
        """Whether the job's connection, answered, needs nothing from the loop now: kept
        alive, no events or close waiting, a short request, the worker running normally."""
        return (job.keep_alive and not (job.pending or job.close_after or job.read_more)
                and not job.head.upgrade and self.alive and job.answered - job.start < LAZY_FOR)

    # --- parked connections ---------------------------------------------------------------
    def _park(self, job: _InFlight) -> bool:
        """Keep the answered connection in the pool for its next request; False: it goes back.

        Under keep-alive, the hand-off is most of what a short request costs in this worker:
        the loop reads the next request and queues it, a pool thread wakes and takes the GIL,
        answers, and hands the connection back, and the loop (every request goes through it)
        waits for the GIL behind the pool threads.  A parked connection is instead watched by
        the pool itself: every idle pool thread waits in ``park_set`` (one epoll, with the GIL
        released), which reports each parked connection one-shot to one thread, which reads
        the request, answers it and parks the connection again.  A thread that finishes a
        request then often finds the next one already reported and takes it without
        sleeping.  Under the 10 ms sleep benchmark (256 connections, 2 x 128 threads, the
        server on one CPU) context switches per request went from ~1.95 (when each thread
        kept the connection it answered and waited in its own poll(), to be taken back by
        the loop for a request that found no thread free) to ~1.35, and req/s up 6 % (3
        A/B pairs; 9 % with the timer slack, see _set_timer_slack).  A parked connection
        holds no thread, so nothing needs taking back.

        Only a whole request without a body, in one read, is served from the pool (see
        _take_parked); anything else (a body, a pipelined request, a head in pieces, an
        error, the client closing) goes back to the loop with the events read so far, as
        does a connection parked for ``HOLD_FOR`` (or the keep-alive timeout if shorter):
        the loop counts its requests and shows the scoreboard then.  The loop, which still
        watches the connection, stops watching it when the next request arrives
        (``on_readable``) and watches it again once it is back.
        """
        if len(self.connections) > self.hold_limit or not self._quiet(job):
            return False
        if not job.until:
            job.until = job.answered + min(HOLD_FOR, self.keepalive_timeout)
        elif job.answered >= job.until:
            return False
        fd = job.conn.fd
        self.parked[fd] = job
        # (after it is in parked: the first report must find it there.  If the loop takes it
        # out meanwhile (_unpark), a report of the armed fd is passed over.  It stays in
        # park_set until it is closed: armed again next time, never removed)
        try:
            try:
                self.park_set.modify(fd, _PARKED)
            except FileNotFoundError:  # (its first time)
                self.park_set.register(fd, _PARKED)
        except FileExistsError:  # (registered meanwhile by a later owner: it is armed)
            pass
        except OSError:
            taken = self.parked.pop(fd, None)
            if taken is job:
                return False
            if taken is not None:  # (another thread's job for this connection: not ours)
                self.parked[fd] = taken
        if not self.alive and self.parked.pop(fd, None) is job:
            # (a stop began while this thread parked it, perhaps after the stop took the
            # parked connections back: the loop takes it from here)
            return False
        if not self.accepting:
            # the loop stopped accepting while every thread was busy: this one is free now
            # (a parked connection holds none), so the loop may accept again
            self._wake_loop()
        return True

    def _next_job(self) -> _InFlight | None:
        """(In a pool thread) the next request to answer: one queued by the loop, or the next
        request of a parked connection; waits for either.  None: the thread is to end."""
        jobs, parked, nudge, waiting = self.jobs, self.parked, self.nudge, self.waiting
        wait = self.park_set.poll
        while True:
            if jobs:
                try:
                    job = jobs.popleft()
                except IndexError:  # (another thread took it)
                    pass
                else:
                    if jobs and waiting:  # (more queued: wake another thread for them)
                        self._nudge()
                    return job
            # (say it waits, then look at the queue again: a job queued before dispatch()
            # saw this thread waiting is seen here, any later one is nudged for)
            waiting.append(None)
            try:
                ready = None if jobs else wait(-1.0, 1)
            finally:
                waiting.pop()
            for fd, _ in ready or ():
                if fd == nudge:
                    try:
                        os.eventfd_read(nudge)
                    except (BlockingIOError, InterruptedError):
                        pass  # (read by another thread woken for an earlier nudge)
                    # (after the read, never before: a thread that read the count cleared
                    # by then a flag set for it, so ``nudged`` is never left set with no
                    # count to read; set before the read, a nudge written in between was
                    # read by this thread, and the one woken for it found nothing to report)
                    self.nudged = False
                    continue
                job = parked.pop(fd, None)  # (None: taken back by the loop meanwhile)
                if job is None:
                    continue
                try:
                    if self._take_parked(job):
                        return job
                except Exception:  # (a pool thread must not die, nor the job be lost)
                    log.exception("unexpected error in a pool thread")
                    job.keep_alive = False
                    self._hand_back(job)

    def _nudge(self) -> None:
        """Wake a pool thread waiting in park_set for a queued request: one nudge at a time.
        Until the thread woken for it runs, a request queued meanwhile is taken by the
        threads that run (each looks at the queue first), so writing again is no help: with
        a thread waiting while others serve, it was a write per request and per pass."""
        if not self.nudged:
            self.nudged = True
            os.eventfd_write(self.nudge, 1)

    def _take_parked(self, job: _InFlight) -> bool:
        """Read the parked connection reported readable: True if it holds a whole request
        without a body, now the job's; otherwise the job is parked again or handed back."""
        conn = job.conn
        reader = conn.reader
        events = reader.events
        try:
            data = os.read(conn.fd, RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            if not self._park(job):
                self._hand_back(job)
            return False
        except OSError:
            data = b""
        if not data:  # the client closed (or failed): the loop closes the connection
            job.keep_alive = False
            self._hand_back(job)
            return False
        reader.feed(data)
        full = len(data) == RECV_SIZE
        head = None if full else whole_request(events)
        if head is None:
            if events or reader.in_message or full:
                # (the loop takes it from here, as if it had read this itself)
                job.pending = events[:]
                events.clear()
                job.read_more = full
                self._hand_back(job)
            elif not self._park(job):  # (empty lines between requests: nothing yet)
                self._hand_back(job)
            return False
        if conn.hand_on or not self.alive:  # (handed on by the loop, or stopping)
            self._end_if_leaving(conn, head)
        job.head, job.body, job.start = head, NO_BODY, time.monotonic()
        job.served += 1
        return True

    def _unpark(self, now: float) -> None:
        """(In the loop) take back the parked connections whose time is up, or every one
        when the worker stops or has more connections than ``hold_limit``.  The loop does it
        at its sweep, so a connection stays parked up to a sweep (0.5 s) longer than
        ``until``: the pool threads wait with no timeout, and none looks at the clock."""
        parked = self.parked
        keep = self.alive and len(self.connections) <= self.hold_limit
        for fd, job in list(parked.items()):
            if (keep and job.until > now) or parked.pop(fd, None) is not job:
                continue  # (popped by a pool thread meanwhile: it is that thread's)
            self.done.append(job)
            job.finished = True

    def _watched(self, conn: Connection) -> bool:
        # a connection in a pool thread stays registered (see dispatch) but is handed off:
        # a pipelined partial head read with its request must not arm the header timeout
        return conn not in self.in_flight and super()._watched(conn)

    def on_readable(self, conn: Connection) -> None:
        job = self.in_flight.get(conn)
        if job is not None and job.finished:
            # answered, but the loop has not taken it back yet: the client's next request
            # came before the wake-up byte was read.  Take the finished jobs back now rather
            # than stop watching the connection and watch it again after the wake-up (two
            # epoll_ctl calls and a loop pass per request under a keep-alive load)
            self._collect()
            if conn.closed:
                return
            job = self.in_flight.get(conn)
        if job is not None:  # a pool thread has it: stop watching it until it comes back
            job.unwatched = True
            try:
                self.selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            if job.finished:  # answered meanwhile, before its thread saw ``unwatched``
                self._collect()
            return
        super().on_readable(conn)

    # --- taking connections back ----------------------------------------------------------
    def handle_wakeup(self) -> None:
        super().handle_wakeup()
        self._collect()

    def _collect(self) -> None:
        done = self.done
        self.wake_pending = False
        if not done:
            if not self.accepting:  # (a thread that began to hold counts as free now)
                self._resume_accepting(time.monotonic())
            return
        in_flight, board, now = self.in_flight, self.board, time.monotonic()
        while done:
            job = done.popleft()
            conn = job.conn
            in_flight.pop(conn, None)
            board.idle(now, job.served)
            if self.max_requests:
                self.count_request()
            if not job.keep_alive or job.head.upgrade or job.close_after or conn.closed:
                self.close(conn, linger=self._leaving(conn))
            else:
                # (from the answer, not from now: a lazy take-back or a hold comes later)
                conn.idle_since = idle_since = job.answered
                # (both cached by SyncWorker.run) a pipelined request read in part while a
                # pool thread had the connection has its head timed as in SyncWorker.feed
                conn.deadline = idle_since + (self.header_timeout if conn.reader.in_message
                                              else self.keepalive_timeout)
                if job.unwatched:  # (registering reports bytes already waiting, edge or not)
                    self.selector.register(conn.sock, self.conn_read, conn)
                elif job.read_more:  # (the pool's read of it filled the buffer)
                    self.readable_again.append(conn)
                if job.pending:
                    # (stopping, a request already read is still answered: process() runs
                    # it inline, as dispatch() does once the worker is stopping)
                    conn.reader.events[:0] = job.pending
                    self.process(conn)
                # (stopping, an answered connection is kept as an idle one: a request the
                # client sent meanwhile is still read and answered, and the stop closes the
                # idle ones after STOP_GRACE, as the sync worker does; closed here at once,
                # its unread request made the kernel reset the client)
        self._update_board()
        if not self.accepting:
            self._resume_accepting(now)

    def _active(self, conn: Connection, since: float) -> bool:
        # (a connection in the pool, parked ones too, is answering requests now: its
        # idle_since moves only when the loop takes it back)
        return conn in self.in_flight or conn.idle_since >= since

    def _may_unmark(self, conn: Connection) -> bool:
        # (a pool thread may have read the mark for the request it is answering: the loop
        # closes the connection by it when the job comes back)
        return conn not in self.in_flight

    def _resume_accepting(self, now: float) -> None:
        # (not while accept() is paused after running out of descriptors: a request taken
        # back frees none, and watching the listener again would fail and log per request)
        if self.alive and now >= self.accept_paused_until:
            self._set_accepting(True)  # (if a thread is free: see _set_accepting)

    def sweep(self, now: float) -> None:
        if self.parked:
            self._unpark(now)
        self._collect()  # answered requests on connections that stayed quiet since
        super().sweep(now)

    def _update_board(self) -> None:
        """Show the oldest in-flight request as the worker's current one (for --timeout)."""
        if self.in_flight:
            # the oldest is the first: jobs enter in_flight in dispatch order, each stamped with
            # monotonic() as it enters, and leave it by pop (a scan with min() here cost a lambda
            # call per in-flight request, twice per request: 10 % of the worker's Python time)
            job = next(iter(self.in_flight.values()))
            self.board.busy(job.start, job.head.method, job.head.path)

    def close(self, conn: Connection, linger: bool = False) -> None:
        job = self.in_flight.get(conn)
        if job is not None:  # a pool thread owns it: close once it hands it back
            job.close_after = True
            if job.finished:  # handed back already, without a wake-up (see _pool_thread)
                self._collect()
            return
        super().close(conn, linger)

    # --- stopping -------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish (unless quick), then close all.

        While the pool finishes, the loop keeps running: idle keep-alive connections are
        closed, a request already on its way is still read and answered (inline, as the
        worker is stopping), and the sync worker's own shutdown does the rest.
        """
        self.board.stopping(time.monotonic())
        self._unpark(time.monotonic())  # (parked connections come back at once)
        self._collect()
        self._release_listeners()  # refuse new clients now rather than leave them in the backlog
        if not self.quick:
            self.read_unreported()
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while self.in_flight and not self.quick and time.monotonic() < deadline:
            now = time.monotonic()
            for conn in list(self.connections.values()):
                if (conn not in self.in_flight and not conn.reader.in_message
                        and not conn.setup and now - conn.idle_since >= STOP_GRACE):
                    self.close(conn)
            self._serve_stopping(0.2)
            self._unpark(time.monotonic())  # (one parked as the stop began: see _park)
            self._collect()
            self.beat()
        self.jobs.extend([None] * len(self.threads))
        os.eventfd_write(self.nudge, 1)  # (each thread that takes a None wakes the next)
        if self.in_flight:
            # the pool threads are daemons and worker_main ends with os._exit: not waited for
            log.warning("worker %s: exiting with %s requests still running", self.slot,
                        len(self.in_flight))
        super().shutdown()
        self._close_pool_descriptors()

    def _close_pool_descriptors(self) -> None:
        """Close park_set and the nudge once every pool thread has ended (briefly waited
        for), so that a worker that becomes the --refork-after mold does not hand them to
        the workers it forks; with a thread still running (a request past the graceful
        timeout) they stay open: the process is about to exit."""
        end = time.monotonic() + 0.2
        for thread in self.threads:
            thread.join(max(0.0, end - time.monotonic()))
        if any(thread.is_alive() for thread in self.threads):
            return
        self.park_set.close()
        os.close(self.nudge)
