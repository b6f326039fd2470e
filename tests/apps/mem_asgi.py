"""An ASGI app for the --preload and refork tests of the asgi worker.

Answers ``loaded_in startup_in pid served``: the pid that imported the app, the pid whose
event loop ran the lifespan startup, the pid serving, and the requests served (inherited
from the mold by a worker it forked).
"""

import asyncio
import os

LOADED_IN = os.getpid()
STARTUP_IN = 0
SERVED = 0


async def app(scope, receive, send):
    global STARTUP_IN, SERVED
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                asyncio.get_running_loop()
                STARTUP_IN = os.getpid()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    SERVED += 1
    body = f"{LOADED_IN} {STARTUP_IN} {os.getpid()} {SERVED}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
