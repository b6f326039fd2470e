"""A WSGI app for the operability tests (access log, metrics, status, reload).

/            200 "ok"
/missing     404
/echo        200, echoes the X-Echo request header into an X-Out response header
/block       blocks until the file named by $OPS_RELEASE exists (at most 20 s): a busy worker
/sleep?S     sleeps S seconds (capped at 5)
/burn?S      uses S seconds of CPU (capped at 2)
/boom        raises (500)
"""

import os
import time


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/missing":
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"no such thing\n"]
    if path == "/echo":
        start_response("200 OK", [("Content-Type", "text/plain"),
                                  ("X-Out", environ.get("HTTP_X_ECHO", "none"))])
        return [b"echo\n"]
    if path == "/block":
        release = os.environ.get("OPS_RELEASE", "")
        deadline = time.monotonic() + 20
        while release and not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.02)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"released\n"]
    if path == "/sleep":
        time.sleep(min(5.0, float(environ.get("QUERY_STRING") or 0)))
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"slept\n"]
    if path == "/burn":
        until = time.process_time() + min(2.0, float(environ.get("QUERY_STRING") or 0))
        while time.process_time() < until:
            pass
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"burnt\n"]
    if path == "/boom":
        raise RuntimeError("boom")
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok\n"]


application = app
