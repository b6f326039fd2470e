"""The one exception the HTTP core raises for a request that breaks a rule."""

from __future__ import annotations


class ProtocolError(Exception):
    """A request the server must refuse: answer ``status`` and close the connection."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason

    def __repr__(self) -> str:
        return f"ProtocolError({self.status}, {self.reason!r})"
