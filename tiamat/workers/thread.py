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
import socket
import threading
import time
from collections import deque
from typing import BinaryIO

from tiamat.http.h1 import RequestHead
from tiamat.workers.sync import STOP_GRACE, Connection, SyncWorker, request_body

log = logging.getLogger("tiamat.error")

_FOREVER = float("inf")
#: an answered request is taken back lazily only if it ran less than this (seconds); a longer
#: one wakes the loop, which then shows the worker idle at once: until it is taken back the
#: scoreboard shows it as the worker's current request, and a request that ran close to
#: --timeout must not be killed as stuck after its answer (a wake-up is nothing next to it)
LAZY_FOR = 0.05


def _batch_policy() -> None:
    """Put the calling thread under SCHED_BATCH: woken, it waits for the running thread to
    block or use up its time slice instead of preempting it (see the module docstring)."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))  # (0: this thread)
    except (AttributeError, OSError):  # not Linux, or refused (a sandbox): the normal policy
        pass


class _InFlight:
    """A request handed to the pool; the main thread looks at it only once it is done."""

    __slots__ = ("body", "close_after", "conn", "finished", "head", "keep_alive", "pending", "start",
                 "unwatched")

    def __init__(self, conn: Connection, head: RequestHead, body: BinaryIO,
                 pending: list[object], start: float) -> None:
        self.conn = conn
        self.head = head
        self.body = body
        self.pending = pending
        self.start = start
        self.keep_alive = False
        self.close_after = False
        #: the loop saw the connection readable while in the pool and stopped watching it
        self.unwatched = False
        #: set by the pool thread once the job is in ``done`` (never before)
        self.finished = False


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
        self.threads = [threading.Thread(target=self._pool_thread, name=f"tiamat-{i}", daemon=True)
                        for i in range(self.nthreads)]
        for thread in self.threads:
            thread.start()
        super().run()

    # --- accepting ----------------------------------------------------------------------
    def _set_accepting(self, on: bool) -> None:
        # (answered jobs not taken back yet hold no thread: see the lazy take-back)
        if on and (len(self.in_flight) - len(self.done) >= self.nthreads
                   or len(self.connections) >= self.worker_connections):
            return
        super()._set_accepting(on)

    def accept(self, listener: socket.socket) -> None:
        # Every thread busy: stop watching the listeners, lazily.  dispatch() does not do it
        # at once: under a keep-alive load the pool fills and drains all the time while no
        # new client comes, and each toggle cost an unregister and a register per listener.
        if len(self.in_flight) >= self.nthreads:
            self._collect()  # (answered requests not taken back yet free their threads)
        if len(self.in_flight) >= self.nthreads:
            self._set_accepting(False)
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

    def _pool_thread(self) -> None:
        _batch_policy()
        jobs, done, handler = self.jobs, self.done, None
        while True:
            job = jobs.get()
            if job is None:
                return
            if handler is None:
                handler = self.handler
            try:
                job.keep_alive = handler.handle(job.head, job.body, job.conn.environ, job.conn)[0]
            except BaseException:  # the handler already turns app errors into a 500
                log.exception("unexpected error in a pool thread")
                job.keep_alive = False
            finally:
                job.body.close()
            done.append(job)
            job.finished = True  # (after the append: a finished job is always in done)
            # An answered keep-alive connection, still watched, needs nothing from the loop
            # now: it is taken back when the client's next request makes it readable
            # (on_readable), or by the next sweep.  Waking the loop for it made the loop
            # preempt this thread for a pass over a job or two: ~12 % of the GIL's time
            # in the 10 ms sleep row.  Checked after ``finished`` is set: on_readable and
            # close() set their flag first and look at ``finished`` after.
            if (job.keep_alive and not (job.pending or job.unwatched or job.close_after)
                    and not job.head.upgrade and self.alive and self.accepting
                    and time.monotonic() - job.start < LAZY_FOR):
                continue
            # one wake-up byte per batch, not per request: the loop clears the flag before it
            # takes the finished jobs, so a job appended after that writes a new byte
            if not self.wake_pending:
                self.wake_pending = True
                try:
                    os.write(self._wake_w, b"\0")
                except (BlockingIOError, InterruptedError):
                    pass  # the pipe is full: the loop is going to wake up anyway

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
            return
        in_flight, board, now = self.in_flight, self.board, time.monotonic()
        while done:
            job = done.popleft()
            conn = job.conn
            in_flight.pop(conn, None)
            board.idle(now)
            if self.max_requests:
                self.count_request()
            if (not job.keep_alive or not self.alive or job.head.upgrade or job.close_after
                    or conn.closed):
                self.close(conn)
            else:
                conn.idle_since = now
                # (both cached by SyncWorker.run) a pipelined request read in part while a
                # pool thread had the connection has its head timed as in SyncWorker.feed
                conn.deadline = now + (self.header_timeout if conn.reader.in_message
                                       else self.keepalive_timeout)
                if job.unwatched:  # (registering reports bytes already waiting, edge or not)
                    self.selector.register(conn.sock, self.conn_read, conn)
                if job.pending:
                    conn.reader.events[:0] = job.pending
                    self.process(conn)
        self._update_board()
        # (not while accept() is paused after running out of descriptors: a request taken
        # back frees none, and watching the listener again would fail and log per request)
        if self.alive and not self.accepting and now >= self.accept_paused_until:
            self._set_accepting(True)

    def sweep(self, now: float) -> None:
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
