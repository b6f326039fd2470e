"""WSGI test app for the worker-class tests: sleeps, echoes, reports pid and thread."""

import os
import threading
import time
from urllib.parse import parse_qs


def application(environ, start_response):
    path = environ["PATH_INFO"]
    query = parse_qs(environ["QUERY_STRING"])
    if path == "/sleep":  # (?mark=PATH: creates that file first, to say the request is here)
        if "mark" in query:
            open(query["mark"][0], "w").close()
        time.sleep(float(query.get("s", ["0.01"])[0]))
        body = b"slept %d" % os.getpid()
    elif path == "/echo":
        body = environ["wsgi.input"].read()
    elif path == "/input":  # reads wsgi.input every way, then closes it, as some apps do
        stream = environ["wsgi.input"]
        body = repr((stream.read(), stream.read(5), stream.readline(), stream.readlines(),
                     list(stream))).encode()
        stream.close()
    elif path == "/info":
        body = (f"pid={os.getpid()} thread={threading.current_thread().name} "
                f"multithread={environ['wsgi.multithread']}").encode()
    elif path == "/length":  # answers "told" with the Content-Length header in ?v=
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", query["v"][0])])
        return [b"told"]
    elif path == "/connection":  # answers with the Connection header in ?v=
        body = b"told"
        start_response("200 OK", [("Content-Type", "text/plain"), ("Connection", query["v"][0]),
                                  ("Content-Length", str(len(body)))])
        return [body]
    else:
        body = b"hello"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
