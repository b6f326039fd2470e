"""pc_app.py's ``GET /`` for ``-k asgi``: ``pid slot version``, version read at import from
$PC_VERSION_FILE (so a HUP that really reloads the code shows a new version)."""

import os

_version_file = os.environ.get("PC_VERSION_FILE")
if _version_file and os.path.exists(_version_file):
    with open(_version_file) as f:
        VERSION = f.read().strip()
else:
    VERSION = "none"


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].rsplit(".", 1)[1]
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    body = f"{os.getpid()} {os.environ.get('TIAMAT_WORKER_ID')} {VERSION}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})
