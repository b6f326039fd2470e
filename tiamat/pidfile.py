"""The pidfile: written atomically, never clobbering a live server's, removed on exit."""

from __future__ import annotations

import os


class PidfileError(Exception):
    """The pidfile names a server that is still running."""


def read_pid(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write(path: str, pid: int) -> None:
    """Write ``pid`` to ``path`` via a temporary file and rename (readers never see half)."""
    other = read_pid(path)
    if other is not None and other != pid and is_running(other):
        raise PidfileError(f"pidfile {path} names a running process ({other}); is tiamat "
                           "already running?")
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{pid}.tmp")
    with open(tmp, "w", encoding="ascii") as f:
        f.write(f"{pid}\n")
    os.replace(tmp, path)


def remove(path: str, pid: int) -> None:
    """Remove the pidfile if it is still ours."""
    if read_pid(path) == pid:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
