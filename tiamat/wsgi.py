"""Running one request through a WSGI app (PEP 3333), for the sync and thread workers.

:class:`WSGIHandler` builds the environ from a :class:`~tiamat.http.h1.RequestHead`, calls
the app, and frames what it returns using the HTTP core's :func:`decide_framing`.  It does
no socket work itself: it writes through the small :class:`Transport` interface, so the
same code serves a blocking socket, a TLS socket or anything else a worker class uses.

Per-worker work (the constant environ keys, header-name translations) is done once, so a
request costs a dict copy, a few assignments and one write for a small response.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote_to_bytes

from tiamat import __version__, accesslog, hooks, logs, metrics
from tiamat.http.h1 import RequestHead
from tiamat.http.proxy import TRUSTED_KEY, ForwardedRules, apply_to_environ
from tiamat.http.response import (
    CHUNKED_HEADER,
    LAST_CHUNK,
    SERVER_HEADER,
    Framing,
    body_allowed,
    chunk,
    connection_header,
    date_header,
    decide_framing,
    error_response,
    status_line,
)

log = logging.getLogger("tiamat.error")


class Transport(Protocol):
    """What a worker hands the handler for one connection."""

    def write(self, data: bytes) -> None: ...

    def sendfile(self, file: BinaryIO, offset: int, count: int | None) -> int: ...


class FileWrapper:
    """``wsgi.file_wrapper``: iterates in blocks, and lets the worker use ``os.sendfile``."""

    def __init__(self, filelike: BinaryIO, blksize: int = 65536) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> FileWrapper:
        return self

    def __next__(self) -> bytes:
        data = self.filelike.read(self.blksize)
        if data:
            return data
        raise StopIteration

    def fileno(self) -> int | None:
        try:
            return self.filelike.fileno()
        except (AttributeError, OSError, ValueError):
            return None


class ClientDisconnected(OSError):
    """The client went away while the response was being written."""


class _Response:
    """State of one response while the app produces it."""

    __slots__ = ("head_sent", "headers", "status")

    def __init__(self) -> None:
        self.status: str | None = None
        self.headers: list[tuple[str, str]] = []
        self.head_sent = False


_HEADER_KEYS: dict[bytes, str | None] = {}


def environ_key(name: bytes) -> str | None:
    """``b'x-forwarded-for'`` -> ``'HTTP_X_FORWARDED_FOR'``; None for names to drop.

    Names containing ``_`` are dropped: after translation ``X_Forwarded_For`` would be
    indistinguishable from ``X-Forwarded-For`` (a header-spoofing trick against proxies).
    """
    key = _HEADER_KEYS.get(name, "")
    if key == "":
        if b"_" in name:
            key = None
        elif name == b"content-type":
            key = "CONTENT_TYPE"
        elif name == b"content-length":
            key = "CONTENT_LENGTH"
        else:
            key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
        if len(_HEADER_KEYS) < 4096:
            _HEADER_KEYS[name] = key
    return key


class WSGIHandler:
    """Calls one WSGI app; one instance per worker, shared by its threads."""

    def __init__(self, app: Callable[..., Iterable[bytes]], cfg: Any, *, multithread: bool,
                 multiprocess: bool = True) -> None:
        self.app = app
        self.keepalive = cfg.keepalive > 0
        self.sendfile_ok = cfg.sendfile
        self.root_path = cfg.root_path.rstrip("/")
        self.forwarded = ForwardedRules.from_config(cfg)
        #: None when off: then a request builds no log line and touches no counter
        self.access = accesslog.for_worker(cfg)
        self.recorder = metrics.recorder(threaded=multithread)
        self.request_hooks = hooks.RequestHooks.for_config(cfg)  # pre_request/post_request
        self.base_environ: dict[str, Any] = {
            "wsgi.version": (1, 0),
            "wsgi.multithread": multithread,
            "wsgi.multiprocess": multiprocess,
            "wsgi.run_once": False,
            "wsgi.errors": logs.error_stream,
            "wsgi.file_wrapper": FileWrapper,
            "wsgi.input_terminated": True,
            "SERVER_SOFTWARE": f"tiamat/{__version__}",
            "SCRIPT_NAME": self.root_path,
        }

    def connection_environ(self, peer: Any, sockname: Any, scheme: str) -> dict[str, Any]:
        """The environ keys that stay the same for every request on one connection."""
        environ = dict(self.base_environ)
        if isinstance(sockname, tuple):
            environ["SERVER_NAME"] = str(sockname[0])
            environ["SERVER_PORT"] = str(sockname[1])
        else:
            environ["SERVER_NAME"] = "localhost"
            environ["SERVER_PORT"] = "80" if scheme == "http" else "443"
        if isinstance(peer, tuple):
            environ["REMOTE_ADDR"] = str(peer[0])
            environ["REMOTE_PORT"] = str(peer[1])
        else:
            environ["REMOTE_ADDR"] = "127.0.0.1"
            environ["REMOTE_PORT"] = "0"
        environ["wsgi.url_scheme"] = scheme
        return environ

    def build_environ(self, head: RequestHead, body: BinaryIO,
                      conn_environ: dict[str, Any]) -> dict[str, Any]:
        environ = conn_environ.copy()
        environ["REQUEST_METHOD"] = head.method.decode("latin-1")
        path = head.path
        if b"%" in path:
            path = unquote_to_bytes(path)
        path_info = path.decode("latin-1")
        root = self.root_path
        if root and (path_info == root or path_info.startswith(root + "/")):
            path_info = path_info[len(root):]
        environ["PATH_INFO"] = path_info
        environ["QUERY_STRING"] = head.query.decode("latin-1")
        environ["RAW_URI"] = head.target.decode("latin-1")
        environ["SERVER_PROTOCOL"] = "HTTP/1.1" if head.version == "1.1" else "HTTP/1.0"
        environ["wsgi.input"] = body
        for name, value in head.headers:
            key = _HEADER_KEYS.get(name) or environ_key(name)
            if key is None:
                continue
            text = value.decode("latin-1")
            if key in environ and key.startswith("HTTP_"):
                text = environ[key] + ("; " if key == "HTTP_COOKIE" else ",") + text
            environ[key] = text
        if head.chunked and "CONTENT_LENGTH" not in environ:
            size = _stream_size(body)
            if size is not None:
                environ["CONTENT_LENGTH"] = str(size)
        if TRUSTED_KEY in conn_environ:  # decided once per connection by the worker
            apply_to_environ(environ, head.headers, self.forwarded)
        return environ

    def handle(self, head: RequestHead, body: BinaryIO, conn_environ: dict[str, Any],
               transport: Transport) -> tuple[bool, int, int]:
        """Run the app for one request and write the response.

        Returns ``(keep_alive, status_code, body_bytes_sent)``.  An exception from the app
        becomes a 500 if nothing was sent yet; otherwise the connection is closed.
        """
        environ = self.build_environ(head, body, conn_environ)
        access, recorder, request_hooks = self.access, self.recorder, self.request_hooks
        if access is None and recorder is None and request_hooks is None:
            return self._respond(environ, head, transport, _Response())
        response = _Response()
        if request_hooks is not None:
            request_hooks.before(head)
        if recorder is not None:
            recorder.start()
        start = time.perf_counter()
        result = (False, 500, 0)
        try:
            result = self._respond(environ, head, transport, response)
        finally:
            duration = time.perf_counter() - start
            if recorder is not None:
                recorder.done(result[1], duration)
        if access is not None:
            access.log_wsgi(environ, result[1], result[2], duration, head.headers,
                            response.headers)
        if request_hooks is not None:
            request_hooks.after(head, environ, result, response.status, response.headers)
        return result

    def _respond(self, environ: dict[str, Any], head: RequestHead, transport: Transport,
                 response: _Response) -> tuple[bool, int, int]:
        written = 0
        framing = None
        expected: int | None = None
        send_body = True
        status_code = 500

        def write(data: bytes) -> None:
            nonlocal written, framing, expected, send_body, status_code
            if response.status is None:
                raise AssertionError("write() before start_response()")
            if not response.head_sent:
                framing, expected, status_code, head_bytes = self._head(head, response)
                send_body = framing.send_body
                response.head_sent = True
                if not send_body or not data:
                    transport.write(head_bytes)
                    return
                transport.write(head_bytes + (chunk(data) if framing.chunked else data))
                written += len(data)
                return
            if not data or not send_body:
                return
            if expected is not None and written + len(data) > expected:
                data = data[:expected - written]
                framing = framing._replace(keep_alive=False)  # type: ignore[union-attr]
            transport.write(chunk(data) if framing.chunked else data)  # type: ignore[union-attr]
            written += len(data)

        def start_response(status: str, headers: list[tuple[str, str]],
                           exc_info: Any = None) -> Callable[[bytes], None]:
            if exc_info is not None:
                try:
                    if response.head_sent:
                        raise exc_info[1].with_traceback(exc_info[2])
                finally:
                    exc_info = None
            elif response.status is not None:
                raise AssertionError("start_response() called twice without exc_info")
            response.status = status
            response.headers = headers
            return write

        try:
            result = self.app(environ, start_response)
            try:
                if (isinstance(result, FileWrapper) and self.sendfile_ok and send_body
                        and result.fileno() is not None):
                    written, framing, status_code = self._send_file(
                        result, head, response, transport)
                else:
                    single = isinstance(result, (list, tuple)) and len(result) == 1
                    for data in result:
                        if not response.head_sent and single and data:
                            self._set_length(response, len(data))
                        write(data)
                    if not response.head_sent:
                        if response.status is None:
                            raise AssertionError("the app returned without calling start_response()")
                        self._set_length(response, 0)
                        write(b"")
                    if framing is not None and framing.chunked and send_body:
                        transport.write(LAST_CHUNK)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except ClientDisconnected:
            return False, status_code, written
        except Exception:
            log.exception("Error handling request %s %s", head.method.decode("latin-1"),
                          head.target.decode("latin-1"))
            if response.head_sent:
                return False, status_code, written
            transport.write(error_response(500))
            return False, 500, 0
        if expected is not None and written < expected and send_body:
            return False, status_code, written
        return framing.keep_alive, status_code, written  # type: ignore[union-attr]

    def _set_length(self, response: _Response, length: int) -> None:
        """Add the Content-Length the app left out, when the whole body is known.

        Not for 1xx/204 (which must not carry one) nor 304 (whose length describes the
        representation the client already has)."""
        code = (response.status or "")[:3]
        if not code.isdigit() or not body_allowed(int(code)):
            return  # (an invalid status fails in _head)
        for name, _ in response.headers:
            lname = name.lower()
            if lname == "content-length" or lname == "transfer-encoding":
                return
        response.headers = [*response.headers, ("Content-Length", str(length))]

    def _head(self, head: RequestHead,
              response: _Response) -> tuple[Framing, int | None, int, bytes]:
        """Serialise the response head; decide framing once the app's headers are known."""
        status = response.status or "500 Internal Server Error"
        try:
            status_code = int(status[:3])
        except ValueError:
            raise ValueError(f"invalid status {status!r}") from None
        content_length: int | None = None
        keep_alive_wanted = head.keep_alive
        lines = []
        for name, value in response.headers:
            lname = name.lower()
            if lname == "content-length":
                content_length = int(value)
                continue
            if lname == "connection":
                if value.lower() == "close":
                    keep_alive_wanted = False
                continue
            elif lname == "transfer-encoding":
                continue
            if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
                raise ValueError(f"response header {name!r} contains a line break")
            lines.append(f"{name}: {value}\r\n")
        block = "".join(lines)
        framing = decide_framing(status_code, content_length, head.method, head.version,
                                 keep_alive_wanted, self.keepalive)
        data = (status_line(status) + SERVER_HEADER + date_header() + block.encode("latin-1")
                + (b"Content-Length: %d\r\n" % content_length if content_length is not None else b"")
                + (CHUNKED_HEADER if framing.chunked else b"")
                + connection_header(framing, head.version) + b"\r\n")
        return framing, content_length, status_code, data

    def _send_file(self, wrapper: FileWrapper, head: RequestHead, response: _Response,
                   transport: Transport) -> tuple[int, Framing, int]:
        if response.status is None:
            raise AssertionError("the app returned without calling start_response()")
        fileobj = wrapper.filelike
        fd = wrapper.fileno()
        assert fd is not None
        offset = fileobj.tell() if hasattr(fileobj, "tell") else 0
        size = os.fstat(fd).st_size - offset
        length = size
        for name, value in response.headers:
            if name.lower() == "content-length":
                length = min(int(value), size)
                break
        else:
            response.headers = [*response.headers, ("Content-Length", str(size))]
        framing, declared, status_code, head_bytes = self._head(head, response)
        response.head_sent = True
        transport.write(head_bytes)
        if not framing.send_body:  # HEAD, 304: the same headers as GET, no body
            return 0, framing, status_code
        sent = transport.sendfile(fileobj, offset, length)
        if sent < length:
            raise ClientDisconnected("client went away during sendfile")
        if declared is not None and sent < declared:
            # the app declared more than the file holds: only the close can end the body
            framing = framing._replace(keep_alive=False)
        return sent, framing, status_code


def _stream_size(body: BinaryIO) -> int | None:
    try:
        position = body.tell()
        body.seek(0, os.SEEK_END)
        size = body.tell()
        body.seek(position)
        return size
    except (AttributeError, OSError):
        return None
