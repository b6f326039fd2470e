"""One ASGI 3 callable from whatever the app loader returned.

ASGI 3 apps pass through.  ASGI 2 apps (a class, or a callable taking only the scope, that
returns an awaitable taking ``receive, send``) are wrapped.  A WSGI app runs on a thread
pool behind an adapter (a2wsgi when installed, else asgiref), so ``-k asgi`` serves any app.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from tiamat.apploader import is_asgi

log = logging.getLogger("tiamat.error")

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def interface_of(app: Any) -> str:
    """``"asgi3"``, ``"asgi2"`` or ``"wsgi"``."""
    if inspect.isclass(app):
        return "asgi2" if is_asgi(app) else "wsgi"
    if is_asgi(app):
        return "asgi3"
    try:
        params = [p for p in inspect.signature(app).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                  and p.default is p.empty]
    except (TypeError, ValueError):
        return "wsgi"
    return "asgi2" if len(params) == 1 else "wsgi"


def asgi2_to_3(app: Any) -> ASGIApp:
    async def asgi3(scope: dict[str, Any], receive: Any, send: Any) -> None:
        instance = app(scope)
        await instance(receive, send)

    return asgi3


def wsgi_to_asgi(app: Any, threads: int) -> ASGIApp:
    """Run a WSGI app on ``threads`` threads behind a2wsgi (preferred) or asgiref."""
    try:
        from a2wsgi import WSGIMiddleware
    except ImportError:
        try:
            from asgiref.wsgi import WsgiToAsgi
        except ImportError:
            raise RuntimeError("a WSGI app under -k asgi needs a2wsgi or asgiref "
                               "(pip install 'tiamat[asgi]'), or run it with -k sync") from None
        return WsgiToAsgi(app)  # type: ignore[no-any-return]
    return WSGIMiddleware(app, workers=max(1, threads))  # type: ignore[no-any-return]


def as_asgi3(app: Any, threads: int = 10, declared: str = "auto") -> tuple[ASGIApp, str]:
    """``(asgi3_app, interface)`` for any app the loader returns; ``declared`` is
    ``--interface`` (``asgi`` or ``wsgi`` override the detection)."""
    interface = interface_of(app)
    if declared == "wsgi":
        interface = "wsgi"
    elif declared == "asgi" and interface == "wsgi":
        interface = "asgi3"
    if interface == "asgi3":
        return app, interface
    if interface == "asgi2":
        return asgi2_to_3(app), interface
    log.info("serving a WSGI app under -k asgi through a thread pool adapter")
    return wsgi_to_asgi(app, threads), interface
