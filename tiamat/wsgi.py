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
from collections.abc import Callable, Iterable, Iterator
from types import FunctionType, MethodType
from typing import Any, BinaryIO, Protocol
from urllib.parse import unquote_to_bytes

from tiamat import __version__, accesslog, hooks, logs, metrics
from tiamat.http.h1 import KNOWN_METHODS, MEMO_ENTRIES, MEMO_KEY_BYTES, RequestHead
from tiamat.http.proxy import TRUSTED_KEY, ForwardedRules, apply_to_environ
from tiamat.http.response import (
    CHUNKED_HEADER,
    CONTENT_LENGTHS,
    LAST_CHUNK,
    app_content_length,
    asks_close,
    body_allowed,
    chunk,
    content_length_parts,
    decide_framing,
    error_response,
    head_end,
    head_end_dated,
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


class _NoBody:
    """``wsgi.input`` of every request without a body: one shared, empty, read-only file.

    A new BytesIO, and its close(), for each such request cost ~1.2k instructions (2 % of a
    hello request).  Shared, one request must not be able to spoil it for the next: it holds
    nothing that changes, it has no write(), and close() does nothing (an app may close its
    input; the next request's still reads as empty).
    """

    __slots__ = ()
    closed = False

    def read(self, size: int | None = -1) -> bytes:
        return b""

    read1 = read

    def readline(self, size: int | None = -1) -> bytes:
        return b""

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        return []

    def readinto(self, buffer: Any) -> int:
        return 0

    def __iter__(self) -> Iterator[bytes]:
        return iter(())

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def close(self) -> None:
        pass

    def __enter__(self) -> _NoBody:
        return self

    def __exit__(self, *exc_info: object) -> None:
        pass


NO_BODY: Any = _NoBody()


class ClientDisconnected(OSError):
    """The client went away while the response was being written."""


class _Response:
    """One response while the app produces it.

    Its bound :meth:`start_response` is what the app is given, and its bound :meth:`write`
    what that returns: one object per request instead of two closures, with the framing
    state (decided when the head goes out) in attributes the handler reads afterwards.
    The defaults are class attributes, so a new response costs three stores: the handler
    builds it by calling the class, which has no ``__init__`` (an ``__init__`` call cost
    ~0.5k instructions more per request, and ``object.__new__(_Response)`` as much), and
    stores ``handler``, ``request`` and ``transport`` itself.
    """

    handler: WSGIHandler
    request: RequestHead
    transport: Transport

    status: str | None = None
    headers: list[tuple[str, str]] = []  # (replaced, never mutated)
    head_sent = False
    status_code = 500
    written = 0
    #: the Content-Length the head declared (None: chunked or ended by the close)
    expected: int | None = None
    send_body = True
    chunked = False
    keep_alive = False

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.head_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None
        elif self.status is not None:
            raise AssertionError("start_response() called twice without exc_info")
        self.status = status
        self.headers = headers
        return self.write

    def write(self, data: bytes) -> None:
        """The WSGI ``write()`` callable, and how every body block goes out."""
        if not self.head_sent:
            if self.status is None:
                raise AssertionError("write() before start_response()")
            head_bytes = self.handler.head_bytes(self, None)
            if self.send_body and data:
                self.send(data, head_bytes)
            else:
                self.transport.write(head_bytes)
        elif data and self.send_body:
            self.send(data, b"")

    def send(self, data: bytes, head_bytes: bytes) -> None:
        """Frame one non-empty body block (after ``head_bytes``, if any) and write it."""
        if self.chunked:
            block = chunk(data)
        else:
            expected = self.expected
            if expected is not None and self.written + len(data) > expected:
                data = data[:expected - self.written]  # more than declared: cut, then close
                self.keep_alive = False
            block = data
        self.transport.write(head_bytes + block if head_bytes else block)
        self.written += len(data)


def _app_head(status: str, headers: list[tuple[str, str]]) -> tuple[int, bytes, int | None, bool]:
    """Check and serialise the app's status and headers: (status code, status line + the
    app's header lines, its Content-Length or None, whether it asked for Connection: close);
    ValueError if bad.  (Not kept: the handler keeps whole plans, see head_bytes.)"""
    try:
        status_code = int(status[:3])
    except ValueError:
        raise ValueError(f"invalid status {status!r}") from None
    content_length: int | None = None
    close = False
    lines = []
    for name, value in headers:
        lname = name.lower()
        if lname == "content-length":
            content_length = app_content_length(value)
            continue
        if lname == "connection":
            close = close or asks_close(value)
            continue
        if lname == "transfer-encoding":  # the server frames the body itself
            continue
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
            raise ValueError(f"response header {name!r} contains a line break")
        lines.append(f"{name}: {value}\r\n")
    block = status_line(status) + "".join(lines).encode("latin-1")
    if content_length is not None:
        block += content_length_parts(content_length)[1]
    return status_code, block, content_length, close


_NO_KEYS: frozenset[str] = frozenset()
#: a response head's plan: see WSGIHandler.head_bytes and _plan
_Plan = tuple[int, bytes, "int | None", bool, bool, bool, bool, list[tuple[float, bytes]]]

_HEADER_KEYS: dict[bytes, str | None] = {}
#: REQUEST_METHOD for the methods the core knows, decoded once
_METHOD_NAMES = {method: method.decode("ascii") for method in KNOWN_METHODS}


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


#: the keys build_environ sets on every request (see _with_room)
_REQUEST_KEYS = ("REQUEST_METHOD", "PATH_INFO", "QUERY_STRING", "RAW_URI", "SERVER_PROTOCOL",
                 "wsgi.input")
#: a dict's key table of 32 slots holds 21 keys; one more makes it grow to 64
_KEYS_IN_32 = 21


def _with_room(environ: dict[str, Any]) -> dict[str, Any]:
    """A connection's environ shaped so that each request's copy has room for its keys.

    ``dict.copy()`` keeps the key table's size.  The connection's ~15 keys sit in a table of
    32 slots, which holds 21, and a request adds six more and its header fields: its copy
    grew to 64 slots (a new table, every key inserted again, the old one freed: ~0.9k
    instructions per request).  So the keys every request sets are held here already, with
    placeholders each request overwrites (never seen by an app), and the table is grown
    past 21 keys once, here, by a few keys added and deleted again (a copy keeps the size of
    a table with so few deleted entries).  Were CPython to copy differently, only the
    saving would be lost."""
    for key in _REQUEST_KEYS:
        environ.setdefault(key, None)
    pads = [f"tiamat.pad{i}" for i in range(_KEYS_IN_32 + 1 - len(environ))]
    for key in pads:
        environ[key] = None
    for key in pads:
        del environ[key]
    return environ


def _direct_call(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    """An app that is an instance of a class with a Python ``__call__`` (Flask, Django's
    handler, most middleware) as that ``__call__`` bound to it: the interpreter calls a bound
    method as a plain function (a specialised call), while calling the instance goes through
    the type's ``__call__`` slot and a lookup in C (~2k instructions per Flask request).  The
    class's method is bound, as calling the instance would find it (never an instance
    attribute named ``__call__``); anything else (a function, say) is returned as it is."""
    call = next((klass.__dict__["__call__"] for klass in type(app).__mro__
                 if "__call__" in klass.__dict__), None)
    if isinstance(call, FunctionType):
        return MethodType(call, app)  # type: ignore[no-any-return]
    return app


class WSGIHandler:
    """Calls one WSGI app; one instance per worker, shared by its threads."""

    def __init__(self, app: Callable[..., Iterable[bytes]], cfg: Any, *, multithread: bool,
                 multiprocess: bool = True) -> None:
        self.app = app
        #: what _respond calls: see _direct_call
        self._call_app = _direct_call(app)
        self.keepalive = cfg.keepalive > 0
        self.sendfile_ok = cfg.sendfile
        self.root_path = cfg.root_path.rstrip("/")
        self.forwarded = ForwardedRules.from_config(cfg)
        self.forwarded_keys = self.forwarded.environ_keys
        #: request target -> (PATH_INFO, QUERY_STRING, RAW_URI): see _target_keys
        self._targets: dict[bytes, tuple[str, str, str]] = {}
        #: (status, headers, method, version, keep-alive, length unknown) -> a response
        #: head's plan: see head_bytes
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        #: None when off: then a request builds no log line and touches no counter
        self.access = accesslog.for_worker(cfg)
        self.recorder = metrics.recorder(threaded=multithread)
        self.request_hooks = hooks.RequestHooks.for_config(cfg)  # pre_request/post_request
        #: no access log, metrics or request hooks: a request needs no timing or bookkeeping
        self.unobserved = (self.access is None and self.recorder is None
                           and self.request_hooks is None)
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
        environ["SERVER_PROTOCOL"] = "HTTP/1.1"  # (build_environ changes it for HTTP/1.0 only)
        return _with_room(environ)

    def build_environ(self, head: RequestHead, body: BinaryIO,
                      conn_environ: dict[str, Any]) -> dict[str, Any]:
        environ = conn_environ.copy()
        method = head.method
        environ["REQUEST_METHOD"] = _METHOD_NAMES.get(method) or method.decode("latin-1")
        target = self._targets.get(head.target) or self._target_keys(head)
        environ["PATH_INFO"], environ["QUERY_STRING"], environ["RAW_URI"] = target
        if head.version != "1.1":  # (the connection's environ holds "HTTP/1.1")
            environ["SERVER_PROTOCOL"] = "HTTP/1.0"
        environ["wsgi.input"] = body
        # from a trusted peer (the worker decides per connection: loopback by default, or the
        # proxy in front), whether a forwarding header came is noted as the keys go in (a
        # set lookup per new key), not found afterwards by testing the environ for every
        # forwarding key (a key view and its walk): ~1.7k instructions less per request from
        # a trusted peer, ~0.5k more from an untrusted one (measured with two fields: the
        # choice of set, and an empty set's lookup per field)
        forwarded_keys = self.forwarded_keys if TRUSTED_KEY in conn_environ else _NO_KEYS
        forwarding = False
        for name, value in head.headers:
            key = _HEADER_KEYS.get(name) or environ_key(name)
            if key is None:
                continue
            text = value.decode("latin-1")
            seen = environ.get(key)
            if seen is None:
                environ[key] = text
                if key in forwarded_keys:
                    forwarding = True
            else:  # a repeated field: joined, or for CONTENT_* the last one.  (Not found by
                # identity after a setdefault: CPython hands out one shared str for an empty or
                # one-character value, so a repeated "X-A: 1" looked like a first one)
                environ[key] = (seen + ("; " if key == "HTTP_COOKIE" else ",") + text
                                if key.startswith("HTTP_") else text)
        if head.chunked and "CONTENT_LENGTH" not in environ:
            size = _stream_size(body)
            if size is not None:
                environ["CONTENT_LENGTH"] = str(size)
        if forwarding:  # (most requests, even from a trusted proxy, carry none)
            apply_to_environ(environ, head.headers, self.forwarded)
        return environ

    def _target_keys(self, head: RequestHead) -> tuple[str, str, str]:
        """PATH_INFO (percent-decoded, read as latin-1, less the root path), QUERY_STRING and
        RAW_URI of a request target; kept per target, as most requests ask for a few."""
        path = head.path
        target = head.target
        raw_uri = target.decode("latin-1")
        # (partition, not ``in``: see tiamat.http.h1._VERSIONS)
        escaped = path.partition(b"%")[1]
        if path is target and not escaped:  # a plain "/path": one decode serves both
            path_info = raw_uri
        else:
            path_info = (unquote_to_bytes(path) if escaped else path).decode("latin-1")
        root = self.root_path
        if root and (path_info == root or path_info.startswith(root + "/")):
            path_info = path_info[len(root):]
        keys = (path_info, head.query.decode("latin-1"), raw_uri)
        if len(target) <= MEMO_KEY_BYTES:  # (see tiamat.http.h1.MEMO_ENTRIES)
            if len(self._targets) >= MEMO_ENTRIES:
                self._targets.clear()
            self._targets[target] = keys
        return keys

    def handle(self, head: RequestHead, body: BinaryIO, conn_environ: dict[str, Any],
               transport: Transport) -> tuple[bool, int, int]:
        """Run the app for one request and write the response.

        Returns ``(keep_alive, status_code, body_bytes_sent)``.  An exception from the app
        becomes a 500 if nothing was sent yet; otherwise the connection is closed.
        """
        environ = self.build_environ(head, body, conn_environ)
        response = _Response()  # (no __init__: see _Response)
        response.handler = self
        response.request = head
        response.transport = transport
        if self.unobserved:
            return self._respond(environ, head, response)
        access, recorder, request_hooks = self.access, self.recorder, self.request_hooks
        if request_hooks is not None:
            request_hooks.before(head)
        if recorder is not None:
            recorder.start()
        start = time.perf_counter()
        result = (False, 500, 0)
        try:
            result = self._respond(environ, head, response)
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

    def _respond(self, environ: dict[str, Any], head: RequestHead,
                 response: _Response) -> tuple[bool, int, int]:
        try:
            result = self._call_app(environ, response.start_response)
            if result.__class__ is list and len(result) == 1 and not response.head_sent:
                # the common case, a list of one block: the length is known, and the head and
                # the body go out in one write (a list has no close() to call)
                data = result[0]
                if response.status is None:
                    raise AssertionError("the app returned without calling start_response()")
                size = len(data)
                head_bytes = self.head_bytes(response, size)
                if size and response.expected == size and response.send_body:
                    # (not chunked, the length as declared: nothing left to check)
                    response.transport.write(head_bytes + data)
                    return response.keep_alive, response.status_code, size
                if not (response.send_body and data):
                    response.transport.write(head_bytes)
                else:
                    response.send(data, head_bytes)
            else:
                try:
                    if (isinstance(result, FileWrapper) and self.sendfile_ok
                            and response.send_body
                            and result.fileno() is not None):  # type: ignore[attr-defined]
                        self._send_file(result, head, response)  # type: ignore[arg-type]
                    else:
                        self._iterate(result, response)
                finally:
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
        except ClientDisconnected:
            return False, response.status_code, response.written
        except Exception:
            log.exception("Error handling request %s %s", head.method.decode("latin-1"),
                          head.target.decode("latin-1"))
            if response.head_sent:
                return False, response.status_code, response.written
            response.transport.write(error_response(500))
            return False, 500, 0
        if response.expected is not None and response.written < response.expected \
                and response.send_body:
            return False, response.status_code, response.written  # less than declared
        return response.keep_alive, response.status_code, response.written

    def _iterate(self, result: Iterable[bytes], response: _Response) -> None:
        """Any other iterable: its blocks as they come (chunked when the length is unknown)."""
        single = isinstance(result, (list, tuple)) and len(result) == 1
        for data in result:
            if not response.head_sent and data:
                if response.status is None:
                    raise AssertionError("write() before start_response()")
                head_bytes = self.head_bytes(response, len(data) if single else None)
                expected = response.expected
                if not response.send_body:
                    response.transport.write(head_bytes)
                elif expected is not None and len(data) <= expected:
                    # the usual first block (a framework's response: Flask's, say) within a
                    # declared length, so not chunked: what send() would do, without its
                    # checks and call (~1k instructions)
                    response.transport.write(head_bytes + data)
                    response.written = len(data)
                else:
                    response.send(data, head_bytes)
            else:
                response.write(data)
        if not response.head_sent:
            if response.status is None:
                raise AssertionError("the app returned without calling start_response()")
            response.transport.write(self.head_bytes(response, 0))
        elif response.chunked:
            response.transport.write(LAST_CHUNK)

    def head_bytes(self, response: _Response, known_length: int | None) -> bytes:
        """Decide the framing (into ``response``) and serialise the response head.

        ``known_length`` is the whole body's length when the server knows it (a list of one
        block, or nothing): then a Content-Length the app left out is added, except for
        1xx/204 (which must not carry one) and 304 (whose length describes the
        representation the client already has).

        The outcome depends only on the app's status and headers, on the request's method,
        version and keep-alive, and on whether ``known_length`` is given, so it is kept per
        handler in ``_plans``: a response costs one lookup, seven stores and the per-second
        head end, instead of serialising the app's headers, :func:`decide_framing` and a
        join (about 2k instructions).  A length the server adds is not in the plan (the next
        body's may differ): its line goes in here, as the ASGI path does.
        """
        request = response.request
        status = response.status or "500 Internal Server Error"
        try:
            key = (status, tuple(response.headers), request.method, request.version,
                   request.keep_alive, known_length is None)
            plan = self._plans.get(key)
        except TypeError:  # unhashable headers (lists instead of tuples): _app_head copes
            key = plan = None
        if plan is None:
            plan = self._plan(response, status, known_length is not None, key)
        (status_code, head, content_length, chunked, keep_alive, send_body, adds_length,
         whole) = plan
        if adds_length:  # the app gave no Content-Length: the body's own
            assert known_length is not None
            content_length = known_length
            head += (CONTENT_LENGTHS.get(known_length)
                     or content_length_parts(known_length))[1]
            if not self.unobserved:  # (for the access log and post_request)
                response.headers = [*response.headers, ("Content-Length", str(known_length))]
        response.head_sent = True
        response.status_code = status_code
        response.expected = content_length
        response.send_body = send_body
        response.chunked = chunked
        response.keep_alive = keep_alive
        if adds_length:
            return head + head_end(keep_alive, request.version)
        # the whole head, kept in the plan for the second its Date names: a clock read and a
        # comparison instead of the head end's call and a join (~0.8k instructions)
        second, data = whole[0]
        now = time.time()
        if not second <= now < second + 1.0:  # (a clock set back renews it too)
            # (filed under the second its Date names, read with it; one store: threads see
            # the old pair or the new)
            second, end = head_end_dated(keep_alive, request.version)
            data = head + end
            whole[0] = (second, data)
        return data

    def _plan(self, response: _Response, status: str, length_known: bool,
              key: tuple[Any, ...] | None) -> _Plan:
        """head_bytes the long way: (status code, head less its end, Content-Length,
        chunked, keep-alive, send body, whether the server adds the body's length, the whole
        head and the second it is for, in a list); kept in ``_plans`` (unless the headers
        are unhashable)."""
        status_code, block, content_length, close = _app_head(status, response.headers)
        request = response.request
        adds_length = content_length is None and length_known and body_allowed(status_code)
        chunked, keep_alive, send_body = decide_framing(
            status_code, 0 if adds_length else content_length, request.method,
            request.version, request.keep_alive and not close, self.keepalive)
        plan = (status_code, block + CHUNKED_HEADER if chunked else block, content_length,
                chunked, keep_alive, send_body, adds_length, [(-2.0, b"")])
        if key is not None:
            if len(self._plans) >= MEMO_ENTRIES:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def _send_file(self, wrapper: FileWrapper, head: RequestHead, response: _Response) -> None:
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
        head_bytes = self.head_bytes(response, None)
        response.transport.write(head_bytes)
        if not response.send_body:  # HEAD, 304: the same headers as GET, no body
            return
        sent = response.transport.sendfile(fileobj, offset, length)
        response.written = sent
        if sent < length:
            raise ClientDisconnected("client went away during sendfile")
        # (the app declared more than the file holds: _respond closes the connection, as
        # only the close can end such a body)


def _stream_size(body: BinaryIO) -> int | None:
    try:
        position = body.tell()
        body.seek(0, os.SEEK_END)
        size = body.tell()
        body.seek(position)
        return size
    except (AttributeError, OSError):
        return None
