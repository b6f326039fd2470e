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

While the worker has about a thread per connection, a thread that answered a keep-alive
request does not hand the connection back at once: it holds it and serves its next
bodiless requests itself, as a thread-per-connection server does (see ``_hold``, which
says what goes back to the loop and how a holding thread is taken back).

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
import queue
import select
import socket
import threading
import time
from collections import deque
from typing import Any, BinaryIO

from tiamat.http.h1 import RequestHead, whole_request
from tiamat.workers.sync import (
    RECV_SIZE,
    STOP_GRACE,
    Connection,
    SyncWorker,
    request_body,
)

log = logging.getLogger("tiamat.error")

_FOREVER = float("inf")
#: an answered request is taken back lazily only if it ran less than this (seconds); a longer
#: one wakes the loop, which then shows the worker idle at once: until it is taken back the
#: scoreboard shows it as the worker's current request, and a request that ran close to
#: --timeout must not be killed as stuck after its answer (a wake-up is nothing next to it)
LAZY_FOR = 0.05
#: the longest a pool thread keeps a connection it answered (see ``_hold``): the loop's
#: bookkeeping for the connection (requests counted, the scoreboard's current request) waits
#: until it is handed back, so this stays well under a second
HOLD_FOR = 0.25


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
                 "read_more", "served", "start", "unwatched")

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
        #: requests answered: 1, plus those its thread read itself while holding the connection
        self.served = 1
        #: the holding thread's last read filled its buffer: more bytes may wait, unreported
        self.read_more = False


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

    def run(self) -> None:
        self.nthreads = max(1, self.cfg.threads)
        self.in_flight: dict[Connection, _InFlight] = {}
        self.done: deque[_InFlight] = deque()
        self.jobs: queue.SimpleQueue[_InFlight | None] = queue.SimpleQueue()
        #: a wake-up byte is on its way for ``done``: later finishers need not write another
        self.wake_pending = False
        #: threads waiting on a connection they hold (see _hold), longest-waiting first:
        #: thread id -> the eventfd that makes it hand the connection back (_reclaim)
        self.holders: dict[int, int] = {}
        #: threads hold connections only while the worker has no more connections than this:
        #: a thread for (nearly) every one.  With many connections per thread, most requests
        #: would find every thread holding and take one back: a hello app on 4 threads with 64
        #: connections then spent 15 % more CPU per request, at 3x the p99.  The slack
        #: (an eighth) keeps holds on when a few connections more than threads arrive, as
        #: when 256 connections split 129/127 between two workers of 128 threads
        self.hold_limit = self.nthreads + self.nthreads // 8
        self.threads = [threading.Thread(target=self._pool_thread, name=f"tiamat-{i}", daemon=True)
                        for i in range(self.nthreads)]
        for thread in self.threads:
            thread.start()
        super().run()

    # --- accepting ----------------------------------------------------------------------
    def _set_accepting(self, on: bool) -> None:
        # (answered jobs not taken back yet hold no thread: see the lazy take-back)
        if on and (len(self.in_flight) - len(self.done) - len(self.holders) >= self.nthreads
                   or len(self.connections) >= self.worker_connections):
            return
        super()._set_accepting(on)

    def accept(self, listener: socket.socket) -> None:
        # Every thread busy: stop watching the listeners, lazily.  dispatch() does not do it
        # at once: under a keep-alive load the pool fills and drains all the time while no
        # new client comes, and each toggle cost an unregister and a register per listener.
        # (a thread holding a connection counts as free: its request will get it back)
        if len(self.in_flight) - len(self.holders) >= self.nthreads:
            self._collect()  # (answered requests not taken back yet free their threads)
        if len(self.in_flight) - len(self.holders) >= self.nthreads:
            self._set_accepting(False)
            # (then look again: a thread that finished or began to hold since the count saw
            # accepting still on and woke no one; _collect resumes accepting if one is free)
            if self.done or self.holders:
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
        body = request_body(conn.body)
        conn.head = conn.body = None
        # events already read (a pipelined request) wait until the pool hands the connection
        # back.  The connection stays registered with the selector: a client that waits for
        # its answer sends nothing, so the common case costs no epoll_ctl at all (it was an
        # unregister and a register per request); if it does become readable meanwhile,
        # on_readable stops watching it then, and _collect watches it again.
        events = conn.reader.events
        pending = events[:]
        events.clear()
        conn.deadline = _FOREVER
        job = _InFlight(conn, head, body, pending, time.monotonic())
        self.in_flight[conn] = job
        if len(self.in_flight) == 1:
            # only a first request changes the oldest in flight: with others in flight the
            # board already shows the oldest (_collect ends with _update_board)
            self._update_board()
        self.jobs.put(job)
        if len(self.in_flight) - len(self.done) > self.nthreads and self.holders:
            self._reclaim()  # no thread free for it: one holding a connection gives it back

    def _pool_thread(self) -> None:
        _batch_policy()
        jobs, done, handler = self.jobs, self.done, None
        #: what a holding thread waits for: its connection, and its own eventfd (see _hold)
        waiter = select.poll()
        own = -1
        hold = False
        while True:
            job = jobs.get()
            if job is None:
                return
            if handler is None:  # (set by run() after the threads start)
                handler = self.handler
                hold = self.edge  # (plain connections only: TLS is read through OpenSSL)
            _answer(job, handler)
            if hold and len(self.connections) <= self.hold_limit and self._quiet(job):
                if own < 0:
                    try:  # (once per thread, when it first may hold)
                        own = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                        waiter.register(own, select.POLLIN)
                    except OSError:  # out of descriptors: this thread holds nothing
                        hold = False
                if hold:
                    try:
                        self._hold(job, handler, waiter, own)
                    except Exception:  # (a pool thread must not die: the pool would shrink)
                        log.exception("unexpected error in a pool thread")
                        job.keep_alive = False
            done.append(job)
            job.finished = True  # (after the append: a finished job is always in done)
            # An answered keep-alive connection, still watched, needs nothing from the loop
            # now: it is taken back when the client's next request makes it readable
            # (on_readable), or by the next sweep.  Waking the loop for it made the loop
            # preempt this thread for a pass over a job or two: ~12 % of the GIL's time
            # in the 10 ms sleep row.  Checked after ``finished`` is set: on_readable and
            # close() set their flag first and look at ``finished`` after.
            if self._quiet(job) and not job.unwatched and self.accepting:
                continue
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

    def _hold(self, job: _InFlight, handler: Any, waiter: select.poll, own: int) -> None:
        """Keep the answered connection on this thread and serve its next requests here.

        Under keep-alive, the hand-off is most of what a short request costs in this worker:
        the loop reads the next request and queues it, a pool thread wakes and takes the GIL,
        answers, and hands the connection back.  A thread with nothing queued for it instead
        waits for the connection's next request itself, in poll() with the GIL released, as
        a thread-per-connection server would: the request then costs this thread one
        wake-up and the loop nothing (per hold, the loop still wakes once for the first
        request's bytes, stops watching the connection, and watches it again at the
        hand-back: one wake-up and two epoll_ctl calls).  Under the 10 ms sleep benchmark (256 connections,
        2 x 128 threads, the server on one CPU) that took the row from 0.74-0.76x granian's
        requests per second to 0.80-0.92x.  The price: a held request always costs its own
        wake-up from poll(), where the loop reads many connections per wake-up once the CPU
        is saturated, so there the CPU per request is higher (48-57 against ~40 us; below
        saturation it is lower: 53-57 against 63-65 us at 64 connections).

        A holding thread is free for the pool: when the loop queues a request and no thread
        is free, it takes the longest-waiting holder out of ``holders`` and writes to its
        eventfd, and the holder hands its connection back and takes the request (so does
        every holder at a stop).  A thread that is not in ``holders`` is not waiting: one
        that was taken out while a request arrived serves it, then sees it was taken out.

        Only a whole request without a body, in one read, is served here.  Anything else
        (a body, a pipelined request, a head in pieces, an error, the client closing) goes
        back to the loop with the events read so far, as does a connection idle for the
        keep-alive timeout or held for ``HOLD_FOR``: the loop counts its requests and shows
        the scoreboard then.  The loop, which still watches the connection, stops watching it
        when the next request arrives (``on_readable``) and watches it again once it is back.
        """
        conn = job.conn
        fd = conn.fd
        reader = conn.reader
        events = reader.events
        holders, me, jobs = self.holders, threading.get_ident(), self.jobs
        until = job.answered + min(HOLD_FOR, self.keepalive_timeout)
        waiter.register(fd, select.POLLIN)
        holders[me] = own
        if not self.accepting:
            # the loop stopped accepting while every thread was busy: this one is free now,
            # holding, so it may accept again (it counts holders as free)
            self._wake_loop()
        try:
            while True:
                holders[me] = own
                # (after joining holders, so that a request queued meanwhile is seen here
                # or this thread is seen by dispatch(); and a stop is seen either way)
                wait = until - time.monotonic()
                if (wait <= 0 or not jobs.empty() or not self.alive
                        or len(self.connections) > self.hold_limit):
                    holders.pop(me, None)
                    return
                ready = waiter.poll(wait * 1000.0)
                if ready and (ready[0][0] == own or ready[-1][0] == own):  # (clear it)
                    try:
                        os.eventfd_read(own)
                    except (BlockingIOError, InterruptedError):
                        pass
                if holders.pop(me, None) is None or not ready:
                    return  # taken out by _reclaim, or the wait is over
                try:
                    data = os.read(fd, RECV_SIZE)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    job.keep_alive = False
                    return
                if not data:  # the client closed: the loop closes the connection
                    job.keep_alive = False
                    return
                reader.feed(data)
                full = len(data) == RECV_SIZE
                head = None if full else whole_request(events)
                if head is None:
                    if events or reader.in_message or full:
                        # (the loop takes it from here, as if it had read this itself)
                        job.pending = events[:]
                        events.clear()
                        job.read_more = full
                        return
                    continue  # (empty lines between requests: nothing yet)
                job.head, job.body, job.start = head, request_body(None), time.monotonic()
                _answer(job, handler)
                job.served += 1
                if not self._quiet(job):
                    return
        finally:
            waiter.unregister(fd)
            holders.pop(me, None)

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
            if (not job.keep_alive or job.head.upgrade or job.close_after or conn.closed
                    or not (self.alive or job.pending)):
                # (stopping, a request already read is still answered: process() runs it
                # inline, as dispatch() does once the worker is stopping)
                self.close(conn)
            else:
                # (from the answer, not from now: a lazy take-back or a hold comes later)
                conn.idle_since = idle_since = job.answered
                # (both cached by SyncWorker.run) a pipelined request read in part while a
                # pool thread had the connection has its head timed as in SyncWorker.feed
                conn.deadline = idle_since + (self.header_timeout if conn.reader.in_message
                                              else self.keepalive_timeout)
                if job.unwatched:  # (registering reports bytes already waiting, edge or not)
                    self.selector.register(conn.sock, self.conn_read, conn)
                elif job.read_more:  # (its holding thread's read filled the buffer)
                    self.readable_again.append(conn)
                if job.pending:
                    conn.reader.events[:0] = job.pending
                    self.process(conn)
        self._update_board()
        if not self.accepting:
            self._resume_accepting(now)

    def _resume_accepting(self, now: float) -> None:
        # (not while accept() is paused after running out of descriptors: a request taken
        # back frees none, and watching the listener again would fail and log per request)
        if self.alive and now >= self.accept_paused_until:
            self._set_accepting(True)  # (if a thread is free: see _set_accepting)

    def sweep(self, now: float) -> None:
        self._collect()  # answered requests on connections that stayed quiet since
        super().sweep(now)

    def _reclaim(self, every: bool = False) -> None:
        """Make the longest-waiting thread holding a connection (or, ``every``, each one)
        hand it back: see _hold."""
        holders = self.holders
        while holders:
            try:
                own = holders.pop(next(iter(holders)))
            except (KeyError, RuntimeError, StopIteration):  # (it left meanwhile: the next)
                continue
            os.eventfd_write(own, 1)
            if not every:
                return

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
        self._reclaim(every=True)  # (held connections come back at once)
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
            self._collect()
            self.beat()
        for _ in self.threads:
            self.jobs.put(None)
        if self.in_flight:
            # the pool threads are daemons and worker_main ends with os._exit: not waited for
            log.warning("worker %s: exiting with %s requests still running", self.slot,
                        len(self.in_flight))
        super().shutdown()
