"""Serves a 1 MiB file with the ``http.response.pathsend`` extension where the server offers it,
and as one body message otherwise (uvicorn has no pathsend)."""

from asgi_hello import app as _lifespan
from bench_file import PATH, SIZE

START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/octet-stream"), (b"content-length", str(SIZE).encode())],
}


async def app(scope, receive, send):
    if scope["type"] != "http":
        return await _lifespan(scope, receive, send)
    await send(START)
    if "http.response.pathsend" in scope.get("extensions", {}):
        await send({"type": "http.response.pathsend", "path": PATH})
    else:
        with open(PATH, "rb") as f:
            await send({"type": "http.response.body", "body": f.read()})
