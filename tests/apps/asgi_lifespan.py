"""The lifespan half every small ASGI test app shares: acknowledge startup and shutdown.

Apps loaded by path (``tests/apps/x.py:app``) import it as ``asgi_lifespan``; apps loaded as
``tests.apps.x:app`` as ``tests.apps.asgi_lifespan``.
"""

from collections.abc import Callable


async def answer_lifespan(receive, send, on_startup: Callable[[], None] | None = None) -> None:
    """Run the lifespan protocol until shutdown, calling ``on_startup`` before acknowledging it."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            if on_startup is not None:
                on_startup()
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
