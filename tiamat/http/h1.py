"""The sans-I/O HTTP/1.1 request reader every worker class shares.

A :class:`RequestReader` is fed the bytes a connection received and turns them into events:
a :class:`RequestHead` (method, target, version, headers, framing already decided),
``bytes`` of body, :data:`END_OF_MESSAGE`, and finally, if the peer broke a rule, a
:class:`ProtocolError` carrying the status to answer.  It performs no I/O and knows
nothing about WSGI or ASGI, so the sync, thread and asgi workers behave identically.

httptools (llhttp) does the tokenising and already rejects most malformed input (bare LF,
invalid tokens, TE with CL, bad chunk sizes ...).  The rules llhttp leaves to its user, and
every size limit, are enforced here, once.
"""

from __future__ import annotations

from typing import NamedTuple

import httptools

from tiamat.http.errors import ProtocolError


class Limits(NamedTuple):
    """Per-request size limits, in bytes or counts (0 disables the body limit)."""

    request_line: int = 8190
    fields: int = 100
    field_size: int = 8190
    head: int = 65536
    body: int = 100 * 1024 * 1024

    @classmethod
    def from_config(cls, cfg: object) -> Limits:
        return cls(cfg.limit_request_line, cfg.limit_request_fields,  # type: ignore[attr-defined]
                   cfg.limit_request_field_size, cfg.limit_request_head,  # type: ignore[attr-defined]
                   cfg.limit_request_body)  # type: ignore[attr-defined]


DEFAULT_LIMITS = Limits()


class RequestHead:
    """A complete request head, with the body framing already decided by the core."""

    __slots__ = (
        "chunked",
        "content_length",
        "expect_continue",
        "headers",
        "keep_alive",
        "method",
        "path",
        "query",
        "target",
        "upgrade",
        "version",
    )

    def __init__(self, method: bytes, target: bytes, version: str,
                 headers: list[tuple[bytes, bytes]], keep_alive: bool,
                 content_length: int | None, chunked: bool, expect_continue: bool,
                 upgrade: bool) -> None:
        self.method = method
        self.target = target
        path, _, self.query = target.partition(b"?")
        if path[:1] != b"/" and b"://" in path:  # absolute-form: keep only the path
            path = b"/" + path.split(b"://", 1)[1].partition(b"/")[2]
        self.path = path
        self.version = version
        #: (lower-cased name, value) pairs in arrival order
        self.headers = headers
        self.keep_alive = keep_alive
        self.content_length = content_length
        self.chunked = chunked
        self.expect_continue = expect_continue
        self.upgrade = upgrade

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def __repr__(self) -> str:
        return f"<RequestHead {self.method.decode()} {self.target!r} HTTP/{self.version}>"


class _EndOfMessage:
    __slots__ = ()

    def __repr__(self) -> str:
        return "END_OF_MESSAGE"


END_OF_MESSAGE = _EndOfMessage()


class RequestReader:
    """Feed bytes in with :meth:`feed`; take events out of :attr:`events` (a list, in order).

    After a :class:`ProtocolError` event the reader accepts nothing more: the connection is
    to be answered with the error's status and closed, so nothing that follows a rejected
    request can ever reach the app.
    """

    __slots__ = (
        "_body_size",
        "_chunked",
        "_content_length",
        "_error",
        "_expect",
        "_head_size",
        "_headers",
        "_hosts",
        "_in_message",
        "_parser",
        "_url",
        "broken",
        "events",
        "limits",
        "upgraded",
    )

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.events: list[object] = []
        self.limits = limits
        self.broken = False
        #: bytes that followed an upgrade request's head (for the WebSocket code to take)
        self.upgraded: bytes | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._error: ProtocolError | None = None
        self._in_message = False
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._body_size = 0
        self._content_length: int | None = None
        self._chunked = False
        self._expect = False
        self._hosts = 0

    @property
    def in_message(self) -> bool:
        """True while a request has started arriving but is not complete."""
        return self._in_message

    def feed(self, data: bytes) -> None:
        if self.broken or self.upgraded is not None:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self.upgraded = data[offset:]
        except httptools.HttpParserError as exc:
            self.broken = True
            error = self._error or _map_parser_error(exc)
            self.events.append(error)

    def feed_eof(self) -> None:
        """The peer closed its side: a request cut short is an error, none at all is not."""
        if not self.broken and self.in_message:
            self.broken = True
            self.events.append(ProtocolError(400, "connection closed in the middle of a request"))

    # --- httptools callbacks ----------------------------------------------------------------
    def _fail(self, status: int, reason: str) -> None:
        self._error = ProtocolError(status, reason)
        raise self._error

    def on_message_begin(self) -> None:
        self._reset()
        self._in_message = True

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.limits.request_line > 0:
            self._fail(414, "request line too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        limits = self.limits
        size = len(name) + len(value)
        self._head_size += size + 4
        if size > limits.field_size > 0:
            self._fail(431, "header field too large")
        if len(self._headers) >= limits.fields > 0:
            self._fail(431, "too many header fields")
        if self._head_size > limits.head:
            self._fail(431, "request head too large")
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"content-length":
            self._content_length_header(value)
        elif name == b"transfer-encoding":
            self._transfer_encoding_header(value)
        elif name == b"host":
            self._hosts += 1
        elif name == b"expect":
            self._expect = value.lower() == b"100-continue"
        self._headers.append((name, value))

    def _content_length_header(self, value: bytes) -> None:
        # llhttp already rejects signs, spaces and duplicates; lists of equal values and
        # non-ASCII digits are caught here.
        parts = {part.strip() for part in value.split(b",")}
        if len(parts) != 1:
            self._fail(400, "conflicting Content-Length values")
        digits = parts.pop()
        if not digits or not digits.isdigit() or not digits.isascii() or len(digits) > 18:
            self._fail(400, "invalid Content-Length")
        length = int(digits)
        if self._content_length is not None and self._content_length != length:
            self._fail(400, "conflicting Content-Length values")
        self._content_length = length

    def _transfer_encoding_header(self, value: bytes) -> None:
        codings = [c.strip(b" \t").lower() for c in value.split(b",")]
        if self._chunked or not codings or codings[-1] != b"chunked":
            self._fail(400, "Transfer-Encoding must end in chunked")
        if any(c != b"chunked" for c in codings):
            self._fail(501, "unsupported Transfer-Encoding")
        if len(codings) > 1:
            self._fail(400, "chunked applied more than once")
        self._chunked = True

    def on_headers_complete(self) -> None:
        parser = self._parser
        version = parser.get_http_version()
        if version == "1.1" and self._hosts != 1:
            self._fail(400, "missing Host header" if not self._hosts else "more than one Host header")
        if self._hosts > 1:
            self._fail(400, "more than one Host header")
        if self._chunked and self._content_length is not None:
            self._fail(400, "both Transfer-Encoding and Content-Length")
        body_limit = self.limits.body
        if self._content_length is not None and self._content_length > body_limit > 0:
            self._fail(413, "request body too large")
        self.events.append(RequestHead(
            parser.get_method(), self._url, version, self._headers, parser.should_keep_alive(),
            self._content_length, self._chunked, self._expect, parser.should_upgrade()))

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self.limits.body > 0:
            self._fail(413, "request body too large")
        self.events.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        self.events.append(END_OF_MESSAGE)


def _map_parser_error(exc: Exception) -> ProtocolError:
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        return ProtocolError(400, "invalid method")
    if isinstance(exc, httptools.HttpParserInvalidURLError):
        return ProtocolError(400, "invalid request target")
    text = str(exc)
    if "Transfer-Encoding" in text and "invalid" in text.lower():
        return ProtocolError(400, "invalid Transfer-Encoding")
    return ProtocolError(400, text or "malformed request")
