"""The one exception the HTTP core raises for a request that breaks a rule, and how a
connection is closed after its error response."""

from __future__ import annotations

#: After an error response, a connection is closed lingering: the server stops writing (the
#: client sees the end of the response) and reads and discards what the client still sends
#: for up to this long and this many bytes, then closes.  Closing a socket that still has
#: unread bytes makes the kernel send a reset, which can destroy the response in flight
#: (a client still uploading a body over the limit would see its 413 as a reset).
LINGER_SECONDS = 2.0
LINGER_BYTES = 16 * 1024 * 1024


class ProtocolError(Exception):
    """A request the server must refuse: answer ``status`` and close the connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def __repr__(self) -> str:
        return f"ProtocolError({self.status}, {self.reason!r})"
