"""The per-worker channel between master and worker: a SOCK_SEQPACKET socketpair.

Created before the fork; each ``send`` is one message (boundaries are kept by the kernel),
pickled.  A message is a tuple whose first item names it.

Worker -> master: ``("ready",)``, ``("boot_error", code, text[, details])``,
``("message", obj)`` (for the ``on_message`` hook), ``("broadcast", obj)`` (relay ``obj`` to
every worker), ``("recycle", requests)`` (max-requests reached: please replace me), and the
mold's messages (``tiamat.refork``).

Master -> worker: ``("message", obj)`` (``tiamat.worker.on_message`` callbacks),
``("reopen_logs",)`` (USR1), ``("stop",)``, ``("mold", generation)``.

EOF on the worker's end means the master is gone, and the worker exits.  Liveness does not
travel here: it is in the shared-memory scoreboard (``tiamat.scoreboard``).
"""

from __future__ import annotations

import pickle
import select
import socket
from typing import Any

MAX_MESSAGE = 256 * 1024


class Channel:
    """One end of the pair; never blocks for long on either side."""

    __slots__ = ("sock",)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def pair(cls) -> tuple[Channel, Channel]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (a, b):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_MESSAGE * 2)
            s.setblocking(False)
        return cls(a), cls(b)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, *message: Any) -> bool:
        """Send one message; False if the other side is gone or stays full for 2 seconds.

        Raises ValueError for a message that cannot be pickled or is too large, so a
        caller of the public API learns about it.
        """
        try:
            data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise ValueError(f"message cannot be pickled: {exc}") from None
        if len(data) > MAX_MESSAGE:
            raise ValueError(f"message too large ({len(data)} bytes, at most {MAX_MESSAGE})")
        for _ in range(2):
            try:
                self.sock.send(data)
                return True
            except (BlockingIOError, InterruptedError):
                select.select([], [self.sock], [], 2.0)
            except OSError:
                return False
        return False

    def receive(self) -> list[tuple[Any, ...]] | None:
        """Every message waiting now; None once the other side has closed."""
        messages = []
        while True:
            try:
                data = self.sock.recv(MAX_MESSAGE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                return None
            if not data:
                return messages or None
            try:
                messages.append(pickle.loads(data))
            except Exception:
                continue
        return messages

    def close(self) -> None:
        self.sock.close()
