"""A WSGI app with one route per behaviour the core tests check.

``application`` is the plain app; ``validated`` is the same app wrapped in
``wsgiref.validate.validator`` with every WSGIWarning turned into an error, so a server
that breaks PEP 3333 makes the request fail (500) instead of passing silently.
"""

import json
import os
import tempfile
import time
import warnings
from urllib.parse import parse_qs
from wsgiref.validate import WSGIWarning, validator

warnings.simplefilter("error", WSGIWarning)

_FILE_BODY = b"0123456789abcdef" * 4096  # 64 KiB
_FILE = tempfile.NamedTemporaryFile(prefix="tiamat-core-", delete=False)  # noqa: SIM115
_FILE.write(_FILE_BODY)
_FILE.close()


def _query(environ):
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def _text(start_response, body, status="200 OK", length=True, ctype="text/plain"):
    headers = [("Content-Type", ctype)]
    if length:
        headers.append(("Content-Length", str(len(body))))
    start_response(status, headers)
    return [body]


def _environ(environ, start_response):
    keys = ("REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING", "SERVER_NAME",
            "SERVER_PORT", "SERVER_PROTOCOL", "REMOTE_ADDR", "REMOTE_PORT", "CONTENT_TYPE",
            "CONTENT_LENGTH", "HTTP_HOST", "HTTP_X_MULTI", "RAW_URI", "wsgi.url_scheme",
            "wsgi.multithread", "wsgi.multiprocess", "wsgi.run_once", "wsgi.version")
    data = {k: environ[k] for k in keys if k in environ}
    data["wsgi.version"] = list(environ["wsgi.version"])
    data["wsgi.errors"] = type(environ["wsgi.errors"]).__name__
    data["wsgi.file_wrapper"] = callable(environ.get("wsgi.file_wrapper"))
    data["TIAMAT"] = os.environ.get("TIAMAT")
    data["pid"] = os.getpid()
    body = json.dumps(data).encode()
    return _text(start_response, body, ctype="application/json")


def _echo(environ, start_response):
    """Echo the body, read the way ?mode= says (read, read1k, readline, readlines, iter)."""
    stream = environ["wsgi.input"]
    mode = _query(environ).get("mode", "read")
    if mode == "read":  # read(size) with CONTENT_LENGTH, as PEP 3333 apps do
        body = stream.read(int(environ.get("CONTENT_LENGTH") or 0))
    elif mode == "read1k":
        parts = []
        while True:
            part = stream.read(1024)
            if not part:
                break
            parts.append(part)
        body = b"".join(parts)
    elif mode == "readline":
        parts = []
        while True:
            line = stream.readline()
            if not line:
                break
            parts.append(b"[" + line + b"]")
        body = b"".join(parts)
    elif mode == "readlines":
        body = b"".join(b"[" + line + b"]" for line in stream.readlines())
    else:
        body = b"".join(b"[" + line + b"]" for line in stream)
    return _text(start_response, body)


def _stream(environ, start_response):
    """A generator body without Content-Length: chunked on HTTP/1.1."""
    count = int(_query(environ).get("n", "3"))
    start_response("200 OK", [("Content-Type", "text/plain")])

    def parts():
        for i in range(count):
            yield b"part %d\n" % i

    return parts()


def _write(environ, start_response):
    """The legacy write() callable."""
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"written ")
    return [b"and returned\n"]


def _slow(environ, start_response):
    delay = float(_query(environ).get("t", "1"))
    time.sleep(delay)
    return _text(start_response, b"slept %.1f\n" % delay)


def _error(environ, start_response):
    raise RuntimeError("boom from the app")


def _error_after_start(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])

    def parts():
        yield b"first part\n"
        raise RuntimeError("boom mid-response")

    return parts()


def _file(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return environ["wsgi.file_wrapper"](open(_FILE.name, "rb"), 8192)


def _errors(environ, start_response):
    stream = environ["wsgi.errors"]
    stream.write("message to wsgi.errors\n")
    stream.writelines(["second line to wsgi.errors\n"])
    stream.flush()
    return _text(start_response, b"logged\n")


def _empty(environ, start_response):
    start_response("204 No Content", [])
    return []


class _SlowToClose(list):
    """A body whose close() (called once the whole response is written) takes a while."""

    def __init__(self, body: bytes, seconds: float) -> None:
        super().__init__([body])
        self.seconds = seconds

    def close(self) -> None:
        time.sleep(self.seconds)


def _slow_close(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "4")])
    return _SlowToClose(b"done", float(_query(environ).get("t", "1")))


def _close(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Connection", "close"),
                              ("Content-Length", "3")])
    return [b"bye"]


ROUTES = {
    "/environ": _environ,
    "/echo": _echo,
    "/stream": _stream,
    "/write": _write,
    "/slow": _slow,
    "/error": _error,
    "/error-after-start": _error_after_start,
    "/file": _file,
    "/errors": _errors,
    "/empty": _empty,
    "/close": _close,
    "/slow-close": _slow_close,
}


def application(environ, start_response):
    path = environ["PATH_INFO"]
    route = ROUTES.get(path)
    if route is None:
        if path.startswith("/environ"):
            return _environ(environ, start_response)
        body = b"hello from core_app\n"
        return _text(start_response, body)
    return route(environ, start_response)


validated = validator(application)
