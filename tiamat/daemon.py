"""``-D/--daemon``: detach from the terminal, and report back when the server answers.

The command the user ran forks, and waits on a pipe: the daemon (after a second fork and
``setsid``) writes ``ready`` once its first workers serve, or ``error CODE MESSAGE`` when
it cannot start; EOF without either means it died.  So ``tiamat -D app`` returns 0 only
once requests can be served, and otherwise prints the error and exits with its code, which
is what init scripts and deploy tools need.

The daemon keeps the current directory unless ``working_directory`` (``--chdir``) is set:
relative paths on the command line (the app, the config file) must keep working for
workers and for a USR2 re-exec.
"""

from __future__ import annotations

import os
import sys
from typing import Any

#: write end of the status pipe in the daemon (the master) until it has reported
_status_fd = -1
#: set (by tiamat.master) in the environment of a master started by USR2
REEXEC_ENV = "TIAMAT_READY_FD"


def daemonize(cfg: Any) -> None:
    """Double-fork and setsid; stdin from /dev/null, stdout/stderr to the configured files.

    Returns only in the daemon; the original process exits with the server's verdict.
    """
    global _status_fd
    if os.environ.get(REEXEC_ENV):
        return  # a master re-executed by USR2: its predecessor already detached
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        os.close(write_end)
        os._exit(_wait_for_verdict(read_end))
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    _status_fd = write_end
    if cfg.chdir:
        os.chdir(cfg.chdir)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
    reopen_std_streams(cfg)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)


def _wait_for_verdict(fd: int) -> int:
    chunks = []
    while True:
        try:
            data = os.read(fd, 4096)
        except InterruptedError:
            continue
        if not data:
            break
        chunks.append(data)
    text = b"".join(chunks).decode(errors="replace").strip()
    if text.startswith("ready"):
        return 0
    if text.startswith("error "):
        _, code, message = [*text.split(" ", 2), ""][:3]
        print(f"tiamat: {message}", file=sys.stderr)
        return int(code) if code.lstrip("-").isdigit() and int(code) > 0 else 1
    print("tiamat: the daemon exited before it was ready (see the error log)", file=sys.stderr)
    return 1


def report_ready() -> None:
    """The server answers: let the waiting command exit 0 (no-op when not daemonized)."""
    _report("ready\n")


def report_failure(code: int, message: str) -> None:
    _report(f"error {code} {message}\n")


def _report(text: str) -> None:
    global _status_fd
    if _status_fd < 0:
        return
    try:
        os.write(_status_fd, text.encode())
    except OSError:
        pass
    close_status_fd()


def close_status_fd() -> None:
    """Called in every forked worker: only the master may answer the waiting command."""
    global _status_fd
    if _status_fd >= 0:
        try:
            os.close(_status_fd)
        except OSError:
            pass
        _status_fd = -1


def reopen_std_streams(cfg: Any) -> None:
    """Point fd 1 at ``stdout_path`` and fd 2 at ``stderr_path`` (the error log file).

    Used when daemonizing and again on USR1, so logrotate can move those files too.
    Only a daemon's standard streams are redirected; in the foreground they stay where
    the user sent them.
    """
    if not cfg.daemon:
        return
    if cfg.stdout_path:
        _redirect(1, cfg.stdout_path)
    if cfg.errorlog and cfg.errorlog != "-":
        _redirect(2, cfg.errorlog)


def _redirect(target: int, path: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as exc:
        print(f"tiamat: cannot open {path}: {exc.strerror}", file=sys.stderr)
        return
    os.dup2(fd, target)
    os.close(fd)
