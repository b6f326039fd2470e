"""WSGI app for the HTTP-safety tests (tests/test_http_*.py, proxy, TLS, slow clients).

/hit counts a request; /count says how many /hit requests reached the app (this worker);
/echo returns, as JSON, what the server told the app about the request (client, scheme,
host, headers, body size and where the body was buffered); /big streams N bytes.
"""

import hashlib
import io
import json
import time

HITS = 0


def app(environ, start_response):
    global HITS
    path = environ["PATH_INFO"]
    if path == "/hit":
        HITS += 1
        body = b"hit %d\n" % HITS
    elif path == "/sleep":
        time.sleep(int(environ.get("QUERY_STRING") or 100) / 1000)
        body = b"slept"
    elif path == "/count":
        body = b"%d" % HITS
    elif path == "/file":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return environ["wsgi.file_wrapper"](open(__file__, "rb"))
    elif path == "/big":
        size = int(environ.get("QUERY_STRING") or 1000000)
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(size))])
        return [b"x" * size]
    else:
        data = environ["wsgi.input"].read()
        info = {
            "remote_addr": environ.get("REMOTE_ADDR"),
            "remote_port": environ.get("REMOTE_PORT"),
            "scheme": environ["wsgi.url_scheme"],
            "host": environ.get("HTTP_HOST"),
            "server_name": environ.get("SERVER_NAME"),
            "server_port": environ.get("SERVER_PORT"),
            "headers": {k: v for k, v in environ.items() if k.startswith("HTTP_")},
            "body_len": len(data),
            "body_sha": hashlib.sha256(data).hexdigest(),
            "body_in_memory": isinstance(environ["wsgi.input"], io.BytesIO),
            "method": environ["REQUEST_METHOD"],
        }
        body = json.dumps(info).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
