"""Response framing shared by every worker class: status lines, Date, keep-alive, chunking.

The decision how a response body is delimited (Content-Length, chunked, or connection
close), whether a body is sent at all (HEAD, 1xx, 204, 304) and whether the connection
stays open is made here, in :func:`decide_framing`, and nowhere else.
"""

from __future__ import annotations

import time
from http import HTTPStatus
from typing import NamedTuple

from tiamat.http.h1 import MEMO_ENTRIES

SERVER_HEADER = b"Server: tiamat\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CHUNKED_HEADER = b"Transfer-Encoding: chunked\r\n"
CLOSE_HEADER = b"Connection: close\r\n"
KEEP_ALIVE_HEADER = b"Connection: keep-alive\r\n"
_NO_BODY_STATUS = frozenset({204, 304})

_status_lines: dict[object, bytes] = {}


def status_line(status: str | int) -> bytes:
    """``'200 OK'`` or ``200`` -> ``b'HTTP/1.1 200 OK\\r\\n'``; cached, so built once per status."""
    line = _status_lines.get(status)
    if line is None:
        if isinstance(status, int):
            try:
                text = f"{status} {HTTPStatus(status).phrase}"
            except ValueError:
                text = f"{status} Unknown"
        else:
            text = status
            code = text[:3]
            if len(text) < 3 or not code.isdigit() or (len(text) > 3 and text[3] != " ") \
                    or "\r" in text or "\n" in text:
                raise ValueError(f"invalid status {status!r}")
        line = b"HTTP/1.1 " + text.encode("latin-1") + b"\r\n"
        if len(_status_lines) < 512:
            _status_lines[status] = line
    return line


class DateHeader:
    """The ``Date:`` header line, rebuilt at most once a second rather than per response."""

    __slots__ = ("_line", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._line = b""

    def __call__(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._line = b"Date: " + http_date(second).encode() + b"\r\n"
        return self._line


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def http_date(seconds: float) -> str:
    """RFC 9110 IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``), as ``email.utils.formatdate(
    usegmt=True)`` gives, without importing the email package (a few ms of every start)."""
    t = time.gmtime(seconds)
    return (f"{_DAYS[t.tm_wday]}, {t.tm_mday:02d} {_MONTHS[t.tm_mon - 1]} {t.tm_year:04d} "
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} GMT")


date_header = DateHeader()


class Framing(NamedTuple):
    """How one response goes on the wire."""

    #: send the body with chunked transfer-coding
    chunked: bool
    #: keep the connection open afterwards
    keep_alive: bool
    #: whether any body bytes are sent at all (not for HEAD, 1xx, 204, 304)
    send_body: bool


def asks_close(value: str | bytes) -> bool:
    """Whether an app's ``Connection`` header value lists the ``close`` option.

    RFC 9110 7.6.1: the value is a comma-separated list of case-insensitive tokens, so
    ``keep-alive, Close`` asks for the close and ``closed`` does not.  (Workers keep the
    answer per header value: this is not on the per-request path.)"""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return any(token.strip(" \t").lower() == "close" for token in text.split(","))


def app_content_length(value: str | bytes) -> int:
    """An app's Content-Length header value as a length, for the WSGI and the ASGI path
    alike: ASCII digits only (RFC 9110 8.6), so no sign, spaces or ``1_0``; ValueError for
    anything else, which the worker answers as the app's error (a 500)."""
    if not (value.isdigit() and value.isascii()):  # (bytes.isdigit is ASCII-only anyway)
        raise ValueError(f"invalid Content-Length {value!r}")
    return int(value)


#: Content-Length (an app's raw value, or a body's length) -> (length, header line), for the
#: WSGI and the ASGI path alike: the same lengths come back often enough that a dict hit
#: beats int() and formatting; emptied when full
CONTENT_LENGTHS: dict[bytes | int, tuple[int, bytes]] = {}


def content_length_parts(value: bytes | int) -> tuple[int, bytes]:
    """(length, ``Content-Length`` line) for an app's raw value, checked by
    :func:`app_content_length`, or for a body's length as counted; look in CONTENT_LENGTHS
    first (this is the miss)."""
    length = value if value.__class__ is int else app_content_length(value)  # type: ignore[arg-type]
    parts = (length, b"Content-Length: %d\r\n" % length)
    if value.__class__ is bytes or value.__class__ is int:
        if len(CONTENT_LENGTHS) >= MEMO_ENTRIES:
            CONTENT_LENGTHS.clear()
        CONTENT_LENGTHS[value] = parts
    return parts


def body_allowed(status_code: int) -> bool:
    """Whether a response with this status may have a body (not 1xx, 204, 304), so whether
    a Content-Length the server adds on its own would be right."""
    return status_code >= 200 and status_code not in _NO_BODY_STATUS


_framings: dict[tuple[int, bool, bool, str, bool, bool], Framing] = {}


def decide_framing(status_code: int, content_length: int | None, method: bytes,
                   http_version: str, request_keep_alive: bool, server_keep_alive: bool) -> Framing:
    """Choose the framing of a response from what the app gave and what the client asked.

    The answer depends on a handful of small values, so it is kept per combination: a
    lookup instead of building a named tuple for every response.
    """
    key = (status_code, content_length is None, method == b"HEAD", http_version,
           request_keep_alive, server_keep_alive)
    framing = _framings.get(key)
    if framing is None:
        framing = _decide_framing(status_code, content_length, method, http_version,
                                  request_keep_alive, server_keep_alive)
        if len(_framings) < 4096:
            _framings[key] = framing
    return framing


def _decide_framing(status_code: int, content_length: int | None, method: bytes,
                    http_version: str, request_keep_alive: bool, server_keep_alive: bool) -> Framing:
    send_body = method != b"HEAD" and body_allowed(status_code)
    keep_alive = request_keep_alive and server_keep_alive
    chunked = False
    if content_length is None and send_body:
        if http_version == "1.1":
            chunked = True
        else:
            keep_alive = False  # HTTP/1.0 without a length: the close ends the body
    return Framing(chunked, keep_alive, send_body)


def connection_header(keep_alive: bool, http_version: str) -> bytes:
    """The Connection header a response needs (none for the HTTP/1.1 keep-alive default)."""
    if not keep_alive:
        return CLOSE_HEADER
    return KEEP_ALIVE_HEADER if http_version == "1.0" else b""


class HeadEnd:
    """What ends every response head: ``Server:``, ``Date:``, the Connection header the
    framing needs (none for the HTTP/1.1 keep-alive default, see :func:`connection_header`)
    and the empty line, in one piece, rebuilt at most once a second.

    Per response it costs a clock read, a float comparison against the second the pieces
    were built for (``int(time.time())`` cost ~0.6k instructions more) and two lookups
    (by version, then keep-alive as an index: a tuple key cost ~0.3k more to build and hash).
    """

    __slots__ = ("_now",)

    def __init__(self) -> None:
        #: (the second the ends are for, the next one, the ends by version then keep-alive):
        #: one attribute, replaced in one store, so that a thread never pairs one second's
        #: range with another second's ends (three stores could, under -k thread)
        self._now: tuple[float, float, dict[str, tuple[bytes, bytes]]] = (0.0, 0.0, {})

    def get(self, keep_alive: bool, http_version: str) -> bytes:
        now = time.time()
        second, following, ends = self._now
        if not second <= now < following:  # (a clock set back rebuilds them too)
            second, following, ends = self._renew(now)
        return ends[http_version][keep_alive]

    def dated(self, keep_alive: bool, http_version: str) -> tuple[float, bytes]:
        """The end and the second its Date names, from one read of the pieces (for a cache
        of whole heads built with it: filed under that second, which a second read could
        pair with another second's end under -k thread)."""
        now = time.time()
        second, following, ends = self._now
        if not second <= now < following:
            second, following, ends = self._renew(now)
        return second, ends[http_version][keep_alive]

    def _renew(self, now: float) -> tuple[float, float, dict[str, tuple[bytes, bytes]]]:
        whole = int(now)
        lines = SERVER_HEADER + b"Date: " + http_date(whole).encode() + b"\r\n"
        ends = {version: (lines + connection_header(False, version) + b"\r\n",
                          lines + connection_header(True, version) + b"\r\n")
                for version in ("1.1", "1.0")}
        self._now = state = (float(whole), whole + 1.0, ends)
        return state


#: a bound method, not the instance: the interpreter calls a bound method as a plain function
#: (a specialised call), while calling an instance goes through ``__call__``'s lookup in C
#: (~0.4k instructions more per response)
_HEAD_END = HeadEnd()
head_end = _HEAD_END.get
head_end_dated = _HEAD_END.dated


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (an empty ``data`` must not be framed: it would end it)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


def error_response(status: int, reason: str | None = None) -> bytes:
    """A complete small ``text/plain`` response that closes the connection (400, 413, 500 ...)."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    body = f"{status} {phrase}{': ' + reason if reason else ''}\n".encode("latin-1", "replace")
    response = (status_line(status) + SERVER_HEADER + date_header()
                + b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n" % len(body)
                + CLOSE_HEADER + b"\r\n" + body)
    return response
