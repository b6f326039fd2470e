"""``-k sync``: WSGI, one request at a time per worker process.

The worker never blocks on a client that is slow to send: one epoll loop waits on
the listening sockets, the master channel, the signal wake-up pipe and every open
connection together; bytes are fed to the HTTP core as they arrive, and the app is called
only once a request is complete (head and body buffered, large bodies spooled to a
temporary file).  So one sync worker with 100 idle keep-alive connections, or with clients
trickling a header byte a second, still answers a new client at once.  Only the app call
and the response write are blocking, the write bounded by ``--send-timeout``.

Also in the loop, never blocking it: the PROXY protocol header (peeked, then consumed
exactly), the TLS handshake (non-blocking, bounded by ``--header-timeout``), and the
lingering close after an error response (stop writing, drain what the client still sends
for a short bounded time, then close, so the response is not lost to a reset).
"""

from __future__ import annotations

import io
import logging
import os
import select
import socket
import time
from typing import Any, BinaryIO

from tiamat import accesslog
from tiamat.http import proxy_protocol, reader_factory
from tiamat.http.errors import LINGER_BYTES, LINGER_SECONDS, ProtocolError
from tiamat.http.h1 import END_OF_MESSAGE, RequestHead, RequestReader, may_end_after
from tiamat.http.proxy import TRUSTED_KEY, ForwardedRules
from tiamat.http.response import CONTINUE_100, error_response
from tiamat.sockets import ACCEPT_BATCH, ACCEPT_RETRY, AcceptPaused, accept_next
from tiamat.workers.balance import DEFER_CHECK, AcceptBalance
from tiamat.workers.base import STOP_GRACE, Worker
from tiamat.workers.poller import EDGE, HANGUP, READ, WRITE, Poller
from tiamat.wsgi import NO_BODY, ClientDisconnected, WSGIHandler

log = logging.getLogger("tiamat.error")

_LISTENER, _WAKE, _CHANNEL = object(), object(), object()
RECV_SIZE = 65536
#: while a request body arrives: fewer, larger reads (a 1 MiB upload: about 25 % less CPU);
#: not for heads, where every read would allocate the larger buffer for a few hundred bytes
BODY_RECV_SIZE = 262144
SWEEP_INTERVAL = 0.5
#: a read or write that must wait; with TLS on, _tls_context adds ssl's want-read/write errors
_WOULD_BLOCK: tuple[type[BaseException], ...] = (BlockingIOError, InterruptedError)


def _tls_context(cfg: Any) -> Any:
    """The worker's TLS context, or None without --certfile.  ssl and tiamat.tls are imported
    only then: for a plain server they cost ~6 ms of every start and a private OpenSSL per
    process."""
    if not getattr(cfg, "certfile", None):  # tiamat.tls.enabled()
        return None
    global _WOULD_BLOCK
    import ssl

    from tiamat import tls

    _WOULD_BLOCK = (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
    return tls.server_context(cfg)
_READ, _READ_WRITE = READ, READ | WRITE


class _Chunks(list):  # type: ignore[type-arg]
    """A request body still in memory, as the chunks received, joined once for the app.

    Growing a BytesIO (or a bytearray) chunk by chunk re-copies it over and over: a 1 MiB
    upload in 64 KiB chunks took about 1.1 ms that way, against 0.03 ms for one join.
    """

    __slots__ = ()
    write = list.append

    def close(self) -> None:
        self.clear()


def request_body(body: Any) -> BinaryIO:
    """The body of a complete request as the app reads it: a file at its start."""
    if body is None:
        return NO_BODY  # type: ignore[no-any-return]
    if body.__class__ is _Chunks:
        return io.BytesIO(b"".join(body))  # BytesIO shares the joined bytes: no second copy
    body.seek(0)
    return body  # type: ignore[no-any-return]


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
        "fd",
        "hand_on",
        "handshaking",
        "head",
        "idle_since",
        "linger_budget",
        "lingering",
        "proxy_buf",
        "proxy_pending",
        "reader",
        "send_timeout",
        "setup",
        "sock",
        "tls",
    )

    def __init__(self, sock: socket.socket, reader: RequestReader, environ: dict[str, Any],
                 now: float, send_timeout: float) -> None:
        self.sock = sock
        #: for os.read/os.write on a plain connection: their argument parsing costs less than
        #: socket.recv/send's (about 1k instructions per request); TLS goes through ``sock``
        self.fd = sock.fileno()
        self.reader = reader
        self.environ = environ
        self.head: RequestHead | None = None
        self.body: BinaryIO | None = None
        self.body_size = 0
        self.deadline = 0.0
        self.idle_since = now
        self.send_timeout = send_timeout
        #: close after the next response (Connection: close): the worker hands it on
        self.hand_on = False
        self.closed = False
        #: True while a PROXY header or the TLS handshake is still to come (the slow path)
        self.setup = False
        self.proxy_pending = False
        self.proxy_buf = b""
        self.tls = False
        self.handshaking = False
        #: after an error response: draining the client before the close
        self.lingering = False
        self.linger_budget = 0

    def write(self, data: bytes) -> None:
        try:
            sent = self.sock.send(data) if self.tls else os.write(self.fd, data)
        except _WOULD_BLOCK:
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
                sent = self.sock.send(view) if self.tls else os.write(self.fd, view)
            except _WOULD_BLOCK:
                continue
            except OSError as exc:
                raise ClientDisconnected(str(exc)) from None
            view = view[sent:]

    def sendfile(self, file: BinaryIO, offset: int, count: int | None) -> int:
        remaining = count if count is not None else os.fstat(file.fileno()).st_size - offset
        if self.tls:
            return self._copy_file(file, offset, remaining)
        total = 0
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

    def _copy_file(self, file: BinaryIO, offset: int, remaining: int) -> int:
        """sendfile for TLS: the kernel cannot encrypt, so read and write in blocks."""
        file.seek(offset)
        total = 0
        while remaining > 0:
            data = file.read(min(remaining, 65536))
            if not data:
                break
            self.write(data)
            total += len(data)
            remaining -= len(data)
        return total


class SyncWorker(Worker):
    """One request at a time, with every connection multiplexed while waiting for one."""

    interface = "wsgi"
    multithread = False

    def init_app(self) -> None:
        """Build the TLS context once per worker, at boot (a bad certificate is a boot error)."""
        super().init_app()
        self.ssl_context = _tls_context(self.cfg)

    def run(self) -> None:
        cfg = self.cfg
        self.handler = WSGIHandler(self.app, cfg, multithread=self.multithread)
        #: access log + metrics for the error responses reject() writes (None: both off)
        self.refusals = accesslog.refusals(self.handler.access, self.handler.recorder)
        self.new_reader = reader_factory(cfg)
        # per-request and per-chunk copies of settings: reading a Config attribute goes
        # through __getattr__ after a failed lookup (about 1 us each, measured in the profile)
        self.keepalive_timeout = cfg.keepalive
        self.body_timeout = cfg.body_timeout or 1e9
        self.header_timeout = cfg.header_timeout or 1e9
        self.body_buffer_size = cfg.body_buffer_size
        self.worker_connections = cfg.worker_connections
        # 0 means no limit, as for the other timeouts (it failed every write that had to wait);
        # 1e6 s, not 1e9: poll() takes the timeout in ms as a C int
        self.send_timeout = cfg.send_timeout or 1e6
        #: with sibling workers: the accept-balancing rule (see accept())
        self.balance = AcceptBalance.for_worker(cfg, self.board, self.listeners)
        if not hasattr(self, "ssl_context"):
            self.ssl_context = _tls_context(cfg)
        self.scheme = "https" if self.ssl_context is not None else "http"
        # Plain connections are watched edge-triggered.  Level-triggered, epoll puts every
        # connection it reports straight back on its ready list (it is still readable: the
        # loop has not read it yet), so a request arriving just after a loop pass began
        # queued behind all of them and was served last in the next pass, after waiting
        # through two: under a keep-alive load of 64 connections, a p99 of two passes (1.6
        # against granian's 1.2 ms; edge-triggered 1.0-1.3 ms, at the same req/s).  The
        # price: a read that fills its buffer may leave bytes no event will report, so such
        # a connection is read again in the next pass (readable_again).  TLS connections
        # stay level-triggered: OpenSSL may hold decrypted bytes the socket no longer shows.
        self.edge = self.ssl_context is None
        self.conn_read = READ | EDGE if self.edge else READ
        #: plain connections whose last read filled its buffer: read again next pass
        self.readable_again: list[Connection] = []
        self.forwarded = self.handler.forwarded  # the handler's: parsed once per worker
        self.proxy_mode = cfg.proxy_protocol
        self.proxy_peers = ForwardedRules(cfg.proxy_allow_ips) if self.proxy_mode != "off" else None
        self.selector = Poller()
        self.connections: dict[int, Connection] = {}
        self.accepting = False
        self.sockname = {sock.fileno(): sock.getsockname() for sock in self.listeners}
        self.listener_of = {sock.fileno(): sock for sock in self.listeners}
        for sock in self.listeners:
            sock.setblocking(False)
        self._set_accepting(True)
        self.selector.register(self.wake_fd, READ, _WAKE)
        self.selector.register(self.channel.sock, READ, _CHANNEL)
        self.notify_ready()
        self.loop()
        self.shutdown()

    in_request = False
    #: after accept() ran out of descriptors or memory: when to watch the listeners again
    accept_paused_until = 0.0
    #: the pause above ends sooner when a connection closes (it was out of descriptors)
    accept_pause_frees = True
    balance: AcceptBalance | None = None
    #: leaving new connections to a less-loaded sibling for now (see accept())
    deferred = False
    #: the listeners are in the poller (accepting and not deferred)
    watching = False
    #: the listening sockets are closed (stopping): see _release_listeners
    listeners_released = False
    #: the loop's poll timeout: short while deferred, to look at the siblings again soon
    poll_timeout = SWEEP_INTERVAL

    def _on_graceful(self, signum: int, frame: Any) -> None:
        super()._on_graceful(signum, frame)
        if self.in_request:
            # the loop cannot run until the app returns: give up the listening sockets now,
            # so new clients are refused at once instead of waiting in the backlog for a
            # worker that will never accept them (the handler interrupted the app, never
            # the selector code, so changing the selector here is safe)
            self._release_listeners()

    def _release_listeners(self) -> None:
        # (once: the stop signal's handler may run it while dispatch or shutdown does)
        if self.listeners_released:
            return
        self.listeners_released = True
        self._set_accepting(False)
        self.deferred = False  # (a deferral of accepts ends with the accepting)
        self.poll_timeout = SWEEP_INTERVAL
        for sock in self.listeners:
            sock.close()

    def _set_accepting(self, on: bool) -> None:
        """Watch the listeners (as far as a deferral allows) or not; never past
        --worker-connections: a connection closing turns it on again (_close_now)."""
        if on == self.accepting or (on and len(self.connections) >= self.worker_connections):
            return
        self.accepting = on
        self._watch_listeners(on and not self.deferred)
        if self.balance is not None:  # (siblings leave connections only to accepting workers)
            self.board.held(len(self.connections), on)

    def _watch_listeners(self, on: bool) -> None:
        if on == self.watching:
            return
        for sock in self.listeners:
            if on:
                self.selector.register(sock, READ, _LISTENER)
            else:
                self.selector.unregister(sock)
        self.watching = on

    def loop(self) -> None:
        poll = self.selector.poll
        data_of = self.selector.data.get
        next_sweep = 0.0
        while self.alive:
            for fd, ev in poll(0.0 if self.readable_again else self.poll_timeout):
                data = data_of(fd)  # (None: closed by an event before it in this batch)
                if data.__class__ is Connection:
                    # (on_event inlined: the call cost 0.9k instructions per request, measured)
                    self.on_readable(data)
                    if ev & HANGUP and not data.closed:
                        self.readable_again.append(data)
                elif data is _LISTENER:
                    self.accept(self.listener_of[fd])
                elif data is _WAKE:
                    self.handle_wakeup()
                elif data is _CHANNEL:
                    self.handle_channel()
                if not self.alive:
                    break
            if self.readable_again and self.alive:  # (stopping: shutdown reads them, or not)
                self._read_again()
            now = time.monotonic()
            if self.deferred:
                self._review_deferral(now)
            if now >= next_sweep:
                next_sweep = now + SWEEP_INTERVAL
                self.beat(now)
                self.sweep(now)
                if self.balance is not None:
                    self.balance.siblings.refresh()
                    self._rebalance(now)
                if self.accept_paused_until and now >= self.accept_paused_until and self.alive:
                    self.accept_paused_until = 0.0
                    self._set_accepting(True)

    def accept(self, listener: socket.socket) -> None:
        now = time.monotonic()
        # Several workers share the listening socket and every idle one is woken for a new
        # connection; the first to get the CPU would take a whole burst (wrk's 64 keep-alive
        # connections split 55/9, and later 52/12 with a yield after each accept).  So with
        # siblings, a worker holding more connections than the least-loaded live sibling
        # + SLACK leaves the next one to it: it stops watching the listeners for a few ms at
        # most (tiamat.workers.balance has the rule and its bounds; docs/benchmarks.md,
        # "Even load").
        balance = self.balance
        for _ in range(ACCEPT_BATCH):
            if len(self.connections) >= self.worker_connections:
                self._set_accepting(False)
                return
            if balance is not None and balance.over(len(self.connections), now):
                self._defer(now)
                return
            try:
                got = accept_next(listener)
            except AcceptPaused as paused:
                self._set_accepting(False)
                self.accept_paused_until = now + ACCEPT_RETRY
                # (out of descriptors, a connection closing here resumes it sooner: _close_now)
                self.accept_pause_frees = paused.frees_on_close
                return
            if got is None:
                return
            sock, peer = got
            sock.setblocking(False)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            environ = self.handler.connection_environ(
                peer, self.sockname[listener.fileno()], self.scheme)
            conn = Connection(sock, self.new_reader(), environ, now, self.send_timeout)
            conn.deadline = now + self.header_timeout
            peer_addr = peer[0] if isinstance(peer, tuple) else None
            if self.proxy_peers is not None and self.proxy_peers.trusts(peer_addr):
                conn.setup = conn.proxy_pending = True
            else:
                self._trust(conn, peer_addr)
            self.connections[sock.fileno()] = conn
            if self.ssl_context is not None and not conn.proxy_pending:
                self._start_tls(conn)
            self.selector.register(conn.sock, self.conn_read, conn)
            if balance is not None:
                self.board.held(len(self.connections), True)

    # --- handing keep-alive connections on to less busy siblings (-w > 1) ------------
    def _rebalance(self, now: float) -> None:
        """Once a tick with siblings: when this worker is clearly busier than its siblings,
        mark a few active keep-alive connections to close after their next response, so
        their clients reconnect to one (balance.AcceptBalance.hand_on has the rule)."""
        assert self.balance is not None
        self.balance.hand_on(now, self.connections.values(), self._may_hand_on, self._may_unmark)

    def _leaving(self, conn: Connection) -> bool:
        """Whether the server itself ends ``conn``: handed on to a sibling, or stopping.
        Its close lingers, so that bytes the client sent meanwhile do not turn it into a
        reset that could destroy the response."""
        return conn.hand_on or not self.alive

    def _end_if_leaving(self, conn: Connection, head: RequestHead) -> None:
        """Before a request on a connection the server ends (:meth:`_leaving`): its response
        says Connection: close, unless a further request has begun to arrive
        (h1.may_end_after), which is answered first."""
        if self._leaving(conn) and may_end_after(conn.reader):
            head.keep_alive = False

    def _may_hand_on(self, conn: Connection, since: float) -> bool:
        return self._active(conn, since) and not (conn.hand_on or conn.lingering or conn.setup)

    def _active(self, conn: Connection, since: float) -> bool:
        """Whether ``conn`` carried a request lately (its last one was answered since then)."""
        return conn.idle_since >= since

    def _may_unmark(self, conn: Connection) -> bool:
        """Whether a hand-on mark may be taken back now (its request is not being answered)."""
        return True

    # --- leaving connections to a less-loaded sibling (-w > 1) ---------------------------
    def _defer(self, now: float) -> None:
        assert self.balance is not None
        self.balance.begin(now)
        self.deferred = True
        self.poll_timeout = DEFER_CHECK
        self._watch_listeners(False)

    def _review_deferral(self, now: float) -> None:
        assert self.balance is not None
        if self.balance.review(len(self.connections), now):
            self._undefer()

    def _undefer(self) -> None:
        self.deferred = False
        self.poll_timeout = SWEEP_INTERVAL
        self._watch_listeners(self.accepting)

    def _trust(self, conn: Connection, client_addr: str | None) -> None:
        """Decide once per connection whether its forwarding headers count."""
        if self.forwarded.trusts(client_addr):
            conn.environ[TRUSTED_KEY] = True
        else:
            conn.environ.pop(TRUSTED_KEY, None)

    def _start_tls(self, conn: Connection) -> None:
        """Wrap the (unregistered) socket; the handshake then runs in the loop."""
        assert self.ssl_context is not None
        conn.sock = self.ssl_context.wrap_socket(conn.sock, server_side=True,
                                                 do_handshake_on_connect=False)
        conn.tls = conn.handshaking = conn.setup = True

    def on_readable(self, conn: Connection) -> None:
        if conn.setup and not self._setup(conn):
            return
        if conn.lingering:
            self._drain(conn)
            return
        try:
            size = RECV_SIZE if conn.head is None else BODY_RECV_SIZE
            data = conn.sock.recv(size) if conn.tls else os.read(conn.fd, size)
        except _WOULD_BLOCK:
            return
        except OSError:
            self.close(conn)
            return
        if conn.tls and data:
            data = self._recv_pending(conn, data)
        reader = conn.reader
        if not data:
            reader.feed_eof()
            if reader.events:
                self.process(conn)
            self.close(conn)
            return
        self.feed(conn, data)
        if len(data) == size and self.edge:  # more may wait, unreported (see conn_read)
            self.readable_again.append(conn)

    def _recv_pending(self, conn: Connection, data: bytes) -> bytes:
        """Add the bytes OpenSSL already decrypted and buffered: the selector cannot see them."""
        sock = conn.sock
        try:
            while sock.pending():  # type: ignore[attr-defined]
                more = sock.recv(RECV_SIZE)
                if not more:
                    break
                data += more
        except (OSError, ValueError):
            pass  # what was read is kept; an error shows again on the next read
        return data

    def feed(self, conn: Connection, data: bytes) -> None:
        reader = conn.reader
        reader.feed(data)
        events = reader.events
        if events:
            if len(events) == 2 and events[1] is END_OF_MESSAGE and conn.head is None:
                # the common case, a whole request without a body: straight to the app.  This
                # is h1.whole_request inlined (the call cost 0.7k instructions per request,
                # measured); conn.head None stands for its RequestHead test (after a head
                # read earlier, the first event would be body bytes)
                conn.head = events[0]  # type: ignore[assignment]
                events.clear()
                self.dispatch(conn)
            else:
                self.process(conn)
        if not conn.closed and conn.head is None and reader.in_message and self._watched(conn):
            # a head has started (on an idle connection, or pipelined after the request just
            # answered): it must be complete within --header-timeout of the connection going
            # idle (unless the connection was handed off, as the thread worker does, and is
            # not watched).  Setting it again for each piece of a trickled head is harmless:
            # idle_since does not move until the request is answered.
            conn.deadline = conn.idle_since + self.header_timeout

    # --- connection set-up: PROXY header, TLS handshake (never blocking the loop) --------
    def _setup(self, conn: Connection) -> bool:
        """Advance the PROXY header / TLS handshake; True once the connection carries HTTP."""
        if conn.lingering:
            return True
        if conn.proxy_pending and not self._read_proxy_header(conn):
            return False
        if conn.handshaking and not self._handshake(conn):
            return False
        conn.setup = False
        if conn.proxy_buf:  # bytes consumed while looking for a header that was not there
            data, conn.proxy_buf = conn.proxy_buf, b""
            self.feed(conn, data)
            return not conn.closed
        return True

    def _read_proxy_header(self, conn: Connection) -> bool:
        sock = conn.sock
        try:
            peeked = sock.recv(proxy_protocol.V2_MAX, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            self.close(conn)
            return False
        if not peeked:
            self.close(conn)
            return False
        data = conn.proxy_buf + peeked
        try:
            header = proxy_protocol.parse(data, self.proxy_mode)
        except proxy_protocol.ProxyProtocolError as exc:
            log.debug("closing %s: %s", conn.environ.get("REMOTE_ADDR"), exc)
            self.close(conn)
            return False
        if header is None:
            # everything seen so far belongs to the header: take it off the socket, so the
            # level-triggered selector does not wake us again for the same bytes
            self._consume(conn, len(peeked))
            conn.proxy_buf = data
            return False
        self._consume(conn, max(0, header.length - len(conn.proxy_buf)))
        conn.proxy_buf = data[header.length:len(conn.proxy_buf)] if header.length < len(conn.proxy_buf) \
            else b""
        conn.proxy_pending = False
        environ = conn.environ
        if header.source is not None:
            environ["REMOTE_ADDR"], port = header.source
            environ["REMOTE_PORT"] = str(port)
        if header.destination is not None:
            environ["SERVER_NAME"], port = header.destination
            environ["SERVER_PORT"] = str(port)
        if header.source is not None:
            self._trust(conn, header.source[0])
        else:  # LOCAL / UNKNOWN: the proxy itself is the client
            try:
                peer = sock.getpeername()
            except OSError:
                peer = None
            self._trust(conn, peer[0] if isinstance(peer, tuple) else None)
        if self.ssl_context is not None:
            if conn.proxy_buf:  # a TLS client cannot start with PROXY-looking bytes
                self.close(conn)
                return False
            self.selector.unregister(sock)
            self._start_tls(conn)
            self.selector.register(conn.sock, READ, conn)
        return True

    def _consume(self, conn: Connection, count: int) -> None:
        while count > 0:
            try:
                got = conn.sock.recv(count)
            except OSError:
                return  # (not for peeked bytes) a reset shows again on the next read
            if not got:
                return
            count -= len(got)

    def _handshake(self, conn: Connection) -> bool:
        import ssl  # loaded by _tls_context: only a dict lookup

        try:
            conn.sock.do_handshake()  # type: ignore[attr-defined]
        except ssl.SSLWantReadError:
            self._watch(conn, _READ)
            return False
        except ssl.SSLWantWriteError:
            self._watch(conn, _READ_WRITE)
            return False
        except OSError as exc:
            log.debug("TLS handshake with %s failed: %s", conn.environ.get("REMOTE_ADDR"), exc)
            self.close(conn)
            return False
        conn.handshaking = False
        self._watch(conn, _READ)
        return True

    def _watched(self, conn: Connection) -> bool:
        return conn.sock.fileno() in self.selector.data

    def _watch(self, conn: Connection, events: int) -> None:
        try:
            self.selector.modify(conn.sock, events, conn)
        except (KeyError, ValueError):
            pass

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
            conn.deadline = time.monotonic() + self.body_timeout
            if head.expect_continue:  # (HTTP/1.1 only: the core's rule)
                try:
                    conn.write(CONTINUE_100)
                except ClientDisconnected:
                    self.close(conn)

    def add_body(self, conn: Connection, data: bytes) -> None:
        body = conn.body
        if body is None:
            body = conn.body = _Chunks()  # type: ignore[assignment]
        conn.body_size += len(data)
        if conn.body_size > self.body_buffer_size and body.__class__ is _Chunks:
            import tempfile  # here: only large bodies need it (a few ms of every start)

            spooled: BinaryIO = tempfile.TemporaryFile()  # noqa: SIM115 - closed after the request
            spooled.writelines(body)  # type: ignore[arg-type]
            conn.body = body = spooled
        body.write(data)
        conn.deadline = time.monotonic() + self.body_timeout

    def dispatch(self, conn: Connection) -> None:
        """Call the app for the complete request on ``conn`` and write its response."""
        head = conn.head
        assert head is not None
        body = NO_BODY if conn.body is None else request_body(conn.body)
        conn.head = conn.body = None
        board = self.board
        board.busy(time.monotonic(), head.method, head.path)
        self.in_request = True  # (before the test below: see _on_graceful)
        if conn.hand_on or not self.alive:  # (rare: one test of two flags per request)
            if not self.alive:
                # a stop signalled since the loop last looked found no request running, so
                # its handler left the listeners to the loop, which is busy with this one
                self._release_listeners()
            self._end_if_leaving(conn, head)
        try:
            keep_alive = self.handler.handle(head, body, conn.environ, conn)[0]
        finally:
            self.in_request = False
            if body is not NO_BODY:
                body.close()
            now = time.monotonic()
            board.idle(now)
        if self.max_requests:
            self.count_request()
        if not keep_alive or head.upgrade:
            self.close(conn, linger=self._leaving(conn))
            return
        # (a stop that came while the app ran leaves the connection to shutdown: its
        # response promised keep-alive, so a request the client sent after it is read and
        # answered, and an idle connection closed after STOP_GRACE at most)
        conn.idle_since = now
        conn.deadline = now + self.keepalive_timeout

    def reject(self, conn: Connection, error: ProtocolError) -> None:
        log.debug("rejected request: %s %s", error.status, error.reason)
        response = error_response(error.status, error.reason)
        try:
            # one non-blocking send: an error response is small, and a client whose window
            # is shut must not hold the worker for --send-timeout
            conn.sock.send(response)
        except (*_WOULD_BLOCK, OSError):
            pass
        if self.refusals is not None:  # the one place this class writes its own response
            self.refusals(error.status, response, conn.environ.get("REMOTE_ADDR"), conn.head)
        self.close(conn, linger=True)

    def sweep(self, now: float) -> None:
        """Close connections whose deadline passed: idle keep-alive, slow heads or bodies."""
        expired = [c for c in self.connections.values() if c.deadline <= now]
        for conn in expired:
            if conn.reader.in_message and not conn.lingering and not conn.setup:
                self.reject(conn, ProtocolError(408, "request timed out"))
            else:
                self._close_now(conn)

    def close(self, conn: Connection, linger: bool = False) -> None:
        """Close ``conn``; with ``linger``, after draining it for a short bounded time.

        Closing a socket that still has unread bytes makes the kernel send a reset, and the
        client may then lose the error response it was just sent.  So after an error the
        worker stops writing (``shutdown(SHUT_WR)``: the client sees the end of the
        response), keeps reading and discarding for up to LINGER_SECONDS / LINGER_BYTES in
        its loop, and closes when the client closes or the time is up.
        """
        if conn.closed or conn.lingering:
            return
        if not linger or self.quick:
            self._close_now(conn)
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close_now(conn)
            return
        conn.lingering = True
        conn.setup = False
        conn.linger_budget = LINGER_BYTES
        conn.deadline = time.monotonic() + LINGER_SECONDS
        if conn.body is not None:
            conn.body.close()
            conn.body = None
        try:
            self.selector.modify(conn.sock, self.conn_read, conn)
        except (KeyError, ValueError):
            self._close_now(conn)

    def _drain(self, conn: Connection) -> None:
        sock = conn.sock
        for _ in range(16):
            try:
                data = sock.recv(RECV_SIZE)
            except _WOULD_BLOCK:
                return
            except OSError:
                break
            if not data:
                break
            conn.linger_budget -= len(data)
            if conn.linger_budget <= 0:
                break
        else:
            if self.edge:  # nothing may report what is left
                self.readable_again.append(conn)
            return
        self._close_now(conn)

    def _close_now(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        sock = conn.sock
        self.connections.pop(sock.fileno(), None)
        try:
            self.selector.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
        if conn.body is not None:
            conn.body.close()
        if (not self.accepting and self.alive
                and (self.accept_pause_frees or time.monotonic() >= self.accept_paused_until)):
            self._set_accepting(True)
        if self.balance is not None:
            self.board.held(len(self.connections), self.accepting)
            if self.deferred:  # one fewer: look at the siblings again when the next comes
                self.balance.pause()
                self._undefer()

    def on_event(self, conn: Connection, ev: int) -> None:
        """A connection reported by the poller (the stopping loop; the serving loop has it
        inlined)."""
        self.on_readable(conn)
        if ev & HANGUP and not conn.closed:
            # the client closed, with (or after) bytes one read took: read once more for
            # the end, reported no more (edge-triggered).  A request and a half-close in one
            # go would otherwise wait for the keep-alive timeout to see their connection closed
            self.readable_again.append(conn)

    def _read_again(self) -> None:
        """Read the connections put on readable_again: no event will report their bytes."""
        again, self.readable_again = self.readable_again, []
        for conn in again:
            if not conn.closed:
                self.on_readable(conn)

    def read_unreported(self) -> None:
        """As a stop begins: read every plain connection once.  Edge-triggered (see
        conn_read), bytes whose report the loop's last pass left unhandled when it stopped,
        or that a full read left behind, would never be reported again: the request would
        look unsent and its connection be closed as idle (a reset for a client that did
        nothing wrong).  An empty socket costs one EAGAIN."""
        self.readable_again.clear()
        for conn in list(self.connections.values()):
            if not conn.closed and self.edge:
                self.on_readable(conn)

    def _serve_stopping(self, timeout: float) -> None:
        """One pass of the loop while stopping: connections, wake-ups and the channel, no
        listeners (shared by this class's and the thread worker's shutdown)."""
        if self.readable_again:
            self._read_again()
            timeout = 0.0
        data_of = self.selector.data.get
        for fd, ev in self.selector.poll(timeout):
            data = data_of(fd)
            if data.__class__ is Connection:
                self.on_event(data, ev)
            elif data is _WAKE:
                self.handle_wakeup()
            elif data is _CHANNEL:
                self.handle_channel()

    def shutdown(self) -> None:
        """Stop accepting, answer the requests already on their way, close every connection.

        A connection accepted just before the stop (in the same loop pass, say) gets up to
        STOP_GRACE seconds for its request to be read and answered: closing it at once would
        reset a client that did nothing wrong.  Idle keep-alive connections close at once.
        """
        now = time.monotonic()
        self.board.stopping(now)
        self._release_listeners()
        if not self.quick:
            self.read_unreported()
        now = time.monotonic()
        deadline = now + STOP_GRACE
        while not self.quick and self.connections and now < deadline:
            for conn in list(self.connections.values()):
                if not (conn.reader.in_message or conn.setup or conn.lingering
                        or now - conn.idle_since < STOP_GRACE):
                    self._close_now(conn)
            if not self.connections:
                break
            self._serve_stopping(min(0.05, deadline - now))
            now = time.monotonic()
        for conn in list(self.connections.values()):
            self._close_now(conn)
        self.selector.close()
