"""The sans-I/O HTTP/1.1 request reader every worker class shares.

A :class:`RequestReader` is fed the bytes a connection received and turns them into events:
a :class:`RequestHead` (method, target, version, headers, framing already decided),
``bytes`` of body, :data:`END_OF_MESSAGE`, and finally, if the peer broke a rule, a
:class:`ProtocolError` carrying the status to answer.  It performs no I/O and knows
nothing about WSGI or ASGI, so the sync, thread and asgi workers behave identically.

How the work is split, and why:

* The reader itself finds where a request head ends (one C-level regex search per feed,
  resumed where the last one stopped) and enforces the request-line and head size limits
  while the head is still arriving, so a head trickled a byte at a time, or a huge one sent
  in pieces, is cut off at the limit instead of being buffered without bound.
* Only a *complete* head goes to the tokeniser: llhttp (httptools) here, or h11's grammar in
  :mod:`tiamat.http.h11_reader`.  llhttp already rejects most malformed heads (bare CR/LF,
  obs-fold, bad tokens, NUL/CTL in values, signs in Content-Length ...).
* Every rule the tokenisers do not share (Transfer-Encoding, Content-Length lists, Host,
  methods, versions, field limits) is enforced once, in :meth:`RequestReader._field`,
  :meth:`RequestReader._check_fields` and :meth:`RequestReader._finish_head` (or its short
  form for a plain HTTP/1.1 head, :meth:`RequestReader._finish_plain_head`), for both
  tokenisers.
* The hot path is measured in instructions (``python bench/run.py --instructions``): only
  ``on_header`` calls back from llhttp, the target and version are sliced off the request
  line, and bytes are searched with ``find``/``partition``, never ``in`` (see _VERSIONS).
* The body (Content-Length or chunked, trailers included) is decoded here in Python, per
  chunk and never per byte, so chunk-size syntax, the CRLF after chunk data, chunk
  extensions and the body limit are checked identically whichever tokeniser is chosen.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import httptools

from tiamat.http.errors import ProtocolError


class Limits(NamedTuple):
    """Per-request size limits, in bytes or counts (0 disables a limit, except ``head``)."""

    request_line: int = 8190
    fields: int = 100
    field_size: int = 8190
    head: int = 65536
    body: int = 100 * 1024 * 1024
    #: accept obs-fold (continuation lines) by unfolding them, instead of answering 400
    permit_obs_fold: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> Limits:
        return cls(cfg.limit_request_line, cfg.limit_request_fields, cfg.limit_request_field_size,
                   cfg.limit_request_head, cfg.limit_request_body,
                   bool(getattr(cfg, "permit_obsolete_folding", False)))


DEFAULT_LIMITS = Limits()

#: longest chunk-size line (size, extensions, CRLF) accepted: bounds chunk extensions
MAX_CHUNK_LINE = 4096
#: most chunk-extension bytes accepted over a whole request body
MAX_CHUNK_EXT_TOTAL = 65536

#: the methods llhttp implements; the h11 tokeniser accepts the same set, so both give the
#: same verdict.  Any other well-formed token gets 501, anything else 400.
KNOWN_METHODS = frozenset(
    b"DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH "
    b"SEARCH UNLOCK BIND REBIND UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY "
    b"SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK SOURCE QUERY".split())

#: the fields the reader itself acts on (framing, Host, keep-alive, 100-continue, upgrade)
_FRAMING_FIELDS = frozenset((b"host", b"content-length", b"transfer-encoding", b"connection",
                             b"expect", b"upgrade"))
_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_IS_TOKEN = re.compile(_TOKEN).fullmatch
#: where a head ends: an empty line (bare-LF endings are found too, so that the tokeniser
#: can reject them at once instead of waiting for a CRLFCRLF that never comes)
_HEAD_END = re.compile(rb"\n\r?\n")
_LEADING_CRLF = re.compile(rb"(?:\r\n)+")
_OBS_FOLD = re.compile(rb"\r\n[ \t]+")
_QUOTED = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t !-~\x80-\xff])*"'
_CHUNK_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,16})((?:;" + _TOKEN + rb"(?:=(?:" + _TOKEN + rb"|" + _QUOTED + rb"))?)*)\r\n")
_TRAILER_LINE = re.compile(
    _TOKEN + rb":[ \t]*(?:[!-~\x80-\xff](?:[\t !-~\x80-\xff]*[!-~\x80-\xff])?)?[ \t]*\r\n")

# On the hot path, bytes are searched with find or partition, never ``in``: ``b"x" in data``
# first tries the operand as an int, and raising and clearing that TypeError costs about 1.8k
# instructions a test.  partition (one argument) is cheaper still than find, whose optional
# arguments go through the tuple parser.
_NO_LIMIT = 1 << 62
_VERSIONS = {b" HTTP/1.1\r\n": "1.1", b" HTTP/1.0\r\n": "1.0"}

# reader states
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _DONE = range(7)


#: Bounds of the workers' hot-path memos (request targets and paths, the app's header lines,
#: heads and lengths): at most MEMO_ENTRIES entries each (emptied when full: keys with ids
#: in them do not repeat), and no key or line longer than MEMO_KEY_BYTES (a client sending
#: distinct 8 KB targets would otherwise make a worker keep megabytes of them)
MEMO_ENTRIES = 512
MEMO_KEY_BYTES = 256


class RequestHead:
    """A complete request head, with the body framing already decided by the core.

    The reader builds one per request by calling the class, which has no ``__init__``, and
    eleven slot stores (an ``__init__`` with eleven arguments cost about 5k instructions, an
    eighth of parsing a small head; ``object.__new__(RequestHead)`` ~0.5k more than the
    call, as a builtin taking ``*args, **kwargs``); slots, unlike a named tuple's fields, are
    read by a specialised attribute load, and a request reads them some fifteen times.
    """

    __slots__ = ("chunked", "content_length", "expect_continue", "has_body", "headers",
                 "keep_alive", "method", "path", "query", "target", "upgrade", "version")

    method: bytes
    #: the request target as sent
    target: bytes
    #: the target's path (for an absolute-form target, only its path) and its query
    path: bytes
    query: bytes
    version: str
    #: (lower-cased name, value) pairs in arrival order
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    content_length: int | None
    chunked: bool
    #: ``Expect: 100-continue`` in an HTTP/1.1 request (ignored in HTTP/1.0, RFC 9110 10.1.1)
    expect_continue: bool
    upgrade: bool
    #: whether body bytes follow (chunked, or a Content-Length above 0): a slot, not a
    #: property, as every worker reads it per request
    has_body: bool

    def __repr__(self) -> str:
        return f"<RequestHead {self.method.decode()} {self.target!r} HTTP/{self.version}>"


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """``b'/a?b=1'`` -> ``(b'/a', b'b=1')``; an absolute-form target keeps only its path, and
    a target without a query comes back as its own path (the same object: build_environ
    relies on it)."""
    path, mark, query = target.partition(b"?")
    if path[:1] != b"/":
        if path.find(b"://") >= 0:
            path = b"/" + path.split(b"://", 1)[1].partition(b"/")[2]
    elif not mark:
        path = target
    return path, query


class _EndOfMessage:
    __slots__ = ()

    def __repr__(self) -> str:
        return "END_OF_MESSAGE"


END_OF_MESSAGE = _EndOfMessage()


def whole_request(events: list[Any]) -> RequestHead | None:
    """The head of a whole request without a body, when that is all ``events`` hold (a head
    and its end, as one read of a plain GET gives), taken off them; else None.

    The workers' common case: such a request goes straight to the app, as walking the
    events would (start, no body, dispatch) take it there, and a 100-continue is moot.
    """
    if len(events) == 2 and events[1] is END_OF_MESSAGE and events[0].__class__ is RequestHead:
        head = events[0]
        events.clear()
        return head  # type: ignore[no-any-return]
    return None


def may_end_after(reader: RequestReader) -> bool:
    """Whether a connection the server wants to end (handed on to a less busy worker, or the
    worker stopping) may end after the response it is making now: not while a further
    request has begun to arrive, queued whole or in part, which the close would cut off (the
    response after it says Connection: close instead)."""
    return not (reader.events or reader.in_message)


class RequestReader:
    """Feed bytes in with :meth:`feed`; take events out of :attr:`events` (a list, in order).

    After a :class:`ProtocolError` event the reader accepts nothing more: the connection is
    to be answered with the error's status and closed, so nothing that follows a rejected
    request can ever reach the app.

    An upgrade request (``Upgrade`` + ``Connection: upgrade``, or ``CONNECT``) is delivered
    like any other (head, body, end of message); the reader then stops and leaves the bytes
    that followed it in :attr:`upgraded`, for the WebSocket (or tunnel) code to take.

    This class tokenises heads with llhttp; :class:`tiamat.http.h11_reader.H11RequestReader`
    overrides only :meth:`_tokenise`.
    """

    __slots__ = (
        "_body_size",
        "_buf",
        "_chunked",
        "_conn_tokens",
        "_content_length",
        "_expect",
        "_ext_total",
        "_field_count",
        "_fields_room",
        "_framing_seen",
        "_head_size",
        "_headers",
        "_hosts",
        "_keep_alive",
        "_max_field",
        "_max_fields",
        "_max_head",
        "_max_line",
        "_obs_fold",
        "_parser",
        "_parser_dirty",
        "_remaining",
        "_scanned",
        "_state",
        "_upgrade",
        "_upgrade_header",
        "_url",
        "broken",
        "events",
        "in_message",
        "limits",
        "upgraded",
    )

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.events: list[object] = []
        self.limits = limits
        # the limits as _head compares them (0 = no limit becomes a bound never reached)
        self._max_line = limits.request_line + 1 if limits.request_line > 0 else _NO_LIMIT
        self._max_fields = limits.fields if limits.fields > 0 else _NO_LIMIT
        self._max_field = limits.field_size if limits.field_size > 0 else _NO_LIMIT
        # the longest field section (from the request line's LF) that can break neither the
        # field size limit nor the count limit (a field line takes at least 4 bytes), so a
        # head no longer than that needs no count and no look at its fields
        self._fields_room = min(self._max_field, 4 * self._max_fields)
        # (and the two other limits every head reads, as plain slots: a named tuple's field is
        # not read by a specialised attribute load)
        self._max_head = limits.head
        self._obs_fold = limits.permit_obs_fold
        self.broken = False
        #: True while a request has started arriving but is not complete.  A slot that
        #: feed() keeps up to date (see _update_in_message), not a property: the workers
        #: read it after every read, and a property call costs ~0.6k instructions
        self.in_message = False
        #: bytes that followed an upgrade request (for the WebSocket code to take)
        self.upgraded: bytes | None = None
        self._buf = bytearray()
        self._scanned = 0
        self._state = _HEAD
        self._remaining = 0
        self._body_size = 0
        self._ext_total = 0
        self._parser: Any = None
        self._parser_dirty = True
        self._reset()

    def _reset(self) -> None:
        self._start_head()
        self._head_size = 0
        self._upgrade = False
        self._keep_alive = True

    def _start_head(self) -> None:
        """The per-head state, before a head is tokenised."""
        self._framing_seen = False
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._field_count = self._hosts = 0
        self._content_length: int | None = None
        self._conn_tokens: bytes | None = None
        self._chunked = self._expect = self._upgrade_header = False

    def _update_in_message(self) -> None:
        """Set :attr:`in_message` from the state and the buffer (after every change to them:
        only feed() and _break() change them)."""
        state = self._state
        self.in_message = (state != _HEAD and state != _DONE) or bool(self._buf)

    # --- feeding ----------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self.broken or self.upgraded is not None or not data:
            return
        buf = self._buf
        pos = 0
        try:
            if buf:
                buf += data
                work: bytes | bytearray = buf
            else:
                work = data
                # (any byte up to CR: a CR or LF is an empty line to skip, and the others
                # are refused alike either way)
                if self._state == _HEAD and data[0] > 13:
                    # the usual read: nothing pending and a head starting; parse it before
                    # the general loop (which would do the same in more steps).  Exactly one
                    # whole head is found with partition (one C argument: see _VERSIONS); a
                    # head over the limit goes the general way, to be refused there
                    end_mark, rest = data.partition(b"\r\n\r\n")[1:]
                    if end_mark and not rest and len(data) <= self._max_head:
                        self._parse_head(data)
                        if self.upgraded is None:
                            # in_message was False (the state _HEAD, the buffer empty), and
                            # stays so unless a body is to come or the connection is done
                            state = self._state
                            if state != _HEAD:
                                self.in_message = state != _DONE
                            return
                        pos = len(data)
                    else:
                        pos = self._head(data, 0)
                    if pos == len(data) and self.upgraded is None:
                        # exactly one head, nothing left over: the buffer is empty, so only
                        # a body to come (or none) decides in_message
                        state = self._state
                        self.in_message = state != _HEAD and state != _DONE
                        return
                    if pos < 0:  # the head is not complete yet
                        buf += data
                        self.in_message = True
                        return
            if self.upgraded is None:
                pos = self._run(work, pos)
        except ProtocolError as error:
            self._break(error)
            return
        if self.upgraded is not None:
            self.upgraded = bytes(work[pos:])
            buf.clear()
            self._update_in_message()
            return
        if work is buf:
            if pos:
                del buf[:pos]  # (_scanned counts from the head's start: unchanged)
        elif pos < len(work):
            buf += memoryview(work)[pos:]
        self._update_in_message()

    def feed_eof(self) -> None:
        """The peer closed its side: a request cut short is an error, none at all is not."""
        if not self.broken and self.upgraded is None and self.in_message:
            self._break(ProtocolError(400, "connection closed in the middle of a request"))

    def _break(self, error: ProtocolError) -> None:
        self.broken = True
        self._buf.clear()
        self._update_in_message()
        self.events.append(error)

    def _run(self, work: bytes | bytearray, pos: int = 0) -> int:
        """Consume as much of ``work`` from ``pos`` as makes events; return how far it got."""
        end = len(work)
        events = self.events
        while pos < end:
            state = self._state
            if state == _HEAD:
                first = work[pos]
                if first == 13 or first == 10:
                    # RFC 9112 2.2: empty lines before a request line are ignored
                    match = _LEADING_CRLF.match(work, pos)
                    if match is not None:
                        pos = match.end()
                        continue
                consumed = self._head(work, pos)
                if consumed < 0:
                    return pos
                pos = consumed
                if self.upgraded is not None:
                    return pos
            elif state in (_LENGTH, _CHUNK_DATA):
                take = min(self._remaining, end - pos)
                events.append(bytes(work[pos:pos + take]))
                pos += take
                self._remaining -= take
                if not self._remaining:
                    if state == _LENGTH:
                        self._message_complete()
                        if self.upgraded is not None:
                            return pos
                    else:
                        self._state = _CHUNK_CRLF
            elif state == _CHUNK_CRLF:
                if end - pos < 2:
                    if work[pos:pos + 1] != b"\r":
                        raise ProtocolError(400, "chunk data not followed by CRLF")
                    return pos
                if work[pos:pos + 2] != b"\r\n":
                    raise ProtocolError(400, "chunk data not followed by CRLF")
                pos += 2
                self._state = _CHUNK_SIZE
            elif state == _CHUNK_SIZE:
                eol = work.find(b"\n", pos, pos + MAX_CHUNK_LINE)
                if eol < 0:
                    if end - pos >= MAX_CHUNK_LINE:
                        raise ProtocolError(400, "chunk extension too long")
                    return pos
                pos = self._chunk_size_line(work, pos, eol + 1)
                if self.upgraded is not None:
                    return pos
            elif state == _DONE:  # the last request of the connection: ignore what follows
                return end
            else:  # _TRAILER
                eol = work.find(b"\n", pos)
                if eol < 0:
                    if end - pos + self._head_size > self.limits.head:
                        raise ProtocolError(431, "trailer section too large")
                    return pos
                pos = self._trailer_line(work, pos, eol + 1)
                if self.upgraded is not None:
                    return pos
        return pos

    # --- the head ---------------------------------------------------------------------------
    def _head(self, work: bytes | bytearray, pos: int) -> int:
        """Find a complete head in ``work[pos:]``; -1 until it has arrived (limits checked)."""
        scanned = self._scanned
        start = pos + scanned - 3 if scanned > 3 else pos
        end = work.find(b"\r\n\r\n", start)
        limits = self.limits
        if end >= 0:
            end += 4
        else:
            # a head ended with bare LFs is found too, so that the tokeniser refuses it now
            # instead of waiting for a CRLFCRLF that never comes (an earlier bare-LF end
            # inside a CRLFCRLF-terminated head is refused by the tokeniser just the same)
            match = _HEAD_END.search(work, start)
            end = match.end() if match is not None else -1
        if end < 0:
            size = len(work) - pos
            if size > limits.request_line + 1 > 1 and work.find(b"\n", pos) < 0:
                raise ProtocolError(414, "request line too long")
            if size > limits.head:
                raise ProtocolError(431, "request head too large")
            self._scanned = size
            return -1
        if scanned:
            self._scanned = 0
        if end - pos > self._max_head:
            raise ProtocolError(431, "request head too large")
        self._parse_head(work if not pos and end == len(work) and work.__class__ is bytes
                         else bytes(work[pos:end]))
        return end

    def _parse_head(self, head: bytes) -> None:
        """Check and tokenise one complete head (its empty line included; within the head
        limit) and decide its framing: a RequestHead event, or ProtocolError."""
        line_end = head.find(b"\n")
        if line_end > self._max_line:
            raise ProtocolError(414, "request line too long")
        # the method ends at the first space (partition: one C argument, see _VERSIONS).  A
        # second space after it, or before the version (see _tokenise), is refused here:
        # llhttp accepts both, and rejects a space inside the target itself
        method = head.partition(b" ")[0]
        space = len(method)
        if space > line_end:  # no space in the request line at all
            space = -1
            method = head[:line_end].rstrip(b"\r")
        elif head[space + 1] == 32:
            raise ProtocolError(400, "malformed request line")
        if method not in KNOWN_METHODS:
            if _IS_TOKEN(method):
                raise ProtocolError(501, "method not implemented")
            raise ProtocolError(400, "invalid method")
        if self._obs_fold and (head.find(b"\n ") >= 0 or head.find(b"\n\t") >= 0):
            head = _OBS_FOLD.sub(b" ", head)
        # per-head state (what _start_head does, inlined: this is the hot path; the framing
        # fields' own state is reset by _finish_head's slow path, the only one to read it)
        self._headers = []
        self._hosts = 0
        self._framing_seen = False
        version = self._tokenise(head, method, line_end, space)
        if len(head) - line_end > self._fields_room:
            self._check_fields()
        if self._framing_seen or version != "1.1":
            self._finish_head(method, version)
        else:
            self._finish_plain_head(method)

    def _check_fields(self) -> None:
        """The field count and field size limits (only called when a head could break one)."""
        limits = self.limits
        if len(self._headers) > limits.fields > 0:
            raise ProtocolError(431, "too many header fields")
        if limits.field_size > 0:
            for name, value in self._headers:
                if len(name) + len(value) > limits.field_size:
                    raise ProtocolError(431, "header field too large")

    def _tokenise(self, head: bytes, method: bytes, line_end: int, space: int) -> str:
        """Tokenise one complete head with llhttp, which calls :meth:`_field` per field.

        Returns the HTTP version ("1.0", "1.1", ...) and leaves the target in ``_url``.

        Only ``on_header`` calls back into Python: the target and the version are read off the
        request line once llhttp has accepted it (``on_url`` and ``get_http_version()`` cost
        a callback or a formatted string per request).  (Reading the fields off the head
        with one ``findall`` instead of the callbacks measured no cheaper: the regex engine
        spends as much per byte as the callbacks per field.)  The parser is reused after a
        head that leaves llhttp ready for the next one (see :meth:`_finish_head`); should a
        reused parser refuse a head, a fresh one tokenises it again, so reuse can never
        change a verdict.
        """
        parser = self._parser
        fresh = self._parser_dirty
        if fresh:
            parser = self._parser = httptools.HttpRequestParser(self)
            # clean until a head leaves it otherwise: _finish_head says so, and any refusal
            # breaks the reader, which then never feeds the parser again
            self._parser_dirty = False
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            self._parser_dirty = True  # CONNECT / Upgrade: llhttp is paused for good
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__ or exc.__cause__
            if isinstance(cause, ProtocolError):
                raise cause from None
            raise ProtocolError(400, "malformed request") from None
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, ProtocolError):
                raise exc.__context__ from None
            if not fresh:
                self._parser_dirty = True
                self._start_head()
                return self._tokenise(head, method, line_end, space)
            raise _map_parser_error(exc) from None
        version = _VERSIONS.get(head[line_end - 10:line_end + 1])
        if version is None:  # not "... HTTP/1.x\r\n" (an HTTP/0.9 or 2.0 line, say): the slow way
            parts = head[:line_end].rstrip(b"\r").split(b" ")
            self._url = parts[1] if len(parts) == 3 else b""
            return parser.get_http_version()  # type: ignore[no-any-return]
        if head[line_end - 11] == 32:  # "target  HTTP/1.1": see _head
            raise ProtocolError(400, "malformed request line")
        self._url = head[space + 1:line_end - 10]
        return version

    # --- rules shared by every tokeniser ----------------------------------------------------
    def _field(self, name: bytes, value: bytes) -> None:
        """One header field, as the tokeniser found it (value without leading OWS).

        It is also llhttp's ``on_header`` callback, so it does only the per-field work; the
        count and size limits are checked once the head is tokenised (:meth:`_check_fields`):
        the head's own limit already bounds the work until then.
        """
        name = name.lower()
        value = value.rstrip(b" \t")
        if name in _FRAMING_FIELDS:
            if name == b"host":
                self._hosts += 1
            else:
                self._framing_field(name, value)
        self._headers.append((name, value))

    on_header = _field

    def _framing_field(self, name: bytes, value: bytes) -> None:
        self._framing_seen = True
        if name == b"content-length":
            self._content_length_header(value)
        elif name == b"transfer-encoding":
            self._transfer_encoding_header(value)
        elif name == b"connection":
            self._conn_tokens = value.lower() if self._conn_tokens is None \
                else self._conn_tokens + b"," + value.lower()
        elif name == b"expect":
            self._expect = value.lower() == b"100-continue"
        elif name == b"upgrade":
            self._upgrade_header = True

    def _content_length_header(self, value: bytes) -> None:
        # exactly one field of 1*DIGIT: no lists, no repeats (even of an equal value), no
        # sign, no "_", no non-ASCII digits (llhttp rejects most of this itself; h11 does not)
        if self._content_length is not None:
            raise ProtocolError(400, "more than one Content-Length")
        if not value.isdigit() or not value.isascii() or len(value) > 18:
            raise ProtocolError(400, "invalid Content-Length")
        self._content_length = int(value)

    def _transfer_encoding_header(self, value: bytes) -> None:
        # RFC 9112 6.3: a request whose final coding is not chunked has no reliable length
        # (400); chunked after another coding we do not implement is 501 (6.1)
        codings = [c.strip(b" \t").lower() for c in value.split(b",")]
        if self._chunked or codings[-1] != b"chunked":
            raise ProtocolError(400, "Transfer-Encoding must be a single final chunked")
        if len(codings) > 1:
            if all(_IS_TOKEN(c) for c in codings) and b"chunked" not in codings[:-1]:
                raise ProtocolError(501, "unsupported Transfer-Encoding")
            raise ProtocolError(400, "invalid Transfer-Encoding")
        self._chunked = True

    def _finish_plain_head(self, method: bytes) -> None:
        """:meth:`_finish_head` for the common case: HTTP/1.1 and no framing field but Host
        (no body, keep-alive, no 100-continue, no upgrade unless CONNECT): the same rules,
        in a quarter of the steps."""
        if self._hosts != 1:
            raise ProtocolError(400, "missing Host header" if not self._hosts
                                else "more than one Host header")
        target = self._url
        # (split_target inlined for the common origin-form target: this is the hot path.
        # target[0], not a slice: the target is never empty here, as _tokenise refuses
        # "GET  HTTP/1.1", the one line whose version it reads with an empty target)
        path, mark, query = target.partition(b"?")
        if target[0] != 47:  # not "/..."
            path, query = split_target(target)
        elif not mark:
            path = target
        # (_upgrade and _keep_alive are left as they are: only the end of a body reads them,
        # and a plain head has none)
        upgrade = method == b"CONNECT"
        head = RequestHead()  # (no __init__: a call of the class costs less than object.__new__)
        head.method = method
        head.target = target
        head.path = path
        head.query = query
        head.version = "1.1"
        head.headers = self._headers
        head.keep_alive = True
        head.content_length = None
        head.chunked = head.expect_continue = head.has_body = False
        head.upgrade = upgrade
        events = self.events
        events.append(head)
        events.append(END_OF_MESSAGE)
        if upgrade:
            self.upgraded = b""
        # (else llhttp is ready for the next head: _parser_dirty stays False)

    def _finish_head(self, method: bytes, version: str) -> None:
        # the framing fields' state, taken and cleared for the next head (between heads it is
        # always clear: _head does not reset it, and _finish_plain_head never sets it)
        length, chunked, tokens = self._content_length, self._chunked, self._conn_tokens
        expect, upgrade_header = self._expect, self._upgrade_header
        self._content_length = self._conn_tokens = None
        self._chunked = self._expect = self._upgrade_header = False
        if version != "1.1" and version != "1.0":
            raise ProtocolError(400, "unsupported HTTP version")
        if self._hosts != 1 and (self._hosts or version == "1.1"):
            raise ProtocolError(400, "missing Host header" if not self._hosts
                                else "more than one Host header")
        if chunked:
            if length is not None:
                raise ProtocolError(400, "both Transfer-Encoding and Content-Length")
            if version == "1.0":
                raise ProtocolError(400, "Transfer-Encoding in an HTTP/1.0 request")
        body_limit = self.limits.body
        if length is not None and length > body_limit > 0:
            raise ProtocolError(413, "request body too large")
        if tokens is None:
            keep_alive = version == "1.1"
            upgrade = method == b"CONNECT"
        else:  # (partition, not find: see _VERSIONS)
            options = [t.strip(b" \t") for t in tokens.split(b",")] \
                if tokens.partition(b",")[1] else (tokens,)
            keep_alive = b"close" not in options if version == "1.1" else b"keep-alive" in options
            upgrade = method == b"CONNECT" or (upgrade_header and b"upgrade" in options)
        self._upgrade = upgrade
        self._keep_alive = keep_alive
        target = self._url
        path, query = split_target(target)
        has_body = chunked or (length is not None and length > 0)
        # RFC 9110 10.1.1: a 100-continue expectation in an HTTP/1.0 request is ignored
        head = RequestHead()
        head.method = method
        head.target = target
        head.path = path
        head.query = query
        head.version = version
        head.headers = self._headers
        head.keep_alive = keep_alive
        head.content_length = length
        head.chunked = chunked
        head.expect_continue = expect and version == "1.1"
        head.upgrade = upgrade
        head.has_body = has_body
        self.events.append(head)
        # llhttp is ready for the next head after one without a body that keeps the
        # connection (a body is decoded here, never fed to llhttp, which would wait for it)
        self._parser_dirty = upgrade or not keep_alive or has_body
        self._body_size = 0
        self._ext_total = 0
        if chunked:
            self._state = _CHUNK_SIZE
        elif length:
            self._state = _LENGTH
            self._remaining = length
        else:  # no body: the message is complete
            self.events.append(END_OF_MESSAGE)
            if upgrade:
                self.upgraded = b""
            elif not keep_alive:
                self._state = _DONE

    def _message_complete(self) -> None:
        # RFC 9112 9.6: no request after one that closes the connection is processed
        self._state = _HEAD if self._keep_alive else _DONE
        self.events.append(END_OF_MESSAGE)
        if self._upgrade:
            self.upgraded = b""

    # --- chunked bodies ---------------------------------------------------------------------
    def _chunk_size_line(self, work: bytes | bytearray, pos: int, end: int) -> int:
        match = _CHUNK_LINE.fullmatch(work, pos, end)
        if match is None:
            raise ProtocolError(400, "invalid chunk size line")
        ext = match.end(2) - match.start(2)
        if ext:
            self._ext_total += ext
            if self._ext_total > MAX_CHUNK_EXT_TOTAL:
                raise ProtocolError(400, "too many chunk extensions")
        size = int(match.group(1), 16)
        if size == 0:
            self._state = _TRAILER
            self._head_size = 0
            self._field_count = 0
            return end
        self._body_size += size
        if self._body_size > self.limits.body > 0:
            raise ProtocolError(413, "request body too large")
        self._state = _CHUNK_DATA
        self._remaining = size
        return end

    def _trailer_line(self, work: bytes | bytearray, pos: int, end: int) -> int:
        if end - pos == 2 and work[pos] == 13:  # b"\r\n": the end of the message
            self._message_complete()
            return end
        self._head_size += end - pos
        self._field_count += 1
        if self._head_size > self.limits.head:
            raise ProtocolError(431, "trailer section too large")
        if self._field_count > self.limits.fields > 0:
            raise ProtocolError(431, "too many trailer fields")
        if _TRAILER_LINE.fullmatch(work, pos, end) is None:
            raise ProtocolError(400, "invalid trailer field")
        return end  # trailers are checked and dropped: WSGI has no place for them


def _map_parser_error(exc: Exception) -> ProtocolError:
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        return ProtocolError(400, "invalid method")
    if isinstance(exc, httptools.HttpParserInvalidURLError):
        return ProtocolError(400, "invalid request target")
    text = str(exc)
    if "Transfer-Encoding" in text and "invalid" in text.lower():
        return ProtocolError(400, "invalid Transfer-Encoding")
    return ProtocolError(400, text or "malformed request")
