"""What every connection of one asgi worker shares, computed once per worker."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from time import monotonic
from typing import Any

from tiamat import accesslog, hooks, metrics, tls
from tiamat.http import reader_factory
from tiamat.http.h1 import RequestReader
from tiamat.http.proxy import ForwardedRules
from tiamat.http.response import CHUNKED_HEADER, Framing, decide_framing, status_line

ASGI_VERSION = {"version": "3.0", "spec_version": "2.4"}


class ServerState:
    """Per-worker settings and bookkeeping, read by every protocol instance."""

    def __init__(self, app: Any, cfg: Any, loop: asyncio.AbstractEventLoop, worker: Any,
                 lifespan_state: dict[str, Any] | None, ws_factory: Any) -> None:
        self.app = app
        self.cfg = cfg
        self.loop = loop
        self.worker = worker
        self.new_reader: Callable[[], RequestReader] = reader_factory(cfg)
        self.keepalive = cfg.keepalive
        self.server_keep_alive = cfg.keepalive > 0
        self.header_timeout = cfg.header_timeout or 1e9
        self.body_timeout = cfg.body_timeout or 1e9
        self.send_timeout = cfg.send_timeout or 1e9
        self.limit_concurrency = cfg.limit_concurrency
        self.root_path = cfg.root_path.rstrip("/")
        self.root_path_bytes = self.root_path.encode("latin-1")
        #: raw request path -> the scope's (path, raw_path) (see asgi.http._scope_path)
        self.paths: dict[bytes, tuple[str, bytes]] = {}
        #: --forwarded-allow-ips: trusted per connection, applied per request
        self.forwarded = ForwardedRules.from_config(cfg)
        #: --proxy-protocol: peers allowed to send a PROXY header (None: off)
        self.proxy_mode = cfg.proxy_protocol
        self.proxy_peers = ForwardedRules(cfg.proxy_allow_ips) if self.proxy_mode != "off" else None
        #: the TLS context for every listener (None: plain HTTP)
        self.ssl = tls.server_context(cfg)
        self.scheme = "https" if self.ssl is not None else "http"
        #: None when off, so a request pays one test and builds nothing
        self.access_log = accesslog.for_worker(cfg)
        self.recorder = metrics.recorder(threaded=False)
        #: logs and counts the error responses the protocol writes itself (None: both off)
        self.refusals = accesslog.refusals(self.access_log, self.recorder)
        #: pre_request / post_request (the scope stands in for the WSGI environ)
        self.request_hooks = hooks.RequestHooks.for_config(cfg)
        self.observed = (self.access_log is not None or self.recorder is not None
                         or self.request_hooks is not None)
        self.lifespan_state = lifespan_state
        #: None when WebSocket is off (``--ws none``); else makes a WebSocket protocol
        self.ws_factory = ws_factory
        #: every open connection's protocol (HTTP and WebSocket)
        self.connections: set[Any] = set()
        #: --worker-connections: at this many the worker stops accepting (on_full), and
        #: starts again once one closes (on_room); the worker sets both callbacks
        self.max_connections: int = cfg.worker_connections
        self.on_full: Callable[[], None] | None = None
        self.on_room: Callable[[], None] | None = None
        #: running ASGI tasks (requests and WebSocket sessions)
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False
        #: decide_framing's answers and the head parts that follow from them, by framing's
        #: arguments (read directly on the hot path; framing fills it)
        self.framings: dict[tuple[Any, ...], tuple[Framing, bytes, bytes]] = {}

    def framing(self, status: int, no_length: bool, method: bytes, version: str,
                keep_alive: bool) -> tuple[Framing, bytes, bytes]:
        """``(framing, status line, Transfer-Encoding line or b"")`` of a response:
        decide_framing's answer and the head parts that follow from it (the head ends with
        the core's ``head_end``, as for WSGI).

        Memoised: these few values repeat nearly every response, and a lookup costs less
        than decide_framing's call and building the status line."""
        key = (status, no_length, method, version, keep_alive)
        parts = self.framings.get(key)
        if parts is None:
            framing = decide_framing(status, None if no_length else 0, method, version,
                                     keep_alive, self.server_keep_alive)
            parts = (framing, status_line(status), CHUNKED_HEADER if framing.chunked else b"")
            if len(self.framings) >= 256:  # (statuses an app invents: stay bounded)
                self.framings.clear()
            self.framings[key] = parts
        return parts

    def connection_closed(self, protocol: Any) -> None:
        connections = self.connections
        connections.discard(protocol)
        if self.on_room is not None and len(connections) < self.max_connections:
            self.on_room()

    def request_done(self) -> None:
        """Count one finished request for the scoreboard and --max-requests."""
        worker = self.worker
        if worker is not None:
            worker.board.idle(monotonic())
            worker.count_request()
