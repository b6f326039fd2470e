"""Reports the cyclic collector's state as the worker sees it (tests/test_startup_gc.py).

``LOADED_WITH`` is whether automatic collection was on while this module was imported
(enabled, with a first-generation threshold above 0); each app answers ``loaded-with
collecting frozen pid`` for the state at request time.  With ``GC_APP_DISABLE=1`` the module
turns the collector off as it is imported, as some apps do: it must stay off.
"""

import gc
import os


def _collecting() -> bool:
    return gc.isenabled() and gc.get_threshold()[0] > 0


LOADED_WITH = _collecting()
if os.environ.get("GC_APP_DISABLE") == "1":
    gc.disable()
#: a few import-time cycles, as frameworks build (registries pointing back at their owner)
_CYCLES = []
for _ in range(50):
    node: dict = {}
    node["self"] = node
    _CYCLES.append(node)


def _report() -> bytes:
    return f"{int(LOADED_WITH)} {int(_collecting())} {gc.get_freeze_count()} {os.getpid()}".encode()


def application(environ, start_response):
    body = _report()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi_app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = _report()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})
