"""``-D/--daemon``: detach from the terminal (double fork, setsid) before the master starts."""

from __future__ import annotations

import os
import sys
from typing import Any


def daemonize(cfg: Any) -> None:
    """Double-fork and setsid; stdin from /dev/null, stdout/stderr to the configured files."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir(cfg.chdir or "/")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    out = _open_append(cfg.stdout_path) if cfg.stdout_path else null
    err = _open_append(cfg.errorlog) if cfg.errorlog and cfg.errorlog != "-" else null
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


def _open_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
