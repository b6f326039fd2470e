"""An ASGI app for the --preload and refork tests of the asgi worker.

Answers ``loaded_in startup_in pid served``: the pid that imported the app, the pid whose
event loop ran the lifespan startup, the pid serving, and the requests served (inherited
from the mold by a worker it forked).
"""

import asyncio
import os

from tests.apps.asgi_lifespan import answer_lifespan

LOADED_IN = os.getpid()
STARTUP_IN = 0
SERVED = 0


def _started() -> None:
    global STARTUP_IN
    asyncio.get_running_loop()  # the lifespan runs on this worker's own loop
    STARTUP_IN = os.getpid()


async def app(scope, receive, send):
    global SERVED
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send, _started)
        return
    SERVED += 1
    body = f"{LOADED_IN} {STARTUP_IN} {os.getpid()} {SERVED}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
