"""``-k sync``: WSGI, one request at a time per worker process.

The worker never blocks on a client that is slow to send: one ``selectors`` loop waits on
the listening sockets, the master channel, the signal wake-up pipe and every open
connection together; bytes are fed to the HTTP core as they arrive, and the app is called
only once a request is complete (head and body buffered, large bodies spooled to a
temporary file).  So one sync worker with 100 idle keep-alive connections, or with clients
trickling a header byte a second, still answers a new client at once.  Only the app call
and the response write are blocking, the write bounded by ``--send-timeout``.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import select
import selectors
import socket
import tempfile
import time
from typing import Any, BinaryIO

from tiamat.http import reader_factory
from tiamat.http.errors import ProtocolError
from tiamat.http.h1 import END_OF_MESSAGE, RequestHead, RequestReader
from tiamat.http.response import CONTINUE_100, error_response
from tiamat.workers.base import Worker
from tiamat.wsgi import ClientDisconnected, WSGIHandler

log = logging.getLogger("tiamat.error")

_LISTENER, _WAKE, _CHANNEL = object(), object(), object()
ACCEPT_BATCH = 32
RECV_SIZE = 65536
SWEEP_INTERVAL = 0.5


class Connection:
    """One client connection: its socket, its request reader and the request being read.

    It is also the handler's :class:`~tiamat.wsgi.Transport` (``write``/``sendfile``).
    """

    __slots__ = (
        "body",
        "body_size",
        "closed",
        "deadline",
        "environ",
        "head",
        "idle_since",
        "reader",
        "send_timeout",
        "sock",
    )

    def __init__(self, sock: socket.socket, reader: RequestReader, environ: dict[str, Any],
                 now: float, send_timeout: float) -> None:
        self.sock = sock
        self.reader = reader
        self.environ = environ
        self.head: RequestHead | None = None
        self.body: BinaryIO | None = None
        self.body_size = 0
        self.deadline = 0.0
        self.idle_since = now
        self.send_timeout = send_timeout
        self.closed = False

    def write(self, data: bytes) -> None:
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            raise ClientDisconnected(str(exc)) from None
        if sent < len(data):
            self._write_slowly(memoryview(data)[sent:])

    def _write_slowly(self, view: memoryview) -> None:
        poller = select.poll()
        poller.register(self.sock, select.POLLOUT)
        deadline = time.monotonic() + self.send_timeout
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                raise ClientDisconnected("send timeout: the client stopped reading")
            try:
                sent = self.sock.send(view)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                raise ClientDisconnected(str(exc)) from None
            view = view[sent:]

    def sendfile(self, file: BinaryIO, offset: int, count: int | None) -> int:
        total = 0
        remaining = count if count is not None else os.fstat(file.fileno()).st_size - offset
        poller = select.poll()
        poller.register(self.sock, select.POLLOUT)
        while remaining > 0:
            try:
                sent = os.sendfile(self.sock.fileno(), file.fileno(), offset, min(remaining, 1 << 30))
            except (BlockingIOError, InterruptedError):
                if not poller.poll(self.send_timeout * 1000):
                    raise ClientDisconnected("send timeout: the client stopped reading") from None
                continue
            except OSError as exc:
                raise ClientDisconnected(str(exc)) from None
            if sent == 0:
                break
            offset += sent
            total += sent
            remaining -= sent
        return total


class SyncWorker(Worker):
    """One request at a time, with every connection multiplexed while waiting for one."""

    interface = "wsgi"
    multithread = False

    def run(self) -> None:
        cfg = self.cfg
        self.handler = WSGIHandler(self.app, cfg, multithread=self.multithread)
        self.new_reader = reader_factory(cfg)
        self.selector = selectors.DefaultSelector()
        self.connections: dict[int, Connection] = {}
        self.accepting = False
        self.sockname = {sock.fileno(): sock.getsockname() for sock in self.listeners}
        for sock in self.listeners:
            sock.setblocking(False)
        self._set_accepting(True)
        self.selector.register(self.wake_fd, selectors.EVENT_READ, _WAKE)
        self.selector.register(self.channel.sock, selectors.EVENT_READ, _CHANNEL)
        self.notify_ready()
        self.loop()
        self.shutdown()

    in_request = False

    def _on_graceful(self, signum: int, frame: Any) -> None:
        super()._on_graceful(signum, frame)
        if self.in_request:
            # the loop cannot run until the app returns: give up the listening sockets now,
            # so new clients are refused at once instead of waiting in the backlog for a
            # worker that will never accept them (the handler interrupted the app, never
            # the selector code, so changing the selector here is safe)
            self._release_listeners()

    def _release_listeners(self) -> None:
        self._set_accepting(False)
        for sock in self.listeners:
            sock.close()

    def _set_accepting(self, on: bool) -> None:
        if on == self.accepting:
            return
        for sock in self.listeners:
            if on:
                self.selector.register(sock, selectors.EVENT_READ, _LISTENER)
            else:
                self.selector.unregister(sock)
        self.accepting = on

    def loop(self) -> None:
        select_ = self.selector.select
        next_sweep = 0.0
        while self.alive:
            for key, _ in select_(SWEEP_INTERVAL):
                data = key.data
                if data.__class__ is Connection:
                    self.on_readable(data)
                elif data is _LISTENER:
                    self.accept(key.fileobj)  # type: ignore[arg-type]
                elif data is _WAKE:
                    self.handle_wakeup()
                elif data is _CHANNEL:
                    self.handle_channel()
                if not self.alive:
                    break
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + SWEEP_INTERVAL
                self.beat(now)
                self.sweep(now)

    def accept(self, listener: socket.socket) -> None:
        cfg = self.cfg
        now = time.monotonic()
        for _ in range(ACCEPT_BATCH):
            if len(self.connections) >= cfg.worker_connections:
                self._set_accepting(False)
                return
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.error("accept failed: %s", exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            environ = self.handler.connection_environ(
                peer, self.sockname[listener.fileno()], "http")
            conn = Connection(sock, self.new_reader(), environ, now, cfg.send_timeout)
            conn.deadline = now + (cfg.header_timeout or 1e9)
            self.connections[sock.fileno()] = conn
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def on_readable(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        reader = conn.reader
        if not data:
            reader.feed_eof()
            if reader.events:
                self.process(conn)
            self.close(conn)
            return
        was_idle = not reader.in_message
        reader.feed(data)
        if reader.events:
            self.process(conn)
        elif was_idle and not conn.closed:
            # the first bytes of a new request: the head must now arrive in time
            conn.deadline = conn.idle_since + (self.cfg.header_timeout or 1e9)

    def process(self, conn: Connection) -> None:
        """Handle every event the reader has produced, in order (pipelined requests too)."""
        events = conn.reader.events
        while events and not conn.closed:
            event = events.pop(0)
            if event.__class__ is bytes:
                self.add_body(conn, event)  # type: ignore[arg-type]
            elif event is END_OF_MESSAGE:
                self.dispatch(conn)
            elif event.__class__ is RequestHead:
                self.start_request(conn, event)  # type: ignore[arg-type]
            elif isinstance(event, ProtocolError):
                self.reject(conn, event)

    def start_request(self, conn: Connection, head: RequestHead) -> None:
        conn.head = head
        conn.body = None
        conn.body_size = 0
        if head.has_body:
            conn.deadline = time.monotonic() + (self.cfg.body_timeout or 1e9)
            if head.expect_continue and head.version == "1.1":
                try:
                    conn.write(CONTINUE_100)
                except ClientDisconnected:
                    self.close(conn)

    def add_body(self, conn: Connection, data: bytes) -> None:
        body = conn.body
        if body is None:
            body = conn.body = io.BytesIO()
        conn.body_size += len(data)
        if conn.body_size > self.cfg.body_buffer_size and isinstance(body, io.BytesIO):
            spooled: BinaryIO = tempfile.TemporaryFile()  # noqa: SIM115 - closed after the request
            spooled.write(body.getbuffer())
            conn.body = body = spooled
        body.write(data)
        conn.deadline = time.monotonic() + (self.cfg.body_timeout or 1e9)

    def dispatch(self, conn: Connection) -> None:
        """Call the app for the complete request on ``conn`` and write its response."""
        head = conn.head
        assert head is not None
        body = conn.body
        if body is None:
            body = io.BytesIO()
        else:
            body.seek(0)
        conn.head = conn.body = None
        board = self.board
        board.busy(time.monotonic(), head.method, head.path)
        self.in_request = True
        try:
            keep_alive, _, _ = self.handler.handle(head, body, conn.environ, conn)
        finally:
            self.in_request = False
            body.close()
            now = time.monotonic()
            board.idle(now)
        self.count_request()
        if not keep_alive or not self.alive or head.upgrade:
            self.close(conn)
            return
        conn.idle_since = now
        conn.deadline = now + self.cfg.keepalive

    def reject(self, conn: Connection, error: ProtocolError) -> None:
        log.debug("rejected request: %s %s", error.status, error.reason)
        try:
            conn.write(error_response(error.status, error.reason))
        except ClientDisconnected:
            pass
        self.close(conn, linger=True)

    def sweep(self, now: float) -> None:
        """Close connections whose deadline passed: idle keep-alive, slow heads or bodies."""
        expired = [c for c in self.connections.values() if c.deadline <= now]
        for conn in expired:
            if conn.reader.in_message:
                self.reject(conn, ProtocolError(408, "request timed out"))
            else:
                self.close(conn)

    def close(self, conn: Connection, linger: bool = False) -> None:
        if conn.closed:
            return
        conn.closed = True
        sock = conn.sock
        self.connections.pop(sock.fileno(), None)
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        if linger:
            # let the error response reach the client before the close resets the connection
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        sock.close()
        if conn.body is not None:
            conn.body.close()
        if not self.accepting and self.alive and len(self.connections) < self.cfg.worker_connections:
            self._set_accepting(True)

    def shutdown(self) -> None:
        """Stop accepting and close every connection (in-flight requests are already done)."""
        self.board.stopping(time.monotonic())
        self._release_listeners()
        for conn in list(self.connections.values()):
            self.close(conn)
        self.selector.close()
