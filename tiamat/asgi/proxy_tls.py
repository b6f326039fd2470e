"""PROXY protocol together with TLS for the asgi worker: the header first, then the handshake.

A load balancer passing TLS through sends its PROXY header *before* the client's
ClientHello.  An asyncio server cannot take that header off itself: once its transport has
read the bytes after the header, TLS cannot be started on them.  So on listeners where both
are configured the worker accepts sockets itself (:class:`Listener`), peeks the header with
``MSG_PEEK`` from peers in ``--proxy-allow-from`` and consumes exactly its bytes
(:class:`Setup`), then hands the untouched socket to ``loop.connect_accepted_socket(...,
ssl=...)``, so TLS and HTTP proceed as on any other listener.  Listeners without both
settings keep the loop's own ``create_server``: this path costs a task per connection.

A :class:`Setup` stands in :attr:`ServerState.connections` while the header is read and the
handshake runs, so ``--worker-connections`` counts it, the worker's sweep closes it at its
deadline (``--header-timeout`` from accept, for header and handshake together), and a
graceful stop waits for it.  Once the handshake is done it hands the transport to the HTTP
protocol and applies the announced addresses before the first request byte arrives.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from time import monotonic
from typing import Any

from tiamat.asgi.http import HttpProtocol
from tiamat.asgi.state import ServerState
from tiamat.http import proxy_protocol
from tiamat.sockets import ACCEPT_RETRY, AcceptPaused, accept_next
from tiamat.workers.base import STOP_GRACE

log = logging.getLogger("tiamat.error")

#: connections accepted per wake-up before the loop runs other work (as asyncio's default)
ACCEPT_BATCH = 100


class Listener:
    """Accepts on one listening socket; ``close()`` stops it (as ``asyncio.Server.close``)."""

    def __init__(self, sock: socket.socket, state: ServerState,
                 factory: Callable[[], HttpProtocol]) -> None:
        self.sock: socket.socket | None = sock
        self.state = state
        self.factory = factory
        sock.setblocking(False)
        state.loop.add_reader(sock.fileno(), self.accept)

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            self.state.loop.remove_reader(sock.fileno())
            sock.close()

    def accept(self) -> None:
        state = self.state
        for _ in range(ACCEPT_BATCH):
            sock = self.sock
            if sock is None:
                return
            try:
                got = accept_next(sock)
            except AcceptPaused:
                state.loop.remove_reader(sock.fileno())
                state.loop.call_later(ACCEPT_RETRY, self.retry)
                return
            if got is None:
                return
            Setup(state, got[0], got[1], self.factory()).start()

    def retry(self) -> None:
        if self.sock is not None:
            self.state.loop.add_reader(self.sock.fileno(), self.accept)


class Setup(asyncio.Protocol):
    """One accepted connection until it carries HTTP: PROXY header (if allowed), handshake.

    Quacks like a connection of :attr:`ServerState.connections` (``deadline``, ``expire``,
    ``tick``, ``shutdown``, ``transport.abort``) for the worker's sweep and graceful stop.
    It is also the protocol given to ``connect_accepted_socket``, only until the handshake
    completes: then it installs the HTTP protocol on the transport.
    """

    def __init__(self, state: ServerState, sock: socket.socket, peer: Any,
                 protocol: HttpProtocol) -> None:
        self.state = state
        self.sock = sock
        self.protocol = protocol
        self.transport = self  # (for the worker's final ``conn.transport.abort()``)
        self.accepted = monotonic()
        self.deadline = self.accepted + state.header_timeout
        self.buf = b""
        #: the header read (None: none read, the peer is not allowed to send one)
        self.header: proxy_protocol.ProxyHeader | None = None
        self.task: asyncio.Task[Any] | None = None
        #: the socket now belongs to the loop's transport (closing it is the transport's job)
        self.handed = False
        self.done = False
        addr = peer[0] if isinstance(peer, tuple) else None
        self.reading = state.proxy_peers is not None and state.proxy_peers.trusts(addr)

    def start(self) -> None:
        state = self.state
        connections = state.connections
        connections.add(self)
        if len(connections) >= state.max_connections and state.on_full is not None:
            state.on_full()
        self.sock.setblocking(False)
        if self.reading:
            state.loop.add_reader(self.sock.fileno(), self.read_header)
        else:
            self.handshake()

    # --- the PROXY header: peeked, then exactly its bytes consumed ----------------------------
    def read_header(self) -> None:
        sock = self.sock
        try:
            peeked = sock.recv(proxy_protocol.V2_MAX, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.abort()
            return
        if not peeked:
            self.abort()
            return
        data = self.buf + peeked
        try:
            header = proxy_protocol.parse(data, self.state.proxy_mode)
        except proxy_protocol.ProxyProtocolError as exc:
            log.debug("closing a connection: %s", exc)
            self.abort()
            return
        if header is None:
            # all of it belongs to the header: take it off, or the reader fires again at once
            self._consume(len(peeked))
            self.buf = data
            return
        if header.length < len(self.buf):
            # (auto) no header after all, but bytes that looked like one were taken: a TLS
            # client never starts that way
            self.abort()
            return
        self._consume(header.length - len(self.buf))
        self.buf = b""
        self.header = header
        self.state.loop.remove_reader(sock.fileno())
        self.reading = False
        self.handshake()

    def _consume(self, count: int) -> None:
        while count > 0:
            try:
                got = self.sock.recv(count)
            except OSError:
                return  # (bytes already peeked) a reset shows on the next read
            if not got:
                return
            count -= len(got)

    # --- the handshake, by the loop's own TLS transport ---------------------------------------
    def handshake(self) -> None:
        self.task = self.state.loop.create_task(self._handshake())

    async def _handshake(self) -> None:
        state = self.state
        timeout = self.deadline - monotonic()
        self.handed = True
        try:
            await state.loop.connect_accepted_socket(
                lambda: self, self.sock, ssl=state.ssl,
                ssl_handshake_timeout=max(timeout, 0.01) if timeout < 1e8 else None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed handshake: the transport closed the socket
            log.debug("TLS handshake failed: %r", exc)
            if not self.done:
                self.done = True
                state.connection_closed(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The handshake is done: from here on the HTTP protocol owns the connection."""
        self.done = True
        self.state.connections.discard(self)  # (the protocol adds itself: no on_room/on_full)
        protocol = self.protocol
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.header is not None:
            protocol.proxied(self.header)

    # --- as a connection of the worker --------------------------------------------------------
    def expire(self, now: float) -> None:
        """--header-timeout passed before the header and the handshake were done."""
        self.abort()

    def tick(self, now: float) -> None:
        pass

    def shutdown(self, idle_before: float = 0.0) -> None:
        """Graceful stop: a header or handshake under way may finish (until the deadline);
        a connection that has sent nothing gets STOP_GRACE from accept, as an idle one."""
        if self.reading and not self.buf:
            self.deadline = min(self.deadline, self.accepted + STOP_GRACE)

    def abort(self) -> None:
        if self.done:
            return
        self.done = True
        if self.task is not None:
            self.task.cancel()  # connect_accepted_socket closes the transport and the socket
        if not self.handed:
            if self.reading:
                self.state.loop.remove_reader(self.sock.fileno())
            self.sock.close()
        self.state.connection_closed(self)


def supports(state: ServerState) -> bool:
    """Whether this worker needs the accept-it-ourselves path (PROXY protocol *and* TLS)."""
    return state.ssl is not None and state.proxy_peers is not None

