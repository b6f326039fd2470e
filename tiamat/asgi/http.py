"""The asgi worker's HTTP/1.1 connection: an ``asyncio.Protocol`` over the shared HTTP core.

``data_received`` feeds the connection's request reader (made by
:func:`tiamat.http.reader_factory`, so ``--http`` applies here too); its events drive one
:class:`Cycle` per request, which is the ASGI ``receive``/``send`` pair.  Response framing
is decided by :func:`tiamat.http.response.decide_framing`, as for every worker class.

Lean on purpose: per-connection work (the scope's constant part, the reader) is done once
per connection; a small response (start + one body message) is one ``transport.write``.
Flow control both ways: reading pauses while an unread request body exceeds
:data:`HIGH_WATER` (or a pipelined request waits behind the current one), and a streaming
``send`` waits while the transport has asked the protocol to pause writing.
"""

from __future__ import annotations

import asyncio
import logging
import os
from time import monotonic, perf_counter
from typing import Any
from urllib.parse import unquote_to_bytes

from tiamat.asgi.state import ASGI_VERSION, ServerState
from tiamat.http import proxy_protocol
from tiamat.http.errors import LINGER_BYTES, LINGER_SECONDS, ProtocolError
from tiamat.http.h1 import END_OF_MESSAGE, MEMO_ENTRIES, MEMO_KEY_BYTES, RequestHead, may_end_after
from tiamat.http.proxy import apply_to_scope
from tiamat.http.response import (
    CONTENT_LENGTHS,
    CONTINUE_100,
    LAST_CHUNK,
    asks_close,
    chunk,
    content_length_parts,
    error_response,
    head_end,
)

log = logging.getLogger("tiamat.error")

#: pause reading while this many request-body bytes wait for the app's receive()
HIGH_WATER = 256 * 1024
FOREVER = float("inf")
#: block size of the pathsend fallback (uvloop has no loop.sendfile): fewer, larger writes
#: each followed by a drain() while the transport is paused.  1 MiB measured best (1 MiB file,
#: 64 connections: 370-460 us of CPU per request against 660-690 at 256 KiB and 750-800 at
#: 512 KiB; docs/benchmarks.md); flow control still caps what waits in the transport's buffer
#: at about one block per connection
SENDFILE_CHUNK = 1024 * 1024
_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH")}


def _decode_path(path: bytes) -> str:
    if not path.partition(b"%")[1] and path.isascii():  # (not ``in``: see h1._VERSIONS)
        return path.decode("ascii")
    return unquote_to_bytes(path).decode("utf-8", "replace")


def _scope_path(paths: dict[bytes, tuple[str, bytes]], state: ServerState,
                path: bytes) -> tuple[str, bytes]:
    """``(path, raw_path)`` of a scope under --root-path, remembered in ``paths``: the same few
    paths come again and again, and a dict hit is cheaper than decoding.  Emptied when full
    (paths with ids in them do not repeat)."""
    if state.root_path:
        parts = (state.root_path + _decode_path(path), state.root_path_bytes + path)
    else:
        parts = (_decode_path(path), path)
    if len(path) > MEMO_KEY_BYTES:  # (see tiamat.http.h1.MEMO_ENTRIES)
        return parts
    if len(paths) >= MEMO_ENTRIES:
        paths.clear()
    paths[path] = parts
    return parts


#: what _header_line gives for a header the server frames itself (see header_block)
_CONTENT_LENGTH, _CLOSE, _DROP = object(), object(), object()
#: app header pair -> its wire line (or one of the markers above).  Apps send the same pairs
#: response after response (content-type, cache-control ...): a dict hit costs a fraction of
#: classifying and serialising the pair again.  Bounded: emptied when full, so pairs that
#: never repeat (request ids, cookies) cost a refill now and then, and memory stays small.
_LINES: dict[Any, Any] = {}


def _header_line(pair: Any) -> Any:
    """One app header pair as a wire line, or the marker saying what the server does with it."""
    name, value = pair
    lname = name.lower()
    if lname == b"content-length":
        line: Any = _CONTENT_LENGTH
    elif lname == b"connection":
        line = _CLOSE if asks_close(value) else _DROP
    elif lname == b"transfer-encoding":
        line = _DROP
    else:
        line = name + b": " + value + b"\r\n"
        # the line has exactly one CR and one LF (its end), else the name or value holds a
        # line break (header injection)
        if line.count(b"\n") != 1 or line.count(b"\r") != 1:
            raise RuntimeError("a response header contains a line break")
        if len(line) > MEMO_KEY_BYTES:
            return line
    if len(_LINES) >= MEMO_ENTRIES:
        _LINES.clear()
    try:
        _LINES[pair] = line
    except TypeError:  # a list (or bytearray) is not hashable: not cached
        pass
    return line


def header_block(headers: Any) -> tuple[bytes, bytes | None, bool]:
    """An app's ASGI response headers as wire bytes, for HTTP and WebSocket-denial responses:
    ``(block, content_length, close)``.  Content-Length (raw value), Connection and
    Transfer-Encoding are taken out, since the server frames the response itself; ``close``
    says whether the app asked for Connection: close.  A line break in a name or value
    (header injection) raises RuntimeError."""
    content_length: bytes | None = None
    close = False
    lines = []
    get = _LINES.get
    for pair in headers:
        try:
            line = get(pair)
        except TypeError:  # a list pair
            line = None
        if line is None:
            line = _header_line(pair)
        if line.__class__ is bytes:
            lines.append(line)
        elif line is _CONTENT_LENGTH:
            content_length = pair[1]
        elif line is _CLOSE:
            close = True
    return b"".join(lines), content_length, close


def _is_websocket(head: RequestHead) -> bool:
    for name, value in head.headers:
        if name == b"upgrade":
            return value.lower() == b"websocket"
    return False


class HttpProtocol(asyncio.Protocol):
    """One client connection speaking HTTP/1.1 (until a WebSocket upgrade replaces it)."""

    __slots__ = ("closing", "cycle", "deadline", "drain_waiter", "eof", "hand_on", "idle_since",
                 "linger_budget", "proxy_buf", "read_paused", "reader", "scope_base", "state",
                 "transport", "trusted", "write_paused")

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.cycle: Cycle | None = None
        self.read_paused = False
        self.write_paused = False
        self.drain_waiter: asyncio.Future[None] | None = None
        #: close after the current response (graceful stop, half-closed client)
        self.closing = False
        #: close after the next response, whose head says so, lingering: the worker hands the
        #: connection on to a less busy sibling (tiamat.workers.asgi.AsgiWorker.rebalance)
        self.hand_on = False
        #: the client half-closed: a waiting receive() gets http.disconnect, send() still works
        self.eof = False
        #: bytes still to discard while closing lingering after an error (0: not lingering)
        self.linger_budget = 0

    # --- asyncio callbacks ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        state = self.state
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.reader = state.new_reader()
        connections = state.connections
        connections.add(self)
        if len(connections) >= state.max_connections and state.on_full is not None:
            state.on_full()
        peer = transport.get_extra_info("peername")
        sockname = transport.get_extra_info("sockname")
        client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        #: the peer is a trusted proxy: its forwarding headers apply (decided once)
        self.trusted = state.forwarded.trusts(client[0] if client else None)
        self.scope_base = {
            "type": "http",
            "asgi": ASGI_VERSION,
            "http_version": "1.1",
            "server": (sockname[0], sockname[1]) if isinstance(sockname, tuple)
            else (sockname, None) if sockname else None,
            "client": client,
            "scheme": state.scheme,
            "root_path": state.root_path,
        }
        self.idle_since = now = monotonic()
        self.deadline = now + state.header_timeout
        #: bytes of a PROXY protocol header being read (None: none expected)
        self.proxy_buf: bytes | None = None
        if state.proxy_peers is not None and state.proxy_peers.trusts(client[0] if client else None):
            self.proxy_buf = b""

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connection_closed(self)
        cycle = self.cycle
        if cycle is not None:
            cycle.disconnected = True
            cycle.wake()
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.linger_budget:
            self.linger_budget -= len(data)
            if self.linger_budget <= 0:
                self.linger_budget = 0
                self.transport.close()
            return
        if self.proxy_buf is not None:
            data = self.read_proxy_header(data)
            if not data:
                return
        reader = self.reader
        reader.feed(data)
        if reader.events:
            self.handle_events()
        elif self.cycle is None:
            # part of a new request's head: it must be complete in time (from the moment
            # the connection became idle, so trickling bytes does not extend it)
            self.deadline = self.idle_since + self.state.header_timeout

    def read_proxy_header(self, data: bytes) -> bytes:
        """Take the PROXY header off the first bytes; return what follows it."""
        assert self.proxy_buf is not None
        data = self.proxy_buf + data
        state = self.state
        try:
            header = proxy_protocol.parse(data, state.proxy_mode)
        except proxy_protocol.ProxyProtocolError as exc:
            log.debug("closing a connection: %s", exc)
            self.transport.close()
            return b""
        if header is None:
            self.proxy_buf = data
            return b""
        self.proxied(header)
        return data[header.length:]

    def proxied(self, header: proxy_protocol.ProxyHeader) -> None:
        """Apply a PROXY header: read above, or before the TLS handshake (asgi.proxy_tls)."""
        self.proxy_buf = None
        scope = self.scope_base
        if header.source is not None:
            scope["client"] = header.source
            self.trusted = self.state.forwarded.trusts(header.source[0])
        if header.destination is not None:
            scope["server"] = header.destination

    def eof_received(self) -> bool:
        if self.linger_budget:
            return False  # the client is done too: the transport closes
        reader = self.reader
        reader.feed_eof()
        if reader.events:
            self.handle_events()
        if self.cycle is None or self.cycle.complete:
            return False  # nothing more to answer: let the transport close
        self.closing = self.eof = True  # answer the request, then close
        self.cycle.wake()
        return True

    def pause_writing(self) -> None:
        # a client that stops reading for --send-timeout is dropped by the worker's sweep
        self.write_paused = True
        self.deadline = min(self.deadline, monotonic() + self.state.send_timeout)

    def resume_writing(self) -> None:
        self.write_paused = False
        cycle = self.cycle
        if self.linger_budget:
            pass  # (lingering keeps its deadline: see close_lingering)
        elif cycle is None:
            self.deadline = self.idle_since + self.state.keepalive
        elif not cycle.more_body:
            self.deadline = FOREVER  # the app is producing the response: no deadline
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def drain(self) -> None:
        while self.write_paused and not self.transport.is_closing():
            waiter = self.drain_waiter = self.state.loop.create_future()
            await waiter
        self.drain_waiter = None

    # --- request events -------------------------------------------------------------------
    def handle_events(self) -> None:
        events = self.reader.events
        while events:
            event = events[0]
            cls = event.__class__
            if cls is bytes:
                cycle = self.cycle
                if cycle is not None:
                    cycle.add_body(event)  # type: ignore[arg-type]
                    self.deadline = monotonic() + self.state.body_timeout
            elif event is END_OF_MESSAGE:
                cycle = self.cycle
                if cycle is not None:
                    cycle.more_body = False
                    if cycle.waiter is not None:
                        cycle.wake()
                    self.deadline = FOREVER
            elif cls is RequestHead:
                if self.cycle is not None:  # pipelined: waits until this request is done
                    self.pause_reading()
                    return
                del events[0]
                self.start(event)  # type: ignore[arg-type]
                if self.cycle is None:  # refused (503) or upgraded: nothing more to read here
                    events.clear()
                    return
                continue
            else:  # a ProtocolError
                cycle = self.cycle
                if cycle is not None and not cycle.more_body:
                    # it concerns the next (pipelined) request: answered after this response
                    self.pause_reading()
                    return
                events.clear()
                self.reject(event)  # type: ignore[arg-type]
                return
            del events[0]

    def start(self, head: RequestHead) -> None:
        state = self.state
        if head.upgrade and state.ws_factory is not None and _is_websocket(head):
            if self.closing or state.stopping:
                # (a session begun now would only be closed again: the stop waits for it)
                self.refuse(503, "shutting down", head)
            else:
                self.upgrade_to_websocket(head)
            return
        limit = state.limit_concurrency
        if limit and (len(state.connections) > limit or len(state.tasks) >= limit):
            self.refuse(503, "too many concurrent requests", head)
            return
        scope = self.scope_base.copy()
        method = head.method
        scope["method"] = _METHODS.get(method) or method.decode("latin-1")
        scope["http_version"] = head.version
        # a fresh dict per request: middleware may add to it
        self.fill_scope(scope, head, {"http.response.pathsend": {}})
        cycle = self.cycle = Cycle(self, scope, head)
        if state.observed:  # (t0, refused and a default headers are read only by _observe)
            cycle.t0 = perf_counter()
            cycle.refused = 0
            cycle.headers = ()
            if state.recorder is not None:
                state.recorder.start()
            if state.request_hooks is not None:
                state.request_hooks.before(head)
        self.deadline = monotonic() + state.body_timeout if cycle.more_body else FOREVER
        # the task leaves state.tasks at the end of Cycle.run, not by a done callback: that
        # would cost one more loop callback per request
        task = state.loop.create_task(cycle.run(state.app))
        if not task.done():  # (an eager task factory the app installed may have run it all)
            cycle.task = task
            state.tasks.add(task)

    def fill_scope(self, scope: dict[str, Any], head: RequestHead,
                   extensions: dict[str, Any]) -> None:
        """The request parts of an HTTP or WebSocket scope (one place for both): path under
        --root-path, query, headers, forwarding headers of a trusted peer, lifespan state."""
        state = self.state
        paths = state.paths
        scope["path"], scope["raw_path"] = paths.get(head.path) or _scope_path(paths, state,
                                                                              head.path)
        scope["query_string"] = head.query
        scope["headers"] = head.headers
        scope["extensions"] = extensions
        if self.trusted:
            # most requests carry no forwarding header at all: a set test per header is
            # much cheaper than resolving them (which would find nothing to apply)
            names = state.forwarded.header_names
            for name, _ in head.headers:
                if name in names:
                    scope["client"], scope["scheme"], scope["server"] = apply_to_scope(
                        head.headers, scope["client"], scope["scheme"], scope["server"],
                        state.forwarded)
                    break
        if state.lifespan_state is not None:
            scope["state"] = state.lifespan_state.copy()

    def upgrade_to_websocket(self, head: RequestHead) -> None:
        state = self.state
        scope = self.scope_base.copy()
        scope["type"] = "websocket"
        scope["scheme"] = "wss" if state.ssl is not None else "ws"
        scope["subprotocols"] = [
            p.strip().decode("latin-1") for name, value in head.headers
            if name == b"sec-websocket-protocol" for p in value.split(b",") if p.strip()]
        self.fill_scope(scope, head, {"websocket.http.response": {}})
        protocol = state.ws_factory(state, scope, head)
        state.connections.discard(self)
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        if self.read_paused:
            self.transport.resume_reading()
        protocol.start(self.reader.upgraded or b"")

    def reject(self, error: ProtocolError) -> None:
        cycle = self.cycle
        if cycle is not None:
            # the app is running and its request body broke a rule: the app sees a
            # disconnect; the client gets the error unless the response head is already out
            cycle.disconnected = True
            cycle.wake()
            if cycle.framing is None:
                self.transport.write(error_response(error.status, error.reason))
                if self.state.observed:  # the cycle's log line and count say what was sent
                    cycle.refused = error.status
            self.close_lingering()
            return
        log.debug("rejected request: %s %s", error.status, error.reason)
        self.refuse(error.status, error.reason)

    def refuse(self, status: int, reason: str, head: RequestHead | None = None) -> None:
        """Answer an error the app never saw, log and count it, and close."""
        response = error_response(status, reason)
        self.transport.write(response)
        self.close_lingering()
        refusals = self.state.refusals
        if refusals is not None:  # the one place this class writes its own response
            client = self.scope_base["client"]
            refusals(status, response, client[0] if client else None, head)

    def close_lingering(self) -> None:
        """Close after an error response without a reset that could destroy it: stop writing
        (FIN once the response is out), then discard what the client still sends, for up to
        LINGER_SECONDS and LINGER_BYTES (tiamat.http.errors), as the sync worker does."""
        transport = self.transport
        if (self.linger_budget or transport.is_closing() or self.state.stopping
                or not transport.can_write_eof()):  # (TLS: no half-close; stopping: no time)
            transport.close()
            return
        transport.write_eof()
        self.linger_budget = LINGER_BYTES
        # (a client that stopped reading keeps its send timeout: expire() aborts it first)
        deadline = monotonic() + LINGER_SECONDS
        self.deadline = min(self.deadline, deadline) if self.write_paused else deadline
        self.closing = True
        if self.read_paused:  # (flow control had stopped reading an unread body)
            self.read_paused = False
            transport.resume_reading()

    # --- flow control and keep-alive ------------------------------------------------------------
    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            if not self.transport.is_closing():
                self.transport.resume_reading()

    def response_complete(self, cycle: Cycle, keep_alive: bool) -> None:
        """The response is on its way; keep the connection for the next request, or close.

        A stop that came after the response's head promised keep-alive does not close it:
        the client may send its next request as soon as this response ends, so the
        connection is left to the stop's close_idle, which closes it after STOP_GRACE
        unless that request comes (and is answered with ``Connection: close``)."""
        if not keep_alive or self.eof or self.linger_budget or cycle.more_body:
            if self.hand_on:  # (bytes the client sent meanwhile must not make it a reset)
                self.close_lingering()
            else:  # (an unread request body is not worth reading just to throw it away)
                self.transport.close()
            return
        self.cycle = None
        self.idle_since = now = monotonic()
        self.deadline = now + self.state.keepalive
        if self.read_paused:
            self.resume_reading()
        if self.reader.events:
            self.handle_events()

    def expire(self, now: float) -> None:
        """Called by the worker's sweep once ``deadline`` has passed."""
        if self.write_paused:
            self.transport.abort()  # the client stopped reading: close() would wait for it
        elif self.linger_budget:
            self.transport.close()  # (lingered long enough: unread bytes or not)
        elif self.cycle is not None:
            # a request body stalled: the app sees http.disconnect, the client a 408
            self.reject(ProtocolError(408, "request body timed out"))
        elif self.reader.in_message:
            self.reject(ProtocolError(408, "request timed out"))
        else:
            self.transport.close()

    def response_is_last(self) -> bool:
        """Closing or handed on (see the response head's keep-alive): whether this response
        is the connection's last.  After EOF or an error it is; during a stop or a hand-on,
        unless a further request has begun to arrive (answered first, as the sync worker
        does: the client would have to send it again)."""
        if self.closing and (self.eof or self.linger_budget):
            return True
        return may_end_after(self.reader)

    def shutdown(self, idle_before: float = FOREVER) -> None:
        """Graceful stop: close after the current response, or now if idle since before
        ``idle_before`` (the worker gives a connection accepted just before the stop a
        moment for its request: closing it at once would reset a client that did no wrong)."""
        self.closing = True
        if self.linger_budget or (self.cycle is None and not self.reader.in_message
                                  and not self.proxy_buf and self.idle_since <= idle_before):
            self.transport.close()


class Cycle:
    """One request/response: the ASGI ``receive`` and ``send`` of one HTTP request."""

    __slots__ = ("body", "body_size", "complete", "conn", "disconnected", "expect_100",
                 "final_sent", "framing", "head", "headers", "length", "more_body", "refused",
                 "scope", "sent", "started", "status", "t0", "task", "waiter")

    def __init__(self, conn: HttpProtocol, scope: dict[str, Any], head: RequestHead) -> None:
        # only what is read before it is written: one of these per request (status and
        # headers come with http.response.start, length with the head, body_size with the
        # first body bytes; t0, refused and a default headers only when observed)
        self.conn = conn
        self.scope = scope
        self.head = head
        self.body: list[bytes] | None = None
        self.more_body = more_body = head.has_body
        self.final_sent = False
        # (expect_continue is already False for HTTP/1.0: the core's rule)
        self.expect_100 = more_body and head.expect_continue
        self.waiter: asyncio.Future[None] | None = None
        self.disconnected = False
        self.started = False
        self.complete = False
        self.framing: Any = None
        self.sent = 0
        self.task: asyncio.Task[None] | None = None

    async def run(self, app: Any) -> None:
        conn = self.conn
        try:
            await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                conn.transport.close()
                raise
            log.error("Exception in ASGI application", exc_info=exc)
            self._fail()
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        else:
            if not self.complete and not self.disconnected:
                log.error("ASGI callable returned without %s",
                          "completing the response" if self.started else "starting a response")
                self._fail()
        finally:
            state = conn.state
            state.tasks.discard(self.task)
            if state.observed:
                self._observe(state)
            state.request_done()

    def _observe(self, state: ServerState) -> None:
        """Access log line, metrics and post_request for this request (only when one is on)."""
        duration = perf_counter() - self.t0
        framing = self.framing
        status = self.refused or (self.status if self.started and framing is not None else 500)
        if state.recorder is not None:
            state.recorder.done(status, duration)
        if state.request_hooks is not None:
            keep_alive = framing is not None and framing.keep_alive
            state.request_hooks.after(self.head, self.scope, (keep_alive, status, self.sent), None,
                                      list(self.headers))
        if state.access_log is not None:
            scope, head = self.scope, self.head
            client = scope["client"]
            state.access_log.log(
                remote_addr=client[0] if client else "-", method=scope["method"],
                target=head.target.decode("latin-1"), protocol="HTTP/" + head.version,
                status=status, length=self.sent, duration=duration, request_headers=head.headers,
                response_headers=self.headers, path=scope["path"])

    def _fail(self) -> None:
        transport = self.conn.transport
        if self.framing is None and not self.disconnected:  # nothing sent yet: a clean 500
            self.complete = True
            transport.write(error_response(500))
        if not self.conn.linger_budget:  # (refused and lingering: the linger ends it, not a reset)
            transport.close()

    # --- receive ----------------------------------------------------------------------------
    def add_body(self, data: bytes) -> None:
        body = self.body
        if body is None:
            self.body = [data]
            self.body_size = size = len(data)
        else:
            body.append(data)
            self.body_size = size = self.body_size + len(data)
        if size > HIGH_WATER:
            self.conn.pause_reading()
        self.wake()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def receive(self) -> dict[str, Any]:
        if self.expect_100:
            self.expect_100 = False
            # (not once refused: after close_lingering's write_eof the transport is not
            # closing yet, but a write would raise)
            if not (self.disconnected or self.conn.transport.is_closing()):
                self.conn.transport.write(CONTINUE_100)
        conn = self.conn
        while not (self.disconnected or self.complete):
            if self.body or (not self.more_body and not self.final_sent):
                break
            if conn.eof:
                return {"type": "http.disconnect"}
            conn.resume_reading()
            waiter = self.waiter = conn.state.loop.create_future()
            try:
                await waiter
            finally:
                self.waiter = None
        if self.disconnected or self.complete:
            return {"type": "http.disconnect"}
        body = self.body
        if body is None:
            data = b""
        else:
            data = body[0] if len(body) == 1 else b"".join(body)
            self.body = None
            self.body_size = 0
            self.conn.resume_reading()
        more = self.more_body
        if not more:
            self.final_sent = True
        return {"type": "http.request", "body": data, "more_body": more}

    # --- send -------------------------------------------------------------------------------
    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.body":
            if not self.started:
                raise RuntimeError("http.response.body sent before http.response.start")
            if self.complete:
                raise RuntimeError("http.response.body sent after the response was complete")
            body = message.get("body", b"")
            more = message.get("more_body", False)
            if self.disconnected:
                if not more:
                    self.complete = True
                return
            conn = self.conn
            framing = self.framing
            if framing is None:
                data = self._head(None if more else len(body))
                framing = self.framing
                if body and framing.send_body:
                    length = self.length
                    if framing.chunked or (length is not None and len(body) > length):
                        data += self._frame(body, more)
                    else:  # the common case: the whole body with its Content-Length
                        data += body
                        self.sent = len(body)
                elif not more and framing.chunked and framing.send_body:
                    data += LAST_CHUNK
                conn.transport.write(data)
            elif framing.send_body and (body or not more):
                conn.transport.write(self._frame(body, more))
            if not more:
                self._complete()
            elif conn.write_paused:
                await conn.drain()
        elif kind == "http.response.start":
            if self.started:
                raise RuntimeError("http.response.start sent twice")
            self.started = True
            self.status = message["status"]
            self.headers = message.get("headers", ())
        elif kind == "http.response.pathsend":
            await self._pathsend(message["path"])
        elif kind == "http.response.trailers":
            pass  # trailers are not sent (HTTP/1.1 clients rarely ask for them)
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} in an HTTP request")

    def _frame(self, body: bytes, more: bool) -> bytes:
        """Body bytes as they go on the wire (chunked, truncated to Content-Length)."""
        if self.framing.chunked:
            self.sent += len(body)
            if not more:
                return chunk(body) + LAST_CHUNK if body else LAST_CHUNK
            return chunk(body) if body else b""
        length = self.length
        self.sent += len(body)
        if length is not None and self.sent > length:
            body = body[:len(body) - (self.sent - length)]
            self.sent = length
            self.framing = self.framing._replace(keep_alive=False)
        return body

    def _head(self, body_length: int | None) -> bytes:
        """The response head; decides framing once the app's headers are known."""
        if not self.started:
            raise RuntimeError("http.response.start was not sent")
        head = self.head
        conn = self.conn
        state = conn.state
        status = self.status
        block, given_length, close = header_block(self.headers)
        # the whole body's length (when known) frames like an app-given Content-Length; whether
        # a body goes out at all (HEAD, 1xx, 204, 304) is decide_framing's rule, not repeated here
        if given_length is None:
            length = length_line = None
        else:
            cached = CONTENT_LENGTHS.get(given_length) if given_length.__class__ is bytes else None
            length, length_line = cached or content_length_parts(given_length)
        key = (status, length is None and body_length is None, head.method, head.version,
               head.keep_alive and not head.upgrade and not close
               and not ((conn.closing or conn.hand_on) and conn.response_is_last()))
        framing, line, chunked = state.framings.get(key) or state.framing(*key)
        self.framing = framing
        if framing.send_body:
            if length is None and body_length is not None:
                length, length_line = (CONTENT_LENGTHS.get(body_length)
                                       or content_length_parts(body_length))
            self.length = length
        else:  # (an app's own Content-Length still goes out, e.g. for HEAD)
            self.length = None
        end = head_end(framing.keep_alive, head.version)  # Server, Date, Connection, CRLF
        if length_line is None:
            return b"".join((line, block, chunked, end))
        return b"".join((line, block, length_line, chunked, end))

    def _complete(self) -> None:
        self.complete = True
        framing = self.framing
        keep_alive = framing.keep_alive and (self.length is None or self.sent == self.length)
        self.conn.response_complete(self, keep_alive)
        if self.waiter is not None:
            self.wake()

    async def _pathsend(self, path: str) -> None:
        if not self.started or self.framing is not None:
            raise RuntimeError("http.response.pathsend must follow http.response.start alone")
        conn = self.conn
        if self.disconnected:  # (refused or gone: nothing may be written, as in send())
            self.complete = True
            return
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            data = self._head(size)
            transport = conn.transport
            transport.write(data)
            count = self.length if self.length is not None else size
            if self.framing.send_body and count:
                if self.framing.chunked:  # HTTP/1.1 with no length is impossible here
                    raise RuntimeError("pathsend needs a known length")
                await self._send_file(file, count)
        if not self.complete:
            self._complete()

    async def _send_file(self, file: Any, count: int) -> None:
        conn = self.conn
        transport = conn.transport
        try:
            await conn.state.loop.sendfile(transport, file, 0, count, fallback=True)
            self.sent = count
            return
        except (NotImplementedError, AttributeError, TypeError):
            pass  # no native sendfile on this loop/transport: copy in chunks
        except (ConnectionError, OSError):
            self.disconnected = True
            return
        file.seek(0)
        remaining = count
        while remaining > 0 and not self.disconnected:
            data = file.read(min(SENDFILE_CHUNK, remaining))
            if not data:
                break
            transport.write(data)
            remaining -= len(data)
            self.sent += len(data)
            if conn.write_paused:
                await conn.drain()
