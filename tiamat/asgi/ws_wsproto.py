"""``--ws wsproto``: the same WebSocket session as :mod:`tiamat.asgi.websocket`, with wsproto.

Only the engine differs: wsproto's ``WSConnection`` parses frames and performs the
handshake; the ASGI side (message queue, flow control, the HTTP denial response, graceful
close) is the websockets-based class's, inherited.  wsproto has no message size limit of
its own, so ``--ws-max-size`` is enforced here while a message is being assembled.
"""

from __future__ import annotations

from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from tiamat.asgi.websocket import ClientDisconnected, WebSocketProtocol, _handshake_bytes


class WsprotoProtocol(WebSocketProtocol):
    """A WebSocket connection whose framing is wsproto's."""

    def _new_engine(self) -> Any:
        return WSConnection(ConnectionType.SERVER)

    def _handshake_request(self) -> Any:
        request = None
        try:
            self.ws.receive_data(_handshake_bytes(self.head))
            for event in self.ws.events():
                if isinstance(event, Request):
                    request = event
        except RemoteProtocolError:
            return None
        return request

    def _feed(self, data: bytes) -> None:
        self.ws.receive_data(data)
        self._handle_events()

    def eof_received(self) -> bool:
        if self.accepted:
            self.ws.receive_data(None)
            self._handle_events()
        return False

    def _handle_events(self) -> None:
        ws = self.ws
        for event in ws.events():
            kind = event.__class__
            if kind is TextMessage or kind is BytesMessage:
                self.fragments.append(event.data)
                self.fragments_size += len(event.data)
                if self.fragments_size > self.max_size:
                    self._fail(1009, "message too big")
                    return
                if event.message_finished:
                    parts = self.fragments
                    data = parts[0] if len(parts) == 1 else "".join(parts) if kind is TextMessage \
                        else b"".join(parts)
                    self.fragments = []
                    self.fragments_size = 0
                    if not self.disconnected:
                        message = {"type": "websocket.receive"}
                        message["text" if kind is TextMessage else "bytes"] = data
                        self._put_received(message)
            elif kind is Ping:
                self.transport.write(ws.send(event.response()))
            elif kind is Pong:
                self.ping_sent_at = None
            elif kind is CloseConnection:
                try:  # echo the close (or send ours for a protocol error wsproto found)
                    self.transport.write(ws.send(event.response()))
                except LocalProtocolError:
                    pass  # our close was already sent: this is the reply to it
                self.transport.close()
                if not self.disconnected:
                    self._disconnect(event.code, event.reason or "")

    def _accept(self, message: dict[str, Any]) -> None:
        if self.request is None:
            self._send_http(400, [], b"invalid WebSocket handshake\n")
            raise ClientDisconnected("invalid WebSocket handshake")
        headers = [(name, value) for name, value in message.get("headers") or ()]
        headers.append((b"server", b"tiamat"))
        extensions = [PerMessageDeflate()] if self.deflate else []
        self.transport.write(self.ws.send(AcceptConnection(
            subprotocol=message.get("subprotocol"), extensions=extensions, extra_headers=headers)))
        self.accepted = True
        if self.pending:
            data, self.pending = self.pending, b""
            self.data_received(data)

    # --- the engine -------------------------------------------------------------------------
    def _send_message(self, data: str | bytes) -> None:
        event = TextMessage(data=data) if isinstance(data, str) else BytesMessage(data=data)
        self.transport.write(self.ws.send(event))

    def _close(self, code: int, reason: str) -> None:
        if self.ws.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
            self.transport.write(self.ws.send(CloseConnection(code=code, reason=reason)))

    def _fail(self, code: int, reason: str) -> None:
        self._close(code, reason)
        self.transport.close()
        if not self.disconnected:
            self._disconnect(code, reason)

    def _ping(self, data: bytes) -> None:
        self.transport.write(self.ws.send(Ping(payload=data)))
