"""``-k asgi``: ASGI 3 apps (ASGI 2 and WSGI adapted) on an asyncio event loop.

Life cycle: ``init_app`` (part of booting) makes the loop (``--loop``), adapts the app and
runs the lifespan startup, so a worker whose startup fails never says ready and the boot
fails (exit 3).  ``run`` then serves every listener with :class:`tiamat.asgi.http.HttpProtocol`
until the worker is told to stop, and stops gracefully: listeners closed, idle connections
closed, in-flight requests given ``--graceful-timeout`` to finish, WebSockets closed with
1012, then the lifespan shutdown.

Liveness is proven from inside the loop: a loop timer calls :meth:`beat`, so a loop blocked
by synchronous code stops beating and the master's ``--timeout`` replaces the worker (the
master first has the worker's faulthandler print every thread's stack, so the log shows the
blocking call).
Signals and master messages arrive through ``wake_fd`` and the channel, both watched with
``loop.add_reader``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from time import monotonic
from typing import Any

from tiamat.asgi import proxy_tls
from tiamat.asgi.adapt import as_asgi3
from tiamat.asgi.http import HttpProtocol
from tiamat.asgi.lifespan import Lifespan
from tiamat.asgi.state import ServerState
from tiamat.sockets import ACCEPT_BATCH, ACCEPT_RETRY, AcceptPaused, accept_next, dup_listener
from tiamat.workers.aio import AioWorker
from tiamat.workers.balance import DEFER_CHECK, AcceptBalance
from tiamat.workers.base import STOP_GRACE

log = logging.getLogger("tiamat.error")


def websocket_factory(choice: str) -> Any:
    """The WebSocket protocol class ``--ws`` names (None: upgrades are answered as HTTP)."""
    if choice == "none":
        return None
    if choice in ("auto", "websockets"):
        try:
            from tiamat.asgi.websocket import WebSocketProtocol
        except ImportError:
            if choice == "websockets":
                raise RuntimeError("--ws websockets: the websockets package is not installed") from None
        else:
            return WebSocketProtocol
    try:
        from tiamat.asgi.ws_wsproto import WsprotoProtocol
    except ImportError:
        if choice == "wsproto":
            raise RuntimeError("--ws wsproto: the wsproto package is not installed") from None
        log.warning("no WebSocket library installed (websockets or wsproto): WebSocket is off")
        return None
    return WsprotoProtocol


class AsgiWorker(AioWorker):
    """One asyncio event loop serving HTTP/1.1 and WebSocket to an ASGI app."""

    interface = "asgi"

    def init_app(self) -> None:
        cfg = self.cfg
        self.make_loop()
        self.asgi_app, kind = as_asgi3(self.app, cfg.threads if cfg.threads > 1 else 10,
                                       cfg.interface)
        self.lifespan = Lifespan(self.asgi_app, "off" if kind == "wsgi" else cfg.lifespan)
        self.loop.run_until_complete(self.lifespan.startup())

    def run(self) -> None:
        cfg = self.cfg
        lifespan = self.lifespan
        self.state = ServerState(self.asgi_app, cfg, self.loop, self,
                                 lifespan.state if lifespan.supported else None,
                                 websocket_factory(cfg.ws))
        self.stopping = False
        self.loop.run_until_complete(self.serve())

    async def serve(self) -> None:
        state = self.state
        self.watch_signals_and_channel()
        #: PROXY protocol and TLS: accepted by the worker itself, to read the header first
        self.proxy_tls = proxy_tls.supports(state)
        tls = {"ssl": state.ssl, "ssl_handshake_timeout": self.cfg.header_timeout or None} \
            if state.ssl is not None else {}
        # Several workers share the listening socket, and the loop's own server accepts
        # every pending connection at once: the first worker to run would take a whole
        # burst (wrk's 64 keep-alive connections split 46/18), and nothing can stop that
        # accept loop half-way.  So with siblings the worker accepts itself, one connection
        # at a time, under the balancing rule (tiamat.workers.balance: a worker holding more
        # than its least-loaded live sibling + 1 leaves the next connection to it), and
        # hands each socket to the loop (connect_accepted_socket).  PROXY+TLS listeners
        # accept in proxy_tls.Listener and are not balanced.
        self.balance = None if self.proxy_tls else \
            AcceptBalance.for_worker(self.cfg, self.board, self.listeners)

        def factory() -> HttpProtocol:
            return HttpProtocol(state)

        self.factory, self.tls = factory, tls
        self.servers: list[asyncio.AbstractServer] = []
        self.accept_paused = False
        #: balanced accepting: after an accept error, until ACCEPT_RETRY passed
        self.accept_error = False
        #: balanced accepting: the listeners are watched / the timer of a deferral
        self.watching = False
        self.defer_timer: asyncio.TimerHandle | None = None
        #: balanced accepting: sockets accepted and not yet handed to the loop (and their tasks)
        self.arriving = 0
        self.handoffs: set[asyncio.Task[Any]] = set()
        state.on_full, state.on_room = self.pause_accepting, self.on_room
        await self.listen()
        await self.serve_until_stopped()
        await self.shutdown()

    # --- accepting --------------------------------------------------------------------------
    async def listen(self) -> None:
        """Accept on every listener (through duplicates: pausing closes them, not the originals)."""
        if self.state.stopping:
            return  # (resumed just before the stop: the listeners may be closed already)
        if self.balance is not None:
            self.update_watching()
            return
        if self.proxy_tls:
            servers: list[Any] = [proxy_tls.Listener(dup_listener(sock), self.state, self.factory)
                                  for sock in self.listeners]
        else:
            servers = [await self.loop.create_server(self.factory, sock=dup_listener(sock),
                                                     backlog=self.cfg.backlog, **self.tls)
                       for sock in self.listeners]
        if self.accept_paused or self.state.stopping:
            for server in servers:
                server.close()
        else:
            self.servers.extend(servers)

    def pause_accepting(self) -> None:
        """--worker-connections reached: new clients wait in the backlog for another worker."""
        if not self.accept_paused:
            self.accept_paused = True
            for server in self.servers:
                server.close()
            self.servers = []
            if self.balance is not None:
                self.update_watching()

    def on_room(self) -> None:
        """A connection closed (ServerState.connection_closed)."""
        if self.balance is not None:
            self.publish_held()
            if self.defer_timer is not None:  # one fewer: look again when the next comes
                self.defer_timer.cancel()
                self.defer_timer = None
                self.balance.pause()
                self.update_watching()
        self.resume_accepting()

    def resume_accepting(self) -> None:
        if self.accept_paused and not self.state.stopping:
            self.accept_paused = False
            self.loop.create_task(self.listen())

    # --- balanced accepting (-w > 1) ---------------------------------------------------------
    def held(self) -> int:
        return len(self.state.connections) + self.arriving

    def accepting(self) -> bool:
        """Whether the worker takes new connections (it may still be deferring one)."""
        return not (self.accept_paused or self.accept_error or self.state.stopping)

    def publish_held(self) -> None:
        """This worker's count and whether it accepts, for its siblings (on accept/close)."""
        self.board.held(self.held(), self.accepting())

    def update_watching(self) -> None:
        """Watch the listeners unless paused, deferring or stopping; publish the change."""
        want = self.accepting() and self.defer_timer is None
        if want != self.watching:
            self.watching = want
            for sock in self.listeners:
                if want:
                    self.loop.add_reader(sock.fileno(), self.accept, sock)
                else:
                    self.loop.remove_reader(sock.fileno())
        self.publish_held()

    def accept(self, sock: socket.socket) -> None:
        balance = self.balance
        assert balance is not None
        state = self.state
        now = monotonic()
        for _ in range(ACCEPT_BATCH):
            held = len(state.connections) + self.arriving
            if held >= state.max_connections:
                self.pause_accepting()
                return
            if balance.over(held, now):
                balance.begin(now)
                self.defer_timer = self.loop.call_later(DEFER_CHECK, self.review_deferral)
                self.update_watching()
                return
            try:
                got = accept_next(sock)
            except AcceptPaused:
                self.accept_error = True
                self.update_watching()
                self.loop.call_later(ACCEPT_RETRY, self.retry_accept)
                return
            if got is None:
                return
            self.hand_off(got[0])

    def hand_off(self, conn: socket.socket) -> None:
        """Give an accepted socket to the loop, as its own server would have."""
        conn.setblocking(False)
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.arriving += 1
        task = self.loop.create_task(
            self.loop.connect_accepted_socket(self.factory, conn, **self.tls))
        self.handoffs.add(task)
        task.add_done_callback(self.handed_off)
        self.publish_held()

    def handed_off(self, task: asyncio.Task[Any]) -> None:
        self.handoffs.discard(task)
        self.arriving -= 1
        if not task.cancelled() and task.exception() is not None:
            log.debug("connection set-up failed: %s", task.exception())
        self.publish_held()

    def review_deferral(self) -> None:
        balance = self.balance
        assert balance is not None
        if balance.review(self.held(), monotonic()):
            self.defer_timer = None
            self.update_watching()
        else:
            self.defer_timer = self.loop.call_later(DEFER_CHECK, self.review_deferral)

    def retry_accept(self) -> None:
        self.accept_error = False
        self.update_watching()

    # --- handing keep-alive connections on to less busy siblings ---------------------------
    def rebalance(self, now: float) -> None:
        """Once a tick with siblings: when this worker is clearly busier than its siblings,
        mark a few active keep-alive connections to close after their next response, so
        their clients reconnect to one (balance.AcceptBalance.hand_on has the rule)."""
        assert self.balance is not None
        self.balance.hand_on(now, self.state.connections, _may_hand_on, _may_unmark)

    # --- the loop's housekeeping ------------------------------------------------------------
    def on_tick(self) -> None:
        """Twice a second: prove liveness, expire idle/slow connections, ping WebSockets."""
        now = monotonic()
        self.beat(now)
        if self.balance is not None:
            self.balance.siblings.refresh()
            self.rebalance(now)
        for conn in list(self.state.connections):
            if conn.deadline <= now:
                conn.expire(now)
            elif conn.__class__ is not HttpProtocol:
                conn.tick(now)

    # --- stopping ---------------------------------------------------------------------------
    def close_idle(self) -> None:
        """Every pass of the graceful stop.  HTTP: idle connections close now, busy ones
        after their response; one accepted or answered just before the stop (or still being
        accepted) gets STOP_GRACE for its request to arrive and be answered, as in the sync
        worker.  WebSocket: closed with 1012, a session that began during the stop too."""
        idle_before = monotonic() - STOP_GRACE
        for conn in list(self.state.connections):
            if conn.__class__ is HttpProtocol:
                conn.shutdown(idle_before)
            else:
                conn.shutdown()  # (idempotent: 1012 is sent once)

    async def shutdown(self) -> None:
        state = self.state
        state.stopping = True
        self.board.stopping(monotonic())
        for server in self.servers:
            server.close()  # no more accepting: other workers (or the next master) take over
        if self.balance is not None:
            if self.defer_timer is not None:
                self.defer_timer.cancel()
                self.defer_timer = None  # (a deferral of accepts ends with the accepting)
            self.update_watching()  # (stopping: unwatched before the sockets close)
        for sock in self.listeners:
            sock.close()
        if not self.quick:
            # close_idle runs at once and on every pass (WebSockets get 1012, idle HTTP
            # connections close).  Sockets accepted just before the stop whose hand-off to
            # the loop (a TLS handshake, say) is still under way get STOP_GRACE too:
            # cancelled at once with the hand-off, their clients were reset unanswered (a HUP
            # under load lost about one request in 40 runs of test_zero_downtime's asgi case)
            arrivals_until = monotonic() + STOP_GRACE
            deadline = await self.wait_graceful(
                lambda: bool(state.connections or state.tasks
                             or (self.arriving and monotonic() < arrivals_until)),
                0.02, self.close_idle)
            if not self.quick:
                await self.lifespan.shutdown(max(1.0, deadline - monotonic()))
        for conn in list(state.connections):
            conn.transport.abort()
        for task in [*state.tasks, *self.handoffs]:
            task.cancel()
        self.unwatch_signals_and_channel()


def _may_hand_on(conn: Any, since: float) -> bool:
    """An HTTP connection (not a WebSocket) active since ``since`` and not closing, whose
    response head has not gone out (closing after a head that said keep-alive could lose a
    request the client sent meanwhile)."""
    return (conn.__class__ is HttpProtocol and not (conn.hand_on or conn.closing)
            and (conn.idle_since >= since if conn.cycle is None else conn.cycle.framing is None))


def _may_unmark(conn: HttpProtocol) -> bool:
    return conn.cycle is None  # (else its response head may have said close already)
