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
import os
import select
from time import monotonic, sleep
from typing import Any

from tiamat.asgi import proxy_tls
from tiamat.asgi.adapt import as_asgi3
from tiamat.asgi.http import HttpProtocol
from tiamat.asgi.lifespan import Lifespan
from tiamat.asgi.state import ServerState
from tiamat.workers.aio import AioWorker
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


#: see tiamat.workers.sync: connections held before stepping aside in a burst, and for how long
SPREAD_AFTER = 16
SPREAD_PAUSE = 0.0001


def _pending(socks: list[Any]) -> bool:
    """Whether a connection waits in the backlog of one of the listening sockets."""
    poller = select.poll()
    for sock in socks:
        poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


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
        # Several workers share the listening socket and the loop accepts every pending
        # connection at once, so the first worker to run would take a whole burst (wrk's 64
        # keep-alive connections split 46/18).  The factory runs once per accepted
        # connection, inside that accept loop: yielding the CPU there lets a sibling woken
        # for the same burst take its share (33/31; docs/benchmarks.md, "Even load").
        spread = self.cfg.workers > 1
        listeners = self.listeners

        def factory() -> HttpProtocol:
            if spread:
                # as SyncWorker._step_aside: yield; in a burst, once this worker holds
                # SPREAD_AFTER connections and more wait, pause a moment instead
                if len(state.connections) >= SPREAD_AFTER and _pending(listeners):
                    sleep(SPREAD_PAUSE)
                else:
                    os.sched_yield()
            return HttpProtocol(state)

        self.factory, self.tls = factory, tls
        self.servers: list[asyncio.AbstractServer] = []
        self.accept_paused = False
        state.on_full, state.on_room = self.pause_accepting, self.resume_accepting
        await self.listen()
        await self.serve_until_stopped()
        await self.shutdown()

    # --- accepting --------------------------------------------------------------------------
    async def listen(self) -> None:
        """Accept on every listener (through duplicates: pausing closes them, not the originals)."""
        if self.state.stopping:
            return  # (resumed just before the stop: the listeners may be closed already)
        if self.proxy_tls:
            servers: list[Any] = [proxy_tls.Listener(sock.dup(), self.state, self.factory)
                                  for sock in self.listeners]
        else:
            servers = [await self.loop.create_server(self.factory, sock=sock.dup(),
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

    def resume_accepting(self) -> None:
        if self.accept_paused and not self.state.stopping:
            self.accept_paused = False
            self.loop.create_task(self.listen())

    # --- the loop's housekeeping ------------------------------------------------------------
    def on_tick(self) -> None:
        """Twice a second: prove liveness, expire idle/slow connections, ping WebSockets."""
        now = monotonic()
        self.beat(now)
        for conn in list(self.state.connections):
            if conn.deadline <= now:
                conn.expire(now)
            elif conn.__class__ is not HttpProtocol:
                conn.tick(now)

    # --- stopping ---------------------------------------------------------------------------
    def close_idle(self) -> None:
        """HTTP: idle connections close now, busy ones after their response; one accepted
        just before the stop (or still being accepted) gets STOP_GRACE for its request to
        arrive and be answered, as in the sync worker."""
        idle_before = monotonic() - STOP_GRACE
        for conn in list(self.state.connections):
            if conn.__class__ is HttpProtocol:
                conn.shutdown(idle_before)

    async def shutdown(self) -> None:
        state = self.state
        state.stopping = True
        self.board.stopping(monotonic())
        for server in self.servers:
            server.close()  # no more accepting: other workers (or the next master) take over
        for sock in self.listeners:
            sock.close()
        if not self.quick:
            for conn in list(state.connections):
                if conn.__class__ is not HttpProtocol:
                    conn.shutdown()  # WebSocket: close 1012
            deadline = await self.wait_graceful(
                lambda: bool(state.connections or state.tasks), 0.02, self.close_idle)
            if not self.quick:
                await self.lifespan.shutdown(max(1.0, deadline - monotonic()))
        for conn in list(state.connections):
            conn.transport.abort()
        for task in list(state.tasks):
            task.cancel()
        self.unwatch_signals_and_channel()
