"""The one small ASGI 3 app the tests share (worker selection, access log, metrics).

``/`` -> 200 "asgi hello", ``/missing...`` -> 404 "no such thing\\n"; the response header
X-Out echoes the request's X-Echo ("none" without one).  Also ``disguised`` (an ASGI app
that interface detection cannot see) and ``Asgi2App`` (the ASGI 2 "double callable" form).
"""

from asgi_lifespan import answer_lifespan

NOT_FOUND = b"no such thing\n"


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    echo = dict(scope["headers"]).get(b"x-echo", b"none")
    status = 404 if scope["path"].startswith("/missing") else 200
    body = NOT_FOUND if status == 404 else b"asgi hello"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"), (b"x-out", echo),
                            (b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})


def disguised(scope, receive, send):
    """An ASGI app that detection cannot see (a plain function returning the coroutine)."""
    return app(scope, receive, send)


class Asgi2App:
    """An ASGI 2 ("double callable") app: instantiated per connection scope, then awaited."""

    def __init__(self, scope):
        self.scope = scope

    async def __call__(self, receive, send):
        if self.scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"asgi2 " + self.scope["path"].encode()})
