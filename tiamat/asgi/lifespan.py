"""The ASGI lifespan protocol: startup runs before a worker serves, shutdown after it stops.

``--lifespan auto``: an app that raises before completing startup is taken not to support
lifespan, and the worker serves without it.  ``on``: that is an error.  Either way an app
that sends ``lifespan.startup.failed`` fails the boot, so the master reports it and exits
instead of respawning workers that cannot work.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("tiamat.error")


class LifespanStartupFailed(Exception):
    """The app reported (or raised during) a failed startup; the worker cannot serve."""


class Lifespan:
    """Runs the app's lifespan task for the life of one worker."""

    def __init__(self, app: Any, mode: str) -> None:
        self.app = app
        self.mode = mode
        #: the dict the app fills during startup; each request scope gets a shallow copy
        self.state: dict[str, Any] = {}
        self.supported = mode != "off"
        self.task: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[dict[str, Any]] | None = None
        self._startup_done: asyncio.Event | None = None
        self._shutdown_done: asyncio.Event | None = None
        self._failed: str | None = None
        self._started = False

    async def startup(self) -> None:
        """Send ``lifespan.startup`` and wait for the answer; raise LifespanStartupFailed."""
        if not self.supported:
            return
        self._queue = asyncio.Queue()
        self._startup_done = asyncio.Event()
        self._shutdown_done = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._main())
        await self._queue.put({"type": "lifespan.startup"})
        await self._startup_done.wait()
        if self._failed is not None:
            # frameworks send the whole traceback as the message: log it, keep one line
            lines = [line for line in self._failed.strip().splitlines() if line.strip()]
            if len(lines) > 1:
                log.error("application startup failed:\n%s", self._failed.rstrip())
            raise LifespanStartupFailed(
                f"application startup failed: {lines[-1].strip() if lines else self._failed}")

    async def shutdown(self, timeout: float) -> None:
        """Send ``lifespan.shutdown`` and wait (at most ``timeout`` s) for the app to finish."""
        if not self.supported or not self._started or self.task is None or self.task.done():
            return
        assert self._queue is not None and self._shutdown_done is not None
        await self._queue.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(self._shutdown_done.wait(), timeout or None)
        except asyncio.TimeoutError:
            log.warning("lifespan shutdown did not finish in %.0fs", timeout)
        if self._failed is not None:
            log.error("application shutdown failed: %s", self._failed)

    async def _main(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.3"},
                 "state": self.state}
        try:
            await self.app(scope, self._receive, self._send)
        except BaseException as exc:
            if self._failed is not None:
                pass  # already reported through lifespan.*.failed
            elif not self._started and self.mode == "auto":
                log.info("ASGI 'lifespan' protocol appears unsupported (%s: %s); continuing "
                         "without it", type(exc).__name__, exc)
                self.supported = False
            elif not self._started:
                self._failed = f"{type(exc).__name__}: {exc}"
                log.error("exception in the lifespan startup", exc_info=exc)
            else:
                log.error("exception in the lifespan protocol", exc_info=exc)
            if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            assert self._startup_done is not None and self._shutdown_done is not None
            if not self._started and self._failed is None and not self._startup_done.is_set():
                if self.mode == "on":
                    self._failed = "the app returned without completing startup"
                else:
                    self.supported = False
            self._startup_done.set()
            self._shutdown_done.set()

    async def _receive(self) -> dict[str, Any]:
        assert self._queue is not None
        return await self._queue.get()

    async def _send(self, message: dict[str, Any]) -> None:
        assert self._startup_done is not None and self._shutdown_done is not None
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self._started = True
            self._startup_done.set()
        elif kind == "lifespan.startup.failed":
            self._failed = message.get("message") or "lifespan.startup.failed"
            self._startup_done.set()
        elif kind == "lifespan.shutdown.complete":
            self._shutdown_done.set()
        elif kind == "lifespan.shutdown.failed":
            self._failed = message.get("message") or "lifespan.shutdown.failed"
            self._shutdown_done.set()
        else:
            raise RuntimeError(f"unexpected lifespan message {kind!r}")
