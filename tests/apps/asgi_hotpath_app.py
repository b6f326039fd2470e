"""ASGI app for tests/test_asgi_hotpath.py: every response's headers, length and path vary
with the request, so the asgi worker's per-worker caches (header lines, Content-Length lines,
scope paths) fill, empty and refill while the responses must stay exact."""


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    n = int(scope["query_string"].decode() or 0)
    body = (scope["path"] + "|" + scope["raw_path"].decode("latin-1") + "|").encode() + b"x" * (n % 700)
    headers = [(b"content-type", b"text/plain"), (b"x-n", b"%d" % n),
               [b"x-list-pair", b"%d" % (n % 3)]]  # a list pair, as some apps send
    if n % 2:
        headers.append((b"content-length", b"%d" % len(body)))
    if n % 5 == 0:
        headers.append((b"Connection", b"keep-alive"))  # taken out: the server frames
    await send({"type": "http.response.start", "status": 200 if n % 7 else 201, "headers": headers})
    await send({"type": "http.response.body", "body": body})
