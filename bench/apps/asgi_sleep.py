"""An ASGI app that awaits 10 ms per request."""

import asyncio

from asgi_hello import app as _hello


async def app(scope, receive, send):
    if scope["type"] == "http":
        await asyncio.sleep(0.010)
    await _hello(scope, receive, send)
