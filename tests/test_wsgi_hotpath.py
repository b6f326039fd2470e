"""The shortcuts the WSGI hot path takes must give exactly what the long way gives.

Each per-request shortcut (a value kept up to date instead of computed when read, a result
remembered for input seen before) is checked here against the computation it replaces, on
the readers' corpus of good and bad requests fed in every split, and on the environ a real
server hands a real app.
"""

from __future__ import annotations

import io
import itertools
import re
import socket
from typing import Any

import pytest
from conftest import read_response

from tests.test_reader_unit import CORPUS
from tiamat.config import load_config
from tiamat.http import h1
from tiamat.http.h1 import MEMO_ENTRIES, MEMO_KEY_BYTES, RequestHead, RequestReader
from tiamat.http.h11_reader import H11RequestReader
from tiamat.http.proxy import TRUSTED_KEY
from tiamat.wsgi import WSGIHandler

READERS = [RequestReader, H11RequestReader]


def _in_message_long_way(reader: RequestReader) -> bool:
    """What ``in_message`` was as a property: a request has started but is not complete."""
    state = reader._state
    return (state != h1._HEAD and state != h1._DONE) or bool(reader._buf)


def _feed_checked(reader: RequestReader, pieces: list[bytes]) -> None:
    for piece in pieces:
        reader.feed(piece)
        assert reader.in_message == _in_message_long_way(reader), piece
    reader.feed_eof()
    assert reader.in_message == _in_message_long_way(reader)


SECOND = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"


@pytest.mark.parametrize("reader_class", READERS)
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_in_message_matches_the_state_at_every_split(reader_class: type[RequestReader],
                                                     name: str) -> None:
    data = CORPUS[name][0] + SECOND  # pipelined: a second request follows the first
    _feed_checked(reader_class(), [data])
    _feed_checked(reader_class(), [data[i:i + 1] for i in range(len(data))])
    for cut in range(1, len(data)):
        _feed_checked(reader_class(), [data[:cut], data[cut:]])


def test_in_message_follows_a_request_through_its_parts() -> None:
    reader = RequestReader()
    assert not reader.in_message
    reader.feed(b"POST / HTTP/1.1\r\nHo")
    assert reader.in_message  # a head has started
    reader.feed(b"st: a\r\nContent-Length: 3\r\n\r\n")
    assert reader.in_message  # the head is complete, the body is not
    reader.feed(b"ab")
    assert reader.in_message
    reader.feed(b"c")
    assert not reader.in_message  # complete: between requests
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert not reader.in_message
    reader.feed(b"\r\n")  # an empty line before a request line is skipped (RFC 9112 2.2)
    assert not reader.in_message
    reader.feed(b"GET")
    assert reader.in_message
    reader.feed_eof()  # cut off inside a request: an error, and the reader stops
    assert reader.broken and reader.in_message == _in_message_long_way(reader)


def test_in_message_after_a_rejected_request() -> None:
    reader = RequestReader()
    reader.feed(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n")
    assert reader.broken
    assert not reader.in_message  # nothing buffered: the worker answers and closes


# --- response heads: the per-handler plans give what the long way gives ------------------


class _Sink:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def sendfile(self, file: Any, offset: int, count: int | None) -> int:
        raise AssertionError("not used here")


def _app(environ: dict[str, Any], start_response: Any) -> Any:
    """One app, many kinds of response, chosen by the path; bodies vary with the query."""
    path, size = environ["PATH_INFO"], int(environ["QUERY_STRING"] or "1")
    body = b"x" * size
    if path == "/length":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(size))])
        return [body]
    if path == "/nolength":  # a list of one: the server adds the length of this very body
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [body]
    if path == "/stream":  # unknown length: chunked in HTTP/1.1, closed in HTTP/1.0
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([body, b"end"])
    if path == "/iterlength":  # an iterable with a declared length, as a framework answers
        start_response("200 OK", [("Content-Length", str(size + 3))])
        return iter([body, b"end"])
    if path == "/iterover":  # a first block beyond the declared length: cut, then closed
        start_response("200 OK", [("Content-Length", str(size))])
        return iter([body + b"over", b"more"])
    if path == "/nocontent":
        start_response("204 No Content", [("X-A", "1")])
        return [b""]
    if path == "/notmodified":
        start_response("304 Not Modified", [("Content-Length", "99")])
        return [b""]
    if path == "/close":
        start_response("200 OK", [("Content-Length", str(size)), ("Connection", "close")])
        return [body]
    if path == "/lists":  # headers as lists, not tuples: unhashable, never kept
        start_response("200 OK", [["Content-Length", str(size)]])  # type: ignore[list-item]
        return [body]
    start_response("404 Not Found", [("Content-Length", "0")])
    return []


def _head(request: bytes) -> RequestHead:
    reader = RequestReader()
    reader.feed(request)
    head = reader.events[0]
    assert isinstance(head, RequestHead), head
    return head


_DATE = re.compile(rb"\r\nDate: [^\r]*")


def _answer(handler: WSGIHandler, request: bytes) -> tuple[bool, bytes]:
    sink = _Sink()
    environ = handler.connection_environ(("127.0.0.1", 1), ("127.0.0.1", 2), "http")
    keep_alive = handler.handle(_head(request), io.BytesIO(), environ, sink)[0]
    return keep_alive, _DATE.sub(b"", sink.data)


def test_response_heads_from_plans_equal_the_long_way() -> None:
    cfg = load_config({}, environ={})
    warm = WSGIHandler(_app, cfg, multithread=False)
    paths = ["/length", "/nolength", "/stream", "/iterlength", "/iterover", "/nocontent",
             "/notmodified", "/close", "/lists", "/missing"]
    requests = []
    for path, size, method, version, connection in itertools.product(
            paths, (1, 7), ("GET", "HEAD"), ("1.1", "1.0"), ("", "close", "keep-alive")):
        requests.append(f"{method} {path}?{size} HTTP/{version}\r\nHost: a\r\n"
                        f"{'Connection: ' + connection + chr(13) + chr(10) if connection else ''}"
                        f"\r\n".encode())
    for _ in range(2):  # the second time round, every plan the warm handler keeps is used
        for request in requests:
            cold = WSGIHandler(_app, cfg, multithread=False)
            assert _answer(warm, request) == _answer(cold, request), request
    # the length the server added is each body's own, never a kept one
    assert b"Content-Length: 7\r\n" in _answer(warm, b"GET /nolength?7 HTTP/1.1\r\nHost: a\r\n\r\n")[1]
    assert b"Content-Length: 1\r\n" in _answer(warm, b"GET /nolength?1 HTTP/1.1\r\nHost: a\r\n\r\n")[1]
    # a first block within the declared length goes out whole, one beyond it is cut
    assert _answer(warm, b"GET /iterlength?2 HTTP/1.1\r\nHost: a\r\n\r\n")[1].endswith(
        b"\r\n\r\nxxend")
    keep_alive, data = _answer(warm, b"GET /iterover?2 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert data.endswith(b"\r\n\r\nxx") and not keep_alive


# --- the app called through its class's __call__, bound ----------------------------------


class _ClassApp:
    """A WSGI app as an instance (as Flask's is), with an instance attribute that calling the
    instance must ignore."""

    def __init__(self) -> None:
        self.calls = 0
        self.__call__ = lambda environ, start_response: [b"instance attribute"]

    def __call__(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        self.calls += 1
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"class method"]


class _SubApp(_ClassApp):
    pass


def _function_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [])
    return [b"function"]


@pytest.mark.parametrize("app_class", [_ClassApp, _SubApp])
def test_an_instance_app_is_called_as_calling_it_would(app_class: type[_ClassApp]) -> None:
    app = app_class()
    handler = WSGIHandler(app, load_config({}, environ={}), multithread=False)
    assert handler.app is app
    for count in (1, 2):
        _, data = _answer(handler, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert data.endswith(b"\r\n\r\nclass method")
        assert app.calls == count


def test_other_callables_are_called_as_they_are() -> None:
    import functools

    for app in (_function_app, functools.partial(_function_app)):
        handler = WSGIHandler(app, load_config({}, environ={}), multithread=False)
        _, data = _answer(handler, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert data.endswith(b"\r\n\r\nfunction")


# --- forwarding headers noticed as the environ is built ----------------------------------


def _environ(request: bytes, trusted: bool, cfg_values: dict[str, Any] | None = None) -> dict:
    cfg = load_config(cfg_values or {}, environ={})
    handler = WSGIHandler(_function_app, cfg, multithread=False)
    conn_environ = handler.connection_environ(("10.0.0.9", 5000), ("127.0.0.1", 80), "http")
    if trusted:
        conn_environ[TRUSTED_KEY] = True
    return handler.build_environ(_head(request), io.BytesIO(), conn_environ)


@pytest.mark.parametrize("fields", [
    b"X-Forwarded-For: 203.0.113.7\r\n",
    b"X-Forwarded-For: 198.51.100.1\r\nX-Forwarded-For: 203.0.113.7\r\n",  # a repeated one
    b"User-Agent: u\r\nx-forwarded-for: 203.0.113.7\r\nAccept: */*\r\n",
])
def test_forwarding_headers_apply_only_from_a_trusted_peer(fields: bytes) -> None:
    request = b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n"
    assert _environ(request, trusted=True)["REMOTE_ADDR"] == "203.0.113.7"
    assert _environ(request, trusted=False)["REMOTE_ADDR"] == "10.0.0.9"


def test_a_configured_secure_scheme_header_counts_as_forwarding() -> None:
    values = {"secure_scheme_headers": {"X-Forwarded-Ssl": "on"}}
    request = b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-Ssl: on\r\n\r\n"
    assert _environ(request, trusted=True, cfg_values=values)["wsgi.url_scheme"] == "https"
    assert _environ(request, trusted=False, cfg_values=values)["wsgi.url_scheme"] == "http"
    plain = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert _environ(plain, trusted=True, cfg_values=values)["wsgi.url_scheme"] == "http"


@pytest.mark.parametrize(("fields", "key", "value"), [
    (b"X-A: 1\r\nX-A: 1\r\n", "HTTP_X_A", "1,1"),  # one-character values: one shared str
    (b"X-A:\r\nX-A:\r\nX-A: z\r\n", "HTTP_X_A", ",,z"),  # empty ones too
    (b"Cookie: a\r\nCookie: a\r\n", "HTTP_COOKIE", "a; a"),
    (b"X-B: one\r\nX-B: two\r\n", "HTTP_X_B", "one,two"),
    (b"X-Forwarded-For: 1\r\nX-Forwarded-For: 1\r\n", "HTTP_X_FORWARDED_FOR", "1,1"),
])
def test_repeated_fields_are_joined_whatever_their_values(fields: bytes, key: str,
                                                          value: str) -> None:
    request = b"GET / HTTP/1.1\r\nHost: a\r\n" + fields + b"\r\n"
    for trusted in (False, True):
        assert _environ(request, trusted=trusted)[key] == value


# --- the connection's environ, shaped to leave room for each request's keys ---------------


def test_an_environ_shows_no_placeholder_and_no_padding() -> None:
    handler = WSGIHandler(_function_app, load_config({}, environ={}), multithread=False)
    conn_environ = handler.connection_environ(("10.0.0.9", 5000), ("127.0.0.1", 80), "http")
    assert not [key for key in conn_environ if key.startswith("tiamat.pad")]
    body = io.BytesIO()
    environ = handler.build_environ(_head(b"POST /p?q=1 HTTP/1.0\r\nHost: a\r\nX-A: 1\r\n"
                                          b"Content-Length: 0\r\n\r\n"), body, conn_environ)
    assert (environ["REQUEST_METHOD"], environ["PATH_INFO"], environ["QUERY_STRING"],
            environ["RAW_URI"], environ["SERVER_PROTOCOL"]) == ("POST", "/p", "q=1", "/p?q=1",
                                                                "HTTP/1.0")
    assert environ["wsgi.input"] is body
    assert None not in environ.values()
    assert not [key for key in environ if key.startswith("tiamat.pad")]
    assert {key for key in environ if key.startswith(("HTTP_", "CONTENT_"))} == {
        "HTTP_HOST", "HTTP_X_A", "CONTENT_LENGTH"}


def test_decoded_targets_stay_bounded_and_long_ones_are_not_kept() -> None:
    handler = WSGIHandler(_function_app, load_config({}, environ={}), multithread=False)
    conn_environ = handler.connection_environ(("127.0.0.1", 1), ("127.0.0.1", 2), "http")
    for n in range(MEMO_ENTRIES * 3):
        environ = handler.build_environ(_head(b"GET /item/%d?x=1 HTTP/1.1\r\nHost: a\r\n\r\n" % n),
                                        io.BytesIO(), conn_environ)
        assert environ["PATH_INFO"] == f"/item/{n}"
    assert 0 < len(handler._targets) <= MEMO_ENTRIES
    handler._targets.clear()
    long_target = b"/" + b"a" * (MEMO_KEY_BYTES + 1)
    environ = handler.build_environ(_head(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % long_target),
                                    io.BytesIO(), conn_environ)
    assert environ["RAW_URI"] == long_target.decode() and not handler._targets


def _get(sock: socket.socket, path: bytes) -> bytes:
    sock.sendall(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
    head, body, left = read_response(sock)
    assert head.startswith(b"HTTP/1.1 200") and left == b""
    return body


@pytest.mark.parametrize("worker_class", ["sync", "thread"])
def test_an_app_that_closes_an_empty_input_spoils_no_later_request(tiamat_server, worker_class):
    # every request without a body shares one empty wsgi.input (no file made per request):
    # closing it, or reading it every way, changes nothing for the requests after
    server = tiamat_server("tests/apps/wk_wsgi.py", "-k", worker_class, "--threads", "2", "-w", "1")
    expected = repr((b"", b"", b"", [], [])).encode()
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        for _ in range(3):
            assert _get(sock, b"/input") == expected
            assert _get(sock, b"/echo") == b""
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc")
        assert read_response(sock)[1] == b"abc"
        assert _get(sock, b"/input") == expected
