"""The ASGI twin of sec_app.py, for running the same HTTP-safety tests on ``-k asgi``."""

import asyncio
import hashlib
import json

from tests.apps.asgi_lifespan import answer_lifespan

HITS = 0


async def app(scope, receive, send):
    global HITS
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    data = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        data += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["path"]
    headers = [("content-type", "text/plain")]
    if path == "/hit":
        HITS += 1
        body = b"hit %d\n" % HITS
    elif path == "/sleep":
        await asyncio.sleep(int(scope["query_string"] or 100) / 1000)
        body = b"slept"
    elif path == "/count":
        body = b"%d" % HITS
    elif path == "/big":
        body = b"x" * int(scope["query_string"] or 1000000)
        headers = [("content-type", "application/octet-stream")]
    else:
        client = scope.get("client") or (None, None)
        server = scope.get("server") or (None, None)
        request_headers = {}
        for name, value in scope["headers"]:
            key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
            request_headers[key] = value.decode("latin-1")
        body = json.dumps({
            "remote_addr": client[0],
            "remote_port": str(client[1]),
            "scheme": scope["scheme"],
            "host": request_headers.get("HTTP_HOST"),
            "server_name": server[0],
            "server_port": str(server[1]),
            "headers": request_headers,
            "body_len": len(data),
            "body_sha": hashlib.sha256(data).hexdigest(),
            "body_in_memory": True,
            "method": scope["method"],
        }).encode()
    headers.append(("content-length", str(len(body))))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(k.encode(), v.encode()) for k, v in headers]})
    await send({"type": "http.response.body", "body": body})
