"""Worker classes, one module each, and how a ``-k`` name becomes a class.

Built in: ``sync`` (tiamat.workers.sync), ``thread`` (WSGI on a thread pool), ``asgi``
(asyncio: HTTP, WebSocket, lifespan) and ``tcp`` (raw TCP handlers).  A dotted path
(``pkg.mod:Class`` or ``pkg.mod.Class``) loads a user's subclass of
:class:`tiamat.workers.base.Worker`; uvicorn's worker classes are accepted as ``asgi`` so
gunicorn command lines migrate unchanged.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from tiamat.workers.base import Worker

#: ``-k`` name -> "module:Class"; imported only when chosen, so unused classes cost nothing
BUILTIN: dict[str, str] = {
    "sync": "tiamat.workers.sync:SyncWorker",
    "thread": "tiamat.workers.thread:ThreadWorker",
    "gthread": "tiamat.workers.thread:ThreadWorker",
    "asgi": "tiamat.workers.asgi:AsgiWorker",
    "tcp": "tiamat.workers.tcp:TcpWorker",
}

#: gunicorn/uvicorn spellings accepted so existing command lines keep working
ALIASES: dict[str, str] = {
    "uvicorn.workers.UvicornWorker": "asgi",
    "uvicorn.workers.UvicornH11Worker": "asgi",
    "uvicorn_worker.UvicornWorker": "asgi",
    "uvicorn_worker.UvicornH11Worker": "asgi",
}

log = logging.getLogger("tiamat.error")


class WorkerClassError(Exception):
    """The ``-k`` value names no usable worker class."""


def _import(path: str) -> Any:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise WorkerClassError(f"cannot load worker class {path!r}: {exc}") from None


def resolve(name: str, app_interface: str = "wsgi", threads: int = 1) -> type[Worker]:
    """The worker class for ``-k name``; ``auto`` picks by the app's interface."""
    if name == "auto":
        if app_interface == "asgi":
            name = "asgi"
        elif app_interface == "tcp":
            name = "tcp"
        else:
            name = "thread" if threads > 1 else "sync"
    alias = ALIASES.get(name)
    if alias is not None:
        log.info("worker class %s: using tiamat's %s worker instead", name, alias)
        name = alias
    target = BUILTIN.get(name, name)
    if name not in BUILTIN and "." not in name and ":" not in name:
        known = ", ".join(sorted(BUILTIN))
        raise WorkerClassError(f"unknown worker class {name!r} (choose from {known}, "
                               "or give a dotted path)")
    cls = _import(target)
    if not (isinstance(cls, type) and issubclass(cls, Worker)):
        raise WorkerClassError(f"{name!r} is not a subclass of tiamat.workers.base.Worker")
    return cls
