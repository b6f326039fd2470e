"""WebSocket echo (and a plain hello for HTTP, so readiness checks get an answer)."""

from asgi_hello import app as _hello


async def app(scope, receive, send):
    if scope["type"] != "websocket":
        return await _hello(scope, receive, send)
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "websocket.connect":
            await send({"type": "websocket.accept"})
        elif kind == "websocket.receive":
            if message.get("bytes") is not None:
                await send({"type": "websocket.send", "bytes": message["bytes"]})
            else:
                await send({"type": "websocket.send", "text": message["text"]})
        else:
            return
