"""The readiness loop's poller for the sync and thread workers: epoll, with a data per fd.

It keeps the part of :mod:`selectors` those workers use (``register``/``modify``/
``unregister`` a file object with events and a data object), but :meth:`Poller.poll` hands
back epoll's own ``(fd, events)`` list, and the loop finds each fd's data in :attr:`data`
with one dict lookup.  ``selectors.select()`` instead runs a Python loop over the ready fds
that builds a key lookup and a ``(key, events)`` tuple for each: with one ready fd per
request, that was about 4 % of a plain hello's instructions.

Level-triggered, like selectors (an fd stays ready until it is read), unless registered
with EDGE: the sync and thread workers watch plain connections edge-triggered.
"""

from __future__ import annotations

import select
import selectors
from typing import Any, Protocol

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE
#: with READ: edge-triggered (EPOLLET): reported when bytes arrive, not while any are waiting,
#: so the reader must read until a short read (see SyncWorker.conn_read)
EDGE = 4


class _HasFileno(Protocol):
    def fileno(self) -> int: ...


def _fd(fileobj: int | _HasFileno) -> int:
    return fileobj if isinstance(fileobj, int) else fileobj.fileno()


#: in an event: the peer closed (its side, or both).  Edge-triggered, a close that comes with
#: the last bytes is reported once, with them: the reader must read once more to see it
HANGUP = select.EPOLLRDHUP | select.EPOLLHUP


def _mask(events: int) -> int:
    return ((select.EPOLLIN if events & READ else 0) | (select.EPOLLOUT if events & WRITE else 0)
            | (select.EPOLLET | select.EPOLLRDHUP if events & EDGE else 0))


class Poller:
    """An epoll set (level-triggered unless EDGE) where each registered fd carries a data
    object."""

    __slots__ = ("_epoll", "_events", "data")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        #: fd -> the data it was registered with (the loop's lookup after :meth:`poll`)
        self.data: dict[int, Any] = {}
        self._events: dict[int, int] = {}

    def register(self, fileobj: int | _HasFileno, events: int, data: Any) -> None:
        """Watch ``fileobj`` for ``events`` (READ/WRITE); KeyError if it is watched already."""
        fd = _fd(fileobj)
        if fd in self.data:
            raise KeyError(f"fd {fd} is already registered")
        self._epoll.register(fd, _mask(events))
        self.data[fd] = data
        self._events[fd] = events

    def modify(self, fileobj: int | _HasFileno, events: int, data: Any) -> None:
        """Change what a watched ``fileobj`` waits for; KeyError if it is not watched."""
        fd = _fd(fileobj)
        if self._events[fd] != events:
            self._epoll.modify(fd, _mask(events))
            self._events[fd] = events
        self.data[fd] = data

    def unregister(self, fileobj: int | _HasFileno) -> None:
        """Stop watching ``fileobj``; KeyError if it is not watched."""
        fd = _fd(fileobj)
        del self.data[fd]
        del self._events[fd]
        try:
            self._epoll.unregister(fd)
        except OSError:  # closed already: the kernel dropped it from the set itself
            pass

    def events(self, fileobj: int | _HasFileno) -> int:
        """What a watched ``fileobj`` waits for; KeyError if it is not watched."""
        return self._events[_fd(fileobj)]

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        """Wait up to ``timeout`` seconds; the ready ``(fd, epoll events)`` pairs."""
        return self._epoll.poll(timeout)

    def close(self) -> None:
        self._epoll.close()
        self.data.clear()
        self._events.clear()
