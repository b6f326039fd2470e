"""Linux's ``prctl(2)``, reached through ctypes: the one loader for the features that need it
(``--refork-after``'s subreaper, the thread class's timer slack).  ctypes is imported only
when one of them asks (~7 M instructions of a start that does not need it)."""

from __future__ import annotations

import sys
from collections.abc import Callable

PR_SET_TIMERSLACK = 29
PR_SET_CHILD_SUBREAPER = 36


def load() -> Callable[[int, int, int, int, int], int] | str:
    """``prctl(option, arg2, arg3, arg4, arg5)`` (errno kept for ``ctypes.get_errno()``), or
    why it cannot be had."""
    if not sys.platform.startswith("linux"):
        return f"prctl is Linux-only (this is {sys.platform})"
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError) as exc:
        return f"prctl is unavailable: {exc}"
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl  # type: ignore[no-any-return]
