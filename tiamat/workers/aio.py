"""The event-loop part every asyncio worker class shares (``-k asgi`` and ``-k tcp``).

Both classes run one asyncio loop per worker and need the same plumbing around it: the
loop made from ``--loop``, signals and master messages watched with ``loop.add_reader``
(uvloop installs its own wake-up fd while it runs, so ours is set again inside the loop),
a timer that proves liveness with :meth:`Worker.beat`, and one ``stopped`` event that
ends the class's ``serve()`` once ``alive`` turns false.  Keeping that here means a fix
to how an asyncio worker notices a stop is made once.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from time import monotonic

from tiamat.asgi.loop import new_event_loop
from tiamat.workers.base import Worker

#: how often the loop timer beats (and runs the class's periodic work)
TICK = 0.5


class AioWorker(Worker):
    """A :class:`Worker` whose ``run()`` is an asyncio loop; subclasses write ``serve()``."""

    loop: asyncio.AbstractEventLoop
    stopped: asyncio.Event

    def make_loop(self) -> None:
        """Create this worker's event loop (``--loop``) and make it the current one."""
        self.loop = new_event_loop(self.cfg.loop)
        asyncio.set_event_loop(self.loop)

    def watch_signals_and_channel(self) -> None:
        """From inside the running loop: wake on signals and on master messages."""
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self.stopped = asyncio.Event()
        self.loop.add_reader(self.wake_fd, self.on_wakeup)
        self.loop.add_reader(self.channel.sock.fileno(), self.on_channel)

    def unwatch_signals_and_channel(self) -> None:
        self.loop.remove_reader(self.wake_fd)
        self.loop.remove_reader(self.channel.sock.fileno())

    async def serve_until_stopped(self) -> None:
        """Start the beat timer, say ready, and wait until the worker is told to stop."""
        self.tick()
        self.notify_ready()
        if self.alive:
            await self.stopped.wait()

    async def wait_graceful(self, busy: Callable[[], bool], poll: float,
                            step: Callable[[], None] | None = None) -> float:
        """The graceful part of a stop, the same for every asyncio class: while ``busy()``,
        call ``step`` (if any) and poll, for at most ``--graceful-timeout`` and not at all
        on a quick stop.  Returns the deadline, for what the class still has to end."""
        deadline = monotonic() + self.cfg.graceful_timeout
        while busy() and not self.quick and monotonic() < deadline:
            if step is not None:
                step()
            await asyncio.sleep(poll)
        return deadline

    def tick(self) -> None:
        """Every :data:`TICK` seconds: beat, run :meth:`on_tick`, notice a stop."""
        self.on_tick()
        self.stop_if_not_alive()
        self.loop.call_later(TICK, self.tick)

    def on_tick(self) -> None:
        """The periodic work of a subclass; the default only proves liveness."""
        self.beat()

    def on_wakeup(self) -> None:
        self.handle_wakeup()
        self.stop_if_not_alive()

    def on_channel(self) -> None:
        self.handle_channel()
        self.stop_if_not_alive()

    def stop_if_not_alive(self) -> None:
        if not self.alive:
            self.stopped.set()
