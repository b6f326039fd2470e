"""``--loop auto|asyncio|uvloop``: the event loop the asgi and tcp workers run on."""

from __future__ import annotations

import asyncio


def new_event_loop(choice: str = "auto") -> asyncio.AbstractEventLoop:
    """A new loop: uvloop for ``uvloop`` (it must be installed) or ``auto`` (when it is)."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise RuntimeError("--loop uvloop: uvloop is not installed "
                                   "(pip install 'tiamat[asgi]')") from None
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()
