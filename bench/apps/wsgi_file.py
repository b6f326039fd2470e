"""Serves a 1 MiB file through ``wsgi.file_wrapper`` (sendfile where the server can)."""

import os

from bench_file import PATH, SIZE

HEADERS = [("Content-Type", "application/octet-stream"), ("Content-Length", str(SIZE))]


def app(environ, start_response):
    start_response("200 OK", HEADERS)
    f = open(PATH, "rb")  # noqa: SIM115 - the server closes it through the wrapper
    wrapper = environ.get("wsgi.file_wrapper")
    if wrapper is None:  # pragma: no cover - every server here has one
        return iter(lambda: f.read(65536), b"")
    return wrapper(f, 65536)


if not os.path.exists(PATH):  # pragma: no cover
    raise RuntimeError(f"missing {PATH}")
