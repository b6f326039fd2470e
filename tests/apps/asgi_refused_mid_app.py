"""ASGI test app that takes a moment before it reads its request or answers (or streams a
large answer first): a body that breaks a rule arrives meanwhile and the server refuses it
while the app is still running."""

import asyncio


async def app(scope, receive, send):
    if scope["type"] != "http":  # (no lifespan: --lifespan auto goes on without it)
        return
    if scope["path"] == "/stream":  # a large response, before reading the request body
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(200):
            await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    await asyncio.sleep(0.3)
    if scope["path"] == "/pathsend":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": __file__})
        return
    await receive()  # (with Expect: 100-continue, this is where a 100 would be written)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})
