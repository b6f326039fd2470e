"""Proves ``wsgi.file_wrapper`` responses go out through ``os.sendfile``.

The worker calls ``os.sendfile`` by attribute, so counting calls here (the app is imported in
the worker process) shows whether the file really went through the kernel's sendfile path.
"""

import os
import tempfile

_real_sendfile = os.sendfile
_calls = [0]
DATA = bytes(range(256)) * 1024  # 256 KiB
_FILE = tempfile.NamedTemporaryFile(prefix="tiamat-sendfile-", delete=False)  # noqa: SIM115
_FILE.write(DATA)
_FILE.close()


def _counting_sendfile(*args, **kwargs):
    _calls[0] += 1
    return _real_sendfile(*args, **kwargs)


os.sendfile = _counting_sendfile


def application(environ, start_response):
    if environ["PATH_INFO"] == "/count":
        body = str(_calls[0]).encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    f = open(_FILE.name, "rb")  # noqa: SIM115 - the server closes it through the wrapper
    if environ["PATH_INFO"] == "/offset":
        f.seek(1000)
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", "5000")])
    elif environ["PATH_INFO"] == "/overlong":  # declares more than the file holds
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(DATA) + 100))])
    else:
        start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return environ["wsgi.file_wrapper"](f, 65536)
