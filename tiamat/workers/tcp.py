"""``-k tcp``: any TCP server, not only HTTP (the original tiamat's promise).

The app is either ``async def handle(reader, writer)`` (asyncio streams, one task per
connection on the worker's event loop) or ``def handle(sock, addr)`` (a blocking socket,
run on a pool of ``--threads`` threads; while every thread is busy the worker stops
accepting, so new clients wait in the backlog for another worker).

Master, signals, liveness and graceful stop work as for the HTTP classes: on a graceful
stop the worker closes its listeners, lets running handlers finish for up to
``--graceful-timeout`` and then cancels (async) or abandons (threads) what is left.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from time import monotonic
from typing import Any

from tiamat.sockets import ACCEPT_RETRY, AcceptPaused, accept_next
from tiamat.workers.aio import AioWorker

log = logging.getLogger("tiamat.error")


def is_async_handler(app: Any) -> bool:
    if inspect.iscoroutinefunction(app):
        return True
    return inspect.iscoroutinefunction(getattr(app, "__call__", None))  # noqa: B004


class TcpWorker(AioWorker):
    """Serves raw TCP connections to ``handle(reader, writer)`` or ``handle(sock, addr)``."""

    interface = "tcp"

    def init_app(self) -> None:
        self.make_loop()
        self.is_async = is_async_handler(self.app)
        self.tasks: set[asyncio.Task[None]] = set()
        self.busy = 0
        self.nthreads = max(1, self.cfg.threads)
        self.pool: ThreadPoolExecutor | None = None
        self.accepting = False

    def run(self) -> None:
        self.loop.run_until_complete(self.serve())

    async def serve(self) -> None:
        self.watch_signals_and_channel()
        servers: list[asyncio.AbstractServer] = []
        if self.is_async:
            servers = [await asyncio.start_server(self.on_client, sock=sock, backlog=self.cfg.backlog)
                       for sock in self.listeners]
        else:
            self.pool = ThreadPoolExecutor(self.nthreads, thread_name_prefix="tiamat-tcp")
            for sock in self.listeners:
                sock.setblocking(False)
            self.set_accepting(True)
        await self.serve_until_stopped()
        await self.shutdown(servers)

    # --- async handlers -------------------------------------------------------------------
    async def on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.app(reader, writer)
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("Exception in TCP handler")
        finally:
            self.tasks.discard(task)
            writer.close()
            self.board.idle(monotonic())
            self.count_request()

    # --- blocking handlers on the thread pool -----------------------------------------------------
    def set_accepting(self, on: bool) -> None:
        if on == self.accepting:
            return
        for sock in self.listeners:
            if on:
                self.loop.add_reader(sock.fileno(), self.on_acceptable, sock)
            else:
                self.loop.remove_reader(sock.fileno())
        self.accepting = on

    def on_acceptable(self, listener: socket.socket) -> None:
        while self.busy < self.nthreads and self.alive:
            try:
                got = accept_next(listener)
            except AcceptPaused:  # (a finished handler resumes it sooner)
                self.set_accepting(False)
                self.loop.call_later(ACCEPT_RETRY, self.resume_accepting)
                return
            if got is None:
                return
            sock, addr = got
            sock.setblocking(True)
            self.busy += 1
            future = self.loop.run_in_executor(self.pool, self.run_blocking, sock, addr)
            future.add_done_callback(self.on_blocking_done)
        self.set_accepting(False)  # every thread is busy: leave clients in the backlog

    def resume_accepting(self) -> None:
        if self.alive and self.busy < self.nthreads:
            self.set_accepting(True)

    def run_blocking(self, sock: socket.socket, addr: Any) -> None:
        try:
            self.app(sock, addr)
        except Exception:
            log.exception("Exception in TCP handler")
        finally:
            sock.close()

    def on_blocking_done(self, _: Any) -> None:
        self.busy -= 1
        self.board.idle(monotonic())
        self.count_request()
        if self.alive:
            self.set_accepting(True)
        else:
            self.stopped.set()

    # --- stopping ---------------------------------------------------------------------------
    async def shutdown(self, servers: list[asyncio.AbstractServer]) -> None:
        self.board.stopping(monotonic())
        for server in servers:
            server.close()
        if not self.is_async:
            self.set_accepting(False)
            for sock in self.listeners:
                sock.close()
        await self.wait_graceful(lambda: bool(self.tasks or self.busy), 0.05)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1.0)
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
