"""The public API an application uses from inside a worker process.

::

    from tiamat import worker

    worker.on_message(lambda msg: cache.clear() if msg == "invalidate" else None)

    def app(environ, start_response):
        worker.broadcast("invalidate")      # every worker (this one too) gets it
        worker.post_message({"hits": 3})    # the master's on_message hook gets it
        ...

Messages travel over the per-worker channel to the master (the original tiamat's
``Worker.postMessage``); they must be picklable and at most 256 KiB once pickled.
Callbacks run in the worker's own loop, between requests, never in a signal handler.
Outside a tiamat worker (tests, ``python app.py``) :func:`worker_id` is None,
:func:`post_message` and :func:`broadcast` return False and callbacks are kept but never called.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from tiamat.workers import base

_pending: list[Callable[[Any], None]] = []


def current() -> base.Worker | None:
    """The :class:`~tiamat.workers.base.Worker` running in this process, if any."""
    return base.current


def worker_id() -> int | None:
    """This worker's stable slot number (0..N-1), as in ``$TIAMAT_WORKER_ID``."""
    worker = base.current
    if worker is not None:
        return worker.slot
    value = os.environ.get("TIAMAT_WORKER_ID", "")
    return int(value) if value.isdigit() else None


def post_message(obj: Any) -> bool:
    """Send ``obj`` to the master (the ``on_message(server, worker, message)`` hook).

    Returns False outside a worker or when the master is gone; raises ValueError when
    ``obj`` cannot be pickled or is too large.
    """
    worker = base.current
    if worker is None:
        return False
    return worker.channel.send("message", obj)


def broadcast(obj: Any) -> bool:
    """Ask the master to deliver ``obj`` to every worker, this one included."""
    worker = base.current
    if worker is None:
        return False
    return worker.channel.send("broadcast", obj)


def on_message(callback: Callable[[Any], None]) -> Callable[[Any], None]:
    """Register ``callback(message)`` for messages from the master; usable as a decorator.

    May be called at import time of the app (before the worker object exists): the
    callback is attached when the worker boots.
    """
    worker = base.current
    if worker is None:
        _pending.append(callback)
    else:
        worker.message_callbacks.append(callback)
    return callback


def take_pending() -> list[Callable[[Any], None]]:
    """Callbacks registered before the worker existed (the base class collects them)."""
    callbacks = list(_pending)
    _pending.clear()
    return callbacks
