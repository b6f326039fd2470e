"""Reads the whole request body and answers with its length (ASGI)."""

from asgi_hello import app as _lifespan


async def app(scope, receive, send):
    if scope["type"] != "http":
        return await _lifespan(scope, receive, send)
    total = 0
    while True:
        message = await receive()
        total += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = str(total).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
