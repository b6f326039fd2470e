"""Calling the user's server hooks (from the config file) safely.

Hooks come in two traditions: the original tiamat's take no arguments
(``before_fork()``), gunicorn's take the server and the worker (``pre_fork(server, worker)``).
:func:`call` passes as many of the documented arguments as the function accepts, and an
exception in a hook is logged, never allowed to kill the master or a worker.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

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
