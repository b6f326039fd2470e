"""The process-control tests' app: every answer says which process, slot and code served it.

``GET /`` -> ``pid slot version`` where version is read at import from $PC_VERSION_FILE
(so a HUP that really reloads the code shows a new version).  Other routes: ``/sleep?s=N``
(a slow request), ``/stuck`` (never returns, in a function the stack dump must name),
``/orphan`` (leaves a grandchild behind, for the PID 1 test), ``/env?k=NAME``.
"""

import os
import time
from urllib.parse import parse_qs

_version_file = os.environ.get("PC_VERSION_FILE")
if _version_file and os.path.exists(_version_file):
    with open(_version_file) as f:
        VERSION = f.read().strip()
else:
    VERSION = "none"
if VERSION == "broken":
    raise RuntimeError("this version of the app is broken on purpose")


def _text(start_response, body, status="200 OK"):
    data = body.encode() if isinstance(body, str) else body
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]


def stuck_in_the_app():
    while True:
        time.sleep(0.05)


def application(environ, start_response):
    path = environ["PATH_INFO"]
    query = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    if path == "/sleep":
        time.sleep(float(query.get("s", "1")))
        return _text(start_response, f"slept {os.getpid()}")
    if path == "/stuck":
        stuck_in_the_app()
    if path == "/orphan":
        child = os.fork()
        if child == 0:
            if os.fork() == 0:  # the grandchild outlives its parent: re-parented to PID 1
                time.sleep(0.3)
            os._exit(0)
        os.waitpid(child, 0)
        return _text(start_response, "orphaned")
    if path == "/env":
        return _text(start_response, os.environ.get(query.get("k", ""), "-"))
    body = f"{os.getpid()} {os.environ.get('TIAMAT_WORKER_ID')} {VERSION}"
    return _text(start_response, body)


app = application
