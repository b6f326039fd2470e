"""WebSocket connections for the asgi worker (``--ws websockets``, the default).

The HTTP protocol hands over the connection once it has read an upgrade request's head;
this protocol then runs the ASGI WebSocket session.  Framing, masking, control frames, the
close handshake, permessage-deflate and size limits are the websockets library's sans-I/O
``ServerProtocol``: this module only moves bytes between it and the transport and turns
its frames into ASGI messages (joining fragmented messages, enforcing ``--ws-max-size``
across fragments).

The handshake waits for the app: ``websocket.connect`` is delivered first, and the 101
response is only sent on ``websocket.accept`` (with the subprotocol and headers the app
chose).  ``websocket.close`` before that is a 403; ``websocket.http.response.*`` sends the
app's own HTTP response instead.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from time import monotonic
from typing import Any

from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from tiamat.asgi.http import header_block
from tiamat.asgi.state import ServerState
from tiamat.http.h1 import RequestHead
from tiamat.http.response import SERVER_HEADER, date_header, status_line

log = logging.getLogger("tiamat.error")

#: stop reading while this many received messages wait for the app
QUEUE_HIGH = 16
CLOSE_TIMEOUT = 10.0
_TEXT, _BINARY, _CONT, _CLOSE = Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.CLOSE


class ClientDisconnected(OSError):
    """``send`` on a WebSocket that is closed (ASGI asks for an OSError subclass)."""


def _handshake_bytes(head: RequestHead) -> bytes:
    """The request head again, for the sans-I/O protocol to validate and answer."""
    lines = [head.method + b" " + head.target + b" HTTP/1.1\r\n"]
    lines.extend(name + b": " + value + b"\r\n" for name, value in head.headers)
    lines.append(b"\r\n")
    return b"".join(lines)


class WebSocketProtocol(asyncio.Protocol):
    """One WebSocket connection, from the upgrade request to the close."""

    def __init__(self, state: ServerState, scope: dict[str, Any], head: RequestHead) -> None:
        self.state = state
        self.scope = scope
        self.head = head
        cfg = state.cfg
        self.max_size: int = cfg.ws_max_size
        self.ping_interval: float = cfg.ws_ping_interval
        self.ping_timeout: float = cfg.ws_ping_timeout
        self.deflate: bool = cfg.ws_per_message_deflate
        self.chosen_subprotocol: str | None = None
        self.ws: Any = self._new_engine()
        self.queue: deque[dict[str, Any]] = deque([{"type": "websocket.connect"}])
        self.waiter: asyncio.Future[None] | None = None
        self.drain_waiter: asyncio.Future[None] | None = None
        self.accepted = False
        self.closed = False  # the app knows: disconnect delivered or close sent
        self.disconnected = False
        self.write_paused = False
        self.read_paused = False
        self.pending = b""
        self.fragments: list[bytes] = []
        self.fragments_size = 0
        self.fragment_opcode: Opcode | None = None
        self.http_response: dict[str, Any] | None = None
        self.deadline = float("inf")
        self.ping_sent_at: float | None = None
        self.last_ping = monotonic()

    # --- asyncio callbacks -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.state.connections.add(self)

    def _new_engine(self) -> Any:
        extensions = [ServerPerMessageDeflateFactory()] if self.deflate else None
        return ServerProtocol(extensions=extensions, max_size=self.max_size,
                              select_subprotocol=lambda _, offered: self.chosen_subprotocol)

    def _handshake_request(self) -> Any:
        """The engine's view of the upgrade request (None if it rejects it)."""
        ws = self.ws
        ws.receive_data(_handshake_bytes(self.head))
        events = ws.events_received()
        return events[0] if events else None

    def start(self, leftover: bytes) -> None:
        """Parse the handshake request and start the app's session."""
        self.request = self._handshake_request()
        self.pending = leftover
        state = self.state
        task = state.loop.create_task(self.run(state.app))
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connection_closed(self)
        if not self.disconnected:
            self._disconnect(1006, "")
        for waiter in (self.waiter, self.drain_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        if not self.accepted:
            self.pending += data
            if len(self.pending) > self.max_size:
                self.transport.close()
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Bytes of an accepted session into the engine (the engine class decides how)."""
        ws = self.ws
        ws.receive_data(data)
        self._flush()
        self._handle_frames(ws.events_received())

    def eof_received(self) -> bool:
        self.ws.receive_eof()
        self._flush()
        self._handle_frames(self.ws.events_received())
        return False

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self.drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- frames in ----------------------------------------------------------------------------
    def _handle_frames(self, frames: list[Any]) -> None:
        for frame in frames:
            opcode = frame.opcode
            if opcode is _TEXT or opcode is _BINARY:
                if frame.fin:
                    self._deliver(opcode, frame.data)
                else:
                    self.fragment_opcode = opcode
                    self.fragments = [frame.data]
                    self.fragments_size = len(frame.data)
            elif opcode is _CONT:
                self.fragments.append(frame.data)
                self.fragments_size += len(frame.data)
                if self.fragments_size > self.max_size:
                    self._fail(1009, "message too big")
                    continue
                if frame.fin:
                    data = b"".join(self.fragments)
                    self.fragments = []
                    self.fragments_size = 0
                    self._deliver(self.fragment_opcode, data)
            elif opcode is Opcode.PONG:
                self.ping_sent_at = None
            elif opcode is _CLOSE:
                close = self.ws.close_rcvd
                self._disconnect(close.code if close else 1005, close.reason if close else "")
        ws = self.ws
        if ws.state is State.CLOSED or ws.parser_exc is not None:
            close = ws.close_rcvd or ws.close_sent
            if not self.disconnected:
                self._disconnect(close.code if close else 1006, close.reason if close else "")

    def _deliver(self, opcode: Any, data: bytes) -> None:
        if self.disconnected:
            return
        if opcode is _TEXT:
            try:
                message = {"type": "websocket.receive", "text": data.decode("utf-8")}
            except UnicodeDecodeError:
                self._fail(1007, "invalid UTF-8 in a text message")
                return
        else:
            message = {"type": "websocket.receive", "bytes": data}
        self._put_received(message)

    def _put_received(self, message: dict[str, Any]) -> None:
        """Queue a message for the app; stop reading while the app lags QUEUE_HIGH behind."""
        self._put(message)
        if len(self.queue) >= QUEUE_HIGH and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def _disconnect(self, code: int, reason: str) -> None:
        self.disconnected = True
        self._put({"type": "websocket.disconnect", "code": code, "reason": reason})
        self.deadline = min(self.deadline, monotonic() + CLOSE_TIMEOUT)

    def _put(self, message: dict[str, Any]) -> None:
        self.queue.append(message)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- the engine: what a different WebSocket library overrides ---------------------------------
    def _send_message(self, data: str | bytes) -> None:
        if isinstance(data, str):
            self.ws.send_text(data.encode("utf-8"))
        else:
            self.ws.send_binary(data)
        self._flush()

    def _close(self, code: int, reason: str) -> None:
        self.ws.send_close(code, reason)
        self._flush()

    def _fail(self, code: int, reason: str) -> None:
        self.ws.fail(code, reason)
        self._flush()

    def _ping(self, data: bytes) -> None:
        self.ws.send_ping(data)
        self._flush()

    def _flush(self) -> None:
        """Write what the sans-I/O protocol has to send; an empty chunk means close."""
        transport = self.transport
        for data in self.ws.data_to_send():
            if data:
                transport.write(data)
            else:
                transport.close()

    # --- the app's side -------------------------------------------------------------------------
    async def run(self, app: Any) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                self.transport.close()
                raise
            log.error("Exception in ASGI application", exc_info=exc)
            if not self.accepted:
                self._send_http(500, [], b"")
            elif not self.closed:
                self._close(1011, "")
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        else:
            if not self.accepted and self.http_response is None:
                self._send_http(403, [], b"")
            elif self.accepted and not self.closed and not self.disconnected:
                self._close(1000, "")
        finally:
            self.state.request_done()

    async def receive(self) -> dict[str, Any]:
        queue = self.queue
        while not queue:
            waiter = self.waiter = self.state.loop.create_future()
            try:
                await waiter
            finally:
                self.waiter = None
        message = queue.popleft()
        if self.read_paused and len(queue) < QUEUE_HIGH // 2 and not self.disconnected:
            self.read_paused = False
            self.transport.resume_reading()
        if message["type"] == "websocket.disconnect":
            self.closed = True
        return message

    async def send(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "websocket.send":
            if self.closed or self.disconnected:
                raise ClientDisconnected("the WebSocket is closed")
            if not self.accepted:
                raise RuntimeError("websocket.send before websocket.accept")
            text = message.get("text")
            if text is not None:
                self._send_message(text)
            else:
                self._send_message(message.get("bytes") or b"")
            if self.write_paused:
                await self._drain()
        elif kind == "websocket.accept":
            if self.accepted or self.http_response is not None:
                raise RuntimeError("websocket.accept sent twice or after a response")
            self._accept(message)
        elif kind == "websocket.close":
            if not self.accepted:
                if self.http_response is None:
                    self._send_http(403, [], b"")
                self.closed = True
                return
            if self.closed or self.disconnected:
                return
            self.closed = True
            self._close(message.get("code", 1000) or 1000, message.get("reason") or "")
            self.deadline = monotonic() + CLOSE_TIMEOUT
        elif kind == "websocket.http.response.start":
            if self.accepted or self.http_response is not None:
                raise RuntimeError("websocket.http.response.start after the handshake")
            self.http_response = {"status": message["status"],
                                  "headers": list(message.get("headers", ())), "body": []}
        elif kind == "websocket.http.response.body":
            response = self.http_response
            if response is None:
                raise RuntimeError("websocket.http.response.body before its start")
            response["body"].append(message.get("body", b""))
            if not message.get("more_body", False):
                self._send_http(response["status"], response["headers"], b"".join(response["body"]))
                self.closed = True
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on a WebSocket")

    def _accept(self, message: dict[str, Any]) -> None:
        ws = self.ws
        if self.request is None:
            self._send_http(400, [], b"invalid WebSocket handshake\n")
            raise ClientDisconnected("invalid WebSocket handshake")
        self.chosen_subprotocol = message.get("subprotocol")
        response = ws.accept(self.request)
        if response.status_code != 101:
            ws.send_response(response)
            self._flush()
            self.transport.close()
            self.closed = True
            raise ClientDisconnected(f"WebSocket handshake failed: {response.reason_phrase}")
        for name, value in message.get("headers") or ():
            response.headers[name.decode("latin-1")] = value.decode("latin-1")
        response.headers["Server"] = "tiamat"
        ws.send_response(response)
        self.accepted = True
        self._flush()
        if self.pending:
            data, self.pending = self.pending, b""
            self.data_received(data)

    def _send_http(self, status: int, headers: list[Any], body: bytes) -> None:
        if self.transport.is_closing():
            return
        block = header_block(headers)[0]
        self.transport.write(b"".join((
            status_line(status), SERVER_HEADER, date_header(), block,
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body), body)))
        self.transport.close()
        self.accepted = False

    async def _drain(self) -> None:
        while self.write_paused and not self.transport.is_closing():
            waiter = self.drain_waiter = self.state.loop.create_future()
            await waiter
        self.drain_waiter = None

    # --- the worker's sweep -------------------------------------------------------------------
    def expire(self, now: float) -> None:
        self.transport.close()

    def tick(self, now: float) -> None:
        """Keep-alive pings, and the connection dropped when a pong does not come back."""
        if not self.accepted or self.closed or self.disconnected or not self.ping_interval:
            return
        if self.ping_sent_at is not None:
            if self.ping_timeout and now - self.ping_sent_at > self.ping_timeout:
                self._fail(1011, "keepalive ping timeout")
                self._disconnect(1011, "keepalive ping timeout")
            return
        if now - self.last_ping >= self.ping_interval:
            self.last_ping = self.ping_sent_at = now
            self._ping(os.urandom(4))

    def shutdown(self) -> None:
        """Graceful stop: close with 1012 (service restart)."""
        if self.accepted and not self.closed and not self.disconnected:
            self.closed = True
            self._close(1012, "server shutting down")
            self.deadline = monotonic() + min(CLOSE_TIMEOUT, 2.0)
        elif not self.accepted:
            self.transport.close()
