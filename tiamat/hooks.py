"""Calling the user's server hooks (from the config file) safely.

Hooks come in two traditions: the original tiamat's take no arguments
(``before_fork()``), gunicorn's take the server and the worker (``pre_fork(server, worker)``).
:func:`call` passes as many of the documented arguments as the function accepts, and an
exception in a hook is logged, never allowed to kill the master or a worker.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, NamedTuple

log = logging.getLogger("tiamat.error")

_arity_cache: dict[int, int | None] = {}


def _arity(func: Any) -> int | None:
    """How many positional arguments ``func`` takes (None: any number)."""
    key = id(func)
    if key not in _arity_cache:
        try:
            params = inspect.signature(func).parameters.values()
        except (TypeError, ValueError):
            _arity_cache[key] = None
        else:
            if any(p.kind is p.VAR_POSITIONAL for p in params):
                _arity_cache[key] = None
            else:
                _arity_cache[key] = sum(
                    p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)
    return _arity_cache[key]


def call(cfg: Any, name: str, *args: Any) -> Any:
    """Call hook ``name`` if configured; returns its result, or None if it failed or is unset."""
    func = getattr(cfg, name, None)
    if func is None:
        return None
    arity = _arity(func)
    try:
        return func(*(args if arity is None else args[:arity]))
    except Exception:
        log.exception("hook %s raised", name)
        return None


class RequestResult(NamedTuple):
    """``resp`` in ``post_request(worker, req, environ, resp)``."""

    #: the status code sent (500 if the app failed before answering)
    status: int
    #: the app's status line ("200 OK"), None if it never called start_response
    status_line: str | None
    #: the app's response headers, as it gave them
    headers: list[tuple[str, str]]
    #: body bytes written
    sent: int
    keep_alive: bool


class RequestHooks:
    """pre_request / post_request for a WSGI handler; built only when one is configured,
    so the request path without them pays a single ``is None`` test."""

    __slots__ = ("base", "cfg", "post", "pre")

    def __init__(self, cfg: Any) -> None:
        from tiamat.workers import base  # base imports this module: import late, once

        self.base = base
        self.cfg = cfg
        self.pre = getattr(cfg, "pre_request", None) is not None
        self.post = getattr(cfg, "post_request", None) is not None

    @classmethod
    def for_config(cls, cfg: Any) -> RequestHooks | None:
        hooks = cls(cfg)
        return hooks if hooks.pre or hooks.post else None

    def before(self, req: Any) -> None:
        """``pre_request(worker, req)``; ``req`` is the :class:`tiamat.http.h1.RequestHead`."""
        if self.pre:
            call(self.cfg, "pre_request", self.base.current, req)

    def after(self, req: Any, environ: dict[str, Any], result: tuple[bool, int, int],
              status_line: str | None, headers: list[tuple[str, str]]) -> None:
        if self.post:
            keep_alive, status, sent = result
            call(self.cfg, "post_request", self.base.current, req, environ,
                 RequestResult(status, status_line, list(headers), sent, keep_alive))

