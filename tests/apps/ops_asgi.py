"""An ASGI app for the operability tests: / -> 200 "ok", /missing -> 404, X-Out echoes X-Echo."""


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    echo = dict(scope["headers"]).get(b"x-echo", b"none")
    status = 404 if scope["path"].startswith("/missing") else 200
    body = b"no such thing\n" if status == 404 else b"ok\n"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"x-out", echo),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
