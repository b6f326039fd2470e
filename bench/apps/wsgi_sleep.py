"""A WSGI app that waits 10 ms per request (a database call, say): needs threads to scale."""

import time

BODY = b"slept"
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]


def app(environ, start_response):
    time.sleep(0.010)
    start_response("200 OK", HEADERS)
    return [BODY]
